"""LoRA: merged == unmerged, zero B leaves logits unchanged, the export loads through load_model."""
import jax
import jax.numpy as jnp
import numpy as np

import adore_jax
from adore_jax.train import lora
from adore_jax.train.forward import forward_logits, make_attention
from adore_jax.train.testing import tiny_model


def _logits(params, config, tokens, attention="full"):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return forward_logits(params, config, tokens, positions, make_attention(attention, top_k=4, impl="ref"))


def _random_adapters(params, targets):
    adapters = lora.init_lora(params, 4, targets, jax.random.key(1))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)


def test_merged_equals_unmerged():
    model = tiny_model()
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 2, 258)
    adapters = _random_adapters(model.params, lora.TARGETS)
    for attention in ("full", "topk"):
        unmerged = _logits(lora.apply_lora(model.params, adapters, 2.0), model.config, tokens, attention)
        merged = _logits(lora.merge_lora(model.params, adapters, 2.0), model.config, tokens, attention)
        scale = float(jnp.max(jnp.abs(merged)))
        assert float(jnp.max(jnp.abs(merged - unmerged))) <= 1e-5 * max(scale, 1.0)
        assert float(jnp.max(jnp.abs(merged - _logits(model.params, model.config, tokens, attention)))) > 1e-3


def test_zero_b_leaves_logits_unchanged():
    model = tiny_model()
    tokens = jax.random.randint(jax.random.key(4), (1, 10), 2, 258)
    adapters = lora.init_lora(model.params, 8, ("wq", "wk", "wv", "wo", "w_up"), jax.random.key(0))
    base = _logits(model.params, model.config, tokens)
    with_adapters = _logits(lora.apply_lora(model.params, adapters, 2.0), model.config, tokens)
    np.testing.assert_array_equal(np.asarray(with_adapters), np.asarray(base))
    # the full-sequence training forward is the model's own forward
    direct = adore_jax.model.forward(model.params, model.config, tokens)
    np.testing.assert_allclose(np.asarray(base), np.asarray(direct), atol=1e-5)


def test_export_loads_through_load_model(tmp_path):
    model = tiny_model()
    merged = lora.merge_lora(model.params, _random_adapters(model.params, ("wq", "wo")), 2.0)
    lora.export_hf(str(tmp_path / "hf"), merged, model.config)
    loaded = adore_jax.load_model(str(tmp_path / "hf"))
    assert loaded.config.num_kv_heads == model.config.num_kv_heads
    tokens = jnp.arange(2, 14)[None]
    np.testing.assert_allclose(np.asarray(_logits(loaded.params, loaded.config, tokens)),
                               np.asarray(_logits(merged, model.config, tokens)), atol=1e-5)


def test_bad_lora_targets_refused():
    import pytest
    with pytest.raises(ValueError, match="subset of"):
        lora.init_lora(tiny_model().params, 4, ("wq", "w_qkv"), jax.random.key(0))
