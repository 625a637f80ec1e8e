"""Training and evaluation text for adore-jax.

    records = load_split("sharegpt", "train")          # built once into default_data_dir()
    batches = batch_iterator(records, tokenizer, BatchConfig(seq_len=1024, batch_size=8))
    batch = next(batches)        # {"tokens", "segment_ids", "positions"}: int32 [B, S]
    state = batches.get_state()  # ... later: batches.set_state(state) resumes exactly

Datasets: sharegpt, wikipedia, news (real text shipped in installed packages) and the
paper's ultrachat, samsum, cnn_dailymail (downloaded from the Hugging Face Hub, or read
from a local copy with source_dir=). Splits: train, validation, test.
"""

from adore_jax.data._builders import DATA_DIR_ENV, DATASETS, default_data_dir, load_split
from adore_jax.data._pipeline import (
    SUMMARY_INSTRUCTION,
    BatchConfig,
    Tokenizer,
    batch_iterator,
    chat_messages,
    document_tokens,
)
from adore_jax.data._records import hash_split

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "SUMMARY_INSTRUCTION",
    "BatchConfig",
    "Tokenizer",
    "batch_iterator",
    "chat_messages",
    "default_data_dir",
    "document_tokens",
    "hash_split",
    "load_split",
]
