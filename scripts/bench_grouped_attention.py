"""Decode attention over a bounded cache at large batch: the whole batch in one batched matmul against sequences in
groups whose K fits in cache (`slot_attention_grouped`, `grouped_rows`). One decode query per sequence, SmolLM2's
heads (9 query, 3 KV, head dim 64), random K/V; both variants timed interleaved in one process. Prints a table,
writes JSON.

    python scripts/bench_grouped_attention.py --batch 16 64 256 --slots 513 --out runs/bench_grouped_attention.json
"""
import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.eval import machine
from pallas_kernels.slot_attention import _grouped, grouped_rows, slot_attention_grouped

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def inputs(batch: int, slots: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, 1, HEADS, HEAD_DIM), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((batch, slots, KV_HEADS, HEAD_DIM), np.float32)) for _ in range(2))
    positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
    return q, k, v, jnp.full((batch, 1), slots, jnp.int32), positions, jnp.ones((batch, slots), bool)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--slots", type=int, default=513, help="cache slots per sequence (m + 1 at m = 512)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="runs/bench_grouped_attention.json")
    args = parser.parse_args(argv)
    for name in ("slots", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if min(args.batch) < 2:
        parser.error(f"--batch must be >= 2 (decode steps at batch 1 take the twin); got {min(args.batch)}")
    where = machine.describe()
    print(machine.summary_line(where))
    variants = {"one batch": jax.jit(functools.partial(_grouped, return_mass=False)),
                "groups": jax.jit(slot_attention_grouped)}
    print(f"{'batch':>5} {'slots':>5} {'group':>5} | {'one batch ms':>12} {'groups ms':>9} | {'speed-up':>8}")
    rows = []
    for batch in args.batch:
        x = inputs(batch, args.slots)
        outs = {name: np.asarray(f(*x)) for name, f in variants.items()}  # compiles; same values
        np.testing.assert_allclose(outs["groups"], outs["one batch"], rtol=1e-5, atol=1e-6)
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, f in variants.items():
                start = time.perf_counter()
                jax.block_until_ready(f(*x))
                times[name].append(time.perf_counter() - start)
        best = {name: 1e3 * min(t) for name, t in times.items()}
        group = grouped_rows(batch, args.slots, KV_HEADS * HEAD_DIM, 4)
        rows.append(dict(batch=batch, slots=args.slots, group=group, one_batch_ms=best["one batch"],
                         groups_ms=best["groups"], speedup=best["one batch"] / best["groups"]))
        print(f"{batch:>5} {args.slots:>5} {group:>5} | {best['one batch']:>12.2f} {best['groups']:>9.2f} | "
              f"{rows[-1]['speedup']:>7.2f}x", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(machine=where, rows=rows), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
