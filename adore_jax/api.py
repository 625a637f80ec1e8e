"""The public API: `load_model`, `generate` and `teacher_force`.

    model = load_model("smollm2-135m")
    out = generate(model, ["Explain RoPE."], 64, cache=presets.adore_recall(256),
                   sampling=SamplingParams(temperature=0.7, top_p=0.9), chat=True)

The cache policy and the sampling are objects (adore_jax.policies, SamplingParams); the keyword
form `generate(model, prompts, 64, policy="adore", cache_size=256, temperature=0.7)` is a
convenience that builds (or overrides fields of) the same objects.
"""
import dataclasses
import os
import warnings
import zlib
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax import cache as kv_cache
from adore_jax import timing, weights
from adore_jax import tokenizer as tokenizers
from adore_jax.config import ModelConfig
from adore_jax.policies import POLICIES, CachePolicy, PolicyState, make_policy
from adore_jax.sampling import SamplingParams, sample, token_logprobs
from adore_jax.session import DecodeSession, check_prompt_ids, decode_schedule, plan_generation

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


CHAT_ROLES = ("system", "user", "assistant", "tool")


def is_messages(prompt) -> bool:
    """A chat conversation: a list of {"role": ..., "content": ...} dicts (not a string, not token ids)."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], dict)


def check_messages(messages, where: str = "messages") -> None:
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(f"{where}[{j}] must be a message {{'role': ..., 'content': ...}}; got {message!r}")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"{where}[{j}]: role must be one of {', '.join(CHAT_ROLES)}; got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}[{j}]: content must be a string; got {type(message['content']).__name__}")


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

    def encode(self, prompt, chat: bool = False) -> list:
        """Token ids of a prompt: a string (with chat=True, formatted by the model's chat template as one user
        turn), or a conversation, a list of {"role": "system"|"user"|"assistant", "content": str} messages,
        always formatted by the chat template. A conversation that ends with an assistant message is continued
        (its text is the start of the answer); otherwise the template's assistant prompt is added."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.source!r} has no tokenizer: pass prompts as lists of token ids")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) and chat else None
        if not isinstance(prompt, str):
            check_messages(prompt)
            messages = list(prompt)
        if messages is None:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"chat formatting needs a chat template, but model {self.source!r} has none")
        continued = messages[-1]["role"] == "assistant"
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not continued,
                                                  continue_final_message=continued)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def load_model(source: str = "smollm2-135m", dtype: str = "float32", adapter: Optional[str] = None) -> Model:
    """Load a model from an embedded name (`smollm2-135m`; `smollm2-135m-adore`: its sparse fine-tune, an
    embedded adapter merged on load), a `.gguf` file or a Hugging Face directory.

    adapter: a saved LoRA adapter directory (adore_jax.adapters), merged into the weights on load;
    it must have been trained on this base model.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if source in weights.EMBEDDED_ADAPTERS:
        base, embedded_adapter = weights.EMBEDDED_ADAPTERS[source]
        if adapter is not None:
            raise ValueError(f"model {source!r} is {base!r} with its embedded adapter merged; to add adapter="
                             f"{adapter!r}, load {base!r} (an adapter is trained on one base model)")
        return dataclasses.replace(load_model(base, dtype, embedded_adapter), source=source)
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
            f"({', '.join([*weights.EMBEDDED_MODELS, *weights.EMBEDDED_ADAPTERS])}), a .gguf file or a Hugging "
            f"Face directory")
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
    """One entry per sample, prompt by prompt: with n samples per prompt, entries i*n .. i*n+n-1 are prompt i's."""
    texts: list  # generated text per sample (end-of-sequence token and stop string excluded)
    token_ids: list  # generated token ids per sample (end-of-sequence / stop token excluded; see stop_reasons)
    prompt_token_ids: list  # per sample: its prompt's token ids
    finish_reasons: list  # "eos", "stop" (a stop string or stop token id) or "length" (max_new_tokens)
    stats: dict  # prefill_s, decode_s, decode_tokens_per_s, ms_per_step, compile_s, compiles, ...
    cache: Optional[kv_cache.KVCache] = None  # the final cache (with return_state=True)
    policy_state: Optional[PolicyState] = None  # the final policy state (with return_state=True)
    stop_reasons: list = dataclasses.field(default_factory=list)  # the stop string or stop token id, else None
    logprobs: Optional[list] = None  # with SamplingParams(logprobs=True): log p of each token in token_ids
    prompt_index: list = dataclasses.field(default_factory=list)  # per sample: the index of its prompt

    def samples(self, prompt: int) -> list:
        """The texts of one prompt's samples."""
        return [text for text, i in zip(self.texts, self.prompt_index) if i == prompt]


_sample = jax.jit(sample, static_argnames=("greedy",))
SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))
CACHE_OPTIONS = ("policy", "preset") + tuple(sorted({f.name for cls in POLICIES.values()
                                                     for f in dataclasses.fields(cls)}))


def run_options(caller: str, cache, sampling, options: dict, allow_sampling: bool = True):
    """(policy, sampling) from the object arguments and the keyword form's options (which override them)."""
    allowed = CACHE_OPTIONS + (SAMPLING_OPTIONS if allow_sampling else ())
    for key in options:
        if key not in allowed:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}; cache and sampling options "
                            f"are: {', '.join(allowed)}")
    sampling_options = {k: options.pop(k) for k in SAMPLING_OPTIONS if k in options}
    if isinstance(sampling, dict):
        unknown = sorted(set(sampling) - set(SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"{caller}(): sampling has no option {unknown[0]!r}; its options: "
                            f"{', '.join(SAMPLING_OPTIONS)}")
        sampling = SamplingParams(**sampling)
    elif sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(f"{caller}(): sampling must be a SamplingParams or a mapping of its fields; got "
                        f"{type(sampling).__name__}")
    sampling = dataclasses.replace(sampling or SamplingParams(), **sampling_options)
    for key in ("policy", "preset"):
        if key in options:
            if cache is not None:
                raise ValueError(f"{caller}(): give the cache policy once, as cache=..., policy=... or preset=...")
            cache = {key: options.pop(key)}
    return make_policy(cache, **options), sampling


def _validate(prompts, max_new_tokens):
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings, of token-id lists or of conversations "
                         "(lists of {'role': ..., 'content': ...} messages)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")


def encode_prompts(model: Model, prompts, chat: bool = False) -> list:
    """Token ids of each prompt: a string, a conversation (a list of message dicts) or token ids.
    A list of message dicts alone (not in a list) is one conversation."""
    if all(isinstance(p, dict) for p in prompts):
        prompts = [prompts]
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            encoded.append(model.encode(prompt, chat))
        elif is_messages(prompt):
            check_messages(prompt, f"prompts[{i}]")
            encoded.append(model.encode(prompt, chat=True))
        else:
            encoded.append(list(prompt))
    return encoded


def check_stop_token_ids(stop_token_ids, vocab_size: int) -> None:
    """A stop token id outside the vocabulary can never be generated: refused, not ignored."""
    outside = [token for token in stop_token_ids if token >= vocab_size]
    if outside:
        raise ValueError(f"stop_token_ids must be in [0, {vocab_size}) (the model's vocabulary); got {outside[0]}")


def _first_stop(text: str, stops) -> Optional[tuple]:
    """(index, stop string) of the earliest stop string in text, or None."""
    hits = [(text.find(stop), stop) for stop in stops if stop in text]
    return min(hits) if hits else None


def _tokens_through_stop(model: Model, ids: list, stops) -> int:
    """The fewest leading tokens of ids whose text holds a stop string (binary search; the text grows with them)."""
    low, high = 1, len(ids)
    while low < high:
        mid = (low + high) // 2
        if _first_stop(model.decode(ids[:mid]), stops):
            high = mid
        else:
            low = mid + 1
    return high


def _finish(model: Model, ids: list, logprobs, eos: set, sampling: SamplingParams) -> tuple:
    """(token ids, text, finish reason, stop reason, logprobs) of one sample's raw tokens."""
    reason, stop_reason = "length", None
    for k, token in enumerate(ids):
        if token in eos or token in sampling.stop_token_ids:
            reason, stop_reason = ("eos", None) if token in eos else ("stop", token)
            ids = ids[:k]
            break
    text = model.decode(ids)
    hit = _first_stop(text, sampling.stop) if sampling.stop else None
    if hit is not None:
        reason, stop_reason = "stop", hit[1]
        text = text[:hit[0]]
        ids = ids[:_tokens_through_stop(model, ids, sampling.stop)]
    return ids, text, reason, stop_reason, None if logprobs is None else [float(x) for x in logprobs[:len(ids)]]


def _fits(model: Model, lengths, new_tokens: int, policy, max_length) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan_generation(model.config, lengths, new_tokens, policy, max_length)
        return True
    except ValueError:
        return False


def row_keys(seed: int, row_prompts, n: int):
    """[B] PRNG keys: row i's from the seed, its prompt's token ids and its sample index (i % n), so a request's
    samples do not depend on the other requests of the batch or on its place in it."""
    requests = np.array([zlib.crc32(np.asarray(ids, np.int32).tobytes()) for ids in row_prompts], np.uint32)
    samples = np.arange(len(row_prompts), dtype=np.uint32) % n
    fold = jax.vmap(lambda request, sample: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), request),
                                                                sample))
    return fold(requests, samples)  # one traced program, not 2 B eager ops


def generate(model: Model, prompts: Sequence, max_new_tokens: int = 64, *,
             cache: Union[CachePolicy, str, dict, None] = None, sampling: Union[SamplingParams, dict, None] = None,
             controller=None, seed: int = 0, chat: bool = False, stream: Optional[Callable[[np.ndarray], None]] = None,
             decode_chunk: Optional[int] = None, max_length: Optional[int] = None, attention_impl: str = "auto",
             return_state: bool = False, compress_after=None, **options) -> GenerationResult:
    """Generate continuations of a batch of prompts under a cache policy.

    prompts: strings (tokenised; chat-formatted when chat=True), conversations (lists of {"role": "system" |
    "user" | "assistant", "content": str} messages, always chat-formatted; one ending with an assistant
    message is continued), or lists of token ids.
    cache: a policy object (adore_jax.policies: Full, Window, StreamingLLM, H2O, TOVA, KeyNorm, Random,
    OracleTopK, Adore, each bounded one with `returns`), a preset (adore_jax.presets), a policy or preset name, or a
    mapping as in configs/policies/*.yaml; default: full attention. A cache_size
    larger than the run can fill is lowered to what it can (same output, with a CacheSizeWarning).
    sampling: SamplingParams (or a mapping of its fields): greedy at temperature 0, else temperature / top_k /
    top_p with PRNG seed
    `seed`; `n` samples per prompt; `stop` strings and `stop_token_ids` (finish reason "stop": the text
    ends before the stop string, token_ids end with the token that completed it; a stop token id is
    left out like end-of-sequence); `logprobs` (the result's `logprobs`). Default: greedy, one sample.
    controller: a saved controller's path or a (config, params) pair (adore; default: the model's
    committed controller). max_length bounds prompt + new tokens (the release buffer's length; default:
    as needed, rounded up).
    options: the keyword form, e.g. policy="tova", cache_size=256, returns=Recall(r=32), temperature=0.7;
    each sets or overrides a field of `cache` or `sampling`.
    Decoding runs in compiled chunks of `decode_chunk` steps (default: session.DECODE_CHUNK, or the next
    power of two of max_new_tokens - 1 when smaller), so max_new_tokens does not change the compiled
    program; the last chunk's tokens past max_new_tokens are dropped (with return_state=True the last chunk
    is cut to max_new_tokens instead, so the returned cache is the one after the last token kept). After
    each chunk the stop strings and stop token ids are checked on the host, `stream(tokens [B, k])` is called
    with the chunk's raw new tokens (B = prompts x n; past a sequence's end: padding, or tokens the result
    leaves out), and decoding stops once every sequence has ended. A sequence that ends inside a chunk
    reports nothing after its end: no token ids, text or logprobs.
    compress_after: an int, or one per prompt: a bounded policy keeps every token of each prompt's first
    compress_after tokens (the context), releases down to m once, then appends the rest (the question) and the
    answer without releasing (kvpress's query-agnostic protocol); default: the cache stays at m throughout.
    """
    _validate(prompts, max_new_tokens)
    policy, sampling = run_options("generate", cache, sampling, options)
    if sampling.stop and model.tokenizer is None:
        raise ValueError(f"stop strings need a tokenizer, but model {model.source!r} has none; use stop_token_ids")
    check_stop_token_ids(sampling.stop_token_ids, model.config.vocab_size)
    prompt_ids = encode_prompts(model, prompts, chat)
    check_prompt_ids(prompt_ids, model.config.vocab_size)
    n = sampling.n
    row_prompts = [ids for ids in prompt_ids for _ in range(n)]  # prompt by prompt, n rows each
    chunk, steps_planned = decode_schedule(max_new_tokens, decode_chunk)
    new_tokens = 1 + steps_planned
    if new_tokens > max_new_tokens and (return_state or not _fits(model, list(map(len, row_prompts)), new_tokens,
                                                                  policy, max_length)):
        new_tokens = max_new_tokens  # the last chunk is shorter: the final state is that of the last token kept,
        # or the rounded-up chunks do not fit
    if compress_after is not None and np.ndim(compress_after) > 0:
        compress_after = [compress_after[i] for i in range(len(prompt_ids)) for _ in range(n)]
    session = DecodeSession(model, row_prompts, new_tokens, policy, controller=controller, max_length=max_length,
                            attention_impl=attention_impl, clamp_cache_size=max_length is None,
                            compress_after=compress_after)
    sampler_args = sampling.as_arrays()
    pairs = jax.vmap(jax.random.split)(row_keys(seed, row_prompts, n))  # [B, 2]
    key, first_key = pairs[:, 0], pairs[:, 1]
    with_logprobs = sampling.logprobs

    def run_prefill():
        logits = session.prefill()
        first = _sample(logits, first_key, *sampler_args, greedy=sampling.greedy)
        return first, (token_logprobs(logits, first) if with_logprobs else None)

    (first, first_logprobs), prefill_s, prefill_compiles = timing.timed(run_prefill)
    first = np.asarray(first)
    outputs = _Outputs(model, sampling, len(row_prompts))
    done = outputs.add(first[:, None], None if first_logprobs is None else np.asarray(first_logprobs)[:, None],
                       np.zeros(len(row_prompts), bool))
    session.start(first, key, done=done)
    if stream is not None:
        stream(first[:, None])
    steps, decode_s, compile_s, compiles = _decode_chunks(session, outputs, sampling, done, max_new_tokens - 1,
                                                          chunk, new_tokens - 1, stream)
    token_ids, texts, reasons, stop_reasons, logprobs = outputs.finished()
    stats = _stats(session, n, token_ids, prefill_s=max(prefill_s - prefill_compiles.seconds, 0.0), decode_steps=steps,
                   decode_chunk=chunk, decode_s=decode_s, compile_s=prefill_compiles.seconds + compile_s,
                   compiles=prefill_compiles.count + compiles)
    return GenerationResult(texts=texts, token_ids=token_ids, prompt_token_ids=row_prompts, finish_reasons=reasons,
                            stats=stats, cache=session.cache if return_state else None,
                            policy_state=session.ps if return_state else None, stop_reasons=stop_reasons,
                            logprobs=logprobs if with_logprobs else None,
                            prompt_index=[i for i in range(len(prompt_ids)) for _ in range(n)])


def _decode_chunks(session: DecodeSession, outputs, sampling: SamplingParams, done, budget: int, chunk: int,
                   planned: int, stream) -> tuple:
    """Decode chunks of `chunk` steps (`planned` steps at most; the tokens of the first `budget` kept) until every
    row is done. Returns (steps, decode seconds, compile seconds, compiles)."""
    decode_s, steps, compile_s, compiles = 0.0, 0, 0.0, 0

    def run_chunk(num_steps):
        out = session.decode(num_steps, sampling, return_logits=sampling.logprobs)
        return out.tokens, (token_logprobs(out.logits, out.tokens) if sampling.logprobs else None)

    while steps < budget and not done.all():
        size = min(chunk, planned - steps)
        (new, new_logprobs), seconds, stats = timing.timed(run_chunk, size)
        new = np.asarray(new)[:, :budget - steps]  # tokens past max_new_tokens are dropped
        steps += size
        decode_s += seconds - stats.seconds
        compile_s += stats.seconds
        compiles += stats.count
        device_done = np.asarray(session.state.done)
        done = outputs.add(new, None if new_logprobs is None else np.asarray(new_logprobs), done | device_done)
        if (done & ~device_done).any():
            session.mark_done(done)  # a stop string or stop token id: the row emits padding from now on
        if stream is not None and new.shape[1]:
            stream(new)
    return steps, decode_s, compile_s, compiles


def _stats(session: DecodeSession, n: int, token_ids, **timings) -> dict:
    """A generation's statistics: the run's shape, its timings and what the return path brought back."""
    batch, steps, decode_s = len(session.lengths), timings["decode_steps"], timings["decode_s"]
    return dict(
        policy=session.policy.name, cache=session.policy.label, batch=batch, samples_per_prompt=n,
        prompt_tokens=int(session.lengths.sum()), padded_prompt=session.shape.padded_prompt,
        cache_size=session.policy.cache_size, cache_slots=session.shape.decode_slots, **timings,
        ms_per_step=1e3 * decode_s / steps if steps else float("nan"),
        decode_tokens_per_s=batch * steps / decode_s if decode_s > 0 else float("nan"),
        generated_tokens=sum(map(len, token_ids)),
        return_steps=int(session.ps.return_steps), returned_tokens=np.asarray(session.ps.returned_tokens).tolist())


class _Outputs:
    """What the host keeps of a generation: the raw tokens [B, k] chunk by chunk (and their log-probabilities),
    each row's tokens up to its first end token, and which rows have ended."""

    def __init__(self, model: Model, sampling: SamplingParams, batch: int):
        self.model, self.sampling = model, sampling
        self.eos = set(model.config.eos_token_ids)
        self.ends = np.asarray(sorted(self.eos | set(sampling.stop_token_ids)) or [-1])
        self.kept = [[] for _ in range(batch)]  # per row: tokens up to its first end token
        self.ended = np.zeros(batch, bool)
        self.pieces, self.logprob_pieces = [], []

    def add(self, new, logprobs, done):
        """Take a chunk's tokens new [B, k] (logprobs [B, >= k] or None); returns the rows done [B] after it: those
        done before (done [B]), ended by an end token, or whose text now holds a stop string."""
        self.pieces.append(new)
        if logprobs is not None:
            self.logprob_pieces.append(logprobs[:, :new.shape[1]])
        for i in np.flatnonzero(~self.ended):
            row = new[i]
            hits = np.flatnonzero(np.isin(row, self.ends))
            self.kept[i].extend(int(t) for t in (row[:hits[0] + 1] if len(hits) else row))
            self.ended[i] = len(hits) > 0
        done = self.ended | done
        for i in np.flatnonzero(~done) if self.sampling.stop else ():
            done[i] = _first_stop(self.model.decode(self.kept[i]), self.sampling.stop) is not None
        return done

    def finished(self) -> tuple:
        """Per row: (token ids, texts, finish reasons, stop reasons, logprobs), each a list."""
        generated = np.concatenate(self.pieces, axis=1)  # [B, <= max_new_tokens]
        all_logprobs = np.concatenate(self.logprob_pieces, axis=1) if self.logprob_pieces else None
        rows = [_finish(self.model, row.tolist(), None if all_logprobs is None else all_logprobs[i], self.eos,
                        self.sampling) for i, row in enumerate(generated)]
        return tuple(map(list, zip(*rows)))


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
    return continuation_logprobs(session, sequences, prompt_length, session.prefill(), return_logits)


def continuation_logprobs(session: DecodeSession, sequences, prompt_length: int, logits, return_logits: bool = False):
    """`teacher_force`'s scoring from a prefilled session: logits [B, V] after each prompt, then tokens
    prompt_length + 1.. of sequences [B, T] fed one decode step at a time. Returns log-probabilities
    [B, T - prompt_length] float32 (and the logits [B, T - prompt_length, V] with return_logits)."""
    batch, continuation = len(sequences), sequences.shape[1] - prompt_length
    first = jax.nn.log_softmax(logits, axis=-1)[np.arange(batch), sequences[:, prompt_length]]
    logprobs, all_logits = [np.asarray(first)[:, None]], [np.asarray(logits)[:, None]]
    if continuation > 1:
        session.start(sequences[:, prompt_length])
        out = session.decode(continuation - 1, forced=sequences[:, prompt_length + 1:], return_logits=return_logits)
        logprobs.append(np.asarray(out.forced_logprobs))
        all_logits.append(np.asarray(out.logits) if return_logits else None)
    logprobs = np.concatenate(logprobs, axis=1)  # [B, T - prompt_length]
    return (logprobs, np.concatenate(all_logits, axis=1)) if return_logits else logprobs
