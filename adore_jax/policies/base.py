"""What every cache policy shares: the protocol, the policy state and the slot-table operations.

A cache policy is one frozen dataclass: hashable, because it is part of the static plan the decode
programs are compiled for. Its methods are the only place its rule lives. For every block (a
prefill chunk, or a decode step of the current token plus R rebuilt ones), `adore_jax.decode` calls

    picked, wanted = policy.rebuild_choice(cache, ps, scores, position)   decode steps with rebuild > 0 only,
                                                                   from scores taken before the block
    ... the block runs through the model with policy.attention(impl) ...
    ps = policy.update_state(ps, block, mass, last_row, tapped)    after the block (h2o, tova: attention mass
                                                                   [B, S], each layer's weighted over the block's
                                                                   queries by policy.mass_weights(block, last_row);
                                                                   adore: layer tap_layer's queries and keys)
    ps = policy.store_kv(ps, cache, block)                         adore, rebuild_from "stored": every layer's K/V
    ps = policy.observe(ps, ctx, tokens, positions, valid, layer_hidden)   adore: the controller reads the
                                                                   block's tokens (or their hidden states)
    scores = policy.token_scores(ps, ctx, query_position, needed)  [B, N] scores of the tokens seen (those in
                                                                   needed [B, K] when given), or None
    keep = policy.slot_scores(cache, ps, scores)                   [B, S], higher is kept; then sink and recent
                                                                   tokens are pinned and the lowest released
                                                                   until m remain (bounded policies)

`ctx` is what `policy.context(controller_config, controller_params, embed, ps)` returned once per
compiled program (None unless the policy reads a controller).
A policy with `rebuild` > 0 also provides `rebuild_choice`, `admitted` (which rebuilt tokens may stay)
and the `adaptive_rebuild` / `rebuild_into_cache` options, and one with `needs_controller` provides
`resolve_controller(model, controller)`; `Adore` (adore.py) is the one that does.
"""
import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

CACHE_UPDATES = ("scatter", "onehot")
PROTECTED = 1e9  # added to the score of pinned tokens (sinks, recent window)
UNBOUNDED_PREFILL_CHUNK = 256  # prompt tokens per prefill block when nothing is released (2048-token prompt at
# batch 1 on XLA:CPU: 6.6 s against 8.0 s with 512, the [B, G, r*Q, blk] logits of a block stay in cache)
BOUNDED_PREFILL_CHUNK = 128  # ... and when the cache is cut back to m after every block


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PolicyState:
    """The decode loop's per-sequence policy state; a policy leaves the parts it does not use empty."""
    token_ids: jax.Array  # [B, N] int32 release buffer: every token seen, at its position (adore)
    features: jax.Array  # [B, N, h] float32 controller features of every token seen (adore)
    controller_state: jax.Array  # [B, c] float32 GRU state after the last token (adore)
    mass: jax.Array  # [B, S] float32 attention statistic per slot (h2o, tova)
    retrieval_keys: jax.Array  # [B, N, G, D] float32 one layer's RoPE'd key of every token seen (adore, rebuild_by
    # attention)
    retrieval_query: jax.Array  # [B, H, D] float32 ... and its query of the latest token
    retrieval_next: jax.Array  # [B, 1] int32 the first position whose key is not yet stored
    stored_k: tuple  # L x [B, G, N, D] every layer's K of every token seen, at its position, KV-head-major (adore,
    # rebuild_from "stored"); empty otherwise
    stored_v: tuple  # L x [B, G, N, D] ... and its V
    stored_key_bounds: tuple  # L x [B, G, N / P, 2, D] ... with recall_page_size P: each page's max, min of every
    # key dim (the store's N is then a multiple of P)
    rebuild_steps: jax.Array  # [] int32 steps at which the rebuild block ran
    rebuilt_tokens: jax.Array  # [B] int32 tokens rebuilt so far


def rows(batch: int):
    return jnp.arange(batch)[:, None]  # [B, 1] batch index for per-row scatters


def written_slots(block, num_slots: int):
    """[B, S] bool: the slots a block wrote, which hold new tokens (a per-slot statistic starts afresh there)."""
    batch = block.slots.shape[0]
    return jnp.zeros((batch, num_slots), bool).at[rows(batch), block.slots].set(True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachePolicy:
    """The protocol (see the module doc) with the defaults of a policy that keeps every token."""
    name: ClassVar[str]
    bounded: ClassVar[bool] = False  # keeps at most cache_size tokens
    needs_mass: ClassVar[bool] = False  # slot attention must return each query's attention mass per slot
    needs_controller: ClassVar[bool] = False  # reads a trained controller (adore)
    rebuild: ClassVar[int] = 0  # R, released tokens rebuilt per decode step (a field where a policy has it)
    recalls_stored: ClassVar[bool] = False  # rebuilds from K/V kept beside the cache (adore, rebuild_from "stored")
    prefill_recall: ClassVar[bool] = False  # ... and prefill chunks recall from them too (a field where a policy has it)

    cache_size: Optional[int] = None  # unbounded policies: cache slots (default: as many as the run needs)
    prefill_chunk: Optional[int] = None  # prompt tokens per prefill block (default 256; bounded 128)
    cache_update: str = "scatter"  # how block K/V enter the cache: "scatter" (index) or "onehot" (matmul)

    @property
    def label(self) -> str:
        """The row name in reports: the name and every option set away from its default but the cache size."""
        return " ".join([self.name] + [f"{key}={value}" for key, value in self.changed_options().items()])

    def changed_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "cache_size" and getattr(self, f.name) != f.default}

    def at_cache_size(self, cache_size: int) -> "CachePolicy":
        """This policy at an evaluation's cache budget m (where it has not fixed its own)."""
        return self

    @property
    def block_rows(self) -> int:
        """Q, the rows of a decode block: the current token plus the rebuilt ones."""
        return 1 + self.rebuild

    @property
    def chunk(self) -> int:
        default = BOUNDED_PREFILL_CHUNK if self.bounded else UNBOUNDED_PREFILL_CHUNK
        return default if self.prefill_chunk is None else self.prefill_chunk

    def validate(self, max_length: int) -> "CachePolicy":
        """Check the options against the release buffer length; returns the policy with defaults filled."""
        if self.cache_update not in CACHE_UPDATES:
            raise ValueError(f"cache_update must be one of {CACHE_UPDATES}; got {self.cache_update!r}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1; got {self.prefill_chunk}")
        self.check(max_length)
        return self.with_defaults()

    def check(self, max_length: int) -> None:
        """The policy's own option checks (raise ValueError naming the option and its allowed range)."""
        if self.cache_size is not None and self.cache_size < 1:
            raise ValueError(f"cache_size (slots) must be >= 1 for policy {self.name!r}; got {self.cache_size}")

    def with_defaults(self) -> "CachePolicy":
        return self

    def attention(self, impl: str):
        """Slot attention: (q, k, v, q_positions, slot_positions, slot_valid, [return_mass]) -> out [, mass]."""
        from functools import partial

        from pallas_kernels import slot_attention
        return partial(slot_attention, impl=impl)

    def init_state(self, batch: int, num_slots: int, max_length: int, controller=None, model=None,
                   kv_dtype=jnp.float32) -> PolicyState:
        return PolicyState(
            token_ids=jnp.zeros((batch, 0), jnp.int32), features=jnp.zeros((batch, 0, 0), jnp.float32),
            controller_state=jnp.zeros((batch, 0), jnp.float32),
            mass=jnp.zeros((batch, num_slots if self.needs_mass else 0), jnp.float32),
            retrieval_keys=jnp.zeros((batch, 0, 0, 0), jnp.float32),
            retrieval_query=jnp.zeros((batch, 0, 0), jnp.float32), retrieval_next=jnp.zeros((batch, 0), jnp.int32),
            stored_k=(), stored_v=(), stored_key_bounds=(),
            rebuild_steps=jnp.zeros((), jnp.int32), rebuilt_tokens=jnp.zeros((batch,), jnp.int32))

    def context(self, controller, controller_params, embed, ps: PolicyState):
        """What the policy's methods need beyond the state, once per compiled program (adore: the controller)."""
        return None

    def observe(self, ps: PolicyState, ctx, tokens, positions, valid, layer_hidden=None) -> PolicyState:
        """See a block's tokens [B, T] (layer_hidden [B, T, E]: their hidden states, for a controller with
        input_layer). A rebuild step scores (and observes, when it can) before its block: see decode.py."""
        return ps

    def token_scores(self, ps: PolicyState, ctx, query_position, positions=None):
        """[B, N] scores of the tokens seen for the query at query_position [B], or None; positions [B, K]: only
        these are needed (the others may be left -inf)."""
        return None

    def tap_layer(self, model) -> Optional[int]:
        """The layer whose queries and keys update_state sees (`tapped`), or None."""
        return None

    def mass_weights(self, block, last_row):
        """[B, Q] float32: how much each of the block's queries counts in the mass update_state sees (needs_mass):
        the last valid row's alone (TOVA's statistic)."""
        return jax.nn.one_hot(last_row, block.tokens.shape[1], dtype=jnp.float32)

    def update_state(self, ps: PolicyState, block, mass, last_row, tapped=None) -> PolicyState:
        return ps

    def store_kv(self, ps: PolicyState, cache, block) -> PolicyState:
        """Keep what a policy needs of a block's K/V once the block is in the cache (adore with rebuild_from
        "stored": all of it)."""
        return ps

    def slot_scores(self, cache, ps: PolicyState, token_scores):
        raise NotImplementedError(f"policy {self.name!r} keeps every token: it has no slot scores")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoundedPolicy(CachePolicy):
    """A policy that keeps at most m = cache_size tokens, with optional pinned sink and recent tokens."""
    bounded: ClassVar[bool] = True

    sinks: int = 0  # first tokens always kept
    recent: int = 0  # most recent tokens always kept

    def check(self, max_length: int) -> None:
        m = self.cache_size
        if m is None or isinstance(m, bool) or m < 1:
            raise ValueError(f"cache_size (m) must be >= 1 for policy {self.name!r}; got {m}")
        if m > max_length:
            raise ValueError(f"cache_size ({m}) must be <= max_length ({max_length})")
        if not (0 <= self.sinks <= m and 0 <= self.recent <= m):
            raise ValueError(f"sinks and recent must be in [0, cache_size={m}]; got sinks={self.sinks}, "
                             f"recent={self.recent}")

    def validate(self, max_length: int) -> "BoundedPolicy":
        filled = super().validate(max_length)
        if filled.sinks + filled.recent > filled.cache_size:
            raise ValueError(f"sinks + recent ({filled.sinks} + {filled.recent}) must be <= cache_size "
                             f"({filled.cache_size})")
        return filled

    def at_cache_size(self, cache_size: int) -> "BoundedPolicy":
        return self if self.cache_size is not None else dataclasses.replace(self, cache_size=cache_size)

    def pinned(self, slot_positions, current_position):
        """[B, S] bool: sink tokens and the `recent` tokens up to current_position [B]."""
        pinned = slot_positions < self.sinks
        return pinned | (slot_positions > current_position[:, None] - self.recent)


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


def release(policy: BoundedPolicy, cache, ps: PolicyState, token_scores, current_position, max_evictions: int):
    """Keep the m best valid slots (pinned ones first); returns the cache with the rest released."""
    scores = policy.slot_scores(cache, ps, token_scores)
    scores = scores + PROTECTED * policy.pinned(cache.slot_positions, current_position)
    valid = evict_to_capacity(cache.slot_valid, scores, policy.cache_size, max_evictions)
    return dataclasses.replace(cache, slot_valid=valid)
