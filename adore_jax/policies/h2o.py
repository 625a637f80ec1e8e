"""H2O (Zhang et al., 2023): heavy hitters, the tokens with the most attention mass accumulated over
every query since they entered the cache, plus a protected recent window (default: half the cache).

One decision per sequence from the mass summed over layers and query heads (the paper decides per
head and layer; one shared decision keeps the cache a single slot table, ADORE's granularity).
"""
import dataclasses

import jax.numpy as jnp

from adore_jax.policies.base import MassScorer, written_slots


@dataclasses.dataclass(frozen=True, kw_only=True)
class H2O(MassScorer):
    name = "h2o"

    def with_defaults(self):
        return self if self.recent else dataclasses.replace(self, recent=self.cache_size // 2)

    def mass_weights(self, block, last_row):
        """Every valid query of the block counts (padding rows do not)."""
        return block.valid.astype(jnp.float32)

    def update(self, state, block, mass, last_row):
        """mass [B, S]: what the block's valid queries gave each slot. A slot written by this block starts
        from zero (it holds a new token); every slot then adds it."""
        return jnp.where(written_slots(block, state.shape[1]), 0.0, state) + mass
