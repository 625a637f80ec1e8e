"""Window: the m most recent tokens."""
import dataclasses

import jax.numpy as jnp

from adore_jax.policies.base import BoundedPolicy


@dataclasses.dataclass(frozen=True, kw_only=True)
class Window(BoundedPolicy):
    name = "window"

    def slot_scores(self, cache, state, token_scores):
        return cache.slot_positions.astype(jnp.float32)  # newer is kept
