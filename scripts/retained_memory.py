"""Where an evaluation's resident memory goes between rows: live arrays, compiled programs, or heap pages that
freed buffers left behind.

    python scripts/retained_memory.py [--prompts 9] [--length 4096]

Runs the eval's pattern in one process (generate() rows of ADORE with `Recall(r=8, from_layer=0)`, the recall from
a store of every token's K/V, at m = 128, then 256, on random prompts) and prints the resident set beside the bytes
of live jax arrays after each row, after gc, after `jax.clear_caches()` (the compiled programs) and after
`return_freed_memory()` (glibc's malloc_trim).
"""
import argparse
import gc

import jax
import numpy as np

import adore_jax
from adore_jax.memory import return_freed_memory
from adore_jax.policies import Recall


def resident_gb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1e6


def live_gb() -> float:
    return sum(x.nbytes for x in jax.live_arrays()) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=9)
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    model = adore_jax.load_model("smollm2-135m")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, model.config.vocab_size, size=args.length).tolist() for _ in range(args.prompts)]
    stored = dict(policy="adore", returns=Recall(r=8, from_layer=0))

    def show(label):
        print(f"{label:28s} resident {resident_gb():5.2f} GB   live arrays {live_gb():5.2f} GB", flush=True)

    show("model loaded")
    for m in (128, 256):
        adore_jax.generate(model, prompts, 10, cache_size=m, **stored)
        show(f"after a row at m={m}")
    gc.collect()
    show("after gc")
    jax.clear_caches()
    gc.collect()
    show("after jax.clear_caches()")
    return_freed_memory()
    show("after return_freed_memory()")


if __name__ == "__main__":
    main()
