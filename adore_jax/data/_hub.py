"""The paper's standard datasets, read from the Hugging Face Hub's Parquet files.

Every dataset on the Hub has a Parquet copy on the `refs/convert/parquet` branch laid
out as `<config>/<split>/*.parquet`; reading that one layout with pyarrow serves all
three datasets without the `datasets` library. A local directory with the same
layout (`source_dir`) replaces the download: that is how offline machines and the
tests feed the very same reader.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterator, Mapping

from adore_jax.data._records import chat_role


@dataclasses.dataclass(frozen=True)
class HubSource:
    repo_id: str  # Hugging Face dataset repository
    config: str  # first directory level of the Parquet layout
    splits: Mapping[str, str]  # our split name -> the Hub's split name
    columns: tuple[str, ...]  # Parquet columns read
    to_record: Callable[[dict], dict]  # Parquet row -> record (see _records)
    # Fraction of the Hub's train split held out as our "validation" split, by a
    # stable hash of the record id, for datasets that ship none.
    validation_from_train: float = 0.0
    revision: str = "refs/convert/parquet"


def _ultrachat_record(row: dict) -> dict:
    return {
        "id": row["prompt_id"],
        "roles": [chat_role(message["role"]) for message in row["messages"]],
        "texts": [message["content"] for message in row["messages"]],
    }


SOURCES = {
    "ultrachat": HubSource(
        repo_id="HuggingFaceH4/ultrachat_200k",
        config="default",
        splits={"train": "train_sft", "test": "test_sft"},
        columns=("prompt_id", "messages"),
        to_record=_ultrachat_record,
        validation_from_train=0.02,
    ),
    "samsum": HubSource(
        repo_id="knkarthick/samsum",
        config="default",
        splits={"train": "train", "validation": "validation", "test": "test"},
        columns=("id", "dialogue", "summary"),
        to_record=lambda row: {"id": row["id"], "document": row["dialogue"], "summary": row["summary"]},
    ),
    "cnn_dailymail": HubSource(
        repo_id="abisee/cnn_dailymail",
        config="3.0.0",
        splits={"train": "train", "validation": "validation", "test": "test"},
        columns=("id", "article", "highlights"),
        to_record=lambda row: {"id": row["id"], "document": row["article"], "summary": row["highlights"]},
    ),
}


def download(source: HubSource) -> pathlib.Path:
    """Fetches the Parquet files (cached by huggingface_hub); returns the layout's root."""
    from huggingface_hub import snapshot_download

    patterns = [f"{source.config}/{split}/*.parquet" for split in source.splits.values()]
    return pathlib.Path(
        snapshot_download(
            source.repo_id, repo_type="dataset", revision=source.revision, allow_patterns=patterns
        )
    )


def split_files(root: pathlib.Path, source: HubSource, hub_split: str) -> list[pathlib.Path]:
    directory = root / source.config / hub_split
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no Parquet files for split {hub_split!r} of {source.repo_id} in {directory}"
        )
    return files


def records(files: list[pathlib.Path], source: HubSource) -> Iterator[dict]:
    """Streams the files' rows as records, a thousand rows in memory at a time."""
    import pyarrow.parquet as pq

    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000, columns=list(source.columns)):
            for row in batch.to_pylist():
                yield source.to_record(row)
