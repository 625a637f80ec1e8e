"""The model with the Pallas slot-attention kernel selected (interpreted on CPU) equals the jnp twin."""
import dataclasses
import importlib

import jax
import numpy as np
import pytest

import adore_jax
from adore_jax import controller as ctrl


@pytest.mark.parametrize("options", [dict(policy="full"), dict(policy="h2o", cache_size=6),
                                     dict(policy="adore", cache_size=6, rebuild=2)],
                         ids=lambda o: o["policy"])
def test_kernel_and_twin_give_the_same_logits(tiny_model, options):
    if options["policy"] == "adore":
        config = ctrl.ControllerConfig(embed_dim=tiny_model.config.hidden_size, width=8, hidden=4)
        options = dict(options, controller=(config, ctrl.init_controller(config, jax.random.key(2))))
    tokens = np.random.default_rng(5).integers(3, 97, size=(1, 14)).astype(np.int32)
    results = {impl: adore_jax.teacher_force(tiny_model, tokens, 4, attention_impl=impl, return_logits=True,
                                             prefill_chunk=4, **options)[1]
               for impl in ("ref", "pallas_interpret")}
    np.testing.assert_allclose(results["pallas_interpret"], results["ref"], atol=2e-5)


def test_large_full_cache_takes_the_blocked_path(tiny_model, monkeypatch):
    """A full-attention cache of >= 2 * SLOT_BLOCK slots: "auto" on the CPU runs the prefill chunks
    through `slot_attention_blocked` (only the filled slot blocks), with the twin's logits."""
    module = importlib.import_module("pallas_kernels.slot_attention")  # the package re-exports the function
    calls = []
    blocked = module.slot_attention_blocked
    monkeypatch.setattr(module, "slot_attention_blocked", lambda *a, **k: calls.append(a[1].shape) or blocked(*a, **k))
    model = dataclasses.replace(tiny_model, config=dataclasses.replace(tiny_model.config, max_position_embeddings=2048))
    tokens = np.random.default_rng(6).integers(3, 97, size=(2, 1100)).astype(np.int32)
    results = {impl: adore_jax.teacher_force(model, tokens, 1090, attention_impl=impl, return_logits=True)
               for impl in ("auto", "ref")}
    assert calls and all(k_shape[1] >= 2 * module.SLOT_BLOCK for k_shape in calls)
    np.testing.assert_allclose(results["auto"][1], results["ref"][1], atol=2e-5)
    np.testing.assert_allclose(results["auto"][0], results["ref"][0], atol=2e-5)
