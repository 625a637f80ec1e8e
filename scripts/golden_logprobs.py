"""Teacher-forced log-probabilities of every kept cache configuration on one real document (a refactor's guard).

    python scripts/golden_logprobs.py --out tests/golden/logprobs_m128.json    # write the golden file
    python scripts/golden_logprobs.py --check tests/golden/logprobs_m128.json  # compare (atol 1e-5)

Configurations added later (key_norm, quest, tova_recall, h2o_recall) are in the file from the commit that added them.
The embedded SmolLM2-135M, the first Wikipedia test article of at least 1024 tokens: 896 tokens prefilled, the
last 128 scored one decode step at a time, every bounded policy at m = 128.
"""
import argparse
import json
import os
import sys

import numpy as np

import adore_jax
from adore_jax import presets
from adore_jax.eval import sources
from adore_jax.policies import H2O, TOVA, Adore, KeyNorm, Random, Rebuild, Recall, StreamingLLM, Window

LENGTH, PROMPT, CACHE_SIZE = 1024, 896, 128
ATOL = 1e-5

CONFIGURATIONS = {  # name -> policy at m; the golden file holds what each gave before the policy-layer redesign
    "full": lambda m: "full",
    "window": lambda m: Window(cache_size=m),
    "streaming_llm": lambda m: StreamingLLM(cache_size=m),
    "h2o": lambda m: H2O(cache_size=m),
    "tova": lambda m: TOVA(cache_size=m),
    "random": lambda m: Random(cache_size=m),
    "key_norm": lambda m: KeyNorm(cache_size=m),
    "adore": presets.adore_fixed_memory,
    "adore_paper": presets.adore_paper,
    "adore_rebuild8": lambda m: Adore(cache_size=m, returns=Rebuild(r=8)),
    "adore_adaptive": lambda m: Adore(cache_size=m, returns=Rebuild(r=8, adaptive=True)),
    "adore_transient": lambda m: Adore(cache_size=m, returns=Rebuild(r=8, into_cache=False)),
    "adore_attention_rebuild": presets.adore_attention_rebuild,
    "adore_recall": lambda m: presets.adore_recall(m, r=8),
    "adore_recall_r32": presets.adore_recall,
    "adore_recall_from10": lambda m: presets.adore_recall(m, r=8, from_layer=10),
    "adore_recall_prefill": lambda m: presets.adore_recall(m, r=8, in_prefill=True, prefill_chunk=None),
    "adore_recall_paged": lambda m: Adore(cache_size=m, prefill_chunk=1024,
                                          returns=Recall(r=8, page_size=16, pages=16)),
    "quest": presets.quest,
    "tova_recall": lambda m: TOVA(cache_size=m, prefill_chunk=1024, returns=Recall(r=32)),
    "h2o_recall": lambda m: H2O(cache_size=m, prefill_chunk=1024, returns=Recall(r=32)),
}


def document(model):
    return np.asarray(sources.lm_documents(model, "wikipedia", 1, LENGTH, ("test",)))


def logprobs(model, docs, name):
    return adore_jax.teacher_force(model, docs, PROMPT, cache=CONFIGURATIONS[name](CACHE_SIZE))[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", help="write the golden file here")
    action.add_argument("--check", help="compare against this golden file")
    parser.add_argument("--only", nargs="*", help="the configurations to run (default: all)")
    args = parser.parse_args(argv)
    model = adore_jax.load_model("smollm2-135m")
    docs = document(model)
    golden = json.load(open(args.check)) if args.check else {}
    names = args.only or list(CONFIGURATIONS)
    result, failed = {}, []
    for name in names:
        got = logprobs(model, docs, name)
        result[name] = [float(x) for x in got]
        line = f"{name:<26} mean logprob {np.mean(got):+.5f}"
        if args.check:
            if name not in golden["logprobs"]:
                line += "  (not in the golden file)"
            else:
                error = float(np.max(np.abs(got - np.asarray(golden["logprobs"][name]))))
                line += f"  max |diff| {error:.2e}"
                if error > ATOL:
                    failed.append(name)
                    line += "  CHANGED"
        print(line, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(length=LENGTH, prompt_length=PROMPT, cache_size=CACHE_SIZE, logprobs=result), f)
        print(f"wrote {args.out}")
    if failed:
        print(f"changed beyond {ATOL}: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
