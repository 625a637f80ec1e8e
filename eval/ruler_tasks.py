"""RULER's synthetic long-context tasks (Hsieh et al., 2024, arXiv 2404.06654): prompts of an exact length, scoring.

Eleven of RULER's thirteen tasks, with RULER's definitions and this project's own wording (the two QA tasks need
SQuAD / HotpotQA, which are not available offline). Every prompt has exactly `context` tokens:

    [chat head] INTRO | body (haystack with the needles, or a word list) | QUESTION [chat tail] ANSWER_PREFIX
                        ^ haystack start (len(head))                      ^ question_start                    ^ context

The head, each body piece and the tail are encoded separately (pieces start where the tokenizer's words start), so
decoding the ids gives the prompt's text. The body fills the rest of the context exactly: prose (real text or the
repeated FILLER) is cut within its last sentence; lists of lines or entries stop at the last whole item and are
padded with PAD. A needle goes in at the piece boundary that puts its start nearest to its target depth, a depth
being the share of the body's tokens before a needle's first token (within half a piece of the target).

  task             body                                                answers (a depth each)                 tokens
  niah_single_1    FILLER, 1 needle: a made-up key, a 7-digit value    the value                              16
  niah_single_2    real text, 1 needle (key, 7 digits)                 the value                              16
  niah_single_3    real text, 1 needle (key, UUID)                     the value                              48
  niah_multikey_1  real text, 4 needles of 4 keys, 1 asked             the asked key's value                  16
  niah_multikey_2  needle lines only (key, 7 digits), 1 asked          the asked value                        16
  niah_multikey_3  needle lines only (UUID, UUID), 1 asked             the asked value                        48
  niah_multivalue  real text, 4 needles of one key                     its 4 values                           64
  niah_multiquery  real text, 4 needles of 4 keys, all asked           the 4 values                           64
  vt               FILLER, VAR A = 12345, VAR B = VAR A, ... (4 hops)  the 5 variable names                   40
  cwe              numbered list: 10 common words x c, others x r      the 10 common words                    64
  fwe              made-up words, zeta(2) counts, " ..." between       the 3 most frequent                    32

(tokens: MAX_NEW_TOKENS, the greedy answer length: the answer's tokens under SmolLM2's one-digit-per-token
tokenizer plus room for separators and a short lead-in.) Needle depths: a single asked needle of sample i of n sits
at (i + 0.5) / n; 4 needles at (j + 0.5) / 4, the asked one (niah_multikey_1) the (sample % 4)-th; vt's 5
assignments at (j + 0.5) / 5, in chain order. Keys and values are drawn to occur nowhere else in the prompt, and
none inside another: each value once in the context, each key once there (multivalue's key once per needle) and
again in the question.
"""
import collections
import dataclasses
import functools
import itertools
import re
import string
import types
import uuid

import numpy as np

from adore_jax.eval import sources
from adore_jax.eval.config import RULER_TASKS
from adore_jax.eval.retrieval import haystack_sentences

TASKS = RULER_TASKS
NEEDLE_TASKS = TASKS[:8]
MAX_NEW_TOKENS = dict(niah_single_1=16, niah_single_2=16, niah_single_3=48, niah_multikey_1=16, niah_multikey_2=16,
                      niah_multikey_3=48, niah_multivalue=64, niah_multiquery=64, vt=40, cwe=64, fwe=32)

MIN_HAYSTACK = 256  # body tokens besides the needles that every prompt must have room for
MAX_SENTENCE_TOKENS = 64  # real-text sentences longer than this are split at words (a needle's depth is exact to one)
NEEDLES = 4  # niah_multikey_1, niah_multivalue, niah_multiquery
HOPS = 4  # vt: 5 variables
COMMON_WORDS, COMMON_REPEATS, RARE_REPEATS = 10, 30, 3  # cwe at full size
COMMON_SHARE = 0.6  # cwe: the common words' entries take at most this share of the list (see _word_list)
ZETA_ALPHA, FWE_VOCABULARY, FWE_TOP = 2.0, 1000, 3

# The templates (this project's own wording).
FILLER = (" The river runs slowly down to the sea.", " The hills stand quiet under grey clouds.",
          " A small bird sings in the old oak tree.", " Evening comes, and the lamps are lit one by one.",
          " The long road goes on and on.")
PAD = " ..."  # fills a list body's last few tokens
NIAH_INTRO = ("Hidden in the text below are notes, each giving a secret {noun} kept for a name. Read it carefully: "
              "a question about those notes follows the text.")
NEEDLE = " Take note: a secret {noun} kept for {key} is {value}."
END = "\n\nThat is the end of the {what}. "
ASK_ONE = (END + "What is the secret {noun} kept for {key}? Reply with it only.", "The secret {noun} kept for {key} is")
ASK_VALUES = (END + "The notes give several secret numbers kept for {key}. What are all of them?",
              "The secret numbers kept for {key} are")
ASK_KEYS = (END + "What are the secret numbers kept for {key}? Give each one.", "The secret numbers kept for {key} are")
VT_INTRO = ("The text below hides a chain of assignments to variables among plain sentences. Keep track of the value "
            "each variable is given.")
ASSIGN_VALUE, ASSIGN_NAME = " VAR {name} = {value}.", " VAR {name} = VAR {source}."
VT_ASK = (END + "Which variables end up holding the value {value}, directly or through another variable? Name all "
          "of them.", "The variables that hold the value {value} are:")
CWE_INTRO = "Below is a numbered list of words. A few of the words come up far more often than the rest."
CWE_ENTRY = (" {number}.", " {word}")  # encoded apart: " 12." then " apple"
CWE_ASK = (END + "Which ten words appear in it most often? Name those ten words.",
           "The ten most common words in the list are:")
FWE_INTRO = ("The text below is a stream of made-up words with dots between them. Some of the made-up words are used "
             "much more often than others.")
FWE_ENTRY = " {word} ..."
FWE_ASK = (END + "Which three made-up words appear in it most often? Name those three.",
           "The three most frequent made-up words are:")
_TEMPLATE_TEXT = "\n".join((*FILLER, NIAH_INTRO, NEEDLE, *ASK_ONE, *ASK_VALUES, *ASK_KEYS, VT_INTRO, *VT_ASK,
                            CWE_INTRO, *CWE_ASK, FWE_INTRO, *FWE_ASK)).lower()


@dataclasses.dataclass(frozen=True)
class TaskPrompt:
    task: str
    context: int  # the asked length; len(ids) == context exactly
    sample: int  # 0 .. samples - 1
    ids: tuple  # token ids
    question_start: int  # ids[:question_start]: chat head, instruction, body; ids[question_start:]: the question,
    # the chat tail and the answer prefix (a compress-after-prefill run compresses the first part before it sees
    # the second). The question never appears before question_start.
    answers: tuple  # the expected strings (str)
    depths: tuple  # per answer, the depth of the needle that states it (share of the body's tokens before it);
    # () for cwe and fwe
    max_new_tokens: int  # the greedy answer length this task needs (MAX_NEW_TOKENS)


def score(answer: str, answers) -> float:
    """RULER's "all" metric: the share of the expected strings found in the answer, case-insensitive."""
    answer = answer.lower()
    return sum(expected.lower() in answer for expected in answers) / len(answers)


def build_prompts(tokenizer, task: str, context: int, samples: int, seed: int = 0, *, text_source: str = "wikipedia",
                  splits=("test",), chat: bool = True) -> list:
    """`samples` TaskPrompts of `task`, each of exactly `context` tokens, deterministic in (task, context, samples,
    seed): a sample draws its keys and values from (task, sample, seed), so the contexts of one sample share them
    (a value that the longer text happens to hold aside). Real-text haystacks come from `text_source`'s records in
    `splits` (sample i starts at record i + seed); cwe takes its words from them too. The model's chat template
    wraps the prompt when `chat` is set and the tokenizer has one."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1; got {samples!r}")
    if not isinstance(context, (int, np.integer)) or context < 1:
        raise ValueError(f"context must be an integer >= 1; got {context!r}")
    if text_source == sources.SYNTHETIC:
        raise ValueError("text_source must be a dataset with text (wikipedia, news, sharegpt); got 'synthetic'")
    context, samples = int(context), int(samples)
    parts = [_task_parts(tokenizer, task, context, sample, samples, seed, text_source, tuple(splits))
             for sample in range(samples)]
    frames = [_template(tokenizer, part.intro, part.question, part.prefix, chat) for part in parts]  # (head, tail)
    template = max(len(head) + len(tail) + part.reserved for part, (head, tail) in zip(parts, frames))
    if context < template + MIN_HAYSTACK:
        raise ValueError(f"context must be >= {template + MIN_HAYSTACK} for task {task} (template and needles "
                         f"{template} tokens + {MIN_HAYSTACK} of haystack); got {context}")
    prompts = []
    for sample, (part, (head, tail)) in enumerate(zip(parts, frames)):
        length = context - len(head) - len(tail)
        body, answers, starts = part.body(length)
        assert len(body) == length
        prompts.append(TaskPrompt(task, context, sample, tuple(head) + tuple(body) + tuple(tail), len(head) + length,
                                  tuple(answers), tuple(start / length for start in starts), MAX_NEW_TOKENS[task]))
    return prompts


# ---------------------------------------------------------------- one prompt

@dataclasses.dataclass
class _Parts:
    intro: str
    question: str
    prefix: str  # the answer prefix: the assistant's turn starts with it
    reserved: int  # body tokens the needles take
    body: object  # body(length) -> (ids: exactly `length`, answers, needle starts: one per answer; [] for cwe / fwe)


def _task_parts(tokenizer, task, context, sample, samples, seed, text_source, splits) -> _Parts:
    """The template's texts and the body builder of one prompt, its keys and values drawn (seeded per sample)."""
    rng = np.random.default_rng([seed, TASKS.index(task), sample])  # one sample's keys and values at every context
    encode = functools.lru_cache(maxsize=None)(lambda text: tuple(tokenizer.encode(text, add_special_tokens=False)))
    if task not in NEEDLE_TASKS:
        return {"vt": _vt, "cwe": _cwe, "fwe": _fwe}[task](encode, rng, tokenizer, text_source, splits)
    real_text = lambda: haystack_sentences(types.SimpleNamespace(tokenizer=tokenizer), text_source, splits,
                                           sample + seed, context, MAX_SENTENCE_TOKENS)
    return _niah(task, encode, rng, sample, (sample + 0.5) / samples, real_text)


def _template(tokenizer, intro: str, question: str, prefix: str, chat: bool) -> tuple:
    """(head, tail) token ids around the body: in the model's chat template (the body and question in the user's
    message, the answer prefix starting the assistant's turn) when chat is set and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        mark = "\u2063BODY\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": intro + mark + question}], tokenize=False,
                                             add_generation_prompt=True)
        head, tail = text.split(mark)
        return tokenizer.encode(head, add_special_tokens=False), tokenizer.encode(tail + prefix,
                                                                                  add_special_tokens=False)
    return (tokenizer.encode(intro, add_special_tokens=True),
            tokenizer.encode(f"{question}\n\n{prefix}", add_special_tokens=False))


# ---------------------------------------------------------------- bodies

def _prose(pieces, length: int) -> list:
    """The first `length` tokens of an iterable of id lists, as whole pieces but the last, which may be cut short."""
    out, total = [], 0
    for piece in pieces:
        if total >= length:
            break
        out.append(list(piece)[:length - total])
        total += len(out[-1])
    if total < length:
        raise ValueError(f"the haystack has {total} tokens, the prompt needs {length}")
    return out


def _place(pieces, needles, targets, length: int, pad) -> tuple:
    """(body: exactly `length` ids, starts): the pieces in order, then PAD; needle j at the piece boundary that puts
    its start nearest to targets[j] x length (targets ascending; the pieces and needles fit in length)."""
    bounds = np.cumsum([0] + [len(piece) for piece in pieces])
    cuts, before = [], 0  # cuts[j]: the piece index needle j goes before; before: needle tokens placed so far
    for needle, target in zip(needles, targets):
        want = target * length - before
        cuts.append(max([int(np.argmin(np.abs(bounds - want)))] + cuts[-1:]))
        before += len(needle)
    body, starts = [], []
    for i, piece in enumerate(list(pieces) + [[]]):
        for needle, cut in zip(needles, cuts):
            if cut == i:
                starts.append(len(body))
                body += needle
        body += piece
    return body + [pad[k % len(pad)] for k in range(length - len(body))], starts


def _draw(rng, make, avoid: str, taken: list) -> str:
    """A fresh string from make(rng): not in `avoid` (lowercase text), neither inside nor holding one of `taken`."""
    while True:
        value = make(rng)
        low = value.lower()
        if low not in avoid and all(low not in t and t not in low for t in taken):
            taken.append(low)
            return value


def _made_up(rng) -> str:
    """A pronounceable made-up word of 3 syllables (6 letters): "kovera"."""
    return "".join(rng.choice(list("bdfgklmnprstvz")) + rng.choice(list("aeiou")) for _ in range(3))


_number = lambda rng: str(int(rng.integers(10 ** 6, 10 ** 7)))  # 7 digits
_uuid = lambda rng: str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _niah(task, encode, rng, sample, target, real_text) -> _Parts:
    """Needle tasks: keys and values drawn to be unique in the prompt; prose or needle-line bodies."""
    noun = "code" if task in ("niah_single_3", "niah_multikey_3") else "number"
    value = _uuid if noun == "code" else _number
    key = _uuid if task == "niah_multikey_3" else _made_up
    lines = task in ("niah_multikey_2", "niah_multikey_3")
    if task == "niah_single_1":
        text, source = "".join(FILLER), itertools.cycle([encode(s) for s in FILLER])
    elif lines:
        text, source = "", None
    else:
        sentences, text = real_text()
        source = iter(sentences)
    avoid, taken = (text + _TEMPLATE_TEXT).lower(), []
    draw = lambda make: _draw(rng, make, avoid, taken)
    needle = lambda k, v: list(encode(NEEDLE.format(noun=noun, key=k, value=v)))
    spread = [(j + 0.5) / NEEDLES for j in range(NEEDLES)]
    if task == "niah_multivalue":
        keys = [draw(key)] * NEEDLES
    elif task in ("niah_multikey_1", "niah_multiquery"):
        keys = [draw(key) for _ in range(NEEDLES)]
    else:
        keys = [draw(key)]
    values = [draw(value) for _ in keys]
    needles = [needle(k, v) for k, v in zip(keys, values)]
    targets = spread if len(keys) > 1 else [target]
    asked = [sample % NEEDLES] if task == "niah_multikey_1" else list(range(len(keys)))
    what = dict(what="text", noun=noun)
    if task == "niah_multivalue":
        question, prefix = (s.format(key=keys[0], **what) for s in ASK_VALUES)
    elif task == "niah_multiquery":
        question, prefix = (s.format(key=", ".join(keys[:-1]) + " and " + keys[-1], **what) for s in ASK_KEYS)
    else:
        question, prefix = (s.format(key=keys[asked[0]], **what) for s in ASK_ONE)

    reserved = sum(map(len, needles))

    def body(length):
        if lines:  # lines of other keys, as many as fit beside the asked one
            pieces, total = [], reserved
            while True:
                line = needle(draw(key), draw(value))
                if total + len(line) > length:
                    break
                pieces.append(line)
                total += len(line)
        else:
            pieces = _prose(source, length - reserved)
        ids, starts = _place(pieces, needles, targets, length, encode(PAD))
        return ids, [values[j] for j in asked], [starts[j] for j in asked]

    return _Parts(NIAH_INTRO.format(noun=noun), question, prefix, reserved, body)


def _vt(encode, rng, tokenizer, text_source, splits) -> _Parts:
    """Variable tracking: HOPS + 1 variables, one value, the chain's assignments in FILLER at (j + 0.5) / (HOPS + 1)."""
    taken = []
    names = [_draw(rng, lambda r: "".join(r.choice(list(string.ascii_uppercase), 5)), _TEMPLATE_TEXT, taken)
             for _ in range(HOPS + 1)]
    value = _draw(rng, lambda r: str(int(r.integers(10 ** 4, 10 ** 5))), _TEMPLATE_TEXT, taken)
    needles = [list(encode(ASSIGN_VALUE.format(name=names[0], value=value)))]
    needles += [list(encode(ASSIGN_NAME.format(name=name, source=source))) for source, name in zip(names, names[1:])]
    reserved = sum(map(len, needles))
    filler = itertools.cycle([encode(s) for s in FILLER])

    def body(length):
        ids, starts = _place(_prose(filler, length - reserved), needles,
                             [(j + 0.5) / len(needles) for j in range(len(needles))], length, encode(PAD))
        return ids, names, starts

    question, prefix = (s.format(what="text", value=value) for s in VT_ASK)
    return _Parts(VT_INTRO, question, prefix, reserved, body)


@functools.lru_cache(maxsize=4)
def _corpus_words(tokenizer, text_source: str, splits: tuple) -> tuple:
    """The lowercase words of 4-10 letters in the source's records that the tokenizer writes as one token after a
    space, sorted, the templates' words left out."""
    text = "\n".join(sources.record_texts(text_source, splits))
    words = set(re.findall(r"(?<![\w-])[a-z]{4,10}(?![\w-])", text)) - set(re.findall("[a-z]+", _TEMPLATE_TEXT))
    return tuple(w for w in sorted(words) if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1)


def _cwe(encode, rng, tokenizer, text_source, splits) -> _Parts:
    """Common words: a shuffled numbered list where COMMON_WORDS words come c times each and the others r times.

    c = COMMON_REPEATS (30) when the common words' entries fit in COMMON_SHARE of the list's tokens, else the largest
    count (>= 2) that does; r = max(1, c * RARE_REPEATS // COMMON_REPEATS): 30/3 down to 20/2, then c/1 (c >= 2).
    Then as many rare words as fit, and PAD: never a cut entry, so the counts are exact."""
    pool = _corpus_words(tokenizer, text_source, splits)
    words, common = [pool[i] for i in rng.permutation(len(pool))], []
    apart = lambda word: all(word not in c and c not in word for c in common)  # no word inside another
    for word in words:
        if len(common) < COMMON_WORDS and apart(word):
            common.append(word)
    rare = [word for word in words if apart(word)]
    numbers = [0]  # numbers[i]: the tokens of entry numbers 1 .. i; each word is one token

    def cost(entries):
        while len(numbers) <= entries:
            numbers.append(numbers[-1] + len(encode(CWE_ENTRY[0].format(number=len(numbers)))))
        return numbers[entries] + entries

    def body(length):
        c = max([c for c in range(2, COMMON_REPEATS + 1) if cost(COMMON_WORDS * c) <= COMMON_SHARE * length],
                default=2)
        r = max(1, c * RARE_REPEATS // COMMON_REPEATS)
        n = 0
        while cost(COMMON_WORDS * c + r * (n + 1)) <= length:
            n += 1
        if n > len(rare):
            raise ValueError(f"text_source {text_source!r} has {len(rare)} words to spare, a cwe list of {length} "
                             f"tokens needs {n}")
        entries = common * c + rare[:n] * r
        ids = [t for number, k in enumerate(rng.permutation(len(entries)), 1)
               for t in encode(CWE_ENTRY[0].format(number=number)) + encode(CWE_ENTRY[1].format(word=entries[k]))]
        return _place([ids], [], [], length, encode(PAD))[0], common, []

    question, prefix = (s.format(what="list") for s in CWE_ASK)
    return _Parts(CWE_INTRO, question, prefix, 0, body)


def _fwe(encode, rng, tokenizer, text_source, splits) -> _Parts:
    """Frequent words: made-up words drawn from a zeta(ZETA_ALPHA) law over FWE_VOCABULARY ranks until the list is
    full, then PAD; drawn again until the FWE_TOP most frequent counts are all above the next one's."""
    taken = []
    vocabulary = [_draw(rng, _made_up, _TEMPLATE_TEXT, taken) for _ in range(FWE_VOCABULARY)]

    def body(length):
        while True:
            ids, counts = [], collections.Counter()
            while True:
                rank = int(rng.zipf(ZETA_ALPHA))
                if rank > FWE_VOCABULARY:
                    continue
                piece = encode(FWE_ENTRY.format(word=vocabulary[rank - 1]))
                if len(ids) + len(piece) > length:
                    break
                ids += piece
                counts[vocabulary[rank - 1]] += 1
            top = counts.most_common(FWE_TOP + 1)
            if len(top) > FWE_TOP and top[FWE_TOP - 1][1] > top[FWE_TOP][1]:
                return _place([ids], [], [], length, encode(PAD))[0], [word for word, _ in top[:FWE_TOP]], []

    question, prefix = (s.format(what="text") for s in FWE_ASK)
    return _Parts(FWE_INTRO, question, prefix, 0, body)
