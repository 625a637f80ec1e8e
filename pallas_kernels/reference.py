"""Masked grouped-query softmax attention in plain jnp: the one reference under every jnp twin.

    out, probs = masked_attention(q, k, v, visible, top_k=None)

Query t attends key s iff ``visible[b, t, s]``; the callers build the mask (slot positions and
validity for slot attention, causal and same-segment for training). GQA: query head h reads KV
head h // (H // G); K/V are never broadcast to query-head count, the queries are grouped instead.
Logits are f32, scaled by D**-0.5; masked logits take the finite MASK_VALUE, so a query that sees
nothing gets zero probabilities and a zero output, never NaN.

Top-K (top_k=K): each query keeps, per head, only its K largest visible logits and renormalises
over them; a query with fewer than K visible keys keeps all of them. Tie rule: a query keeps every
visible logit >= kth - tol, where kth is its K-th largest visible logit and tol = TIE_TOLERANCE *
max(1, |kth|). Exact ties at the K-th value are therefore all kept (a query may keep more than K
keys), and so are near-ties within tol. The tolerance makes the kept set independent of the
summation order of q.k, which differs between implementations (kernels, blocked passes, backward).
"""
import jax
import jax.numpy as jnp

from pallas_kernels._common import MASK_VALUE, dot_precision, kth_largest

TIE_TOLERANCE = 1e-5


def attention_logits(q, k):
    """Scaled logits: q [B, T, H, D], k [B, S, G, D] -> [B, H, T, S] float32."""
    batch, length, n_heads, head_dim = q.shape
    n_keys, n_kv = k.shape[1], k.shape[2]
    qg = q.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)  # [B, T, G, r, D]
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k, precision=dot_precision(q.dtype),
                        preferred_element_type=jnp.float32) * head_dim ** -0.5  # [B, G, r, T, S]
    return logits.reshape(batch, n_heads, length, n_keys)


def keep_threshold(logits, visible, top_k: int, fast: bool = False):
    """The smallest logit each query keeps under top-K (see the tie rule in the module docstring).

    logits [B, H, T, S] f32; visible: bool broadcastable to logits. Returns [B, H, T] f32
    (about MASK_VALUE when fewer than top_k keys are visible: all of them are kept).
    fast: find the K-th logit by bisection (`kth_largest`, the same value) instead of lax.top_k.
    """
    masked = jnp.where(visible, logits, MASK_VALUE)
    k = min(top_k, logits.shape[-1])
    kth = kth_largest(masked, k) if fast else jax.lax.top_k(masked, k)[0][..., -1]
    return kth - TIE_TOLERANCE * jnp.maximum(1.0, jnp.abs(kth))


def masked_softmax(logits, keep):
    """Softmax of logits [B, H, T, S] over the keys where `keep` (bool, broadcastable).

    Returns (probs [B, H, T, S] f32, 0 where not kept; log-sum-exp of the kept logits [B, H, T],
    -inf for a row that keeps nothing).
    """
    masked = jnp.where(keep, logits, MASK_VALUE)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))  # exact: softmax is shift-invariant
    weights = jnp.exp(masked - row_max) * keep  # a product, not a where: XLA:CPU fuses it into both uses
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    return probs, (row_max + jnp.log(total))[..., 0]


def attend(probs, v):
    """probs [B, H, T, S] x v [B, S, G, D] -> [B, T, H, D] in v's dtype (f32 accumulation)."""
    batch, n_heads, length, n_keys = probs.shape
    n_kv, head_dim = v.shape[2], v.shape[3]
    pg = probs.reshape(batch, n_kv, n_heads // n_kv, length, n_keys).astype(v.dtype)  # [B, G, r, T, S]
    out = jnp.einsum("bgrts,bsgd->btgrd", pg, v, precision=dot_precision(v.dtype),
                     preferred_element_type=jnp.float32)  # [B, T, G, r, D]
    return out.reshape(batch, length, n_heads, head_dim).astype(v.dtype)


def masked_attention(q, k, v, visible, top_k=None, fast_threshold=False):
    """Softmax attention of q over the keys each query sees, optionally only its top_k logits.

    Args:
      q: [B, T, H, D]; k, v: [B, S, G, D] (H a multiple of G).
      visible: [B or 1, T, S] bool, query t may attend key s.
      top_k: None, or a static int >= 1: keep only each query's top_k visible logits per head.
      fast_threshold: find the top_k threshold by bisection (see `keep_threshold`; the same keys kept).
    Returns:
      out [B, T, H, D] in q's dtype; probs [B, H, T, S] float32, 0 where not visible (or not kept).
    """
    logits = attention_logits(q, k)  # [B, H, T, S]
    keep = visible[:, None]  # [B|1, 1, T, S]
    if top_k is not None:
        keep = keep & (logits >= keep_threshold(logits, keep, top_k, fast_threshold)[..., None])
    probs, _ = masked_softmax(logits, keep)
    return attend(probs, v).astype(q.dtype), probs


__all__ = ["masked_attention", "attention_logits", "keep_threshold", "masked_softmax", "attend", "TIE_TOLERANCE"]
