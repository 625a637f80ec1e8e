"""Top-K attention: the twin's semantics (ties, short prefixes), the blocked and Pallas (interpreted)
versions and their custom_vjp gradients against the twin, validation, and kernel lowering."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import topk_attention, topk_attention_ref
from pallas_kernels._common import MASK_VALUE, kth_largest
from pallas_kernels._topk_flash import threshold_flash_attention
from pallas_kernels.topk_attention import _blocked_forward

from references import cpu_dispatch_only

TOL = 2e-6
GRAD_TOL = 1e-5


def make_inputs(seed, batch, n, n_heads, n_kv, head_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return normal(batch, n, n_heads, head_dim), normal(batch, n, n_kv, head_dim), normal(batch, n, n_kv, head_dim)


def causal_attention(q, k, v):
    """Full causal attention in numpy: what top-K must reduce to when it keeps everything."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    n = q.shape[1]
    logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", probs, v)


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_kth_largest_by_bisection_equals_sorting(k):
    rng = np.random.default_rng(0)
    rows = np.round(rng.standard_normal((5, 3, 33)) * 4, 1).astype(np.float32)  # many ties
    rows[0, 0] = [0.0, -0.0] * 16 + [np.inf]  # signed zeros, an infinity
    rows[0, 1, :20] = MASK_VALUE  # masked entries, as causal rows have
    rows[1, 2] = -np.inf
    rows[2] *= 1e-30  # tiny magnitudes, subnormals
    expected = -np.sort(-rows, axis=-1)[..., min(k, rows.shape[-1]) - 1]
    for chunk_bytes in (1 << 21, 4 * 33 * 4):  # one chunk; chunks of 4 rows, the last one padded
        np.testing.assert_array_equal(np.asarray(kth_largest(jnp.asarray(rows), k, chunk_bytes)), expected)


def test_twin_keeps_top_k():
    """top_k = 2: each row is a softmax over exactly its two largest causal logits."""
    q, k, v = make_inputs(0, 1, 7, 2, 1, 16)
    out = np.asarray(topk_attention_ref(q, k, v, 2))
    logits = np.einsum("bihd,bjd->bhij", np.asarray(q), np.asarray(k)[:, :, 0]) / 4.0
    for h in range(2):
        for i in range(7):
            row = logits[0, h, i, : i + 1]
            top = np.argsort(row)[-2:]
            p = np.exp(row[top] - row[top].max())
            p /= p.sum()
            np.testing.assert_allclose(out[0, i, h], p @ np.asarray(v)[0, top, 0], atol=1e-5)


def test_twin_short_prefix_and_ties():
    q, k, v = make_inputs(1, 2, 9, 6, 2, 16)
    # top_k >= N: every query keeps its whole causal prefix.
    assert_close(topk_attention_ref(q, k, v, 9), causal_attention(q, k, v), 1e-5)
    # One key repeated everywhere: all logits of a row tie, so top_k = 1 keeps them all.
    k_tied = jnp.broadcast_to(k[:, :1], k.shape)
    assert_close(topk_attention_ref(q, k_tied, v, 1), causal_attention(q, k_tied, v), 1e-5)


@cpu_dispatch_only
def test_top_k_validation():
    q, k, v = make_inputs(2, 1, 4, 2, 1, 16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be an int >= 1; got top_k="):
            topk_attention(q, k, v, bad)
        with pytest.raises(ValueError, match="top_k"):
            topk_attention_ref(q, k, v, bad)
    with pytest.raises(ValueError, match="impl must be one of .*'blocked'; got impl='flash'"):
        topk_attention(q, k, v, 2, impl="flash")
    with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
        topk_attention(q, k, v, 2, impl="pallas")


# (batch, N, H, G, D, top_k): GQA ratios 1 and 3 and 8, N not a multiple of the kernel blocks.
CASES = [(2, 37, 6, 2, 16, 5), (1, 40, 4, 4, 32, 12), (1, 24, 8, 1, 16, 3)]
IMPLS = {"blocked": None, "pallas_interpret": (8, 16)}  # impl -> kernel (block_q, block_k)


def jitted(impl, top_k):
    return jax.jit(functools.partial(topk_attention, top_k=top_k, impl=impl, kernel_blocks=IMPLS.get(impl)))


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-N{}-H{}-G{}-D{}-K{}".format(*c))
def test_forward_matches_twin(impl, case):
    *shape, top_k = case
    q, k, v = make_inputs(3, *shape)
    out = jitted(impl, top_k)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, jax.jit(topk_attention_ref, static_argnums=3)(q, k, v, top_k), TOL)


def test_gpu_kernel_matches_twin():
    """The Triton-flavoured pass-2 kernel (the dispatcher picks the Mosaic one on the CPU)."""
    q, k, v = make_inputs(4, 2, 37, 6, 2, 16)
    flash = functools.partial(threshold_flash_attention, platform="gpu", block_q=16, block_k=16, interpret=True)

    @jax.jit
    def run(q, k, v):
        return flash(q, k, v, _blocked_forward(q, k, v, 5, 16, with_output=False))[0]

    assert_close(run(q, k, v), topk_attention_ref(q, k, v, 5), TOL)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: "B{}-N{}-H{}-G{}-D{}-K{}".format(*c))
def test_gradients_match_twin(impl, case):
    *shape, top_k = case
    q, k, v = make_inputs(5, *shape)
    weights = make_inputs(6, *shape)[0]

    def grads(attention):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v) * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got = grads(jitted(impl, top_k))
    want = grads(lambda q, k, v: topk_attention_ref(q, k, v, top_k))
    for name, g, w in zip("qkv", got, want):
        assert float(jnp.abs(w).max()) > 1e-2, name  # a real gradient, not zeros on both sides
        assert_close(g, w, GRAD_TOL)


def test_bfloat16_forward():
    q, k, v = make_inputs(7, 1, 33, 6, 2, 32, dtype=jnp.bfloat16)
    out = jitted("pallas_interpret", 4)(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert_close(out, topk_attention_ref(q, k, v, 4), 2e-2)


@pytest.mark.parametrize("platform, flavour, custom_call", [
    ("tpu", "tpu", "tpu_custom_call"),
    ("cuda", "gpu", "__gpu$xla.gpu.triton"),
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_kernel_lowers(platform, flavour, custom_call, dtype):
    batch, n, n_heads, n_kv, head_dim = 2, 1000, 9, 3, 64
    args = (jax.ShapeDtypeStruct((batch, n, n_heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, n, n_kv, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, n, n_kv, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, n, n_heads), jnp.float32))
    f = jax.jit(functools.partial(threshold_flash_attention, platform=flavour))
    assert custom_call in f.trace(*args).lower(lowering_platforms=(platform,)).as_text()


@cpu_dispatch_only
def test_auto_uses_the_blocked_passes_when_the_twins_logits_would_be_too_large():
    """On the CPU, `auto` is the twin for small shapes and the blocked passes (no [B, H, T, T] array) above
    SCAN_BUDGET logits: the twin's memory is what made a 1024-token fine-tune ask for 40 GB."""
    import importlib

    import jax.extend.core
    module = importlib.import_module("pallas_kernels.topk_attention")  # the package exports the function

    def widest(length):
        q = jax.ShapeDtypeStruct((1, length, 2, 8), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)
        jaxpr = jax.make_jaxpr(lambda q, k, v: module.topk_attention(q, k, v, 4))(q, kv, kv)

        def sizes(jaxpr):
            for eqn in jaxpr.eqns:
                yield from (np.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    yield from sizes(sub)
        return max(sizes(jaxpr.jaxpr))

    small, large = 64, 6144  # 2 heads x 6144^2 logits > SCAN_BUDGET = 2^26
    assert 2 * large * large > module.SCAN_BUDGET
    assert widest(small) == 2 * small * small  # the twin: whole logits
    assert widest(large) < 2 * large * large // 4  # blocked: a block of queries at a time
