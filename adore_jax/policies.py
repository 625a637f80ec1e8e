"""Cache policies: one scoring rule each over the same slot cache.

Every policy except `full` and `oracle_topk` keeps at most m tokens: after each block (a decode
step or a prefill chunk) the valid slots with the lowest scores are released until m remain. The
slot assignment is shared by all layers (ADORE's uniform policy). For H2O and TOVA this means one
decision per sequence from the attention mass summed over layers and query heads (their papers
decide per head/layer; one shared decision keeps the cache a single slot table, and is the
granularity ADORE itself uses).

  full          keep everything (cache = max length): the reference
  window        the m most recent tokens
  streaming_llm `sinks` first tokens + the most recent ones
  h2o           accumulated attention mass ("heavy hitters") + a protected recent window
  tova          the attention mass of the current query
  oracle_topk   full cache, each query attends to its own top-K logits per head (the upper bound)
  adore         the controller's score; top-R released tokens are rebuilt each step
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.slot_attention import MASK_VALUE

POLICIES = ("full", "window", "streaming_llm", "h2o", "tova", "oracle_topk", "adore")
CACHE_UPDATES = ("scatter", "onehot")
PROTECTED = 1e9  # added to the score of pinned tokens (sinks, recent window)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    policy: str = "full"
    cache_size: Optional[int] = None  # m, tokens kept; None = everything (full, oracle_topk)
    rebuild: int = 0  # R, released tokens rebuilt per step (adore)
    adaptive_rebuild: bool = False  # run the rebuild block only when a released token outranks a cached one
    rebuild_into_cache: bool = True  # rebuilt tokens compete for the m slots (ADORE.md 4); False: they serve one step
    attn_top_k: Optional[int] = None  # K of top-K attention (oracle_topk; the controller's target)
    sinks: int = 0  # first tokens always kept (streaming_llm default 4; optional for h2o/adore)
    recent: int = 0  # most recent tokens always kept (streaming_llm: the rest of m; h2o default m/2)
    prefill_chunk: int = 128  # prompt tokens per prefill block under a bounded cache
    cache_update: str = "scatter"  # how block K/V enter the cache: "scatter" (index) or "onehot" (matmul)

    @property
    def bounded(self) -> bool:
        return self.policy not in ("full", "oracle_topk")

    @property
    def block_rows(self) -> int:
        """Q, the rows of a decode block: the current token plus the rebuilt ones."""
        return 1 + (self.rebuild if self.policy == "adore" else 0)

    def validate(self, max_length: int) -> "CacheConfig":
        """Check the configuration against the release buffer length; returns it with defaults filled."""
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.cache_update not in CACHE_UPDATES:
            raise ValueError(f"cache_update must be one of {CACHE_UPDATES}; got {self.cache_update!r}")
        m = self.cache_size
        if self.bounded:
            if m is None or m < 1:
                raise ValueError(f"cache_size (m) must be >= 1 for policy {self.policy!r}; got {m}")
            if m > max_length:
                raise ValueError(f"cache_size ({m}) must be <= max_length ({max_length})")
        if self.rebuild < 0:
            raise ValueError(f"rebuild (R) must be >= 0; got {self.rebuild}")
        if self.rebuild and self.policy != "adore":
            raise ValueError(f"rebuild (R) is only for policy 'adore'; got R={self.rebuild} with {self.policy!r}")
        if not self.rebuild_into_cache and not self.rebuild:
            raise ValueError("rebuild_into_cache=False needs policy 'adore' with rebuild (R) >= 1; "
                             f"got policy={self.policy!r}, R={self.rebuild}")
        if self.bounded and self.rebuild >= m:
            raise ValueError(f"rebuild (R={self.rebuild}) must be < cache_size (m={m})")
        if self.attn_top_k is not None and (self.attn_top_k < 1 or (m is not None and self.attn_top_k > m)):
            raise ValueError(f"attn_top_k (K) must be in [1, cache_size={m}]; got {self.attn_top_k}")
        if self.policy == "oracle_topk" and self.attn_top_k is None:
            raise ValueError("policy 'oracle_topk' needs attn_top_k (K)")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1; got {self.prefill_chunk}")
        if self.sinks < 0 or self.recent < 0:
            raise ValueError(f"sinks and recent must be >= 0; got sinks={self.sinks}, recent={self.recent}")
        filled = self
        if self.policy == "streaming_llm":
            sinks = self.sinks or min(4, m)
            filled = dataclasses.replace(self, sinks=sinks, recent=self.recent or m - sinks)
        elif self.policy == "h2o" and not self.recent:
            filled = dataclasses.replace(self, recent=m // 2)
        if self.bounded and filled.sinks + filled.recent > m:
            raise ValueError(f"sinks + recent ({filled.sinks} + {filled.recent}) must be <= cache_size ({m})")
        return filled


def protect(config: CacheConfig, scores, slot_positions, current_position):
    """Pin sink and recent tokens: scores, slot_positions [B, S]; current_position [B]."""
    pinned = slot_positions < config.sinks
    pinned |= slot_positions > current_position[:, None] - config.recent
    return scores + PROTECTED * pinned


def slot_scores(config: CacheConfig, slot_positions, mass, controller_scores):
    """The keep-score of each slot (higher is kept) before protection.

    slot_positions [B, S]; mass [B, S] (h2o: accumulated, tova: current query's); controller_scores
    [B, S] (adore: the controller's score of each slot's token).
    """
    if config.policy in ("window", "streaming_llm"):
        return slot_positions.astype(jnp.float32)
    if config.policy in ("h2o", "tova"):
        return mass
    return controller_scores


def evict_to_capacity(slot_valid, scores, capacity: int, max_evictions: int):
    """Release the lowest-scoring valid slots until at most `capacity` remain.

    slot_valid [B, S] bool; scores [B, S]. At most `max_evictions` per row (static).
    Returns the new slot_valid [B, S].
    """
    excess = jnp.maximum(jnp.sum(slot_valid, axis=1) - capacity, 0)  # [B]
    _, lowest = jax.lax.top_k(jnp.where(slot_valid, -scores, -jnp.inf), max_evictions)  # [B, E]
    evict = jnp.arange(max_evictions)[None, :] < excess[:, None]
    rows = jnp.arange(slot_valid.shape[0])[:, None]
    return slot_valid.at[rows, lowest].min(~evict)


def free_slots(slot_valid, count: int):
    """The `count` lowest-index invalid slots per row: [B, S] -> [B, count] int32.

    The cache has m + Q physical slots and at most m are valid between blocks, so they exist.
    """
    num_slots = slot_valid.shape[1]
    priority = jnp.where(slot_valid, -1, num_slots - jnp.arange(num_slots))
    return jax.lax.top_k(priority, count)[1].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopKSlotAttention:
    """Slot attention where each query keeps only its `k` largest visible logits per head (oracle)."""
    k: int

    def __call__(self, q, k, v, q_positions, slot_positions, slot_valid):
        batch, n_q, n_heads, head_dim = q.shape
        n_kv = k.shape[2]
        qg = q.reshape(batch, n_q, n_kv, n_heads // n_kv, head_dim)
        logits = jnp.einsum("bqgrd,bsgd->bgrqs", qg, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
        visible = (slot_valid[:, None, :] & (slot_positions[:, None, :] <= q_positions[:, :, None]))[:, None, None]
        logits = jnp.where(visible, logits, MASK_VALUE)
        kth = jax.lax.top_k(logits, min(self.k, logits.shape[-1]))[0][..., -1:]  # [B, G, r, Q, 1]
        keep = visible & (logits >= kth)
        weights = jnp.where(keep, jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), 0.0)
        probs = weights / jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1e-30)
        out = jnp.einsum("bgrqs,bsgd->bqgrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.reshape(batch, n_q, n_heads, head_dim).astype(q.dtype)
