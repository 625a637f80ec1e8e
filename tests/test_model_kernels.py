"""The model with the Pallas slot-attention kernel selected (interpreted on CPU) equals the jnp twin;
the training forward, with and without remat, equals the cached forward on the same layer loop."""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adore_jax
from adore_jax import controller as ctrl
from adore_jax.model import forward
from adore_jax.train.forward import forward_logits, full_attention
from adore_jax.train.testing import tiny_model as tiny_train_model


@pytest.mark.parametrize("options", [dict(policy="full"), dict(policy="h2o", cache_size=6),
                                     dict(policy="adore", cache_size=6, returns=dict(type="rebuild", r=2))],
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
    """A full-attention cache of >= SLOT_BLOCK slots: "auto" on the CPU runs the prefill chunks
    through `slot_attention_blocked` (only the filled slot blocks), with the twin's logits."""
    module = importlib.import_module("pallas_kernels.slot_attention")  # the package re-exports the function
    calls = []
    blocked = module.slot_attention_blocked
    monkeypatch.setattr(module, "slot_attention_blocked", lambda *a, **k: calls.append(a[1].shape) or blocked(*a, **k))
    model = dataclasses.replace(tiny_model, config=dataclasses.replace(tiny_model.config, max_position_embeddings=2048))
    tokens = np.random.default_rng(6).integers(3, 97, size=(2, 1100)).astype(np.int32)
    results = {impl: adore_jax.teacher_force(model, tokens, 1090, attention_impl=impl, return_logits=True)
               for impl in ("auto", "ref")}
    assert calls and all(k_shape[1] >= module.SLOT_BLOCK for k_shape in calls)
    np.testing.assert_allclose(results["auto"][1], results["ref"][1], atol=2e-5)
    np.testing.assert_allclose(results["auto"][0], results["ref"][0], atol=2e-5)


def test_training_forward_equals_cached_forward_and_remat_keeps_gradients():
    model = tiny_train_model()
    tokens = jnp.asarray(np.random.default_rng(7).integers(2, 258, size=(2, 11)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), tokens.shape)

    def loss(params, remat):
        logits = forward_logits(params, model.config, tokens, positions, full_attention, remat)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    assert str(jax.make_jaxpr(loss, static_argnums=1)(model.params, True)).count("remat") == 2  # one per layer
    np.testing.assert_allclose(forward_logits(model.params, model.config, tokens, positions, full_attention),
                               forward(model.params, model.config, tokens), atol=1e-5)
    plain, rematted = (jax.jit(jax.grad(loss), static_argnums=1)(model.params, remat) for remat in (False, True))
    for got, want in zip(jax.tree.leaves(rematted), jax.tree.leaves(plain)):
        np.testing.assert_allclose(got, want, atol=1e-6)
