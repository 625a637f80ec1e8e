"""Slot attention as a Mosaic (TPU) Pallas kernel.

Grid (batch, slot block). Each step DMAs one block of slots for *all* KV heads — K and V viewed as
[B, S, G*D], a free reshape of the cache, so every block is one contiguous, lane-dense copy and no
head is broadcast to query-head count. The queries of all heads form one block-diagonal matrix
q_bd [H*Q, G*D] (query head h = g*r + j holds its vector in columns g*D:(g+1)*D, zeros elsewhere),
so q_bd @ k_blk^T gives every head's logits against its own KV head in one matmul, with no lane
slicing (head dims of 64 would be unaligned) and K pushed through the MXU once per block. The
price is G times the MXU rows, idle in decode anyway; p @ v_blk likewise gives [H*Q, G*D] whose
diagonal [D]-blocks are the outputs, taken in the wrapper.

Online softmax in f32 scratch across the slot axis. With return_mass, each step also writes its
masked logits; the wrapper turns them into probabilities with the final max and sum (no second
pass over K/V).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (
    INVISIBLE_POSITION,
    MASK_VALUE,
    block_diagonal_outputs,
    block_diagonal_queries,
    contract_last,
    mass_from_logits,
    matmul,
    round_up,
    slot_keys,
    tpu_compiler_params,
)

LANES = 128


def reset_softmax(m_sc, l_sc, acc_sc):
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def accumulate_softmax(logits, visible, v, m_sc, l_sc, acc_sc):
    """Fold one slot block into the online softmax: logits, visible [rows, block] (logits masked to MASK_VALUE),
    v [block, width], scratch m_sc, l_sc [rows, 1] (running max, sum) and acc_sc [rows, width] (output)."""
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=-1, keepdims=True))  # [rows, 1]
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.where(visible, jnp.exp(logits - m_next), 0.0)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + matmul(p.astype(v.dtype), v)
    m_sc[...] = m_next


def finish_softmax(out_ref, max_ref, sum_ref, m_sc, l_sc, acc_sc):
    """The normalised output (zeros for a row that saw no slot) and the final max and sum."""
    total = l_sc[...]
    out_ref[...] = (acc_sc[...] / jnp.where(total > 0, total, 1.0)).astype(out_ref.dtype)
    max_ref[...] = m_sc[...]
    sum_ref[...] = total


def _kernel(q_ref, row_pos_ref, col_pos_ref, k_ref, v_ref, *refs, scale, n_slots, block, return_logits):
    # q_ref [rows, G*D]; row_pos_ref [rows, 1]; col_pos_ref [1, block]; k_ref, v_ref [block, G*D].
    if return_logits:
        out_ref, max_ref, sum_ref, logits_ref, m_sc, l_sc, acc_sc = refs
    else:
        out_ref, max_ref, sum_ref, m_sc, l_sc, acc_sc = refs
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _init():
        reset_softmax(m_sc, l_sc, acc_sc)

    visible = col_pos_ref[...] <= row_pos_ref[...]  # [rows, block]
    logits = jnp.where(visible, contract_last(q_ref[...], k_ref[...]) * scale, MASK_VALUE)
    if return_logits:
        logits_ref[...] = logits
    v = v_ref[...]
    if n_slots % block:
        # The last block reads past the cache; those rows are unspecified (maybe NaN) and
        # 0 * NaN would poison the sum, so zero them.
        slot = step * block + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
        v = jnp.where(slot < n_slots, v, jnp.zeros_like(v))
    accumulate_softmax(logits, visible, v, m_sc, l_sc, acc_sc)

    @pl.when(step == pl.num_programs(1) - 1)
    def _finish():
        finish_softmax(out_ref, max_ref, sum_ref, m_sc, l_sc, acc_sc)


def slot_attention_tpu(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False,
                       block_slots=512, interpret=False):
    """Slot attention (semantics of `slot_attention_ref`) as a Mosaic kernel.

    block_slots: slots per grid step (capped at S rounded up to 128); on TPU a multiple of 128.
      S need not be a multiple of it: the last block's extra slots are masked.
    interpret: False, or pltpu.InterpretParams() / True to run on the CPU.
    """
    batch, n_q, n_heads, head_dim = q.shape
    n_slots, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    rows = n_heads * n_q
    block = min(block_slots, round_up(n_slots, LANES))
    n_blocks = pl.cdiv(n_slots, block)

    q_bd = block_diagonal_queries(q, n_kv)  # [B, rows, G*D], rows ordered (g, i, j)
    row_pos = jnp.broadcast_to(q_positions.astype(jnp.int32)[:, None, :, None], (batch, n_kv, n_q, group))
    row_pos = row_pos.reshape(batch, rows, 1)  # [B, rows, 1]
    col_pos = slot_keys(slot_positions, slot_valid)
    col_pos = jnp.pad(col_pos, ((0, 0), (0, n_blocks * block - n_slots)), constant_values=INVISIBLE_POSITION)
    col_pos = col_pos[:, None, :]  # [B, 1, S_pad]
    k_rows = k.reshape(batch, n_slots, n_kv * head_dim)  # [B, S, G*D], free
    v_rows = v.reshape(batch, n_slots, n_kv * head_dim)

    width = n_kv * head_dim
    in_specs = [
        pl.BlockSpec((None, rows, width), lambda b, s: (b, 0, 0)),
        pl.BlockSpec((None, rows, 1), lambda b, s: (b, 0, 0)),
        pl.BlockSpec((None, 1, block), lambda b, s: (b, 0, s)),
        pl.BlockSpec((None, block, width), lambda b, s: (b, s, 0)),
        pl.BlockSpec((None, block, width), lambda b, s: (b, s, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, rows, width), lambda b, s: (b, 0, 0)),
        pl.BlockSpec((None, rows, 1), lambda b, s: (b, 0, 0)),
        pl.BlockSpec((None, rows, 1), lambda b, s: (b, 0, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, rows, width), q.dtype),
        jax.ShapeDtypeStruct((batch, rows, 1), jnp.float32),
        jax.ShapeDtypeStruct((batch, rows, 1), jnp.float32),
    ]
    if return_mass:
        out_specs.append(pl.BlockSpec((None, rows, block), lambda b, s: (b, 0, s)))
        out_shape.append(jax.ShapeDtypeStruct((batch, rows, n_blocks * block), jnp.float32))
    itemsize = jnp.dtype(q.dtype).itemsize
    # Double-buffered q/out/K/V blocks, the f32 accumulator, a few [rows, block] f32 temporaries.
    vmem = (rows * width * (4 + 4 * itemsize) + 4 * block * width * itemsize
            + rows * block * 4 * (5 if return_mass else 3))
    kernel = functools.partial(_kernel, scale=head_dim ** -0.5, n_slots=n_slots, block=block,
                               return_logits=return_mass)
    results = pl.pallas_call(
        kernel,
        grid=(batch, n_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, width), jnp.float32)],
        compiler_params=tpu_compiler_params(("parallel", "arbitrary"), vmem),
        interpret=interpret,
        name="slot_attention_tpu",
    )(q_bd, row_pos, col_pos, k_rows, v_rows)
    out = block_diagonal_outputs(results[0], n_q, n_kv)
    if not return_mass:
        return out
    shape = (batch, n_kv, n_q * group)
    logits = results[3][..., :n_slots].reshape(*shape, n_slots)
    return out, mass_from_logits(logits, results[1].reshape(shape), results[2].reshape(shape), n_q)

