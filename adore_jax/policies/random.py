"""Random: release uniformly random tokens. A control: any ranking worth its cost must beat it.

A token's score is a fixed pseudo-random number of (seed, position), so the kept set does not
depend on which slot a token sits in, and a run is reproducible.
"""
import dataclasses

import jax.numpy as jnp

from adore_jax.policies.base import BoundedPolicy


def position_hash(seed: int, positions):
    """Uniform floats in [0, 1) from (seed, positions): the murmur3 finalizer over uint32."""
    x = positions.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(seed & 0xFFFFFFFF)
    x ^= x >> 16
    x *= jnp.uint32(0x85EBCA6B)
    x ^= x >> 13
    x *= jnp.uint32(0xC2B2AE35)
    x ^= x >> 16
    return (x >> 8).astype(jnp.float32) / float(1 << 24)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Random(BoundedPolicy):
    name = "random"

    seed: int = 0  # which random tokens are kept

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")

    def slot_scores(self, cache, state, token_scores):
        return position_hash(self.seed, cache.slot_positions)
