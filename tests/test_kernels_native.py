"""The Pallas kernels compiled for the machine's accelerator (no interpret mode) against their jnp
twins, the model with the kernel against the model with the twin, on shapes of real models.
Skipped on the CPU (CI); `scripts/device_check.sh` runs them on a lent GPU or TPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_kernels_prefill_attention as prefill_cases
import test_kernels_slot_attention as slot_cases
import test_kernels_topk as topk_cases

from pallas_kernels import slot_attention, slot_attention_ref, topk_attention, topk_attention_ref

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                                reason="needs a GPU or TPU backend (the kernels run interpreted in the other tests)")

# f32 on an accelerator: the kernels' dots may use TF32 / bf16 passes where XLA's twin uses HIGHEST.
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
# (batch, Q, H, G, D, S): the interpreted grid, then SmolLM2-like (GQA 3, D 64) and 7B-like (GQA 4 and 8,
# D 128) shapes, with slot counts that are not a multiple of any block.
SLOT_SHAPES = [s for s in slot_cases.GRID if s[4] >= 16] + [
    (8, 1, 9, 3, 64, 1025), (8, 9, 9, 3, 64, 521), (4, 9, 32, 8, 128, 4105), (16, 1, 32, 4, 128, 2049)]


def _close(actual, expected, dtype):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SLOT_SHAPES, ids=lambda s: "B{}-Q{}-H{}-G{}-D{}-S{}".format(*s))
def test_slot_attention_native(shape, dtype):
    inputs = slot_cases.make_inputs(0, *shape, dtype=dtype)
    out, mass = jax.jit(functools.partial(slot_attention, return_mass=True, impl="pallas"))(*inputs)
    ref_out, ref_mass = jax.jit(functools.partial(slot_attention_ref, return_mass=True))(*inputs)
    _close(out, ref_out, dtype)
    _close(mass, ref_mass, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 128, 9, 3, 64, 1000), (1, 300, 32, 8, 128, 4100)],
                         ids=lambda s: "B{}-Q{}-H{}-G{}-D{}-S{}".format(*s))
def test_prefill_attention_native(shape, dtype):
    """A prefill chunk (Q >= PREFILL_MIN_QUERIES: the prefill kernel) over a shuffled cache and over a
    position-ordered one filled to a third and to the end, where it skips slot blocks."""
    batch, n_slots = shape[0], shape[-1]
    _, ordered = prefill_cases.ordered_chunk(1, *shape, filled=[n_slots // 3, n_slots][:batch], dtype=dtype)
    for inputs in (slot_cases.make_inputs(0, *shape, dtype=dtype), ordered):
        out, mass = jax.jit(functools.partial(slot_attention, return_mass=True, impl="pallas"))(*inputs)
        ref_out, ref_mass = jax.jit(functools.partial(slot_attention_ref, return_mass=True))(*inputs)
        _close(out, ref_out, dtype)
        _close(mass, ref_mass, dtype)
        _close(jax.jit(functools.partial(slot_attention, impl="pallas"))(*inputs), ref_out, dtype)


@pytest.mark.parametrize("shape", [(2, 256, 6, 2, 64, 32), (1, 1024, 32, 8, 128, 64)],
                         ids=lambda s: "B{}-N{}-H{}-G{}-D{}-K{}".format(*s))
def test_topk_attention_native_forward_and_grad(shape):
    batch, n, n_heads, n_kv, head_dim, top_k = shape
    q, k, v = topk_cases.make_inputs(1, batch, n, n_heads, n_kv, head_dim)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, top_k)))
    native = jax.jit(jax.value_and_grad(loss(functools.partial(topk_attention, impl="pallas")), argnums=(0, 1, 2)))
    twin = jax.jit(jax.value_and_grad(loss(topk_attention_ref), argnums=(0, 1, 2)))
    (value, grads), (ref_value, ref_grads) = native(q, k, v), twin(q, k, v)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        _close(got, want, jnp.float32)


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory):
    """A random 2-layer model with SmolLM2-135M's attention shapes (9 query heads, 3 KV heads, D = 64):
    the real checkpoint (about 90 MB) does not travel to a lent machine."""
    from conftest import save_tiny_hf

    import adore_jax

    directory, _ = save_tiny_hf(tmp_path_factory.mktemp("smollm2_shaped"), dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=2048))
    return adore_jax.load_model(directory)


@pytest.mark.parametrize("policy", ["full", "h2o", "adore"])
def test_model_with_native_kernel_matches_twin(smollm2_shaped, policy):
    import adore_jax
    from adore_jax import controller as ctrl

    options = dict(policy=policy)
    if policy != "full":
        options["cache_size"] = 64
    if policy == "adore":
        config = ctrl.ControllerConfig(embed_dim=576, width=32, hidden=16)
        options.update(returns=dict(type="rebuild", r=4),
                       controller=(config, ctrl.init_controller(config, jax.random.key(3))))
    tokens = np.random.default_rng(2).integers(3, 97, size=(2, 160)).astype(np.int32)
    results = {impl: adore_jax.teacher_force(smollm2_shaped, tokens, 96, attention_impl=impl, **options)
               for impl in ("pallas", "ref")}
    np.testing.assert_allclose(results["pallas"], results["ref"], atol=2e-3)
