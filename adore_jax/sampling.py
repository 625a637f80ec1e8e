"""Next-token sampling: greedy, temperature, top-k and top-p, with an explicit PRNG key.

`SamplingParams` also holds what `generate` does around the sampler (as vLLM's SamplingParams):
several samples per prompt (`n`), stop strings and stop token ids, and the log-probabilities of the
sampled tokens. Those are host-side or shape-free choices: none of them changes a compiled program.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp


def _as_tuple(value, name: str, kind) -> tuple:
    if value is None:
        return ()
    if isinstance(value, kind) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of {kind.__name__}; got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, kind):
            raise ValueError(f"{name} must be a list of {kind.__name__}; got {item!r} in {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 scales the logits before sampling
    top_k: int = 0  # keep the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    n: int = 1  # samples per prompt (the results list them prompt by prompt)
    stop: tuple = ()  # strings that end a sequence; the text stops before the first one (finish reason "stop")
    stop_token_ids: tuple = ()  # token ids that end a sequence like end-of-sequence (finish reason "stop")
    logprobs: bool = False  # return the log-probability of each generated token (the model's distribution)

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off); got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (samples per prompt) must be an integer >= 1; got {self.n!r}")
        stop = _as_tuple(self.stop, "stop", str)
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        stop_ids = _as_tuple(self.stop_token_ids, "stop_token_ids", int)
        if any(i < 0 for i in stop_ids):
            raise ValueError(f"stop_token_ids must be >= 0; got {list(stop_ids)}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be True or False; got {self.logprobs!r}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_arrays(self):
        """The values the compiled sampler takes as (traced) arguments, so changing them never recompiles."""
        return (jnp.float32(max(self.temperature, 1e-6)), jnp.int32(self.top_k), jnp.float32(self.top_p))


def sample(logits, keys, temperature, top_k, top_p, *, greedy: bool):
    """logits [B, V] float32, keys [B] PRNG keys (one per row: a row's draws do not depend on the others) ->
    tokens [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    vocab = logits.shape[-1]
    kth = jnp.where(top_k > 0, jnp.minimum(top_k, vocab) - 1, vocab - 1)
    top_k_floor = sorted_logits[:, kth]  # [B]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass of strictly more likely tokens
    kept = mass_before < top_p  # always keeps the most likely token
    top_p_floor = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1)  # [B]
    floor = jnp.maximum(top_k_floor, top_p_floor)[:, None]
    masked = jnp.where(logits >= floor, logits, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


@jax.jit
def token_logprobs(logits, tokens):
    """log p(token) under the model's distribution (before temperature, top-k, top-p).

    logits [..., V] float32, tokens [...] int32 -> [...] float32.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
