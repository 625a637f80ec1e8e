"""Records -> token batches: tokenise, pack or truncate, shuffle, batch; checkpointable.

A batch is a dict of int32 arrays, each [B, S] (B = batch_size, S = seq_len):
  tokens       token ids; 0 on padding
  segment_ids  1, 2, ... numbers the documents within a row; 0 on padding
  positions    position of each token within its document piece; 0 on padding
Attention must stay within a segment and the loss must skip padding and
pairs that cross segments (target = next token of the same segment).

Document order is a global, seeded shuffle, different every epoch. The returned
grain iterator checkpoints: `state = it.get_state()`, and `it.set_state(state)`
on any iterator of the same pipeline resumes with exactly the same batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import grain
import numpy as np

SUMMARY_INSTRUCTION = "Summarize the following text."


class Tokenizer(Protocol):
    """What the pipeline needs of a tokenizer (Hugging Face tokenizers have it)."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], tokenize: bool = ...) -> str: ...


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    seq_len: int  # S: tokens per row
    batch_size: int  # B: rows per batch
    pack: bool = True  # concatenate documents into full rows; False: one document a row, cut and padded
    shuffle: bool = True  # seeded global shuffle of the documents, every epoch anew
    seed: int = 0  # the shuffle's seed
    num_epochs: int | None = None  # None: repeat forever
    drop_remainder: bool = True  # drop a last, smaller batch (keeps one compiled shape)
    min_tokens: int = 0  # skip documents of fewer tokens (before packing or truncation)
    exclude_ids: tuple = ()  # skip the records of these ids, e.g. the documents an evaluation scores

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (an input and its next-token target), got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None (forever) or >= 1, got {self.num_epochs}")


def chat_messages(record: dict) -> list[dict]:
    """A chat or summary record as chat-template messages [{"role", "content"}].

    A summary record becomes the instruction + document from the user and the
    summary from the assistant; dropping the last message leaves the prompt.
    """
    if "roles" in record:
        return [{"role": role, "content": text} for role, text in zip(record["roles"], record["texts"])]
    if "document" in record:
        return [
            {"role": "user", "content": f"{SUMMARY_INSTRUCTION}\n\n{record['document']}"},
            {"role": "assistant", "content": record["summary"]},
        ]
    raise ValueError(f"record with fields {sorted(record)} is neither a chat nor a summary record")


def document_tokens(record: dict, tokenizer: Tokenizer) -> np.ndarray:
    """The token ids of one record, [T] int32.

    Chat and summary records go through the tokenizer's chat template, which writes
    all their special tokens itself (encoding adds none, or a BOS would double). A
    text record is encoded as a document (with BOS where the tokenizer adds one)
    and followed by EOS, if the tokenizer has one.
    """
    if "text" in record:
        ids = tokenizer.encode(record["text"])
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
    else:
        text = tokenizer.apply_chat_template(chat_messages(record), tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(ids, dtype=np.int32)


class _ExcludeIds:
    """A record filter: False for the records whose "id" is listed."""

    def __init__(self, ids):
        self.ids = frozenset(map(str, ids))

    def __call__(self, record) -> bool:
        if "id" not in record:
            raise ValueError(f"exclude_ids needs records with an 'id' field; this one has {sorted(record)}")
        return str(record["id"]) not in self.ids


def batch_iterator(records: Sequence[dict], tokenizer: Tokenizer, config: BatchConfig) -> grain.DatasetIterator:
    """Batches of config.batch_size rows of config.seq_len tokens (see the module doc)."""
    if len(records) == 0:
        raise ValueError("the dataset is empty: there are no records to batch")
    documents = records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(records)
    if config.exclude_ids:
        documents = documents.filter(_ExcludeIds(config.exclude_ids))
    if config.shuffle:
        documents = documents.shuffle(seed=config.seed)
    tokens = documents.repeat(config.num_epochs).map(lambda record: {"tokens": document_tokens(record, tokenizer)})
    if config.min_tokens:
        tokens = tokens.filter(lambda doc: len(doc["tokens"]) >= config.min_tokens)
    if config.pack:
        rows = _packed_rows(tokens.to_iter_dataset(), config.seq_len)
    else:
        rows = tokens.map(lambda doc: _truncated_row(doc["tokens"], config.seq_len)).to_iter_dataset()
    return iter(rows.batch(config.batch_size, drop_remainder=config.drop_remainder))


def _packed_rows(documents: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Concatenates documents and cuts the stream into rows of seq_len.

    A document cut at a row's end continues in the next row as a new segment whose
    positions restart at 0. Only the very last row of a finite stream has padding.
    """
    packed = grain.experimental.ConcatThenSplitIterDataset(documents, length_struct={"tokens": seq_len})
    return packed.map(
        lambda row: {
            "tokens": row["tokens"],
            "segment_ids": row["tokens_segment_ids"],
            "positions": row["tokens_positions"],
        }
    )


def _truncated_row(ids: np.ndarray, seq_len: int) -> dict:
    """One document's first seq_len tokens, padded to seq_len: each [S] int32."""
    length = min(len(ids), seq_len)
    tokens = np.zeros(seq_len, np.int32)
    tokens[:length] = ids[:length]
    in_document = np.arange(seq_len) < length
    return {
        "tokens": tokens,
        "segment_ids": in_document.astype(np.int32),
        "positions": np.where(in_document, np.arange(seq_len, dtype=np.int32), 0),
    }
