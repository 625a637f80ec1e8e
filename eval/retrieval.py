"""Retrieval (part `retrieval`): a numeric key hidden in a long text, asked for at the end.

Each prompt is a haystack of real text from the project's corpora (or random tokens: `synthetic`),
with one sentence that states a random key (e.g. 5 digits) inserted at a relative depth of the
haystack, and a question about the key after it. Every prompt of a context has exactly `context`
tokens (template + haystack + key sentence + question), so the prompts of one context share one
prefill shape. The answer is greedy and short; it is correct when the key's digits appear in it
(`key_found`). A bounded policy answers from what its cache kept of the haystack, so a key that
was released is lost unless the policy rebuilds it.

Layout of a prompt (token level; the haystack is cut at whole words, only its last sentence may be
cut short so that the prompt fills the context exactly):

    [chat head] INTRO | haystack sentences ... KEY SENTENCE ... haystack | QUESTION [chat tail] ANSWER_PREFIX

The key sentence goes in at the sentence boundary nearest to `depth` x the haystack's tokens, so
its depth is exact to within a sentence; sentences longer than `max_sentence_tokens` are split at
words first. A model without a tokenizer (the tests' tiny checkpoints) gets the same layout in
fixed random token ids, with the key's digits as the ids DIGIT_BASE + digit.
"""
import dataclasses
import re
import time
from typing import Optional

import numpy as np

from adore_jax.eval import sources
from adore_jax.eval.config import batches, policy_grid

# The template (this project's own wording).
INTRO = ("Below is a long passage. Somewhere inside it, one sentence gives a vault code. Read the passage, "
         "because afterwards you will be asked for that code.")
KEY_SENTENCE = " Remember this: the vault code is {key}."
QUESTION = "\n\nThat was the end of the passage. What is the vault code given in it? Reply with the number only."
ANSWER_PREFIX = "The vault code is"  # the start of the assistant's answer, so that the next tokens are the key

DIGIT_BASE = 3  # tokenizer-less models: digit d is token id DIGIT_BASE + d
_SYNTHETIC_FIRST_ID = DIGIT_BASE + 10  # synthetic haystack and template ids start above the digits


@dataclasses.dataclass
class RetrievalPrompt:
    ids: list  # the prompt's token ids (exactly `context` of them)
    key: str  # the key's digits
    context: int  # asked prompt length (tokens)
    depth: float  # asked depth: the fraction of the haystack before the key sentence
    key_start: int  # index in ids of the key sentence's first token
    key_tokens: int  # tokens of the key sentence
    haystack_start: int  # index in ids of the haystack's first token
    haystack_tokens: int  # tokens of haystack (the key sentence not counted)
    haystack: int  # which haystack (0 .. keys - 1): haystack k starts at the source's k-th record

    @property
    def actual_depth(self) -> float:
        """The fraction of the haystack's tokens before the key sentence."""
        return (self.key_start - self.haystack_start) / max(self.haystack_tokens, 1)


# ---------------------------------------------------------------- keys and answers

def make_key(rng: np.random.Generator, digits: int) -> str:
    """A random key of exactly `digits` digits (no leading zero)."""
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _word(token_id: int) -> str:
    """A digit-free word for a non-digit id of a tokenizer-less model: a space and the id in letters (29 -> " bd")."""
    letters = ""
    while True:
        token_id, rest = divmod(token_id, 26)
        letters = "abcdefghijklmnopqrstuvwxyz"[rest] + letters
        if token_id == 0:
            return " " + letters


def answer_text(model, ids) -> str:
    """The answer as text. A model without a tokenizer: its digit ids as digits, every other id as a word of
    letters (so the text tells answers apart and only the digit ids make numbers)."""
    if model.tokenizer is not None:
        return model.decode(ids)
    return "".join(str(i - DIGIT_BASE) if DIGIT_BASE <= i < DIGIT_BASE + 10 else _word(i) for i in map(int, ids))


_NUMBER = re.compile(r"\d+(?:[ ,'_\u202f\u00a0]\d+)*")  # digit groups joined by one separator: "40 217", "40,217"


def answer_numbers(answer: str) -> list:
    """The numbers in an answer as digit strings, a group separator inside a number dropped ("40,217" -> "40217")."""
    return [re.sub(r"\D", "", number) for number in _NUMBER.findall(answer)]


def key_found(key: str, answer: str) -> bool:
    """True when the key's digits appear, in order and contiguously, within one number of the answer."""
    return any(key in number for number in answer_numbers(answer))


# ---------------------------------------------------------------- haystacks

def split_sentences(text: str) -> list:
    """Sentence pieces of a text, each starting with the whitespace before it; "".join(pieces) == text.

    A piece ends after . ! or ? that is followed by whitespace, and before any whitespace run with a line
    break. Splits fall only where a whitespace run starts, which is where the tokenizer's words start, so
    encoding the pieces one by one gives the same ids as encoding the text."""
    return [piece for piece in re.split(r"(?<=[.!?])(?=\s)|(?<=\S)(?=[ \t]*\n)", text) if piece]


def _encode_sentence(tokenizer, sentence: str, max_tokens: int) -> list:
    """Token id lists of one sentence: itself, or word groups of at most max_tokens when it is longer."""
    ids = tokenizer.encode(sentence, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return [ids] if ids else []
    groups, current = [], []
    for word in re.split(r"(?<=\S)(?=\s)", sentence):
        word_ids = tokenizer.encode(word, add_special_tokens=False)
        if current and len(current) + len(word_ids) > max_tokens:
            groups.append(current)
            current = []
        current = current + word_ids
        while len(current) > max_tokens:  # one very long "word" (a URL, a run of symbols)
            groups.append(current[:max_tokens])
            current = current[max_tokens:]
    return groups + ([current] if current else [])


def haystack_sentences(model, source: str, splits, index: int, tokens: int, max_sentence_tokens: int,
                       seed: int = 0) -> tuple:
    """(sentences: token id lists with at least `tokens` ids in all, their text) for haystack `index`.

    Real text: the source's records from the `index`-th on (wrapping around), each after a blank line.
    synthetic: random "sentences" of 8-24 random ids (from a generator seeded by seed and index)."""
    if source == sources.SYNTHETIC:
        rng = np.random.default_rng([seed, 7, index, model.config.vocab_size])
        low = _SYNTHETIC_FIRST_ID if model.tokenizer is None else 3
        sentences, total = [], 0
        while total < tokens:
            sentences.append(rng.integers(low, model.config.vocab_size, int(rng.integers(8, 25))).tolist())
            total += len(sentences[-1])
        return sentences, ""
    if model.tokenizer is None:
        raise ValueError(f"retrieval: source {source!r} needs a tokenizer, but model {model.source!r} has none "
                         "(use source: synthetic)")
    texts = sources.record_texts(source, tuple(splits))
    if not texts:
        raise ValueError(f"retrieval: source {source!r} has no records in splits {list(splits)}")
    sentences, used, total = [], [], 0
    for step in range(len(texts)):
        text = "\n\n" + texts[(index + step) % len(texts)]
        used.append(text)
        for sentence in split_sentences(text):
            for ids in _encode_sentence(model.tokenizer, sentence, max_sentence_tokens):
                sentences.append(ids)
                total += len(ids)
        if total >= tokens:
            return sentences, "".join(used)
    raise ValueError(f"retrieval: all of {source!r} in splits {list(splits)} is {total} tokens, shorter than a "
                     f"haystack of {tokens} tokens")


# ---------------------------------------------------------------- prompts

def template(model, key: str, chat: bool = True) -> tuple:
    """(prefix, key sentence, suffix) token id lists of a prompt with this key.

    With a tokenizer: INTRO, KEY_SENTENCE and QUESTION + ANSWER_PREFIX, in the model's chat template
    (the haystack inside the user message, the answer prefix starting the assistant's turn) when chat is
    set and the model has one. Without a tokenizer: fixed random ids, the key as digit ids."""
    if model.tokenizer is None:
        rng = np.random.default_rng([11, model.config.vocab_size])
        words = lambda n: rng.integers(_SYNTHETIC_FIRST_ID, model.config.vocab_size, n).tolist()  # noqa: E731
        intro, marker, end, question = words(12), words(4), words(1), words(8)
        digits = [DIGIT_BASE + int(d) for d in key]
        return intro, marker + digits + end, question + marker
    tokenizer = model.tokenizer
    sentence = tokenizer.encode(KEY_SENTENCE.format(key=key), add_special_tokens=False)
    if chat and getattr(tokenizer, "chat_template", None):
        mark = "\u2063HAYSTACK\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": INTRO + mark + QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
        head, tail = text.split(mark)
        return (tokenizer.encode(head, add_special_tokens=False), sentence,
                tokenizer.encode(tail + ANSWER_PREFIX, add_special_tokens=False))
    return (tokenizer.encode(INTRO, add_special_tokens=True), sentence,
            tokenizer.encode(f"{QUESTION}\n\n{ANSWER_PREFIX}", add_special_tokens=False))


def assemble(prefix, sentences, key_sentence, suffix, context: int, depth: float) -> tuple:
    """(ids, key_start, haystack_tokens): exactly `context` ids, the key sentence at the sentence boundary of
    the haystack nearest to depth x its length. The haystack is the sentences in order, the last cut short."""
    budget = context - len(prefix) - len(key_sentence) - len(suffix)
    if budget < 1:
        raise ValueError(f"retrieval: context {context} is too short for the template "
                         f"({context - budget} tokens without any haystack)")
    haystack, starts = [], []
    for sentence in sentences:
        if len(haystack) >= budget:
            break
        starts.append(len(haystack))
        haystack += list(sentence)
    if len(haystack) < budget:
        raise ValueError(f"retrieval: the haystack has {len(haystack)} tokens, the context needs {budget}")
    haystack = haystack[:budget]
    target = depth * budget
    cut = min(starts + [budget], key=lambda b: (abs(b - target), b))
    ids = list(prefix) + haystack[:cut] + list(key_sentence) + haystack[cut:] + list(suffix)
    return ids, len(prefix) + cut, budget


def build_prompts(model, cfg, seed: int = 0) -> list:
    """Every prompt of the part: for each context, `keys` haystacks x the depths, each with its own key."""
    rng = np.random.default_rng([seed, 5])
    prompts = []
    for context in cfg.contexts:
        for index in range(cfg.keys):
            sentences, text = haystack_sentences(model, cfg.source, cfg.splits, index, context,
                                                 cfg.max_sentence_tokens, seed)
            for depth in cfg.depths:
                key = make_key(rng, cfg.key_digits)
                while key in text:  # the haystack must not contain the answer
                    key = make_key(rng, cfg.key_digits)
                prefix, sentence, suffix = template(model, key, cfg.chat)
                ids, start, haystack_tokens = assemble(prefix, sentences, sentence, suffix, context, depth)
                prompts.append(RetrievalPrompt(ids, key, context, float(depth), start, len(sentence), len(prefix),
                                               haystack_tokens, index))
    return prompts


# ---------------------------------------------------------------- accuracy

def accuracy_rows(label: str, cache_size: Optional[int], prompts, correct) -> list:
    """One row per context of one policy row: accuracy over its prompts, and per depth."""
    rows = []
    for context in dict.fromkeys(p.context for p in prompts):
        mine = [(p, c) for p, c in zip(prompts, correct) if p.context == context]
        by_depth = {}
        for depth in dict.fromkeys(p.depth for p, _ in mine):
            hits = [c for p, c in mine if p.depth == depth]
            by_depth[str(depth)] = float(np.mean(hits))
        rows.append(dict(policy=label, cache_size=cache_size, context=context, prompts=len(mine),
                         correct=int(sum(c for _, c in mine)), accuracy=float(np.mean([c for _, c in mine])),
                         accuracy_by_depth=by_depth))
    return rows


def with_full_reference(rows) -> list:
    """Add accuracy_vs_full: the row's accuracy as a fraction of full attention's at the same context
    (None without a full row, or when full attention answered none)."""
    full = {r["context"]: r["accuracy"] for r in rows if r["policy"] == "full"}
    for row in rows:
        reference = full.get(row["context"])
        row["accuracy_vs_full"] = row["accuracy"] / reference if reference else None
    return rows


def run_retrieval(ctx) -> dict:
    """Every policy row answers every prompt (greedy); rows per policy, m and context."""
    import adore_jax

    cfg = ctx.config.retrieval
    limit = ctx.model.config.max_position_embeddings
    contexts = [c for c in cfg.contexts if c + cfg.max_new_tokens <= limit]
    if len(contexts) < len(cfg.contexts):
        ctx.notices.append(f"retrieval: contexts {[c for c in cfg.contexts if c not in contexts]} + "
                           f"{cfg.max_new_tokens} new tokens exceed the model's {limit} positions: skipped")
    if not contexts:
        return dict(rows=[], samples=[])
    chat = cfg.chat and bool(getattr(ctx.model.tokenizer, "chat_template", None))
    if cfg.chat and ctx.model.tokenizer is not None and not chat:
        ctx.notices.append("retrieval: the model has no chat template; the prompts are plain text")
    prompts = build_prompts(ctx.model, dataclasses.replace(cfg, contexts=tuple(contexts)), ctx.config.seed)
    grid = policy_grid(ctx.config, cfg.policies, cfg.cache_sizes)
    grid.sort(key=lambda row: row.label != "full")  # full first: the reference
    rows, answers = [], {}
    for policy_row in ctx.bar(grid, f"retrieval ({len(prompts)} prompts)"):
        name, m = policy_row.label, policy_row.cache_size
        start = time.perf_counter()
        texts = [None] * len(prompts)
        for context in contexts:
            indices = [i for i, p in enumerate(prompts) if p.context == context]
            for batch, real in batches(indices, cfg.batch_size):
                out = adore_jax.generate(ctx.model, [prompts[i].ids for i in batch], cfg.max_new_tokens,
                                         **ctx.options(policy_row))
                for i, ids in zip(batch[:real], out.token_ids[:real]):
                    texts[i] = answer_text(ctx.model, ids)
        seconds = time.perf_counter() - start
        answers[(name, m)] = texts
        correct = [key_found(p.key, t) for p, t in zip(prompts, texts)]
        for row in accuracy_rows(name, m, prompts, correct):
            row["seconds"] = seconds
            rows.append(row)
            ctx.log(f"retrieval {name} m={m} context {row['context']}: {row['correct']}/{row['prompts']} "
                    f"({seconds:.0f} s)")
    samples = [dict(context=p.context, depth=p.depth, actual_depth=p.actual_depth, key=p.key, haystack=p.haystack,
                    key_start=p.key_start, answers={name + (f" m={m}" if m else ""): texts[i]
                                                    for (name, m), texts in answers.items()})
               for i, p in enumerate(prompts)]
    return dict(rows=with_full_reference(rows), samples=samples, source=cfg.source, depths=list(cfg.depths),
                keys=cfg.keys, key_digits=cfg.key_digits, max_new_tokens=cfg.max_new_tokens, chat=chat)
