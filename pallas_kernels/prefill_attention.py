"""Causal attention of a long query block (a prefill chunk) over the slots of a KV cache, flash style.

Semantics and shapes are `slot_attention_ref`'s, with the mass when asked (only the visited slot blocks' logits
are written; `visited_mass` masks the rest). The decode kernels (`slot_attention`)
hold every query row in one program and walk every slot; for a prefill chunk that is the wrong shape of
work: a chunk of 1024 queries is 3072 rows per KV head (GQA 3), and a full-attention cache that is a quarter
filled still costs all of its slots. The prefill kernels instead
- split the queries into blocks of `block_queries` (a grid axis, so the blocks run in parallel), and
- visit, for each query block, only the slot blocks up to the last one that holds a slot some query of the
  block can see (`visible_slot_blocks`): the unfilled tail of the cache, and in a cache whose slots are in
  position order (full attention, window, StreamingLLM) the blocks past the chunk's causal diagonal, cost
  nothing. Slots in any order stay correct: a block before the bound is visited whatever it holds.

`prefill_attention_tpu` (Mosaic; the skipped blocks are not even DMAed) and `prefill_attention_gpu`
(Triton) are the kernels; `slot_attention` dispatches to them on a TPU/GPU backend for blocks of at least
PREFILL_MIN_QUERIES queries, with or without mass. Their twin is `slot_attention_ref`; on the CPU,
`slot_attention_blocked` is the jnp path that skips the unfilled tail.
"""
from pallas_kernels._common import visible_slot_blocks
from pallas_kernels._prefill_attention_gpu import prefill_attention_gpu
from pallas_kernels._prefill_attention_tpu import prefill_attention_tpu

__all__ = ["prefill_attention_gpu", "prefill_attention_tpu", "visible_slot_blocks"]
