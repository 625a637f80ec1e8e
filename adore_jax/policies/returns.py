"""Return paths: what comes back after a bounded policy released it. `NoReturn`: nothing.

A return path is a frozen dataclass beside the scorer (`BoundedPolicy.returns`). It checks its own fields when
built, owns its state pytree, and runs a decode step through the loop's tools (`adore_jax.decode.StepTools`):

    steps.place(cache, tokens, positions, valid)        a BlockInput in free slots (or at the positions, unbounded)
    steps.run(cache, state, block, last_row, hook)      the block through the model; the scorer and the return path
                                                        update their states -> (hidden, cache, state, layer_hidden,
                                                        each layer's hook output)
    steps.observe(state, block, layer_hidden)           the scorer sees the block's tokens
    steps.scores(state, position, positions=None)       the scorer's token scores [B, N] (or None)
    steps.release(cache, state, scores, position, E)    keep the m best (bounded policies)
    steps.counted(state, returned)                      count the tokens [B, R] that came back at this step
    steps.early                                         the scorer can see a token before its forward pass

A `hook(layer, q, k, v) -> (ExtraRows or None, aux)` handed to `steps.run` may give each layer extra K/V rows to
attend beside the slots (adore_jax.model.ExtraRows); each layer's aux comes back from `run`.
"""
import dataclasses
from typing import ClassVar, Optional

import jax.numpy as jnp


def check_int(value, name: str, low: int, high: Optional[int] = None, where: str = "") -> None:
    """Raise ValueError naming `name` unless value is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        suffix = f" for {where}" if where else ""
        raise ValueError(f"{name} must be an integer {allowed}{suffix}; got {value!r}")


def check_choice(value, name: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class ReturnPath:
    """The protocol (module doc), with the behaviour of `NoReturn`: a released token is gone for good."""
    kind: ClassVar[str]
    r: ClassVar[int] = 0  # R, the released tokens that come back per decode step

    @property
    def label(self) -> str:
        return ""

    def check_scorer(self, policy) -> None:
        """Refuse a scorer this path cannot work with (it lacks what the path reads)."""

    def check_budget(self, cache_size: int) -> None:
        """The checks that need the policy's m."""

    def check_run(self, max_length: int) -> None:
        """The checks that need the run's positions."""

    def init_state(self, shape):
        return None

    def position_limit(self, state) -> Optional[int]:
        return None

    def prefill_hook(self, model, cache, state, start):
        """The per-layer hook of a prefill chunk starting at position start [B], or None."""
        return None

    def after_block(self, state, cache, block, last_row, hook_out):
        """Keep what this path needs of a block once it is in the cache (last_row [B]: its last valid row)."""
        return state

    def decode_step(self, steps, cache, state, current, position):
        """The current token [B, 1] (current: a BlockInput without slots) at position [B] alone.

        Returns (hidden [B, E], cache, state, returned [B, R] int32 positions that came back, -1 where none)."""
        batch = position.shape[0]
        block = steps.place(cache, current.tokens, current.positions, current.valid)
        hidden, cache, state, layer_hidden, _ = steps.run(cache, state, block, jnp.zeros((batch,), jnp.int32))
        state = steps.observe(state, current, layer_hidden)
        cache = steps.release(cache, state, steps.scores(state, position, cache.slot_positions), position, 1)
        return hidden[:, -1], cache, state, jnp.zeros((batch, 0), jnp.int32)


@dataclasses.dataclass(frozen=True)
class NoReturn(ReturnPath):
    kind: ClassVar[str] = "none"


NO_RETURN = NoReturn()


def released_before(cache, position, n: int):
    """[B, N] bool: the tokens before position [B] that are not in the cache."""
    batch = cache.batch_size
    in_cache = jnp.zeros((batch, n), bool).at[jnp.arange(batch)[:, None], cache.slot_positions].max(cache.slot_valid)
    return (jnp.arange(n)[None, :] < position[:, None]) & ~in_cache
