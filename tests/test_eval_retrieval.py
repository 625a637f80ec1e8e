"""The retrieval part: where the key sentence goes and how long the prompt is, the answer parser, accuracy
and its full-attention reference, config checks, and a tiny run through run_suite."""
import dataclasses

import numpy as np
import pytest

import adore_jax
from adore_jax import weights
from adore_jax.configfile import ConfigError
from adore_jax.eval import cli, retrieval, sources
from adore_jax.eval.config import RetrievalConfig, eval_config
from adore_jax.eval.retrieval import (
    DIGIT_BASE,
    RetrievalPrompt,
    accuracy_rows,
    answer_text,
    build_prompts,
    haystack_sentences,
    key_found,
    template,
    with_full_reference,
)
from adore_jax.eval.suite import run_suite


def _occurrences(ids, needle) -> list:
    return [i for i in range(len(ids) - len(needle) + 1) if ids[i:i + len(needle)] == needle]


def _check_layout(model, prompt, cfg):
    """The prompt is prefix + haystack (in order, cut only at its end) with the key sentence inside + suffix,
    exactly `context` tokens, the key sentence at a sentence boundary nearest to depth x the haystack."""
    prefix, sentence, suffix = template(model, prompt.key, cfg.chat)
    sentences, _ = haystack_sentences(model, cfg.source, cfg.splits, prompt.haystack, prompt.context,
                                      cfg.max_sentence_tokens)
    ids = prompt.ids
    assert len(ids) == prompt.context  # never more than asked, and no shorter
    assert ids[:len(prefix)] == prefix and ids[len(ids) - len(suffix):] == suffix
    found = _occurrences(ids, sentence)
    assert len(found) == 1, prompt.key
    start = found[0]
    haystack = ids[len(prefix):start] + ids[start + len(sentence):len(ids) - len(suffix)]
    assert haystack == [t for s in sentences for t in s][:len(haystack)]
    before = start - len(prefix)
    boundaries = set(np.cumsum([0] + [len(s) for s in sentences]).tolist()) | {len(haystack)}
    assert before in boundaries  # between two sentences, never inside one
    longest = max(len(s) for s in sentences)
    assert abs(before - prompt.depth * len(haystack)) <= longest / 2  # the nearest boundary to the asked depth
    assert prompt.key_start == start and prompt.haystack_tokens == len(haystack)
    assert prompt.actual_depth == pytest.approx(before / len(haystack))
    return before, len(haystack)


def test_synthetic_prompts_fill_the_context_with_the_key_at_the_asked_depth(tiny_model):
    cfg = RetrievalConfig(source="synthetic", contexts=(128, 200), depths=(0.0, 0.1, 0.5, 0.9, 1.0), keys=2)
    prompts = build_prompts(tiny_model, cfg, seed=0)
    assert [(p.context, p.haystack, p.depth) for p in prompts] == \
        [(c, k, d) for c in (128, 200) for k in range(2) for d in (0.0, 0.1, 0.5, 0.9, 1.0)]
    assert len({p.key for p in prompts}) == len(prompts) and all(len(p.key) == 5 for p in prompts)
    for p in prompts:
        before, haystack = _check_layout(tiny_model, p, cfg)
        digits = [DIGIT_BASE + int(d) for d in p.key]
        assert len(_occurrences(p.ids, digits)) == 1  # the key is stated once, as its digit ids
        if p.depth == 0.0:
            assert before == 0
        if p.depth == 1.0:
            assert before == haystack  # right before the question
    assert build_prompts(tiny_model, cfg, seed=0) == prompts  # seeded
    assert [p.key for p in build_prompts(tiny_model, cfg, seed=1)] != [p.key for p in prompts]
    with pytest.raises(ValueError, match="context 30 is too short for the template"):
        build_prompts(tiny_model, dataclasses.replace(cfg, contexts=(30,)))


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_model):
    """The tiny model with SmolLM2's real tokenizer and chat template (prompts are built, never run)."""
    from adore_jax.tokenizer import tokenizer_from_gguf

    path = weights.embedded_model_path("smollm2-135m")
    tokenizer = tokenizer_from_gguf(weights._gguf_metadata(weights.open_gguf(path)))
    return dataclasses.replace(tiny_model, tokenizer=tokenizer, source="smollm2-135m tokenizer")


def test_real_text_prompts_in_the_chat_template(smol_tokenizer):
    model = smol_tokenizer
    text = sources.record_texts("wikipedia", ("test",))[0]
    pieces = retrieval.split_sentences(text)
    assert "".join(pieces) == text and len(pieces) > 20
    ids = model.tokenizer.encode(text, add_special_tokens=False)  # pieces encode to the text's own ids
    assert [t for piece in pieces for t in model.tokenizer.encode(piece, add_special_tokens=False)] == ids
    cfg = RetrievalConfig(source="wikipedia", contexts=(600,), depths=(0.1, 0.5, 0.9), keys=2, max_sentence_tokens=48)
    prompts = build_prompts(model, cfg)
    assert len(prompts) == 6
    for p in prompts:
        _check_layout(model, p, cfg)
        decoded = model.tokenizer.decode(p.ids)
        assert decoded.count(retrieval.KEY_SENTENCE.format(key=p.key)) == 1
        assert decoded.startswith("<|im_start|>system") and retrieval.INTRO in decoded
        assert decoded.endswith(retrieval.QUESTION + "<|im_end|>\n<|im_start|>assistant\n" + retrieval.ANSWER_PREFIX)
    plain = build_prompts(model, dataclasses.replace(cfg, chat=False, depths=(0.5,), keys=1))[0]
    assert "<|im_start|>" not in model.tokenizer.decode(plain.ids) and len(plain.ids) == 600


@pytest.mark.parametrize("answer, found", [
    (" 40217.", True), ("The vault code is 40217", True), ("40,217", True), ("40 217.", True),
    ("It is 40217 or 1", True), ("4021", False), ("71204", False), ("40 and 217", False), ("40-217", False),
    ("40. 217", False), ("no digits here", False), ("", False)])
def test_the_key_is_found_in_one_number_of_the_answer(answer, found):
    assert key_found("40217", answer) is found


def test_a_key_split_across_tokens_is_found(tiny_model, smol_tokenizer):
    ids = smol_tokenizer.tokenizer.encode(" 40217. Done", add_special_tokens=False)
    assert len(ids) > 5  # SmolLM2 writes one digit per token
    assert key_found("40217", answer_text(smol_tokenizer, ids))
    digit = [DIGIT_BASE + d for d in range(10)]  # a tokenizer-less model: one id per digit
    other = 29  # any other id is a word of letters
    assert answer_text(tiny_model, [other, digit[4], digit[0], digit[2], digit[1], digit[7], other]) == " bd40217 bd"
    assert key_found("40217", answer_text(tiny_model, [other, digit[4], digit[0], digit[2], digit[1], digit[7]]))
    assert not key_found("40217", answer_text(tiny_model, [digit[4], digit[0], other, digit[2], digit[1], digit[7]]))
    assert not key_found("40217", answer_text(tiny_model, [digit[4], digit[0], digit[2], digit[1]]))


def _prompt(context, depth):
    return RetrievalPrompt([], "12345", context, depth, 0, 0, 0, 1, 0)


def test_accuracy_per_context_and_depth_and_vs_full():
    prompts = [_prompt(c, d) for c in (1024, 2048) for d in (0.1, 0.9) for _ in range(2)]
    full = accuracy_rows("full", None, prompts, [True, True, True, False, True, False, False, False])
    h2o = accuracy_rows("h2o", 256, prompts, [True, False, False, False, False, False, False, False])
    tova = accuracy_rows("tova", 256, prompts[:4], [True, True, True, True])
    assert [(r["context"], r["correct"], r["prompts"], r["accuracy"]) for r in full] == \
        [(1024, 3, 4, 0.75), (2048, 1, 4, 0.25)]
    assert full[0]["accuracy_by_depth"] == {"0.1": 1.0, "0.9": 0.5}
    assert full[1]["accuracy_by_depth"] == {"0.1": 0.5, "0.9": 0.0}
    assert h2o[0]["accuracy_by_depth"] == {"0.1": 0.5, "0.9": 0.0} and h2o[0]["cache_size"] == 256
    rows = with_full_reference(full + h2o + tova)
    assert [r["accuracy_vs_full"] for r in rows] == [1.0, 1.0, pytest.approx(0.25 / 0.75), 0.0, pytest.approx(4 / 3)]
    assert with_full_reference(accuracy_rows("full", None, prompts[:1], [False]) +
                               accuracy_rows("h2o", 256, prompts[:1], [True]))[1]["accuracy_vs_full"] is None
    assert with_full_reference(h2o)[0]["accuracy_vs_full"] is None  # no full row


@pytest.mark.parametrize("retrieval_options, message", [
    (dict(depths=[0.1, 1.5]), r"retrieval.depths must be a non-empty list of numbers in \[0, 1\]; got \(0.1, 1.5\)"),
    (dict(depths=[-0.1]), r"retrieval.depths must be a non-empty list of numbers in \[0, 1\]"),
    (dict(depths=["middle"]), r"retrieval.depths must be a non-empty list of numbers"),
    (dict(depths=[]), r"retrieval.depths must be a non-empty list"),
    (dict(depths=[0.5, 0.5]), r"retrieval.depths must not repeat"),
    (dict(contexts=[2048, 0]), r"retrieval.contexts must be a non-empty list of integers >= 1"),
    (dict(contexts=[1024.5]), r"retrieval.contexts must be a non-empty list of integers >= 1"),
    (dict(keys=0), r"retrieval.keys must be >= 1; got 0"),
    (dict(key_digits=19), r"retrieval.key_digits must be >= 1 and <= 18; got 19"),
    (dict(max_new_tokens=0), r"retrieval.max_new_tokens must be >= 1"),
    (dict(source="wiki"), r"retrieval.source must be one of wikipedia, news, sharegpt, synthetic; got 'wiki'"),
    (dict(cache_sizes=[0]), r"retrieval.cache_sizes must be null or a non-empty list of integers >= 1"),
    (dict(policies=[{"policy": "adore", "R": 8}]), r"retrieval.policies: row .*has no option 'R'"),
    (dict(depth=[0.5]), r"did you mean 'depths'"),
    (dict(keys="3"), r"config key 'retrieval.keys' must be int"),
])
def test_bad_retrieval_settings_are_named_errors(retrieval_options, message):
    with pytest.raises(ConfigError, match=message):
        eval_config(dict(parts=["retrieval"], retrieval=retrieval_options))


def test_a_tiny_run_through_the_suite(tiny_model, tmp_path, capsys):
    config = eval_config(dict(
        parts=["retrieval"], progress=False, out_dir=str(tmp_path), cache_sizes=[16],
        policies=["full", "window", {"policy": "window", "cache_size": 128},
                  {"policy": "adore", "returns": {"type": "rebuild", "r": 8, "into_cache": False}}],
        retrieval=dict(source="synthetic", contexts=[64], depths=[0.1, 0.9], keys=2, max_new_tokens=4, batch_size=3)))
    results = run_suite(config, model=tiny_model, log=lambda *_: None)
    part = results["retrieval"]
    rows = {(r["policy"], r["cache_size"]): r for r in part["rows"]}
    assert set(rows) == {("full", None), ("window", 16), ("window", None), ("adore rebuild R=8 transient", 16)}
    # full attention's row, recomputed: the same prompts, greedy, in the same batches of 3 (the last one padded)
    prompts = build_prompts(tiny_model, config.retrieval, config.seed)
    answers = []
    for batch, real in (([0, 1, 2], 3), ([3, 3, 3], 1)):
        out = adore_jax.generate(tiny_model, [prompts[i].ids for i in batch], 4, cache="full")
        answers += [answer_text(tiny_model, ids) for ids in out.token_ids[:real]]
    assert answers[0] != answers[2]  # the two haystacks get different answers: a mix-up would show
    assert [s["answers"]["full"] for s in part["samples"]] == answers
    assert [s["key"] for s in part["samples"]] == [p.key for p in prompts]
    correct = [key_found(p.key, a) for p, a in zip(prompts, answers)]
    full = rows[("full", None)]
    assert (full["context"], full["prompts"], full["correct"]) == (64, 4, sum(correct))
    assert full["accuracy"] == np.mean(correct)
    assert full["accuracy_by_depth"] == {"0.1": np.mean(correct[0::2]), "0.9": np.mean(correct[1::2])}
    # a window of 128 holds the whole prompt and answers exactly as full attention; one of 16 does not
    assert [s["answers"]["window"] for s in part["samples"]] == answers
    assert any(s["answers"]["window m=16"] != a for s, a in zip(part["samples"], answers))
    for row in rows.values():
        assert row["accuracy_vs_full"] == (row["accuracy"] / full["accuracy"] if full["accuracy"] else None)
    report = (tmp_path / "report.md").read_text()
    assert "## Retrieval" in report and "| policy | m | context | accuracy | vs full |" in report
    assert f"| full | - | 64 | {full['accuracy']:.2f} | " in report
    assert "| adore rebuild R=8 transient | 16 | 64 |" in report
    cli.print_side_by_side(results)  # the console summary
    printed = capsys.readouterr().out
    assert f"retrieval  full           m=-      context 64     {full['correct']}/4 keys found" in printed
