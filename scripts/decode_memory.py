"""XLA's memory analysis of one compiled decode program: does a step hold more than its cache?

    python scripts/decode_memory.py --policy window --batch 128 --context 8064

Compiles (does not run) a 2-step decode chunk over a cache that already holds `context` tokens and prints
the cache's size beside the program's temporaries and the bytes it updates in place (donated and aliased).
A step that copied the cache would show temporaries of about the cache's size.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import adore_jax
from adore_jax import decode
from adore_jax.eval.bench_policies import synthetic_state
from adore_jax.policies import make_policy

MIB = 1 << 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="window", help="a bounded policy without a controller")
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=8064)
    args = parser.parse_args()
    model = adore_jax.load_model(args.model)
    policy = make_policy(args.policy, cache_size=args.cache_size)
    if policy.needs_controller:
        parser.error(f"--policy {args.policy}: a policy that reads a controller is not supported here")
    policy = policy.validate(args.context + 64)
    plan = decode.DecodePlan(model.config, policy)
    cache, ps, state = synthetic_state(model, plan, args.batch, args.context, args.context + 64,
                                       np.random.default_rng(0))
    sampling = (jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    compiled = decode._decode.lower(model.params, {}, cache, ps, state, *sampling, None, plan=plan, num_steps=2,
                                    greedy=True, pad_id=0, return_logits=False).compile()
    memory = compiled.memory_analysis()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
    print(f"{args.policy} m={args.cache_size} batch {args.batch} context {args.context}: cache {cache_bytes / MIB:.0f} "
          f"MiB; program temporaries {memory.temp_size_in_bytes / MIB:.0f} MiB, arguments "
          f"{memory.argument_size_in_bytes / MIB:.0f} MiB (weights included), updated in place "
          f"{memory.alias_size_in_bytes / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
