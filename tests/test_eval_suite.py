"""The suite on a tiny random model: perplexity parity with a plain forward, each row scored under its own
policy, the report with every policy."""
import argparse
import json
import os

import jax
import numpy as np
import pytest
import yaml

import adore_jax
from adore_jax.eval import cli, metrics, sources
from adore_jax.eval.config import DEFAULT_POLICIES, eval_config
from adore_jax.eval.diagnostics import attended_sets
from adore_jax.eval.report import PLOTS
from adore_jax.eval.suite import run_suite
from adore_jax.model import forward
from adore_jax.policies import make_policy

LABELS = {make_policy(spec).label for spec in DEFAULT_POLICIES}  # full, window, ..., adore, adore rebuild R=8


def test_full_perplexity_equals_a_plain_forward(tiny_model):
    tokens = np.random.default_rng(0).integers(3, tiny_model.config.vocab_size, (2, 48)).astype(np.int32)
    prompt_length = 20
    logprobs = adore_jax.teacher_force(tiny_model, tokens, prompt_length, policy="full")
    logits = forward(tiny_model.params, tiny_model.config, tokens)  # [B, T, V]
    direct = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, T-1, V] predicts tokens 1..T-1
    targets = np.take_along_axis(np.asarray(direct), tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    expected = metrics.perplexity(targets[:, prompt_length - 1:])
    assert metrics.perplexity(logprobs) == pytest.approx(expected, rel=1e-4)


def test_full_policy_attends_everything_and_window_its_m(tiny_model):
    tokens = np.random.default_rng(1).integers(3, tiny_model.config.vocab_size, (1, 40)).astype(np.int32)
    full = attended_sets(tiny_model, tokens, 24, dict(cache="full"))  # [1, 16, 40]
    assert np.array_equal(full[0], np.tril(np.ones((40, 40), bool))[24:])
    window = attended_sets(tiny_model, tokens, 24, dict(cache=make_policy("window", cache_size=8)))
    expected = np.zeros((16, 40), bool)
    for step, t in enumerate(range(24, 40)):
        expected[step, t - 8:t + 1] = True  # the 8 kept before the step, and the current token
    assert np.array_equal(window[0], expected)


TINY_SUITE = dict(
    cache_sizes=[16], progress=False, parts=["perplexity", "generation", "speed", "diagnostics"],
    perplexity=dict(datasets=[dict(name="synthetic", count=2, length=48, prompt_length=24)], batch_size=2),
    generation=dict(sources=[dict(name="synthetic", count=2)], min_prompt_tokens=20, max_prompt_tokens=30,
                    max_new_tokens=4, batch_size=2),
    streaming=dict(source="synthetic", conversations=2, turns=2, max_turn_tokens=6, max_new_tokens=4),
    speed=dict(contexts=[32], batches=[1], steps=2, repeats=1, memory_budget_gb=1, throughput_context=32,
               max_measured_batch=1),  # the timed shapes repeat: compiled once
    diagnostics=dict(dataset="synthetic", documents=1, length=40, prompt_length=24, top_k=4,
                     policies=["window", dict(policy="adore", returns=dict(type="rebuild", r=8))]),
)


def test_perplexity_rows_are_each_policys_teacher_forced_nll(tiny_model):
    config = eval_config(dict(TINY_SUITE, parts=["perplexity"], policies=["full", "window"], cache_sizes=[16, 48]))
    results = run_suite(config, model=tiny_model, write=False, log=lambda *_: None)
    rows = {(r["policy"], r["cache_size"]): r for r in results["perplexity"]["rows"]}
    policies = {("full", None): make_policy("full"), ("window", 16): make_policy("window", cache_size=16),
                ("window", 48): make_policy("window", cache_size=48)}
    assert rows.keys() == policies.keys()
    documents = sources.lm_documents(tiny_model, "synthetic", 2, 48)  # the configured dataset
    for key, policy in policies.items():
        logprobs = adore_jax.teacher_force(tiny_model, documents, 24, cache=policy)
        assert rows[key]["perplexity"] == pytest.approx(np.exp(-logprobs.mean()), rel=1e-5), key
    full = rows[("full", None)]["perplexity"]
    assert rows[("window", 48)]["perplexity"] == pytest.approx(full, rel=1e-5)  # m >= the documents: nothing released
    assert abs(rows[("window", 16)]["perplexity_vs_full"]) > 1e-3  # measured -1.1%
    assert rows[("window", 16)]["perplexity_vs_full"] == pytest.approx(rows[("window", 16)]["perplexity"] / full - 1)


def test_report_from_a_tiny_run_has_every_policy(tiny_model_dir, tmp_path, capsys):
    """`adore eval CONFIG --set ...` end to end on the tiny model."""
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(dict(TINY_SUITE, model=tiny_model_dir)))
    out = tmp_path / "run"
    parser = argparse.ArgumentParser(prog="adore")
    cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", str(config_path), "--set", f"out_dir={out}"])
    args.run(args)
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    # every plot but RULER's (its part did not run)
    assert sorted(os.listdir(out)) == sorted(["report.md", "results.json", *PLOTS[:3]])
    saved = json.load(open(out / "results.json"))
    for part in ("perplexity", "generation", "speed"):
        assert {r["policy"] for r in saved[part]["rows"]} == LABELS, part
    assert {r["policy"] for r in saved["diagnostics"]["rows"]} == {"window", "adore rebuild R=8"}
    generation = {r["policy"]: r for r in saved["generation"]["rows"]}
    assert generation["full"]["vs_full"] == pytest.approx(dict(rouge1=1, rouge2=1, rougeL=1, bleu=100))
    samples = saved["generation"]["samples"]
    for name, row in generation.items():  # each row scored against full's answers to the same prompts
        label = name if name == "full" else f"{name} m=16"
        answers = [s["outputs"][label] for s in samples]
        assert row["vs_full"] == metrics.text_scores(answers, [s["outputs"]["full"] for s in samples]), name
    report = (out / "report.md").read_text()
    for name in LABELS:
        assert f"| {name} |" in report, name
    for heading in ("## Perplexity", "## Generation", "## Speed", "## Controller diagnostics"):
        assert heading in report
    assert "UNTRAINED" in report and "BERTScore skipped" in report
    cli.print_side_by_side(saved)  # the demo's console view
    printed = capsys.readouterr().out
    assert "--- full" in printed and "--- adore prefill_chunk=1024 recall R=32 m=16" in printed
    assert "perplexity synthetic" in printed


def test_streaming_rows_match_full_until_the_conversation_outgrows_m(tiny_model, tmp_path):
    config = eval_config(dict(TINY_SUITE, parts=["streaming"], policies=["full", "window", "adore"],
                              cache_sizes=[8], out_dir=str(tmp_path)))
    results = run_suite(config, model=tiny_model, log=lambda *_: None)
    rows = {r["policy"]: r["turns"] for r in results["streaming"]["rows"]}
    perfect = pytest.approx(dict(rouge1=1, rouge2=1, rougeL=1, bleu=100))
    for name in ("window", "adore"):
        first, second = rows[name]
        assert [first["max_prompt_tokens"], second["max_prompt_tokens"]] == [6, 6 + 6 + 6]  # q1 + a1 + q2
        assert first["vs_full"] == perfect  # 6 prompt + 3 fed-back answer tokens: never more than m=8 + 1
        assert second["vs_full"]["rougeL"] < 0.9, name  # measured 0.25 (window), 0.75 (adore)
    assert "## Streaming" in (tmp_path / "report.md").read_text()


def test_each_eval_row_returns_the_memory_its_freed_buffers_left(monkeypatch):
    """Context.bar hands freed heap memory back after every row (a run's resident memory grew with each row)."""
    from adore_jax.eval import suite
    calls = []
    monkeypatch.setattr(suite, "return_freed_memory", lambda: calls.append(len(calls)))
    ctx = suite.Context(config=argparse.Namespace(progress=False), model=None, controller=None, notices=[])
    seen = []
    for row in ctx.bar(["a", "b", "c"], "rows"):
        seen.append((row, len(calls)))
    assert seen == [("a", 0), ("b", 1), ("c", 2)] and len(calls) == 3


def test_return_freed_memory_releases_heap_pages_below_a_live_block():
    """Freed 64 KB blocks below a live one stay resident (malloc trims only the heap's top) until
    return_freed_memory; in a fresh process, so the suite's own heap does not blur the figure."""
    import subprocess
    import sys
    code = (
        "import numpy as np\n"
        "from adore_jax.memory import return_freed_memory\n"
        "def resident():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1e3\n"
        "blocks = [np.ones(8192) for _ in range(4000)]  # 64 KB each, 256 MB: heap chunks, not mmaps\n"
        "top = np.ones(8192)\n"
        "del blocks\n"
        "before = resident()\n"
        "released = return_freed_memory()\n"
        "print(before, resident(), released)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after, released = out.stdout.split()
    assert released == "True" and float(before) - float(after) > 150, out.stdout  # MB


def test_the_embedded_default_controller_is_named_by_model_not_by_install_path():
    from types import SimpleNamespace

    from adore_jax.eval.suite import resolve_controller

    model = SimpleNamespace(source="smollm2-135m-adore", config=SimpleNamespace(hidden_size=576))
    (config, _), info = resolve_controller(model, None)
    assert info == dict(source="smollm2-135m-adore's default (controller_smollm2_adore)", trained=True)
    assert config.input_layer == 12
    assert resolve_controller(SimpleNamespace(source="unknown", config=model.config), None)[1]["source"] == "random"
