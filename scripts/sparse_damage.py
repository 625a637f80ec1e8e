"""Held-out loss of a model under full and top-K attention: the top-K damage a sparse fine-tune repairs.

    python scripts/sparse_damage.py configs/finetune_smollm2_1k.yaml --models smollm2-135m smollm2-135m-adore

On the rows a fine-tune config evaluates on (its validation split, eval_batches x batch_size rows), each
model's mean next-token loss under full attention and under the config's top-K attention; prints a table
and writes JSON (--out).
"""
import argparse
import json

import jax
import numpy as np

import adore_jax
from adore_jax.train.config import FinetuneConfig, load_config
from adore_jax.train.finetune import loss_fn, row_batches
from adore_jax.train.forward import make_attention


def held_out_losses(config: FinetuneConfig, model) -> dict:
    """{"full": loss, "topk": loss}: token-weighted mean over the config's held-out rows."""
    attentions = {"full": make_attention("full"),
                  "topk": make_attention("topk", config.top_k, impl=config.kernel_impl)}
    losses = {name: jax.jit(lambda p, b, a=a: loss_fn(p, None, model.config, b, a, None)[1])
              for name, a in attentions.items()}
    totals, count = dict.fromkeys(losses, 0.0), 0.0
    for _, batch in zip(range(config.eval_batches), row_batches(config, model.tokenizer, "validation", 1, False)):
        for name, loss in losses.items():
            metrics = jax.device_get(loss(model.params, batch))
            totals[name] += float(metrics["loss"]) * float(metrics["tokens"])
        count += float(metrics["tokens"])
    return {name: total / count for name, total in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a finetune config (its data, top_k, eval_batches, batch_size)")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "smollm2-135m-adore"])
    parser.add_argument("--out", help="write the losses as JSON here")
    args = parser.parse_args()
    config = load_config(FinetuneConfig, args.config)
    results = {name: held_out_losses(config, adore_jax.load_model(name)) for name in args.models}
    print(f"| model | loss, full attention | loss, top-{config.top_k} | top-K damage (perplexity) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['full']:.4f} | {r['topk']:.4f} | {100 * (np.exp(r['topk'] - r['full']) - 1):+.1f}% |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "top_k": config.top_k, "losses": results}, f, indent=1)


if __name__ == "__main__":
    main()
