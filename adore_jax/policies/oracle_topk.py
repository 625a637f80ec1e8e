"""The oracle: the full cache, where each query attends only to its own top-K logits per head
(ideal top-K sparse attention, ADORE.md 1): the upper bound a bounded policy approximates."""
import dataclasses
from typing import Optional

from adore_jax.policies.base import CachePolicy
from pallas_kernels.reference import masked_attention
from pallas_kernels.slot_attention import slot_visibility


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
        visible = slot_visibility(q_positions, slot_positions, slot_valid)  # [B, Q, S]
        return masked_attention(q, k, v, visible, top_k=self.k, fast_threshold=True)[0]
