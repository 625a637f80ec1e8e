"""`adore eval CONFIG` and `adore demo`: subcommands the main CLI adds with `add_subcommands(subparsers)`."""
import os
import textwrap

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "eval_demo.yaml")


def add_subcommands(subparsers):
    p = subparsers.add_parser("eval", help="run an evaluation suite from a config (configs/eval_*.yaml)")
    p.add_argument("config", help="YAML suite config, e.g. configs/eval_smollm2.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key (part.key for a part's key, e.g. speed.batches=[1,4]); repeatable")
    p.set_defaults(run=run_eval)
    p = subparsers.add_parser("demo", help="ADORE vs full attention on the embedded SmolLM2: outputs, perplexity, "
                                           "tokens/s (a few minutes on 2 cores)")
    p.add_argument("--model", default=None, help="model (default: the demo config's, smollm2-135m)")
    p.add_argument("--controller", default=None, help="controller directory (default: the model's committed one)")
    p.add_argument("--out", default=None, help="report directory (default: runs/demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a demo config key")
    p.set_defaults(run=run_demo)


def _summary(results):
    files = results["meta"]["files"]
    for notice in results["meta"]["notices"]:
        print(f"note: {notice}")
    print(f"report: {os.path.abspath(files['report'])}")
    print(f"results: {os.path.abspath(files['results'])}")


def run_eval(args):
    from adore_jax.eval.config import load_eval_config
    from adore_jax.eval.suite import run_suite

    results = run_suite(load_eval_config(args.config, args.set))
    _summary(results)


def run_demo(args):
    from adore_jax.eval.config import load_eval_config
    from adore_jax.eval.suite import run_suite

    overrides = list(args.set)
    for key, value in (("model", args.model), ("controller", args.controller), ("out_dir", args.out)):
        if value is not None:
            overrides.append(f"{key}={value}")
    results = run_suite(load_eval_config(DEMO_CONFIG, overrides))
    print_side_by_side(results)
    _summary(results)


def print_side_by_side(results, width: int = 100):
    """The demo's console summary: outputs of each policy per prompt, then perplexity, speed and retrieval."""
    half = (width - 3) // 2
    generation = results.get("generation") or {}
    for i, sample in enumerate(generation.get("samples") or []):
        print("=" * width)
        prompt = " ".join(sample["prompt"].split())
        print(f"[{i}] {sample['source']} ({sample['prompt_tokens']} tokens): {prompt[:width - 30]}...")
        names = list(sample["outputs"])
        for left, right in zip(names[::2], names[1::2] + [None]):
            a = textwrap.wrap(" ".join(sample["outputs"][left].split()), half) or [""]
            b = textwrap.wrap(" ".join(sample["outputs"][right].split()), half) if right else []
            print(f"{('--- ' + left):<{half}} | " + (f"--- {right}" if right else ""))
            for row in range(max(len(a), len(b))):
                print(f"{a[row] if row < len(a) else '':<{half}} | {b[row] if row < len(b) else ''}")
    print("=" * width)
    for row in (results.get("perplexity") or {}).get("rows") or []:
        m = f"m={row['cache_size']}" if row["cache_size"] else "full cache"
        delta = "" if row["perplexity_vs_full"] is None else f" ({100 * row['perplexity_vs_full']:+.1f}% vs full)"
        print(f"perplexity {row['dataset']:<10} {row['policy']:<14} {m:<10} {row['perplexity']:8.3f}{delta}")
    for row in generation.get("rows") or []:
        rouge = (row.get("vs_full") or {}).get("rougeL")
        print(f"generation {row['policy']:<14} m={row['cache_size'] or '-':<6} {row['decode_tokens_per_s']:7.1f} "
              f"tokens/s" + ("" if rouge is None else f", ROUGE-L vs full {rouge:.3f}"))
    for row in (results.get("speed") or {}).get("rows") or []:
        ratio = "" if not row["speedup_vs_full"] else f" ({row['speedup_vs_full']:.2f}x full)"
        print(f"speed      {row['policy']:<14} batch {row['batch']:<3} context {row['context']:<6} "
              f"{row['tokens_per_s']:7.1f} tokens/s{ratio}")
    for row in (results.get("retrieval") or {}).get("rows") or []:
        ratio = "" if row["accuracy_vs_full"] is None else f" ({row['accuracy_vs_full']:.2f} of full)"
        print(f"retrieval  {row['policy']:<14} m={row['cache_size'] or '-':<6} context {row['context']:<6} "
              f"{row['correct']}/{row['prompts']} keys found{ratio}")
