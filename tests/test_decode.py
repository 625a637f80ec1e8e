"""The cache and the decode loop against the plain full forward; batching, sampling, compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adore_jax
from adore_jax import cache as kv_cache
from adore_jax import decode, timing
from adore_jax.model import forward
from adore_jax.sampling import sample


def _full_plan(config):
    return decode.DecodePlan(config, adore_jax.Full())


def test_incremental_decoding_matches_full_forward(tiny_model):
    """Prefill 5 tokens, then teacher-force the rest: every step's logits equal the full forward's."""
    config, params = tiny_model.config, tiny_model.params
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 40)).astype(np.int32)
    full = np.asarray(forward(params, config, tokens))  # [B, T, V]
    prompt, plan = 5, _full_plan(config)
    cache = kv_cache.init_cache(config, 2, 64)
    ps = decode.init_policy_state(plan, 2, 64, 64)
    padded = np.zeros((2, 16), np.int32)
    padded[:, :prompt] = tokens[:, :prompt]
    logits, cache, ps = decode.prefill(params, {}, cache, ps, padded, np.full(2, prompt, np.int32), plan=plan,
                                       chunk=16)
    np.testing.assert_allclose(np.asarray(logits), full[:, prompt - 1], atol=1e-4)
    state = decode.DecodeState(jnp.asarray(tokens[:, prompt]), jnp.full(2, prompt, jnp.int32), jnp.zeros(2, bool),
                               jax.random.split(jax.random.key(0), 2))
    steps = tokens.shape[1] - prompt - 1
    out, *_ = decode.decode(params, {}, cache, ps, state, 1.0, 0, 1.0, tokens[:, prompt + 1:], plan=plan,
                            num_steps=steps, greedy=True, pad_id=0, return_logits=True)
    np.testing.assert_allclose(np.asarray(out.logits), full[:, prompt:-1], atol=1e-4)


def test_chunked_prefill_matches_single_chunk(tiny_model):
    config, params = tiny_model.config, tiny_model.params
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 64)).astype(np.int32)
    lengths = np.array([64, 37], np.int32)
    results, plan = [], _full_plan(config)
    for chunk in (64, 16):
        cache = kv_cache.init_cache(config, 2, 64)
        ps = decode.init_policy_state(plan, 2, 64, 64)
        logits, _, _ = decode.prefill(params, {}, cache, ps, tokens, lengths, plan=plan, chunk=chunk)
        results.append(np.asarray(logits))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)
    full = np.asarray(forward(params, config, tokens))
    np.testing.assert_allclose(results[1][1], full[1, 36], atol=1e-4)


def test_padded_batch_equals_each_prompt_alone(tiny_model):
    prompts = [[5, 17, 33, 2 + 1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55], [9, 8], [60] * 7]
    batch = adore_jax.generate(tiny_model, prompts, max_new_tokens=12)
    for prompt, ids in zip(prompts, batch.token_ids):
        alone = adore_jax.generate(tiny_model, [prompt], max_new_tokens=12)
        assert alone.token_ids[0] == ids
    assert len(set(map(tuple, batch.token_ids))) > 1, "different prompts should give different outputs"


def test_second_call_in_same_bucket_does_not_recompile(tiny_model):
    adore_jax.generate(tiny_model, [[3] * 20, [4] * 9], max_new_tokens=6)
    with timing.track_compiles() as stats:
        out = adore_jax.generate(tiny_model, [[5] * 27, [6] * 30], max_new_tokens=6)  # same bucket (32)
    assert stats.count == 0, f"{stats.count} compilations for a prompt length in an already-compiled bucket"
    assert out.stats["compiles"] == 0
    with timing.track_compiles() as stats:
        adore_jax.generate(tiny_model, [[5] * 40, [6] * 30], max_new_tokens=6)  # next bucket (64)
    assert stats.count > 0, "the compile counter saw nothing: it cannot detect recompiles"


def test_eos_stops_each_sequence(tiny_model):
    """A sequence stops at its end-of-sequence token; the other keeps going."""
    config = tiny_model.config
    free = adore_jax.generate(tiny_model, [[7, 8, 9], [10, 11]], max_new_tokens=8)
    eos_token = free.token_ids[0][2]  # make sequence 0's third token the end-of-sequence token
    import dataclasses
    stopping = dataclasses.replace(tiny_model, config=dataclasses.replace(config, eos_token_ids=(eos_token,)))
    out = adore_jax.generate(stopping, [[7, 8, 9], [10, 11]], max_new_tokens=8)
    assert out.token_ids[0] == free.token_ids[0][:free.token_ids[0].index(eos_token)]
    assert out.finish_reasons[0] == "eos"
    if eos_token not in free.token_ids[1]:
        assert out.token_ids[1] == free.token_ids[1] and out.finish_reasons[1] == "length"


def test_streaming_gives_the_same_tokens(tiny_model):
    chunks = []
    streamed = adore_jax.generate(tiny_model, [[1, 2, 3]], max_new_tokens=20, stream=chunks.append, decode_chunk=4)
    plain = adore_jax.generate(tiny_model, [[1, 2, 3]], max_new_tokens=20)
    assert streamed.token_ids == plain.token_ids
    assert len(chunks) == 1 + -(-19 // 4)
    assert np.concatenate(chunks, axis=1)[0].tolist()[:len(plain.token_ids[0])] == plain.token_ids[0]


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.jit(jax.vmap(lambda k, t, kk, p: sample(logits, k[None], t, kk, p, greedy=False)[0],
                            in_axes=(0, None, None, None)))
    assert set(np.asarray(draw(keys, 1.0, 0, 1.0)).tolist()) == {0, 1, 2, 3}
    assert set(np.asarray(draw(keys, 1.0, 2, 1.0)).tolist()) == {0, 1}  # top-k 2
    assert set(np.asarray(draw(keys, 1.0, 0, 0.7)).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(np.asarray(draw(keys, 1.0, 0, 0.5)).tolist()) == {0}
    assert set(np.asarray(draw(keys, 1.0, 3, 0.9)).tolist()) == {0, 1, 2}
    frequencies = np.bincount(np.asarray(draw(keys, 1.0, 0, 1.0)), minlength=4) / 400
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.07)
    cold = np.bincount(np.asarray(draw(keys, 0.1, 0, 1.0)), minlength=4) / 400
    assert cold[0] > 0.95
    assert int(sample(logits, keys[:1], 1.0, 0, 1.0, greedy=True)[0]) == 0


def test_seeded_sampling_is_reproducible(tiny_model):
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.9)
    a = adore_jax.generate(tiny_model, [[1, 2, 3]], seed=3, **kwargs)
    b = adore_jax.generate(tiny_model, [[1, 2, 3]], seed=3, **kwargs)
    c = adore_jax.generate(tiny_model, [[1, 2, 3]], seed=4, **kwargs)
    assert a.token_ids == b.token_ids != c.token_ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "prompts"),
    (dict(prompts="hello"), "prompts"),
    (dict(prompts=[[1], []]), r"prompts\[1\] is empty"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=300), r"max_new_tokens \(300\) exceeds the model's context of 256"),
    (dict(cache_size=8), "cache_size must be >= "),
    (dict(prompts=["text needs a tokenizer"]), "has no tokenizer"),
    (dict(prompts=[[1, 10 ** 6, 3]]), r"prompts\[0\] holds token id 1000000, outside the vocabulary \[0, 97\)"),
    (dict(prompts=[[1, 2], [-1, 5]]), r"prompts\[1\] holds token id -1"),
])
def test_bad_generate_arguments_are_refused(tiny_model, kwargs, message):
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        adore_jax.generate(tiny_model, args.pop("prompts"), **args)


@pytest.mark.parametrize("policy", [adore_jax.Full(), adore_jax.Adore(cache_size=8, returns=adore_jax.Rebuild(r=2))],
                         ids=["full", "adore"])
def test_decoding_past_max_length_is_refused_not_silently_dropped(tiny_model, policy):
    """A full cache has a slot per position and ADORE's release buffer an entry per position: both end at
    max_length. The step that would write past it is refused; the last step that fits runs."""
    controller = None
    if policy.needs_controller:
        config = adore_jax.ControllerConfig(embed_dim=tiny_model.config.hidden_size, width=8, hidden=4)
        controller = (config, adore_jax.controller.init_controller(config, jax.random.key(0)))
    session = adore_jax.DecodeSession(tiny_model, [[5, 6, 7]], 4, policy, controller=controller, max_length=16)
    session.prefill()
    session.start([8])
    session.decode(12)  # positions 3..14
    with pytest.raises(ValueError, match=r"decoding 2 steps would reach position 16, past this run's max_length \(16"):
        session.decode(2)
    session.decode(1)  # position 15, the last one
