"""Slot attention as a Pallas GPU kernel (Triton lowering), flash-decoding style.

Grid (batch, KV head, split). A decode step has few query rows, so one program per (batch, KV
head) would leave most SMs idle; the slots are therefore split into `n_split` contiguous ranges,
each program runs an online softmax over its range in blocks of `block_slots`, and a small jnp
combine step merges the partial (max, sum, unnormalised output) triples. A program holds the
Q*r query rows of one KV head (padded to a power of two >= 16 for tl.dot), so each K/V block is
loaded once per KV head and never broadcast to query heads. Loads past the end of the cache are
masked, so S needs no padding and the cache is never copied.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import (
    BLIND_POSITION,
    INVISIBLE_POSITION,
    MASK_VALUE,
    contract_last,
    mass_from_logits,
    matmul,
    slot_keys,
    triton_size,
)


def require_triton_sizes(head_dim, block_slots):
    if not (triton_size(head_dim) and triton_size(block_slots)):
        raise ValueError(f"the Triton kernel needs head_dim ({head_dim}) and block_slots ({block_slots}) "
                         "to be powers of two >= 16")


def online_softmax(q_ref, row_pos_ref, col_pos_ref, k_ref, v_ref, logits_ref, first_block, n_blocks, *,
                   scale, n_slots, block):
    """The online softmax of one program's query rows over slot blocks first_block .. first_block + n_blocks - 1.

    q_ref [QR, D]; row_pos_ref [QR]; col_pos_ref [S]; k_ref, v_ref [S, D]; logits_ref: () or ([QR, S],), where
    each visited block's masked logits are stored. Loads past n_slots are masked. Returns the running max and
    sum [QR] and the unnormalised output [QR, D] f32.
    """
    n_rows, head_dim = q_ref.shape
    q = q_ref[...]
    row_pos = row_pos_ref[...][:, None]  # [QR, 1]

    def body(t, carry):
        m_prev, l_prev, acc = carry
        start = (first_block + t) * block
        in_range = start + jnp.arange(block) < n_slots  # [block]
        window = pl.ds(start, block)
        col_pos = pltriton.load(col_pos_ref.at[window], mask=in_range, other=INVISIBLE_POSITION)
        k = pltriton.load(k_ref.at[window, :], mask=in_range[:, None], other=0)
        visible = col_pos[None, :] <= row_pos  # [QR, block]
        logits = jnp.where(visible, contract_last(q, k) * scale, MASK_VALUE)
        if logits_ref:
            pltriton.store(logits_ref[0].at[:, window], logits, mask=in_range[None, :])
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(visible, jnp.exp(logits - m_next[:, None]), 0.0)
        v = pltriton.load(v_ref.at[window, :], mask=in_range[:, None], other=0)
        acc = alpha[:, None] * acc + matmul(p.astype(v.dtype), v)
        return m_next, alpha * l_prev + jnp.sum(p, axis=1), acc

    init = (jnp.full((n_rows,), MASK_VALUE, jnp.float32), jnp.zeros((n_rows,), jnp.float32),
            jnp.zeros((n_rows, head_dim), jnp.float32))
    return jax.lax.fori_loop(0, n_blocks, body, init)


def _kernel(q_ref, row_pos_ref, col_pos_ref, k_ref, v_ref, out_ref, max_ref, sum_ref, *logits_ref,
            scale, n_slots, block, blocks_per_split):
    # q_ref [QR, D]; row_pos_ref [QR]; col_pos_ref [S]; k_ref, v_ref [S, D];
    # out_ref [QR, D] f32 unnormalised; max_ref, sum_ref [QR]; logits_ref [QR, S].
    first = pl.program_id(2) * blocks_per_split
    n_blocks = jnp.clip(pl.cdiv(n_slots, block) - first, 0, blocks_per_split)
    m, l, acc = online_softmax(q_ref, row_pos_ref, col_pos_ref, k_ref, v_ref, logits_ref, first, n_blocks,
                               scale=scale, n_slots=n_slots, block=block)
    out_ref[...] = acc
    max_ref[...] = m
    sum_ref[...] = l


def slot_attention_gpu(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False,
                       block_slots=64, n_split=None, min_programs=264, num_warps=4, num_stages=2,
                       interpret=False):
    """Slot attention (semantics of `slot_attention_ref`) as a Triton kernel with split-K.

    block_slots: slots per inner step.
    n_split: slot ranges per (batch, KV head); default: enough for `min_programs` programs
      (about two per SM on an H100/H200), at most one range per block.
    head_dim and block_slots must be powers of two >= 16 (Triton tensor shapes, tl.dot).
    """
    batch, n_q, n_heads, head_dim = q.shape
    n_slots, n_kv = k.shape[1], k.shape[2]
    require_triton_sizes(head_dim, block_slots)
    group = n_heads // n_kv
    n_rows = n_q * group
    rows_pad = max(16, pl.next_power_of_2(n_rows))  # tl.dot needs >= 16 rows
    total_blocks = pl.cdiv(n_slots, block_slots)
    if n_split is None:
        n_split = pl.cdiv(min_programs, batch * n_kv)
    n_split = max(1, min(n_split, total_blocks))
    blocks_per_split = pl.cdiv(total_blocks, n_split)
    n_split = pl.cdiv(total_blocks, blocks_per_split)

    qg = q.reshape(batch, n_q, n_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
    qg = qg.reshape(batch, n_kv, n_rows, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows_pad - n_rows), (0, 0)))  # [B, G, QR, D], rows (i, j)
    row_pos = jnp.repeat(q_positions.astype(jnp.int32), group, axis=1)
    row_pos = jnp.pad(row_pos, ((0, 0), (0, rows_pad - n_rows)), constant_values=BLIND_POSITION)  # [B, QR]
    col_pos = slot_keys(slot_positions, slot_valid)  # [B, S]

    in_specs = [
        pl.BlockSpec((None, None, rows_pad, head_dim), lambda b, g, s: (b, g, 0, 0)),
        pl.BlockSpec((None, rows_pad), lambda b, g, s: (b, 0)),
        pl.BlockSpec((None, n_slots), lambda b, g, s: (b, 0)),
        pl.BlockSpec((None, n_slots, None, head_dim), lambda b, g, s: (b, 0, g, 0)),
        pl.BlockSpec((None, n_slots, None, head_dim), lambda b, g, s: (b, 0, g, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, rows_pad, head_dim), lambda b, g, s: (b, g, s, 0, 0)),
        pl.BlockSpec((None, None, None, rows_pad), lambda b, g, s: (b, g, s, 0)),
        pl.BlockSpec((None, None, None, rows_pad), lambda b, g, s: (b, g, s, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, n_kv, n_split, rows_pad, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, n_kv, n_split, rows_pad), jnp.float32),
        jax.ShapeDtypeStruct((batch, n_kv, n_split, rows_pad), jnp.float32),
    ]
    if return_mass:
        out_specs.append(pl.BlockSpec((None, None, rows_pad, n_slots), lambda b, g, s: (b, g, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, n_kv, rows_pad, n_slots), jnp.float32))
    kernel = functools.partial(_kernel, scale=head_dim ** -0.5, n_slots=n_slots, block=block_slots,
                               blocks_per_split=blocks_per_split)
    results = pl.pallas_call(
        kernel,
        grid=(batch, n_kv, n_split),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="slot_attention_gpu",
    )(qg, row_pos, col_pos, k, v)
    part_out, part_max, part_sum = results[:3]
    row_max = jnp.max(part_max, axis=2)  # [B, G, QR]
    weight = jnp.exp(part_max - row_max[:, :, None])  # [B, G, n_split, QR]
    row_sum = jnp.sum(weight * part_sum, axis=2)
    acc = jnp.sum(weight[..., None] * part_out, axis=2)  # [B, G, QR, D]
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
    out = out[:, :, :n_rows].reshape(batch, n_kv, n_q, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(batch, n_q, n_heads, head_dim).astype(q.dtype)
    if not return_mass:
        return out
    mass = mass_from_logits(results[3][:, :, :n_rows], row_max[..., :n_rows], row_sum[..., :n_rows], n_q)
    return out, mass
