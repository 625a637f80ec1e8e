"""The policy rows of the gap decomposition alone: a controller's rows on the gap documents in minutes,
without the oracles and perfect scorers that make the `gap` part take 25.

    python scripts/gap_rows.py [--config configs/eval_gap_cpu.yaml] [--set KEY=VALUE ...] [--skip N] [--perfect]
                               [--out runs/gap_rows.json]

The config's documents, cache sizes, policies and controller (the model's default when null) are used as
`adore eval` uses them. Prints perplexity and its change against full attention per row; writes them as JSON.
--skip N scores the `gap.documents` documents that follow the first N instead: with N = an evaluation's
document count (the same dataset, length and splits), documents it never scores, to choose options on.
--perfect adds, per cache size, the R = 0 rows of the perfect rankers (the current query's and the future
need at each of `gap.horizons`, scored from teacher-forced full attention as the `gap` part does): the
ceiling the controller's ranking is measured against on those documents.
"""
import argparse
import json
import os

import numpy as np

import adore_jax
from adore_jax.eval import metrics, sources
from adore_jax.eval.config import load_eval_config, policy_grid
from adore_jax.eval.gap import attention_mass, perfect_scores
from adore_jax.eval.suite import resolve_controller
from adore_jax.policies import ScoreTable


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/eval_gap_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip", type=int, default=0, help="score the documents after the first SKIP")
    parser.add_argument("--perfect", action="store_true", help="add the perfect rankers' R = 0 rows")
    parser.add_argument("--out", default="runs/gap_rows.json")
    args = parser.parse_args(argv)
    if args.skip < 0:
        parser.error(f"--skip must be >= 0; got {args.skip}")
    config = load_eval_config(args.config, args.overrides)
    gap = config.gap
    model = adore_jax.load_model(config.model)
    controller, described = resolve_controller(model, config.controller, config.seed)
    docs = sources.lm_documents(model, gap.dataset, args.skip + gap.documents, gap.length, gap.splits,
                                config.seed)[args.skip:]
    if not len(docs):
        raise SystemExit(f"gap_rows: no {gap.dataset} documents of {gap.length} tokens after the first {args.skip}")
    full = metrics.perplexity(adore_jax.teacher_force(model, docs, gap.prompt_length))
    rows = [dict(row="full", perplexity=full, perplexity_vs_full=0.0)]
    print(f"{len(docs)} {gap.dataset} documents x {gap.length} tokens, {gap.prompt_length} prefilled; "
          f"controller {described['source']}")
    print(f"{'row':<40} {'m':>5} {'perplexity':>11} {'vs full':>8}\n{'full':<40} {'-':>5} {full:>11.3f} {'+0.0%':>8}")
    def add(label, cache_size, **options):
        perplexity = metrics.perplexity(adore_jax.teacher_force(model, docs, gap.prompt_length, **options))
        change = metrics.relative_change(perplexity, full)
        rows.append(dict(row=label, cache_size=cache_size, perplexity=perplexity, perplexity_vs_full=change))
        print(f"{label:<40} {cache_size:>5} {perplexity:>11.3f} {change:>+8.1%}", flush=True)

    if args.perfect:
        mass = np.concatenate([np.asarray(attention_mass(model.params, model.config, docs[i:i + 1]))
                               for i in range(len(docs))])  # [N, T, T]
        for m in gap.cache_sizes or config.cache_sizes:
            for horizon in (None, *gap.horizons):
                target = "current query" if horizon is None else f"future need H={horizon}"
                add(f"perfect {target}, R=0", m, cache=ScoreTable(cache_size=m),
                    controller=perfect_scores(mass, horizon))
    for row in policy_grid(config, gap.policies, gap.cache_sizes):
        if row.policy.bounded:
            add(row.label, row.policy.cache_size, cache=row.policy,
                controller=controller if row.policy.needs_controller else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(config=args.config, overrides=args.overrides, skip=args.skip, controller=described,
                       documents=len(docs),
                       length=gap.length, prompt_length=gap.prompt_length, rows=rows), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
