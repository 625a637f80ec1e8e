"""Stand-ins for tests on machines without a model hub or dataset downloads.

- ByteTokenizer: a tokenizer with the Hugging Face methods the pipeline uses.
- write_hub_standin: a small copy of a standard dataset's Hub Parquet layout, its
  text taken from the real news corpus, for `load_split(..., source_dir=...)`.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pathlib

from adore_jax.data import _corpora, _hub


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 2), a ChatML template; 0 pads, 1 is EOS, no BOS."""

    eos_token_id = 1
    vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [byte + 2 for byte in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 2 for i in ids if i >= 2).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self.encode(text) if tokenize else text


def _sentences(article: str) -> list[str]:
    return [s.strip() + "." for s in article.split(". ") if s.strip()]


def _hub_row(name: str, article: str, number: int) -> dict:
    """One row with the columns (and types) of the real dataset's Parquet files."""
    sentences = _sentences(article)
    row_id = hashlib.sha256(f"{name}-{number}".encode()).hexdigest()
    if name == "ultrachat":
        question, answer = sentences[0], " ".join(sentences[1:3]) or sentences[0]
        return {
            "prompt": question,
            "prompt_id": row_id,
            "messages": [{"content": question, "role": "user"}, {"content": answer, "role": "assistant"}],
        }
    if name == "samsum":
        speakers = itertools.cycle(["Anna", "Ben"])
        dialogue = "\r\n".join(f"{next(speakers)}: {s}" for s in sentences[:4])
        return {"id": str(13810000 + number), "dialogue": dialogue, "summary": sentences[0]}
    if name == "cnn_dailymail":
        return {"article": article, "highlights": "\n".join(sentences[:2]), "id": row_id[:40]}
    raise ValueError(f"no Hub stand-in for {name!r}; Hub datasets: {', '.join(sorted(_hub.SOURCES))}")


def write_hub_standin(name: str, directory: str | os.PathLike, rows_per_split: int) -> pathlib.Path:
    """Writes `rows_per_split` rows into every Hub split of dataset `name`; returns `directory`.

    The layout is the Hub's `<config>/<split>/0000.parquet`; rows_per_split=0 writes
    empty files with the real schema.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    articles = itertools.cycle(record["text"] for record in _corpora.news_articles())
    schema = pa.Table.from_pylist([_hub_row(name, next(articles), 0)]).schema  # raises for unknown names
    source = _hub.SOURCES[name]
    root = pathlib.Path(directory)
    number = itertools.count()
    for hub_split in source.splits.values():
        rows = [_hub_row(name, next(articles), next(number)) for _ in range(rows_per_split)]
        path = root / source.config / hub_split / "0000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return root
