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

from adore_jax import api, decode
from adore_jax import controller as ctrl
from adore_jax.eval import metrics, sources
from adore_jax.train.forward import attend, attention_probs, forward_hidden


@functools.partial(jax.jit, static_argnames=("config", "top_k", "first_query"))
def oracle_sets(params, config, tokens, *, top_k: int, first_query: int):
    """Oracle top-K keys of queries first_query..T-1 under full attention.

    tokens [B, T] -> (per_layer [B, L, T', K], overall [B, T', K]) int32 key positions, T' = T - first_query.
    """
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    def attention_with_head_mean(q, k, v):
        probs = attention_probs(q, k)  # [B, H, T, T]
        return attend(probs, v), jnp.mean(probs[:, :, first_query:], axis=1)  # aux [B, T', T]

    _, layer_probs = forward_hidden(params, config, tokens, positions, attention_with_head_mean)
    stacked = jnp.stack(layer_probs, axis=1)  # [B, L, T', T]
    per_layer = jax.lax.top_k(stacked, top_k)[1]
    overall = jax.lax.top_k(jnp.mean(stacked, axis=1), top_k)[1]
    return per_layer.astype(jnp.int32), overall.astype(jnp.int32)


_score = jax.jit(ctrl.score, static_argnums=0)


def _cached_positions(cache, length):
    """[B, N] bool: positions held by a valid slot."""
    positions = np.asarray(cache.slot_positions)
    valid = np.asarray(cache.slot_valid)
    mask = np.zeros((positions.shape[0], length), bool)
    rows = np.broadcast_to(np.arange(positions.shape[0])[:, None], positions.shape)
    mask[rows[valid], positions[valid]] = True
    return mask


def _rebuilt(prep, ps, kept, position: int):
    """The R released tokens the step at `position` rebuilt (decode._decode_block's choice): [B, N] bool."""
    cfg = prep.plan.cache
    n = kept.shape[1]
    scores = np.asarray(_score(prep.plan.controller, prep.cparams, ps.features, jnp.arange(n), ps.controller_state,
                               jnp.full((kept.shape[0],), position, jnp.int32)))
    released = (np.arange(n)[None, :] < position) & ~kept
    masked = np.where(released, scores, -np.inf)
    picked = np.argsort(-masked, axis=1, kind="stable")[:, :cfg.rebuild]
    picked_scores = np.take_along_axis(masked, picked, axis=1)
    wanted = picked_scores > -np.inf
    if cfg.adaptive_rebuild:
        weakest = np.min(np.where(kept, scores, np.inf), axis=1, keepdims=True)
        wanted &= picked_scores > weakest
    mask = np.zeros_like(kept)
    rows = np.broadcast_to(np.arange(kept.shape[0])[:, None], picked.shape)
    mask[rows[wanted], picked[wanted]] = True
    return mask


def attended_sets(model, tokens, prompt_length: int, options: dict) -> np.ndarray:
    """Teacher-force tokens [B, T] through a policy step by step: [B, T - P, T] bool, the keys each
    query at positions P..T-1 could attend (kept cache + rebuilt + itself)."""
    batch, length = tokens.shape
    options = dict(options)
    controller = options.pop("controller", None)
    cache_cfg = api._cache_config(**{k: options.get(k, d) for k, d in dict(
        policy="full", cache_size=None, rebuild=0, adaptive_rebuild=False, attn_top_k=None, sinks=0, recent=0,
        cache_update="scatter", rebuild_into_cache=True).items()})
    prep = api._prepare(model, [row[:prompt_length].tolist() for row in tokens], length - prompt_length, cache_cfg,
                        controller, None, None, "auto")
    _, cache, ps = api._prefill(model, prep)
    n = ps.token_ids.shape[1] if prep.plan.cache.policy == "adore" else length
    state = decode.DecodeState(token=jnp.asarray(tokens[:, prompt_length]),
                               position=jnp.full((batch,), prompt_length, jnp.int32),
                               done=jnp.zeros((batch,), bool), key=jax.random.key(0))
    attended = np.zeros((batch, length - prompt_length, length), bool)
    for step, position in enumerate(range(prompt_length, length)):
        kept = _cached_positions(cache, max(n, length))
        forced = tokens[:, position + 1:position + 2] if position + 1 < length else tokens[:, :1]
        _, cache, ps, state = decode.decode(model.params, prep.cparams, cache, ps, state, 1.0, 0, 1.0,
                                            jnp.asarray(forced), plan=prep.plan, num_steps=1, greedy=True,
                                            pad_id=model.pad_id)
        visible = kept.copy()
        if prep.plan.cache.policy == "adore" and prep.plan.cache.rebuild:
            visible |= _rebuilt(prep, ps, kept, position)
        visible[:, position] = True
        attended[:, step] = visible[:, :length] & (np.arange(length) <= position)
    return attended


def run_diagnostics(ctx) -> dict:
    cfg = ctx.config.diagnostics
    docs = sources.lm_documents(ctx.model, cfg.dataset, cfg.documents, cfg.length, cfg.splits, ctx.config.seed)
    if not len(docs):
        ctx.notices.append(f"diagnostics: no {cfg.dataset} document of >= {cfg.length} tokens")
        return dict(rows=[])
    per_layer, overall = oracle_sets(ctx.model.params, ctx.model.config, jnp.asarray(docs), top_k=cfg.top_k,
                                     first_query=cfg.prompt_length)
    per_layer, overall = np.asarray(per_layer), np.asarray(overall)
    from adore_jax.eval.suite import policy_grid

    rows = []
    for name, m in ctx.bar(policy_grid(ctx.config, cfg.policies, cfg.cache_sizes), "diagnostics"):
        attended = attended_sets(ctx.model, docs, cfg.prompt_length, ctx.options(name, m))  # [B, T', T]
        flat = attended.reshape(-1, attended.shape[-1])
        layers = [metrics.topk_recall(flat, per_layer[:, layer].reshape(-1, cfg.top_k))
                  for layer in range(per_layer.shape[1])]
        options = ctx.options(name, m)
        rows.append(dict(policy=name, cache_size=m, rebuild=options.get("rebuild", 0),
                         recall=metrics.topk_recall(flat, overall.reshape(-1, cfg.top_k)),
                         recall_layer_mean=float(np.mean(layers)), recall_per_layer=layers,
                         attended_mean=float(attended.sum(-1).mean())))
    return dict(rows=rows, top_k=cfg.top_k, documents=len(docs), length=cfg.length, prompt_length=cfg.prompt_length)
