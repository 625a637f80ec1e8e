"""Prefill attention as a Pallas GPU kernel (Triton lowering): flash attention over the visible slot blocks.

Grid (batch, KV head, query block). A program holds the block_queries * r query rows of one KV head (padded
to a power of two >= 16 for tl.dot), runs an online softmax over the first `visible_slot_blocks` blocks of
`block_slots` slots, and writes the normalised output. Loads past the end of the cache are masked, so S
needs no padding and the cache is never copied.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import BLIND_POSITION, pad_queries, slot_keys, visible_slot_blocks, visited_mass
from pallas_kernels._slot_attention_gpu import online_softmax, require_triton_sizes

BLOCK_SLOTS = 64  # slots per inner step


def default_block_queries(group: int, head_dim: int) -> int:
    """Queries per program: 128 rows of queries times query heads per KV head (64 for a head_dim above 64, to keep
    the f32 accumulator of 4 warps in registers)."""
    return max(1, (128 if head_dim <= 64 else 64) // group)


def _kernel(counts_ref, q_ref, row_pos_ref, col_pos_ref, k_ref, v_ref, out_ref, max_ref, sum_ref, *logits_ref,
            scale, n_slots, block):
    # counts_ref [QB]; q_ref [QR, D]; row_pos_ref [QR]; col_pos_ref [S]; k_ref, v_ref [S, D]; out_ref [QR, D];
    # max_ref, sum_ref [QR]; logits_ref [QR, S] (only the visited blocks are written).
    row_max, total, acc = online_softmax(q_ref, row_pos_ref, col_pos_ref, k_ref, v_ref, logits_ref, 0,
                                         counts_ref[pl.program_id(2)], scale=scale, n_slots=n_slots, block=block)
    out_ref[...] = (acc / jnp.where(total > 0, total, 1.0)[:, None]).astype(out_ref.dtype)
    max_ref[...] = row_max
    sum_ref[...] = total


def prefill_attention_gpu(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False,
                          block_queries=None, block_slots=BLOCK_SLOTS, num_warps=4, num_stages=2, interpret=False):
    """Slot attention (semantics of `slot_attention_ref`) for a long query block, as a Triton kernel.

    block_queries: queries per program; default: `default_block_queries`.
    block_slots: slots per inner step. head_dim and block_slots must be powers of two >= 16.
    """
    batch, n_q, n_heads, head_dim = q.shape
    n_slots, n_kv = k.shape[1], k.shape[2]
    require_triton_sizes(head_dim, block_slots)
    group = n_heads // n_kv
    block_queries = block_queries or default_block_queries(group, head_dim)
    rows = block_queries * group
    rows_pad = max(16, pl.next_power_of_2(rows))
    q, q_positions = pad_queries(q, q_positions, block_queries)
    n_blocks = q.shape[1] // block_queries
    col_pos = slot_keys(slot_positions, slot_valid)  # [B, S]
    counts = visible_slot_blocks(q_positions, col_pos, block_queries, block_slots)  # [B, QB]

    qg = q.reshape(batch, n_blocks, block_queries, n_kv, group, head_dim).transpose(0, 3, 1, 2, 4, 5)
    qg = jnp.pad(qg.reshape(batch, n_kv, n_blocks, rows, head_dim),
                 ((0, 0), (0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))  # [B, G, QB, QR, D], rows (i, j)
    row_pos = jnp.repeat(q_positions, group, axis=1).reshape(batch, n_blocks, rows)
    row_pos = jnp.pad(row_pos, ((0, 0), (0, 0), (0, rows_pad - rows)), constant_values=BLIND_POSITION)

    stats = pl.BlockSpec((None, None, None, rows_pad), lambda b, g, i: (b, g, i, 0))
    out_specs = [pl.BlockSpec((None, None, None, rows_pad, head_dim), lambda b, g, i: (b, g, i, 0, 0)), stats, stats]
    out_shape = [jax.ShapeDtypeStruct((batch, n_kv, n_blocks, rows_pad, head_dim), q.dtype)]
    out_shape += 2 * [jax.ShapeDtypeStruct((batch, n_kv, n_blocks, rows_pad), jnp.float32)]
    if return_mass:
        out_specs.append(pl.BlockSpec((None, None, None, rows_pad, n_slots), lambda b, g, i: (b, g, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, n_kv, n_blocks, rows_pad, n_slots), jnp.float32))
    kernel = functools.partial(_kernel, scale=head_dim ** -0.5, n_slots=n_slots, block=block_slots)
    results = pl.pallas_call(
        kernel,
        grid=(batch, n_kv, n_blocks),
        in_specs=[
            pl.BlockSpec((None, n_blocks), lambda b, g, i: (b, 0)),
            pl.BlockSpec((None, None, None, rows_pad, head_dim), lambda b, g, i: (b, g, i, 0, 0)),
            pl.BlockSpec((None, None, rows_pad), lambda b, g, i: (b, i, 0)),
            pl.BlockSpec((None, n_slots), lambda b, g, i: (b, 0)),
            pl.BlockSpec((None, n_slots, None, head_dim), lambda b, g, i: (b, 0, g, 0)),
            pl.BlockSpec((None, n_slots, None, head_dim), lambda b, g, i: (b, 0, g, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prefill_attention_gpu",
    )(counts, qg, row_pos, col_pos, k, v)
    out = results[0][:, :, :, :rows].reshape(batch, n_kv, n_blocks * block_queries, group, head_dim)
    out = out.transpose(0, 2, 1, 3, 4).reshape(batch, -1, n_heads, head_dim)[:, :n_q]
    if not return_mass:
        return out
    row_max, row_sum, logits = (x[:, :, :, :rows] for x in results[1:])
    return out, visited_mass(logits, row_max, row_sum, counts, block_slots, block_queries, n_q)
