"""The paper's standard datasets, through stand-ins in the Hub's Parquet layout, and the errors."""

import pytest

from adore_jax.data import BatchConfig, batch_iterator, load_split
from adore_jax.data.testing import ByteTokenizer, write_hub_standin

SPLITS = ("train", "validation", "test")
ROWS = 5
ULTRACHAT_ROWS = 100  # its validation split is 2% of train_sft, carved by hash


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    """name -> split -> records, built from stand-ins into one data_dir."""
    rows = {"ultrachat": ULTRACHAT_ROWS, "samsum": ROWS, "cnn_dailymail": ROWS}
    built = {}
    for name, n in rows.items():
        source_dir = write_hub_standin(name, tmp_path_factory.mktemp(name), n)
        built[name] = {split: list(load_split(name, split, data_dir, source_dir=source_dir)) for split in SPLITS}
    return built


@pytest.mark.parametrize("name", ["samsum", "cnn_dailymail"])
def test_summary_datasets_keep_the_hub_splits(built, name):
    for split in SPLITS:
        records = built[name][split]
        assert len(records) == ROWS
        assert all(set(r) == {"id", "document", "summary"} and r["document"] and r["summary"] for r in records)
    ids = [{r["id"] for r in built[name][split]} for split in SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_ultrachat_holds_out_validation_from_train_sft(built):
    train, validation, test = (built["ultrachat"][split] for split in SPLITS)
    assert len(train) + len(validation) == ULTRACHAT_ROWS and len(validation) >= 1
    assert len(test) == ULTRACHAT_ROWS
    assert not {r["id"] for r in train} & {r["id"] for r in validation}
    assert all(r["roles"] == ["user", "assistant"] and len(r["texts"]) == 2 for r in train + validation + test)


@pytest.mark.parametrize("name", ["ultrachat", "samsum", "cnn_dailymail"])
def test_standins_flow_through_the_batching_pipeline(data_dir, built, name):
    tokenizer = ByteTokenizer()
    records = load_split(name, "train", data_dir)  # already built: no source_dir needed
    batch = next(batch_iterator(records, tokenizer, BatchConfig(seq_len=64, batch_size=2, num_epochs=1)))
    assert {key: value.shape for key, value in batch.items()} == {
        "tokens": (2, 64),
        "segment_ids": (2, 64),
        "positions": (2, 64),
    }
    assert tokenizer.decode(batch["tokens"][0]).startswith("<|im_start|>user\n")


def test_an_unknown_dataset_names_the_known_ones(data_dir):
    with pytest.raises(ValueError, match="unknown dataset 'pile'; known datasets: cnn_dailymail, news, samsum"):
        load_split("pile", "train", data_dir)


def test_an_unknown_split_names_the_available_ones(data_dir, built):
    with pytest.raises(ValueError, match="no split 'dev'; available splits: test, train, validation"):
        load_split("samsum", "dev", data_dir)


def test_an_empty_source_is_refused_at_build(tmp_path):
    source_dir = write_hub_standin("samsum", tmp_path / "source", 0)
    with pytest.raises(ValueError, match="no records for split 'train'"):
        load_split("samsum", "train", tmp_path / "tfds", source_dir=source_dir)


def test_a_source_without_a_split_names_the_missing_directory(tmp_path):
    source_dir = write_hub_standin("cnn_dailymail", tmp_path / "source", 2)
    for path in (source_dir / "3.0.0" / "validation").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="split 'validation' of abisee/cnn_dailymail"):
        load_split("cnn_dailymail", "train", tmp_path / "tfds", source_dir=source_dir)


def test_a_local_corpus_takes_no_source_dir(tmp_path):
    with pytest.raises(ValueError, match="takes no source_dir"):
        load_split("news", "train", tmp_path, source_dir=tmp_path)
