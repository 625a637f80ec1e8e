"""The recommended cache policies, by name: what the README's table, the configs and the benchmarks run.

Each takes the cache budget m (None: an evaluation or `generate` fills it in) and returns a policy object;
`adore_jax.presets.adore_recall(256)`, `make_policy("adore_recall", cache_size=256)` and a config's
`{preset: adore_recall}` name them too.

  adore_fixed_memory   the controller alone (R = 0): the best policy whose memory is m slots and nothing more
  adore_paper          the paper's ADORE: the controller (no attention term) + rebuild of R = 8 into the cache
  adore_attention_rebuild  R = 8 released tokens ranked by one layer's attention, recomputed for one step
  adore_recall         the best quality with a store of every token's K/V: R = 32 recalled per layer and step
  quest                Quest (Tang et al., 2024): sinks + recent tokens, the rest recalled by page bounds
"""
from typing import Optional

from adore_jax.policies.adore import Adore
from adore_jax.policies.rebuild import Rebuild
from adore_jax.policies.recall import Recall
from adore_jax.policies.streaming_llm import StreamingLLM

RECALL_PREFILL_CHUNK = 1024  # recall presets prefill in chunks of 1024: with 128, fewer tokens per chunk see each
# other exactly, and pass keys are lost (docs/results/retrieval.md)


def adore_fixed_memory(cache_size: Optional[int] = None) -> Adore:
    return Adore(cache_size=cache_size)


def adore_paper(cache_size: Optional[int] = None, r: int = 8) -> Adore:
    return Adore(cache_size=cache_size, attention_weight=0.0, returns=Rebuild(r=r))


def adore_attention_rebuild(cache_size: Optional[int] = None, r: int = 8) -> Adore:
    return Adore(cache_size=cache_size, returns=Rebuild(r=r, ranked_by="attention", into_cache=False))


def adore_recall(cache_size: Optional[int] = None, r: int = 32, from_layer: int = 0, in_prefill: bool = False,
                 prefill_chunk: Optional[int] = RECALL_PREFILL_CHUNK) -> Adore:
    return Adore(cache_size=cache_size, prefill_chunk=prefill_chunk,
                 returns=Recall(r=r, from_layer=from_layer, in_prefill=in_prefill))


def quest(cache_size: Optional[int] = None, r: int = 32, page_size: int = 16, pages: int = 16) -> StreamingLLM:
    return StreamingLLM(cache_size=cache_size, prefill_chunk=RECALL_PREFILL_CHUNK,
                        returns=Recall(r=r, page_size=page_size, pages=pages))


PRESETS = {preset.__name__: preset for preset in (adore_fixed_memory, adore_paper, adore_attention_rebuild,
                                                    adore_recall, quest)}
