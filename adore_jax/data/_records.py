"""The three record schemas every corpus is stored in, and their stable splits.

A record is a plain dict of strings, one of three kinds:

- chat:    {"id", "roles": [str], "texts": [str]}   roles are user / assistant / system
- text:    {"id", "text"}
- summary: {"id", "document", "summary"}

Records are self-describing: the pipeline tells the kinds apart by their keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import tensorflow_datasets as tfds

# kind -> {field: whether the field is a list of strings}
_FIELDS = {
    "chat": {"id": False, "roles": True, "texts": True},
    "text": {"id": False, "text": False},
    "summary": {"id": False, "document": False, "summary": False},
}


def features(kind: str) -> tfds.features.FeaturesDict:
    """The tfds feature spec a corpus of this kind is stored with."""
    return tfds.features.FeaturesDict(
        {
            field: tfds.features.Sequence(tfds.features.Text()) if is_list else tfds.features.Text()
            for field, is_list in _FIELDS[kind].items()
        }
    )


# Source role names (ShareGPT's and Hugging Face's) -> chat-template roles.
_CHAT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def chat_role(source_role: str) -> str:
    """Maps a corpus's speaker name to the role a chat template expects."""
    try:
        return _CHAT_ROLES[source_role]
    except KeyError:
        raise ValueError(
            f"unknown chat role {source_role!r}; known roles: {sorted(_CHAT_ROLES)}"
        ) from None


def hash_split(key: str, fractions: Mapping[str, float]) -> str:
    """Assigns `key` to a split by a stable hash, with the given split fractions.

    sha256 rather than hash(): the assignment must not change between processes,
    machines or Python versions, or a model would be evaluated on its training data.
    """
    unit = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    bound = 0.0
    for split, fraction in fractions.items():
        bound += fraction
        if unit < bound:
            return split
    return split  # rounding: sum(fractions) may fall a hair below 1


def decode_record(raw: Mapping) -> dict:
    """tfds hands Text back as bytes (and Sequence(Text) as lists of bytes): make them str."""
    return {
        key: value.decode("utf-8") if isinstance(value, bytes) else [v.decode("utf-8") for v in value]
        for key, value in raw.items()
    }
