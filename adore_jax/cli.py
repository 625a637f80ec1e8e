"""The `adore` command line.

`adore generate` prints the generated text on stdout (a `--- [i] prompt` header before each when there
are several outputs) and the finish reasons and timing on stderr, or, with `--json`, one JSON object
on stdout. Every bad value ends with one line `adore <command>: error: ...` on stderr and exit code 2.

The command line (`adore ...`, `python -m adore_jax.cli ...`; never the library on import, nor a call
of `main([...])` from Python) keeps JAX's compiled programs in a persistent cache,
so a second identical call skips compiling: $ADORE_JAX_COMPILE_CACHE, else
$XDG_CACHE_HOME/adore_jax/jax_cache (~/.cache/adore_jax/jax_cache); ADORE_JAX_NO_COMPILE_CACHE=1
turns it off, and JAX's own JAX_COMPILATION_CACHE_DIR, when set, wins.
"""
import argparse
import json
import math
import os
import sys
import warnings

from adore_jax.compile_cache import enable_compile_cache


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False, []) or the help says it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS \
                or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """A bad argument is one line, as every other bad value (argparse would print the usage block first)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("adore-jax")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _add_generate(subparsers):
    p = subparsers.add_parser("generate", help="generate text from prompts")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, .gguf file or Hugging Face directory")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="format prompts with the model's chat template")
    p.add_argument("--system", help="a system message before each prompt (implies --chat)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true",
                        help="print the first output as it is generated (the others follow when done)")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object: texts, token ids, finish reasons, stats")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per output, at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the most likely tokens up to this probability mass")
    p.add_argument("-n", "--num-samples", dest="n", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end an output before this text; repeatable")
    p.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=[], metavar="ID",
                   help="end an output at this token id; repeatable")
    p.add_argument("--logprobs", action="store_true", help="with --json: each generated token's log-probability")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling")
    p.add_argument("--decode-chunk", type=int, help="decode steps per compiled chunk (default 8; --stream shows a "
                   "chunk at a time)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and cache dtype")
    _add_cache_options(p)
    p.set_defaults(run=_run_generate)


CACHE_FLAGS = ("policy", "preset", "cache_size", "attn_top_k", "sinks", "recent")
CLI_POLICIES = ("full", "window", "streaming_llm", "h2o", "tova", "snapkv", "key_norm", "oracle_topk", "adore",
                "random")


def _add_cache_options(p):
    """Cache-policy flags; they override the keys of --config (a YAML file, see configs/policies/)."""
    from adore_jax.presets import PRESETS

    p.add_argument("--config", help="YAML file of a cache policy (configs/policies/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cache policy option of --config (e.g. cache_size=128, returns.r=16); repeatable")
    p.add_argument("--policy", choices=CLI_POLICIES, help="the scorer (default: full)")
    p.add_argument("--preset", choices=list(PRESETS), help="a recommended policy by name (adore_jax.presets)")
    p.add_argument("--cache-size", type=int, help="m: tokens kept (full: cache slots)")
    returns = p.add_mutually_exclusive_group()
    returns.add_argument("--rebuild", type=int, metavar="R", help="recompute the R best released tokens each step "
                         "(ranked by the scorer: adore)")
    returns.add_argument("--recall", type=int, metavar="R", help="each layer attends the R released tokens its query "
                         "ranks best, from a store of every token's K/V")
    p.add_argument("--attn-top-k", type=int, help="K of top-K attention (oracle_topk)")
    p.add_argument("--sinks", type=int, help="first tokens always kept")
    p.add_argument("--recent", type=int, help="most recent tokens always kept")
    p.add_argument("--controller", help="trained controller directory (adore; default: the model's)")


def cache_policy(args):
    """The cache policy of --config, its --set overrides and the cache flags."""
    from adore_jax.configfile import ConfigError, read_yaml
    from adore_jax.policies import load_policy

    if args.config and {"parts", "policies", "model"} & set(read_yaml(args.config)):
        raise ConfigError(f"--config {args.config} is an evaluation config (it has parts, policies or a model); run it "
                          f"with `adore eval {args.config}`, or give generate a cache policy (configs/policies/*.yaml)")
    options = {key: getattr(args, key, None) for key in CACHE_FLAGS}
    for kind in ("rebuild", "recall"):
        if getattr(args, kind, None) is not None:
            options["returns"] = {"type": kind, "r": getattr(args, kind)}
    return load_policy(args.config, args.overrides, **options)


REPLACEMENT_CHARACTER = "\ufffd"  # what decoding leaves for the bytes of a character not complete yet


def _stop_prefix_length(text: str, stops) -> int:
    """The length of the longest end of `text` that is the start (not the whole) of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class StreamPrinter:
    """Prints one sequence's new text after each decoded chunk, as transformers' TextStreamer does.

    - Text that ends in an incomplete character (decoding leaves U+FFFD for the bytes of a character
      whose last bytes are in a token not generated yet: emoji, CJK) is held back until it is complete.
    - Text that may be the start of a stop string is held back until it is known not to be, and
      nothing from a stop string on is printed; an end-of-sequence or stop token ends the stream.
    `finish(text)` prints what is left of the final text (the generate result's, the authority).
    """

    def __init__(self, model, stop=(), stop_token_ids=(), row: int = 0, out=None):
        self.model, self.stop, self.row = model, tuple(stop), row
        self.ends = set(model.config.eos_token_ids) | set(stop_token_ids)
        self.out = out if out is not None else sys.stdout
        self.ids, self.printed, self.finished = [], "", False

    def _emit(self, text: str) -> None:
        new = text[len(self.printed):]  # decoding a longer prefix only appends (held-back text aside)
        if new:
            self.out.write(new)
            self.out.flush()
            self.printed = text

    def __call__(self, new_tokens) -> None:
        if self.finished:
            return
        for token in new_tokens[self.row].tolist():
            if token in self.ends:
                self.finished = True
                break
            self.ids.append(token)
        text = self.model.decode(self.ids)
        cut = [text.find(stop) for stop in self.stop if stop in text]
        if cut:
            text, self.finished = text[:min(cut)], True
        if not self.finished:
            text = text.rstrip(REPLACEMENT_CHARACTER)  # an incomplete last character: wait for its other bytes
            text = text[:len(text) - _stop_prefix_length(text, self.stop)]
        self._emit(text)

    def finish(self, text: str) -> None:
        self.finished = True
        self._emit(text)


def _finite(value):
    """JSON has no NaN or infinity: None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _prompts(args) -> list:
    if args.system is None:
        return list(args.prompt)
    return [[{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
            for prompt in args.prompt]


def _label(args, out, i: int) -> str:
    prompt = " ".join(args.prompt[out.prompt_index[i]].split())
    index = f"{out.prompt_index[i]}" if args.n == 1 else f"{out.prompt_index[i]}.{i % args.n}"
    return f"--- [{index}] {prompt}"


def _run_generate(args):
    import adore_jax

    policy = cache_policy(args)  # bad options and values fail before the model loads
    if args.logprobs and not args.json:
        raise ValueError("--logprobs is shown in --json output only; add --json")
    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {args.max_new_tokens}")
    sampling = adore_jax.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, n=args.n,
                                        stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_ids),
                                        logprobs=args.logprobs)
    model = adore_jax.load_model(args.model, dtype=args.dtype)
    outputs = len(args.prompt) * args.n
    printer = None
    if args.stream:
        printer = StreamPrinter(model, sampling.stop, sampling.stop_token_ids)
        if outputs > 1:
            print(_label(args, argparse.Namespace(prompt_index=[0]), 0), flush=True)
    out = adore_jax.generate(model, _prompts(args), args.max_new_tokens, cache=policy, sampling=sampling,
                             controller=args.controller, chat=args.chat or args.system is not None, seed=args.seed,
                             stream=printer, decode_chunk=args.decode_chunk)
    if args.json:
        results = [dict(prompt=args.prompt[out.prompt_index[i]], prompt_index=out.prompt_index[i], sample=i % args.n,
                        text=out.texts[i], token_ids=out.token_ids[i], finish_reason=out.finish_reasons[i],
                        stop_reason=out.stop_reasons[i], prompt_tokens=len(out.prompt_token_ids[i]),
                        **({"logprobs": out.logprobs[i]} if out.logprobs is not None else {}))
                   for i in range(outputs)]
        print(json.dumps(_finite(dict(model=model.source, cache=out.stats["cache"], outputs=results,
                                      stats=out.stats)), ensure_ascii=False))
        return 0
    for i, text in enumerate(out.texts):
        if printer is not None and i == 0:
            printer.finish(text)
            print(flush=True)
            continue
        if outputs > 1:
            print(_label(args, out, i))
        print(text, flush=True)
    reasons = [f"{r}" + (f" ({s!r})" if s is not None else "") for r, s in zip(out.finish_reasons, out.stop_reasons)]
    finish = reasons[0] if outputs == 1 else ", ".join(f"[{i}] {r}" for i, r in enumerate(reasons))
    print(f"[finish] {finish}", file=sys.stderr)
    s = out.stats
    print(f"[timing] {s['cache']}, batch {s['batch']}, prompt tokens {s['prompt_tokens']}: "
          f"prefill {s['prefill_s']:.2f} s, "
          f"decode {s['decode_steps']} steps at {s['ms_per_step']:.1f} ms/step "
          f"({s['decode_tokens_per_s']:.1f} tokens/s), compile {s['compile_s']:.1f} s", file=sys.stderr)
    return 0


def _warning_printer(command: str, default):
    from adore_jax.session import CacheSizeWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CacheSizeWarning):
            print(f"adore {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv=None):
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": torch is not used here
    parser = _Parser(prog="adore", description="ADORE adaptive token release for JAX")
    parser.add_argument("--version", action="version", version=f"adore {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(subparsers)
    from adore_jax.eval import cli as eval_cli  # imported here: `import adore_jax.cli` stays light
    from adore_jax.train import cli as train_cli

    train_cli.add_subcommands(subparsers)
    eval_cli.add_subcommands(subparsers)
    args = parser.parse_args(argv)
    if argv is None:  # the command line itself, not a caller's main([...]) (a test, a script): cache compiles
        enable_compile_cache()
    default_show = warnings.showwarning
    warnings.showwarning = _warning_printer(args.command, default_show)
    try:
        result = args.run(args)
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__  # one line
        print(f"adore {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was printed (streamed) stays; no traceback
        sys.stdout.flush()
        print(f"\nadore {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = default_show
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
