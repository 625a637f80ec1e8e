"""Prefill and decoding under every cache policy: jit-compiled, fixed shapes, the cache donated.

One code path serves all policies (see policies.py):
- unbounded (`full`, `oracle_topk`): the cache has a slot per position, a token's slot is its position;
- bounded (all others): the cache has m + Q slots; a block of Q tokens is written into free slots,
  attended, then the lowest-scoring valid slots are released until m remain.

Prefill consumes right-padded prompts in chunks (one `lax.scan` over chunks). Decoding is one
`lax.scan` over steps whose carry holds the cache, the policy state (release buffer, controller
state, attention mass) and the decode state (last token, position, done flags, PRNG key).

ADORE's step (`adore` policy): advance the controller with the current token, score every token
seen, pick the R best released tokens, run them with the current token as one block at their
original positions (RoPE at absolute positions: a rebuilt token's K/V equal what it would have had
if never released, up to the context it now sees), then keep the m best of cache ∪ block — or of
cache ∪ current token with `rebuild_into_cache=False`, where the rebuilt rows serve one step only.
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
from adore_jax.policies import CacheConfig, TopKSlotAttention, evict_to_capacity, free_slots, protect, slot_scores
from adore_jax.sampling import sample
from pallas_kernels import slot_attention


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything static about a run: the compiled programs are specialised on it."""
    model: ModelConfig
    cache: CacheConfig
    controller: Optional[ctrl.ControllerConfig] = None  # required for policy "adore"
    attention_impl: str = "auto"  # slot-attention implementation (see pallas_kernels)

    @property
    def needs_mass(self) -> bool:
        return self.cache.policy in ("h2o", "tova")

    def attention(self):
        if self.cache.policy == "oracle_topk":
            return TopKSlotAttention(self.cache.attn_top_k)
        return functools.partial(slot_attention, impl=self.attention_impl)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PolicyState:
    token_ids: jax.Array  # [B, N] int32 release buffer: every token seen, at its position (adore)
    features: jax.Array  # [B, N, h] float32 controller features a_i of every token seen (adore)
    controller_state: jax.Array  # [B, c] float32 GRU state after the last token (adore)
    mass: jax.Array  # [B, S] float32 attention mass per slot (h2o: accumulated, tova: latest query)
    rebuild_steps: jax.Array  # [] int32 steps at which the rebuild block ran
    rebuilt_tokens: jax.Array  # [B] int32 tokens rebuilt so far


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    token: jax.Array  # [B] int32 the last token, not yet in the cache
    position: jax.Array  # [B] int32 its position
    done: jax.Array  # [B] bool: the sequence has emitted an end-of-sequence token
    key: jax.Array  # PRNG key


def init_policy_state(plan: DecodePlan, batch: int, num_slots: int, max_length: int) -> PolicyState:
    adore = plan.cache.policy == "adore"
    n = max_length if adore else 0
    hidden, width = (plan.controller.hidden, plan.controller.width) if adore else (0, 0)
    return PolicyState(
        token_ids=jnp.zeros((batch, n), jnp.int32), features=jnp.zeros((batch, n, hidden), jnp.float32),
        controller_state=jnp.zeros((batch, width), jnp.float32),
        mass=jnp.zeros((batch, num_slots if plan.needs_mass else 0), jnp.float32),
        rebuild_steps=jnp.zeros((), jnp.int32), rebuilt_tokens=jnp.zeros((batch,), jnp.int32))


def _rows(batch):
    return jnp.arange(batch)[:, None]


def _advance_controller(plan, params, cparams, ps: PolicyState, tokens, positions, valid):
    """Feed a block of tokens [B, T] (at positions, where valid) to the controller and the buffer."""
    embeddings = params["embed"][tokens]  # [B, T, E]
    _, features, state = ctrl.encode_sequence(plan.controller, cparams, embeddings, valid,
                                              ps.controller_state, positions)
    rows = _rows(tokens.shape[0])
    where = jnp.where(valid, positions, ps.token_ids.shape[1])  # padding goes out of range: dropped
    return dataclasses.replace(
        ps, controller_state=state,
        token_ids=ps.token_ids.at[rows, where].set(tokens, mode="drop"),
        features=ps.features.at[rows, where].set(features, mode="drop"))


def _distance_table(plan, cparams, ps: PolicyState):
    """The controller's per-distance features for every distance in the buffer (adore), else None."""
    if plan.cache.policy != "adore" or plan.controller.score_form != "query_aware":
        return None
    return ctrl.distance_table(plan.controller, cparams, ps.token_ids.shape[1])


def _controller_scores(plan, cparams, ps: PolicyState, query_position, table):
    """Score logits of every buffered token for the current query: [B, N]; unseen tokens -inf."""
    n = ps.token_ids.shape[1]
    scores = ctrl.score(plan.controller, cparams, ps.features, jnp.arange(n), ps.controller_state, query_position,
                        table)
    return jnp.where(jnp.arange(n)[None, :] <= query_position[:, None], scores, -jnp.inf)


def _update_mass(plan, ps: PolicyState, block: BlockInput, mass, last_row):
    """Fold a block's attention mass [B, Q, S] into the per-slot statistic."""
    if not plan.needs_mass:
        return ps
    mass = mass * block.valid[:, :, None]
    if plan.cache.policy == "h2o":
        written = jnp.zeros(ps.mass.shape, bool).at[_rows(mass.shape[0]), block.slots].set(True)
        new = jnp.where(written, 0.0, ps.mass) + jnp.sum(mass, axis=1)
    else:  # tova: the latest query's attention
        new = jnp.take_along_axis(mass, last_row[:, None, None], axis=1)[:, 0]
    return dataclasses.replace(ps, mass=new)


def _release(plan, cache, ps, token_scores, current_position, max_evictions):
    """Keep the m best valid slots. token_scores: [B, N] controller scores (adore) or None."""
    controller_slot_scores = None
    if token_scores is not None:
        controller_slot_scores = jnp.take_along_axis(token_scores, cache.slot_positions, axis=1)
    scores = slot_scores(plan.cache, cache.slot_positions, ps.mass, controller_slot_scores)
    scores = protect(plan.cache, scores, cache.slot_positions, current_position)
    valid = evict_to_capacity(cache.slot_valid, scores, plan.cache.cache_size, max_evictions)
    return dataclasses.replace(cache, slot_valid=valid)


def _run_block(plan, params, cache, ps, block, last_row):
    """Forward a block and fold its attention mass in. Returns (hidden [B, Q, E], cache, ps)."""
    hidden, cache, mass = forward_block(params, plan.model, cache, block, attention=plan.attention(),
                                        collect_mass=plan.needs_mass, cache_update=plan.cache.cache_update)
    return hidden, cache, _update_mass(plan, ps, block, mass, last_row)


def block_for(plan, cache, tokens, positions, valid):
    """Place a block: slots = positions (unbounded) or free slots (bounded)."""
    slots = free_slots(cache.slot_valid, tokens.shape[1]) if plan.cache.bounded else positions
    return BlockInput(tokens, positions, slots, valid)


@functools.partial(jax.jit, static_argnames=("plan", "chunk"), donate_argnames=("cache", "ps"))
def prefill(params, cparams, cache, ps, tokens, lengths, *, plan: DecodePlan, chunk: int):
    """Consume right-padded prompts chunk by chunk, releasing down to m after each chunk.

    tokens: [B, P] int32 with P % chunk == 0; lengths: [B] int32, 1 <= lengths <= P.
    Returns (logits [B, V] float32 of each prompt's last token, cache, ps).
    """
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
        token_scores = None
        if plan.cache.policy == "adore":
            ps = _advance_controller(plan, params, cparams, ps, chunk_tokens, positions, valid)
            token_scores = _controller_scores(plan, cparams, ps, current, table)
        block = block_for(plan, cache, chunk_tokens, positions, valid)
        hidden, cache, ps = _run_block(plan, params, cache, ps, block, last_row)
        if plan.cache.bounded:
            cache = _release(plan, cache, ps, token_scores, current, max_evictions=chunk)
        is_last = positions == lengths[:, None] - 1  # [B, C]
        found = jnp.einsum("bc,bce->be", is_last.astype(hidden.dtype), hidden)
        last_hidden = jnp.where(jnp.any(is_last, axis=1)[:, None], found, last_hidden)
        return (cache, ps, last_hidden), None

    table = _distance_table(plan, cparams, ps)
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


def _decode_block(plan, params, cparams, cache, ps, token, position, table):
    """One decoding step's model work. Returns (hidden of the current token [B, E], cache, ps)."""
    batch = token.shape[0]
    current = BlockInput(token[:, None], position[:, None], None, jnp.ones((batch, 1), bool))
    token_scores = None
    if plan.cache.policy == "adore":
        ps = _advance_controller(plan, params, cparams, ps, current.tokens, current.positions, current.valid)
        token_scores = _controller_scores(plan, cparams, ps, position, table)

    def current_only(cache, ps):
        block = block_for(plan, cache, current.tokens, current.positions, current.valid)
        hidden, cache, ps = _run_block(plan, params, cache, ps, block, jnp.zeros((batch,), jnp.int32))
        return hidden[:, -1], cache, ps

    rebuild = plan.cache.block_rows - 1
    if rebuild == 0:
        hidden, cache, ps = current_only(cache, ps)
    else:
        n = ps.token_ids.shape[1]
        in_cache = jnp.zeros((batch, n), bool).at[_rows(batch), cache.slot_positions].max(cache.slot_valid)
        released = (jnp.arange(n)[None, :] < position[:, None]) & ~in_cache
        picked_scores, picked = jax.lax.top_k(jnp.where(released, token_scores, -jnp.inf), rebuild)  # [B, R]
        wanted = picked_scores > -jnp.inf
        if plan.cache.adaptive_rebuild:  # only tokens that would displace the weakest cached one
            cached_scores = jnp.take_along_axis(token_scores, cache.slot_positions, axis=1)
            weakest = jnp.min(jnp.where(cache.slot_valid, cached_scores, jnp.inf), axis=1, keepdims=True)
            wanted &= picked_scores > weakest

        def with_rebuild(cache, ps):
            tokens = jnp.concatenate([jnp.take_along_axis(ps.token_ids, picked, axis=1), current.tokens], axis=1)
            positions = jnp.concatenate([picked.astype(jnp.int32), current.positions], axis=1)
            block = block_for(plan, cache, tokens, positions, jnp.concatenate([wanted, current.valid], axis=1))
            hidden, cache, ps = _run_block(plan, params, cache, ps, block, jnp.full((batch,), rebuild))
            if not plan.cache.rebuild_into_cache:  # the rebuilt rows served this step only: free their slots
                cache = dataclasses.replace(
                    cache, slot_valid=cache.slot_valid.at[_rows(batch), block.slots[:, :rebuild]].set(False))
            ps = dataclasses.replace(ps, rebuild_steps=ps.rebuild_steps + 1,
                                     rebuilt_tokens=ps.rebuilt_tokens + jnp.sum(wanted, axis=1))
            return hidden[:, -1], cache, ps

        if plan.cache.adaptive_rebuild:
            hidden, cache, ps = jax.lax.cond(jnp.any(wanted), with_rebuild, current_only, cache, ps)
        else:
            hidden, cache, ps = with_rebuild(cache, ps)
    if plan.cache.bounded:
        cache = _release(plan, cache, ps, token_scores, position, max_evictions=plan.cache.block_rows)
    return hidden, cache, ps


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutputs:
    tokens: jax.Array  # [B, T] int32 sampled tokens
    logits: Optional[jax.Array]  # [B, T, V] float32, with return_logits
    forced_logprobs: Optional[jax.Array]  # [B, T] float32 log p(forced token), with teacher forcing


@functools.partial(jax.jit, static_argnames=("plan", "num_steps", "greedy", "pad_id", "return_logits"),
                   donate_argnames=("cache", "ps"))
def decode(params, cparams, cache, ps, state: DecodeState, temperature, top_k, top_p, forced=None, *,
           plan: DecodePlan, num_steps: int, greedy: bool, pad_id: int, return_logits: bool = False):
    """Run `num_steps` decoding steps. Returns (StepOutputs, cache, ps, state).

    forced: optional [B, num_steps] int32 tokens fed after each step instead of the sampled ones
    (teacher forcing; their log-probabilities are returned, and the sampled tokens too).
    A finished sequence emits `pad_id` from the step after its end-of-sequence token.
    """
    eos_ids = jnp.asarray(plan.model.eos_token_ids or (-1,), jnp.int32)
    table = _distance_table(plan, cparams, ps)

    def step(carry, forced_next):
        cache, ps, state = carry
        hidden, cache, ps = _decode_block(plan, params, cparams, cache, ps, state.token, state.position, table)
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
        return (cache, ps, new_state), StepOutputs(token, logits if return_logits else None, forced_logprob)

    xs = None if forced is None else forced.T
    (cache, ps, state), out = jax.lax.scan(step, (cache, ps, state), xs, length=num_steps)
    swap = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # noqa: E731  [T, B, ...] -> [B, T, ...]
    return StepOutputs(swap(out.tokens), swap(out.logits), swap(out.forced_logprobs)), cache, ps, state
