"""Recall: restore released tokens' first-pass K/V from a store of every token's K/V, for one step and layer.

Every token's K/V of every layer is kept when it is first computed (2 L G D numbers a token beside the cache:
the memory of a full cache). A decode step runs the current token alone; each layer from `from_layer` on ranks
the released tokens by its own query (max over heads of q . k / sqrt(D) against their stored keys) and attends
the R best with their stored K/V beside the cache, in R spare slots left invalid afterwards. Nothing recomputed,
nothing admitted: which tokens stay is the scorer's decision alone.

With `page_size` P > 0 the store also keeps, per page of P positions and layer, each key dim's max and min; a
layer ranks the pages by the bound they give on a key's logit (Quest, Tang et al. 2024) and then only the keys of
its `pages` best pages. With `in_prefill` each query of a prefill chunk recalls too: its own R best of the tokens
released before the chunk, every layer from `from_layer` on, ranking every stored key.
"""
import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from adore_jax.model import BlockInput, ExtraRows
from adore_jax.policies.base import free_slots, rows
from adore_jax.policies.key_logits import max_head_logits_by_group, max_head_logits_per_query, page_bounds
from adore_jax.policies.returns import ReturnPath, check_int, released_before

DEFAULT_PAGES = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVStore:
    keys: tuple  # L x [B, G, N, D] every token seen, at its position (RoPE'd), KV-head-major
    values: tuple  # L x [B, G, N, D]
    key_bounds: tuple  # L x [B, G, N / P, 2, D] with pages of P positions: each key dim's max, min; () without


@dataclasses.dataclass(frozen=True)
class Recall(ReturnPath):
    kind: ClassVar[str] = "recall"

    r: int = 8  # R, the stored tokens each layer recalls per query
    from_layer: int = 0  # the first layer that recalls (the layers below attend the cache alone)
    in_prefill: bool = False  # each query of a prefill chunk recalls too (else decode steps only)
    page_size: int = 0  # P > 0: rank pages of P stored keys by their bounds first (Quest); 0: rank every key
    pages: Optional[int] = None  # with page_size: the pages whose keys are ranked (default 16)

    def __post_init__(self):
        check_int(self.r, "r (recalled tokens per step)", 1)
        check_int(self.from_layer, "from_layer", 0)
        if not isinstance(self.in_prefill, bool):
            raise ValueError(f"in_prefill must be true or false; got {self.in_prefill!r}")
        check_int(self.page_size, "page_size (0: rank every stored key)", 0)
        if not self.page_size:
            if self.pages is not None:
                raise ValueError(f"pages applies with page_size > 0 (pages of stored keys); got pages={self.pages} "
                                 f"with page_size=0")
            return
        if self.pages is None:
            object.__setattr__(self, "pages", DEFAULT_PAGES)
        check_int(self.pages, "pages", max(1, -(-self.r // self.page_size)))

    @property
    def label(self) -> str:
        return (f"recall R={self.r}" + f" from {self.from_layer}" * bool(self.from_layer)
                + " in prefill" * self.in_prefill + f" pages {self.pages}x{self.page_size}" * bool(self.page_size))

    def check_run(self, max_length: int) -> None:
        if self.page_size and self.pages > -(-max_length // self.page_size):
            raise ValueError(f"pages must be <= {-(-max_length // self.page_size)} (the pages of {self.page_size} "
                             f"keys in {max_length} positions); got {self.pages}")

    def init_state(self, shape) -> KVStore:
        """Empty K/V of every layer for max_length positions (with pages, rounded up to whole pages, and each page's
        key bounds empty: max -inf, min +inf)."""
        model = shape.model
        if self.from_layer >= model.num_layers:
            raise ValueError(f"from_layer must be in [0, {model.num_layers}) for this model; got {self.from_layer}")
        size = self.page_size or 1
        n_pages = -(-shape.max_length // size)
        kv_shape = (shape.batch, model.num_kv_heads, n_pages * size, model.head_dim)
        layers = range(model.num_layers)
        keys = tuple(jnp.zeros(kv_shape, shape.kv_dtype) for _ in layers)
        values = tuple(jnp.zeros(kv_shape, shape.kv_dtype) for _ in layers)
        if not self.page_size:
            return KVStore(keys, values, ())
        empty = jnp.broadcast_to(jnp.array([-jnp.inf, jnp.inf], shape.kv_dtype)[:, None],
                                 (shape.batch, model.num_kv_heads, n_pages, 2, model.head_dim))
        return KVStore(keys, values, tuple(jnp.array(empty) for _ in layers))

    def position_limit(self, state) -> int:
        return state.keys[0].shape[2]

    def after_block(self, state, cache, block, last_row, hook_out):
        """Copy the block's K/V of every layer from its cache slots to its positions (with pages, widen the bounds
        of the pages they fall in)."""
        where = jnp.where(block.valid, block.positions, state.keys[0].shape[2])  # padding out of range: dropped
        r = rows(block.slots.shape[0])

        def block_rows(cached):  # [B, Q, G, D]: what stored[r, :, where] indexes (the advanced indices lead)
            return cached[r, block.slots].astype(state.keys[0].dtype)

        def store(stored, cached):
            return stored.at[r, :, where].set(block_rows(cached), mode="drop")

        def widen(bounds, cached):
            page = where // self.page_size
            return bounds.at[r, :, page, 0].max(block_rows(cached), mode="drop").at[r, :, page, 1].min(
                block_rows(cached), mode="drop")

        return KVStore(tuple(map(store, state.keys, cache.k)), tuple(map(store, state.values, cache.v)),
                       tuple(map(widen, state.key_bounds, cache.k)) if self.page_size else ())

    def prefill_hook(self, model, cache, state, start):
        if not self.in_prefill:
            return None
        recallable = released_before(cache, start, state.keys[0].shape[2])

        def hook(index, q, k, v):
            if index < self.from_layer:
                return None, None
            positions, found, k_rows, v_rows = self.rows_per_query(state, index, q, recallable)
            return ExtraRows(k_rows, v_rows, found), jnp.where(found, positions, -1)

        return hook

    def decode_step(self, steps, cache, state, current, position):
        """The current token alone in its free slot; each layer from from_layer on writes its R recalled rows into
        R spare slots for itself only."""
        batch = position.shape[0]
        spare = free_slots(cache.slot_valid, 1 + self.r)  # [B, 1 + R]
        block = BlockInput(current.tokens, current.positions, spare[:, :1], current.valid)
        store = state.returns
        recallable = released_before(cache, position, store.keys[0].shape[2])

        def hook(index, q, k, v):
            if index < self.from_layer:
                return None, None
            positions, found, k_rows, v_rows = self.rows(store, index, q[:, 0], recallable)
            return ExtraRows(k_rows, v_rows, found, positions, spare[:, 1:]), jnp.where(found, positions, -1)

        hidden, cache, state, layer_hidden, recalled = steps.run(cache, state, block, jnp.zeros((batch,), jnp.int32),
                                                                 hook)
        state = steps.observe(state, current, layer_hidden)
        cache = steps.release(cache, state, steps.scores(state, position, cache.slot_positions), position, 1)
        recalled = recalled[self.from_layer]  # [B, R]
        return hidden[:, -1], cache, steps.counted(state, recalled >= 0), recalled

    def rows(self, store, index, query, recallable):
        """Layer `index`'s recalled rows for query [B, H, D]: (positions [B, R] int32, found [B, R] bool,
        k, v [B, R, G, D])."""
        keys, values = store.keys[index], store.values[index]
        positions = None  # [B, C] the candidates' positions, when not all N
        if self.page_size:
            keys, values, recallable, positions = self.best_pages(store, index, query, recallable)
        logits = jnp.where(recallable, max_head_logits_by_group(query, keys), -jnp.inf)
        best, picked = jax.lax.top_k(logits, self.r)  # [B, R]
        k_rows, v_rows = (jnp.take_along_axis(x, picked[:, None, :, None], axis=2).swapaxes(1, 2)
                          for x in (keys, values))  # [B, R, G, D]
        if positions is not None:
            picked = jnp.take_along_axis(positions, picked, axis=1)
        return picked.astype(jnp.int32), best > -jnp.inf, k_rows, v_rows

    def rows_per_query(self, store, index, queries, recallable):
        """Layer `index`'s recalled rows for each query of a block, queries [B, Q, H, D], ranking every stored key:
        (positions [B, Q, R] int32, found [B, Q, R] bool, k, v [B, Q, R, G, D])."""
        keys, values = store.keys[index], store.values[index]  # [B, G, N, D]
        batch, n_queries = queries.shape[:2]
        logits = jnp.where(recallable[:, None], max_head_logits_per_query(queries, keys), -jnp.inf)
        best, picked = jax.lax.top_k(logits, self.r)  # [B, Q, R]
        flat = picked.reshape(batch, 1, -1, 1)
        k_rows, v_rows = (jnp.take_along_axis(x, flat, axis=2).reshape(batch, x.shape[1], n_queries, self.r, -1)
                          .transpose(0, 2, 3, 1, 4) for x in (keys, values))  # [B, Q, R, G, D]
        return picked.astype(jnp.int32), best > -jnp.inf, k_rows, v_rows

    def best_pages(self, store, index, query, recallable):
        """The `pages` pages with the highest bounds among those holding a recallable token: their keys, values
        [B, G, C, D], recallable [B, C] and positions [B, C] (C = pages * P)."""
        bounds = store.key_bounds[index]
        batch, groups, n_pages = bounds.shape[:3]
        size = self.page_size
        holds = jnp.any(recallable.reshape(batch, n_pages, size), axis=2)  # [B, N / P]
        _, pages = jax.lax.top_k(jnp.where(holds, page_bounds(query, bounds), -jnp.inf), self.pages)  # [B, K]

        def gather(x):  # [B, G, N, D] -> the chosen pages' rows [B, G, K * P, D]
            paged = x.reshape(batch, groups, n_pages, -1)
            return jnp.take_along_axis(paged, pages[:, None, :, None], axis=2).reshape(batch, groups, -1, x.shape[3])

        chosen = jnp.take_along_axis(recallable.reshape(batch, n_pages, size), pages[:, :, None], axis=1)
        positions = (pages[:, :, None] * size + jnp.arange(size)).reshape(batch, self.pages * size)
        return gather(store.keys[index]), gather(store.values[index]), chosen.reshape(batch, -1), positions
