"""TOVA (Oren et al., 2024): release the token the current query attends to least.

The latest query's attention mass, summed over layers and heads (one decision per sequence).
"""
import dataclasses

import jax.numpy as jnp

from adore_jax.policies.base import BoundedPolicy


@dataclasses.dataclass(frozen=True, kw_only=True)
class TOVA(BoundedPolicy):
    name = "tova"
    needs_mass = True

    def update_state(self, ps, block, mass, last_row, tapped=None):
        """mass [B, Q, S]; last_row [B]: the block's last valid query, whose attention is kept."""
        latest = jnp.take_along_axis(mass, last_row[:, None, None], axis=1)[:, 0]  # [B, S]
        return dataclasses.replace(ps, mass=latest)

    def slot_scores(self, cache, ps, token_scores):
        return ps.mass
