"""Slot attention: the Pallas kernels (interpreted on the CPU) against the jnp twin, the twin against
a per-query numpy loop, the dispatcher, and lowering of both kernels for TPU and CUDA; and the shared
reference `masked_attention` (plain and top-K) against a numpy loop."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import slot_attention, slot_attention_ref
from pallas_kernels.reference import masked_attention
from pallas_kernels.slot_attention import (
    GROUPED_MAX_QUERIES,
    SLOT_BLOCK,
    grouped_rows,
    live_slots,
    slot_attention_blocked,
    slot_attention_gpu,
    slot_attention_grouped,
    slot_attention_tpu,
)

from references import cpu_dispatch_only

TOL = 2e-6


def make_inputs(seed, batch, n_q, n_heads, n_kv, head_dim, n_slots, valid_fraction=0.8, dtype=jnp.float32):
    """Random q/k/v, slots holding shuffled positions 0..S-1, the queries at the last Q positions.
    (numpy's generator: eager jax.random costs seconds per new shape.)"""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    q = normal(batch, n_q, n_heads, head_dim)
    k = normal(batch, n_slots, n_kv, head_dim)
    v = normal(batch, n_slots, n_kv, head_dim)
    slot_positions = jnp.asarray(np.stack([rng.permutation(n_slots) for _ in range(batch)]), jnp.int32)
    slot_valid = jnp.asarray(rng.random((batch, n_slots)) < valid_fraction)
    q_positions = jnp.broadcast_to(jnp.arange(n_slots - n_q, n_slots, dtype=jnp.int32), (batch, n_q))
    return q, k, v, q_positions, slot_positions, slot_valid


# (batch, Q, H, G, D, S): GQA ratios 1, 3 and 8; Q = 1 (R = 0) and 9 (R = 8); S not a multiple
# of the 16-slot test block (and, for the TPU kernel, of the 128 it rounds to).
GRID = [
    (1, 1, 2, 2, 16, 37),
    (3, 9, 6, 2, 32, 40),
    (1, 9, 8, 1, 16, 80),
    (3, 1, 24, 3, 16, 23),
]

KERNELS = {
    "tpu": functools.partial(slot_attention_tpu, block_slots=16, interpret=pltpu.InterpretParams()),
    "gpu": functools.partial(slot_attention_gpu, block_slots=16, n_split=2, interpret=True),
    "ref": slot_attention_ref,
    "grouped": slot_attention_grouped,
}


def run(kernel, inputs, return_mass=True):
    """Jitted: un-jitted, every op of the wrappers compiles on its own (seconds per call)."""
    return jax.jit(functools.partial(KERNELS[kernel], return_mass=return_mass))(*inputs)


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=0)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "B{}-Q{}-H{}-G{}-D{}-S{}".format(*s))
def test_kernel_matches_twin(kernel, shape):
    inputs = make_inputs(0, *shape)
    out, mass = run(kernel, inputs)
    ref_out, ref_mass = run("ref", inputs)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert mass.shape == ref_mass.shape and mass.dtype == jnp.float32
    assert_close(out, ref_out, TOL)
    assert_close(mass, ref_mass, TOL)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_kernel_without_mass(kernel):
    inputs = make_inputs(1, 2, 9, 6, 2, 16, 37)
    assert_close(run(kernel, inputs, return_mass=False), run("ref", inputs, return_mass=False), TOL)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_one_valid_slot(kernel):
    """All slots invalid but one: each row copies that slot's value or, if it lies in the row's
    future (batch 1), sees nothing and is zero."""
    q, k, v, q_positions, slot_positions, _ = make_inputs(2, 3, 9, 6, 2, 16, 37)
    target = jnp.array([5, 30, 12])
    slot_valid = jnp.arange(37)[None, :] == target[:, None]
    slot_positions = slot_positions.at[0, 5].set(0).at[2, 12].set(0)
    slot_positions = slot_positions.at[1, 30].set(100)  # after every query of batch 1
    inputs = (q, k, v, q_positions, slot_positions, slot_valid)
    out, mass = run(kernel, inputs)
    ref_out, ref_mass = run("ref", inputs)
    assert_close(out, ref_out, TOL)
    assert_close(mass, ref_mass, TOL)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    assert_close(out[0], jnp.repeat(v[0, 5], 3, axis=0)[None].repeat(9, axis=0), TOL)
    assert_close(mass[2].sum(-1), jnp.full((9, 2), 3.0), TOL)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_bfloat16(kernel):
    inputs = make_inputs(3, 2, 9, 6, 2, 32, 40, dtype=jnp.bfloat16)
    out, mass = run(kernel, inputs)
    ref_out, ref_mass = run("ref", inputs)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref_out, 2e-2)
    assert_close(mass, ref_mass, 2e-2)


def test_twin_matches_numpy_loop():
    q, k, v, q_positions, slot_positions, slot_valid = map(np.asarray, make_inputs(4, 2, 3, 6, 2, 16, 11))
    out, mass = run("ref", (q, k, v, q_positions, slot_positions, slot_valid))
    group = 3
    for b in range(2):
        for i in range(3):
            seen = slot_valid[b] & (slot_positions[b] <= q_positions[b, i])
            expected_mass = np.zeros((2, 11))
            for h in range(6):
                logits = k[b, :, h // group] @ q[b, i, h] / 4.0
                p = np.where(seen, np.exp(logits - logits[seen].max()), 0.0)
                p /= p.sum()
                np.testing.assert_allclose(out[b, i, h], p @ v[b, :, h // group], atol=1e-5)
                expected_mass[h // group] += p
            np.testing.assert_allclose(mass[b, i], expected_mass, atol=1e-6)


@cpu_dispatch_only
def test_dispatcher():
    inputs = make_inputs(5, 1, 1, 6, 2, 16, 20)
    ref = slot_attention_ref(*inputs, return_mass=True)
    for got, want in zip(slot_attention(*inputs, return_mass=True), ref):  # "auto" on the CPU: the twin
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    interpreted = jax.jit(functools.partial(slot_attention, return_mass=True, impl="pallas_interpret"))
    for got, want in zip(interpreted(*inputs), ref):
        assert_close(got, want, TOL)
    with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
        slot_attention(*inputs, impl="pallas")
    allowed = "'auto', 'ref', 'pallas', 'pallas_interpret', 'blocked', 'grouped'"
    with pytest.raises(ValueError, match=f"impl must be one of {allowed}; got impl='xla'"):
        slot_attention(*inputs, impl="xla")


@pytest.mark.parametrize("shape", GRID, ids=lambda s: "B{}-Q{}-H{}-G{}-D{}-S{}".format(*s))
def test_blocked_matches_twin(shape):
    """Blocks of 16 slots: S is not a multiple of 16, so the clamped last block overlaps."""
    inputs = make_inputs(7, *shape)
    blocked = jax.jit(functools.partial(slot_attention_blocked, block=16))
    assert_close(blocked(*inputs), run("ref", inputs, return_mass=False), TOL)


@pytest.mark.parametrize("shape", GRID, ids=lambda s: "B{}-Q{}-H{}-G{}-D{}-S{}".format(*s))
def test_grouped_matches_twin(shape):
    """The block-diagonal matmuls: every head's output and mass equal the twin's (rows that see nothing too)."""
    inputs = make_inputs(11, *shape, valid_fraction=0.5)
    q_positions = inputs[3].at[0, 0].set(-1)  # a query before every slot: sees nothing
    inputs = inputs[:3] + (q_positions,) + inputs[4:]
    for got, want in zip(run("grouped", inputs), run("ref", inputs)):
        assert_close(got, want, TOL)
    assert np.asarray(run("grouped", inputs)[0])[0, 0].any() == 0


def test_grouped_runs_sequences_in_groups_that_fit_the_budget(monkeypatch):
    """The largest divisor of the batch whose K fits the budget: 2 of 6 sequences fit, groups of 2; a prime batch or
    one sequence per group is the whole batch. With 4 in the budget, 6 sequences go in 2 groups of 3 (a `lax.map`)
    with the twin's output and mass."""
    module = importlib.import_module("pallas_kernels.slot_attention")  # the package exports the function by this name
    row_bytes = 40 * 2 * 16 * 4  # S * G * D * 4
    monkeypatch.setattr(module, "GROUPED_GROUP_BYTES", 2 * row_bytes + 1)
    assert [grouped_rows(b, 40, 32, 4) for b in (6, 2, 7, 1)] == [2, 2, 7, 1]
    monkeypatch.setattr(module, "GROUPED_GROUP_BYTES", 4 * row_bytes)
    assert [grouped_rows(b, 40, 32, 4) for b in (12, 6, 3)] == [4, 3, 3]
    inputs = make_inputs(14, 6, 9, 6, 2, 16, 40, valid_fraction=0.5)
    jaxpr = str(jax.make_jaxpr(functools.partial(slot_attention_grouped, return_mass=True))(*inputs))
    assert "while" in jaxpr or "scan" in jaxpr
    for got, want in zip(run("grouped", inputs), run("ref", inputs)):
        assert_close(got, want, TOL)


@cpu_dispatch_only
def test_dispatcher_uses_grouped_path_for_decode_blocks_at_batch_2_and_more():
    """"auto" on the CPU: grouped for up to GROUPED_MAX_QUERIES queries per sequence at batch >= 2, with or
    without mass; the twin at batch 1 and for longer blocks."""
    for shape, grouped in [((2, 9, 6, 2, 16, 40), True), ((2, GROUPED_MAX_QUERIES + 1, 6, 2, 16, 40), False),
                           ((1, 9, 6, 2, 16, 40), False)]:
        inputs = make_inputs(12, *shape)
        chosen = slot_attention_grouped if grouped else slot_attention_ref
        for return_mass in (False, True):
            got = jax.tree_util.tree_leaves(slot_attention(*inputs, return_mass=return_mass))
            want = jax.tree_util.tree_leaves(chosen(*inputs, return_mass=return_mass))
            for a, b in zip(got, want):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    inputs = make_inputs(12, 2, 1, 6, 2, 16, 40)
    np.testing.assert_array_equal(np.asarray(slot_attention(*inputs, impl="grouped")),
                                  np.asarray(slot_attention_grouped(*inputs)))


def test_blocked_visits_only_the_filled_prefix():
    """A full-attention cache filled up to slot 21 of 80 (slots = positions): the same output as
    the twin, from ceil(21 / 16) = 2 loop steps; rows that see nothing (no valid slot) are zeros."""
    q, k, v, q_positions, _, _ = make_inputs(8, 3, 9, 6, 2, 16, 80)
    slot_positions = jnp.broadcast_to(jnp.arange(80, dtype=jnp.int32), (3, 80))
    lengths = jnp.array([21, 7, 0])
    slot_valid = jnp.arange(80)[None, :] < lengths[:, None]
    q_positions = jnp.broadcast_to(jnp.arange(12, 21, dtype=jnp.int32), (3, 9))
    inputs = (q, k, v, q_positions, slot_positions, slot_valid)
    assert int(live_slots(slot_valid)) == 21
    assert int(live_slots(jnp.zeros((2, 5), bool))) == 0
    out = jax.jit(functools.partial(slot_attention_blocked, block=16))(*inputs)
    assert_close(out, run("ref", inputs, return_mass=False), TOL)
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)
    jaxpr = str(jax.make_jaxpr(functools.partial(slot_attention_blocked, block=16))(*inputs))
    assert "while" in jaxpr  # a traced trip count, not a loop unrolled over all 5 blocks


@cpu_dispatch_only
def test_dispatcher_uses_blocked_path_for_long_prefill():
    """"auto" on the CPU: blocked for several queries over >= SLOT_BLOCK slots without mass;
    the plain twin with mass and for one query (a decoding step)."""
    inputs = make_inputs(9, 1, 9, 6, 2, 16, SLOT_BLOCK)
    ref_out, ref_mass = slot_attention_ref(*inputs, return_mass=True)
    auto = slot_attention(*inputs)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(slot_attention_blocked(*inputs)))
    assert_close(auto, ref_out, TOL)
    for got, want in zip(slot_attention(*inputs, return_mass=True), (ref_out, ref_mass)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    one_query = make_inputs(9, 1, 1, 6, 2, 16, SLOT_BLOCK)
    np.testing.assert_array_equal(np.asarray(slot_attention(*one_query)), np.asarray(slot_attention_ref(*one_query)))
    with pytest.raises(ValueError, match="impl='blocked' has no return_mass"):
        slot_attention(*inputs, return_mass=True, impl="blocked")


def test_gpu_kernel_rejects_non_triton_sizes():
    inputs = make_inputs(6, 1, 1, 2, 1, 24, 20)
    with pytest.raises(ValueError, match=r"head_dim \(24\) and block_slots \(64\) to be powers of two >= 16"):
        slot_attention_gpu(*inputs, interpret=True)


def abstract_inputs(dtype):
    batch, n_q, n_heads, n_kv, head_dim, n_slots = 2, 9, 9, 3, 64, 1000
    return (jax.ShapeDtypeStruct((batch, n_q, n_heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, n_slots, n_kv, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, n_slots, n_kv, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, n_q), jnp.int32),
            jax.ShapeDtypeStruct((batch, n_slots), jnp.int32),
            jax.ShapeDtypeStruct((batch, n_slots), jnp.bool_))


@pytest.mark.parametrize("platform, kernel, custom_call", [
    ("tpu", slot_attention_tpu, "tpu_custom_call"),
    ("cuda", slot_attention_gpu, "__gpu$xla.gpu.triton"),
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_lowers(platform, kernel, custom_call, dtype):
    """Lowering on this CPU machine runs Pallas -> Mosaic / Triton IR (not the backend compiler)."""
    f = jax.jit(functools.partial(kernel, return_mass=True))
    text = f.trace(*abstract_inputs(dtype)).lower(lowering_platforms=(platform,)).as_text()
    assert custom_call in text


def numpy_masked_attention(q, k, v, visible, top_k):
    """masked_attention by a loop over (batch, query, head), in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, n_q, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    out, probs = np.zeros(q.shape), np.zeros((batch, n_heads, n_q, k.shape[1]))
    for b in range(batch):
        for t in range(n_q):
            seen = visible[b % visible.shape[0], t]
            for h in range(n_heads):
                logits = k[b, :, h // group] @ q[b, t, h] / np.sqrt(head_dim)
                keep = seen.copy()
                if top_k is not None and seen.sum() > top_k:
                    keep &= logits >= np.sort(logits[seen])[-top_k]
                if keep.any():
                    p = np.where(keep, np.exp(logits - logits[keep].max()), 0.0)
                    probs[b, h, t] = p / p.sum()
                    out[b, t, h] = probs[b, h, t] @ v[b, :, h // group]
    return out, probs


@pytest.mark.parametrize("mask_batch, top_k", [(2, None), (1, 3), (2, 2)])
def test_reference_matches_numpy_loop(mask_batch, top_k):
    """Random visibility (shared across the batch when mask_batch = 1) with one row that sees
    nothing: zeros there, no NaN; GQA ratio 3; plain and top-K softmax."""
    q, k, v, *_ = make_inputs(10, 2, 5, 6, 2, 16, 13)
    visible = np.random.default_rng(11).random((mask_batch, 5, 13)) < 0.6
    visible[0, 2] = False
    out, probs = jax.jit(masked_attention, static_argnums=4)(q, k, v, jnp.asarray(visible), top_k)
    want_out, want_probs = numpy_masked_attention(q, k, v, visible, top_k)
    assert out.shape == q.shape and out.dtype == q.dtype and probs.dtype == jnp.float32
    assert_close(out, want_out, 1e-5)
    assert_close(probs, want_probs, 1e-6)
    np.testing.assert_array_equal(np.asarray(out[0, 2]), 0.0)
    np.testing.assert_array_equal(np.asarray(probs[0, :, 2]), 0.0)
