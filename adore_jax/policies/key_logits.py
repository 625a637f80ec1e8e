"""Attention logits of stored keys, max over the query heads: how the return paths rank released tokens.

Keys are RoPE'd at their positions; head h reads KV head h // (H // G)."""
import jax.numpy as jnp

from pallas_kernels._common import block_diagonal_queries


def max_head_logits(query, keys):
    """query [B, H, D] against keys [B, N, G, D] -> [B, N]: the largest attention logit q . k / sqrt(D) over the
    query heads (head h reads KV head h // (H // G)).

    One matmul of the keys in their stored layout against the block-diagonal queries (a grouped einsum would
    transpose the [B, N, G, D] keys first; docs/perf.md)."""
    batch, n, groups, dim = keys.shape
    q_bd = block_diagonal_queries(query[:, None].astype(jnp.float32), groups)  # [B, H, G*D]
    logits = jnp.matmul(keys.reshape(batch, n, groups * dim).astype(jnp.float32), q_bd.swapaxes(1, 2))  # [B, N, H]
    return jnp.max(logits, axis=-1) * dim ** -0.5


def max_head_logits_by_group(query, keys):
    """`max_head_logits` for keys laid out KV-head-major, [B, G, N, D] -> [B, N]: one batched matmul per (batch, KV
    head) against that head's r = H / G queries, without the block-diagonal's G-fold work (docs/perf.md)."""
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
