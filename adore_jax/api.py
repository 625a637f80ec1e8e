"""The public API: `load_model` and `generate`."""
import dataclasses
import os
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax import cache as kv_cache
from adore_jax import decode, tokenizer as tokenizers, weights
from adore_jax.config import ModelConfig
from adore_jax.sampling import SamplingParams, sample

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIN_PROMPT_BUCKET = 16
SLOT_ROUNDING = 128  # cache sizes are rounded up to this, so nearby lengths share a compile


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: dict  # see adore_jax.model for the layout
    tokenizer: object  # a transformers tokenizer, or None for a checkpoint without one
    source: str

    @property
    def dtype(self):
        return self.params["embed"].dtype

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad if pad is not None else (self.config.eos_token_ids or (0,))[0])

    def encode(self, prompt: str, chat: bool = False) -> list:
        """Token ids of a prompt; with chat=True, formatted by the model's chat template first."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.source!r} has no tokenizer: pass prompts as lists of token ids")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"chat=True, but model {self.source!r} has no chat template")
            messages = [{"role": "user", "content": prompt}]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(prompt, add_special_tokens=not chat)

    def decode(self, token_ids) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def load_model(source: str = "smollm2-135m", dtype: str = "float32") -> Model:
    """Load a model from an embedded name (`smollm2-135m`), a `.gguf` file or a Hugging Face directory."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if source in weights.EMBEDDED_MODELS:
        path = weights.embedded_model_path(source)
    else:
        path = os.path.expanduser(source)
    if path.endswith(".gguf") and os.path.isfile(path):
        config, params, meta = weights.load_gguf_weights(path, DTYPES[dtype])
        tokenizer = tokenizers.tokenizer_from_gguf(meta)
    elif os.path.isdir(path):
        config, params = weights.load_hf_weights(path, DTYPES[dtype])
        tokenizer = tokenizers.tokenizer_from_hf(path)
    else:
        raise FileNotFoundError(
            f"model source {source!r} not found: expected an embedded model name "
            f"({', '.join(weights.EMBEDDED_MODELS)}), a .gguf file or a Hugging Face directory")
    eos = set(config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    config = dataclasses.replace(config, eos_token_ids=tuple(sorted(eos)))
    return Model(config=config, params=params, tokenizer=tokenizer, source=source)


@dataclasses.dataclass
class GenerationResult:
    texts: list  # generated text per prompt (end-of-sequence token excluded)
    token_ids: list  # generated token ids per prompt (end-of-sequence token excluded)
    prompt_token_ids: list
    finish_reasons: list  # "eos" or "length"
    stats: dict  # prefill_s, decode_s, decode_tokens_per_s, ms_per_step, compile_s, compiles, ...


def prompt_bucket(length: int, chunk: int) -> int:
    """Padded prompt length: a power of two (at least 16), a multiple of `chunk` above it."""
    bucket = max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())
    return bucket if bucket <= chunk else -(-length // chunk) * chunk


_sample = jax.jit(sample, static_argnames=("greedy",))


def _validate(prompts, max_new_tokens, prefill_chunk):
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1; got {prefill_chunk}")


def generate(model: Model, prompts: Sequence[Union[str, Sequence[int]]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             chat: bool = False, cache_size: Optional[int] = None, prefill_chunk: int = 512,
             stream: Optional[Callable[[np.ndarray], None]] = None, stream_chunk: int = 16) -> GenerationResult:
    """Generate continuations of a batch of prompts.

    prompts: strings (tokenised, chat-formatted when chat=True) or lists of token ids.
    Sampling is greedy at temperature 0. `cache_size` fixes the number of cache slots (default: the
    prompt bucket + max_new_tokens, rounded up). With `stream`, decoding runs in chunks of
    `stream_chunk` steps and `stream(tokens [B, stream_chunk])` is called after each; it stops early
    once every sequence has ended.
    """
    _validate(prompts, max_new_tokens, prefill_chunk)
    sampling = SamplingParams(temperature, top_k, top_p)
    config = model.config
    prompt_ids = [list(p) if not isinstance(p, str) else model.encode(p, chat) for p in prompts]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
    lengths = np.array([len(ids) for ids in prompt_ids], np.int32)
    longest = int(lengths.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt length ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {config.max_position_embeddings} tokens")
    padded = prompt_bucket(longest, prefill_chunk)
    chunk = min(prefill_chunk, padded)
    needed = max(padded, longest + max_new_tokens)
    if cache_size is None:
        cache_size = -(-(padded + max_new_tokens) // SLOT_ROUNDING) * SLOT_ROUNDING
    elif cache_size < needed:
        raise ValueError(f"cache_size must be >= {needed} for these prompts with full attention "
                         f"(longest prompt padded to {padded}, + max_new_tokens); got {cache_size}")

    batch = len(prompt_ids)
    tokens = np.full((batch, padded), model.pad_id, np.int32)
    for i, ids in enumerate(prompt_ids):
        tokens[i, :len(ids)] = ids
    cache = kv_cache.init_cache(config, batch, cache_size, model.dtype)
    temperature_arr, top_k_arr, top_p_arr = sampling.as_arrays()
    key, first_key = jax.random.split(jax.random.key(seed))

    def run_prefill():
        logits, filled = decode.prefill(model.params, cache, jnp.asarray(tokens), jnp.asarray(lengths),
                                        config=config, chunk=chunk)
        first = _sample(logits, first_key, temperature_arr, top_k_arr, top_p_arr, greedy=sampling.greedy)
        return first, filled

    (first, cache), prefill_s, prefill_compiles = decode.timed(run_prefill)
    eos = np.asarray(config.eos_token_ids or (-1,))
    state = decode.DecodeState(token=first, position=jnp.asarray(lengths),
                               done=jnp.asarray(np.isin(np.asarray(first), eos)), key=key)
    step_args = (temperature_arr, top_k_arr, top_p_arr)
    static = dict(config=config, greedy=sampling.greedy, pad_id=model.pad_id)
    pieces, decode_s, compile_s, compiles, steps = [np.asarray(first)[:, None]], 0.0, prefill_compiles.seconds, \
        prefill_compiles.count, 0
    chunk_steps = stream_chunk if stream is not None else max_new_tokens - 1
    if stream is not None:
        stream(pieces[0])
    while steps < max_new_tokens - 1 and not bool(np.all(np.asarray(state.done))):
        n = min(chunk_steps, max_new_tokens - 1 - steps)
        (new, cache, state), seconds, stats = decode.timed(
            decode.decode, model.params, cache, state, *step_args, num_steps=n, **static)
        new = np.asarray(new)
        pieces.append(new)
        decode_s += seconds - stats.seconds
        compile_s += stats.seconds
        compiles += stats.count
        steps += n
        if stream is not None:
            stream(new)
    generated = np.concatenate(pieces, axis=1)  # [B, <= max_new_tokens]

    token_ids, reasons = [], []
    for row in generated:
        ends = np.flatnonzero(np.isin(row, eos))
        token_ids.append(row[:ends[0]].tolist() if len(ends) else row.tolist())
        reasons.append("eos" if len(ends) else "length")
    stats = dict(
        batch=batch, prompt_tokens=int(lengths.sum()), padded_prompt=padded, cache_slots=cache_size,
        prefill_s=max(prefill_s - prefill_compiles.seconds, 0.0), decode_steps=steps,
        decode_s=decode_s, ms_per_step=1e3 * decode_s / steps if steps else float("nan"),
        decode_tokens_per_s=batch * steps / decode_s if decode_s > 0 else float("nan"),
        compile_s=compile_s, compiles=compiles)
    return GenerationResult(texts=[model.decode(ids) for ids in token_ids], token_ids=token_ids,
                            prompt_token_ids=prompt_ids, finish_reasons=reasons, stats=stats)
