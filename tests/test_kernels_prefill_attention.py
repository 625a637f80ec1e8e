"""Prefill attention: the Pallas kernels (interpreted on the CPU) against the jnp twin, on shuffled caches and on
position-ordered, partly filled ones where they skip slot blocks; the bound on the visited blocks against a brute
force; the dispatcher; and lowering of both kernels for TPU and CUDA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_kernels_slot_attention import abstract_inputs, assert_close, make_inputs

from pallas_kernels import slot_attention, slot_attention_ref
from pallas_kernels._common import BLIND_POSITION, pad_queries, slot_keys
from pallas_kernels.prefill_attention import prefill_attention_gpu, prefill_attention_tpu, visible_slot_blocks
from pallas_kernels.slot_attention import PREFILL_MIN_QUERIES

from references import load_script

TOL = 2e-6
BLOCK_QUERIES, BLOCK_SLOTS = 8, 16  # small blocks, so the test shapes span several of each
KERNELS = {
    "tpu": functools.partial(prefill_attention_tpu, block_queries=BLOCK_QUERIES, block_slots=BLOCK_SLOTS,
                             interpret=pltpu.InterpretParams()),
    "gpu": functools.partial(prefill_attention_gpu, block_queries=BLOCK_QUERIES, block_slots=BLOCK_SLOTS,
                             interpret=True),
}
# (batch, Q, H, G, D, S): GQA ratios 3, 8 and 4; Q a multiple of the query block or not; S a multiple of the
# slot block or not.
GRID = [
    (2, 40, 6, 2, 16, 37),
    (1, 33, 8, 1, 16, 80),
    (2, 24, 12, 3, 32, 64),
]


def run(kernel, inputs, return_mass=True):
    return jax.jit(functools.partial(KERNELS[kernel], return_mass=return_mass))(*inputs)


def reference(inputs, return_mass=True):
    return jax.jit(functools.partial(slot_attention_ref, return_mass=return_mass))(*inputs)


def ordered_chunk(seed, batch, n_q, n_heads, n_kv, head_dim, n_slots, filled, dtype=jnp.float32):
    """A prefill chunk in a full-attention cache: slot s holds position s; row b's slots below filled[b] are
    valid, the chunk being its last n_q of them. The K/V of the slot blocks (of BLOCK_SLOTS) past the filled
    ones are NaN, which any visit of them would carry into the output (0 * NaN); returned beside the same
    inputs with zeros there."""
    q, k, v, *_ = make_inputs(seed, batch, n_q, n_heads, n_kv, head_dim, n_slots, dtype=dtype)
    filled = jnp.asarray(filled)
    slot_positions = jnp.broadcast_to(jnp.arange(n_slots, dtype=jnp.int32), (batch, n_slots))
    slot_valid = slot_positions < filled[:, None]
    q_positions = filled[:, None] - n_q + jnp.arange(n_q, dtype=jnp.int32)
    empty = (slot_positions >= -(-filled[:, None] // BLOCK_SLOTS) * BLOCK_SLOTS)[:, :, None, None]
    poisoned = [jnp.where(empty, jnp.nan, x).astype(dtype) for x in (k, v)]
    clean = [jnp.where(empty, 0.0, x).astype(dtype) for x in (k, v)]
    return ((q, *poisoned, q_positions, slot_positions, slot_valid),
            (q, *clean, q_positions, slot_positions, slot_valid))


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "B{}-Q{}-H{}-G{}-D{}-S{}".format(*s))
def test_kernel_matches_twin(kernel, shape):
    """Shuffled slot positions (an ADORE cache) and random validity: every block is visited, any order holds."""
    inputs = make_inputs(0, *shape)
    out, mass = run(kernel, inputs)
    ref_out, ref_mass = reference(inputs)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype and mass.shape == ref_mass.shape
    assert_close(out, ref_out, TOL)
    assert_close(mass, ref_mass, TOL)
    assert_close(run(kernel, inputs, return_mass=False), ref_out, TOL)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_kernel_skips_the_unfilled_slots(kernel):
    """A chunk of 24 queries in a 96-slot cache filled to 40 and 70 slots. Blocks past the last filled one hold
    NaN: the output and mass are finite and equal the twin's on zeros, so they were never read."""
    poisoned, clean = ordered_chunk(3, 2, 24, 6, 2, 16, 96, [40, 70])
    out, mass = run(kernel, poisoned)
    ref_out, ref_mass = reference(clean)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(mass)).all()
    assert_close(out, ref_out, TOL)
    assert_close(mass, ref_mass, TOL)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_kernel_rows_that_see_nothing_are_zeros(kernel):
    inputs = make_inputs(4, 1, 20, 4, 2, 16, 30)
    blind = inputs[:5] + (jnp.zeros((1, 30), bool),)
    out, mass = run(kernel, blind)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    np.testing.assert_array_equal(np.asarray(mass), 0.0)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_bfloat16(kernel):
    inputs = make_inputs(5, 2, 20, 6, 2, 16, 45, dtype=jnp.bfloat16)
    out, mass = run(kernel, inputs)
    ref_out, ref_mass = reference(inputs)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref_out, 2e-2)
    assert_close(mass, ref_mass, 1e-2)


def test_visible_slot_blocks_is_the_causal_diagonal():
    """Slots in position order, filled to 40 and 70 of 96, a chunk of 24 queries in blocks of 8, slots in blocks
    of 16: query block i ends at position filled - 24 + 8 (i + 1) - 1, so it needs that position's block."""
    _, clean = ordered_chunk(0, 2, 24, 2, 1, 16, 96, [40, 70])
    q_positions, slot_positions, slot_valid = clean[3:]
    counts = visible_slot_blocks(q_positions, slot_keys(slot_positions, slot_valid), 8, 16)
    np.testing.assert_array_equal(np.asarray(counts), [[2, 2, 3], [4, 4, 5]])
    blind = jnp.full((1, 8), BLIND_POSITION, jnp.int32)
    assert int(visible_slot_blocks(blind, slot_keys(slot_positions, slot_valid)[:1], 8, 16)[0, 0]) == 0


@pytest.mark.parametrize("seed", range(3))
def test_visible_slot_blocks_never_drops_a_visible_slot(seed):
    """Against a brute force on random caches: every (query, slot) pair that is visible lies in a block below
    its query block's bound, and the block just below the bound holds a visible slot (the bound is tight)."""
    rng = np.random.default_rng(seed)
    batch, n_q, n_slots = 3, 21, 50
    slot_positions = rng.integers(0, 60, (batch, n_slots)).astype(np.int32)
    slot_valid = rng.random((batch, n_slots)) < 0.6
    q_positions = np.sort(rng.integers(0, 60, (batch, n_q)), axis=1).astype(np.int32)
    _, padded = pad_queries(jnp.zeros((batch, n_q, 1, 1)), jnp.asarray(q_positions), 4)
    counts = np.asarray(visible_slot_blocks(padded, slot_keys(jnp.asarray(slot_positions), jnp.asarray(slot_valid)),
                                            4, 8))
    visible = slot_valid[:, None, :] & (slot_positions[:, None, :] <= np.asarray(padded)[:, :, None])
    for b in range(batch):
        for block in range(counts.shape[1]):
            seen_slots = np.nonzero(visible[b, 4 * block:4 * block + 4].any(axis=0))[0]
            expected = 0 if seen_slots.size == 0 else seen_slots.max() // 8 + 1
            assert counts[b, block] == expected


def test_dispatcher_takes_the_prefill_kernel_for_long_blocks():
    """impl="pallas_interpret" (the TPU kernels on the CPU, the GPU's on a GPU): a block of PREFILL_MIN_QUERIES
    queries takes the prefill kernel, one query fewer the slot kernel; both equal the twin."""
    platform = "gpu" if jax.default_backend() == "gpu" else "tpu"
    kernels = (f"prefill_attention_{platform}", f"slot_attention_{platform}")
    for n_q, name, other in [(PREFILL_MIN_QUERIES, *kernels), (PREFILL_MIN_QUERIES - 1, *reversed(kernels))]:
        inputs = make_inputs(6, 1, n_q, 2, 1, 16, 70)
        f = functools.partial(slot_attention, return_mass=True, impl="pallas_interpret")
        jaxpr = str(jax.make_jaxpr(f)(*inputs))
        assert name in jaxpr and other not in jaxpr
        for got, want in zip(jax.jit(f)(*inputs), reference(inputs)):
            assert_close(got, want, TOL)


def test_validation():
    inputs = make_inputs(7, 1, 20, 4, 2, 24, 20)
    with pytest.raises(ValueError, match=r"head_dim \(24\) and block_slots \(64\) to be powers of two >= 16"):
        prefill_attention_gpu(*inputs, interpret=True)
    with pytest.raises(ValueError, match=r"block_queries \(3\) times the query heads per KV head \(2\) must be a "
                                         "multiple of 8"):
        prefill_attention_tpu(*inputs, block_queries=3, interpret=True)


@pytest.mark.parametrize("platform, kernel, custom_call", [
    ("tpu", prefill_attention_tpu, "tpu_custom_call"),
    ("cuda", prefill_attention_gpu, "__gpu$xla.gpu.triton"),
])
@pytest.mark.parametrize("return_mass", [False, True], ids=["out", "mass"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_lowers(platform, kernel, custom_call, return_mass, dtype):
    """Lowering on this CPU machine runs Pallas -> Mosaic / Triton IR (not the backend compiler): a chunk of 300
    queries over 1000 slots, SmolLM2's heads."""
    q, *rest = abstract_inputs(dtype)
    chunk = (jax.ShapeDtypeStruct((q.shape[0], 300) + q.shape[2:], dtype), *rest[:2],
             jax.ShapeDtypeStruct((q.shape[0], 300), jnp.int32), *rest[3:])
    f = jax.jit(functools.partial(kernel, return_mass=return_mass))
    assert custom_call in f.trace(*chunk).lower(lowering_platforms=(platform,)).as_text()


def test_work_fraction_script_counts_the_visited_blocks():
    """`scripts/prefill_work_fraction.py` on a hand case: 64 slots filled by two chunks of 32 queries in blocks of
    8, slots in blocks of 16. The first chunk's query blocks end at positions 7, 15, 23, 31 (1, 1, 2, 2 slot
    blocks of 4), the second's at 39, 47, 55, 63 (3, 3, 4, 4): 20 of 32."""
    script = load_script("prefill_work_fraction")
    assert script.visited_fraction(64, 64, 32, 8, 16) == 20 / 32
