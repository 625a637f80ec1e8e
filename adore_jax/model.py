"""A Llama-family decoder as pure functions over a params pytree.

Params layout (weights stored [in, out], so activations multiply from the left):
  embed:      [V, E]
  layers:     tuple of L dicts:
                attn_norm [E], wq [E, H*D], wk [E, G*D], wv [E, G*D], wo [H*D, E],
                (bq [H*D], bk [G*D], bv [G*D] when config.attention_bias),
                mlp_norm [E], w_gate [E, F], w_up [E, F], w_down [F, E]
  final_norm: [E]
  lm_head:    [E, V]   (absent when config.tie_word_embeddings)

`run_layers` is the one layer loop: cached decoding (`forward_block`) and the training forward
(`adore_jax.train.forward`) differ only in the attention they hand it. Layers are a Python loop over
per-layer arrays, not a `lax.scan` over stacked weights: on XLA:CPU slicing stacked weights inside
jit copies them every step (docs/perf.md).
"""
import dataclasses
import functools
import operator
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax import cache as kv_cache
from adore_jax.config import ModelConfig
from adore_jax.rope import apply_rope, inverse_frequencies
from pallas_kernels import slot_attention
from pallas_kernels.reference import attend, attention_logits, masked_softmax
from pallas_kernels.slot_attention import slot_visibility


def init_params(config: ModelConfig, key, dtype=jnp.float32, scale: float = 0.02):
    """Random params of the right shapes (for tests and benchmarks)."""
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    keys = iter(jax.random.split(key, 8 * config.num_layers + 2))

    def dense(shape):
        return (scale * jax.random.normal(next(keys), shape)).astype(dtype)

    def layer():
        p = dict(attn_norm=jnp.ones((e,), dtype), wq=dense((e, qd)), wk=dense((e, kvd)),
                 wv=dense((e, kvd)), wo=dense((qd, e)), mlp_norm=jnp.ones((e,), dtype),
                 w_gate=dense((e, f)), w_up=dense((e, f)), w_down=dense((f, e)))
        if config.attention_bias:
            p.update(bq=dense((qd,)), bk=dense((kvd,)), bv=dense((kvd,)))
        return p

    params = dict(embed=dense((v, e)), layers=tuple(layer() for _ in range(config.num_layers)),
                  final_norm=jnp.ones((e,), dtype))
    if not config.tie_word_embeddings:
        params["lm_head"] = dense((e, v))
    return params


def rms_norm(x, weight, eps):
    """x: [..., E] -> [..., E], normalised in f32 and scaled by weight."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def _project(x, weight, bias=None):
    y = x @ weight
    return y if bias is None else y + bias


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockInput:
    """A block of Q tokens per sequence to run through the model and write into the cache."""
    tokens: jax.Array  # [B, Q] int32
    positions: jax.Array  # [B, Q] int32 absolute positions (RoPE and masks use these)
    slots: jax.Array  # [B, Q] int32 cache slot each token's K/V is written to
    valid: jax.Array  # [B, Q] bool; False for padding (its slot stays invalid)


def attention_inputs(layer, config: ModelConfig, h, positions, inv_freq):
    """Normed activations h [B, T, E] -> q [B, T, H, D], k, v [B, T, G, D], RoPE applied at `positions`."""
    batch, length = h.shape[:2]
    q = _project(h, layer["wq"], layer.get("bq")).reshape(batch, length, config.num_heads, config.head_dim)
    k = _project(h, layer["wk"], layer.get("bk")).reshape(batch, length, config.num_kv_heads, config.head_dim)
    v = _project(h, layer["wv"], layer.get("bv")).reshape(batch, length, config.num_kv_heads, config.head_dim)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def attention_output(layer, x, attn):
    """Residual add of the attention output: x [B, T, E], attn [B, T, H, D] -> [B, T, E]."""
    return x + attn.reshape(*attn.shape[:2], -1) @ layer["wo"]


def mlp_block(layer, config: ModelConfig, x):
    """The SwiGLU half of a layer with its residual: x [B, T, E] -> [B, T, E]."""
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    return x + (jax.nn.silu(h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"]


def run_layers(params, config: ModelConfig, tokens, positions, attend, remat: bool = False,
               hidden_after: Optional[int] = None):
    """The decoder: embedding, every layer, final norm, with the attention supplied by the caller.

    tokens, positions [B, T] int32 (RoPE uses the positions). `attend(layer_index, q [B,T,H,D],
    k [B,T,G,D], v [B,T,G,D]) -> (out [B,T,H,D], aux)`; aux is anything the caller wants per layer.
    remat: wrap each layer in `jax.checkpoint` (the backward pass recomputes its activations).

    hidden_after: also return the hidden state after this many layers, through the final norm (a logit
    lens's view; what a scorer may read).

    Returns (hidden [B, T, E] after the final norm, [aux of each layer], that hidden state [B, T, E] or None).
    """
    inv_freq = jnp.asarray(inverse_frequencies(config))

    def run_layer(index, layer, x):
        h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = attention_inputs(layer, config, h, positions, inv_freq)
        out, aux = attend(index, q, k, v)
        return mlp_block(layer, config, attention_output(layer, x, out)), aux

    if remat:
        run_layer = jax.checkpoint(run_layer, static_argnums=(0,))
    x = params["embed"][tokens]  # [B, T, E]
    layer_aux, tapped = [], None
    for index, layer in enumerate(params["layers"]):
        if index == hidden_after:
            tapped = rms_norm(x, params["final_norm"], config.rms_norm_eps)
        x, aux = run_layer(index, layer, x)
        layer_aux.append(aux)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), layer_aux, tapped


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExtraRows:
    """K/V rows a layer attends beside the cache's slots, for that layer and block only (a layer hook's output).

    Rows shared by the block's queries, k, v [B, R, G, D], go into `slots` [B, R] (free slots the block did not
    write, left invalid in the cache) at `positions` [B, R], so the slot kernels attend them. Without slots each
    query attends its own rows, k, v [B, Q, R, G, D], in one softmax with the slots (`attend_with_rows`)."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array  # [B, R] or [B, Q, R] bool: the row may be attended
    positions: Optional[jax.Array] = None  # [B, R] int32 (rows in slots)
    slots: Optional[jax.Array] = None  # [B, R] int32


def attend_with_rows(q, k, v, q_positions, slot_positions, slot_valid, k_rows, v_rows, rows_found, return_mass=False):
    """Slot attention (`slot_attention_ref`'s semantics) in which each query also attends its own extra rows,
    k_rows, v_rows [B, Q, R, G, D] where rows_found [B, Q, R], in one softmax with the slots. Returns
    out [B, Q, H, D] and, with return_mass, the slots' mass [B, Q, G, S] (what the rows take is not a slot's)."""
    batch, n_queries, n_heads, dim = q.shape
    groups, n_slots = k.shape[2], k.shape[1]
    qg = q.reshape(batch, n_queries, groups, n_heads // groups, dim)  # [B, Q, G, r, D]
    row_logits = jnp.einsum("bqgjd,bqkgd->bgjqk", qg, k_rows, preferred_element_type=jnp.float32) * dim ** -0.5
    logits = jnp.concatenate([attention_logits(q, k), row_logits.reshape(batch, n_heads, n_queries, -1)], axis=-1)
    keep = jnp.concatenate([slot_visibility(q_positions, slot_positions, slot_valid), rows_found], axis=-1)
    probs, _ = masked_softmax(logits, keep[:, None])  # [B, H, Q, S + R]
    row_probs = probs[..., n_slots:].reshape(batch, groups, n_heads // groups, n_queries, -1)
    out = attend(probs[..., :n_slots], v) + jnp.einsum("bgjqk,bqkgd->bqgjd", row_probs, v_rows).reshape(q.shape)
    if not return_mass:
        return out.astype(q.dtype)
    mass = probs[..., :n_slots].reshape(batch, groups, n_heads // groups, n_queries, n_slots).sum(axis=2)
    return out.astype(q.dtype), mass.transpose(0, 2, 1, 3)


def forward_block(params, config: ModelConfig, cache: kv_cache.KVCache, block: BlockInput,
                  attention=slot_attention, mass_weights=None, layer_hook=None, hidden_after=None):
    """Run a block through all layers, writing its K/V into the cache first, then attending.

    `attention(q [B,Q,H,D], k [B,S,G,D], v [B,S,G,D], q_positions [B,Q], slot_positions [B,S],
    slot_valid [B,S], [return_mass=True]) -> [B,Q,H,D] [, mass [B,Q,G,S]]` is the seam where
    policies and kernels plug in. With mass_weights [B, Q] float32, the attention mass each query puts on each
    slot is summed over heads, weighted over the queries and summed over layers, each layer's at once (a sum of
    [B, Q, S] masses over layers would keep every layer's as a temporary).
    layer_hook(layer, q [B,Q,H,D], k, v [B,Q,G,D]) -> (ExtraRows or None, aux): extra K/V rows the layer attends
    beside the slots, and anything the caller wants back from that layer.
    hidden_after: a layer count whose hidden state is returned too (`run_layers`; what a scorer may read).

    Returns (hidden [B, Q, E] after the final norm, updated cache, mass [B, S] float32 or None,
    each layer's hook aux (a tuple; () without a hook), hidden [B, Q, E] after hidden_after layers or None).
    """
    cache = kv_cache.claim_slots(cache, block.slots, block.positions, block.valid)
    batch_rows = jnp.arange(block.tokens.shape[0])[:, None]

    def attend_slots(index, q, k, v):
        k_slots = kv_cache.write_layer(cache.k[index], block.slots, k)  # [B, S, G, D]
        v_slots = kv_cache.write_layer(cache.v[index], block.slots, v)
        slot_positions, slot_valid, attend = cache.slot_positions, cache.slot_valid, attention
        extra, aux = (None, None) if layer_hook is None else layer_hook(index, q, k, v)
        if extra is not None and extra.slots is not None:  # rows shared by the block's queries, in spare slots
            k_slots = kv_cache.write_layer(k_slots, extra.slots, extra.k)
            v_slots = kv_cache.write_layer(v_slots, extra.slots, extra.v)
            slot_positions = slot_positions.at[batch_rows, extra.slots].set(extra.positions)
            slot_valid = slot_valid.at[batch_rows, extra.slots].set(extra.valid)
        elif extra is not None:  # each query its own rows
            attend = functools.partial(attend_with_rows, k_rows=extra.k, v_rows=extra.v, rows_found=extra.valid)
        args = (q, k_slots, v_slots, block.positions, slot_positions, slot_valid)
        if mass_weights is None:
            return attend(*args), (k_slots, v_slots, None, aux)
        out, mass = attend(*args, return_mass=True)  # mass [B, Q, G, S]
        return out, (k_slots, v_slots, jnp.einsum("bq,bqgs->bs", mass_weights, mass), aux)

    hidden, layer_aux, tapped_hidden = run_layers(params, config, block.tokens, block.positions, attend_slots,
                                                  hidden_after=hidden_after)
    new_k, new_v, masses, hook_out = zip(*layer_aux)
    cache = dataclasses.replace(cache, k=new_k, v=new_v)
    mass = None if mass_weights is None else functools.reduce(operator.add, masses)
    return hidden, cache, mass, hook_out if layer_hook is not None else (), tapped_hidden


def lm_logits(params, hidden):
    """hidden [..., E] -> logits [..., V] float32."""
    if "lm_head" in params:
        return jnp.dot(hidden, params["lm_head"], preferred_element_type=jnp.float32)
    return jnp.einsum("...e,ve->...v", hidden, params["embed"], preferred_element_type=jnp.float32)


def forward(params, config: ModelConfig, tokens):
    """Plain causal forward of whole sequences: tokens [B, T] -> logits [B, T, V] float32.

    The reference the cached paths are tested against: one block on an empty T-slot cache.
    """
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    cache = kv_cache.init_cache(config, batch, length, params["embed"].dtype)
    block = BlockInput(tokens, positions, positions, jnp.ones((batch, length), bool))
    hidden, *_ = forward_block(params, config, cache, block)
    return lm_logits(params, hidden)


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
