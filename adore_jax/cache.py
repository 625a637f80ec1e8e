"""The fixed-shape slot KV cache.

A cache has S slots per sequence. Every slot holds the keys and values of one token for every
layer, the token's absolute position and a validity flag. All layers share the slot assignment
(ADORE's uniform policy), so the position/validity arrays exist once, not per layer. Attention
masks come from the slot positions alone, so the order of tokens in the slots is free: a policy
may put any token in any slot. No shape depends on how many tokens were seen.
"""
import dataclasses

import jax
import jax.numpy as jnp

from adore_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple  # L x [B, S, G, D], RoPE applied at the token's absolute position
    v: tuple  # L x [B, S, G, D]
    slot_positions: jax.Array  # [B, S] int32 absolute position of the token in each slot
    slot_valid: jax.Array  # [B, S] bool: the slot holds a token that may be attended

    @property
    def batch_size(self) -> int:
        return self.slot_positions.shape[0]

    @property
    def num_slots(self) -> int:
        return self.slot_positions.shape[1]


def init_cache(config: ModelConfig, batch_size: int, num_slots: int, dtype=jnp.float32) -> KVCache:
    """An empty cache: every slot invalid."""
    shape = (batch_size, num_slots, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        slot_positions=jnp.zeros((batch_size, num_slots), jnp.int32),
        slot_valid=jnp.zeros((batch_size, num_slots), bool),
    )


def _rows(batch_size: int):
    return jnp.arange(batch_size)[:, None]  # [B, 1] batch index for per-row scatters


def claim_slots(cache: KVCache, slots, positions, valid) -> KVCache:
    """Mark `slots` [B, Q] as holding tokens at `positions` [B, Q]; `valid` [B, Q] bool."""
    rows = _rows(cache.batch_size)
    return dataclasses.replace(
        cache,
        slot_positions=cache.slot_positions.at[rows, slots].set(positions),
        slot_valid=cache.slot_valid.at[rows, slots].set(valid),
    )


def write_layer(cache_layer, slots, new):
    """Overwrite rows `slots` [B, Q] of one layer's K or V [B, S, G, D] with `new` [B, Q, G, D]."""
    rows = _rows(cache_layer.shape[0])
    return cache_layer.at[rows, slots].set(new.astype(cache_layer.dtype), unique_indices=True)
