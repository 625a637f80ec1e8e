"""Prefill time per cache policy: the same random-token prompts through each policy's chunked prefill (the real
model; a policy that recalls also runs each prompt's last token as a decode step, as generation does). The first
call of a row compiles; the best of the later ones is its time. Compare rows as ratios within one run.

    python eval/bench_prefill.py --context 4096 --policies "adore recall R=8" "adore recall R=8 in prefill" \\
        --out runs/bench_prefill.json
"""
import argparse
import json
import os

import jax
import numpy as np

import adore_jax
from adore_jax.eval import machine
from adore_jax.eval.bench_policies import POLICY_ROWS
from adore_jax.policies import make_policy
from adore_jax.session import DecodeSession
from adore_jax.timing import timed


def prefill_seconds(model, prompts, policy, repeats):
    """(best seconds of `repeats` timed prefills after a compiling one, the compiling call's seconds)."""
    times = []
    for _ in range(repeats + 1):
        session = DecodeSession(model, prompts, 1, policy)
        _, seconds, _ = timed(session.prefill)
        times.append(seconds)
    return min(times[1:]), times[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=["adore recall R=8", "adore recall R=8 in prefill"])
    parser.add_argument("--out", default="runs/bench_prefill.json")
    args = parser.parse_args(argv)
    unknown = [name for name in args.policies if name not in POLICY_ROWS]
    if unknown:
        parser.error(f"--policies: unknown rows {unknown}; choose from {list(POLICY_ROWS)}")
    for name in ("batch", "context", "cache_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    where = machine.describe()
    print(machine.summary_line(where))
    model = adore_jax.load_model(args.model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, model.config.vocab_size, size=(args.batch, args.context)).tolist()
    rows = []
    print(f"prefill of {args.batch} x {args.context} random tokens, m = {args.cache_size} ({jax.default_backend()})")
    print(f"{'policy':<42} {'s':>8} {'x first':>8} {'compile+run s':>14}")
    for name in args.policies:
        policy = make_policy(POLICY_ROWS[name]).at_cache_size(args.cache_size)
        seconds, first = prefill_seconds(model, prompts, policy, args.repeats)
        rows.append(dict(policy=name, seconds=seconds, first_call_seconds=first))
        print(f"{name:<42} {seconds:>8.2f} {seconds / rows[0]['seconds']:>7.2f}x {first:>14.1f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, batch=args.batch, context=args.context, cache_size=args.cache_size,
                       repeats=args.repeats, machine=where, rows=rows), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
