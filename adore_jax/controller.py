"""The ADORE controller: a GRU over the LLM's frozen token representations that scores every past token.

    u_i = x_i W_in + b_in                        (x_i: the LLM's input embedding of token i, or with
                                                  input_layer = l its hidden state after the first l
                                                  layers through the final norm, as a logit lens reads it)
    z_i = GRU(u_i, z_{i-1})
    static:       s_i     = MLP(p_i + z_i)
    query_aware:  s_{t,i} = MLP(p_{t-i} + z_i, z_t) = w_2 . relu(W_1 (p_{t-i} + z_i) + U z_t + b_1) + b_2
                  (+ (z_t Q) . (z_i K) / sqrt(d) with content_dim d > 0: a bilinear term, so what the current
                  text is about can rank up a token it did not need before)

sigma = sigmoid(s) is the probability that token i is in the top-K attention set of query t. The
first MLP layer is linear, so each token's `features` a_i = W_1 z_i (+ W_1 p_i when static), with
its key z_i K appended when content_dim > 0, are computed once, when the token is seen, and kept in
the release buffer; a decoding step then costs O(n (h + d)) for n past tokens (O(m (h + d)) without rebuild,
where only the m cached tokens are ranked). Ranking uses the logit s, not sigma (same order, no saturation).
"""
import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.weights import default_controller

SCORE_FORMS = ("static", "query_aware")
POSITION_EMBEDDINGS = ("sinusoidal", "learned", "log_buckets")
EXACT_DISTANCES = 16  # log_buckets: distances below this get a bucket each
BUCKETS_PER_OCTAVE = 4  # ... and above it, four buckets per doubling


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    embed_dim: Optional[int] = None  # E, the LLM's embedding width (the controller's input); None: not yet bound
    width: int = 128  # c, GRU state and position-embedding width
    hidden: int = 64  # h, the MLP's hidden width
    score_form: str = "query_aware"  # "static" (sigmoid(MLP(p_i + z_i))) or "query_aware"
    position_embedding: str = "sinusoidal"  # or "learned" (positions clipped to max_positions), or
    # "log_buckets": a learned table over log-spaced, clipped distance buckets (extrapolates to any distance)
    max_positions: int = 8192  # table size of a learned position embedding
    buckets: int = 64  # log_buckets: table rows; 64 reach distance ~16 * 2^12 before clipping
    content_dim: int = 0  # d of the bilinear query-key term (query_aware only); 0: no such term
    input_layer: Optional[int] = None  # x_i: None, the input embedding; l >= 1, the hidden state after l layers
    # (the decode loop taps it from the token's own forward pass, so the controller sees it after that pass)

    def __post_init__(self):
        if self.score_form not in SCORE_FORMS:
            raise ValueError(f"score_form must be one of {SCORE_FORMS}; got {self.score_form!r}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}; "
                             f"got {self.position_embedding!r}")
        for name in ("embed_dim", "width", "hidden", "max_positions", "buckets"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"controller {name} must be >= 1; got {getattr(self, name)}")
        if self.input_layer is not None and (isinstance(self.input_layer, bool) or self.input_layer < 1):
            raise ValueError(f"controller input_layer must be None (input embeddings) or a layer count >= 1; "
                             f"got {self.input_layer!r}")
        if self.content_dim < 0 or (self.content_dim and self.score_form != "query_aware"):
            raise ValueError(f"controller content_dim must be >= 0, and 0 unless score_form='query_aware'; "
                             f"got {self.content_dim} with score_form={self.score_form!r}")

    def check_layers(self, num_layers: int) -> None:
        """Refuse an input_layer that a model of num_layers layers does not have."""
        if self.input_layer is not None and self.input_layer >= num_layers:
            raise ValueError(f"controller input_layer must be in [1, {num_layers}) for this model (it reads the "
                             f"hidden state after that many layers); got {self.input_layer}")

    @property
    def feature_width(self) -> int:
        """Width of a token's buffered features: h, plus its key's d."""
        return self.hidden + self.content_dim


def init_controller(config: ControllerConfig, key):
    """Random controller params: a pytree of float32 arrays (orbax can save it)."""
    e, c, h = config.embed_dim, config.width, config.hidden
    k = jax.random.split(key, 9)

    def dense(key, shape, fan_in):
        return jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)

    params = dict(
        w_in=dense(k[0], (e, c), e), b_in=jnp.zeros((c,)),
        gru_x=dense(k[1], (c, 3 * c), c), gru_h=dense(k[2], (c, 3 * c), c), gru_b=jnp.zeros((3 * c,)),
        w_1=dense(k[3], (c, h), c), b_1=jnp.zeros((h,)), w_2=dense(k[4], (h,), h), b_2=jnp.zeros(()),
    )
    if config.score_form == "query_aware":
        params["u"] = dense(k[5], (c, h), c)
    if config.content_dim:
        d = config.content_dim
        params["query"], params["key"] = dense(k[7], (c, d), c), dense(k[8], (c, d), c)
    if config.position_embedding != "sinusoidal":
        rows = config.max_positions if config.position_embedding == "learned" else config.buckets
        params["positions"] = 0.02 * jax.random.normal(k[6], (rows, c))
    return params


def distance_bucket(positions, buckets: int):
    """Log-spaced buckets: d itself below EXACT_DISTANCES, then BUCKETS_PER_OCTAVE per doubling,
    the last bucket holding every larger d. positions [...] int -> [...] int32 in [0, buckets)."""
    d = jnp.maximum(positions, 0)
    octaves = jnp.log2(jnp.maximum(d, 1).astype(jnp.float32) / EXACT_DISTANCES)
    logarithmic = EXACT_DISTANCES + jnp.floor(octaves * BUCKETS_PER_OCTAVE).astype(jnp.int32)
    return jnp.clip(jnp.where(d < EXACT_DISTANCES, d, logarithmic), 0, buckets - 1).astype(jnp.int32)


def position_embedding(config: ControllerConfig, params, positions):
    """positions [...] int32 (absolute, or distances t - i) -> [..., c] float32."""
    if config.position_embedding == "learned":
        return params["positions"][jnp.clip(positions, 0, config.max_positions - 1)]
    if config.position_embedding == "log_buckets":
        return params["positions"][distance_bucket(positions, config.buckets)]
    half = config.width // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half) / half)
    angles = positions.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(emb, [(0, 0)] * positions.ndim + [(0, config.width - 2 * half)])


def embed_inputs(params, token_embeddings):
    """The LLM's token embeddings [..., E] -> controller inputs u [..., c] (float32)."""
    return token_embeddings.astype(jnp.float32) @ params["w_in"] + params["b_in"]


def gru_step(params, state, inputs):
    """One GRU step (PyTorch gate convention): state [B, c], inputs u [B, c] -> new state [B, c]."""
    gx = inputs @ params["gru_x"] + params["gru_b"]
    gh = state @ params["gru_h"]
    c = state.shape[-1]
    reset = jax.nn.sigmoid(gx[..., :c] + gh[..., :c])
    update = jax.nn.sigmoid(gx[..., c:2 * c] + gh[..., c:2 * c])
    candidate = jnp.tanh(gx[..., 2 * c:] + reset * gh[..., 2 * c:])
    return (1 - update) * candidate + update * state


def token_features(config: ControllerConfig, params, states, positions):
    """a_i = W_1 z_i (+ W_1 p_i when static), then the key z_i K: states [..., c], positions [...] -> [..., h + d]."""
    features = states @ params["w_1"]
    if config.score_form == "static":
        features = features + position_embedding(config, params, positions) @ params["w_1"]
    if config.content_dim:
        features = jnp.concatenate([features, states @ params["key"]], axis=-1)
    return features


def distance_table(config: ControllerConfig, params, max_distance: int):
    """W_1 p_d for every distance d in [0, max_distance): [max_distance, h]. Query-aware scoring
    looks rows up here instead of embedding and projecting n distances every step."""
    return position_embedding(config, params, jnp.arange(max_distance)) @ params["w_1"]


def score(config: ControllerConfig, params, features, key_positions, query_state, query_position, table=None):
    """Score logits of past tokens for one query per sequence.

    features: [B, N, h + d]; key_positions: [B, N] or [N]; query_state: [B, c]; query_position: [B];
    table: optional `distance_table` covering every distance that occurs.
    Returns [B, N] float32 (higher = more likely in the query's top-K).
    """
    features, keys = features[..., :config.hidden], features[..., config.hidden:]
    pre = features + params["b_1"]
    if config.score_form == "query_aware":
        distance = jnp.maximum(query_position[:, None] - key_positions, 0)  # [B, N]
        if table is None:
            pre = pre + position_embedding(config, params, distance) @ params["w_1"]
        else:
            pre = pre + table[jnp.minimum(distance, table.shape[0] - 1)]
        pre = pre + (query_state @ params["u"])[:, None, :]
    scores = jax.nn.relu(pre) @ params["w_2"] + params["b_2"]
    if config.content_dim:
        query = query_state @ params["query"]  # [B, d]
        scores = scores + jnp.einsum("bnd,bd->bn", keys, query) * config.content_dim ** -0.5
    return scores


def encode_sequence(config: ControllerConfig, params, token_embeddings, valid=None, state=None, positions=None):
    """The GRU over whole sequences (the parallel form, for training and prefill).

    token_embeddings: [B, T, E]; valid: [B, T] bool (padding leaves the state unchanged);
    state: [B, c] to continue from; positions: [B, T] absolute positions (default 0..T-1).
    Returns (states z [B, T, c], features a [B, T, h], final state [B, c]).
    """
    batch, length = token_embeddings.shape[:2]
    inputs = embed_inputs(params, token_embeddings)  # [B, T, c]
    if valid is None:
        valid = jnp.ones((batch, length), bool)
    if state is None:
        state = jnp.zeros((batch, config.width), jnp.float32)

    def step(z, xs):
        u, ok = xs
        z = jnp.where(ok[:, None], gru_step(params, z, u), z)
        return z, z

    final, states = jax.lax.scan(step, state, (inputs.transpose(1, 0, 2), valid.T))
    states = states.transpose(1, 0, 2)
    if positions is None:
        positions = jnp.arange(length)
    return states, token_features(config, params, states, positions), final


def pairwise_scores(config: ControllerConfig, params, states, features):
    """Score logits of every (query t, key i) pair: [B, T, c], [B, T, h] -> [B, T, T] (all pairs;
    callers mask i > t). The training objective compares these with the top-K labels."""
    length = states.shape[1]
    positions = jnp.arange(length)

    def one_query(t_state, t):
        return score(config, params, features, positions, t_state, jnp.full((states.shape[0],), t))

    return jax.vmap(one_query, in_axes=(1, 0), out_axes=1)(states, positions)


def save_controller(directory: str, config: ControllerConfig, params) -> None:
    """Write the controller as an orbax checkpoint plus its config as JSON."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "controller_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, "params"), params, force=True)


def load_controller(directory: str, embed_dim: int):
    """(config, params) of a saved controller; refuses one built for another embedding width."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, "controller_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"controller {directory!r}: no controller_config.json there")
    with open(config_path) as f:
        config = ControllerConfig(**json.load(f))
    if config.embed_dim != embed_dim:
        raise ValueError(f"controller {directory!r} was built for embedding width {config.embed_dim}, "
                         f"but the model's is {embed_dim}")
    template = jax.eval_shape(lambda: init_controller(config, jax.random.key(0)))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(os.path.join(directory, "params"), template)
    return config, params


def resolve_controller(model, controller):
    """(ControllerConfig, params) from a path, a (config, params) pair, or the model's default."""
    if controller is None:
        controller = default_controller(model.source)
        if controller is None:
            raise ValueError(f"policy 'adore' needs a controller: pass controller=PATH (a trained controller) "
                             f"or a (ControllerConfig, params) pair; model {model.source!r} has no default")
    if isinstance(controller, (str, bytes)) or hasattr(controller, "__fspath__"):
        config, params = load_controller(str(controller), model.config.hidden_size)
    else:
        config, params = controller
    if config.embed_dim != model.config.hidden_size:
        raise ValueError(f"controller was built for embedding width {config.embed_dim}, "
                         f"but the model's is {model.config.hidden_size}")
    config.check_layers(model.config.num_layers)
    return config, params
