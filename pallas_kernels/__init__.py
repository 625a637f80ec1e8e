"""Pallas kernels for adore-jax, each beside the plain-jnp twin it is tested against.

- `slot_attention`: a query block attending the slots of a KV cache (decode / rebuild step; on TPU/GPU a
  prefill chunk goes on to the kernels of `pallas_kernels.prefill_attention`).
- `topk_attention`: top-K sparse causal attention for fine-tuning, differentiable.
Each dispatcher takes impl="auto" | "ref" | "pallas" | "pallas_interpret".
- `kth_largest`: each row's k-th largest entry, by bisection (the top-K threshold; also used by labels).
"""
from pallas_kernels._common import kth_largest
from pallas_kernels.slot_attention import slot_attention, slot_attention_ref
from pallas_kernels.topk_attention import topk_attention, topk_attention_ref

__all__ = ["kth_largest", "slot_attention", "slot_attention_ref", "topk_attention", "topk_attention_ref"]
