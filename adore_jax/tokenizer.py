"""Tokenizers: built from GGUF metadata with `tokenizers`, or read from a Hugging Face directory.

Both end up as a transformers fast tokenizer, so `encode`, `decode` and `apply_chat_template`
work the same whatever the model came from.
"""
import os

# GGUF `tokenizer.ggml.pre` values whose vocabularies were learned with single digits split off.
_DIGIT_SPLIT_PRE_TOKENIZERS = ("smollm",)
_CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for special/control tokens


def _strings(field):
    """The strings of a GGUF array field."""
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def tokenizer_from_gguf(meta):
    """A transformers fast tokenizer for a byte-level BPE vocabulary stored in GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
    tokens = _strings(meta["tokenizer.ggml.tokens"])
    token_types = [int(meta["tokenizer.ggml.token_type"].parts[i][0]) for i in meta["tokenizer.ggml.token_type"].data]
    merges = [tuple(m.split(" ", 1)) for m in _strings(meta["tokenizer.ggml.merges"])]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE_TOKENIZERS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, token_types) if kind == _CONTROL_TOKEN_TYPE])

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos"), eos_token=token("eos"),
        unk_token=token("unknown"), pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"))


def tokenizer_from_hf(directory: str):
    """The directory's tokenizer, or None when it has none (e.g. a bare test checkpoint)."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(directory, n)) for n in names):
        return None
    return AutoTokenizer.from_pretrained(directory)
