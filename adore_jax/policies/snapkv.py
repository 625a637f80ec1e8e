"""SnapKV (Li et al., 2024): keep the tokens the latest queries (the observation window) attend to, pooled over
neighbouring positions so that a kept token keeps its context.

A token's score is the attention mass the window's w queries gave it (summed over layers and heads, one decision
per sequence as the other mass scorers; the paper decides per head), max-pooled over the cached tokens within
pool // 2 positions of it (a released neighbour does not count); among equal scores (a neighbourhood shares its
max) the token's own mass decides. The window's tokens are pinned (`recent` defaults to w: the paper keeps the
window).

The window is a ring of w entries, one per query, each holding that query's mass per slot. A block's window is
its valid rows that continue its last valid row's run of consecutive positions, the last w of them at most: in a
prefill chunk, its last min(w, valid rows) queries; in a decode step, the current token's row alone (the rows a
return path adds run released tokens, never the one just before the current token, which the previous release
pinned: recent >= 1). The block's k window queries overwrite the k oldest entries, each with their summed mass / k
(a chunk's queries' own masses are not kept, only their mean); a slot the block wrote (a new token) first starts
from zero in every entry. So after a chunk of >= w queries the ring holds that chunk's window mean w times, a
shorter chunk keeps the previous chunk's share in the entries it does not overwrite, and after w decode steps only
decode queries remain.
"""
import dataclasses

import jax
import jax.numpy as jnp

from adore_jax.policies.base import MassScorer, written_slots
from adore_jax.policies.returns import check_int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SnapKVState:
    ring: jax.Array  # [B, S, w] float32 the mass each of the window's queries gave each slot
    oldest: jax.Array  # [B] int32 the ring entry the next window query overwrites


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapKV(MassScorer):
    name = "snapkv"

    window: int = 32  # w: the observation window, the latest queries whose attention scores the cached tokens
    pool: int = 7  # kernel of the max-pooling over neighbouring positions (odd, >= 1; 1: no pooling)

    def __post_init__(self):
        check_int(self.window, "window", 1, where="policy 'snapkv'")
        check_int(self.pool, "pool", 1, where="policy 'snapkv'")
        if self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd integer >= 1 for policy 'snapkv'; got {self.pool!r}")
        super().__post_init__()

    def with_defaults(self):
        """recent = min(window, m - sinks) when unset: the observation window is always kept."""
        if self.recent:
            return self
        return dataclasses.replace(self, recent=max(0, min(self.window, self.cache_size - self.sinks)))

    def init_state(self, shape) -> SnapKVState:
        return SnapKVState(jnp.zeros((shape.batch, shape.num_slots, self.window), jnp.float32),
                           jnp.zeros((shape.batch,), jnp.int32))

    def compact(self, state, take):
        return dataclasses.replace(state, ring=take(state.ring))

    def mass_weights(self, block, last_row):
        """1 for the window's rows (module doc): valid, at or before last_row, continuing its run of consecutive
        positions, the last w of them; 0 elsewhere."""
        q = block.tokens.shape[1]
        j = jnp.arange(q)[None, :]
        last_position = jnp.take_along_axis(block.positions, last_row[:, None], axis=1)  # [B, 1]
        in_run = block.valid & (block.positions == last_position - (last_row[:, None] - j))
        broken = (j <= last_row[:, None]) & ~in_run
        broken_after = jnp.cumsum(broken[:, ::-1], axis=1)[:, ::-1]  # [B, Q] rows from j to the end that break it
        window = (broken_after == 0) & (j <= last_row[:, None]) & (j > last_row[:, None] - self.window)
        return window.astype(jnp.float32)

    def update(self, state, block, mass, last_row):
        """mass [B, S]: what the window's k queries gave each slot, summed; it overwrites the k oldest entries,
        mass / k in each, after the slots the block wrote are zeroed in every entry."""
        count = jnp.sum(self.mass_weights(block, last_row), axis=1).astype(jnp.int32)  # [B] k, <= w
        age = (jnp.arange(self.window)[None, :] - state.oldest[:, None]) % self.window  # [B, w] 0: the oldest
        overwritten = age < count[:, None]  # [B, w]
        share = mass / jnp.maximum(count, 1)[:, None].astype(jnp.float32)  # [B, S]
        ring = jnp.where(written_slots(block, state.ring.shape[1])[:, :, None], 0.0, state.ring)
        ring = jnp.where(overwritten[:, None, :], share[:, :, None], ring)
        return SnapKVState(ring, (state.oldest + count) % self.window)

    def slot_scores(self, cache, state, token_scores):
        """The pooled sum over the ring, ties (a neighbourhood shares its max) going to the slot's own sum: each
        slot's rank in that order, [B, S] float32 (invalid slots are ranked too: release never reads theirs)."""
        own = jnp.sum(state.ring, axis=2)  # [B, S]
        if self.pool == 1:
            return own
        pooled = pool_by_position(own, cache.slot_positions, cache.slot_valid, self.pool // 2)
        order = jnp.lexsort((own, pooled), axis=1)  # [B, S] ascending by pooled, then own
        ranks = jnp.broadcast_to(jnp.arange(own.shape[1], dtype=jnp.float32), own.shape)
        return jnp.zeros_like(own).at[jnp.arange(own.shape[0])[:, None], order].set(ranks)


def pool_by_position(scores, positions, valid, reach: int):
    """[B, S]: each valid slot's max of `scores` over the valid slots whose positions are within `reach` of its own
    (valid slots hold distinct positions: in position order they are at most `reach` places apart)."""
    if reach == 0:
        return scores
    order = jnp.argsort(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max), axis=1)  # [B, S] valid first
    by_position = [jnp.take_along_axis(x, order, axis=1) for x in (scores, positions, valid)]
    sorted_scores, sorted_positions, sorted_valid = by_position
    best = sorted_scores
    for offset in [o for o in range(-reach, reach + 1) if o]:
        near_scores, near_positions, near_valid = (shifted(x, offset) for x in by_position)
        near = sorted_valid & near_valid & (jnp.abs(near_positions - sorted_positions) <= reach)
        best = jnp.where(near, jnp.maximum(best, near_scores), best)
    return jnp.zeros_like(scores).at[jnp.arange(scores.shape[0])[:, None], order].set(best)


def shifted(x, offset: int):
    """x [B, S] with column i holding x[:, i + offset] (zeros / False past either end)."""
    pad = jnp.zeros((x.shape[0], abs(offset)), x.dtype)
    return jnp.concatenate([x[:, offset:], pad], axis=1) if offset > 0 else jnp.concatenate([pad, x[:, :offset]], 1)
