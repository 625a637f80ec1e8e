"""Attention of a block of queries over the slots of a KV cache.

The cache holds S slots per sequence; each slot has an absolute position and a validity flag.
The query block (Q rows: the current token, plus rebuilt tokens under ADORE, or a prefill chunk)
has already been written into the cache, so "the slots" include the block's own keys.

Query (b, i) attends slot (b, s) iff ``slot_valid[b, s]`` and
``slot_positions[b, s] <= q_positions[b, i]``. Slots may hold positions in any order; the mask
comes from the positions alone. GQA: query head h reads KV head h // (H // G); K/V are never
broadcast to query-head count in memory.

`slot_attention_ref` is the plain-jnp twin: the reference in tests and the CPU path;
`slot_attention_tpu` (Mosaic) and `slot_attention_gpu` (Triton, split-K) are the kernels.
"""
import jax.numpy as jnp

from pallas_kernels._common import MASK_VALUE, dot_precision
from pallas_kernels._dispatch import resolve_impl
from pallas_kernels._slot_attention_gpu import slot_attention_gpu
from pallas_kernels._slot_attention_tpu import slot_attention_tpu


def slot_attention_ref(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False):
    """Reference slot attention.

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
    batch, n_q, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    qg = q.reshape(batch, n_q, n_kv, group, head_dim)  # [B, Q, G, r, D]
    precision = dot_precision(q.dtype)
    logits = jnp.einsum("bqgrd,bsgd->bgrqs", qg, k, precision=precision, preferred_element_type=jnp.float32)
    logits = logits * (head_dim ** -0.5)
    visible = slot_valid[:, None, :] & (slot_positions[:, None, :] <= q_positions[:, :, None])  # [B, Q, S]
    logits = jnp.where(visible[:, None, None], logits, MASK_VALUE)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - row_max) * visible[:, None, None]
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)  # [B, G, r, Q, S] f32
    out = jnp.einsum("bgrqs,bsgd->bqgrd", probs.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
    out = out.reshape(batch, n_q, n_heads, head_dim).astype(q.dtype)
    if return_mass:
        mass = jnp.sum(probs, axis=2).transpose(0, 2, 1, 3)  # [B, Q, G, S]
        return out, mass
    return out


def slot_attention(q, k, v, q_positions, slot_positions, slot_valid, *, return_mass=False, impl="auto"):
    """Slot attention (semantics and shapes of `slot_attention_ref`) by the chosen implementation.

    impl: "auto" (the Pallas kernel on a TPU/GPU backend, the jnp twin elsewhere), "ref",
      "pallas" (TPU/GPU backend only) or "pallas_interpret" (the kernel in interpret mode).
    """
    kind, interpret = resolve_impl(impl, q.shape[-1])
    args = (q, k, v, q_positions, slot_positions, slot_valid)
    if kind == "tpu":
        return slot_attention_tpu(*args, return_mass=return_mass, interpret=interpret)
    if kind == "gpu":
        return slot_attention_gpu(*args, return_mass=return_mass, interpret=interpret)
    return slot_attention_ref(*args, return_mass=return_mass)


__all__ = ["slot_attention", "slot_attention_ref", "slot_attention_tpu", "slot_attention_gpu", "MASK_VALUE"]
