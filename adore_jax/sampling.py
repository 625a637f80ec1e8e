"""Next-token sampling: greedy, temperature, top-k and top-p, with an explicit PRNG key."""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 scales the logits before sampling
    top_k: int = 0  # keep the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off); got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_arrays(self):
        """The values the compiled sampler takes as (traced) arguments, so changing them never recompiles."""
        return (jnp.float32(max(self.temperature, 1e-6)), jnp.int32(self.top_k), jnp.float32(self.top_p))


def sample(logits, key, temperature, top_k, top_p, *, greedy: bool):
    """logits [B, V] float32 -> tokens [B] int32."""
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
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
