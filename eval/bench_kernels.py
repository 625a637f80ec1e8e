"""Speed of the Pallas kernels against their jnp twins (jitted by XLA) on the current backend.

Per kernel and shape: median ms per call (after a warm-up call), bytes of K/V read per call divided
by that time (achieved bandwidth), its fraction of the device's measured copy bandwidth (read +
write of a large array), and the speed-up of each implementation over the twin. On the CPU only
the jnp implementations run (Pallas needs a TPU or GPU). Prints a table, writes JSON with --out.
"prefill" is a chunk of queries in a full-attention cache (slots in position order) filled to a given
length: "pallas" is then the prefill kernel, "pallas_slot" the decode kernel given the same chunk (the path
before the prefill kernel), "blocked" the CPU's jnp path; GB/s counts the whole cache, so there it is only
a rate relative to the twin.

    python eval/bench_kernels.py --out runs/bench_kernels.json
    python eval/bench_kernels.py --quick            # small shapes, a CPU-sized smoke run
"""
import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.eval import machine
from pallas_kernels import slot_attention, topk_attention
from pallas_kernels.slot_attention import slot_attention_gpu, slot_attention_tpu

# (H, G, D): GQA 4 with head dim 128, GQA 8 with head dim 64.
HEADS = [(32, 8, 128), (32, 4, 64)]
QUICK_HEADS = [(8, 2, 64)]


def slot_shapes(quick):
    """(batch, m, Q, H, G, D); the cache holds m + Q slots (the block is written before it attends)."""
    if quick:
        return [(2, m, q, *h) for m in (256, 512) for q in (1, 9) for h in QUICK_HEADS]
    return [(b, m, q, *h) for b in (8, 64) for m in (512, 4096) for q in (1, 9) for h in HEADS]


def prefill_shapes(quick):
    """(batch, S, Q, filled, H, G, D): a chunk of Q queries at positions filled - Q .. filled - 1 of an S-slot cache."""
    if quick:
        return [(1, 1024, 128, filled, *h) for filled in (256, 1024) for h in QUICK_HEADS]
    return ([(4, 8192, 256, filled, *h) for filled in (1024, 8192) for h in [(9, 3, 64)] + HEADS]
            + [(1, 8192, 1024, 4096, 9, 3, 64)])


def topk_shapes(quick):
    """(batch, N, H, G, D, top_k)."""
    if quick:
        return [(1, 256, *h, 32) for h in QUICK_HEADS]
    return [(8, n, *h, 64) for n in (512, 2048) for h in HEADS]


def slot_case(shape, dtype, mass):
    batch, m, n_q, n_heads, n_kv, head_dim = shape
    n_slots = m + n_q
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
    q = normal(batch, n_q, n_heads, head_dim)
    k, v = normal(batch, n_slots, n_kv, head_dim), normal(batch, n_slots, n_kv, head_dim)
    slot_positions = jnp.asarray(np.stack([rng.permutation(n_slots) for _ in range(batch)]), jnp.int32)
    slot_valid = jnp.ones((batch, n_slots), bool)
    q_positions = jnp.broadcast_to(jnp.arange(m, n_slots, dtype=jnp.int32), (batch, n_q))
    args = (q, k, v, q_positions, slot_positions, slot_valid)
    kv_bytes = 2 * k.size * k.dtype.itemsize
    make = lambda impl: jax.jit(functools.partial(slot_attention, return_mass=mass, impl=impl))
    return args, kv_bytes, make


def prefill_case(shape, dtype):
    batch, n_slots, n_q, filled, n_heads, n_kv, head_dim = shape
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
    q = normal(batch, n_q, n_heads, head_dim)
    k, v = normal(batch, n_slots, n_kv, head_dim), normal(batch, n_slots, n_kv, head_dim)
    slot_positions = jnp.broadcast_to(jnp.arange(n_slots, dtype=jnp.int32), (batch, n_slots))
    slot_valid = slot_positions < filled
    q_positions = jnp.broadcast_to(jnp.arange(filled - n_q, filled, dtype=jnp.int32), (batch, n_q))
    args = (q, k, v, q_positions, slot_positions, slot_valid)
    kv_bytes = 2 * k.size * k.dtype.itemsize

    def make(impl):
        if impl == "pallas_slot":
            kernel = slot_attention_tpu if jax.default_backend() == "tpu" else slot_attention_gpu
            return jax.jit(kernel)
        return jax.jit(functools.partial(slot_attention, impl=impl))

    return args, kv_bytes, make


def topk_case(shape, dtype, backward):
    batch, n, n_heads, n_kv, head_dim, top_k = shape
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
    args = (normal(batch, n, n_heads, head_dim), normal(batch, n, n_kv, head_dim), normal(batch, n, n_kv, head_dim))
    kv_bytes = 2 * args[1].size * args[1].dtype.itemsize

    def make(impl):
        attention = functools.partial(topk_attention, top_k=top_k, impl=impl)
        if not backward:
            return jax.jit(attention)
        loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    return args, kv_bytes, make


def median_seconds(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(n_bytes, repeats):
    """Bytes moved per second (read + write) by an elementwise pass over a large array."""
    x = jnp.zeros(n_bytes // 4, jnp.float32)
    seconds = median_seconds(jax.jit(lambda x: x + 1.0), (x,), repeats)
    return 2 * x.size * 4 / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["slot", "prefill", "topk", "topk_grad"],
                        choices=["slot", "slot_mass", "prefill", "topk", "topk_grad"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (median)")
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    backend = jax.default_backend()
    on_accelerator = backend in ("tpu", "gpu")
    repeats = args.repeats or (5 if args.quick else 20)
    dtype = jnp.dtype(args.dtype)
    copy_bw = copy_bandwidth((64 if args.quick else 1024) << 20, repeats)
    where = machine.describe()
    print(machine.summary_line(where))
    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s")

    cases = {  # kernel -> (shapes, case builder); inputs are built one case at a time
        "slot": (slot_shapes, functools.partial(slot_case, mass=False)),
        "slot_mass": (slot_shapes, functools.partial(slot_case, mass=True)),
        "prefill": (prefill_shapes, prefill_case),
        "topk": (topk_shapes, functools.partial(topk_case, backward=False)),
        "topk_grad": (topk_shapes, functools.partial(topk_case, backward=True)),
    }
    impls = {"slot": ["ref"], "slot_mass": ["ref"], "prefill": ["ref", "blocked"], "topk": ["ref", "blocked"],
             "topk_grad": ["ref", "blocked"]}
    if on_accelerator:
        for names in impls.values():
            names.append("pallas")
        impls["prefill"] = ["ref", "pallas_slot", "pallas"]

    rows = []
    header = f"{'kernel':<10} {'shape':<36} {'impl':<11} {'ms/call':>9} {'GB/s':>8} {'of copy':>8} {'vs ref':>7}"
    print(header)
    print("-" * len(header))
    for kernel in args.kernels:
        shapes, build = cases[kernel]
        for shape in shapes(args.quick):
            inputs, kv_bytes, make = build(shape, dtype)
            ref_seconds = None
            for impl in impls[kernel]:
                try:
                    seconds = median_seconds(make(impl), inputs, repeats)
                except Exception as error:  # e.g. the twin's [B, H, N, N] logits not fitting in memory
                    print(f"{kernel:<10} {str(shape):<36} {impl:<11} failed: {type(error).__name__}: "
                          f"{str(error).splitlines()[0][:80]}")
                    rows.append(dict(kernel=kernel, shape=shape, impl=impl,
                                     error=f"{type(error).__name__}: {error}"))
                    continue
                ref_seconds = seconds if impl == "ref" else ref_seconds
                bandwidth = kv_bytes / seconds
                speedup = ref_seconds / seconds if ref_seconds else None
                rows.append(dict(kernel=kernel, shape=shape, impl=impl, ms_per_call=1e3 * seconds,
                                 kv_bytes=kv_bytes, kv_gb_per_s=bandwidth / 1e9,
                                 fraction_of_copy=bandwidth / copy_bw, speedup_vs_ref=speedup))
                print(f"{kernel:<10} {str(shape):<36} {impl:<11} {1e3 * seconds:9.3f} {bandwidth / 1e9:8.2f} "
                      f"{bandwidth / copy_bw:8.1%} " + (f"{speedup:6.2f}x" if speedup else f"{'-':>7}"))

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(machine=where, dtype=args.dtype, repeats=repeats, copy_gb_per_s=copy_bw / 1e9,
                           shape_fields=dict(slot="batch, m, Q, H, G, D", prefill="batch, S, Q, filled, H, G, D",
                                             topk="batch, N, H, G, D, top_k"),
                           results=rows), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
