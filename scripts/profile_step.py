"""Where the time of one decode step and of one prefill goes on XLA:CPU: per-op times from a `jax.profiler` trace.

Decode: `--steps` steps of a policy from a cache already holding `--context` tokens (random K/V, as in
eval/bench_policies.py). Prefill: one prompt of `--prefill-len` random tokens (one chunk when it is at most the
policy's chunk). For each, a table of the XLA ops (per step or per prefill: ms, share of the wall time, calls) and
how busy each XLA thread was, so one can see what runs on one thread at a time. Prints the tables, writes JSON.

    python scripts/profile_step.py --batch 1 --context 2048 --policy full --out runs/profile_full_b1_2048.json
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

import adore_jax
from adore_jax import decode
from adore_jax.eval import machine
from adore_jax.eval.bench_policies import POLICY_ROWS, synthetic_state, timed_max_length
from adore_jax.eval.suite import resolve_controller
from adore_jax.policies import make_policy
from adore_jax.session import DecodeSession


def trace_events(run, log_dir):
    """Run `run()` under the profiler; (XLA op events as (name, thread, start us, duration us), wall us)."""
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        run()
        wall = 1e6 * (time.perf_counter() - start)
    path = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    ops = [(e["args"]["hlo_op"], e["tid"], e["ts"], e["dur"]) for e in events
           if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    return ops, wall


def busy_time(intervals) -> float:
    """Length of the union of (start, duration) intervals."""
    total, end = 0.0, -np.inf
    for start, duration in sorted(intervals):
        stop = start + duration
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(ops, wall, per):
    """Per-op and per-kind totals divided by `per` (steps or prefills), and each thread's busy share.

    Nested ops (a fusion inside a while loop's body) both count, so the shares may add up to more than 1; the kind
    `while` is the loop itself."""
    by_op, calls = collections.Counter(), collections.Counter()
    for name, _, _, duration in ops:
        by_op[name] += duration
        calls[name] += 1
    by_kind = collections.Counter()
    for name, total in by_op.items():
        by_kind[re.sub(r"\.\d+$", "", name)] += total
    threads = collections.defaultdict(list)
    for name, tid, start, duration in ops:
        if not name.startswith("while"):
            threads[tid].append((start, duration))
    return dict(
        wall_ms=wall / 1e3 / per,
        ops=[dict(op=n, ms=t / 1e3 / per, share=t / wall, calls=calls[n] / per) for n, t in by_op.most_common()],
        kinds=[dict(kind=k, ms=t / 1e3 / per, share=t / wall) for k, t in by_kind.most_common()],
        threads=sorted((busy_time(v) / wall for v in threads.values()), reverse=True))


def print_summary(title, summary, top):
    print(f"\n{title}: {summary['wall_ms']:.1f} ms wall; XLA threads busy "
          + ", ".join(f"{share:.0%}" for share in summary["threads"]))
    print(f"{'op kind':<40} {'ms':>8} {'share':>6}")
    for row in summary["kinds"][:top]:
        print(f"{row['kind']:<40} {row['ms']:>8.2f} {row['share']:>6.1%}")
    print(f"{'op':<40} {'ms':>8} {'share':>6} {'calls':>6}")
    for row in summary["ops"][:top]:
        print(f"{row['op']:<40} {row['ms']:>8.2f} {row['share']:>6.1%} {row['calls']:>6.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="full", choices=list(POLICY_ROWS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048, help="tokens in the cache before the decode steps")
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16, help="decode steps traced")
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt tokens of the traced prefill")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    parser.add_argument("--out", default="runs/profile_step.json")
    args = parser.parse_args(argv)
    for name in ("batch", "context", "cache_size", "steps", "prefill_len", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    where = machine.describe()
    print(machine.summary_line(where))

    model = adore_jax.load_model(args.model)
    policy = make_policy(POLICY_ROWS[args.policy]).at_cache_size(args.cache_size).validate(args.context + 4096)
    (controller_cfg, cparams), _ = resolve_controller(model, None) if policy.needs_controller else ((None, {}), None)
    plan = decode.DecodePlan(model.config, policy, controller_cfg)
    rng = np.random.default_rng(0)
    max_length = timed_max_length(args.context, args.steps, 1)
    carry = synthetic_state(model, plan, args.batch, args.context, max_length, rng)  # (cache, ps, state)
    step_args = (jax.numpy.float32(1.0), jax.numpy.int32(0), jax.numpy.float32(1.0))

    def run_decode():  # the cache is donated: each run continues from the last one's outputs
        nonlocal carry
        _, *carry = jax.block_until_ready(decode.decode(model.params, cparams, *carry, *step_args, plan=plan,
                                                        num_steps=args.steps, greedy=True, pad_id=0))

    prompts = rng.integers(3, model.config.vocab_size, size=(args.batch, args.prefill_len)).tolist()

    def run_prefill():
        jax.block_until_ready(DecodeSession(model, prompts, 1, policy).prefill())

    results = dict(args=vars(args), machine=where)
    with tempfile.TemporaryDirectory() as log_dir:
        for name, run, per in (("decode", run_decode, args.steps), ("prefill", run_prefill, 1)):
            run()  # compiles
            ops, wall = trace_events(run, os.path.join(log_dir, name))
            results[name] = summarize(ops, wall, per)
            title = (f"decode, {args.policy}, batch {args.batch}, context {args.context}, per step" if name == "decode"
                     else f"prefill, {args.policy}, batch {args.batch}, {args.prefill_len} tokens")
            print_summary(title, results[name], args.top)
            carry = None  # the decode state is not needed by the prefill: at a large batch both do not fit in memory
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
