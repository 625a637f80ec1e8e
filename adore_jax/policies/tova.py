"""TOVA (Oren et al., 2024): release the token the current query attends to least.

The latest query's attention mass, summed over layers and heads (one decision per sequence).
"""
import dataclasses

from adore_jax.policies.base import BoundedPolicy


@dataclasses.dataclass(frozen=True, kw_only=True)
class TOVA(BoundedPolicy):
    name = "tova"
    needs_mass = True

    def update_state(self, ps, block, mass, last_row, tapped=None):
        """mass [B, S]: the attention of the block's last valid query (`mass_weights`), which is kept."""
        return dataclasses.replace(ps, mass=mass)

    def slot_scores(self, cache, ps, token_scores):
        return ps.mass
