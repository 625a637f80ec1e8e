"""Rebuild: each decode step recomputes the R best released tokens with the current one (ADORE's return path).

The picked tokens run with the current token as one block at their original positions (RoPE at the absolute
position: a rebuilt token's K/V are what it would have had if never released, up to the context it sees now).
Afterwards the cache keeps the m best of cache + current token + the admitted rebuilt tokens: all of them
(`into_cache=True`, the paper's rule) or none (they serve their step only).

Candidates are ranked by the scorer's token scores (`ranked_by="scorer"`, a scorer that scores released tokens:
the controller, a score table), or by the model's own attention at one layer (`ranked_by="attention"`): every
token's RoPE'd key of that layer is kept when it is first seen (G x D floats a token), and the previous token's
queries score every released key, max over heads of q . k / sqrt(D). With `adaptive` the block runs only when a
pick outscores the weakest cached token by more than `margin` (`lax.cond`).
"""
import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from adore_jax.policies.base import cached_scores, rows
from adore_jax.policies.key_logits import max_head_logits
from adore_jax.policies.returns import ReturnPath, check_choice, check_int, released_before

RANKINGS = ("scorer", "attention")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RebuildState:
    token_ids: jax.Array  # [B, N] int32 every token seen, at its position (what a rebuild runs again)
    keys: Optional[jax.Array]  # [B, N, G, D] float32 the ranking layer's key of every token seen (by attention)
    query: Optional[jax.Array]  # [B, H, D] float32 ... and its queries of the latest token
    next_position: Optional[jax.Array]  # [B, 1] int32 the first position whose key is not yet kept


@dataclasses.dataclass(frozen=True)
class Rebuild(ReturnPath):
    kind: ClassVar[str] = "rebuild"

    r: int = 8  # R, released tokens rebuilt per decode step (>= 1, < cache_size)
    ranked_by: str = "scorer"  # "scorer": the scorer's token scores; "attention": one layer's attention logits
    into_cache: bool = True  # rebuilt tokens compete for the m slots; False: they serve one step only
    adaptive: bool = False  # run the block only when a pick outscores the weakest cached token (ranked_by scorer)
    margin: float = 0.0  # adaptive: ... by more than this
    layer: Optional[int] = None  # ranked_by="attention": the ranking layer (default 2 * num_layers // 3)

    def __post_init__(self):
        check_int(self.r, "r (rebuilt tokens per step)", 1)
        check_choice(self.ranked_by, "ranked_by", RANKINGS)
        for name in ("into_cache", "adaptive"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not self.margin >= 0:
            raise ValueError(f"margin must be a number >= 0; got {self.margin!r}")
        if self.margin and not self.adaptive:
            raise ValueError(f"margin applies to adaptive=True; got margin={self.margin} with adaptive=False")
        if self.adaptive and self.ranked_by != "scorer":
            raise ValueError("adaptive=True compares picks with the cached tokens' scores: it needs ranked_by='scorer'")
        if self.layer is not None:
            check_int(self.layer, "layer", 0)
            if self.ranked_by != "attention":
                raise ValueError(f"layer is the attention ranking's layer: it needs ranked_by='attention'; got "
                                 f"ranked_by={self.ranked_by!r}")

    @property
    def label(self) -> str:
        by = f" by attention{'' if self.layer is None else f' at {self.layer}'}" * (self.ranked_by == "attention")
        return (f"rebuild R={self.r}" + " adaptive" * self.adaptive + f" margin={self.margin:g}" * bool(self.margin)
                + " transient" * (not self.into_cache) + by)

    def check_scorer(self, policy) -> None:
        if self.ranked_by == "scorer" and not policy.scores_any_token:
            raise ValueError(f"Rebuild(ranked_by='scorer') ranks released tokens by the scorer's token scores, which "
                             f"policy {policy.name!r} has not; use ranked_by='attention'")

    def check_budget(self, cache_size: int) -> None:
        if self.r >= cache_size:
            raise ValueError(f"r (R={self.r}) must be < cache_size (m={cache_size})")

    def ranking_layer(self, model) -> Optional[int]:
        if self.ranked_by != "attention":
            return None
        layer = 2 * model.num_layers // 3 if self.layer is None else self.layer
        if layer >= model.num_layers:
            raise ValueError(f"layer must be in [0, {model.num_layers}) for this model; got {layer}")
        return layer

    def init_state(self, shape) -> RebuildState:
        batch, n, model = shape.batch, shape.max_length, shape.model
        state = RebuildState(jnp.zeros((batch, n), jnp.int32), None, None, None)
        if self.ranked_by != "attention":
            return state
        self.ranking_layer(model)
        return dataclasses.replace(
            state, keys=jnp.zeros((batch, n, model.num_kv_heads, model.head_dim), jnp.float32),
            query=jnp.zeros((batch, model.num_heads, model.head_dim), jnp.float32),
            next_position=jnp.zeros((batch, 1), jnp.int32))

    def position_limit(self, state) -> int:
        return state.token_ids.shape[1]

    def tap(self, model):
        """The hook that hands back the ranking layer's queries and keys (None when ranked by the scorer)."""
        layer = self.ranking_layer(model)
        if layer is None:
            return None
        return lambda index, q, k, v: (None, (q, k) if index == layer else None)

    def prefill_hook(self, model, cache, state, start):
        return self.tap(model)

    def after_block(self, state, cache, block, last_row, hook_out):
        """Keep the block's token ids and, ranked by attention, the keys of its tokens seen for the first time (a
        rebuilt token keeps the key of its first pass) and the last valid row's queries."""
        batch, n = block.tokens.shape[0], state.token_ids.shape[1]
        r = rows(batch)
        where = jnp.where(block.valid, block.positions, n)  # padding goes out of range: dropped
        state = dataclasses.replace(state, token_ids=state.token_ids.at[r, where].set(block.tokens, mode="drop"))
        if self.ranked_by != "attention":
            return state
        query, keys = next(out for out in hook_out if out is not None)  # [B, Q, H, D], [B, Q, G, D]
        first_seen = block.valid & (block.positions >= state.next_position)  # [B, Q]
        where = jnp.where(first_seen, block.positions, n)
        seen_upto = jnp.max(jnp.where(first_seen, block.positions + 1, 0), axis=1, keepdims=True)
        latest = jnp.take_along_axis(query, last_row[:, None, None, None], axis=1)[:, 0]  # [B, H, D]
        has_rows = jnp.any(block.valid, axis=1)[:, None, None]  # a prompt that ended earlier keeps its query
        return dataclasses.replace(
            state, keys=state.keys.at[r, where].set(keys.astype(jnp.float32), mode="drop"),
            query=jnp.where(has_rows, latest.astype(jnp.float32), state.query),
            next_position=jnp.maximum(state.next_position, seen_upto))

    def choose(self, cache, state, token_scores, position):
        """The R released tokens to rebuild for the query at position [B]: (picked [B, R] int32 positions, wanted
        [B, R] bool). A pick is wanted when it exists (fewer than R tokens may be released) and, with adaptive,
        when it outscores the weakest cached token by more than margin."""
        released = released_before(cache, position, state.token_ids.shape[1])
        ranking = max_head_logits(state.query, state.keys) if self.ranked_by == "attention" else token_scores
        picked_scores, picked = jax.lax.top_k(jnp.where(released, ranking, -jnp.inf), self.r)
        wanted = picked_scores > -jnp.inf
        if self.adaptive:
            weakest = jnp.min(jnp.where(cache.slot_valid, cached_scores(cache, token_scores), jnp.inf), axis=1,
                              keepdims=True)  # [B, 1]
            wanted &= picked_scores > weakest + self.margin
        return picked.astype(jnp.int32), wanted

    def decode_step(self, steps, cache, state, current, position):
        """Pick before the block (a scorer that reads hidden states ranks with its state after the previous token,
        and ranks again for the release), run the picks with the current token, free the rows not admitted, then
        keep the m best."""
        batch, r = position.shape[0], self.r
        tap = self.tap(steps.model)
        if steps.early:
            state = steps.observe(state, current, None)
        token_scores = steps.scores(state, position)
        picked, wanted = self.choose(cache, state.returns, token_scores, position)  # [B, R] each
        admitted = wanted if self.into_cache else jnp.zeros_like(wanted)

        def with_rebuild(cache, state):
            tokens = jnp.concatenate([jnp.take_along_axis(state.returns.token_ids, picked, axis=1), current.tokens], 1)
            block = steps.place(cache, tokens, jnp.concatenate([picked, current.positions], axis=1),
                                jnp.concatenate([wanted, current.valid], axis=1))
            hidden, cache, state, layer_hidden, _ = steps.run(cache, state, block, jnp.full((batch,), r), tap)
            cache = dataclasses.replace(  # rebuilt rows not admitted served this step only: free their slots
                cache, slot_valid=cache.slot_valid.at[rows(batch), block.slots[:, :r]].min(admitted))
            return hidden[:, -1], cache, steps.counted(state, wanted), last_hidden(layer_hidden)

        def current_only(cache, state):
            block = steps.place(cache, current.tokens, current.positions, current.valid)
            hidden, cache, state, layer_hidden, _ = steps.run(cache, state, block, jnp.zeros((batch,), jnp.int32), tap)
            return hidden[:, -1], cache, state, last_hidden(layer_hidden)

        if self.adaptive:
            ran = jnp.any(wanted)
            hidden, cache, state, layer_hidden = jax.lax.cond(ran, with_rebuild, current_only, cache, state)
            wanted &= ran
        else:
            hidden, cache, state, layer_hidden = with_rebuild(cache, state)
        if not steps.early:  # the rebuilt rows keep the features of their first pass; only the current token is new
            state = steps.observe(state, current, layer_hidden)
            token_scores = steps.scores(state, position, cache.slot_positions)
        cache = steps.release(cache, state, token_scores, position, 1 + r)
        return hidden, cache, state, jnp.where(wanted, picked, -1)


def last_hidden(layer_hidden):
    """The current token's row [B, 1, E] of a block's tapped hidden states (its last row), or None."""
    return None if layer_hidden is None else layer_hidden[:, -1:]
