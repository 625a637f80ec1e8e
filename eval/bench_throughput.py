"""Decode throughput per policy within one memory budget: each policy's largest batch, and tokens/s against batch.

The budget covers what a run holds per sequence beyond the weights: the KV cache and the policy
state (ADORE's release buffer of every token's features, H2O/TOVA's attention mass). Full attention
needs a slot per position, so its largest batch shrinks with the context; a bounded policy holds
m + R + 1 slots whatever the context. Each point decodes from a cache already holding the context
(synthetic K/V at the real shapes, as eval/bench_policies.py), so an 8k context costs no prefill.
Every row comes from one run: compare them as ratios.

    python eval/bench_throughput.py --budget-gib 8 --context 4096 8064 --out runs/bench_throughput.json
"""
import argparse
import dataclasses
import json
import os

import numpy as np

import adore_jax
from adore_jax import controller as ctrl
from adore_jax import decode
from adore_jax.eval import machine
from adore_jax.eval.bench_policies import POLICY_ROWS, time_steps, timed_max_length
from adore_jax.policies import make_policy
from adore_jax.weights import default_controller

GIB = 1 << 30


def state_bytes(model, plan, batch: int, max_length: int) -> int:
    """Bytes of the KV cache and the policy state of `batch` sequences (shapes only: nothing allocated)."""
    policy = plan.policy
    slots = policy.cache_size + policy.block_rows if policy.bounded else max_length

    return decode.state_bytes(plan, batch, slots, max_length, model.dtype)


def largest_batch(model, plan, budget: int, max_length: int) -> int:
    """The most sequences whose cache and policy state fit in `budget` bytes (0 if not even one does)."""
    per_sequence = state_bytes(model, plan, 2, max_length) - state_bytes(model, plan, 1, max_length)
    shared = state_bytes(model, plan, 1, max_length) - per_sequence  # scalars such as the rebuild counter
    return max((budget - shared) // per_sequence, 0)


def batch_ladder(largest: int, cap: int) -> list:
    """Batches to time: 1, 4, 16, ... below the largest, then the largest (or `cap`, where it is lower)."""
    top = min(largest, cap)
    ladder = [b for b in (4 ** i for i in range(8)) if b < top]
    return ladder + [top] if top else ladder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget-gib", type=float, default=8.0, help="KV cache + policy state, all sequences")
    parser.add_argument("--context", type=int, nargs="+", default=[4096, 8064])
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--policies", nargs="+", default=["full", "window", "tova", "adore R=0"])
    parser.add_argument("--max-batch", type=int, default=256,
                        help="the largest batch timed here (a policy's largest batch above it is capped): on the 23 GB "
                             "build machine a window step at 363 sequences (8 GiB of cache) ran out of memory")
    parser.add_argument("--steps", type=int, default=4, help="decode steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_throughput.json")
    args = parser.parse_args()
    where = machine.describe()
    print(machine.summary_line(where))
    if args.budget_gib <= 0:
        parser.error(f"--budget-gib must be > 0; got {args.budget_gib}")
    unknown = sorted(set(args.policies) - set(POLICY_ROWS))
    if unknown:
        parser.error(f"--policies: unknown {unknown}; choose from {list(POLICY_ROWS)}")

    model = adore_jax.load_model(args.model)
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=()))
    controller_cfg, cparams = ctrl.load_controller(default_controller(args.model), model.config.hidden_size)
    budget = int(args.budget_gib * GIB)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'context':>7} {'policy':<12} {'largest':>7} {'batch':>5} {'GiB':>6} {'ms/step':>9} {'tokens/s':>9}")
    for context in args.context:
        max_length = timed_max_length(context, args.steps, args.repeats)
        for name in args.policies:
            policy = make_policy(POLICY_ROWS[name]).at_cache_size(args.cache_size).validate(max_length)
            reads = policy.needs_controller
            plan = decode.DecodePlan(model.config, policy, controller_cfg if reads else None)
            largest = largest_batch(model, plan, budget, max_length)
            for batch in batch_ladder(largest, args.max_batch):
                ms, _ = time_steps(model, plan, cparams if reads else {}, batch, context, args.steps, args.repeats,
                                   rng)
                row = dict(context=context, policy=name, largest_batch=largest, batch=batch,
                           capped=batch < largest, state_gib=state_bytes(model, plan, batch, max_length) / GIB,
                           ms_per_step=ms, tokens_per_s=1e3 * batch / ms)
                rows.append(row)
                print(f"{context:>7} {name:<12} {largest:>7} {batch:>5} {row['state_gib']:>6.2f} {ms:>9.1f} "
                      f"{row['tokens_per_s']:>9.1f}", flush=True)
                summary = write_json(args, where, rows)  # after every point: a run stopped early keeps what it measured
    print("best tokens/s within the budget (x full attention's best):")
    for s in summary:
        ratio = f"{s['vs_full']:.2f}x" if s["vs_full"] else "-"
        print(f"  {s['context']:>5} {s['policy']:<12} {s['best_tokens_per_s']:>8.1f}  {ratio}")
    print(f"wrote {args.out}")
    plot(rows, os.path.splitext(args.out)[0] + ".png")


def write_json(args, where, rows) -> list:
    """Write the rows and each policy's best tokens/s per context (x full attention's); returns that summary."""
    best = {}
    for row in rows:
        key = row["context"], row["policy"]
        best[key] = max(best.get(key, 0.0), row["tokens_per_s"])
    summary = [dict(context=c, policy=n, best_tokens_per_s=t, vs_full=t / best[c, "full"] if (c, "full") in best
                    else None) for (c, n), t in best.items()]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, budget_gib=args.budget_gib, cache_size=args.cache_size, steps=args.steps,
                       repeats=args.repeats, max_batch=args.max_batch,
                       machine=where,
                       rows=rows, best=summary), f, indent=2)
    return summary


def plot(rows, path):
    """tokens/s against batch (log-log), one panel per context, one line per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for name in dict.fromkeys(r["policy"] for r in rows):
            points = [r for r in rows if r["context"] == context and r["policy"] == name]
            ax.plot([r["batch"] for r in points], [r["tokens_per_s"] for r in points], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s", title=f"context {context}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
