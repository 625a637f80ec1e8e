"""RULER-style tasks with SmolLM2's real tokenizer: exact lengths, every key and value where it belongs, needle depths,
the word lists' counts, determinism, scoring and argument errors."""
import collections
import re

import pytest

from adore_jax import weights
from adore_jax.eval import ruler_tasks
from adore_jax.eval.ruler_tasks import MAX_NEW_TOKENS, NEEDLE_TASKS, TASKS, TaskPrompt, build_prompts, score
from adore_jax.tokenizer import tokenizer_from_gguf

SIZES = ((1024, 4), (2048, 2))  # (context, samples)
NOTE = re.compile(r" Take note: a secret (?:number|code) kept for (\S+) is (\S+)\.")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
ASSIGNMENT = re.compile(r" VAR ([A-Z]{5}) = (\d{5}|VAR [A-Z]{5})\.")


@pytest.fixture(scope="module")
def tokenizer():
    """Only SmolLM2's tokenizer and chat template, read from the embedded GGUF file (no model)."""
    path = weights.embedded_model_path("smollm2-135m")
    return tokenizer_from_gguf(weights._gguf_metadata(weights.open_gguf(path)))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return {(task, context): build_prompts(tokenizer, task, context, samples)
            for task in TASKS for context, samples in SIZES}


def _intro(task) -> str:
    if task in NEEDLE_TASKS:
        return ruler_tasks.NIAH_INTRO.format(noun="code" if task in ("niah_single_3", "niah_multikey_3") else "number")
    return dict(vt=ruler_tasks.VT_INTRO, cwe=ruler_tasks.CWE_INTRO, fwe=ruler_tasks.FWE_INTRO)[task]


def _parts(tokenizer, p: TaskPrompt) -> tuple:
    """(head tokens, body tokens, body text, question text): the head is the chat head and the intro."""
    context = tokenizer.decode(p.ids[:p.question_start])
    intro = _intro(p.task)
    assert context.count(intro) == 1
    head_text = context[:context.index(intro) + len(intro)]
    head = len(tokenizer.encode(head_text, add_special_tokens=False))
    assert tokenizer.decode(p.ids[:head]) == head_text
    return head, p.question_start - head, context[len(head_text):], tokenizer.decode(p.ids[p.question_start:])


def _occurrences(ids, needle) -> list:
    return [i for i in range(len(ids) - len(needle) + 1) if list(ids[i:i + len(needle)]) == list(needle)]


def _check_depth(tokenizer, p, j, text, head, body, target):
    """The needle stating answer j is `text`, once in the prompt, at its recorded depth, within a piece of target."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert _occurrences(p.ids, ids) == [head + round(p.depths[j] * body)]
    assert abs(p.depths[j] - target) <= max(ruler_tasks.MAX_SENTENCE_TOKENS, len(ids)) / body


@pytest.mark.parametrize("context, samples", SIZES)
@pytest.mark.parametrize("task", TASKS)
def test_prompts_fill_the_context_and_hold_the_answers_where_they_belong(tokenizer, prompts, task, context, samples):
    built = prompts[(task, context)]
    assert [(p.task, p.context, p.sample) for p in built] == [(task, context, i) for i in range(samples)]
    for p in built:
        assert len(p.ids) == context and p.max_new_tokens == MAX_NEW_TOKENS[task]
        head, body, text, question = _parts(tokenizer, p)
        assert question.startswith("\n\nThat is the end of the") and "That is the end" not in text
        assert "<|im_end|>\n<|im_start|>assistant\nThe " in question and question.endswith((" is", " are", ":"))
        assert tokenizer.decode(p.ids).startswith("<|im_start|>system")
        if task in NEEDLE_TASKS:
            _check_needles(tokenizer, p, head, body, text, question, samples)
        elif task == "vt":
            _check_chain(tokenizer, p, head, body, text, question)
        else:
            assert p.depths == ()
            assert tokenizer.encode(text, add_special_tokens=False) == list(p.ids[head:p.question_start])  # exact ids
    if task in NEEDLE_TASKS and task not in ("niah_multivalue", "niah_multiquery"):
        assert len({p.depths for p in built}) == samples  # the samples cover the context


def _check_needles(tokenizer, p, head, body, text, question, samples):
    notes = NOTE.findall(text)
    keys, values = [k for k, _ in notes], [v for _, v in notes]
    noun = "code" if p.task in ("niah_single_3", "niah_multikey_3") else "number"
    assert all((UUID if noun == "code" else re.compile(r"\d{7}")).fullmatch(v) for v in values)
    assert len(set(values)) == len(values)  # every value once in the context
    assert all(text.count(v) == 1 and v not in question for v in values)
    if p.task == "niah_multivalue":
        assert len(notes) == 4 and len(set(keys)) == 1 and text.count(keys[0]) == 4 and question.count(keys[0]) == 2
        asked, targets = [0, 1, 2, 3], [0.125, 0.375, 0.625, 0.875]
    else:
        assert len(set(keys)) == len(keys) and all(text.count(k) == 1 for k in keys)  # every key once in the context
        if p.task.startswith("niah_single"):
            assert len(notes) == 1
            asked, targets = [0], [(p.sample + 0.5) / samples]
        elif p.task == "niah_multikey_1":
            assert len(notes) == 4
            asked, targets = [p.sample % 4], [(p.sample % 4 + 0.5) / 4]
        elif p.task == "niah_multiquery":
            assert len(notes) == 4
            asked, targets = [0, 1, 2, 3], [0.125, 0.375, 0.625, 0.875]
        else:  # a body of needle lines only
            assert len(notes) > 5 and re.fullmatch(f"(?:{NOTE.pattern})+(?: \\.\\.\\.)*", text)  # lines, then PAD
            asked = [i for i, k in enumerate(keys) if k in question]
            targets = [(p.sample + 0.5) / samples]
            assert p.task == "niah_multikey_2" or all(UUID.fullmatch(k) for k in keys)
    assert p.answers == tuple(values[i] for i in asked)
    for i, key in enumerate(keys):
        assert (key in question) == (i in asked)
    for j, (i, target) in enumerate(zip(asked, targets)):
        needle = ruler_tasks.NEEDLE.format(noun=noun, key=keys[i], value=values[i])
        _check_depth(tokenizer, p, j, needle, head, body, target)


def _check_chain(tokenizer, p, head, body, text, question):
    chain = ASSIGNMENT.findall(text)
    names, value = [name for name, _ in chain], chain[0][1]
    assert len(chain) == 5 and [source for _, source in chain[1:]] == [f"VAR {name}" for name in names[:-1]]
    assert p.answers == tuple(names) and len(set(names)) == 5
    assert text.count(value) == 1 and question.count(value) == 2  # the question, and the answer prefix
    assert [text.count(name) for name in names] == [2, 2, 2, 2, 1] and not any(name in question for name in names)
    for j, (name, source) in enumerate(chain):
        line = ruler_tasks.ASSIGN_VALUE.format(name=name, value=value) if j == 0 else \
            ruler_tasks.ASSIGN_NAME.format(name=name, source=source[4:])
        _check_depth(tokenizer, p, j, line, head, body, (j + 0.5) / 5)


@pytest.mark.parametrize("context, common, rare", [(1024, 11, 1), (2048, 21, 2), (4096, 30, 3)])
def test_cwe_lists_have_ten_common_words_at_exact_counts(tokenizer, context, common, rare):
    for p in build_prompts(tokenizer, "cwe", context, 2):
        _, _, text, _ = _parts(tokenizer, p)
        entries = re.findall(r" (\d+)\. ([a-z]+)", text)
        assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
        assert re.fullmatch(r"(?: \d+\. [a-z]+)+(?: \.\.\.)*", text)  # nothing but entries, then PAD
        counts = collections.Counter(word for _, word in entries)
        assert {word for word, _ in counts.most_common(10)} == set(p.answers) and len(p.answers) == 10
        assert all(counts[word] == common for word in p.answers)
        assert all(n == rare for word, n in counts.items() if word not in p.answers) and len(counts) > 20
        assert not any(a in w for a in p.answers for w in counts if a != w)  # no common word inside another word


def test_fwe_top_three_are_strictly_most_frequent(tokenizer):
    for context in (1024, 2048):
        for p in build_prompts(tokenizer, "fwe", context, 4):
            _, _, text, _ = _parts(tokenizer, p)
            assert re.fullmatch(r"(?: [a-z]{6} \.\.\.)+(?: \.\.\.)*", text)
            counts = collections.Counter(re.findall(r" ([a-z]{6}) \.\.\.", text)).most_common()
            assert {word for word, _ in counts[:3]} == set(p.answers)
            assert counts[2][1] > counts[3][1] and counts[0][1] > len(counts)  # a zeta law's head


@pytest.mark.parametrize("task", TASKS)
def test_seeded(tokenizer, prompts, task):
    assert build_prompts(tokenizer, task, 1024, 4) == prompts[(task, 1024)]
    other = build_prompts(tokenizer, task, 1024, 4, seed=1)
    assert all(len(p.ids) == 1024 for p in other)
    assert [p.answers for p in other] != [p.answers for p in prompts[(task, 1024)]]


def test_without_the_chat_template(tokenizer):
    for task in ("niah_single_2", "cwe"):
        p = build_prompts(tokenizer, task, 1024, 1, chat=False)[0]
        text = tokenizer.decode(p.ids)
        assert len(p.ids) == 1024 and "<|im_start|>" not in text and text.startswith(_intro(task))
        assert tokenizer.decode(p.ids[p.question_start:]).startswith("\n\nThat is the end of the")


@pytest.mark.parametrize("answer, expected, value", [
    ("The numbers are 1234567 and 7654321", ("1234567", "7654321", "1111111", "2222222"), 0.5),
    (" 1234567.", ("1234567",), 1.0),
    ("Kovera, DUNES and apple", ("kovera", "dunes", "APPLE"), 1.0),
    ("", ("1234567",), 0.0),
    ("123456", ("1234567",), 0.0),
])
def test_score_is_the_share_of_expected_strings_found(answer, expected, value):
    assert score(answer, expected) == pytest.approx(value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="niah_single"), r"task must be one of niah_single_1, .*, fwe; got 'niah_single'"),
    (dict(samples=0), r"samples must be an integer >= 1; got 0"),
    (dict(context=300), r"context must be >= 3\d\d for task niah_single_2 \(template and needles \d+ tokens"),
    (dict(context=1024.0), r"context must be an integer >= 1; got 1024.0"),
    (dict(text_source="synthetic"), r"text_source must be a dataset with text"),
])
def test_bad_arguments_are_named_errors(tokenizer, kwargs, message):
    arguments = {**dict(task="niah_single_2", context=1024, samples=2), **kwargs}
    with pytest.raises(ValueError, match=message):
        build_prompts(tokenizer, **arguments)


@pytest.mark.parametrize("task", TASKS)
def test_the_named_minimum_context_works(tokenizer, task):
    with pytest.raises(ValueError) as error:
        build_prompts(tokenizer, task, 1, 4)
    minimum = int(re.search(r">= (\d+) for task", str(error.value)).group(1))
    assert [len(p.ids) for p in build_prompts(tokenizer, task, minimum, 4)] == [minimum] * 4
    with pytest.raises(ValueError, match=f"context must be >= {minimum}"):
        build_prompts(tokenizer, task, minimum - 1, 4)
