"""Prefill and decoding: jit-compiled, fixed shapes, the cache donated.

Prefill consumes right-padded prompts in chunks (one `lax.scan` over chunks). Decoding is one
`lax.scan` over steps whose carry holds the cache, the last token, its position, the per-sequence
done flags and the PRNG key. With the full-attention cache used here a token's slot is its
position; later policies choose slots themselves.
"""
import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from adore_jax.config import ModelConfig
from adore_jax.model import BlockInput, forward_block, lm_logits
from adore_jax.sampling import sample


@functools.partial(jax.jit, static_argnames=("config", "chunk"), donate_argnames=("cache",))
def prefill(params, cache, tokens, lengths, *, config: ModelConfig, chunk: int):
    """Write right-padded prompts into an empty cache.

    tokens: [B, P] int32 with P % chunk == 0; lengths: [B] int32, 1 <= lengths <= P.
    Returns (logits [B, V] float32 of each prompt's last token, cache).
    """
    batch, padded = tokens.shape
    n_chunks = padded // chunk
    chunks = tokens.reshape(batch, n_chunks, chunk).transpose(1, 0, 2)  # [n, B, C]
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk

    def consume(carry, xs):
        cache, last_hidden = carry
        chunk_tokens, start = xs
        positions = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
        block = BlockInput(chunk_tokens, positions, positions, positions < lengths[:, None])
        hidden, cache = forward_block(params, config, cache, block)  # [B, C, E]
        is_last = positions == lengths[:, None] - 1  # [B, C]
        found = jnp.einsum("bc,bce->be", is_last.astype(hidden.dtype), hidden)
        last_hidden = jnp.where(jnp.any(is_last, axis=1)[:, None], found, last_hidden)
        return (cache, last_hidden), None

    last_hidden = jnp.zeros((batch, config.hidden_size), params["embed"].dtype)
    (cache, last_hidden), _ = jax.lax.scan(consume, (cache, last_hidden), (chunks, starts))
    return lm_logits(params, last_hidden), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The scan carry besides the cache."""
    token: jax.Array  # [B] int32 the last token, not yet in the cache
    position: jax.Array  # [B] int32 its position
    done: jax.Array  # [B] bool: the sequence has emitted an end-of-sequence token
    key: jax.Array  # PRNG key


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "greedy", "pad_id"),
                   donate_argnames=("cache",))
def decode(params, cache, state: DecodeState, temperature, top_k, top_p, *, config: ModelConfig,
           num_steps: int, greedy: bool, pad_id: int):
    """Run `num_steps` decoding steps. Returns (tokens [B, num_steps] int32, cache, state).

    A finished sequence emits `pad_id` from the step after its end-of-sequence token.
    """
    eos_ids = jnp.asarray(config.eos_token_ids or (-1,), jnp.int32)

    def step(carry, _):
        cache, state = carry
        where = state.position[:, None]  # [B, 1]
        block = BlockInput(state.token[:, None], where, where, jnp.ones_like(where, bool))
        hidden, cache = forward_block(params, config, cache, block)
        key, subkey = jax.random.split(state.key)
        token = sample(lm_logits(params, hidden[:, 0]), subkey, temperature, top_k, top_p, greedy=greedy)
        token = jnp.where(state.done, pad_id, token)
        done = state.done | jnp.isin(token, eos_ids)
        return (cache, DecodeState(token, state.position + 1, done, key)), token

    (cache, state), tokens = jax.lax.scan(step, (cache, state), None, length=num_steps)
    return tokens.T, cache, state


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def decode_step_logits(params, cache, tokens, positions, *, config: ModelConfig):
    """One teacher-forced step: tokens, positions [B] -> (logits [B, V] float32, cache)."""
    where = positions[:, None]
    block = BlockInput(tokens[:, None], where, where, jnp.ones_like(where, bool))
    hidden, cache = forward_block(params, config, cache, block)
    return lm_logits(params, hidden[:, 0]), cache


@dataclasses.dataclass
class CompileStats:
    count: int = 0  # XLA backend compilations
    seconds: float = 0.0  # tracing + lowering + compiling


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_active_trackers = []


def _on_event(name, seconds, **_):
    for stats in _active_trackers:
        if name in _COMPILE_EVENTS:
            stats.seconds += seconds
        if name == _COMPILE_EVENTS[-1]:
            stats.count += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def track_compiles():
    """Count the compilations, and the seconds spent on them, inside the block."""
    stats = CompileStats()
    _active_trackers.append(stats)
    try:
        yield stats
    finally:
        _active_trackers.remove(stats)


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CompileStats) of a call, waiting for its device work to finish."""
    with track_compiles() as stats:
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args, **kwargs))
        elapsed = time.perf_counter() - start
    return result, elapsed, stats
