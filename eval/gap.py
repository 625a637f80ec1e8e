"""Gap decomposition: where a bounded cache loses perplexity against full attention.

At each m, on the same documents, every row is teacher-forced through a policy's own prefill +
decode path (the last `length - prompt_length` tokens scored), except the shared set:

  full                       the reference
  oracle per-head top-K      each query keeps its own top-m logits per head, full cache (oracle_topk)
  shared set                 each query attends one set of m tokens for all layers and heads: the top-m
                             of A[t, :], with the full cache and nothing released for good
  perfect <target> R=...     ADORE's release and rebuild (score_table) scoring with teacher-forced full
                             attention: `current` log A[t, i], `future H` log max over t' in [t, t+H] of A[t', i]
  the suite's rows           heuristics and learned controllers, as configured

A[t, i] is full attention's probability of query t on token i, averaged over heads and layers (the
statistic the labels use). The differences split the loss: the shared slot table (shared set vs
per-head oracle), permanent release (perfect future-need eviction at R=0 vs the shared set) and
ranking (a learned controller vs perfect future-need eviction).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import adore_jax
from adore_jax.eval import metrics, sources
from adore_jax.eval.config import policy_grid
from adore_jax.model import lm_logits
from adore_jax.policies import OracleTopK, Rebuild, ScoreTable
from adore_jax.policies.returns import NO_RETURN
from adore_jax.train.forward import causal_attention, forward_hidden
from adore_jax.train.labels import window_max
from pallas_kernels import kth_largest
from pallas_kernels.reference import masked_attention

FLOOR = 1e-30  # log of attention mass: a token never attended scores log(FLOOR), not -inf


@functools.partial(jax.jit, static_argnames=("config",))
def attention_mass(params, config, tokens):
    """A [B, T, T] float32: full causal attention of query t on token i, mean over heads, then layers."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def attention(q, k, v):
        out, probs = causal_attention(q, k, v)
        return out, jnp.mean(probs, axis=1)

    _, per_layer = forward_hidden(params, config, tokens, positions, attention)
    return sum(per_layer) / len(per_layer)


def perfect_scores(mass, horizon=None):
    """Scores of the perfect rankers from A [B, T, T]: the current query's (horizon None) or future need."""
    target = mass if horizon is None else np.asarray(window_max(mass, horizon))
    return np.log(np.maximum(target, FLOOR)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("config", "cache_size"))
def shared_set_logits(params, config, tokens, mass, *, cache_size: int):
    """Logits [B, T, V] when every query t attends only the top-m tokens of mass[t] (all of them while t < m)."""
    length = tokens.shape[1]
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    ranked = jnp.where(causal[None], mass, -1.0)
    kth = kth_largest(ranked, cache_size)[..., None]  # [B, T, 1]
    visible = causal[None] & (ranked >= kth)
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    hidden, _ = forward_hidden(params, config, tokens, positions,
                               lambda q, k, v: (masked_attention(q, k, v, visible)[0], None))
    return lm_logits(params, hidden)


def _scored_logprobs(logits, tokens, prompt_length):
    """log p(token t | t' < t) for t in [prompt_length, T): [B, T - P], as teacher_force returns them."""
    logp = jax.nn.log_softmax(logits[:, prompt_length - 1:-1], axis=-1)
    return np.asarray(jnp.take_along_axis(logp, tokens[:, prompt_length:, None], axis=-1)[..., 0])


def gap_rows(model, docs, prompt_length: int, cache_size: int, horizons, rebuild: int, extra_rows=(), log=print):
    """The decomposition at one m: [dict(row, kind, perplexity)], the perplexity over every scored token.

    extra_rows: (label, teacher_force keyword arguments) of further rows (heuristics, learned controllers).
    """
    tokens = jnp.asarray(docs)
    mass = np.concatenate([np.asarray(attention_mass(model.params, model.config, tokens[i:i + 1]))
                           for i in range(len(docs))])  # [N, T, T]
    rows = []

    def add(label, kind, logprobs):
        rows.append(dict(row=label, kind=kind, cache_size=cache_size, perplexity=metrics.perplexity(logprobs)))
        log(f"gap m={cache_size} {label}: {rows[-1]['perplexity']:.3f}")

    add("full", "reference", adore_jax.teacher_force(model, docs, prompt_length))
    add(f"oracle per-head top-K (K={cache_size})", "oracle",
        adore_jax.teacher_force(model, docs, prompt_length, cache=OracleTopK(attn_top_k=cache_size)))
    add(f"shared set of {cache_size}, no permanence", "oracle",
        _scored_logprobs(shared_set_logits(model.params, model.config, tokens, jnp.asarray(mass),
                                           cache_size=cache_size), tokens, prompt_length))
    for horizon in (None, *horizons):
        scores = perfect_scores(mass, horizon)
        target = "current query" if horizon is None else f"future need H={horizon}"
        for r, into_cache in ((0, True), (rebuild, False), (rebuild, True)):
            policy = ScoreTable(cache_size=cache_size, returns=Rebuild(r=r, into_cache=into_cache) if r else NO_RETURN)
            add(f"perfect {target}, R={r}" + " transient" * (r > 0 and not into_cache), "perfect",
                adore_jax.teacher_force(model, docs, prompt_length, cache=policy, controller=scores))
    for label, options in extra_rows:
        add(label, "policy", adore_jax.teacher_force(model, docs, prompt_length, **options))
    full = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_vs_full"] = metrics.relative_change(row["perplexity"], full)
    return rows


def decomposition(rows) -> dict:
    """Relative perplexity (vs full) lost to each part, from the rows of one m."""
    by = {row["row"]: row["perplexity_vs_full"] for row in rows}
    per_head = next(v for k, v in by.items() if k.startswith("oracle per-head"))
    shared = next(v for k, v in by.items() if k.startswith("shared set"))
    future = [v for k, v in by.items() if k.startswith("perfect future") and k.endswith("R=0")]
    out = dict(per_head_oracle=per_head, shared_slot_table=shared - per_head)
    if future:
        out["permanence"] = min(future) - shared
        out["perfect_future_r0"] = min(future)
    return out


def run_gap(ctx) -> dict:
    """The `gap` part of the suite."""
    cfg = ctx.config.gap
    docs = sources.part_documents(ctx, "gap", cfg)
    if not len(docs):
        return dict(rows=[])

    results = []
    for m in cfg.cache_sizes or ctx.config.cache_sizes:
        extra = [(row.label, ctx.options(row)) for row in policy_grid(ctx.config, cfg.policies, (m,))
                 if row.policy.bounded]
        rows = gap_rows(ctx.model, docs, cfg.prompt_length, m, cfg.horizons, cfg.rebuild, extra, ctx.log)
        results.append(dict(cache_size=m, rows=rows, decomposition=decomposition(rows)))
    return dict(sizes=results, documents=len(docs), length=cfg.length, prompt_length=cfg.prompt_length,
                dataset=cfg.dataset)
