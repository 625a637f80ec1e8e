"""The controller's parallel (sequence) and one-step (decoding) forms agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adore_jax
from adore_jax import controller as ctrl
from adore_jax.policies import Rebuild


@pytest.mark.parametrize("form, content", [("static", 0), ("query_aware", 0), ("query_aware", 3)],
                         ids=["static", "query_aware", "query_aware-content"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "log_buckets"])
def test_parallel_and_one_step_forms_agree(form, content, positions):
    config = ctrl.ControllerConfig(embed_dim=12, width=6, hidden=5, score_form=form, position_embedding=positions,
                                   max_positions=64, content_dim=content)
    params = ctrl.init_controller(config, jax.random.key(0))
    embeddings = jax.random.normal(jax.random.key(1), (2, 20, 12))
    states, features, final = ctrl.encode_sequence(config, params, embeddings)
    z = jnp.zeros((2, 6))
    for t in range(20):
        z = ctrl.gru_step(params, z, ctrl.embed_inputs(params, embeddings[:, t]))
        np.testing.assert_allclose(states[:, t], z, atol=1e-6)
    np.testing.assert_allclose(final, z, atol=1e-6)
    pairwise = ctrl.pairwise_scores(config, params, states, features)  # [B, T, T]
    table = ctrl.distance_table(config, params, 20)
    for t in (0, 7, 19):
        one = ctrl.score(config, params, features, jnp.arange(20), states[:, t], jnp.full((2,), t))
        with_table = ctrl.score(config, params, features, jnp.arange(20), states[:, t], jnp.full((2,), t), table)
        np.testing.assert_allclose(pairwise[:, t], one, atol=1e-5)
        np.testing.assert_allclose(with_table[:, :t + 1], one[:, :t + 1], atol=1e-5)
    if form == "query_aware":
        assert not np.allclose(pairwise[:, 5, :5], pairwise[:, 19, :5]), "query-aware scores must change with t"
    else:
        np.testing.assert_allclose(pairwise[:, 5, :5], pairwise[:, 19, :5], atol=1e-6)


def test_content_term_is_the_scaled_dot_product_of_query_and_key():
    config = ctrl.ControllerConfig(embed_dim=12, width=6, hidden=5, content_dim=4)
    params = ctrl.init_controller(config, jax.random.key(0))
    states, features, _ = ctrl.encode_sequence(config, params, jax.random.normal(jax.random.key(1), (1, 9, 12)))
    assert features.shape == (1, 9, 5 + 4)
    t = jnp.array([8])
    with_term = ctrl.score(config, params, features, jnp.arange(9), states[:, 8], t)
    plain = dict(params, query=jnp.zeros_like(params["query"]))
    without = ctrl.score(config, plain, features, jnp.arange(9), states[:, 8], t)
    query = np.asarray(states[0, 8]) @ np.asarray(params["query"])
    expected = (np.asarray(states[0]) @ np.asarray(params["key"])) @ query
    np.testing.assert_allclose(np.asarray(with_term - without)[0], expected / 2.0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="content_dim must be >= 0, and 0 unless score_form='query_aware'"):
        ctrl.ControllerConfig(embed_dim=4, score_form="static", content_dim=2)


def test_log_buckets_are_exact_then_log_spaced_then_clipped():
    distances = np.array([0, 1, 15, 16, 18, 19, 20, 31, 32, 64, 100, 1000, 10 ** 5, 10 ** 7])
    buckets = np.asarray(ctrl.distance_bucket(jnp.asarray(distances), 64))
    by_numpy = [d if d < 16 else min(63, 16 + int(np.floor(4 * np.log2(d / 16)))) for d in distances]
    np.testing.assert_array_equal(buckets, by_numpy)
    assert buckets.tolist()[:4] == [0, 1, 15, 16] and buckets[8] == 20 and buckets[-1] == buckets[-2] == 63
    assert np.all(np.diff(buckets) >= 0)
    config = ctrl.ControllerConfig(embed_dim=4, width=6, hidden=5, position_embedding="log_buckets", buckets=32)
    params = ctrl.init_controller(config, jax.random.key(0))
    assert params["positions"].shape == (32, 6)
    table = np.asarray(ctrl.distance_table(config, params, 70000))  # far beyond any training row
    np.testing.assert_array_equal(table[65536], table[69999])  # the last bucket: beyond it, one embedding
    assert not np.allclose(table[16], table[20])


def test_decoding_buffer_holds_the_parallel_forms_features(tiny_model):
    """After chunked prefill and decoding, the release buffer equals the sequence form over all tokens."""
    config = ctrl.ControllerConfig(embed_dim=tiny_model.config.hidden_size, width=8, hidden=4)
    params = ctrl.init_controller(config, jax.random.key(3))
    prompt = list(range(5, 26))  # 21 tokens: two prefill chunks of 16
    out = adore_jax.generate(tiny_model, [prompt], max_new_tokens=10, policy="adore", cache_size=8,
                             returns=Rebuild(r=2), controller=(config, params), prefill_chunk=16, return_state=True)
    seen = prompt + out.token_ids[0][:-1]  # the last generated token was never fed back
    embeddings = tiny_model.params["embed"][jnp.asarray([seen])]
    _, features, final = ctrl.encode_sequence(config, params, embeddings)
    state = out.policy_state  # the controller's features and GRU state; the rebuild's token ids
    np.testing.assert_array_equal(np.asarray(state.returns.token_ids[0, :len(seen)]), seen)
    np.testing.assert_allclose(np.asarray(state.scorer.features[0, :len(seen)]), np.asarray(features[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.scorer.gru), np.asarray(final), atol=1e-5)
    assert int(state.return_steps) == 10  # the prompt's last token, then the 9 generated tokens fed back


def test_bad_controller_config_is_refused():
    with pytest.raises(ValueError, match="score_form must be one of"):
        ctrl.ControllerConfig(embed_dim=4, score_form="dynamic")
    with pytest.raises(ValueError, match="controller width must be >= 1"):
        ctrl.ControllerConfig(embed_dim=4, width=0)
