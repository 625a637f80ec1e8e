"""Decode speed of adore-jax (full-attention cache) against transformers + torch on the same machine.

For each batch size and prompt length: prefill seconds, decode ms/step and tokens/s, compile time
(measured separately, on a warm-up call), and the same workload through transformers'
`generate` (greedy, the same token ids, exactly `new_tokens` tokens). Prints a table, writes JSON.

    python eval/bench_decode.py --out runs/bench_decode.json
"""
import argparse
import dataclasses
import json
import os
import time

import numpy as np

import adore_jax
from adore_jax import weights
from adore_jax.eval import machine


def bench_ours(model, prompts, new_tokens, repeats):
    exact = dict(max_new_tokens=new_tokens, decode_chunk=new_tokens - 1)  # one scan of exactly the steps asked
    warm = adore_jax.generate(model, prompts, **exact)
    runs = [adore_jax.generate(model, prompts, **exact).stats for _ in range(repeats)]
    best = min(runs, key=lambda s: s["ms_per_step"])
    assert best["decode_steps"] == new_tokens - 1 and best["compiles"] == 0, best
    return dict(compile_s=warm.stats["compile_s"], prefill_s=best["prefill_s"], ms_per_step=best["ms_per_step"],
                tokens_per_s=best["decode_tokens_per_s"])


def load_torch_reference(source):
    import torch
    from transformers import AutoModelForCausalLM

    path = weights.embedded_model_path(source) if source in weights.EMBEDDED_MODELS else source
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def bench_torch(model, prompts, new_tokens, repeats):
    """Decode ms/step = (time for new_tokens tokens - time for 1 token) / (new_tokens - 1)."""
    import torch

    ids = torch.tensor(np.array(prompts))
    mask = torch.ones_like(ids)

    def run(n):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    run(2)  # warm-up
    prefill = min(run(1) for _ in range(repeats))
    total = min(run(new_tokens) for _ in range(repeats))
    step = (total - prefill) / (new_tokens - 1)
    return dict(prefill_s=prefill, ms_per_step=1e3 * step, tokens_per_s=len(prompts) / step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers + torch reference")
    parser.add_argument("--out", default="runs/bench_decode.json")
    args = parser.parse_args()
    where = machine.describe()
    print(machine.summary_line(where))

    model = adore_jax.load_model(args.model)
    # Never stop early: every configuration decodes exactly new_tokens tokens.
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=()))
    reference = None if args.no_torch else load_torch_reference(args.model)
    rng = np.random.default_rng(0)
    rows = []
    header = f"{'batch':>5} {'prompt':>6} | {'ours ms/step':>12} {'tok/s':>7} {'prefill s':>9} {'compile s':>9} |" \
             f" {'torch ms/step':>13} {'tok/s':>7} {'prefill s':>9} | {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        for length in args.prompt_len:
            prompts = rng.integers(3, model.config.vocab_size, size=(batch, length)).tolist()
            row = dict(batch=batch, prompt_len=length, new_tokens=args.new_tokens,
                       ours=bench_ours(model, prompts, args.new_tokens, args.repeats))
            if reference is not None:
                row["torch"] = bench_torch(reference, prompts, args.new_tokens, args.repeats)
                row["speedup"] = row["ours"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
            rows.append(row)
            o, t = row["ours"], row.get("torch")
            line = f"{batch:>5} {length:>6} | {o['ms_per_step']:>12.1f} {o['tokens_per_s']:>7.1f} " \
                   f"{o['prefill_s']:>9.2f} {o['compile_s']:>9.1f} |"
            if t:
                line += f" {t['ms_per_step']:>13.1f} {t['tokens_per_s']:>7.1f} {t['prefill_s']:>9.2f} | " \
                        f"{row['speedup']:>7.2f}x"
            print(line, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, machine=where,
                       rows=rows), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
