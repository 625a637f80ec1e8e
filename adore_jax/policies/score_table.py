"""Score table: ADORE's release and rebuild driven by a given score of every (query, token) pair
instead of a controller.

The gap decomposition (eval/gap.py) passes scores computed from teacher-forced full attention (a
perfect scorer, for the current query or for future need), which tells how much of a learned
policy's loss is its ranking and how much is the shared slot table and permanent release:

    scores = np.log(attention_mass)                                    # [B, T, T]: query t, token i
    teacher_force(model, docs, P, cache=ScoreTable(cache_size=128, rebuild=8), controller=scores)
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from adore_jax.policies.adore import Adore
from adore_jax.policies.base import BoundedPolicy, PolicyState, rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreTable(Adore):
    name = "score_table"

    attention_weight: float = 0.0  # the given scores alone rank (a perfect scorer needs no attention term)

    @property
    def label(self) -> str:
        return "score_table" + super().label[len("adore"):]

    def resolve_controller(self, model, controller):
        """The scores stand in for the controller: controller=[B, T, T] float (query t, token i)."""
        if controller is None:
            raise ValueError("policy 'score_table' needs its scores: controller=[B, T, T] array, the score of "
                             "token i for query t")
        scores = np.asarray(controller, np.float32)
        if scores.ndim != 3 or scores.shape[1] != scores.shape[2]:
            raise ValueError(f"score_table scores must be [B, T, T]; got shape {scores.shape}")
        return None, {"scores": jnp.asarray(scores)}

    def check(self, max_length: int) -> None:
        super().check(max_length)
        if self.rebuild_by != "controller":
            raise ValueError(f"score_table ranks rebuild candidates by its scores: rebuild_by must be "
                             f"'controller'; got {self.rebuild_by!r}")

    def init_state(self, batch, num_slots, max_length, controller=None, model=None,
                   kv_dtype=jnp.float32) -> PolicyState:
        state = BoundedPolicy.init_state(self, batch, num_slots, max_length)
        return dataclasses.replace(state, token_ids=jnp.zeros((batch, max_length), jnp.int32))

    def context(self, controller, controller_params, embed, ps):
        """The scores padded (with -inf) to the release buffer's length N: [B, N, N]."""
        scores = controller_params["scores"]
        n, length = ps.token_ids.shape[1], scores.shape[1]
        if length > n:
            raise ValueError(f"score_table scores cover {length} positions, the run only {n}")
        return jnp.pad(scores, ((0, 0), (0, n - length), (0, n - length)), constant_values=-jnp.inf)

    def observe(self, ps, ctx, tokens, positions, valid, layer_hidden=None):
        """Buffer the block's token ids (rebuilding needs them); there is no controller to advance."""
        where = jnp.where(valid, positions, ps.token_ids.shape[1])  # padding goes out of range: dropped
        return dataclasses.replace(ps, token_ids=ps.token_ids.at[rows(tokens.shape[0]), where].set(tokens,
                                                                                                    mode="drop"))

    def token_scores(self, ps, ctx, query_position, positions=None):
        """Row query_position [B] of the table: [B, N]; tokens after the query -inf."""
        n = ctx.shape[1]
        row = jnp.take_along_axis(ctx, query_position[:, None, None], axis=1)[:, 0]
        return jnp.where(jnp.arange(n)[None, :] <= query_position[:, None], row, -jnp.inf)
