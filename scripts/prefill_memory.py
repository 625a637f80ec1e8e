"""XLA's memory analysis of one compiled prefill program: how much beyond the cache and policy state a chunk holds.

    python scripts/prefill_memory.py --batch 5 --prompt-length 4096 --chunk 1024 --policy '{policy: adore}'

Compiles (does not run) the prefill of `batch` prompts of `prompt-length` random tokens under a policy (YAML, as
in a config's `policies` list) and prints the cache and policy state beside the program's temporaries. A chunk's
attention over its slots is [B, H, C, m + C] per layer; temporaries that grow with all layers' of them mean
per-layer attention is kept alive (the README's section "Memory" has the run that found it).
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import yaml

import adore_jax
from adore_jax import decode
from adore_jax.session import DecodeSession

MIB = 1 << 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="{policy: adore}", help="a policy spec, YAML")
    parser.add_argument("--cache-size", type=int, default=256, help="m, unless the policy sets its own")
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--prompt-length", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk (the policy's prefill_chunk)")
    args = parser.parse_args()
    spec = yaml.safe_load(args.policy)
    spec = {"policy": spec} if isinstance(spec, str) else dict(spec)
    spec.setdefault("cache_size", args.cache_size)
    spec["prefill_chunk"] = args.chunk
    model = adore_jax.load_model(args.model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, args.prompt_length).tolist() for _ in range(args.batch)]
    session = DecodeSession(model, prompts, 1, spec)
    lengths = session.lengths - (1 if session.policy.returns.r else 0)  # as DecodeSession.consume_prompts runs it
    compiled = decode.prefill.lower(model.params, session.controller_params, session.cache, session.ps,
                                    jnp.asarray(session.tokens), jnp.asarray(lengths), plan=session.plan,
                                    chunk=session.shape.chunk).compile()
    memory = compiled.memory_analysis()
    state = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((session.cache, session.ps)))
    print(f"{session.policy.label} m={session.policy.cache_size} batch {args.batch} prompt {args.prompt_length} "
          f"chunk {session.shape.chunk} ({session.shape.prefill_slots} slots): cache + policy state "
          f"{state / MIB:.0f} MiB; program temporaries {memory.temp_size_in_bytes / MIB:.0f} MiB, updated in "
          f"place {memory.alias_size_in_bytes / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
