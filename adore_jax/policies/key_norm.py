"""Key norm (Devoto et al., 2024): keep the tokens whose keys have the smallest L2 norm.

A low-norm key draws high attention, so the norm predicts what matters without any attention score. The
statistic is the norm averaged over layers and KV heads (one decision per sequence, the shared slot table's
granularity; the paper decides per head).
"""
import dataclasses

import jax.numpy as jnp

from adore_jax.policies.base import BoundedPolicy


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyNorm(BoundedPolicy):
    name = "key_norm"

    def slot_scores(self, cache, state, token_scores):
        norms = sum(jnp.linalg.norm(k.astype(jnp.float32), axis=-1).mean(axis=-1) for k in cache.k)  # [B, S]
        return -norms / len(cache.k)  # the smallest norm is kept
