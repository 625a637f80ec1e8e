"""Pass 2 of top-K attention: flash attention under a per-row logit threshold, as Pallas.

Query row (i, h) attends key j iff j <= i and its logit >= keep_threshold[i, h] (pass 1 computed
the thresholds). One kernel body serves both lowerings:
- TPU (Mosaic): a program holds the query block of all r query heads of one KV head
  (rows = block_q * r), so K/V are DMAed once per KV head; the whole [N, D] K/V of that head sit
  in VMEM and the kernel walks them in key blocks.
- GPU (Triton): a program holds one query head (rows = block_q, a power of two); the r programs
  of a KV head re-read its K/V through L2.
Key blocks past the query block's causal edge are never visited. Outputs the attention output
and the per-row log-sum-exp that the backward pass reuses.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import MASK_VALUE, contract_last, matmul, round_up, tpu_compiler_params, triton_size

BLOCKS = {"tpu": (128, 128), "gpu": (64, 64)}  # (block_q, block_k) per platform


def _kernel(q_ref, row_ref, thr_ref, k_ref, v_ref, out_ref, lse_ref, *, scale, block_q, block_k):
    # q_ref [rows, D]; row_ref [rows, 1] int32 query index; thr_ref [rows, 1] f32 keep-threshold;
    # k_ref, v_ref [N_pad, D]; out_ref [rows, D]; lse_ref [rows, 1].
    n_rows, head_dim = q_ref.shape
    # Key blocks up to the query block's last row (lax.div: jnp's // lowers via sign, which the
    # TPU lowering cannot do without a TPU attached).
    n_key_blocks = jax.lax.div((pl.program_id(2) + 1) * block_q + block_k - 1, block_k)
    q = q_ref[...]
    row = row_ref[...]
    threshold = thr_ref[...]

    def body(kb, carry):
        m_prev, l_prev, acc = carry
        start = pl.multiple_of(kb * block_k, block_k)
        window = pl.ds(start, block_k)
        logits = contract_last(q, k_ref[window, :]) * scale  # [rows, block_k]
        col = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        keep = (col <= row) & (logits >= threshold)
        m_next = jnp.maximum(m_prev, jnp.max(jnp.where(keep, logits, MASK_VALUE), axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(keep, jnp.exp(logits - m_next), 0.0)
        v = v_ref[window, :]
        acc = alpha * acc + matmul(p.astype(v.dtype), v)
        return m_next, alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), acc

    init = (jnp.full((n_rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((n_rows, 1), jnp.float32),
            jnp.zeros((n_rows, head_dim), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_key_blocks, body, init)
    out_ref[...] = (acc / l).astype(out_ref.dtype)  # every row keeps at least its own key: l > 0
    lse_ref[...] = m + jnp.log(l)


def _to_rows(x, n_programs):
    """[B, N, H, X] -> [B, P, N * (H // P), X], rows ordered (query, head within program)."""
    batch, n, n_heads, width = x.shape
    per_program = n_heads // n_programs
    x = x.reshape(batch, n, n_programs, per_program, width).transpose(0, 2, 1, 3, 4)
    return x.reshape(batch, n_programs, n * per_program, width)


def _from_rows(x, n):
    """Inverse of `_to_rows`: [B, P, N * hp, X] -> [B, N, P * hp, X]."""
    batch, n_programs, n_rows, width = x.shape
    x = x.reshape(batch, n_programs, n, n_rows // n, width).transpose(0, 2, 1, 3, 4)
    return x.reshape(batch, n, n_rows // n * n_programs, width)


def threshold_flash_attention(q, k, v, keep_threshold, *, platform, block_q=None, block_k=None,
                              interpret=False):
    """Causal attention keeping, per query row, only logits >= its threshold.

    Args:
      q: [B, N, H, D]; k, v: [B, N, G, D].
      keep_threshold: [B, N, H] f32.
      platform: "tpu" (Mosaic) or "gpu" (Triton) — the kernel flavour, also when interpreted.
    Returns:
      out [B, N, H, D] in q.dtype and lse [B, N, H] f32 (log-sum-exp of the kept scaled logits).
    """
    batch, n, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    default_q, default_k = BLOCKS[platform]
    block_q, block_k = block_q or default_q, block_k or default_k
    if platform == "gpu" and not all(map(triton_size, (head_dim, block_q, block_k))):
        raise ValueError(f"the Triton kernel needs head_dim ({head_dim}), block_q ({block_q}) and "
                         f"block_k ({block_k}) to be powers of two >= 16")
    n_pad = round_up(n, max(block_q, block_k))
    pad = ((0, 0), (0, n_pad - n), (0, 0), (0, 0))
    n_programs = n_kv if platform == "tpu" else n_heads
    per_program = n_heads // n_programs
    rows = block_q * per_program

    q_rows = _to_rows(jnp.pad(q, pad), n_programs)  # [B, P, N_pad*hp, D]
    thr = jnp.pad(keep_threshold[..., None], pad, constant_values=MASK_VALUE)
    thr_rows = _to_rows(thr.astype(jnp.float32), n_programs)  # [B, P, N_pad*hp, 1]
    row_index = jnp.repeat(jnp.arange(n_pad, dtype=jnp.int32), per_program)[None, None, :, None]
    k_heads = jnp.pad(k, pad).transpose(0, 2, 1, 3)  # [B, G, N_pad, D]
    v_heads = jnp.pad(v, pad).transpose(0, 2, 1, 3)

    kv_head = lambda p: jax.lax.div(p * per_program, group)
    row_spec = lambda width: pl.BlockSpec((None, None, rows, width), lambda b, p, i: (b, p, i, 0))
    kv_spec = pl.BlockSpec((None, None, n_pad, head_dim), lambda b, p, i: (b, kv_head(p), 0, 0))
    if platform == "tpu":
        itemsize = jnp.dtype(q.dtype).itemsize
        # Double-buffered whole-head K/V and q/out blocks, the accumulator, [rows, block_k] temporaries.
        vmem = 4 * n_pad * head_dim * itemsize + rows * head_dim * (4 + 4 * itemsize) + 3 * rows * block_k * 4
        params = tpu_compiler_params(("parallel", "parallel", "parallel"), vmem)
    else:
        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    kernel = functools.partial(_kernel, scale=head_dim ** -0.5, block_q=block_q, block_k=block_k)
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, n_programs, n_pad // block_q),
        in_specs=[row_spec(head_dim), pl.BlockSpec((None, None, rows, 1), lambda b, p, i: (0, 0, i, 0)),
                  row_spec(1), kv_spec, kv_spec],
        out_specs=[row_spec(head_dim), row_spec(1)],
        out_shape=[jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
                   jax.ShapeDtypeStruct(thr_rows.shape, jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name=f"topk_flash_{platform}",
    )(q_rows, row_index, thr_rows, k_heads, v_heads)
    return _from_rows(out, n_pad)[:, :n], _from_rows(lse, n_pad)[:, :n, :, 0]
