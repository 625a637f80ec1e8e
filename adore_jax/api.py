"""The public API: `load_model` and `generate`."""
import dataclasses
import os
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax import cache as kv_cache
from adore_jax import controller as ctrl
from adore_jax import decode, timing, weights
from adore_jax import tokenizer as tokenizers
from adore_jax.config import ModelConfig
from adore_jax.policies import CacheConfig
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
    cache: Optional[kv_cache.KVCache] = None  # the final cache (with return_state=True)
    policy_state: Optional[decode.PolicyState] = None  # the final policy state (with return_state=True)


def prompt_bucket(length: int, chunk: int) -> int:
    """Padded prompt length: a power of two (at least 16), a multiple of `chunk` above it."""
    bucket = max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())
    return bucket if bucket <= chunk else -(-length // chunk) * chunk


_sample = jax.jit(sample, static_argnames=("greedy",))
DEFAULT_CONTROLLERS = {"smollm2-135m": os.path.join(os.path.dirname(__file__), "assets", "controller_smollm2")}


def _validate(prompts, max_new_tokens):
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")


def resolve_controller(model: Model, controller):
    """(ControllerConfig, params) from a path, a (config, params) pair, or the model's default."""
    if controller is None:
        path = DEFAULT_CONTROLLERS.get(model.source)
        if path is None or not os.path.isdir(path):
            raise ValueError(f"policy 'adore' needs a controller: pass controller=PATH (a trained controller) "
                             f"or a (ControllerConfig, params) pair; model {model.source!r} has no default")
        controller = path
    if isinstance(controller, (str, os.PathLike)):
        return ctrl.load_controller(str(controller), model.config.hidden_size)
    config, params = controller
    if config.embed_dim != model.config.hidden_size:
        raise ValueError(f"controller was built for embedding width {config.embed_dim}, "
                         f"but the model's is {model.config.hidden_size}")
    return config, params


def plan_generation(model: Model, lengths, max_new_tokens: int, cache: CacheConfig, max_length=None,
                    prefill_chunk=None):
    """Static sizes of a run: (cache config, padded prompt length, prefill chunk, slots, max_length)."""
    config = model.config
    longest = int(max(lengths))
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt length ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {config.max_position_embeddings} tokens")
    if prefill_chunk is None:
        prefill_chunk = cache.prefill_chunk if cache.bounded else 512
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1; got {prefill_chunk}")
    padded = prompt_bucket(longest, prefill_chunk)
    chunk = min(prefill_chunk, padded)
    needed = max(padded, longest + max_new_tokens)
    if max_length is None:
        max_length = -(-(padded + max_new_tokens) // SLOT_ROUNDING) * SLOT_ROUNDING
        if cache.bounded and cache.cache_size:
            max_length = max(max_length, cache.cache_size)
        elif not cache.bounded and cache.cache_size:
            max_length = cache.cache_size
    if max_length < needed:
        what = "cache_size" if not cache.bounded and cache.cache_size else "max_length"
        raise ValueError(f"{what} must be >= {needed} for these prompts (longest prompt padded to {padded}, "
                         f"+ max_new_tokens); got {max_length}")
    cache = cache.validate(max_length)
    if cache.bounded:
        slots = cache.cache_size + max(chunk, cache.block_rows)
    else:
        slots = max_length
    return cache, padded, chunk, slots, max_length


@dataclasses.dataclass
class _Prepared:
    """A run's static plan and its initial device state."""
    plan: decode.DecodePlan
    cparams: dict  # controller params ({} unless adore)
    tokens: np.ndarray  # [B, P] right-padded prompts
    lengths: np.ndarray  # [B]
    chunk: int  # prefill chunk
    decode_slots: int  # cache slots while decoding (a bounded cache is compacted after prefill)
    cache: kv_cache.KVCache
    ps: decode.PolicyState


def _prepare(model: Model, prompt_ids, max_new_tokens, cache_cfg: CacheConfig, controller, max_length,
             prefill_chunk, attention_impl) -> _Prepared:
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
    lengths = np.array([len(ids) for ids in prompt_ids], np.int32)
    cache_cfg, padded, chunk, slots, max_length = plan_generation(model, lengths, max_new_tokens, cache_cfg,
                                                                   max_length, prefill_chunk)
    controller_cfg, cparams = resolve_controller(model, controller) if cache_cfg.policy == "adore" else (None, {})
    plan = decode.DecodePlan(model.config, cache_cfg, controller_cfg, attention_impl)
    batch = len(prompt_ids)
    tokens = np.full((batch, padded), model.pad_id, np.int32)
    for i, ids in enumerate(prompt_ids):
        tokens[i, :len(ids)] = ids
    decode_slots = cache_cfg.cache_size + cache_cfg.block_rows if cache_cfg.bounded else slots
    return _Prepared(plan, cparams, tokens, lengths, chunk, min(decode_slots, slots),
                     kv_cache.init_cache(model.config, batch, slots, model.dtype),
                     decode.init_policy_state(plan, batch, slots, max_length))


def _prefill(model: Model, prep: _Prepared):
    """(last-token logits [B, V], cache, policy state) after the prompts, the cache compacted for decoding."""
    logits, cache, ps = decode.prefill(model.params, prep.cparams, prep.cache, prep.ps, jnp.asarray(prep.tokens),
                                       jnp.asarray(prep.lengths), plan=prep.plan, chunk=prep.chunk)
    if prep.decode_slots < cache.num_slots:
        cache, ps = decode.compact(cache, ps, num_slots=prep.decode_slots)
    return logits, cache, ps


def _cache_config(policy, cache_size, rebuild, adaptive_rebuild, attn_top_k, sinks, recent, cache_update,
                  rebuild_into_cache=True):
    return CacheConfig(policy=policy, cache_size=cache_size, rebuild=rebuild, adaptive_rebuild=adaptive_rebuild,
                       rebuild_into_cache=rebuild_into_cache,
                       attn_top_k=attn_top_k, sinks=sinks, recent=recent, cache_update=cache_update)


def generate(model: Model, prompts: Sequence[Union[str, Sequence[int]]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
             policy: str = "full", cache_size: Optional[int] = None, rebuild: int = 0,
             adaptive_rebuild: bool = False, rebuild_into_cache: bool = True, attn_top_k: Optional[int] = None,
             sinks: int = 0, recent: int = 0, controller=None, cache_update: str = "scatter",
             prefill_chunk: Optional[int] = None, max_length: Optional[int] = None, attention_impl: str = "auto",
             stream: Optional[Callable[[np.ndarray], None]] = None, decode_chunk: Optional[int] = None,
             return_state: bool = False) -> GenerationResult:
    """Generate continuations of a batch of prompts under a cache policy.

    prompts: strings (tokenised, chat-formatted when chat=True) or lists of token ids.
    Sampling: greedy at temperature 0, else temperature / top_k / top_p with PRNG seed `seed`.
    Cache: `policy` in full, window, streaming_llm, h2o, tova, oracle_topk, adore; `cache_size` = m
    tokens kept (bounded policies; for `full` the slot count, default as needed); `rebuild` = R
    (`rebuild_into_cache=False`: rebuilt tokens serve their step only, never taking a cache slot);
    `attn_top_k` = K (oracle_topk); `controller` = a saved controller's path or a (config, params)
    pair (adore; default: the model's committed controller). `max_length` bounds prompt + new
    tokens (the release buffer's length; default: as needed, rounded up).
    Decoding runs as one scan, or in chunks of `decode_chunk` steps (default 16 when streaming);
    `stream(tokens [B, chunk])` is called after each chunk, and decoding stops early once every
    sequence has ended.
    """
    _validate(prompts, max_new_tokens)
    sampling = SamplingParams(temperature, top_k, top_p)
    cache_cfg = _cache_config(policy, cache_size, rebuild, adaptive_rebuild, attn_top_k, sinks, recent, cache_update,
                              rebuild_into_cache)
    prompt_ids = [list(p) if not isinstance(p, str) else model.encode(p, chat) for p in prompts]
    prep = _prepare(model, prompt_ids, max_new_tokens, cache_cfg, controller, max_length, prefill_chunk,
                    attention_impl)
    temperature_arr, top_k_arr, top_p_arr = sampling.as_arrays()
    key, first_key = jax.random.split(jax.random.key(seed))

    def run_prefill():
        logits, cache, ps = _prefill(model, prep)
        first = _sample(logits, first_key, temperature_arr, top_k_arr, top_p_arr, greedy=sampling.greedy)
        return first, cache, ps

    (first, cache, ps), prefill_s, prefill_compiles = timing.timed(run_prefill)
    eos = np.asarray(model.config.eos_token_ids or (-1,))
    state = decode.DecodeState(token=first, position=jnp.asarray(prep.lengths),
                               done=jnp.asarray(np.isin(np.asarray(first), eos)), key=key)
    step_args = (temperature_arr, top_k_arr, top_p_arr)
    static = dict(plan=prep.plan, greedy=sampling.greedy, pad_id=model.pad_id)
    pieces, decode_s, steps = [np.asarray(first)[:, None]], 0.0, 0
    compile_s, compiles = prefill_compiles.seconds, prefill_compiles.count
    if decode_chunk is None:
        decode_chunk = 16 if stream is not None else max_new_tokens - 1
    if stream is not None:
        stream(pieces[0])
    while steps < max_new_tokens - 1 and not bool(np.all(np.asarray(state.done))):
        n = min(decode_chunk, max_new_tokens - 1 - steps)
        (out, cache, ps, state), seconds, stats = timing.timed(
            decode.decode, model.params, prep.cparams, cache, ps, state, *step_args, num_steps=n, **static)
        new = np.asarray(out.tokens)
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
    batch = len(prompt_ids)
    stats = dict(
        policy=policy, batch=batch, prompt_tokens=int(prep.lengths.sum()), padded_prompt=prep.tokens.shape[1],
        cache_slots=prep.decode_slots, prefill_s=max(prefill_s - prefill_compiles.seconds, 0.0),
        decode_steps=steps, decode_s=decode_s, ms_per_step=1e3 * decode_s / steps if steps else float("nan"),
        decode_tokens_per_s=batch * steps / decode_s if decode_s > 0 else float("nan"),
        compile_s=compile_s, compiles=compiles,
        rebuild_steps=int(ps.rebuild_steps), rebuilt_tokens=np.asarray(ps.rebuilt_tokens).tolist())
    return GenerationResult(texts=[model.decode(ids) for ids in token_ids], token_ids=token_ids,
                            prompt_token_ids=prompt_ids, finish_reasons=reasons, stats=stats,
                            cache=cache if return_state else None, policy_state=ps if return_state else None)


def teacher_force(model: Model, sequences, prompt_length: int, *, policy: str = "full",
                  cache_size: Optional[int] = None, rebuild: int = 0, adaptive_rebuild: bool = False,
                  rebuild_into_cache: bool = True, attn_top_k: Optional[int] = None, sinks: int = 0,
                  recent: int = 0, controller=None, cache_update: str = "scatter", prefill_chunk: Optional[int] = None,
                  attention_impl: str = "auto", return_logits: bool = False):
    """Score given continuations through the same prefill + decode path that generation uses.

    sequences: [B, T] token ids (equal lengths); the first `prompt_length` are prefilled, the rest
    are fed one decoding step at a time, so the policy releases tokens exactly as it would while
    generating. Returns log-probabilities [B, T - prompt_length] float32 of tokens
    prompt_length..T-1 (and the logits [B, T - prompt_length, V] with return_logits).
    """
    sequences = np.asarray(sequences, np.int32)
    if sequences.ndim != 2 or not 1 <= prompt_length < sequences.shape[1]:
        raise ValueError(f"sequences must be [B, T] with 1 <= prompt_length < T; got shape {sequences.shape} "
                         f"and prompt_length {prompt_length}")
    continuation = sequences.shape[1] - prompt_length
    cache_cfg = _cache_config(policy, cache_size, rebuild, adaptive_rebuild, attn_top_k, sinks, recent, cache_update,
                              rebuild_into_cache)
    prep = _prepare(model, [row[:prompt_length].tolist() for row in sequences], continuation, cache_cfg,
                    controller, None, prefill_chunk, attention_impl)
    logits, cache, ps = _prefill(model, prep)
    state = decode.DecodeState(token=jnp.asarray(sequences[:, prompt_length]),
                               position=jnp.asarray(prep.lengths), done=jnp.zeros(len(sequences), bool),
                               key=jax.random.key(0))
    first = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(sequences)), sequences[:, prompt_length]]
    logprobs, all_logits = [np.asarray(first)[:, None]], [np.asarray(logits)[:, None]]
    if continuation > 1:
        out, *_ = decode.decode(model.params, prep.cparams, cache, ps, state, 1.0, 0, 1.0,
                                jnp.asarray(sequences[:, prompt_length + 1:]), plan=prep.plan,
                                num_steps=continuation - 1, greedy=True, pad_id=model.pad_id,
                                return_logits=return_logits)
        logprobs.append(np.asarray(out.forced_logprobs))
        all_logits.append(np.asarray(out.logits) if return_logits else None)
    logprobs = np.concatenate(logprobs, axis=1)  # [B, T - prompt_length]
    return (logprobs, np.concatenate(all_logits, axis=1)) if return_logits else logprobs
