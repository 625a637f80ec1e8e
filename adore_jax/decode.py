"""Prefill and decoding under every cache policy: jit-compiled, fixed shapes, the cache donated.

One code path serves all policies; each policy is an object whose methods hold its rule (the scorer protocol:
adore_jax/policies/base.py; the return paths: adore_jax/policies/returns.py):
- unbounded (`full`, `oracle_topk`): the cache has a slot per position, a token's slot is its position;
- bounded (all others): the cache has m + Q slots; a block of Q tokens is written into free slots,
  attended, then the lowest-scoring valid slots are released until m remain.

Prefill consumes right-padded prompts in chunks (one `lax.scan` over chunks). Decoding is one
`lax.scan` over steps whose carry holds the cache, the policy state (the scorer's and the return path's)
and the decode state (last token, position, done flags, PRNG key). The return path runs each decode step
(`ReturnPath.decode_step`) with the tools of `StepTools`.
"""
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from adore_jax import cache as kv_cache
from adore_jax.config import ModelConfig
from adore_jax.model import BlockInput, forward_block, lm_logits
from adore_jax.policies.base import CachePolicy, PolicyState, StateShape, free_slots, release
from adore_jax.sampling import sample


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything static about a run: the compiled programs are specialised on it."""
    model: ModelConfig
    policy: CachePolicy  # validated (defaults filled)
    scorer_config: Optional[object] = None  # what a scorer that needs_controller reads (a ControllerConfig)
    attention_impl: str = "auto"  # slot-attention implementation (see pallas_kernels)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    token: jax.Array  # [B] int32 the last token, not yet in the cache
    position: jax.Array  # [B] int32 its position
    done: jax.Array  # [B] bool: the sequence has emitted an end-of-sequence token
    key: jax.Array  # [B] PRNG keys, one per row


def init_policy_state(plan: DecodePlan, batch: int, num_slots: int, max_length: int,
                      kv_dtype=jnp.float32) -> PolicyState:
    """kv_dtype: the cache's (a return path that keeps K/V keeps them in it)."""
    shape = StateShape(batch, num_slots, max_length, plan.model, plan.scorer_config, kv_dtype)
    return PolicyState(plan.policy.init_state(shape), plan.policy.returns.init_state(shape),
                       jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


def state_bytes(plan: DecodePlan, batch: int, num_slots: int, max_length: int, kv_dtype=jnp.float32) -> int:
    """Bytes of the cache and the policy state of `batch` sequences (what each part allocates; no weights)."""
    shapes = jax.eval_shape(lambda: (kv_cache.init_cache(plan.model, batch, num_slots, kv_dtype),
                                     init_policy_state(plan, batch, num_slots, max_length, kv_dtype)))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)))


def position_limit(plan: DecodePlan, cache: kv_cache.KVCache, ps: PolicyState) -> Optional[int]:
    """The first position the run's fixed shapes cannot hold (None: unlimited): an unbounded cache puts a token at
    the slot of its position; a part that keeps something per position holds max_length of them."""
    if not plan.policy.bounded:
        return cache.num_slots
    limits = [limit for limit in (plan.policy.position_limit(ps.scorer), plan.policy.returns.position_limit(ps.returns))
              if limit is not None]
    return min(limits) if limits else None


@dataclasses.dataclass(frozen=True)
class StepTools:
    """What a return path's decode step (and the prefill) may do with the loop (adore_jax/policies/returns.py)."""
    plan: DecodePlan
    params: dict
    ctx: object  # the scorer's context (policy.context)

    @property
    def model(self) -> ModelConfig:
        return self.plan.model

    @property
    def early(self) -> bool:
        """The scorer can see a token before the token's forward pass."""
        return self.plan.policy.observes_before_forward(self.plan.scorer_config)

    def place(self, cache, tokens, positions, valid) -> BlockInput:
        """A block in free slots (bounded) or at its positions (unbounded)."""
        slots = free_slots(cache.slot_valid, tokens.shape[1]) if self.plan.policy.bounded else positions
        return BlockInput(tokens, positions, slots, valid)

    def run(self, cache, ps: PolicyState, block, last_row, hook=None):
        """Forward a block (hook: see model.forward_block) and let both parts see it; last_row [B] is its last
        valid row. Returns (hidden [B, Q, E], cache, ps, the hidden states the scorer reads [B, Q, E] or None,
        each layer's hook output)."""
        policy = self.plan.policy
        hidden, cache, mass, hook_out, layer_hidden = forward_block(
            self.params, self.model, cache, block, attention=policy.attention(self.plan.attention_impl),
            mass_weights=policy.mass_weights(block, last_row) if policy.needs_mass else None, layer_hook=hook,
            hidden_after=policy.reads_hidden_after(self.plan.scorer_config))
        ps = dataclasses.replace(ps, scorer=policy.update(ps.scorer, block, mass, last_row),
                                 returns=policy.returns.after_block(ps.returns, cache, block, last_row, hook_out))
        return hidden, cache, ps, layer_hidden, hook_out

    def observe(self, ps: PolicyState, block, layer_hidden) -> PolicyState:
        return dataclasses.replace(ps, scorer=self.plan.policy.observe(ps.scorer, self.ctx, block, layer_hidden))

    def scores(self, ps: PolicyState, position, positions=None):
        return self.plan.policy.token_scores(ps.scorer, self.ctx, position, positions)

    def release(self, cache, ps: PolicyState, token_scores, position, max_evictions: int):
        if not self.plan.policy.bounded:
            return cache
        return release(self.plan.policy, cache, ps.scorer, token_scores, position, max_evictions)

    @staticmethod
    def counted(ps: PolicyState, returned) -> PolicyState:
        """Count a step at which tokens came back, returned [B, R] bool."""
        return dataclasses.replace(ps, return_steps=ps.return_steps + 1,
                                   returned_tokens=ps.returned_tokens + jnp.sum(returned, axis=1))


def _tools(plan, params, cparams, ps) -> StepTools:
    return StepTools(plan, params, plan.policy.context(plan.scorer_config, cparams, params["embed"], ps.scorer))


@functools.partial(jax.jit, static_argnames=("plan", "chunk"), donate_argnames=("cache", "ps"))
def prefill(params, cparams, cache, ps, tokens, lengths, offsets=None, *, plan: DecodePlan, chunk: int):
    """Consume token blocks chunk by chunk, releasing down to m after each chunk.

    tokens: [B, P] int32 with P % chunk == 0; lengths: [B] int32, 1 <= lengths <= P; offsets: [B] int32 or None
    (zeros). Token j of row b is at position offsets[b] + j and is fed when j < lengths[b] and that position is
    >= 0: a prompt is right-padded from offset 0, a continuation starts at the offset of its first token, and a
    block right-aligned at a negative offset ends every row's last chunk on its last token.
    Returns (logits [B, V] float32 of each row's last token, cache, ps).
    """
    batch, padded = tokens.shape
    offsets = jnp.zeros((batch,), jnp.int32) if offsets is None else offsets
    n_chunks = padded // chunk
    chunks = tokens.reshape(batch, n_chunks, chunk).transpose(1, 0, 2)  # [n, B, C]
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    steps = _tools(plan, params, cparams, ps)

    def consume(carry, xs):
        cache, ps, last_hidden = carry
        chunk_tokens, start = xs
        rows = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))  # [B, C] index in tokens
        positions = offsets[:, None] + rows
        valid = (rows < lengths[:, None]) & (positions >= 0)
        positions = jnp.maximum(positions, 0)  # rows before position 0 are not fed
        last_row = jnp.clip(lengths - 1 - start, 0, chunk - 1)  # [B] last valid row in this chunk
        current = offsets + jnp.minimum(start + chunk, lengths) - 1  # [B] position of that row
        block = steps.place(cache, chunk_tokens, positions, valid)
        hook = plan.policy.returns.prefill_hook(plan.model, cache, ps.returns, offsets + start)
        hidden, cache, ps, layer_hidden, _ = steps.run(cache, ps, block, last_row, hook)
        ps = steps.observe(ps, block, layer_hidden)
        # the release after the chunk ranks only the cached tokens, the chunk's among them now
        cache = steps.release(cache, ps, steps.scores(ps, current, cache.slot_positions), current, chunk)
        is_last = rows == lengths[:, None] - 1  # [B, C]
        found = jnp.einsum("bc,bce->be", is_last.astype(hidden.dtype), hidden)
        last_hidden = jnp.where(jnp.any(is_last, axis=1)[:, None], found, last_hidden)
        return (cache, ps, last_hidden), None

    last_hidden = jnp.zeros((batch, plan.model.hidden_size), params["embed"].dtype)
    (cache, ps, last_hidden), _ = jax.lax.scan(consume, (cache, ps, last_hidden), (chunks, starts))
    return lm_logits(params, last_hidden), cache, ps


@functools.partial(jax.jit, static_argnames=("plan",), donate_argnames=("cache",))
def compress(params, cparams, cache, ps, position, *, plan: DecodePlan):
    """Release a bounded cache down to m at once (compress after prefill); position [B]: the last token seen."""
    steps = _tools(plan, params, cparams, ps)
    return steps.release(cache, ps, steps.scores(ps, position, cache.slot_positions), position, cache.num_slots)


@functools.partial(jax.jit, static_argnames=("plan", "num_slots"))
def compact(cache, ps, *, plan: DecodePlan, num_slots: int):
    """Shrink a bounded cache to `num_slots` slots, valid slots first (after a wide prefill)."""
    order = jnp.argsort(~cache.slot_valid, axis=1, stable=True)[:, :num_slots]  # [B, S']

    def take(x):
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    cache = kv_cache.KVCache(k=tuple(map(take, cache.k)), v=tuple(map(take, cache.v)),
                             slot_positions=take(cache.slot_positions), slot_valid=take(cache.slot_valid))
    return cache, dataclasses.replace(ps, scorer=plan.policy.compact(ps.scorer, take))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutputs:
    tokens: jax.Array  # [B, T] int32 sampled tokens
    logits: Optional[jax.Array]  # [B, T, V] float32, with return_logits
    forced_logprobs: Optional[jax.Array]  # [B, T] float32 log p(forced token), with teacher forcing
    returned: jax.Array  # [B, T, R] int32 positions brought back at each step (-1: none); R = 0 without a return path


def decode(params, cparams, cache, ps, state: DecodeState, temperature, top_k, top_p, forced=None, *,
           plan: DecodePlan, num_steps: int, greedy: bool, pad_id: int, return_logits: bool = False):
    """Run `num_steps` decoding steps (one compiled scan). Returns (StepOutputs, cache, ps, state).

    forced: optional [B, num_steps] int32 tokens fed after each step instead of the sampled ones
    (teacher forcing; their log-probabilities are returned, and the sampled tokens too).
    A finished sequence emits `pad_id` from the step after its end-of-sequence token.
    Raises ValueError when the steps would run past the positions the run's shapes hold
    (`position_limit`), instead of silently dropping tokens.
    """
    limit = position_limit(plan, cache, ps)
    if limit is not None:
        last = int(jax.device_get(jnp.max(state.position))) + num_steps - 1  # the last position fed
        if last >= limit:
            raise ValueError(f"decoding {num_steps} steps would reach position {last}, past this run's "
                             f"max_length ({limit} positions: prompt + new tokens); start the run with a larger "
                             f"max_length")
    return _decode(params, cparams, cache, ps, state, temperature, top_k, top_p, forced, plan=plan,
                   num_steps=num_steps, greedy=greedy, pad_id=pad_id, return_logits=return_logits)


@functools.partial(jax.jit, static_argnames=("plan", "num_steps", "greedy", "pad_id", "return_logits"),
                   donate_argnames=("cache", "ps"))
def _decode(params, cparams, cache, ps, state: DecodeState, temperature, top_k, top_p, forced, *,
            plan: DecodePlan, num_steps: int, greedy: bool, pad_id: int, return_logits: bool):
    eos_ids = jnp.asarray(plan.model.eos_token_ids or (-1,), jnp.int32)
    steps = _tools(plan, params, cparams, ps)
    batch = state.token.shape[0]

    def step(carry, forced_next):
        cache, ps, state = carry
        current = BlockInput(state.token[:, None], state.position[:, None], None, jnp.ones((batch, 1), bool))
        hidden, cache, ps, returned = plan.policy.returns.decode_step(steps, cache, ps, current, state.position)
        logits = lm_logits(params, hidden)
        pairs = jax.vmap(jax.random.split)(state.key)  # [B, 2]
        key, subkey = pairs[:, 0], pairs[:, 1]
        token = sample(logits, subkey, temperature, top_k, top_p, greedy=greedy)
        token = jnp.where(state.done, pad_id, token)
        done = state.done | jnp.isin(token, eos_ids)
        forced_logprob = None
        if forced_next is not None:
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            forced_logprob = jnp.take_along_axis(log_probs, forced_next[:, None], axis=1)[:, 0]
            token_fed = forced_next
        else:
            token_fed = token
        new_state = DecodeState(token_fed, state.position + 1, done, key)
        return (cache, ps, new_state), StepOutputs(token, logits if return_logits else None, forced_logprob, returned)

    xs = None if forced is None else forced.T
    (cache, ps, state), out = jax.lax.scan(step, (cache, ps, state), xs, length=num_steps)
    swap = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # noqa: E731  [T, B, ...] -> [B, T, ...]
    return StepOutputs(swap(out.tokens), swap(out.logits), swap(out.forced_logprobs), swap(out.returned)), \
        cache, ps, state
