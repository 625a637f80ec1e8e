"""Why recalling in prefill chunks (`Recall(in_prefill=True)`) can cost perplexity: what a prefill leaves, crossed.
A recalling prefill changes which tokens the cache keeps (the selection), the K/V of those cached tokens, and the
K/V in the store that decode steps recall from. This script prefills the same documents both ways (and with full
attention), then scores the same continuation (decode-time recall in every case) from pairings of them:

    python scripts/prefill_recall_probe.py [--config configs/eval_gap_cpu.yaml] [--set KEY=VALUE ...] [--skip N]
                                           [--rebuild 8] [--out runs/prefill_recall_probe.json]

A row is (selection, cached K/V, recalled K/V): the cache keeps the tokens the selection's prefill kept (with its
controller state, features and attention statistic), holding for them the K/V that the second prefill computed,
and decode steps recall from the third one's store. "full attention" K/V are the exact ones of an uncached
prefill. Every (cached, recalled) pairing is run with the decode-only selection, and each policy as it runs.
A policy's own row must equal its plain `teacher_force` (both are printed; tests/test_prefill_recall_probe.py
checks it on a tiny model). It also reports how far each store's K/V are from full attention's per layer, and how
many cached tokens the two selections share.
"""
import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import adore_jax
from adore_jax.api import continuation_logprobs
from adore_jax.eval import metrics, sources
from adore_jax.eval.config import load_eval_config
from adore_jax.eval.suite import resolve_controller
from adore_jax.policies import Adore, Recall
from adore_jax.session import DecodeSession


def prefilled(model, docs, prompt_length, policy, controller):
    """A session with every prompt token but the last consumed (the crossing point)."""
    prompts = [row[:prompt_length].tolist() for row in docs]
    session = DecodeSession(model, prompts, docs.shape[1] - prompt_length, policy, controller=controller)
    session.consume_prompts()
    return session


def with_values(cache, ps, slot_store, recall_store):
    """cache and ps with the slots' K/V taken from `slot_store` (each slot's row is the store's row at the slot's
    position) and the store the decode steps recall from replaced by `recall_store` (each a (keys, values) pair of
    a KVStore, `ps.returns`)."""
    def rows(stored):  # [B, G, N, D] -> [B, S, G, D] at the slots' positions
        index = cache.slot_positions[:, None, :, None]
        return jnp.take_along_axis(stored, jnp.clip(index, 0, stored.shape[2] - 1), axis=2).swapaxes(1, 2)

    k, v = slot_store
    cache = dataclasses.replace(cache, k=tuple(map(rows, k)), v=tuple(map(rows, v)))
    store = dataclasses.replace(ps.returns, keys=recall_store[0], values=recall_store[1])
    return cache, dataclasses.replace(ps, returns=store)


def relative_error(stored, exact, prompt_length):
    """Per layer: |stored - exact| / |exact| over the prompt tokens, stored [B, G, N, D], exact [B, S, G, D]."""
    a = np.asarray(stored)[:, :, :prompt_length - 1]
    b = np.asarray(exact)[:, :prompt_length - 1].swapaxes(1, 2)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/eval_gap_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip", type=int, default=0, help="score the documents after the first SKIP")
    parser.add_argument("--rebuild", type=int, default=8, help="R, the tokens each query recalls per layer")
    parser.add_argument("--out", default="runs/prefill_recall_probe.json")
    args = parser.parse_args(argv)
    config = load_eval_config(args.config, args.overrides)
    gap = config.gap
    model = adore_jax.load_model(config.model)
    controller, described = resolve_controller(model, config.controller, config.seed)
    docs = np.asarray(sources.lm_documents(model, gap.dataset, args.skip + gap.documents, gap.length, gap.splits,
                                           config.seed)[args.skip:])
    cache_size = (gap.cache_sizes or config.cache_sizes)[0]
    base = Adore(cache_size=cache_size, returns=Recall(r=args.rebuild, from_layer=0))
    policies = {"decode-only": base, "prefill recall": base.with_returns(in_prefill=True)}
    full = metrics.perplexity(adore_jax.teacher_force(model, docs, gap.prompt_length))
    exact = prefilled(model, docs, gap.prompt_length, "full", None).cache
    states = {}
    result = dict(config=args.config, overrides=args.overrides, skip=args.skip, controller=described,
                  documents=len(docs), length=gap.length, prompt_length=gap.prompt_length, cache_size=cache_size,
                  rebuild=args.rebuild, full=full, rows=[], kv_error={})
    print(f"{len(docs)} {gap.dataset} documents x {gap.length} tokens, {gap.prompt_length} prefilled, m = "
          f"{cache_size}, R = {args.rebuild}; full attention {full:.3f}")
    for name, policy in policies.items():
        plain = metrics.perplexity(adore_jax.teacher_force(model, docs, gap.prompt_length, cache=policy,
                                                           controller=controller))
        session = prefilled(model, docs, gap.prompt_length, policy, controller)
        states[name] = (session.cache, session.ps)
        errors = {part: [relative_error(stored[l], exact_rows[l], gap.prompt_length)
                         for l in range(model.config.num_layers)]
                  for part, stored, exact_rows in (("k", session.ps.returns.keys, exact.k),
                                                   ("v", session.ps.returns.values, exact.v))}
        result["kv_error"][name] = errors
        result["rows"].append(dict(row=f"{name}, teacher_force", perplexity=plain))
        print(f"{name}: teacher_force {plain:.3f} ({metrics.relative_change(plain, full):+.1%}); its store vs full "
              f"attention's K/V, relative error at layers 1 / 10 / 20 / 29: K "
              + " / ".join(f"{errors['k'][l]:.3f}" for l in (1, 10, 20, 29)) + ", V "
              + " / ".join(f"{errors['v'][l]:.3f}" for l in (1, 10, 20, 29)))
    kept = [set(np.asarray(c.slot_positions)[b][np.asarray(c.slot_valid)[b]]) for c, _ in states.values()
            for b in range(len(docs))]
    shared = [len(kept[b] & kept[len(docs) + b]) / len(kept[b]) for b in range(len(docs))]
    result["kept_shared"] = shared
    print("cached tokens the two selections share: " + ", ".join(f"{s:.0%}" for s in shared))
    print(f"{'selection':<16} {'cached K/V':<16} {'recalled K/V':<16} {'perplexity':>11} {'vs full':>8}")  # K/V of:
    stores = {name: (ps.returns.keys, ps.returns.values) for name, (_, ps) in states.items()}
    length = states["decode-only"][1].returns.keys[0].shape[2]

    def as_store(rows):  # full attention's cache [B, S, G, D] (slot = position) -> a store [B, G, N, D]
        rows = rows[:, :length]
        return jnp.pad(rows, ((0, 0), (0, length - rows.shape[1]), (0, 0), (0, 0))).swapaxes(1, 2)

    stores["full attention"] = tuple(tuple(map(as_store, part)) for part in (exact.k, exact.v))
    grid = [("decode-only", cached, recalled) for cached in stores for recalled in stores]
    grid += [("prefill recall", name, name) for name in policies]
    for selection, slot_values, recall_values in grid:
        cache, ps = jax.tree.map(jnp.copy, with_values(*states[selection], stores[slot_values],
                                                       stores[recall_values]))  # decoding donates them
        session = DecodeSession(model, [row[:gap.prompt_length].tolist() for row in docs],
                                docs.shape[1] - gap.prompt_length, policies[selection], controller=controller)
        session.cache, session.ps = cache, ps  # the same plan; its state replaced
        perplexity = metrics.perplexity(continuation_logprobs(session, docs, gap.prompt_length,
                                                              session.run_last_prompt_token()))
        change = metrics.relative_change(perplexity, full)
        result["rows"].append(dict(selection=selection, cached_kv=slot_values, recalled_kv=recall_values,
                                   perplexity=perplexity, perplexity_vs_full=change))
        print(f"{selection:<16} {slot_values:<16} {recall_values:<16} {perplexity:>11.3f} {change:>+8.1%}",
              flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
