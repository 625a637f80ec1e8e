"""Cache policies and ADORE's release/rebuild loop against independent references."""
import dataclasses
import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adore_jax
from adore_jax import cache as kv_cache
from adore_jax import controller as ctrl
from adore_jax import timing
from adore_jax.configfile import read_yaml
from adore_jax.model import (
    BlockInput,
    attend_with_rows,
    attention_inputs,
    attention_output,
    forward,
    forward_block,
    init_params,
    lm_logits,
    mlp_block,
    rms_norm,
)
from adore_jax.policies import NoReturn, Rebuild, Recall, TopKSlotAttention, load_policy
from adore_jax.policies.key_logits import max_head_logits, max_head_logits_by_group, page_bounds
from adore_jax.policies.presets import PRESETS
from adore_jax.rope import inverse_frequencies
from pallas_kernels import slot_attention_ref

from references import distance_controller

PROMPT = 4


def recency_controller(embed_dim, length=512):
    return distance_controller(embed_dim, -np.arange(length))


@pytest.fixture(scope="module")
def sequences(tiny_model):
    return np.random.default_rng(7).integers(3, tiny_model.config.vocab_size, size=(2, 40)).astype(np.int32)


def masked_reference_logits(model, tokens, visible):
    """Full forward in which query position i sees key position j iff visible(i, j) (and j <= i)."""
    def attention(q, k, v, q_positions, slot_positions, slot_valid):
        allowed = visible(q_positions[:, :, None], slot_positions[:, None, :])  # [B, Q, S]
        logits = jnp.einsum("bqgrd,bsgd->bgrqs", q.reshape(*q.shape[:2], k.shape[2], -1, q.shape[-1]), k)
        logits = logits / np.sqrt(q.shape[-1])
        mask = (allowed & slot_valid[:, None, :] & (slot_positions[:, None, :] <= q_positions[:, :, None]))
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, -jnp.inf), axis=-1)
        return jnp.einsum("bgrqs,bsgd->bqgrd", probs, v).reshape(q.shape)

    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    cache = kv_cache.init_cache(model.config, batch, length)
    hidden, *_ = forward_block(model.params, model.config, cache,
                                 BlockInput(tokens, positions, positions, jnp.ones((batch, length), bool)),
                                 attention=attention)
    return np.asarray(lm_logits(model.params, hidden))


def policy_logits(model, sequences, **options):
    _, logits = adore_jax.teacher_force(model, sequences, PROMPT, return_logits=True, **options)
    return logits  # [B, T - PROMPT, V]: predictions for positions PROMPT..T-1


@pytest.mark.parametrize("options", [
    dict(policy="window"), dict(policy="streaming_llm"), dict(policy="h2o"), dict(policy="tova"),
    dict(policy="oracle_topk", attn_top_k=64), dict(policy="adore"),
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_policy_equals_full_attention_when_nothing_is_released(tiny_model, sequences, options):
    if options["policy"] == "adore":
        options = dict(options, controller=ctrl_random(tiny_model))
    logits = policy_logits(tiny_model, sequences, cache_size=64, **options)
    full = np.asarray(forward(tiny_model.params, tiny_model.config, sequences))[:, PROMPT - 1:-1]
    np.testing.assert_allclose(logits, full, atol=1e-4)


def ctrl_random(model):
    config = ctrl.ControllerConfig(embed_dim=model.config.hidden_size, width=16, hidden=8)
    return config, ctrl.init_controller(config, jax.random.key(1))


def test_window_equals_sliding_window_reference(tiny_model, sequences):
    m = 6
    logits = policy_logits(tiny_model, sequences, policy="window", cache_size=m)
    reference = masked_reference_logits(tiny_model, sequences, lambda i, j: i - j <= m)[:, PROMPT - 1:-1]
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    full = np.asarray(forward(tiny_model.params, tiny_model.config, sequences))[:, PROMPT - 1:-1]
    assert np.max(np.abs(logits - full)) > 1e-2, "the window released nothing: the test proves nothing"


def test_streaming_llm_keeps_exactly_sinks_and_recent(tiny_model, sequences):
    m, sinks = 8, 2
    logits = policy_logits(tiny_model, sequences, policy="streaming_llm", cache_size=m, sinks=sinks)
    reference = masked_reference_logits(tiny_model, sequences, lambda i, j: (j < sinks) | (i - j <= m - sinks))
    np.testing.assert_allclose(logits, reference[:, PROMPT - 1:-1], atol=1e-4)
    out = adore_jax.generate(tiny_model, [[5, 6, 7], [8, 9, 10, 11, 12]], max_new_tokens=20, policy="streaming_llm",
                             cache_size=m, sinks=sinks, return_state=True)
    for row, length in enumerate((3, 5)):
        last = length + 20 - 2  # the last token fed to the model
        kept = np.asarray(out.cache.slot_positions[row])[np.asarray(out.cache.slot_valid[row])]
        assert sorted(kept.tolist()) == [0, 1] + list(range(last - (m - sinks) + 1, last + 1))


def test_oracle_topk_attends_exactly_to_each_querys_top_k():
    rng = np.random.default_rng(3)
    batch, n_q, heads, kv_heads, dim, slots, top_k = 2, 3, 4, 2, 8, 12, 5
    q = rng.normal(size=(batch, n_q, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, slots, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(batch, slots, kv_heads, dim)).astype(np.float32)
    slot_positions = np.stack([rng.permutation(slots) for _ in range(batch)]).astype(np.int32)
    slot_valid = rng.random((batch, slots)) > 0.15
    q_positions = np.array([[6, 9, 11], [4, 10, 11]], np.int32)
    out = np.asarray(TopKSlotAttention(top_k)(q, k, v, q_positions, slot_positions, slot_valid))
    for b in range(batch):
        for i in range(n_q):
            for h in range(heads):
                g = h // (heads // kv_heads)
                seen = [s for s in range(slots) if slot_valid[b, s] and slot_positions[b, s] <= q_positions[b, i]]
                logits = {s: q[b, i, h] @ k[b, s, g] / np.sqrt(dim) for s in seen}
                chosen = sorted(seen, key=lambda s: -logits[s])[:top_k]
                weights = np.exp([logits[s] - max(logits.values()) for s in chosen])
                expected = (weights / weights.sum()) @ v[b, chosen, g]
                np.testing.assert_allclose(out[b, i, h], expected, atol=1e-5)


def test_oracle_topk_changes_logits_when_k_is_small(tiny_model, sequences):
    small = policy_logits(tiny_model, sequences, policy="oracle_topk", attn_top_k=3)
    full = np.asarray(forward(tiny_model.params, tiny_model.config, sequences))[:, PROMPT - 1:-1]
    assert np.max(np.abs(small - full)) > 1e-2


def test_adore_with_a_recency_controller_equals_window(tiny_model, sequences):
    controller = recency_controller(tiny_model.config.hidden_size)
    adore = policy_logits(tiny_model, sequences, policy="adore", attention_weight=0.0, cache_size=6, sinks=0,
                          controller=controller)
    window = policy_logits(tiny_model, sequences, policy="window", cache_size=6)
    np.testing.assert_allclose(adore, window, atol=1e-5)
    adaptive = policy_logits(tiny_model, sequences, policy="adore", attention_weight=0.0, cache_size=6, sinks=0,
                             returns=Rebuild(r=2, adaptive=True), controller=controller)
    np.testing.assert_allclose(adaptive, window, atol=1e-5)  # nothing released ever outranks a cached token
    # the default pins the first 4 tokens: it is StreamingLLM with 4 sinks, not window attention
    pinned = policy_logits(tiny_model, sequences, policy="adore", attention_weight=0.0, cache_size=6,
                           controller=controller)
    streaming = policy_logits(tiny_model, sequences, policy="streaming_llm", cache_size=6)
    np.testing.assert_allclose(pinned, streaming, atol=1e-5)


class EventReference:
    """Hand-assembled ADORE: every token computation is an event attending an explicit set of events."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.inv_freq = jnp.asarray(inverse_frequencies(model.config))
        self.events = []  # dicts: position, q (per layer [H, D]), k, v (per layer [G, D])

    def run_block(self, tokens, positions, context, recall=None):
        """Compute events for `tokens` at `positions`, attending `context` event ids and each other causally.

        recall (first_layer, R, candidate positions[, (P, K) pages]): at each layer from first_layer on, every
        token also attends the first events of the R candidates its own query ranks best (`attention_ranking`;
        with pages, among the candidates in the K pages of P positions `paged_candidates` picks); self.recalled
        gets each layer's picks (per token for a block of several)."""
        params, config = self.model.params, self.config
        x = params["embed"][jnp.asarray(tokens)][None]  # [1, Q, E]
        pos = jnp.asarray(positions)[None]
        group = config.num_heads // config.num_kv_heads
        qs, ks, vs = [], [], []
        self.recalled = []
        for l, layer in enumerate(params["layers"]):
            q, k, v = attention_inputs(layer, config, rms_norm(x, layer["attn_norm"], config.rms_norm_eps), pos,
                                       self.inv_freq)
            picks = [[] for _ in tokens]  # each token's recalled positions at this layer
            if recall is not None and l >= recall[0]:
                for i, p in enumerate(positions):
                    query, candidates = np.asarray(q[0, i]), recall[2]
                    if len(recall) > 3:
                        candidates = paged_candidates(self, candidates, l, query, *recall[3], before=p)
                    picks[i] = attention_ranking(self, candidates, l, query)[:recall[1]]
                self.recalled.append(picks[0] if len(tokens) == 1 else picks)
            rows = []
            for i, p in enumerate(positions):  # each token: the context, its recalled tokens, the block, up to p
                seen = context + [self.first_event(j) for j in picks[i]]
                keys = jnp.concatenate([jnp.stack([self.events[e]["k"][l] for e in seen]), k[0]]) if seen else k[0]
                values = jnp.concatenate([jnp.stack([self.events[e]["v"][l] for e in seen]), v[0]]) if seen else v[0]
                key_pos = np.array([self.events[e]["position"] for e in seen] + list(positions))
                logits = jnp.einsum("hd,shd->hs", q[0, i], jnp.repeat(keys, group, axis=1)) / np.sqrt(config.head_dim)
                probs = jax.nn.softmax(jnp.where(key_pos[None] <= p, logits, -jnp.inf), axis=-1)
                rows.append(jnp.einsum("hs,shd->hd", probs, jnp.repeat(values, group, axis=1)))
            x = mlp_block(layer, config, attention_output(layer, x, jnp.stack(rows)[None]))
            qs.append(q[0])
            ks.append(k[0])
            vs.append(v[0])
        ids = []
        for i, p in enumerate(positions):
            self.events.append(dict(position=p, q=[ql[i] for ql in qs], k=[kl[i] for kl in ks], v=[vl[i] for vl in vs]))
            ids.append(len(self.events) - 1)
        hidden = rms_norm(x, params["final_norm"], config.rms_norm_eps)
        return ids, np.asarray(lm_logits(params, hidden[0, -1]))

    def first_event(self, position):
        """The id of the event that first computed `position`."""
        return next(e for e, event in enumerate(self.events) if event["position"] == position)


def attention_ranking(ref, released, layer, query=None):
    """Released positions by the attention logit of `query` [H, D] (default: the latest event's) at `layer`, max
    over heads, against the key each position got when it was first computed."""
    config = ref.config
    query = np.asarray(ref.events[-1]["q"][layer]) if query is None else query  # [H, D]
    first = {i: np.asarray(ref.events[ref.first_event(i)]["k"][layer]) for i in released}  # [G, D] each
    group = config.num_heads // config.num_kv_heads
    logit = {i: max(query[h] @ first[i][h // group] for h in range(config.num_heads)) for i in released}
    return sorted(released, key=lambda i: -logit[i])


def paged_candidates(ref, released, layer, query, size, n_pages, before):
    """The released positions in the n_pages pages of `size` positions with the highest bound on a stored key's
    logit, max over heads: per head, the sum over dims of max(q_d * min_d, q_d * max_d) over the first keys of
    every position before `before` in the page (cached or released), recomputed from the events."""
    config = ref.config
    group = config.num_heads // config.num_kv_heads
    first = {i: np.asarray(ref.events[ref.first_event(i)]["k"][layer]) for i in range(before)}  # [G, D] each
    bound = {}
    for page in {i // size for i in released}:
        keys = np.stack([first[i] for i in range(page * size, min((page + 1) * size, before))])  # [n, G, D]
        high, low = keys.max(axis=0), keys.min(axis=0)
        bound[page] = max(np.maximum(query[h] * high[h // group], query[h] * low[h // group]).sum()
                          for h in range(config.num_heads))
    chosen = sorted(bound, key=lambda page: -bound[page])[:n_pages]
    return [i for i in released if i // size in chosen]


def simulate_adore(model, tokens, m, rebuild, score_of_distance, adaptive=False, into_cache=True, rebuild_margin=0.0,
                   retrieval_layer=None, prompt=PROMPT):
    """Logits of every step and the rebuilt positions, from the event reference.

    adaptive: only released tokens scoring above the weakest cached one by more than rebuild_margin are rebuilt.
    retrieval_layer: rebuild candidates ranked by attention_ranking at that layer instead of by score.

    The rebuilt events that stay in the cache (admitted) are all of them by default, none with
    into_cache=False; the others serve their step only."""
    ref = EventReference(model)
    cache, _ = ref.run_block(tokens[:prompt - 1], list(range(prompt - 1)), [])  # the prompt's last token is a step
    last = prompt - 2  # the prefill's last query: it releases down to m by that query's scores
    cache = sorted(cache, key=lambda e: -score_of_distance[last - ref.events[e]["position"]])[:m]
    logits, rebuilt = [], []
    for t in range(prompt - 1, len(tokens) - 1):
        score = {i: score_of_distance[t - i] for i in range(t + 1)}
        cached_positions = {ref.events[e]["position"] for e in cache}
        weakest = min(score[p] for p in cached_positions)
        released = sorted((i for i in range(t) if i not in cached_positions), key=lambda i: -score[i])
        if retrieval_layer is not None:
            released = attention_ranking(ref, released, retrieval_layer)
        picked = released[:rebuild]
        if adaptive:
            picked = [i for i in picked if score[i] > weakest + rebuild_margin]
        admitted = picked if into_cache else []
        block = sorted(picked)
        block_ids, step_logits = ref.run_block([tokens[i] for i in block] + [tokens[t]], block + [t], cache)
        logits.append(step_logits)
        rebuilt.append(block)
        candidates = cache + [e for e, i in zip(block_ids, block) if i in admitted] + block_ids[-1:]
        cache = sorted(candidates, key=lambda e: -score[ref.events[e]["position"]])[:m]
    return np.stack(logits), rebuilt


def simulate_stored_recall(model, tokens, m, rebuild, score_of_distance, first_layer, prompt=PROMPT, pages=None,
                           chunk=None, prefill_recall=False):
    """Logits of every step and each layer's recalled positions, from the event reference: every token runs
    once; each step's layers from first_layer on attend the cache and the R released tokens they rank best,
    with the K/V of their only pass; the cache keeps the m best scored of itself and the current token.
    pages (P, K): the ranking reads only the released tokens of K pages of P positions (`paged_candidates`).
    chunk: the prompt runs in chunks of that many tokens, the cache keeping the m best after each (default: one);
    prefill_recall: each token of a chunk also attends the R tokens released before the chunk it ranks best."""
    ref = EventReference(model)
    cache, chunk = [], chunk or prompt - 1
    for start in range(0, prompt - 1, chunk):
        stop = min(start + chunk, prompt - 1)
        cached_positions = {ref.events[e]["position"] for e in cache}
        released = [i for i in range(start) if i not in cached_positions]
        recall = (first_layer, rebuild, released) if prefill_recall else None
        ids, _ = ref.run_block(tokens[start:stop], list(range(start, stop)), cache, recall=recall)
        cache = sorted(cache + ids, key=lambda e: -score_of_distance[stop - 1 - ref.events[e]["position"]])[:m]
    logits, recalled = [], []
    for t in range(prompt - 1, len(tokens) - 1):
        cached_positions = {ref.events[e]["position"] for e in cache}
        released = [i for i in range(t) if i not in cached_positions]
        recall = (first_layer, rebuild, released) + ((pages,) if pages else ())
        ids, step_logits = ref.run_block([tokens[t]], [t], cache, recall=recall)
        logits.append(step_logits)
        recalled.append(ref.recalled)
        cache = sorted(cache + ids, key=lambda e: -score_of_distance[t - ref.events[e]["position"]])[:m]
    return np.stack(logits), recalled


@pytest.mark.parametrize("first_layer, prompt, pages, chunk, prefill_recall",
                         [(0, PROMPT, None, None, False), (1, PROMPT, None, None, False),
                          (0, 12, None, None, False), (0, PROMPT, (5, 2), None, False),
                          (1, 12, (5, 2), None, False), (0, 16, None, 4, False),
                          (0, 16, None, 4, True), (0, 18, (5, 2), 4, True)],
                         ids=["from-layer-0", "from-layer-1", "long-prompt", "paged", "paged-long-prompt", "chunked",
                              "prefill-recall", "prefill-recall-paged"])
def test_stored_recall_matches_the_event_reference(tiny_model, sequences, first_layer, prompt, pages, chunk,
                                                   prefill_recall):
    """Recall(r=2, from_layer=first_layer): each layer from first_layer on ranks the released tokens by its own
    query and attends the two best with the K/V of their first pass, for this step only; below it, the cache alone.
    With a prompt longer than m the prefill releases, and the stored K/V come from its chunk. With pages (P, K) =
    (5, 2) only the released tokens of the 2 pages with the highest key bounds are ranked (32 positions: the
    last of 7 pages is partly past the end). With prefill chunks of 4 the prompt releases after each; with
    in_prefill each token of a chunk also attends the 2 tokens released before the chunk that its own query
    ranks best (every released token ranked, pages or not; from layer 0: in the tiny model's 2 layers, a prompt
    token's recall in the last layer would change no K/V and so no logit)."""
    m, rebuild = 5, 2
    scores = np.random.default_rng(4).normal(size=64).astype(np.float32) * 3
    controller = distance_controller(tiny_model.config.hidden_size, scores)
    tokens = sequences[:1, :32]
    options = dict(policy="adore", attention_weight=0.0, sinks=0, cache_size=m, controller=controller,
                   prefill_chunk=chunk)
    paging = dict(page_size=pages[0], pages=pages[1]) if pages else {}
    stored = Recall(r=rebuild, from_layer=first_layer, **paging)
    _, logits = adore_jax.teacher_force(tiny_model, tokens, prompt, return_logits=True,
                                        returns=dataclasses.replace(stored, in_prefill=prefill_recall), **options)
    expected, recalled = simulate_stored_recall(tiny_model, tokens[0].tolist(), m, rebuild, scores, first_layer,
                                                prompt, pages, chunk, prefill_recall)
    np.testing.assert_allclose(logits[0], expected, atol=1e-5)  # 2.4e-7 at most measured
    assert recalled[0][0] or prompt <= m, "the prompt's last token recalled nothing: the long prompt proves nothing"
    if first_layer == 0:
        assert any(layers[0] != layers[1] for layers in recalled), \
            "every layer recalled the same tokens: the per-layer ranking is untested"
    if pages:
        _, unpaged = simulate_stored_recall(tiny_model, tokens[0].tolist(), m, rebuild, scores, first_layer, prompt)
        assert recalled != unpaged, "the pages held every best key: the page ranking is untested"
    _, alone = adore_jax.teacher_force(tiny_model, tokens, prompt, return_logits=True, **options)
    assert np.max(np.abs(alone[0] - expected)) > 1e-3, "recall changed nothing: the test proves nothing"
    if prefill_recall:
        _, decode_only = adore_jax.teacher_force(tiny_model, tokens, prompt, return_logits=True, returns=stored,
                                                 **options)
        assert np.max(np.abs(decode_only[0] - expected)) > 1e-3, "the prefill's recall changed nothing: untested"


def test_recalling_every_released_token_in_prefill_and_decode_is_full_attention(tiny_model, sequences):
    """With R at least the number of released tokens, every query recalls all of them: Recall(in_prefill=True)'s
    logits equal full attention's, while recalling in decode steps only does not (the prompt's chunks saw m slots)."""
    m, chunk, prompt = 12, 4, 20  # the prefill releases from its 4th chunk on; at most 23 - 12 = 11 released, R = 11
    tokens = sequences[:1, :23]
    _, full = adore_jax.teacher_force(tiny_model, tokens, prompt, return_logits=True, policy="full")
    controller = distance_controller(tiny_model.config.hidden_size, -np.arange(64, dtype=np.float32))  # recency
    stored = dict(policy="adore", cache_size=m, prefill_chunk=chunk, sinks=0, controller=controller)
    _, everything = adore_jax.teacher_force(tiny_model, tokens, prompt, return_logits=True,
                                            returns=Recall(r=m - 1, from_layer=0, in_prefill=True), **stored)
    np.testing.assert_allclose(everything, full, atol=1e-5)
    _, decode_only = adore_jax.teacher_force(tiny_model, tokens, prompt, return_logits=True,
                                             returns=Recall(r=m - 1, from_layer=0), **stored)
    assert np.max(np.abs(decode_only - full)) > 1e-3, "no prompt chunk missed a released token: nothing tested"


def test_attend_with_rows_equals_slot_attention_with_each_querys_rows_as_slots():
    """attend_with_rows against the slot attention twin run once per query, with that query's recalled rows appended
    as extra slots (invalid where not found): the same output, and the same mass on the shared slots."""
    rng = np.random.default_rng(3)
    batch, n_queries, n_slots, count, heads, groups, dim = 2, 3, 7, 2, 6, 2, 8
    q = rng.normal(size=(batch, n_queries, heads, dim)).astype(np.float32)
    k, v = (rng.normal(size=(batch, n_slots, groups, dim)).astype(np.float32) for _ in range(2))
    k_rows, v_rows = (rng.normal(size=(batch, n_queries, count, groups, dim)).astype(np.float32) for _ in range(2))
    q_positions = np.array([[20, 21, 22], [20, 21, 22]], np.int32)
    slot_positions = rng.integers(10, 23, size=(batch, n_slots)).astype(np.int32)
    slot_valid = rng.random((batch, n_slots)) < 0.8
    found = np.array([[[True, True], [True, False], [False, False]], [[True, True], [False, True], [True, True]]])
    out, mass = attend_with_rows(*map(jnp.asarray, (q, k, v, q_positions, slot_positions, slot_valid, k_rows, v_rows,
                                                   found)), return_mass=True)
    for i in range(n_queries):
        twin_out, twin_mass = slot_attention_ref(
            jnp.asarray(q[:, i:i + 1]), jnp.asarray(np.concatenate([k, k_rows[:, i]], axis=1)),
            jnp.asarray(np.concatenate([v, v_rows[:, i]], axis=1)), jnp.asarray(q_positions[:, i:i + 1]),
            jnp.asarray(np.concatenate([slot_positions, np.full((batch, count), 5, np.int32)], axis=1)),
            jnp.asarray(np.concatenate([slot_valid, found[:, i]], axis=1)), return_mass=True)
        np.testing.assert_allclose(np.asarray(out[:, i]), np.asarray(twin_out[:, 0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(mass[:, i]), np.asarray(twin_mass[:, 0, :, :n_slots]), atol=1e-6)
        assert np.asarray(twin_mass[:, 0, :, n_slots:]).max() > 0.05, "the rows took no mass: nothing tested"


def test_page_bounds_bound_every_key_and_are_tight_for_one_key():
    """page_bounds against brute force: for random keys in pages of 4, the bound is at least every key's
    max_head_logits, and a page holding one key (min = max) is bounded by exactly that key's logit; the
    KV-head-major ranking equals max_head_logits."""
    rng = np.random.default_rng(7)
    batch, pages, size, heads, groups, dim = 2, 6, 4, 6, 2, 8
    query = rng.normal(size=(batch, heads, dim)).astype(np.float32)
    keys = rng.normal(size=(batch, pages * size, groups, dim)).astype(np.float32)
    paged = keys.reshape(batch, pages, size, groups, dim).transpose(0, 3, 1, 2, 4)  # [B, G, P, size, D]
    bounds = np.stack([paged.max(axis=3), paged.min(axis=3)], axis=3)  # [B, G, P, 2, D]
    logits = np.asarray(max_head_logits(jnp.asarray(query), jnp.asarray(keys))).reshape(batch, pages, size)
    bound = np.asarray(page_bounds(jnp.asarray(query), jnp.asarray(bounds)))
    assert np.all(bound >= logits.max(axis=2) - 1e-5)
    assert np.any(bound > logits.max(axis=2) + 1e-2), "every bound is tight: nothing tested the bound's slack"
    by_group = keys.transpose(0, 2, 1, 3)  # [B, G, N, D]
    np.testing.assert_allclose(np.asarray(max_head_logits_by_group(jnp.asarray(query), jnp.asarray(by_group))),
                               np.asarray(max_head_logits(jnp.asarray(query), jnp.asarray(keys))), atol=1e-5)
    single = np.stack([by_group, by_group], axis=3)  # pages of one key
    np.testing.assert_allclose(np.asarray(page_bounds(jnp.asarray(query), jnp.asarray(single))),
                               np.asarray(max_head_logits(jnp.asarray(query), jnp.asarray(keys))), atol=1e-5)


@pytest.mark.parametrize("adaptive, into_cache, input_layer",
                         [(False, True, None), (True, True, None), (False, False, None), (False, True, 1),
                          (True, False, 1)],
                         ids=["rebuild", "adaptive", "transient", "rebuild-hidden", "adaptive-transient-hidden"])
def test_rebuild_reenters_block_and_cache_and_matches_hand_assembled_attention(tiny_model, sequences, adaptive,
                                                                                into_cache, input_layer):
    """Scores fall with distance except at distance 5, where a token jumps to the top: once released
    (m = 4), it must come back through the rebuild block and then stay in the cache for that step
    (or, with into_cache=False, leave again at once). With input_layer the controller is observed
    after the block and the release ranks again (decode.py): the same choices, by another path."""
    m, rebuild, boosted = 4, 1, 5
    scores = -np.arange(64, dtype=np.float32)
    scores[boosted] = 100.0
    controller = distance_controller(tiny_model.config.hidden_size, scores, input_layer)
    tokens = sequences[:1, :24]
    returns = Rebuild(r=rebuild, adaptive=adaptive, into_cache=into_cache)
    _, logits = adore_jax.teacher_force(tiny_model, tokens, PROMPT, return_logits=True, policy="adore",
                                        attention_weight=0.0, sinks=0, cache_size=m, returns=returns,
                                        controller=controller)
    expected, rebuilt = simulate_adore(tiny_model, tokens[0].tolist(), m, rebuild, scores, adaptive, into_cache)
    assert any(t - boosted in picks for t, picks in zip(range(PROMPT - 1, 24), rebuilt)), "no boosted token was rebuilt"
    np.testing.assert_allclose(logits[0], expected, atol=1e-4)
    out = adore_jax.generate(tiny_model, [tokens[0, :PROMPT].tolist()], max_new_tokens=16, policy="adore",
                             attention_weight=0.0, sinks=0, cache_size=m, returns=returns, controller=controller,
                             return_state=True)
    last = PROMPT + 16 - 2
    kept = np.asarray(out.cache.slot_positions[0])[np.asarray(out.cache.slot_valid[0])]
    assert len(kept) == m
    assert (last - boosted in kept.tolist()) == into_cache, "the rebuilt token's cache entry is wrong"
    if adaptive:
        assert 0 < out.stats["return_steps"] < 15


@pytest.mark.parametrize("into_cache", [True, False], ids=["into-cache", "transient"])
def test_adaptive_rebuild_margin_matches_the_event_reference(tiny_model, sequences, into_cache):
    """R = 3 per step under a random distance profile: with a margin only released tokens that clear the
    weakest cached score by the margin are rebuilt, and the block runs at fewer steps than with margin 0."""
    m, rebuild, margin = 6, 3, 6.0
    scores = np.random.default_rng(4).normal(size=64).astype(np.float32) * 3
    controller = distance_controller(tiny_model.config.hidden_size, scores)
    tokens = sequences[:1, :32]
    options = dict(policy="adore", attention_weight=0.0, sinks=0, cache_size=m, controller=controller)

    def returns(margin_):
        return Rebuild(r=rebuild, adaptive=True, into_cache=into_cache, margin=margin_)

    _, logits = adore_jax.teacher_force(tiny_model, tokens, PROMPT, return_logits=True, returns=returns(margin),
                                        **options)
    expected, rebuilt = simulate_adore(tiny_model, tokens[0].tolist(), m, rebuild, scores, adaptive=True,
                                       into_cache=into_cache, rebuild_margin=margin)
    np.testing.assert_allclose(logits[0], expected, atol=1e-4)
    _, rebuilt_at_zero = simulate_adore(tiny_model, tokens[0].tolist(), m, rebuild, scores, adaptive=True,
                                        into_cache=into_cache)
    fired, fired_at_zero = (sum(map(bool, picks)) for picks in (rebuilt, rebuilt_at_zero))
    assert 0 < fired < fired_at_zero, (fired, fired_at_zero)
    prompt = [tokens[0, :PROMPT].tolist()]
    steps = {margin_: adore_jax.generate(tiny_model, prompt, max_new_tokens=16, returns=returns(margin_),
                                         **options).stats["return_steps"] for margin_ in (0.0, margin)}
    assert steps[margin] < steps[0.0]


@pytest.mark.parametrize("into_cache, prompt", [(True, PROMPT), (False, PROMPT), (False, 12)],
                         ids=["into-cache", "transient", "transient-long-prompt"])
def test_rebuild_by_attention_matches_the_event_reference(tiny_model, sequences, into_cache, prompt):
    """R = 2 per step: the released tokens with the highest attention logit of the latest query at layer 1
    (max over heads, against the key of their first pass) are rebuilt; the controller only releases. With a
    prompt longer than m the prefill releases, and the prompt's last token already runs with a rebuild."""
    m, rebuild, layer = 5, 2, 1
    scores = np.random.default_rng(4).normal(size=64).astype(np.float32) * 3
    controller = distance_controller(tiny_model.config.hidden_size, scores)
    tokens = sequences[:1, :32]
    options = dict(policy="adore", attention_weight=0.0, sinks=0, cache_size=m, controller=controller)
    _, logits = adore_jax.teacher_force(tiny_model, tokens, prompt, return_logits=True,
                                        returns=Rebuild(r=rebuild, into_cache=into_cache, ranked_by="attention",
                                                        layer=layer), **options)
    expected, rebuilt = simulate_adore(tiny_model, tokens[0].tolist(), m, rebuild, scores, into_cache=into_cache,
                                       retrieval_layer=layer, prompt=prompt)
    np.testing.assert_allclose(logits[0], expected, atol=1e-4)
    assert rebuilt[0] or prompt <= m, "the prompt's last token rebuilt nothing: the long prompt proves nothing"
    by_controller, rebuilt_by_controller = simulate_adore(tiny_model, tokens[0].tolist(), m, rebuild, scores,
                                                          into_cache=into_cache, prompt=prompt)
    assert rebuilt != rebuilt_by_controller and np.max(np.abs(by_controller - expected)) > 1e-3, \
        "the attention ranking picked what the controller picks: the test proves nothing"


def test_a_one_token_prompt_runs_as_a_rebuild_step(tiny_model, sequences):
    """With R > 0 the prompt's last token is a decode step, so a one-token prompt prefills nothing; its
    prediction and the next ones equal full attention while nothing needs releasing (m >= length)."""
    tokens = sequences[:, :6]
    _, logits = adore_jax.teacher_force(tiny_model, tokens, 1, return_logits=True, policy="adore", cache_size=8,
                                        returns=Rebuild(r=2, into_cache=False),
                                        controller=recency_controller(tiny_model.config.hidden_size))
    full = np.asarray(forward(tiny_model.params, tiny_model.config, tokens))[:, :-1]
    np.testing.assert_allclose(logits, full, atol=1e-4)


@pytest.mark.parametrize("name", ["tova", "h2o"])
def test_a_mass_scorer_composes_with_a_transient_rebuild_by_attention(tiny_model, sequences, name):
    """TOVA and H2O score no released token, so a rebuild composed with them ranks by the model's attention: it
    decodes (every step rebuilds, none of the rebuilt tokens stays) and changes the logits of the scorer alone."""
    m, returns = 6, Rebuild(r=2, ranked_by="attention", into_cache=False)
    alone = policy_logits(tiny_model, sequences, policy=name, cache_size=m)
    rebuilt = policy_logits(tiny_model, sequences, policy=name, cache_size=m, returns=returns)
    assert np.all(np.isfinite(rebuilt)) and rebuilt.shape == alone.shape
    assert np.max(np.abs(rebuilt - alone)) > 1e-3, "the rebuild changed nothing"
    new_tokens = 16
    out = adore_jax.generate(tiny_model, sequences[:, :PROMPT].tolist(), max_new_tokens=new_tokens, policy=name,
                             cache_size=m, returns=returns, return_state=True)
    assert out.stats["return_steps"] == new_tokens and min(out.stats["returned_tokens"]) > 0
    assert np.all(np.asarray(out.cache.slot_valid).sum(axis=1) == m), "the transient rows stayed in the cache"


def test_return_path_options_are_checked(tiny_model):
    """Rebuild's and Recall's fields are checked when built (and against the run's positions and the model when it
    starts); an option of the other return path is not one of theirs."""
    def check(returns):
        return adore_jax.make_policy("adore", cache_size=8, returns=returns).validate(64)

    def refused(message, returns):
        with pytest.raises(ValueError, match=re.escape(message)):
            check(returns)

    refused("ranked_by must be one of 'scorer', 'attention'; got 'mass'", dict(type="rebuild", r=2, ranked_by="mass"))
    refused("r (rebuilt tokens per step) must be an integer >= 1; got 0",
            dict(type="rebuild", r=0, ranked_by="attention"))
    refused("adaptive=True compares picks with the cached tokens' scores: it needs ranked_by='scorer'",
            dict(type="rebuild", r=2, adaptive=True, ranked_by="attention"))
    refused("layer is the attention ranking's layer: it needs ranked_by='attention'; got ranked_by='scorer'",
            dict(type="rebuild", r=2, layer=1))
    refused("layer must be an integer >= 0; got -1", dict(type="rebuild", r=2, ranked_by="attention", layer=-1))
    refused("returns: type must be one of none, rebuild, recall; got 'host'", dict(type="host", r=2))
    refused("return path 'rebuild' has no option 'page_size'", dict(type="rebuild", r=2, page_size=16))
    refused("return path 'rebuild' has no option 'in_prefill'", dict(type="rebuild", r=2, in_prefill=True))
    refused("return path 'recall' has no option 'into_cache'", dict(type="recall", r=2, into_cache=False))
    refused("page_size (0: rank every stored key) must be an integer >= 0; got -1",
            dict(type="recall", r=2, page_size=-1))
    refused("pages must be <= 4 (the pages of 16 keys in 64 positions); got 5",
            dict(type="recall", r=2, page_size=16, pages=5))  # 64 positions: 4 pages
    refused("pages must be an integer >= 2; got 1",
            dict(type="recall", r=2, page_size=1, pages=1))  # one key per page cannot hold R = 2
    refused("r (R=8) must be < cache_size (m=8)", dict(type="rebuild", r=8, ranked_by="attention"))
    for bad in (2.5, True):
        with pytest.raises(ValueError, match=re.escape(f"r (recalled tokens per step) must be an integer >= 1; got "
                                                       f"{bad!r}")):
            Recall(r=bad)
    with pytest.raises(ValueError, match="in_prefill must be true or false; got 1"):
        Recall(r=2, in_prefill=1)
    with pytest.raises(ValueError, match="into_cache must be true or false; got 0"):
        Rebuild(r=2, into_cache=0)
    assert check(dict(type="recall", r=2, page_size=16, pages=4)).returns == Recall(r=2, page_size=16, pages=4)
    assert check(dict(type="recall", r=2, in_prefill=True)).returns == Recall(r=2, in_prefill=True)
    by_attention = Rebuild(r=2, ranked_by="attention")
    smollm2 = dataclasses.replace(tiny_model.config, num_layers=30)
    assert by_attention.ranking_layer(smollm2) == 20, "the default ranking layer is not two thirds of the way up"
    assert Rebuild(r=2).ranking_layer(smollm2) is None
    layers = tiny_model.config.num_layers
    controller = recency_controller(tiny_model.config.hidden_size)
    with pytest.raises(ValueError, match=rf"layer must be in \[0, {layers}\) for this model; got {layers}"):
        adore_jax.generate(tiny_model, [[5, 6, 7, 8]], max_new_tokens=2, policy="adore", cache_size=4,
                           returns=Rebuild(r=1, ranked_by="attention", layer=layers), controller=controller)
    with pytest.raises(ValueError, match=rf"from_layer must be in \[0, {layers}\) for this model; got {layers}"):
        adore_jax.generate(tiny_model, [[5, 6, 7, 8]], max_new_tokens=2, policy="adore", cache_size=4,
                           returns=Recall(r=1, from_layer=layers), controller=controller)


@pytest.mark.parametrize("into_cache", [True, False], ids=["into-cache", "transient"])
def test_a_score_table_equals_the_controller_that_gives_the_same_scores(tiny_model, sequences, into_cache):
    """score_table runs ADORE's release and rebuild on given scores: fed the scores a controller gives
    (a random profile over distance), it must decode exactly as adore with that controller."""
    by_distance = np.random.default_rng(6).normal(size=64).astype(np.float32) * 3
    length = sequences.shape[1]
    t, i = np.arange(length)[:, None], np.arange(length)[None, :]
    table = np.where(i <= t, by_distance[np.clip(t - i, 0, 63)], -np.inf).astype(np.float32)
    options = dict(cache_size=6, returns=Rebuild(r=2, into_cache=into_cache), prefill_chunk=8)
    _, expected = adore_jax.teacher_force(tiny_model, sequences, 20, return_logits=True, policy="adore",
                                          controller=distance_controller(tiny_model.config.hidden_size, by_distance),
                                          **options)
    _, got = adore_jax.teacher_force(tiny_model, sequences, 20, return_logits=True, policy="score_table",
                                     controller=np.stack([table] * len(sequences)), **options)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    _, window = adore_jax.teacher_force(tiny_model, sequences, 20, return_logits=True, policy="window", cache_size=6)
    assert np.max(np.abs(got - window)) > 1e-3, "the scores changed nothing: the test proves nothing"


def test_batch_rows_are_independent(tiny_model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [12] * 13]
    controller = ctrl_random(tiny_model)
    for options in (dict(policy="adore", returns=Rebuild(r=2), controller=controller), dict(policy="h2o"),
                    dict(policy="tova")):
        batch = adore_jax.generate(tiny_model, prompts, max_new_tokens=20, cache_size=6, **options)
        for prompt, ids in zip(prompts, batch.token_ids):
            alone = adore_jax.generate(tiny_model, [prompt], max_new_tokens=20, cache_size=6, **options)
            assert alone.token_ids[0] == ids


def test_decoding_length_never_changes_the_compiled_step():
    """64 and 4096 decoded tokens run the same compiled chunk: no shape depends on n."""
    config = adore_jax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16, max_position_embeddings=8192)
    model = adore_jax.Model(config, init_params(config, jax.random.key(0)), None, "tiny-long")
    controller = ctrl.ControllerConfig(embed_dim=32, width=8, hidden=4)
    options = dict(policy="adore", cache_size=32, returns=Rebuild(r=2), max_length=4224, decode_chunk=63,
                   controller=(controller, ctrl.init_controller(controller, jax.random.key(0))))
    adore_jax.generate(model, [[1, 2, 3]], max_new_tokens=64, **options)
    with timing.track_compiles() as stats:
        out = adore_jax.generate(model, [[1, 2, 3]], max_new_tokens=4096, **options)
    assert out.stats["decode_steps"] == 4095
    assert stats.count == 0, f"{stats.count} compilations"


def test_chunked_prefill_memory_is_bounded_by_m_plus_chunk(tiny_model):
    """The compiled prefill's temporaries do not grow with the prompt; the cache is m + chunk slots."""
    from adore_jax.decode import prefill

    sizes = {}
    for length in (64, 200):
        session = adore_jax.DecodeSession(tiny_model, [[7] * length], 8,
                                          adore_jax.Window(cache_size=16, prefill_chunk=16))
        assert session.cache.num_slots == 16 + 16
        compiled = prefill.lower(tiny_model.params, {}, session.cache, session.ps, session.tokens, session.lengths,
                                 plan=session.plan, chunk=session.shape.chunk).compile()
        sizes[length] = compiled.memory_analysis().temp_size_in_bytes
    assert sizes[200] <= 1.1 * sizes[64], sizes


@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_attention_mass_keeps_no_temporaries_per_layer(policy):
    """A prefill chunk's attention mass is reduced inside each layer: the compiled program's temporaries do not
    grow with the layers. Summed over layers at the end, each layer's [B, Q, S] mass stayed alive (7 GB in
    SmolLM2's 1024-token chunks at batch 5); with 12 layers instead of 2 that took 3.2x the temporaries here
    (2 layers: 0.73 MB)."""
    from adore_jax.decode import prefill

    sizes = {}
    for layers in (2, 12):
        config = adore_jax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=layers,
                                       num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=512)
        model = adore_jax.Model(config, init_params(config, jax.random.key(0)), None, f"tiny-{layers}")
        session = adore_jax.DecodeSession(model, [[7] * 256] * 4, 8,
                                          dict(policy=policy, cache_size=16, prefill_chunk=64))
        compiled = prefill.lower(model.params, {}, session.cache, session.ps, session.tokens, session.lengths,
                                 plan=session.plan, chunk=session.shape.chunk).compile()
        sizes[layers] = compiled.memory_analysis().temp_size_in_bytes
    assert sizes[12] <= 1.5 * sizes[2], sizes


@pytest.mark.parametrize("options, message", [
    (dict(policy="window", cache_size=0), r"cache_size must be an integer >= 1 for policy 'window'; got 0"),
    (dict(policy="window"), r"cache_size \(m\) must be set \(>= 1\) for policy 'window'"),
    (dict(policy="adore", cache_size=8, returns=dict(type="rebuild", r=-1)),
     r"r \(rebuilt tokens per step\) must be an integer >= 1; got -1"),
    (dict(policy="adore", cache_size=8, returns=dict(type="rebuild", r=8)), r"r \(R=8\) must be < cache_size \(m=8\)"),
    (dict(policy="window", cache_size=8, attn_top_k=9), "policy 'window' has no option 'attn_top_k'"),
    (dict(policy="oracle_topk", attn_top_k=0), r"attn_top_k \(K\) must be an integer >= 1; got 0"),
    (dict(policy="streaming_llm", cache_size=8, sinks=4, recent=5), r"sinks \+ recent \(4 \+ 5\) must be <= "
     r"cache_size \(8\)"),
    (dict(policy="window", cache_size=300, max_length=256), r"cache_size \(300\) must be <= max_length \(256\)"),
    (dict(policy="lru", cache_size=8), "policy must be one of full, window"),
    (dict(policy="oracle_topk"), "needs attn_top_k"),
    (dict(policy="window", cache_size=8, rebuild=2), "unexpected keyword argument 'rebuild'"),
    (dict(policy="window", cache_size=8, returns=dict(type="rebuild", r=2)),
     "Rebuild\\(ranked_by='scorer'\\) ranks released tokens by the scorer's token scores, which policy 'window' has "
     "not"),
    (dict(policy="full", returns=dict(type="recall", r=2)), "policy 'full' keeps every token: it has no return path"),
    (dict(policy="adore", cache_size=8, returns=dict(type="none", into_cache=False)),
     "return path 'none' has no option 'into_cache'"),
    (dict(policy="adore", cache_size=8, returns=dict(type="none", adaptive=True)),
     "return path 'none' has no option 'adaptive'"),
    (dict(policy="window", cache_size="sixty"), "config key 'cache_size' must be int; got 'sixty'"),
    (dict(policy="streaming_llm", cache_size=8, sinks=9), r"sinks \+ recent \(9 \+ 0\) must be <= cache_size \(8\)"),
    (dict(policy="adore", cache_size=8, returns=dict(type="rebuild", r=2, adaptive=True, margin=-0.5)),
     "margin must be a number >= 0; got -0.5"),
    (dict(policy="adore", cache_size=8, returns=dict(type="rebuild", r=2, margin=1.0)),
     "margin applies to adaptive=True; got margin=1.0 with adaptive=False"),
    (dict(policy="adore", cache_size=8, attention_weight=-1.0), "attention_weight must be a number >= 0; got -1.0"),
    (dict(policy="full", controller="x"), "controller= applies only to a policy that reads one"),
    (dict(policy="window", cache_sz=8), "unexpected keyword argument 'cache_sz'"),
    (dict(policy="score_table", cache_size=8), "policy 'score_table' needs its scores"),
    (dict(policy="score_table", cache_size=8, controller=np.zeros((1, 4, 5))), r"must be \[B, T, T\]"),
    (dict(policy="adore", cache_size=8), "needs a controller"),
])
def test_bad_cache_configuration_is_refused(tiny_model, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        adore_jax.generate(tiny_model, [[1, 2, 3]], max_new_tokens=4, **options)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "policies",
                                                             "*.yaml"))), ids=os.path.basename)
def test_committed_policy_configs_are_valid(path):
    """A config names a policy or a preset (adore_jax.policies.presets); either validates, and its return path holds
    the fields the config sets."""
    config = read_yaml(path)
    policy = load_policy(path).validate(max_length=4096)
    assert policy.name == (config["policy"] if "policy" in config else PRESETS[config["preset"]]().name)
    returns = config.get("returns") or {}
    returns = returns if isinstance(returns, dict) else {"type": returns}
    assert returns.get("type", policy.returns.kind) == policy.returns.kind
    assert all(getattr(policy.returns, key) == value for key, value in returns.items() if key != "type"), returns


def test_controller_for_another_model_is_refused(tiny_model, tmp_path):
    config = ctrl.ControllerConfig(embed_dim=tiny_model.config.hidden_size + 1, width=8, hidden=4)
    ctrl.save_controller(str(tmp_path / "c"), config, ctrl.init_controller(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="built for embedding width 65, but the model's is 64"):
        adore_jax.generate(tiny_model, [[1, 2, 3]], max_new_tokens=4, policy="adore", cache_size=8,
                           controller=str(tmp_path / "c"))
    good = dataclasses.replace(config, embed_dim=tiny_model.config.hidden_size)
    params = ctrl.init_controller(good, jax.random.key(0))
    ctrl.save_controller(str(tmp_path / "good"), good, params)
    loaded_config, loaded = ctrl.load_controller(str(tmp_path / "good"), tiny_model.config.hidden_size)
    assert loaded_config == good
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("rebuild, adaptive", [(0, False), (2, False), (2, True)], ids=["R=0", "R=2", "R=2-adaptive"])
def test_a_hidden_state_controller_reads_each_tokens_own_pass(tiny_model, sequences, rebuild, adaptive):
    """input_layer = 1: the features buffered for every token, prefilled in chunks or decoded (the last row of
    a rebuild block, whose other rows are empty picks here; or of the step without the block, when adaptive
    rebuild skips it), equal the controller run over the hidden states
    after one layer of a whole-sequence forward, while nothing is released (m >= length)."""
    config = ctrl.ControllerConfig(embed_dim=tiny_model.config.hidden_size, width=16, hidden=8, content_dim=4,
                                   input_layer=1)
    controller = (config, ctrl.init_controller(config, jax.random.key(3)))
    steps = sequences.shape[1] - PROMPT
    returns = Rebuild(r=rebuild, adaptive=adaptive) if rebuild else NoReturn()
    policy = adore_jax.make_policy("adore", cache_size=64, returns=returns, prefill_chunk=8)
    session = adore_jax.DecodeSession(tiny_model, sequences[:, :PROMPT].tolist(), steps, policy, controller=controller)
    session.prefill()
    session.start(sequences[:, PROMPT])
    session.decode(steps - 1, forced=sequences[:, PROMPT + 1:])
    batch, length = sequences.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    whole = BlockInput(jnp.asarray(sequences), positions, positions, jnp.ones((batch, length), bool))
    cache = kv_cache.init_cache(tiny_model.config, batch, length)
    *_, hidden = forward_block(tiny_model.params, tiny_model.config, cache, whole, hidden_after=1)
    _, expected, _ = ctrl.encode_sequence(config, controller[1], hidden)
    seen = length - 1  # the last forced token is fed to no step
    np.testing.assert_allclose(np.asarray(session.ps.scorer.features)[:, :seen], expected[:, :seen], atol=1e-5)
    embedded = ctrl.encode_sequence(config, controller[1], tiny_model.params["embed"][sequences])[1]
    assert np.max(np.abs(expected - embedded)) > 1e-2, "hidden states and input embeddings give the same features"


def test_a_hidden_state_controller_needs_a_layer_the_model_has(tiny_model):
    with pytest.raises(ValueError, match=r"input_layer must be None \(input embeddings\) or a layer count >= 1"):
        ctrl.ControllerConfig(embed_dim=32, input_layer=0)
    config = ctrl.ControllerConfig(embed_dim=tiny_model.config.hidden_size, width=8, hidden=4, input_layer=2)
    with pytest.raises(ValueError, match=r"input_layer must be in \[1, 2\) for this model"):
        adore_jax.generate(tiny_model, [[5, 6, 7]], 2, policy="adore", cache_size=8,
                           controller=(config, ctrl.init_controller(config, jax.random.key(0))))
