"""Whole-sequence training forward over the model's layer loop, with a pluggable attention.

    hidden, aux = forward_hidden(params, config, tokens, positions, attention)

`attention(q [B,T,H,D], k [B,T,G,D], v [B,T,G,D]) -> (out [B,T,H,D], aux)`; `aux` is collected per
layer (labels use it for attention statistics; training returns None). Masks live in the attention
function: `full_attention` (causal, optionally within packed segments) and `sparse_attention`
(top-K causal, the backbone's fine-tuning target, docs/design.md), both over the kernel package's
reference `masked_attention` or its kernels.
"""
import functools

import jax
import jax.numpy as jnp

from adore_jax.config import ModelConfig
from adore_jax.model import lm_logits, run_layers
from pallas_kernels.reference import masked_attention


def attention_mask(length, segment_ids=None):
    """Causal (and same-segment) mask: [T] or [B,T] segment ids -> [1 or B, T_q, T_k] bool."""
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    if segment_ids is None:
        return causal[None]
    return causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def causal_attention(q, k, v, segment_ids=None):
    """Causal softmax attention within segments: -> (out [B,T,H,D], probs [B,H,T,T] float32, 0 where masked)."""
    return masked_attention(q, k, v, attention_mask(q.shape[1], segment_ids))


def full_attention(q, k, v, segment_ids=None):
    """Causal softmax attention within segments: -> (out [B,T,H,D], None)."""
    return causal_attention(q, k, v, segment_ids)[0], None


def sparse_attention(q, k, v, top_k, impl="auto"):
    """Top-K causal attention via the kernel package (no segment support: use unpacked rows,
    whose padding sits after the document, so real queries never see it)."""
    from pallas_kernels.topk_attention import topk_attention
    return topk_attention(q, k, v, top_k, impl=impl), None


def make_attention(kind: str, top_k: int = 0, segment_ids=None, impl: str = "auto"):
    """The attention function of a training config: kind "full" or "topk"."""
    if kind == "full":
        return functools.partial(full_attention, segment_ids=segment_ids)
    if kind == "topk":
        return functools.partial(sparse_attention, top_k=top_k, impl=impl)
    raise ValueError(f"attention must be 'full' or 'topk'; got {kind!r}")


def forward_hidden(params, config: ModelConfig, tokens, positions, attention, remat: bool = False):
    """tokens, positions [B,T] int32 -> (final hidden [B,T,E], per-layer aux list).

    remat: wrap each layer in `jax.checkpoint`, so the backward pass recomputes its activations
    instead of keeping them (memory O(one layer) instead of O(L layers) of [B,T,...] activations).
    """
    return run_layers(params, config, tokens, positions, lambda _, q, k, v: attention(q, k, v), remat)[:2]


def forward_logits(params, config: ModelConfig, tokens, positions, attention, remat: bool = False):
    """tokens, positions [B,T] -> logits [B,T,V] float32."""
    hidden, _ = forward_hidden(params, config, tokens, positions, attention, remat)
    return lm_logits(params, hidden)


def next_token_loss(logits, tokens, segment_ids):
    """Mean cross-entropy of next-token prediction within segments.

    logits [B,T,V], tokens, segment_ids [B,T]. Returns (loss, number of predicted tokens).
    """
    targets = tokens[:, 1:]
    weight = ((segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(weight)
    return jnp.sum(nll * weight) / jnp.maximum(count, 1.0), count
