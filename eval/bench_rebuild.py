"""What rebuilding costs on real text: ADORE's decode step at batch 1 with R = 0, R = 8 at every step, and R = 8
adaptive at several rebuild margins, with the rebuild block's firing rate and the perplexity each row gets.

Each row prefills the first `--context` tokens of the same long Wikipedia test articles (one at a time: batch 1),
then teacher-forces the next `--steps` tokens in compiled chunks of `--chunk` steps; the first chunk compiles and
is not timed. The adaptive rows skip the rebuild block (`lax.cond`) at steps where no released token outscores the
weakest cached one by more than the margin. Every row comes from one run: compare them as ratios to R = 0.

    python eval/bench_rebuild.py --out runs/bench_rebuild.json
"""
import argparse
import json
import os
import time

import jax
import numpy as np

import adore_jax
from adore_jax.eval import machine
from adore_jax.eval.sources import lm_documents
from adore_jax.session import DecodeSession


def run_row(model, docs, policy: dict, context: int, steps: int, chunk: int) -> dict:
    """ms/step (median timed chunk), share of decode steps that ran the rebuild block, perplexity of the forced
    tokens, over every document."""
    chunk_ms, fired, logprobs = [], 0, []
    for doc in docs:
        session = DecodeSession(model, [doc[:context].tolist()], steps + 1, policy)
        first = jax.nn.log_softmax(session.prefill()[0])[doc[context]]
        logprobs.append(float(first))
        session.start(doc[context:context + 1])
        forced = doc[context + 1:context + 1 + steps][None]  # [1, steps]
        for start in range(0, steps, chunk):
            began = time.perf_counter()
            out = jax.block_until_ready(session.decode(chunk, forced=forced[:, start:start + chunk]))
            if start:  # the first chunk compiles
                chunk_ms.append(1e3 * (time.perf_counter() - began))
            logprobs.extend(np.asarray(out.forced_logprobs[0]).tolist())
        fired += int(session.ps.return_steps)
    # the prompt's last token ran as a decode step too (DecodeSession.prefill, R > 0): steps + 1 per document
    return dict(ms_per_step=float(np.median(chunk_ms)) / chunk, fired=fired / (len(docs) * (steps + 1)),
                perplexity=float(np.exp(-np.mean(logprobs))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=2, help="Wikipedia test articles, each run at batch 1")
    parser.add_argument("--context", type=int, default=7936, help="prompt tokens prefilled (+ steps + 1 <= 8192)")
    parser.add_argument("--steps", type=int, default=128, help="teacher-forced decode steps after the prompt")
    parser.add_argument("--chunk", type=int, default=16, help="decode steps per compiled chunk")
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--rebuild", type=int, default=8)
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--into-cache", action="store_true", help="rebuilt tokens compete for the cache "
                        "(default: transient, the evaluation's best)")
    parser.add_argument("--out", default="runs/bench_rebuild.json")
    args = parser.parse_args()
    where = machine.describe()
    print(machine.summary_line(where))
    if args.steps % args.chunk or args.steps < 2 * args.chunk:
        parser.error(f"--steps must be a multiple of --chunk, at least 2 chunks; got {args.steps} and {args.chunk}")

    model = adore_jax.load_model(args.model)
    docs = lm_documents(model, "wikipedia", args.docs, args.context + args.steps + 1)
    if len(docs) < args.docs:
        parser.error(f"--docs: only {len(docs)} Wikipedia test articles hold {args.context + args.steps + 1} tokens")
    base = dict(policy="adore", cache_size=args.cache_size)
    rebuild = dict(type="rebuild", r=args.rebuild, into_cache=args.into_cache)
    rows = {"adore R=0": base, f"R={args.rebuild} every step": dict(base, returns=rebuild)}
    rows.update({f"R={args.rebuild} adaptive margin {m:g}": dict(base, returns=dict(rebuild, adaptive=True, margin=m))
                 for m in args.margins})
    results = []
    print(f"{'policy':<28} {'ms/step':>8} {'x R=0':>6} {'fired':>6} {'ppl':>8}")
    for name, policy in rows.items():
        row = dict(policy=name, options=policy, **run_row(model, docs, policy, args.context, args.steps, args.chunk))
        row["vs_r0"] = row["ms_per_step"] / results[0]["ms_per_step"] if results else 1.0
        results.append(row)
        print(f"{name:<28} {row['ms_per_step']:>8.1f} {row['vs_r0']:>6.2f} {100 * row['fired']:>5.0f}% "
              f"{row['perplexity']:>8.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(vars(args), machine=where, rows=results), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
