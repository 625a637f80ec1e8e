"""The oracle: the full cache, where each query attends only to its own top-K logits per head
(ideal top-K sparse attention, ADORE.md 1): the upper bound a bounded policy approximates."""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from adore_jax.policies.base import CachePolicy
from pallas_kernels.slot_attention import MASK_VALUE


@dataclasses.dataclass(frozen=True, kw_only=True)
class OracleTopK(CachePolicy):
    name = "oracle_topk"

    attn_top_k: Optional[int] = None  # K, the logits each query keeps per head (required)

    def check(self, max_length: int) -> None:
        super().check(max_length)
        if self.attn_top_k is None:
            raise ValueError("policy 'oracle_topk' needs attn_top_k (K)")
        if isinstance(self.attn_top_k, bool) or self.attn_top_k < 1:
            raise ValueError(f"attn_top_k (K) must be >= 1; got {self.attn_top_k}")

    def at_cache_size(self, cache_size: int) -> "OracleTopK":
        """At budget m the oracle keeps K = m logits per query (unless K is set)."""
        return self if self.attn_top_k is not None else dataclasses.replace(self, attn_top_k=cache_size)

    def attention(self, impl: str):
        return TopKSlotAttention(self.attn_top_k)


@dataclasses.dataclass(frozen=True)
class TopKSlotAttention:
    """Slot attention where each query keeps only its `k` largest visible logits per head."""
    k: int

    def __call__(self, q, k, v, q_positions, slot_positions, slot_valid):
        batch, n_q, n_heads, head_dim = q.shape
        n_kv = k.shape[2]
        qg = q.reshape(batch, n_q, n_kv, n_heads // n_kv, head_dim)
        logits = jnp.einsum("bqgrd,bsgd->bgrqs", qg, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
        visible = (slot_valid[:, None, :] & (slot_positions[:, None, :] <= q_positions[:, :, None]))[:, None, None]
        logits = jnp.where(visible, logits, MASK_VALUE)
        kth = jax.lax.top_k(logits, min(self.k, logits.shape[-1]))[0][..., -1:]  # [B, G, r, Q, 1]
        keep = visible & (logits >= kth)
        weights = jnp.where(keep, jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), 0.0)
        probs = weights / jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1e-30)
        out = jnp.einsum("bgrqs,bsgd->bqgrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.reshape(batch, n_q, n_heads, head_dim).astype(q.dtype)
