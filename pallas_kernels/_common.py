"""Constants and small helpers shared by the kernels and their jnp twins."""
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

# Finite "minus infinity" so that fully masked rows give zeros instead of NaNs.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Position given to invalid (and padding) slots: no query position reaches it, so
# `key <= query_position` alone encodes both validity and causality.
INVISIBLE_POSITION = int(jnp.iinfo(jnp.int32).max)

# Position given to padding query rows: it sees no slot.
BLIND_POSITION = int(jnp.iinfo(jnp.int32).min)


def slot_keys(slot_positions, slot_valid):
    """[B, S] int32 positions with invalid slots moved to INVISIBLE_POSITION."""
    return jnp.where(slot_valid, slot_positions.astype(jnp.int32), INVISIBLE_POSITION)


def dot_precision(dtype):
    """Full f32 accuracy for f32 operands (TPU would otherwise use one bf16 pass)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def contract_last(a, b):
    """a [M, D] . b [N, D] -> [M, N] in f32 (the q k^T of attention)."""
    return jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())),
        precision=dot_precision(a.dtype), preferred_element_type=jnp.float32)


def matmul(a, b):
    """a [M, K] . b [K, N] -> [M, N] in f32 (the p v of attention)."""
    return jax.lax.dot_general(
        a, b, (((1,), (0,)), ((), ())),
        precision=dot_precision(a.dtype), preferred_element_type=jnp.float32)


def tpu_compiler_params(dimension_semantics, vmem_bytes):
    """Mosaic parameters; raises the scoped VMEM limit when the estimated working set would not
    fit the smallest default (16 MiB on v4/v5e), capped at 96 MiB."""
    limit = None
    if vmem_bytes > 12 << 20:
        limit = min(int(vmem_bytes * 1.5), 96 << 20)
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics, vmem_limit_bytes=limit)


def triton_size(x):
    """Whether x can be a Triton tensor dimension that tl.dot accepts: a power of two >= 16."""
    return x >= 16 and x & (x - 1) == 0


def round_up(x, multiple):
    return -(-x // multiple) * multiple


def visible_slot_blocks(q_positions, col_keys, block_queries: int, block_slots: int):
    """[B, Q_pad / block_queries] int32: for each query block, 1 + the index of the last block of
    `block_slots` slots holding a slot that some query of the block can see (0: none).

    q_positions: [B, Q_pad] int32, padding queries at BLIND_POSITION; col_keys: [B, S] int32 slot positions
    with invalid slots at INVISIBLE_POSITION (`slot_keys`). A slot is visible to a query iff its key is
    <= the query's position, so a slot block matters iff its smallest key is <= the block's largest position.
    """
    batch, n_q = q_positions.shape
    n_slots = col_keys.shape[1]
    last_query = jnp.max(q_positions.reshape(batch, n_q // block_queries, block_queries), axis=2)  # [B, QB]
    keys = jnp.pad(col_keys, ((0, 0), (0, round_up(n_slots, block_slots) - n_slots)),
                   constant_values=INVISIBLE_POSITION)
    first_key = jnp.min(keys.reshape(batch, -1, block_slots), axis=2)  # [B, SB]
    seen = first_key[:, None, :] <= last_query[:, :, None]  # [B, QB, SB]
    return jnp.max(jnp.where(seen, jnp.arange(1, seen.shape[2] + 1, dtype=jnp.int32), 0), axis=2)


def pad_queries(q, q_positions, block_queries: int):
    """Pad the query axis to a multiple of block_queries: zero queries at BLIND_POSITION (they see nothing)."""
    extra = round_up(q.shape[1], block_queries) - q.shape[1]
    q = jnp.pad(q, ((0, 0), (0, extra), (0, 0), (0, 0)))
    q_positions = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, extra)), constant_values=BLIND_POSITION)
    return q, q_positions


def block_diagonal_queries(q, n_kv: int):
    """q [B, Q, H, D] -> [B, G*Q*r, G*D]: the queries of all heads as one block-diagonal matrix, rows ordered
    (g, i, j) for query head h = g*r + j, whose vector sits in columns g*D:(g+1)*D (zeros elsewhere). Against
    K or V viewed as [B, S, G*D] (a free reshape of the cache), one matmul gives every head's logits against
    its own KV head; the products with the other G - 1 heads are computed and dropped."""
    batch, n_q, n_heads, head_dim = q.shape
    qg = q.reshape(batch, n_q, n_kv, n_heads // n_kv, head_dim).transpose(0, 2, 1, 3, 4)  # [B, G, Q, r, D]
    q_bd = jnp.einsum("bgqrd,gh->bgqrhd", qg, jnp.eye(n_kv, dtype=q.dtype))
    return q_bd.reshape(batch, n_heads * n_q, n_kv * head_dim)


def block_diagonal_outputs(out_bd, n_q: int, n_kv: int):
    """[B, G*Q*r, G*D] (p @ v for `block_diagonal_queries` rows) -> [B, Q, H, D]: each head's diagonal block."""
    batch, rows, width = out_bd.shape
    head_dim, group = width // n_kv, rows // (n_kv * n_q)
    out = jnp.diagonal(out_bd.reshape(batch, n_kv, n_q, group, n_kv, head_dim), axis1=1, axis2=4)  # [B,Q,r,D,G]
    return out.transpose(0, 1, 4, 2, 3).reshape(batch, n_q, n_kv * group, head_dim)


def mass_from_logits(logits, row_max, row_sum, n_q):
    """Attention mass per KV head from a kernel's masked logits and final softmax statistics.

    Args:
      logits: [B, G, Q*r, S] f32, rows ordered (query, head within group), masked to MASK_VALUE.
      row_max, row_sum: [B, G, Q*r] the final running max and softmax denominator.
    Returns:
      [B, Q, G, S] f32: probabilities summed over the r query heads of each KV head.
    """
    batch, n_kv, n_rows, n_slots = logits.shape
    inv = jnp.where(row_sum > 0, 1.0 / jnp.where(row_sum > 0, row_sum, 1.0), 0.0)
    probs = jnp.exp(logits - row_max[..., None]) * inv[..., None]
    mass = probs.reshape(batch, n_kv, n_q, n_rows // n_q, n_slots).sum(axis=3)
    return mass.transpose(0, 2, 1, 3)


def visited_mass(logits, row_max, row_sum, counts, block_slots: int, block_queries: int, n_q: int):
    """`mass_from_logits` for a prefill kernel, which wrote the logits of the visited slot blocks only.

    Args:
      logits: [B, G, QB, QR, S] f32, QR = block_queries * r rows ordered (query, head within group); the
        blocks from counts[b, i] on were never written (unspecified) and count as masked.
      row_max, row_sum: [B, G, QB, QR] the final running max and softmax denominator.
      counts: [B, QB] int32 visited slot blocks (`visible_slot_blocks`).
    Returns:
      [B, n_q, G, S] f32 (the padding queries dropped).
    """
    batch, n_kv, n_blocks, rows, n_slots = logits.shape
    visited = jnp.arange(n_slots) // block_slots < counts[:, :, None]  # [B, QB, S]
    logits = jnp.where(visited[:, None, :, None, :], logits, MASK_VALUE)
    shape = (batch, n_kv, n_blocks * rows)
    mass = mass_from_logits(logits.reshape(*shape, n_slots), row_max.reshape(shape), row_sum.reshape(shape),
                            n_blocks * block_queries)
    return mass[:, :n_q]


def kth_largest(x, k: int, chunk_bytes: int = 1 << 21):
    """[..., S] -> [...] float32: the k-th largest entry of each row (k clipped to S), equal to
    `lax.top_k(x, k)[0][..., -1]`.

    A bisection over float32 bit patterns read as order-preserving int32 keys: 32 passes that each count
    the entries >= a candidate key, vectorised over a chunk of rows (about chunk_bytes, so that the passes
    stay in cache), instead of lax.top_k's row-by-row sort (docs/perf.md). Needs no NaN in x.
    """
    k, length = min(k, x.shape[-1]), x.shape[-1]
    rows = x.reshape(-1, length).astype(jnp.float32)
    chunk = max(1, min(rows.shape[0], chunk_bytes // (4 * length)))
    padded = jnp.pad(rows, ((0, -rows.shape[0] % chunk), (0, 0)))
    kth = jax.lax.map(lambda block: _kth_largest_rows(block, k), padded.reshape(-1, chunk, length))
    return kth.reshape(-1)[:rows.shape[0]].reshape(x.shape[:-1])


def _kth_largest_rows(x, k: int):
    """x [R, S] float32 -> [R]: the k-th largest entry of each row, by bisection over int32 keys."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    keys = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reversed, below the positives
    int32 = jnp.iinfo(jnp.int32)
    # Invariant: at least k keys >= lo, fewer than k keys >= hi (no float's key reaches int32 max).
    lo = jnp.full(x.shape[:1], int32.min, jnp.int32)
    hi = jnp.full(x.shape[:1], int32.max, jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        enough = jnp.sum(keys >= mid[:, None], axis=-1, dtype=jnp.int32) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(jnp.where(lo < 0, lo ^ 0x7FFFFFFF, lo), jnp.float32)
