"""The public API: `load_model`, `generate` and `teacher_force`.

    model = load_model("smollm2-135m")
    out = generate(model, ["Explain RoPE."], 64, cache=Adore(cache_size=256, rebuild=8),
                   sampling=SamplingParams(temperature=0.7, top_p=0.9), chat=True)

The cache policy and the sampling are objects (adore_jax.policies, SamplingParams); the keyword
form `generate(model, prompts, 64, policy="adore", cache_size=256, temperature=0.7)` is a
convenience that builds (or overrides fields of) the same objects.
"""
import dataclasses
import os
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax import cache as kv_cache
from adore_jax import timing, weights
from adore_jax import tokenizer as tokenizers
from adore_jax.config import ModelConfig
from adore_jax.policies import POLICIES, CachePolicy, PolicyState, make_policy
from adore_jax.sampling import SamplingParams, sample
from adore_jax.session import DecodeSession, check_prompt_ids

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def load_model(source: str = "smollm2-135m", dtype: str = "float32", adapter: Optional[str] = None) -> Model:
    """Load a model from an embedded name (`smollm2-135m`), a `.gguf` file or a Hugging Face directory.

    adapter: a saved LoRA adapter directory (adore_jax.adapters), merged into the weights on load;
    it must have been trained on this base model.
    """
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
    if adapter is not None:
        from adore_jax.adapters import apply_adapter

        params = apply_adapter(params, source, os.path.expanduser(adapter))
        source = f"{source} + adapter {adapter}"
    return Model(config=config, params=params, tokenizer=tokenizer, source=source)


@dataclasses.dataclass
class GenerationResult:
    texts: list  # generated text per prompt (end-of-sequence token excluded)
    token_ids: list  # generated token ids per prompt (end-of-sequence token excluded)
    prompt_token_ids: list
    finish_reasons: list  # "eos" or "length"
    stats: dict  # prefill_s, decode_s, decode_tokens_per_s, ms_per_step, compile_s, compiles, ...
    cache: Optional[kv_cache.KVCache] = None  # the final cache (with return_state=True)
    policy_state: Optional[PolicyState] = None  # the final policy state (with return_state=True)


_sample = jax.jit(sample, static_argnames=("greedy",))
SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))
CACHE_OPTIONS = ("policy",) + tuple(sorted({f.name for cls in POLICIES.values() for f in dataclasses.fields(cls)}))


def run_options(caller: str, cache, sampling, options: dict, allow_sampling: bool = True):
    """(policy, sampling) from the object arguments and the keyword form's options (which override them)."""
    allowed = CACHE_OPTIONS + (SAMPLING_OPTIONS if allow_sampling else ())
    for key in options:
        if key not in allowed:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}; cache and sampling options "
                            f"are: {', '.join(allowed)}")
    sampling_options = {k: options.pop(k) for k in SAMPLING_OPTIONS if k in options}
    sampling = dataclasses.replace(sampling or SamplingParams(), **sampling_options)
    if "policy" in options:
        if cache is not None:
            raise ValueError(f"{caller}(): give the cache policy once, as cache=... or policy=..., not both")
        cache = options.pop("policy")
    return make_policy(cache, **options), sampling


def _validate(prompts, max_new_tokens):
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")


def generate(model: Model, prompts: Sequence[Union[str, Sequence[int]]], max_new_tokens: int = 64, *,
             cache: Union[CachePolicy, str, dict, None] = None, sampling: Optional[SamplingParams] = None,
             controller=None, seed: int = 0, chat: bool = False, stream: Optional[Callable[[np.ndarray], None]] = None,
             decode_chunk: Optional[int] = None, max_length: Optional[int] = None, attention_impl: str = "auto",
             return_state: bool = False, **options) -> GenerationResult:
    """Generate continuations of a batch of prompts under a cache policy.

    prompts: strings (tokenised, chat-formatted when chat=True) or lists of token ids.
    cache: a policy object (adore_jax.policies: Full, Window, StreamingLLM, H2O, TOVA, OracleTopK,
    Adore), its name, or a mapping as in configs/policies/*.yaml; default: full attention.
    sampling: SamplingParams (greedy at temperature 0, else temperature / top_k / top_p with PRNG
    seed `seed`); default greedy. controller: a saved controller's path or a (config, params) pair
    (adore; default: the model's committed controller). max_length bounds prompt + new tokens (the
    release buffer's length; default: as needed, rounded up).
    options: the keyword form, e.g. policy="adore", cache_size=256, rebuild=8, temperature=0.7; each
    sets or overrides a field of `cache` or `sampling`.
    Decoding runs as one scan, or in chunks of `decode_chunk` steps (default 16 when streaming);
    `stream(tokens [B, chunk])` is called after each chunk, and decoding stops early once every
    sequence has ended.
    """
    _validate(prompts, max_new_tokens)
    policy, sampling = run_options("generate", cache, sampling, options)
    prompt_ids = [list(p) if not isinstance(p, str) else model.encode(p, chat) for p in prompts]
    session = DecodeSession(model, prompt_ids, max_new_tokens, policy, controller=controller, max_length=max_length,
                            attention_impl=attention_impl)
    sampler_args = sampling.as_arrays()
    key, first_key = jax.random.split(jax.random.key(seed))

    def run_prefill():
        return _sample(session.prefill(), first_key, *sampler_args, greedy=sampling.greedy)

    first, prefill_s, prefill_compiles = timing.timed(run_prefill)
    eos = np.asarray(model.config.eos_token_ids or (-1,))
    session.start(first, key, done=np.isin(np.asarray(first), eos))
    pieces, decode_s, steps = [np.asarray(first)[:, None]], 0.0, 0
    compile_s, compiles = prefill_compiles.seconds, prefill_compiles.count
    if decode_chunk is None:
        decode_chunk = 16 if stream is not None else max_new_tokens - 1
    if stream is not None:
        stream(pieces[0])
    while steps < max_new_tokens - 1 and not bool(np.all(np.asarray(session.state.done))):
        n = min(decode_chunk, max_new_tokens - 1 - steps)
        out, seconds, stats = timing.timed(session.decode, n, sampling)
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
        policy=session.policy.name, cache=session.policy.label, batch=batch,
        prompt_tokens=int(session.lengths.sum()), padded_prompt=session.shape.padded_prompt,
        cache_slots=session.shape.decode_slots, prefill_s=max(prefill_s - prefill_compiles.seconds, 0.0),
        decode_steps=steps, decode_s=decode_s, ms_per_step=1e3 * decode_s / steps if steps else float("nan"),
        decode_tokens_per_s=batch * steps / decode_s if decode_s > 0 else float("nan"),
        compile_s=compile_s, compiles=compiles,
        rebuild_steps=int(session.ps.rebuild_steps), rebuilt_tokens=np.asarray(session.ps.rebuilt_tokens).tolist())
    return GenerationResult(texts=[model.decode(ids) for ids in token_ids], token_ids=token_ids,
                            prompt_token_ids=prompt_ids, finish_reasons=reasons, stats=stats,
                            cache=session.cache if return_state else None,
                            policy_state=session.ps if return_state else None)


def teacher_force(model: Model, sequences, prompt_length: int, *,
                  cache: Union[CachePolicy, str, dict, None] = None, controller=None, attention_impl: str = "auto",
                  return_logits: bool = False, **options):
    """Score given continuations through the same prefill + decode path that generation uses.

    sequences: [B, T] token ids (equal lengths); the first `prompt_length` are prefilled, the rest
    are fed one decoding step at a time, so the policy releases tokens exactly as it would while
    generating. `cache` and the keyword options as in `generate`. Returns log-probabilities
    [B, T - prompt_length] float32 of tokens prompt_length..T-1 (and the logits
    [B, T - prompt_length, V] with return_logits).
    """
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or not 1 <= prompt_length < sequences.shape[1]:
        raise ValueError(f"sequences must be [B, T] with 1 <= prompt_length < T; got shape {sequences.shape} "
                         f"and prompt_length {prompt_length}")
    check_prompt_ids(sequences, model.config.vocab_size)
    policy, _ = run_options("teacher_force", cache, None, options, allow_sampling=False)
    continuation = sequences.shape[1] - prompt_length
    session = DecodeSession(model, [row[:prompt_length].tolist() for row in sequences], continuation, policy,
                            controller=controller, attention_impl=attention_impl)
    logits = session.prefill()
    batch = len(sequences)
    first = jax.nn.log_softmax(logits, axis=-1)[np.arange(batch), sequences[:, prompt_length]]
    logprobs, all_logits = [np.asarray(first)[:, None]], [np.asarray(logits)[:, None]]
    if continuation > 1:
        session.start(sequences[:, prompt_length])
        out = session.decode(continuation - 1, forced=sequences[:, prompt_length + 1:], return_logits=return_logits)
        logprobs.append(np.asarray(out.forced_logprobs))
        all_logits.append(np.asarray(out.logits) if return_logits else None)
    logprobs = np.concatenate(logprobs, axis=1)  # [B, T - prompt_length]
    return (logprobs, np.concatenate(all_logits, axis=1)) if return_logits else logprobs
