"""Prefill attention as a Mosaic (TPU) Pallas kernel: flash attention over the visible slot blocks.

Grid (batch, KV head, query block, slot block); the per-query-block bound (`visible_slot_blocks`) is
scalar-prefetched. A slot block past the bound is neither computed (`pl.when`) nor DMAed: its index map
repeats the last visible block, which Pallas does not fetch again. A program holds the block_queries * r
query rows of one KV head, so each K/V block is loaded once per KV head and q k^T is a plain [rows, D] x
[D, block] matmul (no block-diagonal queries: in a prefill chunk the MXU, not the cache read, is the limit).
K and V are read as [B, G, S_pad, D], one transposed, zero-padded copy of the cache per call; a chunk of
many queries amortises it.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (
    INVISIBLE_POSITION,
    MASK_VALUE,
    contract_last,
    pad_queries,
    round_up,
    slot_keys,
    tpu_compiler_params,
    visible_slot_blocks,
    visited_mass,
)
from pallas_kernels._slot_attention_tpu import accumulate_softmax, finish_softmax, reset_softmax

BLOCK_QUERIES, BLOCK_SLOTS = 128, 512  # queries per program, slots per grid step


def _kernel(counts_ref, q_ref, row_pos_ref, col_pos_ref, k_ref, v_ref, out_ref, max_ref, sum_ref, *refs, scale):
    # counts_ref [B * QB] (SMEM); q_ref [rows, D]; row_pos_ref [rows, 1]; col_pos_ref [1, block];
    # k_ref, v_ref [block, D]; out_ref [rows, D]; max_ref, sum_ref [rows, 1]; with the mass, logits_ref
    # [rows, block] (written at the visited blocks only), then the scratch m_sc, l_sc [rows, 1], acc_sc [rows, D].
    *logits_ref, m_sc, l_sc, acc_sc = refs
    step = pl.program_id(3)
    count = counts_ref[pl.program_id(0) * pl.num_programs(2) + pl.program_id(2)]

    @pl.when(step == 0)
    def _init():
        reset_softmax(m_sc, l_sc, acc_sc)

    @pl.when(step < count)
    def _attend():
        visible = col_pos_ref[...] <= row_pos_ref[...]  # [rows, block]
        logits = jnp.where(visible, contract_last(q_ref[...], k_ref[...]) * scale, MASK_VALUE)
        if logits_ref:
            logits_ref[0][...] = logits
        accumulate_softmax(logits, visible, v_ref[...], m_sc, l_sc, acc_sc)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        finish_softmax(out_ref, max_ref, sum_ref, m_sc, l_sc, acc_sc)


def prefill_attention_tpu(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False,
                          block_queries=BLOCK_QUERIES, block_slots=BLOCK_SLOTS, interpret=False):
    """Slot attention (semantics of `slot_attention_ref`) for a long query block, as a Mosaic kernel.

    block_queries: queries per program; block_queries * r must be a multiple of 8 (sublanes).
    block_slots: slots per grid step (capped at S rounded up to 128); on TPU a multiple of 128.
    interpret: False, or pltpu.InterpretParams() / True to run on the CPU.
    """
    batch, n_q, n_heads, head_dim = q.shape
    n_slots, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    rows = block_queries * group
    if rows % 8:
        raise ValueError(f"block_queries ({block_queries}) times the query heads per KV head ({group}) must be a "
                         "multiple of 8")
    block = min(block_slots, round_up(n_slots, 128))
    n_slot_blocks = pl.cdiv(n_slots, block)
    q, q_positions = pad_queries(q, q_positions, block_queries)
    n_blocks = q.shape[1] // block_queries
    col_pos = slot_keys(slot_positions, slot_valid)  # [B, S]
    counts = visible_slot_blocks(q_positions, col_pos, block_queries, block).reshape(-1)  # [B * QB]

    qg = q.reshape(batch, n_blocks * block_queries, n_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
    qg = qg.reshape(batch, n_kv, n_blocks * rows, head_dim)  # [B, G, Q_pad * r, D], rows (i, j)
    row_pos = jnp.repeat(q_positions, group, axis=1)[..., None]  # [B, Q_pad * r, 1]
    pad = n_slot_blocks * block - n_slots
    col_pos = jnp.pad(col_pos, ((0, 0), (0, pad)), constant_values=INVISIBLE_POSITION)[:, None, :]  # [B, 1, S_pad]
    k_heads, v_heads = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))

    def slot_block(b, i, s, counts):  # a block past the bound repeats the last visible one: no new DMA
        return jnp.maximum(jnp.minimum(s, counts[b * n_blocks + i] - 1), 0)

    kv_spec = pl.BlockSpec((None, None, block, head_dim),
                           lambda b, g, i, s, counts: (b, g, slot_block(b, i, s, counts), 0))
    stats = pl.BlockSpec((None, None, rows, 1), lambda b, g, i, s, counts: (b, g, i, 0))
    out_specs = [pl.BlockSpec((None, None, rows, head_dim), lambda b, g, i, s, counts: (b, g, i, 0)), stats, stats]
    out_shape = [jax.ShapeDtypeStruct((batch, n_kv, n_blocks * rows, head_dim), q.dtype)]
    out_shape += 2 * [jax.ShapeDtypeStruct((batch, n_kv, n_blocks * rows, 1), jnp.float32)]
    if return_mass:  # a skipped step maps to the last visible block, whose logits its buffer still holds
        out_specs.append(pl.BlockSpec((None, None, rows, block),
                                      lambda b, g, i, s, counts: (b, g, i, slot_block(b, i, s, counts))))
        out_shape.append(jax.ShapeDtypeStruct((batch, n_kv, n_blocks * rows, n_slot_blocks * block), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, n_kv, n_blocks, n_slot_blocks),
        in_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda b, g, i, s, counts: (b, g, i, 0)),
            pl.BlockSpec((None, rows, 1), lambda b, g, i, s, counts: (b, i, 0)),
            pl.BlockSpec((None, 1, block), lambda b, g, i, s, counts: (b, 0, slot_block(b, i, s, counts))),
            kv_spec,
            kv_spec,
        ],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, head_dim), jnp.float32)],
    )
    itemsize = jnp.dtype(q.dtype).itemsize
    # Double-buffered q/out/K/V blocks, the f32 accumulator, a few [rows, block] f32 temporaries.
    vmem = (rows * head_dim * (4 + 4 * itemsize) + 4 * block * head_dim * itemsize
            + rows * block * 4 * (5 if return_mass else 3))
    results = pl.pallas_call(
        functools.partial(_kernel, scale=head_dim ** -0.5),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary"), vmem),
        interpret=interpret,
        name="prefill_attention_tpu",
    )(counts, qg, row_pos, col_pos, k_heads, v_heads)
    out = results[0].reshape(batch, n_kv, n_blocks * block_queries, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(batch, -1, n_heads, head_dim)[:, :n_q]
    if not return_mass:
        return out
    row_max, row_sum = (x.reshape(batch, n_kv, n_blocks, rows) for x in results[1:3])
    logits = results[3].reshape(batch, n_kv, n_blocks, rows, -1)[..., :n_slots]
    return out, visited_mass(logits, row_max, row_sum, counts.reshape(batch, n_blocks), block, block_queries, n_q)
