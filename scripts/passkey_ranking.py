"""Which layer's attention finds a pass key's next digit: the ceiling of `Rebuild(ranked_by="attention")` per layer.

    python scripts/passkey_ranking.py [--config configs/eval_retrieval_cpu.yaml] [--set KEY=VALUE ...] [--top 8]

Full attention answers every prompt of the retrieval part (greedy); then, teacher-forced on that answer,
at each answer step that emits one of the key's digits, the released-token ranking `Rebuild(ranked_by="attention")`
uses (a query's logit against every earlier key at one layer, max over heads) ranks the key sentence's token
that the step copies among every position before the question. Printed per layer: the fraction of those
steps at which it is in the top `--top` (what an R = top rebuild would bring back), for the step's own query
(lag 0) and for the previous token's query (lag 1: what a decode step has when it picks its rebuild block).
With full context on both sides this is an upper bound for a bounded cache, whose queries and keys saw less.
"""
import argparse

import jax.numpy as jnp
import numpy as np

import adore_jax
from adore_jax.eval import retrieval
from adore_jax.eval.config import load_eval_config
from adore_jax.model import run_layers
from adore_jax.train.forward import full_attention


def queries_and_keys(model, ids):
    """Every layer's RoPE'd queries [T, H, D] and keys [T, G, D] of one sequence under full attention."""
    def attend(_, q, k, v):
        return full_attention(q, k, v)[0], (q[0], k[0])

    positions = jnp.arange(len(ids))[None]
    _, per_layer, _ = run_layers(model.params, model.config, jnp.asarray([ids]), positions, attend)
    return [np.asarray(q) for q, _ in per_layer], [np.asarray(k) for _, k in per_layer]


def copied_rank(query, keys, candidates, targets):
    """The best rank among `targets` when the first `candidates` positions are ranked by max over heads of q . k.

    query [H, D]; keys [T, G, D] (query head h reads KV head h // (H / G))."""
    group = query.shape[0] // keys.shape[1]
    logits = np.einsum("hd,thd->ht", query, np.repeat(keys[:candidates], group, axis=1)).max(axis=0)  # [T']
    order = np.argsort(-logits, kind="stable")
    return min(int(np.flatnonzero(order == target)[0]) for target in targets)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/eval_retrieval_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=8, help="the rebuild budget R a rank must be within")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be >= 1; got {args.top}")
    config = load_eval_config(args.config, args.overrides)
    model = adore_jax.load_model(config.model)
    prompts = retrieval.build_prompts(model, config.retrieval, config.seed)
    answers = adore_jax.generate(model, [p.ids for p in prompts], config.retrieval.max_new_tokens, policy="full")
    layers = model.config.num_layers
    hits = {lag: [[] for _ in range(layers)] for lag in (0, 1)}
    for prompt, answer in zip(prompts, answers.token_ids):
        ids = list(prompt.ids) + list(answer)
        queries, keys = queries_and_keys(model, ids)
        key_end = prompt.key_start + prompt.key_tokens  # the question comes after: not a candidate
        for t in range(len(prompt.ids) - 1, len(ids) - 1):  # the query at t emits ids[t + 1]
            targets = [i for i in range(prompt.key_start, key_end)
                       if ids[i] == ids[t + 1] and model.decode([ids[i]]).strip().isdigit()]
            if not targets:
                continue
            for lag in (0, 1):
                for layer in range(layers):
                    rank = copied_rank(queries[layer][t - lag], keys[layer], key_end, targets)
                    hits[lag][layer].append(rank < args.top)
    steps = len(hits[0][0])
    print(f"{len(prompts)} prompts, {steps} answer steps that copy a digit; fraction with the digit in the top "
          f"{args.top} of the attention ranking")
    print(f"{'layer':>5} {'own query':>10} {'previous query':>15}")
    for layer in range(layers):
        print(f"{layer:>5} {np.mean(hits[0][layer]):>10.2f} {np.mean(hits[1][layer]):>15.2f}")


if __name__ == "__main__":
    main()
