"""The share of the decode kernel's slot blocks that the prefill kernels visit over a whole chunked prefill.

A full-attention cache (slots in position order) of `capacity` slots, a prompt of `prompt` tokens prefilled in
chunks of `chunk`: the decode kernel (`slot_attention_tpu` / `_gpu`) walks every slot block for every query,
the prefill kernels only the blocks up to `visible_slot_blocks`. Counts blocks times queries; no kernel runs.

    python scripts/prefill_work_fraction.py --prompt 8064 2048 --capacity 8192 --chunk 256 1024
"""
import argparse
import itertools

import jax.numpy as jnp

from pallas_kernels import _prefill_attention_gpu as gpu
from pallas_kernels import _prefill_attention_tpu as tpu
from pallas_kernels._common import pad_queries, round_up, slot_keys, visible_slot_blocks

# the kernels' default (block_queries, block_slots) at SmolLM2's GQA 3, head_dim 64
BLOCKS = {"gpu": (gpu.default_block_queries(3, 64), gpu.BLOCK_SLOTS), "tpu": (tpu.BLOCK_QUERIES, tpu.BLOCK_SLOTS)}


def visited_fraction(prompt: int, capacity: int, chunk: int, block_queries: int, block_slots: int) -> float:
    slot_positions = jnp.arange(capacity, dtype=jnp.int32)[None]  # [1, S]
    visited = total = 0
    for start in range(0, prompt, chunk):
        q_positions = jnp.arange(start, start + chunk, dtype=jnp.int32)[None]  # [1, C]
        _, q_positions = pad_queries(jnp.zeros((1, chunk, 1, 1)), q_positions, block_queries)
        keys = slot_keys(slot_positions, slot_positions < start + chunk)
        counts = visible_slot_blocks(q_positions, keys, block_queries, block_slots)  # [1, QB]
        visited += int(counts.sum()) * block_slots
        total += counts.shape[1] * round_up(capacity, block_slots)
    return visited / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, nargs="+", default=[8064, 2048])
    parser.add_argument("--capacity", type=int, default=8192)
    parser.add_argument("--chunk", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()
    print(f"{'kernel':<7} {'prompt':>7} {'capacity':>9} {'chunk':>6} {'visited':>8}")
    for (name, blocks), prompt, chunk in itertools.product(BLOCKS.items(), args.prompt, args.chunk):
        if prompt > args.capacity:
            raise SystemExit(f"--prompt ({prompt}) must be at most --capacity ({args.capacity})")
        print(f"{name:<7} {prompt:>7} {args.capacity:>9} {chunk:>6} "
              f"{visited_fraction(prompt, args.capacity, chunk, *blocks):>8.1%}")


if __name__ == "__main__":
    main()
