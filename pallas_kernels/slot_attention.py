"""Attention of a block of queries over the slots of a KV cache.

The cache holds S slots per sequence; each slot has an absolute position and a validity flag.
The query block (Q rows: the current token, plus rebuilt tokens under ADORE, or a prefill chunk)
has already been written into the cache, so "the slots" include the block's own keys.

Query (b, i) attends slot (b, s) iff ``slot_valid[b, s]`` and
``slot_positions[b, s] <= q_positions[b, i]``. Slots may hold positions in any order; the mask
comes from the positions alone. GQA: query head h reads KV head h // (H // G); K/V are never
broadcast to query-head count in memory.

`slot_attention_ref` is the plain-jnp twin (`reference.masked_attention` under `slot_visibility`):
the reference in tests and the CPU path;
`slot_attention_grouped` is the same as two plain batched matmuls over the cache in its stored layout (the
CPU path for decode steps);
`slot_attention_blocked` is the same in jnp, visiting only the slot blocks up to the last valid slot
(the CPU path for large caches: a full-attention cache that is a quarter filled costs a quarter);
`slot_attention_tpu` (Mosaic) and `slot_attention_gpu` (Triton, split-K) are the kernels; a block of at least
PREFILL_MIN_QUERIES queries (a prefill chunk) takes the prefill kernels instead (`prefill_attention`: query
blocks in parallel, each visiting only the slot blocks it can see).
"""
import jax
import jax.numpy as jnp

from pallas_kernels._common import MASK_VALUE, block_diagonal_outputs, block_diagonal_queries, dot_precision
from pallas_kernels._dispatch import IMPLS, resolve_impl
from pallas_kernels._slot_attention_gpu import slot_attention_gpu
from pallas_kernels._slot_attention_tpu import slot_attention_tpu
from pallas_kernels.prefill_attention import prefill_attention_gpu, prefill_attention_tpu
from pallas_kernels.reference import masked_attention, masked_softmax


def slot_visibility(q_positions, slot_positions, slot_valid):
    """[B, Q, S] bool: query i sees slot s iff the slot is valid and not in the query's future."""
    return slot_valid[:, None, :] & (slot_positions[:, None, :] <= q_positions[:, :, None])


def slot_attention_ref(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False):
    """Reference slot attention: `masked_attention` under `slot_visibility`.

    Args:
      q: [B, Q, H, D] queries (RoPE already applied).
      k, v: [B, S, G, D] cache keys / values (RoPE already applied to k).
      q_positions: [B, Q] int32 absolute positions of the queries.
      slot_positions: [B, S] int32 absolute positions of the slots.
      slot_valid: [B, S] bool.
      return_mass: also return the attention probabilities summed over the query heads of each
        KV head.

    Returns:
      out: [B, Q, H, D] in q.dtype; and, if return_mass, mass: [B, Q, G, S] float32.
      A query that sees no valid slot gets zeros (and zero mass).
    """
    out, probs = masked_attention(q, k, v, slot_visibility(q_positions, slot_positions, slot_valid))
    if not return_mass:
        return out
    batch, n_heads, n_q, n_slots = probs.shape
    n_kv = k.shape[2]
    mass = probs.reshape(batch, n_kv, n_heads // n_kv, n_q, n_slots).sum(axis=2)  # [B, G, Q, S]
    return out, mass.transpose(0, 2, 1, 3)


GROUPED_MAX_QUERIES = 16  # query rows per sequence up to which the CPU path is `slot_attention_grouped`


GROUPED_GROUP_BYTES = 2 << 20  # K bytes per group of sequences in `slot_attention_grouped` (about a core's L2)


def grouped_rows(batch: int, num_slots: int, width: int, itemsize: int) -> int:
    """Sequences per group in `slot_attention_grouped`: the largest divisor of `batch` whose K [n, S, G*D]
    fits in GROUPED_GROUP_BYTES; the whole batch when it fits, or when that divisor is 1 (one sequence per
    group is slower than the whole batch: XLA:CPU copies the cache around a matmul without a batch dim)."""
    fits = GROUPED_GROUP_BYTES // (num_slots * width * itemsize)
    if fits >= batch:
        return batch
    return max((n for n in range(2, fits + 1) if batch % n == 0), default=batch)


def slot_attention_grouped(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False):
    """`slot_attention_ref` for a few queries (decode steps), as two batched matmuls over the cache in its stored
    layout: K and V viewed as [B, S, G*D], a free reshape.

    The queries of all heads form one block-diagonal matrix [B, G*Q*r, G*D] (query head h = g*r + j holds its
    vector in columns g*D:(g+1)*D, zeros elsewhere; the TPU kernel's q_bd), so q_bd @ k^T gives every head's
    logits against its own KV head and p @ v every head's output in the diagonal [D]-blocks. This computes
    G times the products it keeps, which costs nothing beside reading the cache when there are few queries;
    the twin's grouped einsum instead has batch dims (b, g) that are not major in [B, S, G, D], and XLA:CPU
    transposes K and V for it at every step (README, decode against torch).
    Sequences go through in groups of `grouped_rows` (a `lax.map`): XLA:CPU's batched matmul of many small
    per-sequence products is several times slower than bandwidth once the batch's K no longer fits in cache.
    """
    batch, num_slots, n_kv, head_dim = k.shape
    rows = grouped_rows(batch, num_slots, n_kv * head_dim, k.dtype.itemsize)
    args = (q, k, v, q_positions, slot_positions, slot_valid)
    if rows == batch:
        return _grouped(*args, return_mass=return_mass)
    split = jax.tree_util.tree_map(lambda x: x.reshape(batch // rows, rows, *x.shape[1:]), args)
    out = jax.lax.map(lambda group: _grouped(*group, return_mass=return_mass), split)
    return jax.tree_util.tree_map(lambda x: x.reshape(batch, *x.shape[2:]), out)


def _grouped(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass):
    """`slot_attention_grouped` of one group of sequences."""
    batch, n_q, n_heads, head_dim = q.shape
    num_slots, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    precision = dot_precision(q.dtype)
    q_bd = block_diagonal_queries(q, n_kv)  # [B, G*Q*r, G*D], rows ordered (g, i, j)
    k_rows = k.reshape(batch, num_slots, n_kv * head_dim)  # [B, S, G*D]
    v_rows = v.reshape(batch, num_slots, n_kv * head_dim)
    logits = jnp.einsum("brc,bsc->brs", q_bd, k_rows, precision=precision,
                        preferred_element_type=jnp.float32) * head_dim ** -0.5  # [B, G*Q*r, S]
    visible = slot_visibility(q_positions, slot_positions, slot_valid)  # [B, Q, S]
    keep = jnp.broadcast_to(visible[:, None, :, None], (batch, n_kv, n_q, group, num_slots))
    probs, _ = masked_softmax(logits, keep.reshape(logits.shape))
    out_bd = jnp.einsum("brs,bsc->brc", probs.astype(v.dtype), v_rows, precision=precision,
                        preferred_element_type=jnp.float32)  # [B, G*Q*r, G*D]
    out = block_diagonal_outputs(out_bd, n_q, n_kv).astype(q.dtype)
    if not return_mass:
        return out
    mass = probs.reshape(batch, n_kv, n_q, group, num_slots).sum(axis=3)  # [B, G, Q, S]
    return out, mass.transpose(0, 2, 1, 3)


PREFILL_MIN_QUERIES = 64  # query rows per sequence from which the TPU/GPU path is the prefill kernel

SLOT_BLOCK = 512  # slots per step of `slot_attention_blocked`


def live_slots(slot_valid):
    """1 + the index of the last valid slot in any row (0 when none is): [B, S] bool -> int32 []."""
    return jnp.max(jnp.where(slot_valid, jnp.arange(1, slot_valid.shape[1] + 1, dtype=jnp.int32), 0))


def slot_attention_blocked(q, k, v, q_positions, slot_positions, slot_valid, *, block: int = SLOT_BLOCK):
    """`slot_attention_ref`'s output (no mass) by online softmax over blocks of `block` slots.

    The loop stops after the block holding the last valid slot of any row (a traced trip count),
    so the unfilled tail of a full-attention cache, and the not yet written part during a chunked
    prefill, cost nothing. The last block is clamped to end at slot S; slots it shares with the
    previous block are masked, so each slot counts once. Forward only (not reverse-differentiable).
    Each block is two canonical batched matmuls, [B, G, r*Q, D] queries against the block's keys and
    values moved to [B, G, blk, D] (a small copy), and the mask is an additive bias (faster on XLA:CPU than
    grouped einsums over the cache's [B, S, G, D] layout with a multiplied mask; docs/perf.md). A masked
    logit's weight is exp(MASK_VALUE - max): 0 once the row has seen a slot, and wiped by the rescale
    when it first does; a row that sees no slot at all gets zeros at the end.
    """
    batch, n_q, n_heads, head_dim = q.shape
    num_slots, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    block = min(block, num_slots)
    rows = group * n_q
    qg = (q * head_dim ** -0.5).reshape(batch, n_q, n_kv, group, head_dim)
    qg = qg.transpose(0, 2, 3, 1, 4).reshape(batch, n_kv, rows, head_dim)  # [B, G, r*Q, D], rows ordered (j, i)
    precision = dot_precision(q.dtype)

    def step(i, carry):
        row_max, denom, acc = carry  # [B, G, r*Q], [B, G, r*Q], [B, G, r*Q, D] f32
        start = jnp.minimum(i * block, num_slots - block)
        k_b, v_b, pos_b, valid_b = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
                                    for x in (k, v, slot_positions, slot_valid))
        fresh = start + jnp.arange(block) >= i * block  # [blk] not seen by an earlier block
        visible = slot_visibility(q_positions, pos_b, valid_b & fresh)  # [B, Q, blk]
        bias = jnp.where(visible, 0.0, MASK_VALUE)[:, None, None]  # [B, 1, 1, Q, blk]
        logits = jnp.einsum("bgmd,bgsd->bgms", qg, k_b.transpose(0, 2, 1, 3), precision=precision,
                            preferred_element_type=jnp.float32)
        logits = (logits.reshape(batch, n_kv, group, n_q, block) + bias).reshape(batch, n_kv, rows, block)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
        weights = jnp.exp(logits - new_max[..., None])
        rescale = jnp.exp(row_max - new_max)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bgms,bgsd->bgmd", weights.astype(v.dtype), v_b.transpose(0, 2, 1, 3), precision=precision,
            preferred_element_type=jnp.float32)
        return new_max, denom * rescale + jnp.sum(weights, axis=-1), acc

    stats = (batch, n_kv, rows)
    init = (jnp.full(stats, MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(stats + (head_dim,), jnp.float32))
    n_blocks = (live_slots(slot_valid) + block - 1) // block
    row_max, denom, acc = jax.lax.fori_loop(0, n_blocks, step, init)
    seen = row_max > MASK_VALUE / 2  # the row saw a visible slot
    out = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)  # [B, G, r*Q, D]
    out = out.reshape(batch, n_kv, group, n_q, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, n_q, n_heads, head_dim).astype(q.dtype)


def slot_attention(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False, impl="auto"):
    """Slot attention (semantics and shapes of `slot_attention_ref`) by the chosen implementation.

    impl: "auto" (on a TPU/GPU backend the Pallas prefill kernel for a block of at least PREFILL_MIN_QUERIES
      queries per sequence, else the slot kernel, one program per KV head holding every query row, the slots
      split across programs (a decode step, R <= 32 rebuilt rows among it); elsewhere `slot_attention_grouped`
      for a block of at most GROUPED_MAX_QUERIES queries per sequence at batch >= 2 (decode steps),
      `slot_attention_blocked` for a block of several queries over at least SLOT_BLOCK slots without mass (the
      chunks of a long full-attention prefill), else the jnp twin), "ref", "grouped", "blocked" (no mass),
      "pallas" (TPU/GPU backend only) or "pallas_interpret" (the kernel in interpret mode).
    On XLA:CPU the blocked path is slower than the twin for one query per sequence at batch 1, so decoding steps
    do not take it; the grouped path is faster than the twin at batch >= 2 but not at batch 1, which keeps the
    twin (the measurements: docs/perf.md).
    """
    kind, interpret = resolve_impl(impl, q.shape[-1], allowed=IMPLS + ("blocked", "grouped"))
    args = (q, k, v, q_positions, slot_positions, slot_valid)
    if kind in ("tpu", "gpu") and q.shape[1] >= PREFILL_MIN_QUERIES:
        prefill = prefill_attention_tpu if kind == "tpu" else prefill_attention_gpu
        return prefill(*args, return_mass=return_mass, interpret=interpret)
    if kind == "tpu":
        return slot_attention_tpu(*args, return_mass=return_mass, interpret=interpret)
    if kind == "gpu":
        return slot_attention_gpu(*args, return_mass=return_mass, interpret=interpret)
    if kind == "blocked" and return_mass:
        raise ValueError("impl='blocked' has no return_mass (the mass needs every slot's probability); "
                         "use impl='ref' or 'auto'")
    few_queries = impl == "auto" and q.shape[0] > 1 and q.shape[1] <= GROUPED_MAX_QUERIES
    if kind == "grouped" or few_queries:
        return slot_attention_grouped(*args, return_mass=return_mass)
    long_prefill = impl == "auto" and q.shape[1] > 1 and k.shape[1] >= SLOT_BLOCK and not return_mass
    if kind == "blocked" or long_prefill:
        return slot_attention_blocked(*args)
    return slot_attention_ref(*args, return_mass=return_mass)


__all__ = ["slot_attention", "slot_attention_ref", "slot_attention_grouped", "slot_attention_blocked",
           "slot_attention_tpu", "slot_attention_gpu", "slot_visibility", "MASK_VALUE"]
