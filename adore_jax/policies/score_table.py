"""Score table: ADORE's release (and, composed with `Rebuild`, rebuild) driven by a given score of every
(query, token) pair instead of a controller.

The gap decomposition (eval/gap.py) passes scores computed from teacher-forced full attention (a
perfect scorer, for the current query or for future need), which tells how much of a learned
policy's loss is its ranking and how much is the shared slot table and permanent release:

    scores = np.log(attention_mass)                                    # [B, T, T]: query t, token i
    teacher_force(model, docs, P, cache=ScoreTable(cache_size=128, returns=Rebuild(r=8)), controller=scores)
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from adore_jax.policies.base import BoundedPolicy, cached_scores


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreTable(BoundedPolicy):
    name = "score_table"
    needs_controller = True
    scores_any_token = True

    sinks: int = 4  # first tokens always kept (as adore's)

    def resolve_controller(self, model, controller):
        """The scores stand in for the controller: controller=[B, T, T] float (query t, token i)."""
        if controller is None:
            raise ValueError("policy 'score_table' needs its scores: controller=[B, T, T] array, the score of "
                             "token i for query t")
        scores = np.asarray(controller, np.float32)
        if scores.ndim != 3 or scores.shape[1] != scores.shape[2]:
            raise ValueError(f"score_table scores must be [B, T, T]; got shape {scores.shape}")
        return None, {"scores": jnp.asarray(scores)}

    def init_state(self, shape):
        return jnp.zeros((0, shape.max_length), jnp.float32)  # holds only N, the length the table is padded to

    def position_limit(self, state) -> int:
        return state.shape[1]

    def context(self, controller, controller_params, embed, state):
        """The scores padded (with -inf) to the run's length N: [B, N, N]."""
        scores = controller_params["scores"]
        n, length = state.shape[1], scores.shape[1]
        if length > n:
            raise ValueError(f"score_table scores cover {length} positions, the run only {n}")
        return jnp.pad(scores, ((0, 0), (0, n - length), (0, n - length)), constant_values=-jnp.inf)

    def token_scores(self, state, ctx, query_position, positions=None):
        """Row query_position [B] of the table: [B, N]; tokens after the query -inf."""
        n = ctx.shape[1]
        row = jnp.take_along_axis(ctx, query_position[:, None, None], axis=1)[:, 0]
        return jnp.where(jnp.arange(n)[None, :] <= query_position[:, None], row, -jnp.inf)

    def slot_scores(self, cache, state, token_scores):
        return cached_scores(cache, token_scores)
