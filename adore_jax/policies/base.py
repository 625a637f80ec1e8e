"""What every cache policy shares: the scorer protocol, the state container and the slot-table operations.

A cache policy is a frozen dataclass (hashable: it is part of the static plan the decode programs are
compiled for). A bounded policy is a *scorer* (what to keep: this module's `BoundedPolicy` subclasses) and a
*return path* (what comes back: `returns`, adore_jax.policies.returns). Each part checks its own fields when it
is built and owns its state pytree: `PolicyState` holds the two states side by side, never a union of fields.

For every block (a prefill chunk, or a decode step) `adore_jax.decode` runs the block through the model, then

    state = policy.update(state, block, mass, last_row)        mass [B, S]: the attention each slot got (needs_mass),
                                                               weighted over the block's queries by mass_weights
    state = policy.observe(state, ctx, block, layer_hidden)    a controller reads the block's tokens
    scores = policy.token_scores(state, ctx, query_position, positions)   [B, N] scores of the tokens seen, or None
    keep = policy.slot_scores(cache, state, scores)            [B, S], higher is kept; sink and recent tokens are
                                                               pinned, and the lowest released until m remain

`ctx` is what `policy.context(...)` returned once per compiled program (a controller's parameters, or None).
The return path decides how a decode step runs (`ReturnPath.decode_step`).
"""
import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp

from adore_jax.policies.returns import NO_RETURN, ReturnPath, check_int

PROTECTED = 1e9  # added to the score of pinned tokens (sinks, recent window)
UNBOUNDED_PREFILL_CHUNK = 256  # prompt tokens per prefill block when nothing is released (docs/perf.md)
BOUNDED_PREFILL_CHUNK = 128  # ... and when the cache is cut back to m after every block


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PolicyState:
    """The decode loop's policy state: each part's own pytree, and how often the return path brought tokens back."""
    scorer: Any  # the scorer's state (None when it keeps none)
    returns: Any  # the return path's state (None when it keeps none)
    return_steps: jax.Array  # [] int32 steps at which released tokens came back
    returned_tokens: jax.Array  # [B] int32 tokens brought back so far


@dataclasses.dataclass(frozen=True)
class StateShape:
    """What a part needs to size its state."""
    batch: int
    num_slots: int  # S, cache slots
    max_length: int  # N, positions the run holds
    model: Any  # ModelConfig
    controller: Any = None  # ControllerConfig, for a scorer that reads one
    kv_dtype: Any = jnp.float32  # the cache's dtype


def rows(batch: int):
    return jnp.arange(batch)[:, None]  # [B, 1] batch index for per-row scatters


def written_slots(block, num_slots: int):
    """[B, S] bool: the slots a block wrote, which hold new tokens (a per-slot statistic starts afresh there)."""
    batch = block.slots.shape[0]
    return jnp.zeros((batch, num_slots), bool).at[rows(batch), block.slots].set(True)


def cached_scores(cache, token_scores):
    """token_scores [B, N] of the tokens in the cache's slots: [B, S]."""
    return jnp.take_along_axis(token_scores, cache.slot_positions, axis=1)


def check_cache_size(value, name: str) -> None:
    if value is not None:
        check_int(value, "cache_size", 1, where=f"policy {name!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachePolicy:
    """The protocol (see the module doc) with the defaults of a policy that keeps every token."""
    name: ClassVar[str]
    bounded: ClassVar[bool] = False  # keeps at most cache_size tokens
    needs_mass: ClassVar[bool] = False  # slot attention must return each query's attention mass per slot
    needs_controller: ClassVar[bool] = False  # reads a trained controller (resolve_controller, context)
    scores_any_token: ClassVar[bool] = False  # token_scores ranks released tokens too (a rebuild may rank by it)

    cache_size: Optional[int] = None  # unbounded policies: cache slots (default: as many as the run needs)
    prefill_chunk: Optional[int] = None  # prompt tokens per prefill block (default 256; bounded 128)

    def __post_init__(self):
        check_cache_size(self.cache_size, self.name)
        if self.prefill_chunk is not None:
            check_int(self.prefill_chunk, "prefill_chunk", 1)

    @property
    def returns(self) -> ReturnPath:
        return NO_RETURN

    @property
    def label(self) -> str:
        """The row name in reports: the name, every option set away from its default but the cache size, and the
        return path's label."""
        parts = [self.name] + [f"{key}={value}" for key, value in self.changed_options().items()]
        return " ".join(parts + ([self.returns.label] if self.returns.r else []))

    def changed_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("cache_size", "returns") and getattr(self, f.name) != f.default}

    def at_cache_size(self, cache_size: int) -> "CachePolicy":
        """This policy at an evaluation's cache budget m (where it has not fixed its own)."""
        return self

    @property
    def block_rows(self) -> int:
        """Q, the rows of a decode block: the current token plus what the return path brings back."""
        return 1 + self.returns.r

    @property
    def chunk(self) -> int:
        default = BOUNDED_PREFILL_CHUNK if self.bounded else UNBOUNDED_PREFILL_CHUNK
        return default if self.prefill_chunk is None else self.prefill_chunk

    def validate(self, max_length: int) -> "CachePolicy":
        """Check the options against the run's positions; returns the policy with defaults filled."""
        return self

    def attention(self, impl: str):
        """Slot attention: (q, k, v, q_positions, slot_positions, slot_valid, [return_mass]) -> out [, mass]."""
        from functools import partial

        from pallas_kernels import slot_attention
        return partial(slot_attention, impl=impl)

    def init_state(self, shape: StateShape):
        """The scorer's own state pytree (None: it keeps none)."""
        return None

    def compact(self, state, take):
        """The state after the cache's slots were reordered: `take` maps a [B, S, ...] array to the kept order."""
        return state

    def position_limit(self, state) -> Optional[int]:
        """The first position the state cannot hold (None: unlimited)."""
        return None

    def resolve_controller(self, model, controller):
        """(ControllerConfig or None, params) for a policy that needs_controller."""
        raise NotImplementedError

    def context(self, controller, controller_params, embed, state):
        """What the methods need beyond the state, once per compiled program (a controller's params)."""
        return None

    def reads_hidden_after(self, config) -> Optional[int]:
        """The layer count after which the scorer reads each token's hidden state (observe's layer_hidden), or None;
        config: what it reads (DecodePlan.scorer_config)."""
        return None

    def observes_before_forward(self, config) -> bool:
        """Whether the scorer can see a token before the token's forward pass (it reads no hidden state)."""
        return self.reads_hidden_after(config) is None

    def observe(self, state, ctx, block, layer_hidden=None):
        """See a block's tokens (layer_hidden [B, Q, E]: their hidden states, for a controller with input_layer)."""
        return state

    def token_scores(self, state, ctx, query_position, positions=None):
        """[B, N] scores of the tokens seen for the query at query_position [B], or None; positions [B, K]: only
        these are needed (the others may be left -inf)."""
        return None

    def mass_weights(self, block, last_row):
        """[B, Q] float32: how much each of the block's queries counts in the mass `update` sees (needs_mass):
        the last valid row's alone (TOVA's statistic)."""
        return jax.nn.one_hot(last_row, block.tokens.shape[1], dtype=jnp.float32)

    def update(self, state, block, mass, last_row):
        return state

    def slot_scores(self, cache, state, token_scores):
        raise NotImplementedError(f"policy {self.name!r} keeps every token: it has no slot scores")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoundedPolicy(CachePolicy):
    """A scorer that keeps at most m = cache_size tokens, with optional pinned sink and recent tokens, and the
    return path that may bring released ones back."""
    bounded: ClassVar[bool] = True

    sinks: int = 0  # first tokens always kept
    recent: int = 0  # most recent tokens always kept
    returns: ReturnPath = NO_RETURN  # what comes back after release: NoReturn, Rebuild or Recall

    def __post_init__(self):
        super().__post_init__()
        check_int(self.sinks, "sinks", 0)
        check_int(self.recent, "recent", 0)
        if not isinstance(self.returns, ReturnPath):
            raise ValueError(f"returns must be a return path (NoReturn(), Rebuild(...), Recall(...)); got "
                             f"{self.returns!r}")
        self.returns.check_scorer(self)
        if self.cache_size is not None:
            self.check_budget(self.cache_size)

    def check_budget(self, m: int) -> None:
        """The checks that need m (at construction when it is given, else when the run fills it in)."""
        if self.sinks + self.recent > m:
            raise ValueError(f"sinks + recent ({self.sinks} + {self.recent}) must be <= cache_size ({m})")
        self.returns.check_budget(m)

    def validate(self, max_length: int) -> "BoundedPolicy":
        m = self.cache_size
        if m is None:
            raise ValueError(f"cache_size (m) must be set (>= 1) for policy {self.name!r}")
        if m > max_length:
            raise ValueError(f"cache_size ({m}) must be <= max_length ({max_length})")
        self.returns.check_run(max_length)
        return self.with_defaults()

    def with_defaults(self) -> "BoundedPolicy":
        return self

    def with_returns(self, **changes) -> "BoundedPolicy":
        """This policy with fields of its return path changed."""
        return dataclasses.replace(self, returns=dataclasses.replace(self.returns, **changes))

    def at_cache_size(self, cache_size: int) -> "BoundedPolicy":
        return self if self.cache_size is not None else dataclasses.replace(self, cache_size=cache_size)

    def pinned(self, slot_positions, current_position):
        """[B, S] bool: sink tokens and the `recent` tokens up to current_position [B]."""
        pinned = slot_positions < self.sinks
        return pinned | (slot_positions > current_position[:, None] - self.recent)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MassScorer(BoundedPolicy):
    """A scorer whose statistic is the attention mass per slot (H2O, TOVA)."""
    needs_mass: ClassVar[bool] = True

    def init_state(self, shape: StateShape):
        return jnp.zeros((shape.batch, shape.num_slots), jnp.float32)  # [B, S] the statistic per slot

    def compact(self, state, take):
        return take(state)

    def slot_scores(self, cache, state, token_scores):
        return state


def evict_to_capacity(slot_valid, scores, capacity: int, max_evictions: int):
    """Release the lowest-scoring valid slots until at most `capacity` remain.

    slot_valid [B, S] bool; scores [B, S]. At most `max_evictions` per row (static).
    Returns the new slot_valid [B, S].
    """
    excess = jnp.maximum(jnp.sum(slot_valid, axis=1) - capacity, 0)  # [B]
    _, lowest = jax.lax.top_k(jnp.where(slot_valid, -scores, -jnp.inf), max_evictions)  # [B, E]
    evict = jnp.arange(max_evictions)[None, :] < excess[:, None]
    return slot_valid.at[rows(slot_valid.shape[0]), lowest].min(~evict)


def free_slots(slot_valid, count: int):
    """The `count` lowest-index invalid slots per row: [B, S] -> [B, count] int32.

    A bounded cache has m + Q physical slots and at most m are valid between blocks, so they exist.
    """
    num_slots = slot_valid.shape[1]
    priority = jnp.where(slot_valid, -1, num_slots - jnp.arange(num_slots))
    return jax.lax.top_k(priority, count)[1].astype(jnp.int32)


def release(policy: BoundedPolicy, cache, scorer_state, token_scores, current_position, max_evictions: int):
    """Keep the m best valid slots (pinned ones first); returns the cache with the rest released."""
    scores = policy.slot_scores(cache, scorer_state, token_scores)
    scores = scores + PROTECTED * policy.pinned(cache.slot_positions, current_position)
    valid = evict_to_capacity(cache.slot_valid, scores, policy.cache_size, max_evictions)
    return dataclasses.replace(cache, slot_valid=valid)
