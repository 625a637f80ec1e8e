"""A decode session: one batch of prompts under one cache policy, prefilled once, then decoded in chunks.

    session = DecodeSession(model, prompt_ids, max_new_tokens=64, cache=Adore(cache_size=256, returns=Rebuild(r=8)))
    logits = session.prefill()                          # [B, V] after each prompt; the cache holds <= m tokens
    session.start(first_tokens)                         # [B] the tokens the first decode step feeds
    out = session.decode(16, SamplingParams())          # decode.StepOutputs of 16 steps
    out = session.decode(8, forced=next_tokens)         # teacher forcing: [B, 8] tokens fed instead

With `compress_after` (kvpress's protocol, query-agnostic): each prompt's first compress_after tokens (the context)
are prefilled with full attention, the policy releases down to m once, and the rest of the prompt (the question)
and the answer are appended without release.

`generate` and `teacher_force` are built on it, and so are the evaluation's step-by-step diagnostics.
The static sizes are fixed when the session is made (`plan_generation`), so every chunk of the same
length reuses one compiled program.
"""
import copy
import dataclasses
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax import cache as kv_cache
from adore_jax import decode
from adore_jax.policies import CachePolicy, make_policy
from adore_jax.sampling import SamplingParams

MIN_PROMPT_BUCKET = 16
SLOT_ROUNDING = 128  # release buffers and full caches are rounded up to this, so nearby lengths share a compile
DECODE_CHUNK = 8  # decode steps per compiled chunk in `generate`: fixed, so max_new_tokens never recompiles


class CacheSizeWarning(UserWarning):
    """A cache_size larger than the run can use was lowered to what it can use (the output is the same)."""


def decode_schedule(max_new_tokens: int, chunk: Optional[int] = None) -> tuple:
    """(chunk, steps): `generate` runs the max_new_tokens - 1 decode steps after the first token as chunks of
    `chunk` steps, `steps` in all (a multiple of chunk, the tokens past max_new_tokens dropped).

    The chunk is DECODE_CHUNK, or the next power of two of the steps when fewer, so every max_new_tokens
    above DECODE_CHUNK runs one compiled program, and smaller ones one of log2(DECODE_CHUNK) + 1 programs.
    """
    needed = max_new_tokens - 1
    if needed <= 0:
        return 1, 0
    if chunk is None:
        chunk = min(DECODE_CHUNK, 1 << (needed - 1).bit_length())
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"decode_chunk must be an integer >= 1; got {chunk!r}")
    return chunk, -(-needed // chunk) * chunk


def prompt_bucket(length: int, chunk: int) -> int:
    """Padded prompt length: a power of two (at least 16), a multiple of `chunk` above it."""
    bucket = max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())
    return bucket if bucket <= chunk else -(-length // chunk) * chunk


@dataclasses.dataclass(frozen=True)
class RunShape:
    """The static sizes of a run."""
    policy: CachePolicy  # validated, defaults filled
    padded_prompt: int  # P, prompts right-padded to this
    chunk: int  # prefill block length (divides P)
    prefill_slots: int  # cache slots during prefill
    decode_slots: int  # cache slots while decoding (a bounded cache is compacted after prefill)
    max_length: int  # positions the run can hold: prompt + new tokens (the release buffer's length)


def plan_generation(model_config, lengths, max_new_tokens: int, policy: CachePolicy,
                    max_length: Optional[int] = None, clamp_cache_size: bool = False) -> RunShape:
    """The static sizes of a run of prompts of `lengths` under `policy`.

    clamp_cache_size: a cache_size larger than the run can ever fill (the padded prompt + max_new_tokens,
    rounded up to SLOT_ROUNDING) is lowered to that, with a CacheSizeWarning: such a cache never releases
    a token, so the output is the same, without allocating (and attending over) slots that stay empty.
    Only for a run that decodes at most max_new_tokens (generate); a session decoding further keeps it.
    """
    longest = int(max(lengths))
    if longest + max_new_tokens > model_config.max_position_embeddings:
        raise ValueError(f"prompt length ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {model_config.max_position_embeddings} tokens")
    padded = prompt_bucket(longest, policy.chunk)
    chunk = min(policy.chunk, padded)
    needed = max(padded, longest + max_new_tokens)
    if max_length is None:
        max_length = -(-(padded + max_new_tokens) // SLOT_ROUNDING) * SLOT_ROUNDING
        useful = max(max_length, getattr(policy, "sinks", 0) + getattr(policy, "recent", 0))
        if clamp_cache_size and policy.cache_size and policy.cache_size > useful:
            warnings.warn(CacheSizeWarning(
                f"cache_size {policy.cache_size} is more than this run can fill: it holds at most {useful} tokens "
                f"(the longest prompt padded to {padded}, + {max_new_tokens} new, rounded up to {SLOT_ROUNDING}); "
                f"using cache_size {useful}, which keeps every token just the same"), stacklevel=4)
            policy = dataclasses.replace(policy, cache_size=useful)
        if policy.cache_size:
            max_length = policy.cache_size if not policy.bounded else max(max_length, policy.cache_size)
    if max_length < needed:
        what = "cache_size" if not policy.bounded and policy.cache_size else "max_length"
        raise ValueError(f"{what} must be >= {needed} for these prompts (longest prompt padded to {padded}, "
                         f"+ max_new_tokens); got {max_length}")
    policy = policy.validate(max_length)
    if policy.bounded:
        prefill_slots = policy.cache_size + max(chunk, policy.block_rows)
        decode_slots = min(policy.cache_size + policy.block_rows, prefill_slots)
    else:
        prefill_slots = decode_slots = max_length
    return RunShape(policy, padded, chunk, prefill_slots, decode_slots, max_length)


def check_compress_after(compress_after, lengths, question_tokens: int = 1):
    """compress_after as [B] int32: an int for every prompt, or one per prompt, each in [1, its length -
    question_tokens] (a policy that rebuilds runs the last prompt token apart: its question needs 2 tokens)."""
    values = np.broadcast_to(np.asarray(compress_after), lengths.shape) if np.ndim(compress_after) == 0 else \
        np.asarray(compress_after)
    if values.shape != lengths.shape or values.dtype.kind not in "iu":
        raise ValueError(f"compress_after must be an integer or one integer per prompt ({len(lengths)}); got "
                         f"{compress_after!r}")
    bad = np.flatnonzero((values < 1) | (values > lengths - question_tokens))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"compress_after for prompts[{i}] must be in [1, {lengths[i] - question_tokens}] (a context "
                         f"and a question of >= {question_tokens} tokens after it); got {int(values[i])}")
    return values.astype(np.int32)


def plan_compression(model_config, lengths, context_lengths, max_new_tokens: int, policy: CachePolicy) -> tuple:
    """(RunShape of the questions and answers, RunShape of the contexts, the policy at m) of a compress_after run.

    The contexts are right-aligned in Pc tokens (a multiple of the chunk) and prefilled chunk by chunk with every
    token kept (the policy at cache_size Pc), so each row's last chunk ends on its last context token. After the
    release down to m the cache is cut to m + Pq + max_new_tokens + a decode block's rows (Pq: the questions'
    padded length), which the questions and answers fill without any release."""
    longest = int(max(lengths))
    if longest + max_new_tokens > model_config.max_position_embeddings:
        raise ValueError(f"prompt length ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {model_config.max_position_embeddings} tokens")
    m = policy.cache_size
    if m is None:
        policy.validate(0)  # raises: m must be set
    context_padded = prompt_bucket(int(max(context_lengths)), policy.chunk)
    question_padded = prompt_bucket(int(max(lengths - context_lengths)), policy.chunk)
    grown = m + question_padded + max_new_tokens
    max_length = -(-(max(context_padded, m) + question_padded + max_new_tokens) // SLOT_ROUNDING) * SLOT_ROUNDING
    at_m = policy.validate(max_length)
    answers = dataclasses.replace(policy, cache_size=grown).validate(max_length)
    decode_slots = grown + answers.block_rows
    slots = max(context_padded, decode_slots)
    contexts = dataclasses.replace(policy, cache_size=context_padded).validate(max_length)
    return (RunShape(answers, question_padded, min(policy.chunk, question_padded), slots, decode_slots, max_length),
            RunShape(contexts, context_padded, min(policy.chunk, context_padded), slots, slots, max_length), at_m)


def check_prompt_ids(prompt_ids, vocab_size: int) -> None:
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompts[{i}] is empty")
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"prompts[{i}] must hold integer token ids; got dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(f"prompts[{i}] holds token id {int(bad[0])}, outside the vocabulary [0, {vocab_size})")


class DecodeSession:
    """See the module doc. Holds the cache, the policy state and the decode state between calls."""

    def __init__(self, model, prompt_ids, max_new_tokens: int, cache=None, *, controller=None,
                 max_length: Optional[int] = None, attention_impl: str = "auto", clamp_cache_size: bool = False,
                 compress_after=None):
        check_prompt_ids(prompt_ids, model.config.vocab_size)
        self.model = model
        self.lengths = np.array([len(ids) for ids in prompt_ids], np.int32)  # [B]
        self.last_tokens = np.array([ids[-1] for ids in prompt_ids], np.int32)  # [B]
        policy = self.requested_policy = make_policy(cache)
        self.compressed = compress_after is not None and policy.bounded
        if self.compressed:
            self.context_lengths = check_compress_after(compress_after, self.lengths,
                                                        1 + (policy.returns.r > 0))  # [B]
            self.shape, self.context_shape, self.budget_policy = plan_compression(
                model.config, self.lengths, self.context_lengths, max_new_tokens, policy)
        else:
            self.shape = plan_generation(model.config, self.lengths, max_new_tokens, policy, max_length,
                                         clamp_cache_size)
        self.max_new_tokens = max_new_tokens
        self.contexts_prefilled = False
        policy = self.shape.policy
        if policy.needs_controller:
            controller_config, self.controller_params = policy.resolve_controller(model, controller)
        elif controller is not None:
            raise ValueError(f"controller= applies only to a policy that reads one (adore); got policy {policy.name!r}")
        else:
            controller_config, self.controller_params = None, {}
        self.plan = decode.DecodePlan(model.config, policy, controller_config, attention_impl)
        batch = len(prompt_ids)
        self.tokens = np.full((batch, self.shape.padded_prompt), model.pad_id, np.int32)  # [B, P]
        if self.compressed:  # [B, P] the questions left-aligned, [B, Pc] the contexts right-aligned
            self.context_tokens = np.full((batch, self.context_shape.padded_prompt), model.pad_id, np.int32)
            for i, (ids, n) in enumerate(zip(prompt_ids, self.context_lengths)):
                self.tokens[i, :len(ids) - n] = ids[n:]
                self.context_tokens[i, self.context_tokens.shape[1] - n:] = ids[:n]
        else:
            for i, ids in enumerate(prompt_ids):
                self.tokens[i, :len(ids)] = ids
        self.cache = kv_cache.init_cache(model.config, batch, self.shape.prefill_slots, model.dtype)
        self.ps = decode.init_policy_state(self.plan, batch, self.shape.prefill_slots, self.shape.max_length,
                                           model.dtype)
        self.state: Optional[decode.DecodeState] = None

    @property
    def policy(self) -> CachePolicy:
        return self.plan.policy

    def prefill(self):
        """Run the prompts through the cache; returns the logits after each prompt, [B, V] float32.

        A policy that rebuilds (R > 0) runs each prompt's last token as a decode step, so the first new token,
        like every later one, is predicted with the released tokens it needs rebuilt (a question at the end of
        a long prompt can bring back the passage it asks about)."""
        if self.compressed:
            if not self.contexts_prefilled:
                self.prefill_contexts()
            self.compress_contexts()
        logits = self.consume_prompts()
        return logits if self.policy.returns.r == 0 else self.run_last_prompt_token()

    def prefill_contexts(self) -> None:
        """compress_after: prefill the contexts with every token kept (the policy's statistics seeing all of them)."""
        plan = dataclasses.replace(self.plan, policy=self.context_shape.policy)
        padded = self.context_tokens.shape[1]
        _, self.cache, self.ps = decode.prefill(
            self.model.params, self.controller_params, self.cache, self.ps, jnp.asarray(self.context_tokens),
            jnp.full(len(self.lengths), padded, jnp.int32), jnp.asarray(self.context_lengths - padded), plan=plan,
            chunk=self.context_shape.chunk)
        self.contexts_prefilled = True

    def at_cache_size(self, cache_size: int) -> "DecodeSession":
        """A compress_after session with its contexts prefilled, at another budget m: one prefill serves every m
        whose run has the same cache slots (the copy has its own cache and state)."""
        if not (self.compressed and self.contexts_prefilled and self.state is None):
            raise ValueError("at_cache_size needs a compress_after session after prefill_contexts() and before "
                             "prefill()")
        other = copy.copy(self)
        other.shape, other.context_shape, other.budget_policy = plan_compression(
            self.model.config, self.lengths, self.context_lengths, self.max_new_tokens,
            dataclasses.replace(self.requested_policy, cache_size=cache_size))
        if other.shape.prefill_slots != self.shape.prefill_slots:
            raise ValueError(f"cache_size {cache_size} needs {other.shape.prefill_slots} cache slots, this session "
                             f"has {self.shape.prefill_slots}")
        other.plan = dataclasses.replace(self.plan, policy=other.shape.policy)
        other.cache, other.ps = jax.tree_util.tree_map(jnp.copy, (self.cache, self.ps))
        return other

    def compress_contexts(self) -> None:
        """compress_after: release down to m once, and shrink the cache to what the questions and answers need."""
        budget = dataclasses.replace(self.plan, policy=self.budget_policy)
        self.cache = decode.compress(self.model.params, self.controller_params, self.cache, self.ps,
                                     jnp.asarray(self.context_lengths - 1), plan=budget)
        self.cache, self.ps = decode.compact(self.cache, self.ps, plan=self.plan, num_slots=self.shape.decode_slots)

    def consume_prompts(self):
        """The chunked prefill alone: every prompt token (every question token after compress_after) but the last
        of a policy that rebuilds. Returns the logits after the last token consumed, [B, V] float32."""
        offsets = self.context_lengths if self.compressed else np.zeros_like(self.lengths)
        lengths = self.lengths - offsets - (self.policy.returns.r > 0)
        logits, self.cache, self.ps = decode.prefill(
            self.model.params, self.controller_params, self.cache, self.ps, jnp.asarray(self.tokens),
            jnp.asarray(lengths), jnp.asarray(offsets), plan=self.plan, chunk=self.shape.chunk)
        if self.shape.decode_slots < self.cache.num_slots:
            self.cache, self.ps = decode.compact(self.cache, self.ps, plan=self.plan, num_slots=self.shape.decode_slots)
        return logits

    def run_last_prompt_token(self):
        """A rebuilding policy's last prompt token as a decode step; returns the logits after it, [B, V] float32."""
        batch = len(self.lengths)
        state = decode.DecodeState(token=jnp.asarray(self.last_tokens), position=jnp.asarray(self.lengths - 1),
                                   done=jnp.zeros((batch,), bool), key=jax.random.split(jax.random.key(0), batch))
        out, self.cache, self.ps, _ = decode.decode(
            self.model.params, self.controller_params, self.cache, self.ps, state, *SamplingParams().as_arrays(),
            plan=self.plan, num_steps=1, greedy=True, pad_id=self.model.pad_id, return_logits=True)
        return out.logits[:, 0]

    def start(self, tokens, key=None, done=None) -> None:
        """The tokens [B] the first decode step feeds (at each prompt's end), the PRNG keys [B] and done flags."""
        batch = len(self.lengths)
        self.state = decode.DecodeState(
            token=jnp.asarray(tokens, jnp.int32), position=jnp.asarray(self.lengths),
            done=jnp.zeros((batch,), bool) if done is None else jnp.asarray(done),
            key=jax.random.split(jax.random.key(0), batch) if key is None else key)

    def mark_done(self, done) -> None:
        """End sequences from the host between chunks (a stop string): done [B] bool, or-ed into the flags.
        A done sequence emits the pad token from the next step on; the shapes, and the program, stay the same."""
        self.state = dataclasses.replace(self.state, done=self.state.done | jnp.asarray(done, bool))

    def decode(self, num_steps: int, sampling: SamplingParams = SamplingParams(), forced=None,
               return_logits: bool = False) -> decode.StepOutputs:
        """Run `num_steps` steps as one compiled scan; forced: [B, num_steps] tokens to feed (teacher forcing)."""
        if self.state is None:
            raise ValueError("call start(first_tokens) before decode()")
        out, self.cache, self.ps, self.state = decode.decode(
            self.model.params, self.controller_params, self.cache, self.ps, self.state, *sampling.as_arrays(),
            None if forced is None else jnp.asarray(forced, jnp.int32), plan=self.plan, num_steps=num_steps,
            greedy=sampling.greedy, pad_id=self.model.pad_id, return_logits=return_logits)
        return out
