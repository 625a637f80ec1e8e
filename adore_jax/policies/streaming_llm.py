"""StreamingLLM (Xiao et al., 2023): `sinks` first tokens ("attention sinks") + the most recent ones."""
import dataclasses

import jax.numpy as jnp

from adore_jax.policies.base import BoundedPolicy

DEFAULT_SINKS = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingLLM(BoundedPolicy):
    name = "streaming_llm"

    def with_defaults(self):
        sinks = self.sinks or min(DEFAULT_SINKS, self.cache_size)
        return dataclasses.replace(self, sinks=sinks, recent=self.recent or self.cache_size - sinks)

    def slot_scores(self, cache, state, token_scores):
        return cache.slot_positions.astype(jnp.float32)  # beyond the pinned sinks, newer is kept
