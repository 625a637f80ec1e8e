"""The gap decomposition's parts: attention mass, the shared-set oracle, the rows."""
import jax.numpy as jnp
import numpy as np
import pytest

import adore_jax
from adore_jax.eval import gap
from adore_jax.model import forward


@pytest.fixture(scope="module")
def docs(tiny_model):
    return np.random.default_rng(8).integers(3, tiny_model.config.vocab_size, (2, 40)).astype(np.int32)


def test_attention_mass_is_each_querys_mean_attention(tiny_model, docs):
    mass = np.asarray(gap.attention_mass(tiny_model.params, tiny_model.config, jnp.asarray(docs)))
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)  # a distribution over tokens, per query
    assert np.all(np.triu(mass[0], 1) == 0) and mass[0, 0, 0] == pytest.approx(1.0)
    assert mass[0, 30].max() < 0.9, "attention is not one-hot here: the test can tell rows apart"


def test_shared_set_sees_everything_when_m_covers_the_document(tiny_model, docs):
    mass = gap.attention_mass(tiny_model.params, tiny_model.config, jnp.asarray(docs))
    full = np.asarray(forward(tiny_model.params, tiny_model.config, jnp.asarray(docs)))
    everything = np.asarray(gap.shared_set_logits(tiny_model.params, tiny_model.config, jnp.asarray(docs), mass,
                                                  cache_size=40))
    np.testing.assert_allclose(everything, full, atol=1e-4)
    few = np.asarray(gap.shared_set_logits(tiny_model.params, tiny_model.config, jnp.asarray(docs), mass,
                                           cache_size=4))
    np.testing.assert_allclose(few[:, :4], full[:, :4], atol=1e-4)  # a query before m sees all it can
    assert np.max(np.abs(few[:, 10:] - full[:, 10:])) > 1e-3


def test_rows_and_decomposition(tiny_model, docs):
    window = ("window", dict(cache=adore_jax.Window(cache_size=8)))
    rows = gap.gap_rows(tiny_model, docs, 24, 8, horizons=(16,), rebuild=2, extra_rows=[window], log=lambda *_: None)
    labels = [r["row"] for r in rows]
    assert labels == ["full", "oracle per-head top-K (K=8)", "shared set of 8, no permanence",
                      "perfect current query, R=0", "perfect current query, R=2 transient",
                      "perfect current query, R=2", "perfect future need H=16, R=0",
                      "perfect future need H=16, R=2 transient", "perfect future need H=16, R=2", "window"]
    full = np.exp(-adore_jax.teacher_force(tiny_model, docs, 24).mean())
    assert rows[0]["perplexity"] == pytest.approx(full, rel=1e-5) and rows[0]["perplexity_vs_full"] == 0
    window_ppl = np.exp(-adore_jax.teacher_force(tiny_model, docs, 24, cache=adore_jax.Window(cache_size=8)).mean())
    assert rows[-1]["perplexity"] == pytest.approx(window_ppl, rel=1e-5)
    parts = gap.decomposition(rows)
    by = {r["row"]: r["perplexity_vs_full"] for r in rows}
    assert parts["shared_slot_table"] == pytest.approx(by[labels[2]] - by[labels[1]])
    assert parts["permanence"] == pytest.approx(by[labels[6]] - by[labels[2]])


def test_gap_part_through_the_suite(tiny_model, tmp_path):
    from adore_jax.eval.config import eval_config
    from adore_jax.eval.suite import run_suite

    config = eval_config(dict(parts=["gap"], policies=["full", "window"], cache_sizes=[8], out_dir=str(tmp_path),
                              progress=False, gap=dict(dataset="synthetic", documents=1, length=40, prompt_length=24,
                                                       horizons=[16], rebuild=2)))
    results = run_suite(config, model=tiny_model, log=lambda *_: None)
    (size,) = results["gap"]["sizes"]
    labels = [r["row"] for r in size["rows"]]
    assert labels[0] == "full" and labels[-1] == "window" and "perfect future need H=16, R=0" in labels
    assert set(size["decomposition"]) == {"per_head_oracle", "shared_slot_table", "permanence", "perfect_future_r0"}
    assert "## Gap decomposition" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match=r"gap.prompt_length must be in \[1, gap.length=40\)"):
        eval_config(dict(gap=dict(length=40, prompt_length=40)))
