"""The embedded sparse fine-tune `smollm2-135m-adore`: the base model with its committed adapter merged."""
import numpy as np
import pytest

import adore_jax
from adore_jax import weights
from adore_jax.adapters import merge_lora, read_adapter
from adore_jax.model import forward

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-adore"


@pytest.fixture(scope="module")
def tuned():
    return adore_jax.load_model(NAME)


def test_it_is_the_base_model_with_the_embedded_adapter_merged(smollm2, tuned):
    config, adapter = read_adapter(weights.EMBEDDED_ADAPTERS[NAME][1])
    assert config["base_model"] == weights.EMBEDDED_ADAPTERS[NAME][0] == smollm2.source
    tokens = np.asarray([smollm2.encode("The lighthouse keeper climbed the stairs and")])
    got = np.asarray(forward(tuned.params, tuned.config, tokens))
    merged = merge_lora(smollm2.params, adapter, config["alpha"] / config["rank"])
    np.testing.assert_allclose(got, np.asarray(forward(merged, smollm2.config, tokens)), atol=1e-5)
    assert np.max(np.abs(got - np.asarray(forward(smollm2.params, smollm2.config, tokens)))) > 1e-2
    assert tuned.source == NAME and weights.default_controller(NAME) != weights.default_controller(smollm2.source)


@pytest.mark.parametrize("policy", ["full", {"policy": "oracle_topk", "attn_top_k": 32},
                                    *[{"policy": name, "cache_size": 64} for name in ("window", "streaming_llm", "h2o",
                                                                                      "tova", "adore")],
                                    {"policy": "adore", "cache_size": 64, "returns": {"type": "rebuild", "r": 8}}])
@pytest.mark.e2e  # the real model under every policy: make test-slow
def test_it_generates_through_every_policy_with_its_own_controller(tuned, policy):
    prompt = "Tell me about lighthouses. " * 24  # about 150 tokens: more than the bounded caches hold
    out = adore_jax.generate(tuned, [prompt], 6, cache=policy)
    assert len(out.prompt_token_ids[0]) > 64
    assert len(out.token_ids[0]) == 6 or out.finish_reasons[0] != "length"


def test_a_second_adapter_on_the_embedded_fine_tune_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is 'smollm2-135m' with its embedded adapter merged"):
        adore_jax.load_model(NAME, adapter=str(tmp_path))
