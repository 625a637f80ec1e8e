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
jit copies them every step (see PERF_NOTES.md).
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
from pallas_kernels._common import block_diagonal_queries
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
    lens's view; the controller's input_layer).

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


def max_head_logits(query, keys):
    """query [B, H, D] against keys [B, N, G, D] -> [B, N]: the largest attention logit q . k / sqrt(D) over the
    query heads (head h reads KV head h // (H // G)).

    One matmul of the keys in their stored layout against the block-diagonal queries (a grouped einsum
    transposes the [B, N, G, D] keys first: 4.9x slower on XLA:CPU at 8k tokens, batch 4)."""
    batch, n, groups, dim = keys.shape
    q_bd = block_diagonal_queries(query[:, None].astype(jnp.float32), groups)  # [B, H, G*D]
    logits = jnp.matmul(keys.reshape(batch, n, groups * dim).astype(jnp.float32), q_bd.swapaxes(1, 2))  # [B, N, H]
    return jnp.max(logits, axis=-1) * dim ** -0.5


def max_head_logits_by_group(query, keys):
    """`max_head_logits` for keys laid out KV-head-major, [B, G, N, D] -> [B, N]: one batched matmul per (batch, KV
    head) against that head's r = H / G queries, without the block-diagonal's G-fold work (1.9x faster on
    XLA:CPU at 8k tokens, batch 1)."""
    return max_head_logits_per_query(query[:, None], keys)[:, 0]


def max_head_logits_per_query(queries, keys):
    """`max_head_logits_by_group` for a block of queries [B, Q, H, D] -> [B, Q, N]: each query's largest logit over
    its heads, all Q queries of a KV head in one batched matmul."""
    batch, n_queries, _, dim = queries.shape
    grouped = queries.reshape(batch, n_queries, keys.shape[1], -1, dim).transpose(0, 2, 1, 3, 4)  # [B, G, Q, r, D]
    return _max_over_grouped_heads(keys, grouped, dim)


def page_bounds(query, bounds):
    """query [B, H, D] against per-page key bounds [B, G, P, 2, D] (each dim's max, then min, over a page's keys
    of KV head g) -> [B, P]: an upper bound of `max_head_logits` over the page's keys (Quest, Tang et al. 2024):
    per head, the sum over dims of max(q_d max_d, q_d min_d), i.e. q+ . max + q- . min."""
    batch, groups, pages, _, dim = bounds.shape
    grouped = query.reshape(batch, groups, 1, -1, dim)  # [B, G, 1, r, D]
    signed = jnp.concatenate([jnp.maximum(grouped, 0), jnp.minimum(grouped, 0)], axis=-1)  # against the max, the min
    return _max_over_grouped_heads(bounds.reshape(batch, groups, pages, 2 * dim), signed, dim)[:, 0]


def _max_over_grouped_heads(rows, queries, dim):
    """rows [B, G, N, W] against each KV head's queries [B, G, Q, r, W] -> [B, Q, N]: each query's max over its
    heads of logit / sqrt(D)."""
    batch, groups, n_queries, _, width = queries.shape
    logits = jnp.matmul(rows.astype(jnp.float32), queries.reshape(batch, groups, -1, width).astype(jnp.float32)
                        .swapaxes(-1, -2))  # [B, G, N, Q * r]
    logits = logits.reshape(batch, groups, rows.shape[2], n_queries, -1)
    return jnp.max(logits, axis=(1, 4)).swapaxes(1, 2) * dim ** -0.5


@dataclasses.dataclass(frozen=True)
class Recall:
    """Stored K/V a block may attend beside the cache: from `first_layer` on, each layer ranks the recallable tokens
    by its own query (`max_head_logits_by_group` against their stored keys), writes the R best tokens' stored K/V
    into R spare slots and attends them with the cache for that layer only. Without slots (a prefill chunk) each
    query of the block ranks for itself and attends its own R rows beside the slots (`rows_per_query`,
    `attend_recalled`).

    With key_bounds (pages of P stored keys) a layer first ranks the pages by `page_bounds` and then only the
    keys of the best `pages` pages: O(N / P + pages * P) keys read instead of N. The R best of those are the R
    best overall unless a page outside them holds a better key than its bound's rank suggests."""
    keys: tuple  # L x [B, G, N, D] every token seen, at its position (RoPE'd), KV-head-major
    values: tuple  # L x [B, G, N, D]
    recallable: jax.Array  # [B, N] bool: the tokens that may come back (released, before every query of the block)
    slots: Optional[jax.Array]  # [B, R] int32 spare cache slots a one-token block's recalled rows use (left invalid
    # in the cache); None for a block of several queries, each of which attends its own R rows (`attend_recalled`)
    first_layer: int
    count: int  # R, the tokens each query recalls per layer
    key_bounds: tuple = ()  # L x [B, G, N / P, 2, D] per page of P positions: each key dim's max, min; () ranks all
    pages: int = 0  # with key_bounds: the pages whose keys are ranked
    querying: Optional[jax.Array] = None  # [B, Q] bool: the queries of a longer block that recall (None: all)

    def rows(self, index, query):
        """Layer `index`'s recalled rows for query [B, H, D]: (positions [B, R] int32, found [B, R] bool,
        k, v [B, R, G, D]), or None below first_layer."""
        if index < self.first_layer:
            return None
        keys, values, recallable = self.keys[index], self.values[index], self.recallable
        positions = None  # [B, C] the candidates' positions, when not all N
        if self.key_bounds:
            keys, values, recallable, positions = self.best_pages(index, query)
        logits = jnp.where(recallable, max_head_logits_by_group(query, keys), -jnp.inf)
        best, picked = jax.lax.top_k(logits, self.count)  # [B, R]
        k_rows, v_rows = (jnp.take_along_axis(x, picked[:, None, :, None], axis=2).swapaxes(1, 2)
                          for x in (keys, values))  # [B, R, G, D]
        if positions is not None:
            picked = jnp.take_along_axis(positions, picked, axis=1)
        return picked.astype(jnp.int32), best > -jnp.inf, k_rows, v_rows

    def rows_per_query(self, index, queries):
        """Layer `index`'s recalled rows for each query of a block, queries [B, Q, H, D], ranking every stored key:
        (positions [B, Q, R] int32, found [B, Q, R] bool, k, v [B, Q, R, G, D]), or None below first_layer. With
        `querying`, only those queries find rows, and a block in which none does ranks nothing."""
        if index < self.first_layer:
            return None  # the layer attends the cache alone
        keys, values = self.keys[index], self.values[index]  # [B, G, N, D]
        batch, n_queries = queries.shape[:2]

        def ranked():
            logits = jnp.where(self.recallable[:, None], max_head_logits_per_query(queries, keys), -jnp.inf)
            best, picked = jax.lax.top_k(logits, self.count)  # [B, Q, R]
            flat = picked.reshape(batch, 1, -1, 1)
            k_rows, v_rows = (jnp.take_along_axis(x, flat, axis=2)
                              .reshape(batch, x.shape[1], n_queries, self.count, -1)
                              .transpose(0, 2, 3, 1, 4) for x in (keys, values))  # [B, Q, R, G, D]
            found = best > -jnp.inf
            if self.querying is not None:
                found &= self.querying[:, :, None]
            return picked.astype(jnp.int32), found, k_rows, v_rows

        if self.querying is None:
            return ranked()

        def nothing():  # what ranked() returns, with nothing found
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(ranked))

        return jax.lax.cond(jnp.any(self.querying), ranked, nothing)  # no query of the block recalls: no ranking

    def best_pages(self, index, query):
        """The `pages` pages with the highest bounds among those holding a recallable token: their keys, values
        [B, G, C, D], recallable [B, C] and positions [B, C] (C = pages * P)."""
        bounds = self.key_bounds[index]
        batch, groups, n_pages = bounds.shape[:3]
        size = self.recallable.shape[1] // n_pages
        holds = jnp.any(self.recallable.reshape(batch, n_pages, size), axis=2)  # [B, N / P]
        _, pages = jax.lax.top_k(jnp.where(holds, page_bounds(query, bounds), -jnp.inf), self.pages)  # [B, K]

        def gather(x):  # [B, G, N, D] -> the chosen pages' rows [B, G, K * P, D]
            paged = x.reshape(batch, groups, n_pages, -1)
            return jnp.take_along_axis(paged, pages[:, None, :, None], axis=2).reshape(batch, groups, -1, x.shape[3])

        chosen = jnp.take_along_axis(self.recallable.reshape(batch, n_pages, size), pages[:, :, None], axis=1)
        positions = (pages[:, :, None] * size + jnp.arange(size)).reshape(batch, self.pages * size)
        return (gather(self.keys[index]), gather(self.values[index]), chosen.reshape(batch, -1), positions)


def attend_recalled(q, k, v, q_positions, slot_positions, slot_valid, k_rows, v_rows, rows_found, return_mass=False):
    """Slot attention (`slot_attention_ref`'s semantics) in which each query also attends its own recalled rows,
    k_rows, v_rows [B, Q, R, G, D] where rows_found [B, Q, R], in one softmax with the slots (the jnp path of a
    recalling prefill chunk; a one-token block puts its rows in spare slots instead). Returns out [B, Q, H, D] and,
    with return_mass, the slots' mass [B, Q, G, S] (what the recalled rows take is not a slot's)."""
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
                  attention=slot_attention, mass_weights=None, cache_update: str = "scatter",
                  tap_layer=None, hidden_after=None, recall: Optional[Recall] = None):
    """Run a block through all layers, writing its K/V into the cache first, then attending.

    `attention(q [B,Q,H,D], k [B,S,G,D], v [B,S,G,D], q_positions [B,Q], slot_positions [B,S],
    slot_valid [B,S], [return_mass=True]) -> [B,Q,H,D] [, mass [B,Q,G,S]]` is the seam where
    policies and kernels plug in. With mass_weights [B, Q] float32, the attention mass each query puts on each
    slot is summed over heads, weighted over the queries and summed over layers, each layer's at once (a sum
    over layers of [B, Q, S] masses kept 7 GB of temporaries in a 1024-token prefill chunk at batch 5, 0.6
    GB without any mass; README, "Memory of a prefill chunk"). cache_update: "scatter" or "onehot" (see cache.py).
    tap_layer: a layer index whose RoPE'd queries and keys are returned (a policy's retrieval keys).
    hidden_after: a layer count whose hidden state is returned too (`run_layers`; the controller's input).
    recall: stored K/V of released tokens that each layer from recall.first_layer ranks and attends (see `Recall`:
    a one-token block in spare slots, or each query of a longer block its own rows, `attend_recalled`).

    Returns (hidden [B, Q, E] after the final norm, updated cache, mass [B, S] float32 or None,
    (q [B, Q, H, D], k [B, Q, G, D]) of tap_layer or None, the positions recall.first_layer recalled ([B, R], or
    [B, Q, R] for a longer block; -1: none) or None, hidden [B, Q, E] after hidden_after layers or None).
    """
    cache = kv_cache.claim_slots(cache, block.slots, block.positions, block.valid)
    write = kv_cache.WRITERS[cache_update]
    if recall is not None and (recall.slots is None) != (block.tokens.shape[1] > 1):
        raise ValueError(f"recall into spare slots serves a one-token block, recall per query a longer one; got "
                         f"{block.tokens.shape[1]} rows with slots={recall.slots is not None}")

    def attend_slots(index, q, k, v):
        k_slots = write(cache.k[index], block.slots, k)  # [B, S, G, D]
        v_slots = write(cache.v[index], block.slots, v)
        slot_positions, slot_valid, recalled = cache.slot_positions, cache.slot_valid, None
        tapped = (q, k) if index == tap_layer else None
        attend = attention
        if recall is not None and recall.slots is None:
            found = recall.rows_per_query(index, q)
            if found is not None:  # each query attends its own recalled rows beside the slots
                positions, recalled_valid, k_rows, v_rows = found
                attend = functools.partial(attend_recalled, k_rows=k_rows, v_rows=v_rows, rows_found=recalled_valid)
                recalled = jnp.where(recalled_valid, positions, -1)
        found = None if recall is None or recall.slots is None else recall.rows(index, q[:, 0])
        if found is not None:  # this layer alone attends the recalled rows, in the spare slots
            positions, recalled_valid, k_rows, v_rows = found
            r = jnp.arange(q.shape[0])[:, None]
            k_slots, v_slots = write(k_slots, recall.slots, k_rows), write(v_slots, recall.slots, v_rows)
            slot_positions = slot_positions.at[r, recall.slots].set(positions)
            slot_valid = slot_valid.at[r, recall.slots].set(recalled_valid)
            recalled = jnp.where(recalled_valid, positions, -1)
        args = (q, k_slots, v_slots, block.positions, slot_positions, slot_valid)
        if mass_weights is None:
            return attend(*args), (k_slots, v_slots, None, tapped, recalled)
        out, mass = attend(*args, return_mass=True)  # mass [B, Q, G, S]
        return out, (k_slots, v_slots, jnp.einsum("bq,bqgs->bs", mass_weights, mass), tapped, recalled)

    hidden, layer_aux, tapped_hidden = run_layers(params, config, block.tokens, block.positions, attend_slots,
                                                  hidden_after=hidden_after)
    new_k, new_v, masses, taps, recalled = zip(*layer_aux)
    cache = dataclasses.replace(cache, k=new_k, v=new_v)
    mass = None if mass_weights is None else functools.reduce(operator.add, masses)
    return (hidden, cache, mass, None if tap_layer is None else taps[tap_layer],
            None if recall is None else recalled[recall.first_layer], tapped_hidden)


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
