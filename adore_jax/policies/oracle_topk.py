"""The oracle: the full cache, where each query attends only to its own top-K logits per head
(ideal top-K sparse attention): the upper bound a bounded policy approximates."""
import dataclasses
from typing import Optional

from adore_jax.policies.base import CachePolicy
from adore_jax.policies.returns import check_int
from pallas_kernels.reference import masked_attention
from pallas_kernels.slot_attention import slot_visibility


@dataclasses.dataclass(frozen=True, kw_only=True)
class OracleTopK(CachePolicy):
    name = "oracle_topk"

    attn_top_k: Optional[int] = None  # K, the logits each query keeps per head (required; an eval fills in m)

    def __post_init__(self):
        super().__post_init__()
        if self.attn_top_k is not None:
            check_int(self.attn_top_k, "attn_top_k (K)", 1)

    def validate(self, max_length: int) -> "OracleTopK":
        if self.attn_top_k is None:
            raise ValueError("policy 'oracle_topk' needs attn_top_k (K)")
        return self

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
