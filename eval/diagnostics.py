"""Controller diagnostics: how much of the oracle's top-K attention each query could still reach.

For a document, a full-attention pass gives every query t its oracle set: the K keys with the
largest attention probability, averaged over heads, per layer (and averaged over layers for the
overall set, the controller's training target). Then the document is teacher-forced through the
policy's own prefill + decode path one step at a time; the keys query t could attend are the
cache it found (kept), the tokens rebuilt for it (ADORE, R > 0) and itself. Recall = the
fraction of the oracle set among them, averaged over queries (and layers).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.eval import metrics, sources
from adore_jax.eval.config import policy_grid
from adore_jax.session import DecodeSession
from adore_jax.train.forward import causal_attention, forward_hidden


@functools.partial(jax.jit, static_argnames=("config", "top_k", "first_query"))
def oracle_sets(params, config, tokens, *, top_k: int, first_query: int):
    """Oracle top-K keys of queries first_query..T-1 under full attention.

    tokens [B, T] -> (per_layer [B, L, T', K], overall [B, T', K]) int32 key positions, T' = T - first_query.
    """
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    def attention_with_head_mean(q, k, v):
        out, probs = causal_attention(q, k, v)  # probs [B, H, T, T]
        return out, jnp.mean(probs[:, :, first_query:], axis=1)  # aux [B, T', T]

    _, layer_probs = forward_hidden(params, config, tokens, positions, attention_with_head_mean)
    stacked = jnp.stack(layer_probs, axis=1)  # [B, L, T', T]
    per_layer = jax.lax.top_k(stacked, top_k)[1]
    overall = jax.lax.top_k(jnp.mean(stacked, axis=1), top_k)[1]
    return per_layer.astype(jnp.int32), overall.astype(jnp.int32)


def _cached_positions(cache, length):
    """[B, N] bool: positions held by a valid slot."""
    positions = np.asarray(cache.slot_positions)
    valid = np.asarray(cache.slot_valid)
    mask = np.zeros((positions.shape[0], length), bool)
    rows = np.broadcast_to(np.arange(positions.shape[0])[:, None], positions.shape)
    mask[rows[valid], positions[valid]] = True
    return mask


def attended_sets(model, tokens, prompt_length: int, options: dict) -> np.ndarray:
    """Teacher-force tokens [B, T] through a policy step by step: [B, T - P, T] bool, the keys each
    query at positions P..T-1 could attend (kept cache + the tokens its step rebuilt + itself).

    options: generate()'s `cache` and `controller` arguments."""
    batch, length = tokens.shape
    session = DecodeSession(model, [row[:prompt_length].tolist() for row in tokens], length - prompt_length,
                            options["cache"], controller=options.get("controller"))
    session.prefill()
    session.start(tokens[:, prompt_length])
    attended = np.zeros((batch, length - prompt_length, length), bool)
    for step, position in enumerate(range(prompt_length, length)):
        visible = _cached_positions(session.cache, max(session.shape.max_length, length))[:, :length]
        forced = tokens[:, position + 1:position + 2] if position + 1 < length else tokens[:, :1]
        out = session.decode(1, forced=forced)
        rebuilt = np.asarray(out.returned[:, 0])  # [B, R] positions rebuilt for this query, -1: none
        rows, picks = np.nonzero(rebuilt >= 0)
        visible[rows, rebuilt[rows, picks]] = True
        visible[:, position] = True
        attended[:, step] = visible & (np.arange(length) <= position)
    return attended


def run_diagnostics(ctx) -> dict:
    cfg = ctx.config.diagnostics
    docs = sources.part_documents(ctx, "diagnostics", cfg)
    if not len(docs):
        return dict(rows=[])
    per_layer, overall = oracle_sets(ctx.model.params, ctx.model.config, jnp.asarray(docs), top_k=cfg.top_k,
                                     first_query=cfg.prompt_length)
    per_layer, overall = np.asarray(per_layer), np.asarray(overall)

    rows = []
    for row in ctx.bar(policy_grid(ctx.config, cfg.policies, cfg.cache_sizes), "diagnostics"):
        attended = attended_sets(ctx.model, docs, cfg.prompt_length, ctx.options(row))  # [B, T', T]
        flat = attended.reshape(-1, attended.shape[-1])
        layers = [metrics.topk_recall(flat, per_layer[:, layer].reshape(-1, cfg.top_k))
                  for layer in range(per_layer.shape[1])]
        rows.append(dict(policy=row.label, cache_size=row.cache_size, rebuild=row.policy.returns.r,
                         recall=metrics.topk_recall(flat, overall.reshape(-1, cfg.top_k)),
                         recall_layer_mean=float(np.mean(layers)), recall_per_layer=layers,
                         attended_mean=float(attended.sum(-1).mean())))
    return dict(rows=rows, top_k=cfg.top_k, documents=len(docs), length=cfg.length, prompt_length=cfg.prompt_length)
