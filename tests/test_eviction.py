"""Every bounded policy's kept set against an independent event-by-event reference.

Prompts are several times longer than m, so the chunked prefill releases tokens after every chunk,
and decoding releases one token per step. The two batch rows have different prompt lengths (the
second prompt ends inside a padded chunk). The reference re-derives each rule from its paper's
description, in numpy, over attention from a plain masked forward: query t sees key s iff s was
in the cache when t ran (or in t's own block, causally). Since a token's K/V depend only on what it
saw, that forward reproduces every K/V the cache held, so the decode logits must match too.

Composed with `Recall(r)`, a decode step's query at each layer from `from_layer` on also sees the R released
tokens its own query at that layer ranks best (max over heads of q . k): their K/V are their only pass's, which is
what the masked forward holds, so the same forward is the reference.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adore_jax import H2O, DecodeSession, Model, ModelConfig, SnapKV, make_policy
from adore_jax.model import BlockInput, init_params, lm_logits, run_layers
from adore_jax.policies import Rebuild, Recall
from adore_jax.policies.snapkv import SnapKVState

from references import distance_controller

M, CHUNK, STEPS = 12, 8, 8
PROMPTS = (40, 35)
DISTANCE_SCORES = np.random.default_rng(11).normal(size=64).astype(np.float32)  # adore: score of (t, i) by t - i


def murmur3_scores(seed, count):
    """random's score of positions 0..count-1: the murmur3 finalizer of (position * golden + seed), top 24 bits."""
    scores = []
    for position in range(count):
        x = (position * 0x9E3779B9 + seed) & 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        x ^= x >> 16
        scores.append((x >> 8) / (1 << 24))
    return scores


RANDOM_SCORES = murmur3_scores(7, 64)


@pytest.fixture(scope="module")
def model():
    """A tiny random model (no tokenizer); weights large enough that attention is far from uniform."""
    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    return Model(config, init_params(config, jax.random.key(3), scale=0.08), None, "tiny-eviction")


def masked_forward(model, tokens, visible, recallable=None, recall=(0, 0)):
    """One sequence whose query t sees key s iff visible[t, s]: (logits [T, V], attention mass [T, T] summed over
    layers and query heads, each token's key norm [T] averaged over layers and KV heads).

    recallable [T, T] bool, recall (first_layer, R): at each layer from first_layer on, query t also sees the R
    keys of recallable[t] its own query ranks best at that layer (max over heads of q . k)."""
    recallable = np.zeros_like(visible) if recallable is None else recallable
    return _forward(model.config, *recall)(model.params, jnp.asarray(tokens)[None], jnp.asarray(visible),
                                           jnp.asarray(recallable))


_FORWARDS = {}


def _forward(config, first_layer, count):
    if (config, first_layer, count) not in _FORWARDS:
        def run(params, tokens, visible, recallable):
            def attention(index, q, k, v):  # q [1, T, H, D], k, v [1, T, G, D]
                group = q.shape[2] // k.shape[2]
                keys, values = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
                logits = jnp.einsum("bthd,bshd->bhts", q, keys) / np.sqrt(q.shape[-1])
                seen = visible
                if count and index >= first_layer:
                    ranking = jnp.where(recallable, jnp.max(logits[0], axis=0), -jnp.inf)  # [T, T]
                    best, picked = jax.lax.top_k(ranking, count)
                    rows = jnp.arange(ranking.shape[0])[:, None]
                    seen = visible.at[rows, picked].max(best > -jnp.inf)
                probs = jax.nn.softmax(jnp.where(seen[None, None], logits, -jnp.inf), axis=-1)
                norms = jnp.linalg.norm(k[0], axis=-1).mean(axis=-1)  # [T]
                return jnp.einsum("bhts,bshd->bthd", probs, values), (jnp.sum(probs[0], axis=0), norms)

            positions = jnp.arange(tokens.shape[1])[None]
            hidden, aux, _ = run_layers(params, config, tokens, positions, attention)
            masses, norms = zip(*aux)
            return lm_logits(params, hidden)[0], sum(masses), sum(norms) / len(norms)
        _FORWARDS[(config, first_layer, count)] = jax.jit(run)
    return _FORWARDS[(config, first_layer, count)]


def reference_rule(name, attention_weight=0.0):
    """score(k, current, mass, acc, norm) -> keep-score of candidate k, from the rule's description."""
    if name == "adore" and attention_weight:  # the controller's, plus beta * log(the current query's attention)
        return lambda k, current, mass, acc, norm: DISTANCE_SCORES[current - k] + attention_weight * np.log(
            mass[current, k] + 1e-6)
    rules = {
        "window": lambda k, current, mass, acc, norm: k,  # the most recent
        "streaming_llm": lambda k, current, mass, acc, norm: k,  # sinks pinned, then the most recent
        "h2o": lambda k, current, mass, acc, norm: acc[k],  # mass accumulated since the token entered
        "tova": lambda k, current, mass, acc, norm: mass[current, k],  # the current query's attention
        "key_norm": lambda k, current, mass, acc, norm: -norm[k],  # the smallest key norm
        "adore": lambda k, current, mass, acc, norm: DISTANCE_SCORES[current - k],  # the controller's
        "random": lambda k, current, mass, acc, norm: RANDOM_SCORES[k],  # a fixed random number per token
    }
    return rules[name]


def simulate(model, tokens, prompt, name, sinks, recent, attention_weight=0.0, recall=(0, 0), observation=(1, 1)):
    """Kept positions after the prefill and after each decode step, and the decode logits [STEPS, V].

    recall (first_layer, R): each decode step's query may also attend R released tokens (`masked_forward`).
    observation (w, pool): snapkv's window and pooling kernel."""
    length = len(tokens)
    visible = np.eye(length, dtype=bool)  # rows not yet run see only themselves (never read)
    recallable = np.zeros((length, length), bool)
    chunked = prompt - 1 if recall[1] else prompt  # a policy that brings tokens back runs the prompt's last as a step
    blocks = [list(range(s, min(s + CHUNK, chunked))) for s in range(0, chunked, CHUNK)]
    blocks += [[t] for t in range(chunked, length)]
    rule = None if name == "snapkv" else reference_rule(name, attention_weight)
    window, pool = observation
    ring, entry = np.zeros((window, length)), 0  # snapkv: one entry per window query, the mass it gave each token
    kept, acc, history, logits = [], {}, [], None
    for block in blocks:
        for q in block:
            visible[q, kept] = True
            visible[q, block[0]:q + 1] = True
        if len(block) == 1:  # a decode step: what it may recall
            recallable[block[0], [i for i in range(block[0]) if i not in kept]] = True
        logits, mass, norm = map(np.asarray, masked_forward(model, tokens, visible, recallable, recall))
        candidates = kept + block
        current = block[-1]
        for k in block:  # a new token starts with no accumulated mass
            acc[k] = 0.0
            ring[:, k] = 0.0
        for k in candidates:
            acc[k] += float(mass[block, k].sum())
        queries = block[-window:]  # snapkv's window: a chunk's last w queries, a decode step's own
        for _ in queries:  # each takes the oldest entry, with the mean of their masses
            ring[entry % window] = mass[queries].sum(axis=0, dtype=np.float64) / len(queries)
            entry += 1
        if name == "snapkv":  # the max over the cached tokens within pool // 2 positions; ties: the token's own
            own = ring.sum(axis=0)
            score = {k: (max(own[j] for j in candidates if abs(j - k) <= pool // 2), own[k]) for k in candidates}
        else:
            score = {k: rule(k, current, mass, acc, norm) for k in candidates}
        pinned = {k: k < sinks or k > current - recent for k in candidates}
        order = sorted(candidates, key=lambda k: (pinned[k], score[k]), reverse=True)
        kept = sorted(order[:M])
        history.append(kept)
    return history[len(blocks) - STEPS - 1:], logits[prompt:length]


def run_policy(model, sequences, policy, controller):
    """The same through DecodeSession: kept positions per row after the prefill and each step, and logits."""
    session = DecodeSession(model, [row[:p].tolist() for row, p in zip(sequences, PROMPTS)], STEPS, policy,
                            controller=controller)
    session.prefill()
    session.start([row[p] for row, p in zip(sequences, PROMPTS)])

    def kept_now():
        positions, valid = np.asarray(session.cache.slot_positions), np.asarray(session.cache.slot_valid)
        return [sorted(positions[b][valid[b]].tolist()) for b in range(len(sequences))]

    history, logits = [kept_now()], []
    for step in range(STEPS):
        forced = [[row[p + step + 1] if p + step + 1 < len(row) else 0] for row, p in zip(sequences, PROMPTS)]
        out = session.decode(1, forced=np.asarray(forced), return_logits=True)
        history.append(kept_now())
        logits.append(np.asarray(out.logits[:, 0]))
    return history, np.stack(logits, axis=1)  # [STEPS + 1][B] lists, [B, STEPS, V]


CASES = [
    ("window", {}),
    ("streaming_llm", dict(sinks=2)),
    ("h2o", {}),  # recent = m / 2
    ("h2o", dict(recent=2)),  # mostly heavy hitters
    ("tova", {}),
    ("tova", dict(sinks=1, recent=1)),
    ("key_norm", {}),
    ("key_norm", dict(sinks=1)),
    ("adore", {}),
    ("adore", dict(sinks=2, recent=3)),
    ("adore", dict(attention_weight=2.0)),
    ("adore", dict(attention_weight=0.0)),
    ("adore", dict(attention_weight=50.0)),  # the term decides: a test of its statistic
    ("random", dict(seed=7)),
    ("snapkv", {}),  # window 32 > m: recent = m, every kept token is in the window
    ("snapkv", dict(window=3, pool=3)),  # recent = 3
    ("snapkv", dict(window=5, pool=3, recent=1)),  # the second prompt's last chunk (3 queries) fills part of the ring
]
RECALL = Recall(r=3)  # every scorer composed with a recall from the store, from layer 0
RECALL_CASES = [(name, dict(options, returns=RECALL)) for name, options in CASES if name != "adore" or not options]
RECALL_CASES += [("tova", dict(returns=Recall(r=2, from_layer=1)))]


def case_id(case):
    if isinstance(case, str):
        return case
    return "-".join(f"{k}{v.label.replace(' ', '') if k == 'returns' else v}" for k, v in case.items()) or "default"


@pytest.mark.parametrize("name, options", CASES + RECALL_CASES, ids=case_id)
def test_kept_set_and_logits_equal_the_event_reference(model, name, options):
    rng = np.random.default_rng(5)
    sequences = [rng.integers(3, model.config.vocab_size, p + STEPS).astype(np.int32) for p in PROMPTS]
    policy = make_policy(name, cache_size=M, prefill_chunk=CHUNK, **options)
    filled = policy.validate(max_length=128)  # the policy's own defaults (streaming's recent, h2o's recent)
    controller = distance_controller(model.config.hidden_size, DISTANCE_SCORES) if name == "adore" else None
    history, logits = run_policy(model, sequences, policy, controller)
    recall = (policy.returns.from_layer, policy.returns.r) if policy.returns.r else (0, 0)
    for row, (tokens, prompt) in enumerate(zip(sequences, PROMPTS)):
        observation = (filled.window, filled.pool) if name == "snapkv" else (1, 1)
        expected, expected_logits = simulate(model, tokens, prompt, name, filled.sinks, filled.recent,
                                             getattr(filled, "attention_weight", 0.0), recall, observation)
        got = [kept[row] for kept in history]
        assert got == expected, f"row {row}: kept sets after the prefill and each step differ"
        assert all(len(kept) == M for kept in got)  # prompts of 35-40 tokens: the prefill released
        np.testing.assert_allclose(logits[row], expected_logits, atol=1e-4)
        if recall[1]:
            _, alone = simulate(model, tokens, prompt, name, filled.sinks, filled.recent,
                                getattr(filled, "attention_weight", 0.0), observation=observation)
            assert np.max(np.abs(alone - expected_logits)) > 1e-3, "recall changed nothing: the case proves nothing"
    if name == "random" and not policy.returns.r:  # a control must not be a recency rule, and its seed must matter
        other, _ = run_policy(model, sequences, make_policy(name, cache_size=M, prefill_chunk=CHUNK, seed=8), None)
        assert other[0] != history[0] and history[0][0] != list(range(PROMPTS[0] - M, PROMPTS[0]))


@pytest.mark.parametrize("build, message", [
    (lambda: make_policy("tova", cache_size=8, returns=Rebuild(r=2)), "ranked_by='attention'"),
    (lambda: make_policy("window", cache_size=4, sinks=8), "sinks + recent"),
    (lambda: make_policy("adore", cache_size=4, returns=Rebuild(r=4)), "r (R=4) must be < cache_size"),
    (lambda: make_policy("full", returns=Recall(r=2)), "keeps every token"),
    (lambda: Rebuild(r=2, ranked_by="attention", adaptive=True), "needs ranked_by='scorer'"),
    (lambda: Rebuild(r=2, margin=0.5), "margin applies to adaptive"),
    (lambda: Rebuild(r=0), "r (rebuilt tokens per step) must be an integer >= 1"),
    (lambda: Recall(r=40, page_size=16, pages=2), "pages must be an integer >= 3"),
    (lambda: Recall(r=2, pages=4), "pages applies with page_size > 0"),
    (lambda: make_policy("adore", cache_size="64"), "cache_size"),
    (lambda: make_policy("h2o", returns={"type": "recall", "rank": 2}), "has no option 'rank'"),
    (lambda: make_policy("snapkv", window=0), "window must be an integer >= 1 for policy 'snapkv'; got 0"),
    (lambda: make_policy("snapkv", pool=4), "pool must be an odd integer >= 1 for policy 'snapkv'; got 4"),
    (lambda: make_policy("snapkv", pool=0), "pool must be an integer >= 1 for policy 'snapkv'; got 0"),
    (lambda: make_policy("snapkv", cache_size=8, returns=Rebuild(r=2)), "ranked_by='attention'"),
])
def test_an_impossible_combination_cannot_be_built(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def update_with_mass(policy, state, block, mass, last_row):
    """The policy's update from per-query masses [B, Q, S], weighted over the queries as forward_block does."""
    return policy.update(state, block, jnp.einsum("bq,bqs->bs", policy.mass_weights(block, last_row), mass), last_row)


def test_h2o_statistic_restarts_for_a_new_token_in_a_reused_slot():
    """A slot written by the block holds a new token: its mass is what the block gave it, nothing of the
    released token that held the slot before; every other slot accumulates."""
    policy = H2O(cache_size=4)
    state = jnp.array([[5.0, 1.0, 2.0, 7.0, 0.0, 0.0]])
    block = BlockInput(tokens=jnp.array([[1, 2]]), positions=jnp.array([[9, 10]]), slots=jnp.array([[3, 5]]),
                       valid=jnp.array([[True, False]]))  # the second row is padding: its attention is ignored
    mass = jnp.array([[[0.1, 0.2, 0.3, 0.4, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0, 9.0, 9.0]]])  # [B, Q, S]
    new = update_with_mass(policy, state, block, mass, jnp.zeros((1,), jnp.int32))
    np.testing.assert_allclose(np.asarray(new), [[5.1, 1.2, 2.3, 0.4, 0.0, 0.0]], rtol=1e-6)


def test_snapkv_window_is_a_chunks_last_queries_or_a_steps_current_one():
    """The rows whose attention is the block's window mass: a prefill chunk's last min(w, valid) valid rows
    (right-padded, or right-aligned as a continuation), a decode step's current row and not the released tokens
    a return path runs with it, even when the block has as many rows as a prefill chunk."""
    def weights(window, positions, valid, last_row):
        block = BlockInput(tokens=jnp.zeros((1, len(positions)), jnp.int32), positions=jnp.array([positions]),
                           slots=jnp.zeros((1, len(positions)), jnp.int32), valid=jnp.array([valid]))
        return np.asarray(SnapKV(window=window).mass_weights(block, jnp.array([last_row]))[0]).tolist()

    assert weights(3, [10, 11, 12, 13, 14, 15], [1, 1, 1, 1, 1, 0], 4) == [0, 0, 1, 1, 1, 0]  # right-padded
    assert weights(8, [10, 11, 12, 13, 14, 15], [1, 1, 1, 1, 1, 0], 4) == [1, 1, 1, 1, 1, 0]  # fewer than w
    assert weights(3, [0, 0, 0, 1, 2, 3], [0, 0, 1, 1, 1, 1], 5) == [0, 0, 0, 1, 1, 1]  # right-aligned
    assert weights(8, [0, 0, 0, 1, 2, 3], [0, 0, 1, 1, 1, 1], 5) == [0, 0, 1, 1, 1, 1]
    assert weights(3, [0, 1, 2, 3], [0, 0, 0, 0], 0) == [0, 0, 0, 0]  # a chunk past the prompt's end
    assert weights(3, [4, 1, 20], [1, 1, 1], 2) == [0, 0, 1]  # a rebuild step: two released tokens, then current
    assert weights(3, [4, 19, 20], [1, 0, 1], 2) == [0, 0, 1]  # ... a pick not wanted
    assert weights(3, [18, 19, 20], [1, 1, 1], 2) == [1, 1, 1]  # a prefill chunk as long as that step


def test_snapkv_ring_takes_the_oldest_entries_and_restarts_written_slots():
    """A block's k window queries overwrite the k oldest ring entries with their mean mass, after the slots the
    block wrote are zeroed in every entry; the next block starts after them."""
    policy = SnapKV(cache_size=4, window=3)
    ring = jnp.arange(1.0, 13.0).reshape(1, 4, 3)  # [B, S, w]: slot s, entry e holds 3 s + e + 1
    state = SnapKVState(ring, jnp.array([2], jnp.int32))  # entry 2 is the oldest
    step = BlockInput(tokens=jnp.array([[5]]), positions=jnp.array([[9]]), slots=jnp.array([[1]]),
                      valid=jnp.array([[True]]))
    mass = jnp.array([[[0.1, 0.2, 0.3, 0.4]]])  # [B, Q, S]
    new = update_with_mass(policy, state, step, mass, jnp.zeros((1,), jnp.int32))
    np.testing.assert_allclose(np.asarray(new.ring), [[[1, 2, 0.1], [0, 0, 0.2], [7, 8, 0.3], [10, 11, 0.4]]],
                               rtol=1e-6)
    assert int(new.oldest[0]) == 0
    chunk = BlockInput(tokens=jnp.array([[1, 2, 3]]), positions=jnp.array([[10, 11, 12]]),
                       slots=jnp.array([[0, 3, 2]]), valid=jnp.array([[True, True, False]]))
    mass = jnp.array([[[1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0], [9.0, 9.0, 9.0, 9.0]]])
    newer = update_with_mass(policy, new, chunk, mass, jnp.ones((1,), jnp.int32))
    np.testing.assert_allclose(np.asarray(newer.ring), [[[2, 2, 0], [3, 3, 0.2], [4, 4, 0], [5, 5, 0]]],
                               rtol=1e-6)  # two window queries: entries 0 and 1 hold their mean; slots 0, 2, 3 new
    assert int(newer.oldest[0]) == 2


def test_snapkv_keeps_its_window_and_runs_with_an_attention_ranked_rebuild(model):
    """recent defaults to min(w, m - sinks); with Rebuild (ranked by attention) every step keeps m tokens, the
    window's among them."""
    assert make_policy("snapkv", cache_size=M, sinks=2).validate(128).recent == M - 2
    assert make_policy("snapkv", cache_size=M, window=4).validate(128).recent == 4
    rng = np.random.default_rng(5)
    sequences = [rng.integers(3, model.config.vocab_size, p + STEPS).astype(np.int32) for p in PROMPTS]
    policy = make_policy("snapkv", cache_size=M, prefill_chunk=CHUNK, window=4, pool=3,
                         returns=Rebuild(r=2, ranked_by="attention"))
    history, _ = run_policy(model, sequences, policy, None)
    for step, kept in enumerate(history):
        for row, prompt in enumerate(PROMPTS):
            current = prompt - 1 + step
            assert len(kept[row]) == M and set(range(current - 3, current + 1)) <= set(kept[row])
