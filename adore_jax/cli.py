"""The `adore` command line."""
import argparse
import sys


def _add_generate(subparsers):
    p = subparsers.add_parser("generate", help="generate text from prompts")
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name, .gguf file or Hugging Face directory (default: smollm2-135m)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="format prompts with the model's chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (first prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _add_cache_options(p)
    p.set_defaults(run=_run_generate)


CACHE_FLAGS = ("policy", "cache_size", "rebuild", "adaptive_rebuild", "rebuild_into_cache", "attn_top_k", "sinks",
               "recent")


def _add_cache_options(p):
    """Cache-policy flags; they override the keys of --config (a YAML file, see configs/policies/)."""
    from adore_jax.policies import POLICIES

    p.add_argument("--config", help="YAML file of a cache policy (configs/policies/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cache policy option of --config (e.g. cache_size=128); repeatable")
    p.add_argument("--policy", help=", ".join(POLICIES))
    p.add_argument("--cache-size", type=int, help="m: tokens kept (full: cache slots)")
    p.add_argument("--rebuild", type=int, help="R: released tokens rebuilt per step (adore)")
    p.add_argument("--adaptive-rebuild", action="store_const", const=True,
                   help="run the rebuild block only when a released token outranks a cached one")
    p.add_argument("--transient-rebuild", dest="rebuild_into_cache", action="store_const", const=False,
                   help="rebuilt tokens serve the current step only and never take a cache slot")
    p.add_argument("--attn-top-k", type=int, help="K of top-K attention (oracle_topk)")
    p.add_argument("--sinks", type=int, help="first tokens always kept")
    p.add_argument("--recent", type=int, help="most recent tokens always kept")
    p.add_argument("--controller", help="trained controller directory (adore; default: the model's)")


def cache_policy(args):
    """The cache policy of --config, its --set overrides and the cache flags."""
    from adore_jax.policies import load_policy

    return load_policy(args.config, args.overrides, **{key: getattr(args, key, None) for key in CACHE_FLAGS})


class _StreamPrinter:
    """Prints the newly decoded text of the first sequence after each decoded chunk."""

    def __init__(self, model):
        self.model, self.ids, self.printed = model, [], ""

    def __call__(self, new_tokens):
        eos = set(self.model.config.eos_token_ids)
        for token in new_tokens[0].tolist():
            if token in eos:
                break
            self.ids.append(token)
        text = self.model.decode(self.ids)
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def _run_generate(args):
    import adore_jax

    policy = cache_policy(args)  # bad options fail before the model loads
    sampling = adore_jax.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    model = adore_jax.load_model(args.model, dtype=args.dtype)
    printer = _StreamPrinter(model) if args.stream else None
    out = adore_jax.generate(model, args.prompt, args.max_new_tokens, cache=policy, sampling=sampling,
                             controller=args.controller, chat=args.chat, seed=args.seed, stream=printer)
    for i, (prompt, text) in enumerate(zip(args.prompt, out.texts)):
        if printer is not None and i == 0:
            print()
            continue
        print(f"--- [{i}] {prompt}\n{text}")
    s = out.stats
    print(f"[timing] {s['cache']}, batch {s['batch']}, prompt tokens {s['prompt_tokens']}: "
          f"prefill {s['prefill_s']:.2f} s, "
          f"decode {s['decode_steps']} steps at {s['ms_per_step']:.1f} ms/step "
          f"({s['decode_tokens_per_s']:.1f} tokens/s), compile {s['compile_s']:.1f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="adore", description="ADORE adaptive token release for JAX")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    from adore_jax.eval import cli as eval_cli  # imported here: `import adore_jax.cli` stays light
    from adore_jax.train import cli as train_cli

    train_cli.add_subcommands(subparsers)
    eval_cli.add_subcommands(subparsers)
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"adore {args.command}: error: {error}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
