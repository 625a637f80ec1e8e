"""A decode session: one batch of prompts under one cache policy, prefilled once, then decoded in chunks.

    session = DecodeSession(model, prompt_ids, max_new_tokens=64, cache=Adore(cache_size=256, returns=Rebuild(r=8)))
    logits = session.prefill()                          # [B, V] after each prompt; the cache holds <= m tokens
    session.start(first_tokens)                         # [B] the tokens the first decode step feeds
    out = session.decode(16, SamplingParams())          # decode.StepOutputs of 16 steps
    out = session.decode(8, forced=next_tokens)         # teacher forcing: [B, 8] tokens fed instead

`generate` and `teacher_force` are built on it, and so are the evaluation's step-by-step diagnostics.
The static sizes are fixed when the session is made (`plan_generation`), so every chunk of the same
length reuses one compiled program.
"""
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
                 max_length: Optional[int] = None, attention_impl: str = "auto", clamp_cache_size: bool = False):
        check_prompt_ids(prompt_ids, model.config.vocab_size)
        self.model = model
        self.lengths = np.array([len(ids) for ids in prompt_ids], np.int32)  # [B]
        self.shape = plan_generation(model.config, self.lengths, max_new_tokens, make_policy(cache), max_length,
                                     clamp_cache_size)
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
        logits = self.consume_prompts()
        return logits if self.policy.returns.r == 0 else self.run_last_prompt_token()

    def consume_prompts(self):
        """The chunked prefill alone: every prompt token but the last of a policy that rebuilds. Returns the logits
        after the last token consumed, [B, V] float32."""
        lengths = self.lengths - 1 if self.policy.returns.r > 0 else self.lengths
        logits, self.cache, self.ps = decode.prefill(
            self.model.params, self.controller_params, self.cache, self.ps, jnp.asarray(self.tokens),
            jnp.asarray(lengths), plan=self.plan, chunk=self.shape.chunk)
        if self.shape.decode_slots < self.cache.num_slots:
            self.cache, self.ps = decode.compact(self.cache, self.ps, plan=self.plan, num_slots=self.shape.decode_slots)
        return logits

    def run_last_prompt_token(self):
        """A rebuilding policy's last prompt token as a decode step; returns the logits after it, [B, V] float32."""
        lengths = self.lengths - 1
        batch = len(lengths)
        state = decode.DecodeState(token=jnp.asarray(self.tokens[np.arange(batch), lengths]),
                                   position=jnp.asarray(lengths), done=jnp.zeros((batch,), bool),
                                   key=jax.random.split(jax.random.key(0), batch))
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
