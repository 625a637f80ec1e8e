"""TOVA (Oren et al., 2024): release the token the current query attends to least.

The latest query's attention mass, summed over layers and heads (one decision per sequence).
"""
import dataclasses

from adore_jax.policies.base import MassScorer


@dataclasses.dataclass(frozen=True, kw_only=True)
class TOVA(MassScorer):
    name = "tova"

    def update(self, state, block, mass, last_row):
        """mass [B, S]: the attention of the block's last valid query (`mass_weights`), which is kept."""
        return mass
