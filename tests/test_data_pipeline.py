"""Tokenisation, packing, truncation, shuffling and resumable batching, on the real news corpus."""

import json

import numpy as np
import pytest

from adore_jax.data import (
    SUMMARY_INSTRUCTION,
    BatchConfig,
    batch_iterator,
    chat_messages,
    document_tokens,
    load_split,
)
from adore_jax.data.testing import ByteTokenizer

TOKENIZER = ByteTokenizer()
KEYS = ("tokens", "segment_ids", "positions")


@pytest.fixture(scope="module")
def news(tmp_path_factory):
    return load_split("news", "train", tmp_path_factory.mktemp("tfds"))


def rows_of(batches):
    """All rows of all batches, per key: [N, S]."""
    batches = list(batches)
    return {key: np.concatenate([b[key] for b in batches]) for key in KEYS}


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_packing_loses_no_token_and_numbers_segments_and_positions(news):
    records = news[:40]
    documents = [document_tokens(r, TOKENIZER) for r in records]
    seq_len = 96
    config = BatchConfig(seq_len=seq_len, batch_size=3, pack=True, shuffle=False, num_epochs=1, drop_remainder=False)
    rows = rows_of(batch_iterator(records, TOKENIZER, config))
    assert all(rows[key].shape[1] == seq_len and rows[key].dtype == np.int32 for key in KEYS)

    # The non-padding tokens, read row by row, are the documents in order.
    stream = np.concatenate(documents)
    np.testing.assert_array_equal(rows["tokens"][rows["segment_ids"] > 0], stream)
    assert len(rows["tokens"]) == -(-len(stream) // seq_len)  # only the last row is partly padding

    # Each row's segments are the document pieces that fall into it: numbered 1, 2, ...
    # with positions 0..len-1; a piece cut at a row's end continues as segment 1.
    ends = np.cumsum([len(d) for d in documents])
    for row, (tokens, segment_ids, positions) in enumerate(zip(*(rows[k] for k in KEYS))):
        start = row * seq_len
        cuts = [start] + [e for e in ends if start < e < start + seq_len] + [min(start + seq_len, ends[-1])]
        expected_ids, expected_positions = [], []
        for segment, (a, b) in enumerate(zip(cuts, cuts[1:]), 1):
            expected_ids += [segment] * (b - a)
            expected_positions += range(b - a)
        padding = seq_len - len(expected_ids)
        np.testing.assert_array_equal(segment_ids, expected_ids + [0] * padding)
        np.testing.assert_array_equal(positions, expected_positions + [0] * padding)
        assert not tokens[len(expected_ids):].any()


def test_truncation_keeps_one_document_per_row(news):
    records = news[:12]
    seq_len = 700  # shorter than some news articles, longer than others
    config = BatchConfig(seq_len=seq_len, batch_size=4, pack=False, shuffle=False, num_epochs=1)
    rows = rows_of(batch_iterator(records, TOKENIZER, config))
    lengths = [len(document_tokens(r, TOKENIZER)) for r in records]
    assert min(lengths) < seq_len < max(lengths)
    for record, tokens, segment_ids, positions in zip(records, *(rows[k] for k in KEYS)):
        ids = document_tokens(record, TOKENIZER)[:seq_len]
        n = len(ids)
        np.testing.assert_array_equal(tokens, np.pad(ids, (0, seq_len - n)))
        np.testing.assert_array_equal(segment_ids, [1] * n + [0] * (seq_len - n))
        np.testing.assert_array_equal(positions, list(range(n)) + [0] * (seq_len - n))


def test_excluded_ids_are_skipped_and_every_other_document_kept(news):
    records = news[:12]
    excluded = (records[3]["id"], records[7]["id"], "no-such-id")
    config = BatchConfig(seq_len=4096, batch_size=1, pack=False, shuffle=False, num_epochs=1,
                         drop_remainder=False, exclude_ids=excluded)
    rows = [row["tokens"][0][:int(np.sum(row["segment_ids"] > 0))]
            for row in batch_iterator(records, TOKENIZER, config)]
    expected = [document_tokens(r, TOKENIZER) for i, r in enumerate(records) if i not in (3, 7)]
    assert len(rows) == len(expected) == 10
    for got, want in zip(rows, expected):
        np.testing.assert_array_equal(got, want[:4096])


def test_excluded_ids_need_records_with_ids(news):
    config = BatchConfig(seq_len=8, batch_size=1, exclude_ids=("x",))
    with pytest.raises(ValueError, match="exclude_ids needs records with an 'id' field"):
        next(batch_iterator([{"text": "no id"}], TOKENIZER, config))


@pytest.mark.parametrize("pack", [True, False])
def test_set_state_resumes_with_the_identical_batches(news, pack):
    # 10 short documents and many batches: the resumed stretch crosses epoch boundaries.
    records = news[:10]
    config = BatchConfig(seq_len=256, batch_size=2, pack=pack, seed=7)
    iterator = batch_iterator(records, TOKENIZER, config)
    take(iterator, 5)
    state = json.loads(json.dumps(iterator.get_state()))  # it survives a JSON checkpoint
    expected = take(iterator, 12)

    resumed = batch_iterator(records, TOKENIZER, config)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 12), expected)


def test_shuffle_is_seeded_and_differs_per_epoch(news):
    records = news[:8]

    def first_tokens(seed):
        config = BatchConfig(seq_len=16, batch_size=1, pack=False, seed=seed, num_epochs=2)
        return [tuple(b["tokens"][0]) for b in batch_iterator(records, TOKENIZER, config)]

    documents = {tuple(document_tokens(r, TOKENIZER)[:16]) for r in records}
    order = first_tokens(seed=1)
    assert order == first_tokens(seed=1)
    assert order != first_tokens(seed=2)
    epoch_1, epoch_2 = order[:8], order[8:]
    assert set(epoch_1) == set(epoch_2) == documents
    assert epoch_1 != epoch_2


def test_chat_and_summary_records_go_through_the_chat_template():
    chat = {"id": "c", "roles": ["user", "assistant"], "texts": ["Hi there", "Hello!"]}
    assert TOKENIZER.decode(document_tokens(chat, TOKENIZER)) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    summary = {"id": "s", "document": "A long report.", "summary": "Short."}
    messages = chat_messages(summary)
    assert messages == [
        {"role": "user", "content": f"{SUMMARY_INSTRUCTION}\n\nA long report."},
        {"role": "assistant", "content": "Short."},
    ]
    assert TOKENIZER.decode(document_tokens(summary, TOKENIZER)).endswith("assistant\nShort.<|im_end|>\n")


def test_text_records_end_with_eos(news):
    ids = document_tokens(news[0], TOKENIZER)
    assert ids[-1] == TOKENIZER.eos_token_id
    assert TOKENIZER.decode(ids[:-1]) == news[0]["text"]


def test_a_hugging_face_tokenizer_fits_the_interface(news):
    """The real tokenizer will be a transformers fast tokenizer: a tiny one, trained here on
    the news corpus with the `tokenizers` library, must flow through unchanged. It adds a
    BOS like Llama's: documents get it, chat-templated text (whose template writes its own
    special tokens) must not get a second one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator((r["text"] for r in news[:50]), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    chatml = (
        "{{ '<s>' }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", chat_template=chatml
    )

    chat = {"id": "c", "roles": ["user", "assistant"], "texts": ["Fires near Sydney?", "Yes, many."]}
    assert tokenizer.decode(document_tokens(chat, tokenizer)) == (
        "<s><|im_start|>user\nFires near Sydney?<|im_end|>\n<|im_start|>assistant\nYes, many.<|im_end|>\n"
    )
    text = document_tokens(news[0], tokenizer)
    assert tokenizer.decode(text) == f"<s>{news[0]['text']}<|im_end|>"
    batch = next(batch_iterator(news, tokenizer, BatchConfig(seq_len=32, batch_size=2)))
    assert batch["tokens"].shape == (2, 32) and batch["tokens"].max() < len(tokenizer)


def test_a_sequence_length_below_two_is_refused():
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        BatchConfig(seq_len=1, batch_size=4)


def test_an_empty_dataset_is_refused(news):
    with pytest.raises(ValueError, match="empty"):
        batch_iterator(news[:0], TOKENIZER, BatchConfig(seq_len=8, batch_size=1))


def test_a_record_of_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="neither a chat nor a summary"):
        document_tokens({"id": "x", "body": "?"}, TOKENIZER)
