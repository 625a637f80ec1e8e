"""Top-K sparse causal attention, the attention ADORE fine-tunes the backbone under (docs/design.md).

Each query keeps, per head, only its top_k largest causal logits and renormalises over them.
Queries with fewer than top_k causal predecessors keep all of them.

Ties at the K-th logit, and near-ties within a relative TIE_TOLERANCE, are all kept (the tie rule
of `reference.masked_attention`): the kept set does not depend on the summation order of q.k, which
differs between the threshold pass, the kernels and the backward pass.

Implementations (same semantics):
- `topk_attention_ref`: `reference.masked_attention` under a causal mask, materialises [B, H, N, N]
  logits; the reference.
- "blocked": two passes over query blocks in jnp — each step sees [B, H, block, N] logits, never
  [H, N, N]; finds thresholds by bisection (`_common.kth_largest`), then a masked softmax.
- "pallas": pass 1 (thresholds) as the blocked jnp pass; pass 2 as a Pallas flash kernel
  (`_topk_flash`) that never forms logits outside VMEM/registers.
Every non-ref implementation differentiates through a custom_vjp whose backward recomputes the
logits per query block with the saved thresholds and log-sum-exp: masked attention backward.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import dot_precision, round_up
from pallas_kernels._dispatch import IMPLS, resolve_impl
from pallas_kernels._topk_flash import threshold_flash_attention
from pallas_kernels.reference import (
    TIE_TOLERANCE,
    attend,
    attention_logits,
    keep_threshold,
    masked_attention,
    masked_softmax,
)

SCAN_BUDGET = 1 << 26  # f32 logits per step of the blocked jnp passes (256 MiB).


def _check_top_k(top_k):
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1; got top_k={top_k!r}")


def _causal_mask(n_q, n, start):
    """[1, Q, N] bool: query start + i sees keys 0 .. start + i."""
    return (start + jnp.arange(n_q)[:, None] >= jnp.arange(n)[None, :])[None]


def topk_attention_ref(q, k, v, top_k):
    """Reference top-K causal attention: `masked_attention` under a causal mask with top_k.

    Args:
      q: [B, N, H, D]; k, v: [B, N, G, D] (GQA: query head h reads KV head h // (H // G)).
      top_k: static int >= 1, logits kept per query and head.
    Returns:
      [B, N, H, D] in q.dtype.
    """
    _check_top_k(top_k)
    return masked_attention(q, k, v, _causal_mask(q.shape[1], k.shape[1], 0), top_k)[0]


def _scan_block(q, n):
    batch, _, n_heads, _ = q.shape
    block = SCAN_BUDGET // (batch * n_heads * n)
    block = 1 << max(3, min(9, block.bit_length() - 1))
    return min(block, round_up(n, 8))


def _query_blocks(n, block):
    """(start, end) of each block of queries; causality limits the block's keys to 0 .. end - 1."""
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def _blocked_forward(q, k, v, top_k, block, with_output):
    """Per query block: thresholds [B, N, H] and, if with_output, out [B, N, H, D] and lse [B, N, H].
    A block reads only the keys it can see (no work on the masked upper triangle)."""
    pieces = []
    for start, end in _query_blocks(q.shape[1], block):
        logits = attention_logits(q[:, start:end], k[:, :end])  # [B, H, Q, end]
        causal = _causal_mask(end - start, end, start)[:, None]  # [1, 1, Q, end]
        threshold = keep_threshold(logits, causal, top_k, fast=True)  # [B, H, Q]
        if not with_output:
            pieces.append((threshold.transpose(0, 2, 1),))
            continue
        probs, lse = masked_softmax(logits, causal & (logits >= threshold[..., None]))
        pieces.append((threshold.transpose(0, 2, 1), attend(probs, v[:, :end]).astype(q.dtype),
                       lse.transpose(0, 2, 1)))
    merged = tuple(jnp.concatenate(parts, axis=1) for parts in zip(*pieces))
    return merged if with_output else merged[0]


def _blocked_backward(q, k, v, out, lse, threshold, d_out, block):
    """Gradients of masked attention with fixed keep-thresholds, one query block (and its visible keys) at a time."""
    batch, n, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    precision = dot_precision(jnp.float32)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    dk = dv = jnp.zeros(k.shape, jnp.float32)
    dq = []
    for start, end in _query_blocks(n, block):
        rows = slice(start, end)
        logits = attention_logits(q[:, rows].astype(jnp.float32), k32[:, :end])  # [B, H, Q, end]
        kept = logits >= threshold[:, rows].transpose(0, 2, 1)[..., None]
        keep = _causal_mask(end - start, end, start)[:, None] & kept
        probs = jnp.where(keep, jnp.exp(logits - lse[:, rows].transpose(0, 2, 1)[..., None]), 0.0)
        probs = probs.reshape(batch, n_kv, group, end - start, end)  # [B, G, r, Q, end]
        shape5 = (batch, end - start, n_kv, group, head_dim)
        do5, o5, q5 = (x[:, rows].astype(jnp.float32).reshape(shape5) for x in (d_out, out, q))  # [B, Q, G, r, D]
        dv = dv.at[:, :end].add(jnp.einsum("bgrqn,bqgrd->bngd", probs, do5, precision=precision))
        dp = jnp.einsum("bqgrd,bngd->bgrqn", do5, v32[:, :end], precision=precision)
        delta = jnp.sum(do5 * o5, axis=-1).transpose(0, 2, 3, 1)[..., None]  # [B, G, r, Q, 1]
        ds = probs * (dp - delta) * head_dim ** -0.5
        dq.append(jnp.einsum("bgrqn,bngd->bqgrd", ds, k32[:, :end], precision=precision)
                  .reshape(batch, end - start, n_heads, head_dim))
        dk = dk.at[:, :end].add(jnp.einsum("bgrqn,bqgrd->bngd", ds, q5, precision=precision))
    return jnp.concatenate(dq, axis=1).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _forward(q, k, v, top_k, config):
    kind, interpret, kernel_blocks = config
    block = _scan_block(q, q.shape[1])
    if kind == "blocked":
        threshold, out, lse = _blocked_forward(q, k, v, top_k, block, with_output=True)
    else:
        threshold = _blocked_forward(q, k, v, top_k, block, with_output=False)
        block_q, block_k = kernel_blocks or (None, None)
        out, lse = threshold_flash_attention(q, k, v, threshold, platform=kind, block_q=block_q,
                                             block_k=block_k, interpret=interpret)
    return out, (q, k, v, out, lse, threshold)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _topk_attention(q, k, v, top_k, config):
    return _forward(q, k, v, top_k, config)[0]


def _topk_attention_bwd(top_k, config, residuals, d_out):
    del top_k, config
    q = residuals[0]
    return _blocked_backward(*residuals, d_out, _scan_block(q, q.shape[1]))


_topk_attention.defvjp(_forward, _topk_attention_bwd)


def topk_attention(q, k, v, top_k, *, impl="auto", kernel_blocks=None):
    """Top-K causal attention (semantics of `topk_attention_ref`), differentiable.

    impl: "auto" (Pallas on a TPU/GPU backend; elsewhere the jnp twin, or the blocked jnp passes when
      the [B, H, T, T] logits would exceed SCAN_BUDGET), "ref", "blocked", "pallas" (TPU/GPU backend
      only) or "pallas_interpret".
    kernel_blocks: optional (block_q, block_k) for the Pallas pass-2 kernel.
    """
    _check_top_k(top_k)
    kind, interpret = resolve_impl(impl, q.shape[-1], allowed=IMPLS + ("blocked",))
    if impl == "auto" and kind == "ref" and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[1] > SCAN_BUDGET:
        kind = "blocked"  # the twin keeps whole [B, H, T, T] arrays per layer: 40 GB for SmolLM2 at B=4, T=1024
    if kind == "ref":
        return topk_attention_ref(q, k, v, top_k)
    return _topk_attention(q, k, v, top_k, (kind, interpret, kernel_blocks))


__all__ = ["topk_attention", "topk_attention_ref", "TIE_TOLERANCE"]
