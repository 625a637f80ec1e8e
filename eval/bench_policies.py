"""Decode speed of every cache policy at long contexts, and where the time of an ADORE step goes.

Each configuration decodes from a cache already holding a context of n tokens (random K/V at the
real shapes; a step's cost does not depend on the values), so an 8k context costs no 8k prefill.
All rows come from one run: compare them as ratios (full attention = 1).

    python eval/bench_policies.py --out runs/bench_policies.json
"""
import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import adore_jax
from adore_jax import cache as kv_cache
from adore_jax import decode
from adore_jax.eval import machine
from adore_jax.eval.suite import resolve_controller
from adore_jax.policies import make_policy

POLICY_ROWS = {  # row name -> cache policy spec (at --cache-size unless it sets its own)
    "full": "full",
    "window": "window",
    "streaming_llm": "streaming_llm",
    "h2o": "h2o",
    "tova": "tova",
    "key_norm": "key_norm",
    "adore R=0": "adore_fixed_memory",
    "adore paper R=8": "adore_paper",
    "adore R=8 adaptive": dict(policy="adore", returns=dict(type="rebuild", r=8, adaptive=True)),
    "adore R=8 attention": "adore_attention_rebuild",
    "adore recall R=8": dict(preset="adore_recall", returns=dict(r=8)),
    "adore recall R=32": "adore_recall",
    "adore recall R=8 from 10": dict(preset="adore_recall", returns=dict(r=8, from_layer=10)),
    "adore recall R=8 in prefill": dict(preset="adore_recall", returns=dict(r=8, in_prefill=True)),
    "quest R=32": "quest",
    "tova recall R=32": dict(policy="tova", returns=dict(type="recall", r=32)),
    "h2o recall R=32": dict(policy="h2o", returns=dict(type="recall", r=32)),
}
# Extra rows that split an ADORE step into its parts (differences of these, same batch and context).
BREAKDOWN_ROWS = {
    "window m=16": dict(policy="window", cache_size=16),  # ~ the weights alone
    "adore R=0 beta=0": dict(policy="adore", attention_weight=0.0),  # without the attention term (its cost)
}


def synthetic_state(model, plan, batch, context, max_length, rng):
    """Cache, policy state and decode state of sequences that have seen `context` tokens: random K/V at the real
    shapes, and every float array of the policy state random too (a step's cost does not depend on the values)."""
    policy = plan.policy
    slots = policy.cache_size + policy.block_rows if policy.bounded else max_length
    kept = min(context, policy.cache_size) if policy.bounded else context
    # the shapes only: a zero cache held while the random one is built would double the peak memory (the
    # window row at 363 sequences, 8 GiB of cache, ran out of 23 GB that way)
    shape = jax.eval_shape(lambda: kv_cache.init_cache(model.config, batch, slots, model.dtype)).k[0].shape
    k = tuple(jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.5) for _ in range(model.config.num_layers))
    v = tuple(jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.5) for _ in range(model.config.num_layers))
    positions = np.zeros((batch, slots), np.int32)
    positions[:, :kept] = np.arange(context - kept, context)
    valid = np.zeros((batch, slots), bool)
    valid[:, :kept] = True
    cache = kv_cache.KVCache(k, v, jnp.asarray(positions), jnp.asarray(valid))

    def random_like(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.5, x.dtype)

    ps = jax.tree.map(random_like, decode.init_policy_state(plan, batch, slots, max_length, model.dtype))
    state = decode.DecodeState(jnp.asarray(rng.integers(0, model.config.vocab_size, batch, dtype=np.int32)),
                               jnp.full((batch,), context, jnp.int32), jnp.zeros((batch,), bool),
                               jax.random.split(jax.random.key(0), batch))
    return cache, ps, state


def timed_max_length(context: int, steps: int, repeats: int) -> int:
    """The positions `time_steps` needs: the context, then (repeats + 1) chunks of steps, rounded up to 128."""
    return -(-(context + (repeats + 1) * steps + 1) // 128) * 128


def time_steps(model, plan, cparams, batch, context, steps, repeats, rng):
    """Median ms/step of `steps`-step decode chunks (compiled once beforehand)."""
    max_length = timed_max_length(context, steps, repeats)
    cache, ps, state = synthetic_state(model, plan, batch, context, max_length, rng)
    run = dict(plan=plan, num_steps=steps, greedy=True, pad_id=0)
    args = (jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    times = []
    for i in range(repeats + 1):  # the first run compiles
        start = time.perf_counter()
        out, cache, ps, state = jax.block_until_ready(
            decode.decode(model.params, cparams, cache, ps, state, *args, **run))
        if i:
            times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)) / steps, int(ps.return_steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 8064])
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=list(POLICY_ROWS) + list(BREAKDOWN_ROWS))
    parser.add_argument("--out", default="runs/bench_policies.json")
    args = parser.parse_args()
    where = machine.describe()
    print(machine.summary_line(where))

    model = adore_jax.load_model(args.model)
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=()))
    (controller_cfg, cparams), _ = resolve_controller(model, None)  # a step costs the same with a random one
    rows_by_name = {**POLICY_ROWS, **BREAKDOWN_ROWS}
    rng = np.random.default_rng(0)
    results = []
    print(f"{'batch':>5} {'context':>7} {'policy':<20} {'ms/step':>8} {'tokens/s':>9} {'vs full':>8} {'rebuild%':>8}")
    for batch in args.batch:
        for context in args.context:
            full_ms = None
            for name in args.policies:
                policy = make_policy(rows_by_name[name]).at_cache_size(args.cache_size).validate(context + 4096)
                reads = policy.needs_controller
                plan = decode.DecodePlan(model.config, policy, controller_cfg if reads else None)
                ms, return_steps = time_steps(model, plan, cparams if reads else {}, batch, context, args.steps,
                                               args.repeats, rng)
                full_ms = ms if name == "full" else full_ms
                fired = 100.0 * return_steps / ((args.repeats + 1) * args.steps) if policy.returns.r else float("nan")
                row = dict(batch=batch, context=context, policy=name, ms_per_step=ms, tokens_per_s=1e3 * batch / ms,
                           speedup_vs_full=(full_ms / ms) if full_ms else None, rebuild_fired_pct=fired)
                results.append(row)
                ratio = f"{full_ms / ms:7.2f}x" if full_ms else "       -"
                print(f"{batch:>5} {context:>7} {name:<20} {ms:>8.1f} {row['tokens_per_s']:>9.1f} {ratio:>8} "
                      f"{fired:>8.0f}", flush=True)
            by = {r["policy"]: r["ms_per_step"] for r in results if r["batch"] == batch and r["context"] == context}
            if {"window m=16", "window", "adore R=0", "adore paper R=8"} <= set(by):
                parts = dict(weights=by["window m=16"], attention=by["window"] - by["window m=16"],
                             controller=by["adore R=0"] - by["window"], rebuild=by["adore paper R=8"] - by["adore R=0"])
                results.append(dict(batch=batch, context=context, breakdown_ms=parts))
                print("      breakdown of an ADORE paper R=8 step (ms): " +
                      ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, cache_size=args.cache_size, steps=args.steps,
                       machine=where, rows=results), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
