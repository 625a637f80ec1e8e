"""Prefill and decoding under every cache policy: jit-compiled, fixed shapes, the cache donated.

One code path serves all policies; each policy is an object whose methods hold its rule
(the protocol: adore_jax/policies/base.py):
- unbounded (`full`, `oracle_topk`): the cache has a slot per position, a token's slot is its position;
- bounded (all others): the cache has m + Q slots; a block of Q tokens is written into free slots,
  attended, then the lowest-scoring valid slots are released until m remain.

Prefill consumes right-padded prompts in chunks (one `lax.scan` over chunks). Decoding is one
`lax.scan` over steps whose carry holds the cache, the policy state (release buffer, controller
state, attention mass) and the decode state (last token, position, done flags, PRNG key).

A decode step: the policy observes the current token (adore: advances the controller), scores the
tokens seen, picks up to R released tokens to rebuild, and the current token runs with them as one
block at their original positions (RoPE at absolute positions: a rebuilt token's K/V equal what it
would have had if never released, up to the context it now sees); then the policy sees the block's
attention, and the cache keeps its m best slots — rebuilt rows the policy does not admit
(`rebuild_into_cache=False`: none) are freed first, so they serve one step only.
With `rebuild_from="stored"` no rebuilt token runs again: the current token runs alone, and each layer from the
policy's ranking layer on attends the R released tokens its own query ranks best, with the K/V the policy kept
from their first pass (`model.Recall`), in R spare slots that stay invalid in the cache.
A block's tokens are observed after its forward pass (a controller with `input_layer` reads their hidden
states from it), except that a rebuild step's current token is observed before it when the controller
reads input embeddings, so that its rebuild choice already sees the current token.
"""
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from adore_jax import cache as kv_cache
from adore_jax import controller as ctrl
from adore_jax.config import ModelConfig
from adore_jax.model import BlockInput, forward_block, lm_logits
from adore_jax.policies import CachePolicy, PolicyState
from adore_jax.policies.base import free_slots, release, rows
from adore_jax.sampling import sample


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything static about a run: the compiled programs are specialised on it."""
    model: ModelConfig
    policy: CachePolicy  # validated (defaults filled)
    controller: Optional[ctrl.ControllerConfig] = None  # for a policy that needs_controller
    attention_impl: str = "auto"  # slot-attention implementation (see pallas_kernels)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    token: jax.Array  # [B] int32 the last token, not yet in the cache
    position: jax.Array  # [B] int32 its position
    done: jax.Array  # [B] bool: the sequence has emitted an end-of-sequence token
    key: jax.Array  # PRNG key


def init_policy_state(plan: DecodePlan, batch: int, num_slots: int, max_length: int,
                      kv_dtype=jnp.float32) -> PolicyState:
    """kv_dtype: the cache's (a policy that keeps K/V beside the cache keeps them in it)."""
    return plan.policy.init_state(batch, num_slots, max_length, plan.controller, plan.model, kv_dtype)


def position_limit(plan: DecodePlan, cache: kv_cache.KVCache, ps: PolicyState) -> Optional[int]:
    """The first position the run's fixed shapes cannot hold (None: unlimited).

    An unbounded cache puts a token at the slot of its position; a controller's release buffer holds
    every token seen at its position.
    """
    if not plan.policy.bounded:
        return cache.num_slots
    if plan.policy.needs_controller:
        return ps.token_ids.shape[1]
    return None


def controller_layer(plan) -> Optional[int]:
    """The layer count after which the controller reads each token's hidden state (None: it reads the input
    embeddings, so it can see a token before the token's forward pass; or there is no controller)."""
    return None if plan.controller is None else plan.controller.input_layer


def _run_block(plan, params, cache, ps, block, last_row, recall=None):
    """Forward a block (with `recall`: stored K/V it may attend, see model.Recall) and let the policy see its
    attention and keep its K/V.

    Returns (hidden [B, Q, E], cache, ps, the positions [B, R] recalled (-1: none) or None, the controller's
    input hidden states [B, Q, E] or None)."""
    policy = plan.policy
    hidden, cache, mass, tapped, recalled, layer_hidden = forward_block(
        params, plan.model, cache, block, attention=policy.attention(plan.attention_impl),
        mass_weights=policy.mass_weights(block, last_row) if policy.needs_mass else None,
        cache_update=policy.cache_update, tap_layer=policy.tap_layer(plan.model),
        hidden_after=controller_layer(plan), recall=recall)
    ps = policy.store_kv(policy.update_state(ps, block, mass, last_row, tapped), cache, block)
    return hidden, cache, ps, recalled, layer_hidden


def block_for(plan, cache, tokens, positions, valid):
    """Place a block: slots = positions (unbounded) or free slots (bounded)."""
    slots = free_slots(cache.slot_valid, tokens.shape[1]) if plan.policy.bounded else positions
    return BlockInput(tokens, positions, slots, valid)


def _context(plan, params, cparams, ps):
    return plan.policy.context(plan.controller, cparams, params["embed"], ps)


@functools.partial(jax.jit, static_argnames=("plan", "chunk"), donate_argnames=("cache", "ps"))
def prefill(params, cparams, cache, ps, tokens, lengths, *, plan: DecodePlan, chunk: int):
    """Consume right-padded prompts chunk by chunk, releasing down to m after each chunk.

    tokens: [B, P] int32 with P % chunk == 0; lengths: [B] int32, 1 <= lengths <= P.
    Returns (logits [B, V] float32 of each prompt's last token, cache, ps).
    """
    policy = plan.policy
    batch, padded = tokens.shape
    n_chunks = padded // chunk
    chunks = tokens.reshape(batch, n_chunks, chunk).transpose(1, 0, 2)  # [n, B, C]
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk

    def consume(carry, xs):
        cache, ps, last_hidden = carry
        chunk_tokens, start = xs
        positions = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
        valid = positions < lengths[:, None]
        last_row = jnp.clip(lengths - 1 - start, 0, chunk - 1)  # [B] last valid row in this chunk
        current = jnp.minimum(start + chunk, lengths) - 1  # [B] position of that row
        block = block_for(plan, cache, chunk_tokens, positions, valid)
        recall = None
        if policy.prefill_recall:  # each query may recall the tokens released before this chunk
            recall = policy.recall(plan.model, cache, ps, jnp.full((batch,), start))
            if policy.prefill_recall_last is not None:  # ... in the prompt's last N tokens (lengths: all but its
                # last, which a recalling policy runs as a decode step)
                querying = positions >= lengths[:, None] + 1 - policy.prefill_recall_last  # [B, C]
                recall = dataclasses.replace(recall, querying=querying)
        hidden, cache, ps, _, layer_hidden = _run_block(plan, params, cache, ps, block, last_row, recall)
        ps = policy.observe(ps, ctx, chunk_tokens, positions, valid, layer_hidden)
        # the release after the chunk ranks only the cached tokens, the chunk's among them now
        token_scores = policy.token_scores(ps, ctx, current, cache.slot_positions)
        if policy.bounded:
            cache = release(policy, cache, ps, token_scores, current, max_evictions=chunk)
        is_last = positions == lengths[:, None] - 1  # [B, C]
        found = jnp.einsum("bc,bce->be", is_last.astype(hidden.dtype), hidden)
        last_hidden = jnp.where(jnp.any(is_last, axis=1)[:, None], found, last_hidden)
        return (cache, ps, last_hidden), None

    ctx = _context(plan, params, cparams, ps)
    last_hidden = jnp.zeros((batch, plan.model.hidden_size), params["embed"].dtype)
    (cache, ps, last_hidden), _ = jax.lax.scan(consume, (cache, ps, last_hidden), (chunks, starts))
    return lm_logits(params, last_hidden), cache, ps


@functools.partial(jax.jit, static_argnames=("num_slots",))
def compact(cache, ps, *, num_slots: int):
    """Shrink a bounded cache to `num_slots` slots, valid slots first (after a wide prefill)."""
    order = jnp.argsort(~cache.slot_valid, axis=1, stable=True)[:, :num_slots]  # [B, S']

    def take(x):
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    cache = kv_cache.KVCache(k=tuple(map(take, cache.k)), v=tuple(map(take, cache.v)),
                             slot_positions=take(cache.slot_positions), slot_valid=take(cache.slot_valid))
    if ps.mass.shape[1]:
        ps = dataclasses.replace(ps, mass=take(ps.mass))
    return cache, ps


def _decode_block(plan, params, ctx, cache, ps, token, position):
    """One decoding step's model work.

    Returns (hidden of the current token [B, E], cache, ps, rebuilt [B, R] int32 positions rebuilt
    this step, -1 where none).
    """
    policy = plan.policy
    batch = token.shape[0]
    current = BlockInput(token[:, None], position[:, None], None, jnp.ones((batch, 1), bool))
    early = controller_layer(plan) is None  # the policy can see the current token before its forward pass

    def observe_current(ps, layer_hidden):
        return policy.observe(ps, ctx, current.tokens, current.positions, current.valid, layer_hidden)

    def current_only(cache, ps, recall_stored=False):
        """The current token alone; recall_stored: each layer from the policy's ranking layer on also attends
        the R released tokens its query ranks best, with their stored K/V, in R spare slots."""
        if not recall_stored:
            block, recall = block_for(plan, cache, current.tokens, current.positions, current.valid), None
        else:
            spare = free_slots(cache.slot_valid, policy.block_rows)  # [B, 1 + R]
            block = BlockInput(current.tokens, current.positions, spare[:, :1], current.valid)
            recall = policy.recall(plan.model, cache, ps, position, spare[:, 1:])
        hidden, cache, ps, recalled, layer_hidden = _run_block(plan, params, cache, ps, block,
                                                               jnp.zeros((batch,), jnp.int32), recall)
        return hidden[:, -1], cache, ps, None if layer_hidden is None else layer_hidden[:, -1:], recalled

    rebuild = policy.rebuild
    if rebuild == 0 or policy.recalls_stored:  # only the cached tokens are ranked (the current one among them),
        # after the block: nothing it recalls stays
        hidden, cache, ps, layer_hidden, recalled = current_only(cache, ps, recall_stored=rebuild > 0)
        ps = observe_current(ps, layer_hidden)
        if policy.bounded:
            cache = release(policy, cache, ps, policy.token_scores(ps, ctx, position, cache.slot_positions), position,
                            max_evictions=1)
        if not rebuild:
            return hidden, cache, ps, jnp.zeros((batch, 0), jnp.int32)
        ps = dataclasses.replace(ps, rebuild_steps=ps.rebuild_steps + 1,
                                 rebuilt_tokens=ps.rebuilt_tokens + jnp.sum(recalled >= 0, axis=1))
        return hidden, cache, ps, recalled
    # rebuild ranks every released token before the block: a controller reading hidden states has not seen the
    # current token yet, so it ranks with its state after the previous one, and ranks again for the release
    if early:
        ps = observe_current(ps, None)
    token_scores = policy.token_scores(ps, ctx, position)
    picked, wanted = policy.rebuild_choice(cache, ps, token_scores, position)  # [B, R] each
    admitted = policy.admitted(cache, token_scores, picked, wanted)  # [B, R]: may stay in the cache

    def with_rebuild(cache, ps):
        tokens = jnp.concatenate([jnp.take_along_axis(ps.token_ids, picked, axis=1), current.tokens], axis=1)
        positions = jnp.concatenate([picked, current.positions], axis=1)
        block = block_for(plan, cache, tokens, positions, jnp.concatenate([wanted, current.valid], axis=1))
        hidden, cache, ps, _, layer_hidden = _run_block(plan, params, cache, ps, block, jnp.full((batch,), rebuild))
        # rebuilt rows not admitted served this step only: free their slots
        cache = dataclasses.replace(
            cache, slot_valid=cache.slot_valid.at[rows(batch), block.slots[:, :rebuild]].min(admitted))
        ps = dataclasses.replace(ps, rebuild_steps=ps.rebuild_steps + 1,
                                 rebuilt_tokens=ps.rebuilt_tokens + jnp.sum(wanted, axis=1))
        return hidden[:, -1], cache, ps, None if layer_hidden is None else layer_hidden[:, -1:]

    if policy.adaptive_rebuild:
        ran = jnp.any(wanted)
        hidden, cache, ps, layer_hidden = jax.lax.cond(ran, with_rebuild, lambda *state: current_only(*state)[:4],
                                                       cache, ps)
        wanted &= ran
    else:
        hidden, cache, ps, layer_hidden = with_rebuild(cache, ps)
    if not early:  # the rebuilt rows keep the features of their first pass; only the current token is new,
        # and the release ranks only the cached tokens
        ps = observe_current(ps, layer_hidden)
        token_scores = policy.token_scores(ps, ctx, position, cache.slot_positions)
    cache = release(policy, cache, ps, token_scores, position, max_evictions=policy.block_rows)
    return hidden, cache, ps, jnp.where(wanted, picked, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutputs:
    tokens: jax.Array  # [B, T] int32 sampled tokens
    logits: Optional[jax.Array]  # [B, T, V] float32, with return_logits
    forced_logprobs: Optional[jax.Array]  # [B, T] float32 log p(forced token), with teacher forcing
    rebuilt: jax.Array  # [B, T, R] int32 positions rebuilt at each step (-1: none); R = 0 without rebuild


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
    ctx = _context(plan, params, cparams, ps)

    def step(carry, forced_next):
        cache, ps, state = carry
        hidden, cache, ps, rebuilt = _decode_block(plan, params, ctx, cache, ps, state.token, state.position)
        logits = lm_logits(params, hidden)
        key, subkey = jax.random.split(state.key)
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
        return (cache, ps, new_state), StepOutputs(token, logits if return_logits else None, forced_logprob, rebuilt)

    xs = None if forced is None else forced.T
    (cache, ps, state), out = jax.lax.scan(step, (cache, ps, state), xs, length=num_steps)
    swap = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # noqa: E731  [T, B, ...] -> [B, T, ...]
    return StepOutputs(swap(out.tokens), swap(out.logits), swap(out.forced_logprobs), swap(out.rebuilt)), \
        cache, ps, state
