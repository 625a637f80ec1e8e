"""ADORE (Zhang et al., 2024; ADORE.md): a learned controller scores every token seen; the cache keeps
the m best, and each decode step rebuilds the R best released tokens (with `adaptive_rebuild`, only those
that outscore the weakest cached token by more than `rebuild_margin`; the block runs only when one does).

Per block: the controller advances over the block's tokens and writes their features into the
release buffer (`observe`, after the block's forward pass: with `input_layer` it reads the hidden
states that pass computed), then scores every buffered token for the current query
(`token_scores`; without rebuild only the cached tokens, the block's among them, since nothing released
comes back). A decode step picks the R released tokens with the best scores (`rebuild_choice`, scored
before the step's pass) and runs them with the current token as one block at their original positions. Afterwards the
cache keeps the m best of cache ∪ current token ∪ the admitted rebuilt tokens (`admitted`): all of
them by default (ADORE.md 4), none with `rebuild_into_cache=False` (the rebuilt rows serve their
step only), or conservatively: those whose score beats the weakest cached token's by
`admission_margin`, at most `max_admissions` per step. Rebuilt rows not admitted are freed.

With `rebuild_by="attention"` the rebuild candidates are ranked instead by the model's own attention
logits at one layer (`retrieval_layer`, default two thirds of the way up, where SmolLM2's copying heads
find a pass key's next digit: scripts/passkey_ranking.py): every token's RoPE'd key of that layer
is kept when the token is first seen (G x D floats, against 2 L G D for its K/V), and the latest
token's queries score every released token, max over heads of q . k / sqrt(D). The controller still
decides release; the model's attention decides what comes back, so a token that nothing predicted
(a pass key) can return when a query asks for it. The query is the previous token's (a decode step
picks its rebuild block before its own forward).

With `rebuild_from="stored"` (and rebuild_by="attention", transient) nothing is recomputed: every token's K/V of
every layer is kept when it is first computed (2 L G D floats per token beside the cache: the memory a full
cache needs, for host memory on an accelerator), and the current token runs alone. Each layer from
`retrieval_layer` on ranks the released tokens by its own query (max over heads of q . k / sqrt(D) against their
stored keys) and attends the R best with their first-pass K/V beside the cache, for that layer and step only
(model.Recall). It answers what the probes of the recomputing rebuild found (README, Retrieval): for copying a
pass key, recomputed K/V and the previous token's query both fall short. With `recall_page_size` P > 0 the store
also keeps, per page of P positions and layer, each key dim's max and min; a layer then ranks the pages by the
bound they give on a key's logit (Quest, Tang et al. 2024) and only the keys of its `recall_pages` best pages, so a
step reads about N / P * 2 + recall_pages * P keys per layer instead of N. With `prefill_recall` each query of a
prefill chunk recalls too: its own R best of the tokens released before the chunk, every layer from
`retrieval_layer` on (model.attend_recalled), so a prompt's later tokens see what its earlier chunks released;
with `prefill_recall_last` = N only each prompt's last N tokens do (the question), and the tokens before it keep
the K/V a chunk computes from the cache alone (README, "Why recalling in prefill costs perplexity on the gap
documents").

With `attention_weight` beta > 0 (default 0.5) a cached token's score adds beta * log(attention mass the block's
last query gave it) (TOVA's statistic, summed over layers and heads; beyond the paper): the
controller predicts what the text will need, the attention says what the model uses now. Rebuild
candidates have no current attention and are ranked by the controller alone. With `attention_decay`
gamma > 0 the statistic is a decaying maximum instead: after each block, a slot keeps
max(latest mass, gamma * its previous statistic), so a token the model attended a few steps ago is not
released because the latest query happened to ignore it (a token newly written to a slot starts afresh).
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from adore_jax import controller as ctrl
from adore_jax.model import Recall, max_head_logits
from adore_jax.policies.base import BoundedPolicy, PolicyState, rows, written_slots

MASS_FLOOR = 1e-6  # log(mass + floor): a slot the query ignored gets a finite score
REBUILD_SCORERS = ("controller", "attention")
REBUILD_SOURCES = ("recompute", "stored")


def cached_scores(cache, token_scores):
    """The controller's scores [B, N] of the tokens in the cache's slots: [B, S] (what rebuild candidates,
    which have no current attention, are compared with)."""
    return jnp.take_along_axis(token_scores, cache.slot_positions, axis=1)


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

    sinks: int = 4  # first tokens always kept: position 0 is an attention sink every query needs, which a
    # controller ranking by distance would release for good (README, the gap decomposition); 0: none
    rebuild: int = 0  # R, released tokens rebuilt per decode step
    adaptive_rebuild: bool = False  # run the rebuild block only when a released token outranks a cached one
    rebuild_margin: float = 0.0  # adaptive: ... outscores the weakest cached token by more than this (fewer blocks)
    rebuild_into_cache: bool = True  # rebuilt tokens compete for the m slots (ADORE.md 4); False: one step only
    admission_margin: Optional[float] = None  # a rebuilt token stays only if it outscores the weakest cached by this
    max_admissions: Optional[int] = None  # at most this many rebuilt tokens stay per step (the best scored)
    attention_weight: float = 0.5  # beta: a cached token's score adds beta * log(its latest attention mass); 0.5
    # was chosen on held-out documents (README, "The attention term"); 0 turns it off
    attention_decay: float = 0.0  # gamma in [0, 1): the attention term reads max(latest mass, gamma * previous
    # statistic) per block instead of the latest mass alone (0: the latest, TOVA's statistic)
    rebuild_max_distance: Optional[int] = None  # only released tokens at most this far back may be rebuilt
    rebuild_by: str = "controller"  # rank rebuild candidates by the controller, or by "attention": the model's
    # attention logits at retrieval_layer for the latest query
    retrieval_layer: Optional[int] = None  # rebuild_by="attention": the layer (default: 2 * num_layers // 3); with
    # rebuild_from="stored", the first layer that recalls
    rebuild_from: str = "recompute"  # the rebuilt tokens run through the model again with the current one
    # (ADORE.md 4), or "stored": their first-pass K/V of every layer are kept and restored as they were (see above)
    recall_page_size: int = 0  # rebuild_from="stored": P > 0 ranks pages of P stored keys by a bound first and then
    # only the keys of the best recall_pages pages (model.Recall); 0 ranks every stored key
    recall_pages: int = 16  # with recall_page_size: the pages whose keys are ranked
    prefill_recall: bool = False  # rebuild_from="stored": each query of a prefill chunk also attends the R tokens
    # released before the chunk that its own query ranks best, every layer from retrieval_layer on (ranking every
    # stored key, pages or not); False: a chunk attends the cache alone and only decode steps recall
    prefill_recall_last: Optional[int] = None  # with prefill_recall: only each prompt's last N tokens recall (the
    # question; the prompt's last token, a decode step, among them); None: every token of every chunk

    @property
    def needs_mass(self) -> bool:
        return self.attention_weight != 0

    @property
    def label(self) -> str:
        """E.g. "adore R=8 adaptive transient" (+ any other option set away from its default)."""
        others = {k: v for k, v in self.changed_options().items()
                  if k not in ("rebuild", "adaptive_rebuild", "rebuild_into_cache")}
        return " ".join([f"adore R={self.rebuild}"] + ["adaptive"] * self.adaptive_rebuild
                        + ["transient"] * (not self.rebuild_into_cache) + [f"{k}={v}" for k, v in others.items()])

    def check(self, max_length: int) -> None:
        super().check(max_length)
        if isinstance(self.rebuild, bool) or self.rebuild < 0:
            raise ValueError(f"rebuild (R) must be >= 0; got {self.rebuild}")
        if self.rebuild >= self.cache_size:
            raise ValueError(f"rebuild (R={self.rebuild}) must be < cache_size (m={self.cache_size})")
        if not self.rebuild and (self.adaptive_rebuild or not self.rebuild_into_cache):
            option = "adaptive_rebuild=True" if self.adaptive_rebuild else "rebuild_into_cache=False"
            raise ValueError(f"{option} needs rebuild (R) >= 1; got R={self.rebuild}")
        conservative = self.admission_margin is not None or self.max_admissions is not None
        if conservative and not (self.rebuild and self.rebuild_into_cache):
            raise ValueError("admission_margin and max_admissions apply to rebuilt tokens entering the cache: they "
                             f"need rebuild (R) >= 1 and rebuild_into_cache=True; got R={self.rebuild}, "
                             f"rebuild_into_cache={self.rebuild_into_cache}")
        if self.max_admissions is not None and not 0 <= self.max_admissions <= self.rebuild:
            raise ValueError(f"max_admissions must be in [0, rebuild={self.rebuild}]; got {self.max_admissions}")
        if self.rebuild_max_distance is not None and (not self.rebuild or self.rebuild_max_distance < 1):
            raise ValueError(f"rebuild_max_distance must be >= 1 and needs rebuild (R) >= 1; got "
                             f"{self.rebuild_max_distance} with R={self.rebuild}")
        if not self.attention_weight >= 0:
            raise ValueError(f"attention_weight must be >= 0; got {self.attention_weight}")
        if not 0 <= self.attention_decay < 1 or (self.attention_decay and not self.attention_weight):
            raise ValueError(f"attention_decay must be in [0, 1) and needs attention_weight > 0; got "
                             f"attention_decay={self.attention_decay} with attention_weight={self.attention_weight}")
        if not self.rebuild_margin >= 0:
            raise ValueError(f"rebuild_margin must be >= 0; got {self.rebuild_margin}")
        if self.rebuild_margin and not self.adaptive_rebuild:
            raise ValueError(f"rebuild_margin applies to adaptive_rebuild=True (the block runs only for released "
                             f"tokens that clear it); got rebuild_margin={self.rebuild_margin} with "
                             f"adaptive_rebuild=False")
        if self.rebuild_by not in REBUILD_SCORERS:
            raise ValueError(f"rebuild_by must be one of {REBUILD_SCORERS}; got {self.rebuild_by!r}")
        if self.rebuild_by == "attention" and (not self.rebuild or self.adaptive_rebuild):
            raise ValueError(f"rebuild_by='attention' needs rebuild (R) >= 1 and adaptive_rebuild=False (its scores "
                             f"are not comparable with the cached tokens'); got R={self.rebuild}, "
                             f"adaptive_rebuild={self.adaptive_rebuild}")
        if self.retrieval_layer is not None and (self.rebuild_by != "attention" or self.retrieval_layer < 0):
            raise ValueError(f"retrieval_layer must be >= 0 and needs rebuild_by='attention'; got "
                             f"{self.retrieval_layer} with rebuild_by={self.rebuild_by!r}")
        if self.admission_margin is not None and not self.admission_margin >= 0:
            raise ValueError(f"admission_margin must be >= 0; got {self.admission_margin}")
        if self.rebuild_from not in REBUILD_SOURCES:
            raise ValueError(f"rebuild_from must be one of {REBUILD_SOURCES}; got {self.rebuild_from!r}")
        if self.rebuild_from == "stored" and (self.rebuild_by != "attention" or self.rebuild_into_cache):
            raise ValueError(f"rebuild_from='stored' needs rebuild_by='attention' and rebuild_into_cache=False (each "
                             f"layer recalls its own tokens, which the shared slot table cannot keep); got "
                             f"rebuild_by={self.rebuild_by!r}, rebuild_into_cache={self.rebuild_into_cache}")
        if self.prefill_recall and not self.recalls_stored:
            raise ValueError(f"prefill_recall needs rebuild_from='stored'; got rebuild_from={self.rebuild_from!r}")
        last = self.prefill_recall_last
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1
                                 or not self.prefill_recall):
            raise ValueError(f"prefill_recall_last must be None (every prompt token recalls) or an int >= 1 and needs "
                             f"prefill_recall=True; got {last!r} with prefill_recall={self.prefill_recall}")
        self.check_recall_pages(max_length)

    def check_recall_pages(self, max_length: int) -> None:
        size, pages = self.recall_page_size, self.recall_pages
        if isinstance(size, bool) or size < 0 or (size and not self.recalls_stored):
            raise ValueError(f"recall_page_size must be >= 0 (0: rank every stored key) and needs "
                             f"rebuild_from='stored'; got {size} with rebuild_from={self.rebuild_from!r}")
        if not size:
            if "recall_pages" in self.changed_options():
                raise ValueError(f"recall_pages applies with recall_page_size > 0; got recall_pages={pages} with "
                                 f"recall_page_size=0")
            return
        n_pages, fewest = -(-max_length // size), max(1, -(-self.rebuild // size))
        if not fewest <= pages <= n_pages:
            raise ValueError(f"recall_pages must be in [{fewest}, {n_pages}] (enough "
                             f"pages of {size} keys for R={self.rebuild}, at most the {n_pages} pages of "
                             f"{max_length} positions); got {pages}")

    def resolve_controller(self, model, controller):
        """(ControllerConfig, params) from a saved controller's path, a (config, params) pair, or the model's default."""
        from adore_jax.session import resolve_controller
        return resolve_controller(model, controller)

    @property
    def recalls_stored(self) -> bool:
        return self.rebuild_from == "stored"

    def ranking_layer(self, model) -> Optional[int]:
        """rebuild_by="attention": the layer that ranks (with rebuild_from="stored": the first that recalls)."""
        if self.rebuild_by != "attention":
            return None
        layer = 2 * model.num_layers // 3 if self.retrieval_layer is None else self.retrieval_layer
        if layer >= model.num_layers:
            raise ValueError(f"retrieval_layer must be in [0, {model.num_layers}) for this model; got {layer}")
        return layer

    def tap_layer(self, model) -> Optional[int]:
        return None if self.recalls_stored else self.ranking_layer(model)

    def init_state(self, batch, num_slots, max_length, controller=None, model=None,
                   kv_dtype=jnp.float32) -> PolicyState:
        if controller is None:
            raise ValueError("policy 'adore' needs a controller config")
        state = dataclasses.replace(
            super().init_state(batch, num_slots, max_length),
            token_ids=jnp.zeros((batch, max_length), jnp.int32),
            features=jnp.zeros((batch, max_length, controller.feature_width), jnp.float32),
            controller_state=jnp.zeros((batch, controller.width), jnp.float32))
        if self.rebuild_by != "attention":
            return state
        if model is None:
            raise ValueError("rebuild_by='attention' needs the model config (its heads and head width)")
        if self.recalls_stored:
            return self.init_store(state, batch, max_length, model, kv_dtype)
        return dataclasses.replace(
            state, retrieval_keys=jnp.zeros((batch, max_length, model.num_kv_heads, model.head_dim), jnp.float32),
            retrieval_query=jnp.zeros((batch, model.num_heads, model.head_dim), jnp.float32),
            retrieval_next=jnp.zeros((batch, 1), jnp.int32))

    def init_store(self, state, batch, max_length, model, kv_dtype):
        """rebuild_from="stored": empty K/V of every layer for max_length positions (with recall_page_size P, rounded
        up to whole pages, each page's key bounds empty: max -inf, min +inf)."""
        size = self.recall_page_size or 1
        n_pages = -(-max_length // size)
        shape = (batch, model.num_kv_heads, n_pages * size, model.head_dim)  # KV-head-major (model.Recall)
        layers = range(model.num_layers)
        state = dataclasses.replace(state, stored_k=tuple(jnp.zeros(shape, kv_dtype) for _ in layers),
                                    stored_v=tuple(jnp.zeros(shape, kv_dtype) for _ in layers))
        if not self.recall_page_size:
            return state
        empty = jnp.broadcast_to(jnp.array([-jnp.inf, jnp.inf], kv_dtype)[:, None],
                                 (batch, model.num_kv_heads, n_pages, 2, model.head_dim))
        return dataclasses.replace(state, stored_key_bounds=tuple(jnp.array(empty) for _ in layers))

    def context(self, controller, controller_params, embed, ps: PolicyState) -> ControllerContext:
        table = None
        if controller.score_form == "query_aware":
            table = ctrl.distance_table(controller, controller_params, ps.token_ids.shape[1])
        return ControllerContext(controller, controller_params, embed, table)

    def observe(self, ps, ctx: ControllerContext, tokens, positions, valid, layer_hidden=None):
        """Feed a block of tokens [B, T] (at positions, where valid) to the controller and the buffer: their input
        embeddings, or their hidden states layer_hidden [B, T, E] when the controller has an input_layer."""
        if (ctx.config.input_layer is None) != (layer_hidden is None):
            raise ValueError(f"controller input_layer={ctx.config.input_layer} needs the block's hidden states "
                             f"exactly when it is set; got layer_hidden={layer_hidden is not None}")
        inputs = ctx.embed[tokens] if layer_hidden is None else layer_hidden  # [B, T, E]
        _, features, state = ctrl.encode_sequence(ctx.config, ctx.params, inputs, valid,
                                                  ps.controller_state, positions)
        where = jnp.where(valid, positions, ps.token_ids.shape[1])  # padding goes out of range: dropped
        r = rows(tokens.shape[0])
        return dataclasses.replace(ps, controller_state=state,
                                   token_ids=ps.token_ids.at[r, where].set(tokens, mode="drop"),
                                   features=ps.features.at[r, where].set(features, mode="drop"))

    def token_scores(self, ps, ctx: ControllerContext, query_position, positions=None):
        """Score logits of the buffered tokens for the query at query_position [B]: [B, N]; unseen -inf.

        positions [B, K]: score only these (the cache's slots and the block's tokens when nothing released can
        come back), the rest stays -inf: O(K) work per step instead of O(N)."""
        n = ps.token_ids.shape[1]
        if positions is None:
            scores = ctrl.score(ctx.config, ctx.params, ps.features, jnp.arange(n), ps.controller_state,
                                query_position, ctx.table)
            return jnp.where(jnp.arange(n)[None, :] <= query_position[:, None], scores, -jnp.inf)
        features = jnp.take_along_axis(ps.features, positions[..., None], axis=1)  # [B, K, h + d]
        scores = ctrl.score(ctx.config, ctx.params, features, positions, ps.controller_state, query_position,
                            ctx.table)
        scores = jnp.where(positions <= query_position[:, None], scores, -jnp.inf)
        return jnp.full((positions.shape[0], n), -jnp.inf).at[rows(positions.shape[0]), positions].set(scores)

    def update_state(self, ps, block, mass, last_row, tapped=None):
        """With attention_weight: keep the attention mass [B, S] the block's last valid query gave each slot (the
        default `mass_weights`; with attention_decay gamma, the max of it and gamma times the slot's previous
        statistic, reset for slots this block wrote). With rebuild_by="attention": store the keys of the block's
        tokens seen for the first time (a rebuilt token keeps the key of its first pass) and the last valid row's
        queries."""
        if self.needs_mass:
            latest = mass  # [B, S]
            if self.attention_decay:
                written = written_slots(block, ps.mass.shape[1])
                latest = jnp.maximum(latest, self.attention_decay * jnp.where(written, 0.0, ps.mass))
            ps = dataclasses.replace(ps, mass=latest)
        if tapped is None:
            return ps
        query, keys = tapped  # [B, Q, H, D], [B, Q, G, D]
        first_seen = block.valid & (block.positions >= ps.retrieval_next)  # [B, Q]
        where = jnp.where(first_seen, block.positions, ps.token_ids.shape[1])  # others out of range: dropped
        seen_upto = jnp.max(jnp.where(first_seen, block.positions + 1, 0), axis=1, keepdims=True)
        latest = jnp.take_along_axis(query, last_row[:, None, None, None], axis=1)[:, 0]  # [B, H, D]
        has_rows = jnp.any(block.valid, axis=1)[:, None, None]  # a prompt that ended in an earlier chunk keeps its query
        return dataclasses.replace(
            ps, retrieval_keys=ps.retrieval_keys.at[rows(keys.shape[0]), where].set(keys.astype(jnp.float32),
                                                                                   mode="drop"),
            retrieval_query=jnp.where(has_rows, latest.astype(jnp.float32), ps.retrieval_query),
            retrieval_next=jnp.maximum(ps.retrieval_next, seen_upto))

    def retrieval_scores(self, ps):
        """[B, N]: the latest query's attention logit for every stored key, max over heads."""
        return max_head_logits(ps.retrieval_query, ps.retrieval_keys)

    def store_kv(self, ps, cache, block):
        """rebuild_from="stored": copy the block's K/V of every layer from its cache slots to its positions (with
        recall_page_size, widen the bounds of the pages they fall in)."""
        if not self.recalls_stored:
            return ps
        where = jnp.where(block.valid, block.positions, ps.stored_k[0].shape[2])  # padding out of range: dropped
        r = rows(block.slots.shape[0])

        def block_rows(cached):  # [B, Q, G, D]: what stored[r, :, where] indexes (the advanced indices lead)
            return cached[r, block.slots].astype(ps.stored_k[0].dtype)

        def store(stored, cached):
            return stored.at[r, :, where].set(block_rows(cached), mode="drop")

        def widen(bounds, cached):
            page = where // self.recall_page_size
            return bounds.at[r, :, page, 0].max(block_rows(cached), mode="drop").at[r, :, page, 1].min(
                block_rows(cached), mode="drop")

        ps = dataclasses.replace(ps, stored_k=tuple(map(store, ps.stored_k, cache.k)),
                                 stored_v=tuple(map(store, ps.stored_v, cache.v)))
        if not self.recall_page_size:
            return ps
        return dataclasses.replace(ps, stored_key_bounds=tuple(map(widen, ps.stored_key_bounds, cache.k)))

    def recall(self, model, cache, ps, position, spare_slots=None) -> Recall:
        """rebuild_from="stored": what the current token at position [B] may recall, into spare_slots [B, R]:
        every released token before it (with rebuild_max_distance, only those that near). Without spare_slots,
        what each query of a prefill chunk starting at position may recall, ranking every stored key."""
        recallable = self.released(cache, position, ps.stored_k[0].shape[2])
        if spare_slots is None:
            return Recall(ps.stored_k, ps.stored_v, recallable, None, self.ranking_layer(model), self.rebuild)
        return Recall(ps.stored_k, ps.stored_v, recallable, spare_slots, self.ranking_layer(model), self.rebuild,
                      ps.stored_key_bounds, self.recall_pages)

    def released(self, cache, position, n):
        """[B, N] bool: the tokens before position [B] not in the cache (within rebuild_max_distance)."""
        batch = cache.batch_size
        in_cache = jnp.zeros((batch, n), bool).at[rows(batch), cache.slot_positions].max(cache.slot_valid)
        released = (jnp.arange(n)[None, :] < position[:, None]) & ~in_cache
        if self.rebuild_max_distance is not None:  # the range the controller was trained on
            released &= jnp.arange(n)[None, :] >= position[:, None] - self.rebuild_max_distance
        return released

    def slot_scores(self, cache, ps, token_scores):
        scores = cached_scores(cache, token_scores)
        if not self.needs_mass:
            return scores
        return scores + self.attention_weight * jnp.log(ps.mass + MASS_FLOOR)

    def rebuild_choice(self, cache, ps, token_scores, position):
        """The R released tokens to rebuild for the query at position [B]: the best by token_scores, or by
        retrieval_scores with rebuild_by="attention".

        Returns (picked [B, R] int32 positions, wanted [B, R] bool). A pick is wanted when it exists
        (fewer than R tokens may be released, or within rebuild_max_distance) and, with adaptive_rebuild,
        when it outscores the weakest cached token by more than rebuild_margin.
        """
        released = self.released(cache, position, token_scores.shape[1])
        ranking = self.retrieval_scores(ps) if self.rebuild_by == "attention" else token_scores
        picked_scores, picked = jax.lax.top_k(jnp.where(released, ranking, -jnp.inf), self.rebuild)
        wanted = picked_scores > -jnp.inf
        if self.adaptive_rebuild:
            wanted &= picked_scores > self.weakest_cached(cache, token_scores) + self.rebuild_margin
        return picked.astype(jnp.int32), wanted

    def weakest_cached(self, cache, token_scores):
        """[B, 1]: the lowest score among the cached tokens."""
        return jnp.min(jnp.where(cache.slot_valid, cached_scores(cache, token_scores), jnp.inf), axis=1, keepdims=True)

    def admitted(self, cache, token_scores, picked, wanted):
        """Which rebuilt tokens [B, R] (picked in descending score order) may stay in the cache.

        cache: as before the block was written. Those not admitted serve their step and are freed.
        """
        if not self.rebuild_into_cache:
            return jnp.zeros_like(wanted)
        admit = wanted
        if self.admission_margin is not None:
            scores = jnp.take_along_axis(token_scores, picked, axis=1)
            admit &= scores > self.weakest_cached(cache, token_scores) + self.admission_margin
        if self.max_admissions is not None:
            admit &= jnp.cumsum(admit, axis=1) <= self.max_admissions
        return admit
