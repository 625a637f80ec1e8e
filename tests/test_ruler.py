"""Compressing after prefill (kvpress's protocol) and the RULER part: a compress_after run equals full attention
when m holds the context, releases once and then keeps every question and answer token, one context prefill serves
every m; the part runs both settings, averages only the tasks full attention passes, and resumes per cell."""
import dataclasses
import json

import numpy as np
import pytest
from conftest import save_tiny_hf

import adore_jax
from adore_jax import weights
from adore_jax.eval import ruler, ruler_tasks
from adore_jax.eval.config import eval_config
from adore_jax.eval.suite import run_suite
from adore_jax.policies import make_policy
from adore_jax.session import DecodeSession
from adore_jax.tokenizer import tokenizer_from_gguf

SCORERS = ("window", "streaming_llm", "h2o", "tova", "snapkv", "key_norm")


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 97, n).tolist() for n in lengths]


def _greedy(model, prompts, policy, new, **kwargs):
    session = DecodeSession(model, prompts, new, policy, **kwargs)
    logits = np.asarray(session.prefill())
    session.start(logits.argmax(-1))
    out = session.decode(new - 1, return_logits=True)
    return logits, np.asarray(out.logits), np.asarray(out.tokens), session


@pytest.mark.parametrize("name", SCORERS)
def test_compress_after_prefill_is_full_attention_when_m_holds_the_context(tiny_model, name):
    prompts, split = _prompts([150, 131]), [120, 100]
    full_first, full_logits, full_tokens, _ = _greedy(tiny_model, prompts, "full", 9)
    first, logits, tokens, session = _greedy(tiny_model, prompts, make_policy(name, cache_size=160), 9,
                                             compress_after=split)
    np.testing.assert_allclose(first, full_first, atol=2e-4)
    np.testing.assert_allclose(logits, full_logits, atol=2e-4)
    assert (tokens == full_tokens).all()
    # nothing was released: every prompt and answer token is in the cache
    assert (np.asarray(session.cache.slot_valid).sum(1) == [150 + 8, 131 + 8]).all()


def test_compress_after_prefill_releases_once_then_keeps_the_question_and_answer(tiny_model):
    prompts, split, m = _prompts([150, 131]), [120, 100], 40
    policy = make_policy("window", cache_size=m)
    *_, session = _greedy(tiny_model, prompts, policy, 9, compress_after=split)
    valid = np.asarray(session.cache.slot_valid)
    positions = np.asarray(session.cache.slot_positions)
    for row, (length, context) in enumerate(zip([150, 131], split)):
        kept = sorted(positions[row][valid[row]].tolist())
        # the window's m latest context tokens, then the whole question and the 8 decoded tokens
        assert kept == list(range(context - m, length + 8))
    # bounded throughout instead: the cache stays at m
    *_, bounded = _greedy(tiny_model, prompts, policy, 9)
    assert (np.asarray(bounded.cache.slot_valid).sum(1) == m).all()


@pytest.mark.parametrize("name", ("h2o", "snapkv"))
def test_one_context_prefill_serves_every_m(tiny_model, name):
    prompts, split = _prompts([150, 131], seed=1), [120, 100]
    base = DecodeSession(tiny_model, prompts, 9, make_policy(name, cache_size=64), compress_after=split)
    base.prefill_contexts()
    for m in (64, 24):
        fresh = _greedy(tiny_model, prompts, make_policy(name, cache_size=m), 9, compress_after=split)
        session = base.at_cache_size(m)
        logits = np.asarray(session.prefill())
        session.start(logits.argmax(-1))
        out = session.decode(8, return_logits=True)
        np.testing.assert_allclose(logits, fresh[0], atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.logits), fresh[1], atol=1e-5)
    with pytest.raises(ValueError, match="at_cache_size needs a compress_after session after prefill_contexts"):
        DecodeSession(tiny_model, prompts, 9, make_policy(name, cache_size=64), compress_after=split).at_cache_size(8)


@pytest.mark.parametrize("value, message", [
    (0, r"compress_after for prompts\[0\] must be in \[1, 149\]"),
    ([120, 131], r"compress_after for prompts\[1\] must be in \[1, 130\]"),
    ([1, 2, 3], r"compress_after must be an integer or one integer per prompt \(2\)"),
    (1.5, r"compress_after must be an integer"),
])
def test_bad_compress_after_is_a_named_error(tiny_model, value, message):
    with pytest.raises(ValueError, match=message):
        DecodeSession(tiny_model, _prompts([150, 131]), 9, make_policy("tova", cache_size=32), compress_after=value)


# ---------------------------------------------------------------- the part


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny random model over SmolLM2's vocabulary, with its real tokenizer: the tasks' prompts, run fast."""
    directory, _ = save_tiny_hf(tmp_path_factory.mktemp("tiny_smol"), dict(vocab_size=49152,
                                                                          max_position_embeddings=1024))
    tokenizer = tokenizer_from_gguf(weights._gguf_metadata(weights.open_gguf(weights.embedded_model_path(
        "smollm2-135m"))))
    model = adore_jax.load_model(directory)
    return dataclasses.replace(model, tokenizer=tokenizer,
                               config=dataclasses.replace(model.config, eos_token_ids=(tokenizer.eos_token_id,)))


def _config(out_dir, **ruler_options):
    return eval_config(dict(parts=["ruler"], progress=False, out_dir=str(out_dir),
                            policies=["window", "snapkv", {"policy": "tova", "cache_size": 128}],
                            ruler=dict(dict(tasks=["niah_single_1", "vt"], contexts=[512], samples=2,
                                            ratios=[0.5, 0.875], batch_size=3, min_full_score=0.0),
                                       **ruler_options)))


def test_the_part_runs_both_settings_and_resumes_per_cell(tiny_with_tokenizer, tmp_path, monkeypatch):
    model = tiny_with_tokenizer
    config = _config(tmp_path)
    part = run_suite(config, model=model, log=lambda *_: None)["ruler"]
    cells = part["cells"]
    keys = [(c["setting"], c["policy"], c["cache_size"]) for c in cells]
    assert keys == [("full", "full", None)] + [
        key for s in ("bounded", "compress_after_prefill")
        for key in [(s, p, m) for p in ("window", "snapkv") for m in (256, 64)] + [(s, "tova", 128)]]
    assert [c["ratio"] for c in cells if c["policy"] == "tova"] == [0.75, 0.75]  # a row's own m, as a ratio
    prompts = sorted((p for task in ("niah_single_1", "vt") for p in ruler_tasks.build_prompts(
        model.tokenizer, task, 512, 2)), key=lambda p: p.max_new_tokens)
    # the bounded window cell, recomputed through generate: the same greedy answers and scores
    out = adore_jax.generate(model, [list(p.ids) for p in prompts], 40, cache=make_policy("window", cache_size=64))
    cell = next(c for c in cells if c["setting"] == "bounded" and c["policy"] == "window" and c["cache_size"] == 64)
    answers = [model.decode(ids[:p.max_new_tokens]) for ids, p in zip(out.token_ids, prompts)]
    assert cell["answers"] == answers
    assert cell["scores"] == [ruler_tasks.score(a, p.answers) for a, p in zip(answers, prompts)]
    assert cell["ratio"] == 0.875
    # a rerun with the same out_dir runs nothing
    monkeypatch.setattr("adore_jax.session.DecodeSession", _refuse)
    again = run_suite(config, model=model, log=lambda *_: None)["ruler"]
    assert again["cells"] == cells
    with open(tmp_path / ruler.CELLS_FILE) as f:
        assert len([json.loads(line) for line in f]) == len(cells)
    report = (tmp_path / "report.md").read_text()
    assert "## RULER" in report and "**compress_after_prefill**" in report and "ruler_vs_ratio.png" in report


def _refuse(*args, **kwargs):
    raise AssertionError("a finished cell ran again")


def test_averages_leave_out_the_tasks_full_attention_fails():
    def cell(setting, policy, m, scores):
        return dict(setting=setting, context=100, policy=policy, cache_size=m, ratio=None if m is None else 1 - m / 100,
                    seconds=1.0, tasks=["a", "a", "b", "b"], scores=scores)

    rows = ruler.summary_rows([cell("full", "full", None, [1.0, 0.5, 0.0, 0.25]),
                               cell("bounded", "tova", 50, [0.5, 0.0, 1.0, 1.0])], min_full_score=0.2)
    full, tova = rows
    assert full["per_task"] == {"a": 0.75, "b": 0.125}
    assert (full["average"], full["prompts"]) == (0.75, 2)  # task b (0.125 < 0.2) is not averaged
    assert (tova["average"], tova["prompts"], tova["ratio"]) == (0.25, 2, 0.5)
    assert tova["stderr"] == pytest.approx(np.sqrt(0.25 * 0.75 / 2))
    assert tova["vs_full"] == pytest.approx(0.25 / 0.75)


@pytest.mark.parametrize("options, message", [
    (dict(tasks=["niah_single_1", "qa_squad"]), r"ruler.tasks must be a non-empty list of niah_single_1"),
    (dict(ratios=[0.5, 1.0]), r"ruler.ratios must be a non-empty list of numbers in \(0, 1\)"),
    (dict(cache_sizes=[64]), r"ruler.give exactly one of ratios and cache_sizes"),
    (dict(settings=["after"]), r"ruler.settings must be a non-empty list of bounded, compress_after_prefill"),
    (dict(samples=0), r"ruler.samples and batch_size must be >= 1"),
])
def test_bad_ruler_settings_are_named_errors(options, message):
    from adore_jax.configfile import ConfigError

    with pytest.raises(ConfigError, match=message):
        eval_config(dict(parts=["ruler"], ruler=options))
