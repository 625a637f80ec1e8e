"""Evaluation inputs from the project's datasets (or seeded random tokens, for models without a tokenizer).

  lm_documents        equal-length token rows for perplexity and diagnostics (lm_document_ids: their ids)
  generation_prompts  chat prompts (ShareGPT first turns; summary requests over news / Wikipedia)
  conversations       multi-turn conversations for the streaming setting
  record_texts        plain texts of a dataset's records (the retrieval part's haystacks)
"""
import dataclasses
import functools
from typing import Optional

import numpy as np

SYNTHETIC = "synthetic"


@dataclasses.dataclass
class Prompt:
    ids: list  # prompt token ids (chat-formatted)
    reference: Optional[str]  # a reference answer when the data has one
    source: str  # dataset name
    text: str  # the prompt as text (for the report)


def as_text(model, ids) -> str:
    """Decoded text; a model without a tokenizer gets its token ids as words (ROUGE/BLEU still apply)."""
    if model.tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    return model.decode(ids)


def _records(name: str, splits):
    from adore_jax import data

    for split in splits:
        dataset = data.load_split(name, split)
        for i in range(len(dataset)):
            yield dataset[i]


def _record_text(record) -> str:
    if "text" in record:
        return record["text"]
    if "texts" in record:  # a chat: its messages one after another
        return "\n\n".join(text for text in record["texts"] if text.strip())
    return record.get("document", "")


@functools.lru_cache(maxsize=8)
def record_texts(name: str, splits: tuple) -> tuple:
    """The texts of a dataset's records in `splits`, in order, stripped, empty ones left out (a chat's messages
    joined by blank lines). Cached: every haystack of a run reads them."""
    return tuple(text.strip() for text in map(_record_text, _records(name, tuple(splits))) if text.strip())


def _synthetic_rng(model, seed, salt):
    return np.random.default_rng([seed, salt, model.config.vocab_size])


def lm_documents(model, name: str, count: int, length: int, splits=("test",), seed: int = 0) -> np.ndarray:
    """Up to `count` documents of at least `length` tokens, cut to `length`: [N, length] int32."""
    if name == SYNTHETIC:
        return _synthetic_rng(model, seed, 1).integers(3, model.config.vocab_size, (count, length), dtype=np.int32)
    rows = [ids[:length] for _, ids in _long_documents(model, name, count, length, splits)]
    return np.asarray(rows, np.int32).reshape(len(rows), length)


def lm_document_ids(model, name: str, count: int, length: int, splits=("test",)) -> list:
    """The record ids of lm_documents' documents (the ones a training run should hold out)."""
    return [str(record["id"]) for record, _ in _long_documents(model, name, count, length, splits)]


def _long_documents(model, name, count, length, splits):
    """The first `count` (record, token ids) of at least `length` tokens, splits in order, records in file order."""
    from adore_jax import data

    found = 0
    for record in _records(name, splits):
        ids = data.document_tokens(record, model.tokenizer)
        if len(ids) >= length:
            yield record, ids
            found += 1
            if found == count:
                return


def _cut(model, text: str, max_tokens: int) -> str:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else model.tokenizer.decode(ids[:max_tokens])


def chat_turns(record) -> list:
    """(user, assistant) text pairs of a chat record, empty messages skipped."""
    turns, pending = [], None
    for role, text in zip(record["roles"], record["texts"]):
        if not text.strip():
            continue
        if role == "user":
            pending = text
        elif role == "assistant" and pending is not None:
            turns.append((pending, text))
            pending = None
    return turns


def generation_prompts(model, sources, splits=("test",), min_tokens: int = 0, max_tokens: int = 2048,
                       seed: int = 0) -> list:
    """Prompts from `sources` (dicts: name, count): sharegpt first turns, news/wikipedia summary requests."""
    from adore_jax.data import SUMMARY_INSTRUCTION

    prompts = []
    for source in sources:
        name, count, found = source["name"], source["count"], []
        if name == SYNTHETIC:
            rng = _synthetic_rng(model, seed, 2)
            for _ in range(count):
                ids = rng.integers(3, model.config.vocab_size, int(rng.integers(max(min_tokens, 4), max_tokens + 1)))
                reference = rng.integers(3, model.config.vocab_size, 16)
                found.append(Prompt(ids.tolist(), as_text(model, reference), name, as_text(model, ids)))
            prompts += found
            continue
        for record in _records(name, splits):
            if name == "sharegpt":
                turns = chat_turns(record)
                if not turns:
                    continue
                user, reference = _cut(model, turns[0][0], max_tokens), turns[0][1]
            else:
                user, reference = f"{SUMMARY_INSTRUCTION}\n\n{_cut(model, record['text'], max_tokens)}", None
            ids = model.encode(user, chat=True)
            if len(ids) >= min_tokens:
                found.append(Prompt(ids, reference, name, user))
                if len(found) == count:
                    break
        prompts += found
    return prompts


def conversations(model, source: str, count: int, turns: int, max_turn_tokens: int, splits=("test",),
                  seed: int = 0) -> list:
    """`count` conversations of `turns` (user, reference answer) pairs: texts, or id lists when synthetic."""
    if source == SYNTHETIC:
        rng = _synthetic_rng(model, seed, 3)
        vocab = model.config.vocab_size
        return [[(rng.integers(3, vocab, max_turn_tokens).tolist(), rng.integers(3, vocab, max_turn_tokens).tolist())
                 for _ in range(turns)] for _ in range(count)]
    found = []
    for record in _records(source, splits):
        pairs = chat_turns(record)
        if len(pairs) >= turns:
            found.append([(_cut(model, u, max_turn_tokens), _cut(model, a, max_turn_tokens)) for u, a in pairs[:turns]])
            if len(found) == count:
                break
    return found


def turn_prompt(model, conversation, turn: int) -> list:
    """Prompt ids of user turn `turn`: every earlier turn with its reference answer, then the new question."""
    if model.tokenizer is None:
        ids = []
        for user, answer in conversation[:turn]:
            ids += list(user) + list(answer)
        return ids + list(conversation[turn][0])
    messages = []
    for user, answer in conversation[:turn]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": conversation[turn][0]})
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return model.tokenizer.encode(text, add_special_tokens=False)


def reference_text(model, answer) -> str:
    return answer if isinstance(answer, str) else as_text(model, answer)


def part_documents(ctx, part: str, cfg):
    """The documents a part scores (cfg: dataset, documents, length, splits), with a notice when none."""
    docs = lm_documents(ctx.model, cfg.dataset, cfg.documents, cfg.length, cfg.splits, ctx.config.seed)
    if not len(docs):
        ctx.notices.append(f"{part}: no {cfg.dataset} document of >= {cfg.length} tokens")
    return docs
