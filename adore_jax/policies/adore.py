"""ADORE's scorer (Zhang et al., 2024): a learned controller scores every token seen; the cache keeps the m best.

The controller (adore_jax.controller) advances over each block's tokens and keeps their features (`observe`,
after the block's forward pass: with `input_layer` it reads the hidden states that pass computed), then scores
the tokens for the current query (`token_scores`; only the cached ones when nothing released is ranked). It
scores released tokens too, so a `Rebuild` may rank by it (the paper's rebuild: `presets.adore_paper`).

With `attention_weight` beta > 0 (default 0.5) a cached token's score adds beta * log(attention mass the block's
last query gave it) (TOVA's statistic, summed over layers and heads): the controller predicts what the text will
need, the attention says what the model uses now. Released tokens have no current attention and are ranked by the
controller alone.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from adore_jax import controller as ctrl
from adore_jax.policies.base import BoundedPolicy, cached_scores, rows

MASS_FLOOR = 1e-6  # log(mass + floor): a slot the query ignored gets a finite score


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ControllerState:
    features: jax.Array  # [B, N, h] float32 the controller's features of every token seen, at its position
    gru: jax.Array  # [B, c] float32 the GRU state after the last token
    mass: Optional[jax.Array]  # [B, S] float32 the latest query's attention per slot (attention_weight > 0)


@dataclasses.dataclass(frozen=True)
class ControllerContext:
    """The controller as a compiled program sees it: its config (static), its params, the LLM's input
    embedding table it reads, and its per-distance features."""
    config: ctrl.ControllerConfig
    params: dict
    embed: jax.Array  # [V, E] the LLM's input embeddings
    table: object  # [N, h] per-distance features (query-aware form), or None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adore(BoundedPolicy):
    name = "adore"
    needs_controller = True
    scores_any_token = True

    sinks: int = 4  # first tokens always kept: position 0 is an attention sink every query needs, which a
    # controller ranking by distance would release for good; 0: none
    attention_weight: float = 0.5  # beta: a cached token's score adds beta * log(its latest attention mass); 0: off

    def __post_init__(self):
        super().__post_init__()
        weight = self.attention_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"attention_weight must be a number >= 0; got {weight!r}")

    @property
    def needs_mass(self) -> bool:
        return self.attention_weight != 0

    def resolve_controller(self, model, controller):
        """(ControllerConfig, params) from a saved controller's path, a (config, params) pair, or the model's
        default."""
        return ctrl.resolve_controller(model, controller)

    def init_state(self, shape) -> ControllerState:
        if shape.controller is None:
            raise ValueError(f"policy {self.name!r} needs a controller config")
        batch = shape.batch
        mass = jnp.zeros((batch, shape.num_slots), jnp.float32) if self.needs_mass else None
        return ControllerState(jnp.zeros((batch, shape.max_length, shape.controller.feature_width), jnp.float32),
                               jnp.zeros((batch, shape.controller.width), jnp.float32), mass)

    def compact(self, state, take):
        return state if state.mass is None else dataclasses.replace(state, mass=take(state.mass))

    def position_limit(self, state) -> int:
        return state.features.shape[1]

    def context(self, controller, controller_params, embed, state) -> ControllerContext:
        table = None
        if controller.score_form == "query_aware":
            table = ctrl.distance_table(controller, controller_params, state.features.shape[1])
        return ControllerContext(controller, controller_params, embed, table)

    def reads_hidden_after(self, controller) -> Optional[int]:
        return controller.input_layer

    def observe(self, state, ctx: ControllerContext, block, layer_hidden=None):
        """Feed a block's tokens [B, T] (at their positions, where valid) to the controller: their input
        embeddings, or their hidden states layer_hidden [B, T, E] when the controller has an input_layer."""
        if (ctx.config.input_layer is None) != (layer_hidden is None):
            raise ValueError(f"controller input_layer={ctx.config.input_layer} needs the block's hidden states "
                             f"exactly when it is set; got layer_hidden={layer_hidden is not None}")
        inputs = ctx.embed[block.tokens] if layer_hidden is None else layer_hidden  # [B, T, E]
        _, features, gru = ctrl.encode_sequence(ctx.config, ctx.params, inputs, block.valid, state.gru,
                                                block.positions)
        where = jnp.where(block.valid, block.positions, state.features.shape[1])  # padding out of range: dropped
        return dataclasses.replace(state, gru=gru, features=state.features.at[rows(block.tokens.shape[0]), where]
                                   .set(features, mode="drop"))

    def token_scores(self, state, ctx: ControllerContext, query_position, positions=None):
        """Score logits of the buffered tokens for the query at query_position [B]: [B, N]; unseen -inf.

        positions [B, K]: score only these (the cache's slots when nothing released is ranked), the rest stays
        -inf: O(K) work per step instead of O(N)."""
        n = state.features.shape[1]
        if positions is None:
            scores = ctrl.score(ctx.config, ctx.params, state.features, jnp.arange(n), state.gru, query_position,
                                ctx.table)
            return jnp.where(jnp.arange(n)[None, :] <= query_position[:, None], scores, -jnp.inf)
        features = jnp.take_along_axis(state.features, positions[..., None], axis=1)  # [B, K, h + d]
        scores = ctrl.score(ctx.config, ctx.params, features, positions, state.gru, query_position, ctx.table)
        scores = jnp.where(positions <= query_position[:, None], scores, -jnp.inf)
        return jnp.full((positions.shape[0], n), -jnp.inf).at[rows(positions.shape[0]), positions].set(scores)

    def update(self, state, block, mass, last_row):
        """Keep the attention mass [B, S] the block's last valid query gave each slot (`mass_weights`)."""
        return state if mass is None else dataclasses.replace(state, mass=mass)

    def slot_scores(self, cache, state, token_scores):
        scores = cached_scores(cache, token_scores)
        if not self.needs_mass:
            return scores
        return scores + self.attention_weight * jnp.log(state.mass + MASS_FLOOR)
