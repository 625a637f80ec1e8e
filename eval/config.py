"""The evaluation suite's configuration: one frozen dataclass per part, every field commented.

A YAML file (configs/eval_*.yaml) holds a mapping of these fields; nested parts are mappings too.
Unknown keys are errors naming the closest valid ones. `--set part.key=value` overrides a key.
"""
import dataclasses
import re
from typing import Optional

import yaml

from adore_jax.configfile import check_keys

PARTS = ("perplexity", "generation", "streaming", "speed", "diagnostics")
POLICY_NAMES = ("full", "window", "streaming_llm", "h2o", "tova", "oracle_topk", "adore R=0", "adore R=8")
_ADORE = re.compile(r"^adore R=(\d+)( adaptive)?( transient)?$")


def policy_options(name: str, cache_size: int, oracle_k: Optional[int] = None) -> dict:
    """generate()/teacher_force() cache keyword arguments of a named policy row at cache size m.

    Names: full, window, streaming_llm, h2o, tova, oracle_topk (K = oracle_k, default m), and
    "adore R=<R>", optionally followed by " adaptive" (adaptive_rebuild) and/or " transient"
    (rebuild_into_cache=False: rebuilt tokens serve their step and leave).
    """
    if name == "full":
        return dict(policy="full")
    if name == "oracle_topk":
        return dict(policy="oracle_topk", attn_top_k=oracle_k or cache_size)
    if name in ("window", "streaming_llm", "h2o", "tova"):
        return dict(policy=name, cache_size=cache_size)
    match = _ADORE.match(name)
    if match:
        return dict(policy="adore", cache_size=cache_size, rebuild=int(match.group(1)),
                    adaptive_rebuild=bool(match.group(2)), rebuild_into_cache=not match.group(3))
    raise ValueError(f"unknown policy row {name!r}: use one of {', '.join(POLICY_NAMES)}, "
                     f"or 'adore R=<n>' followed by ' adaptive' and/or ' transient'")


def depends_on_cache_size(name: str, oracle_k: Optional[int]) -> bool:
    """Whether a row changes with m (full never does; oracle_topk only when K follows m)."""
    return name != "full" and not (name == "oracle_topk" and oracle_k)


@dataclasses.dataclass(frozen=True)
class PerplexityConfig:
    datasets: tuple = (  # each: name (wikipedia, sharegpt, news, synthetic), count, length, prompt_length
        dict(name="wikipedia", count=20, length=4096, prompt_length=1024),
        dict(name="sharegpt", count=50, length=2048, prompt_length=512))
    splits: tuple = ("test",)  # searched in order for documents of at least `length` tokens
    batch_size: int = 8  # documents teacher-forced together


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    sources: tuple = (  # sharegpt: first user turns (reference: the first answer); news/wikipedia: summaries
        dict(name="sharegpt", count=50), dict(name="news", count=20))
    splits: tuple = ("test",)
    min_prompt_tokens: int = 0  # prompts shorter than this are skipped (a cache only matters above m)
    max_prompt_tokens: int = 2048  # longer user messages / documents are cut to this many tokens
    max_new_tokens: int = 64
    batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
    conversations: int = 4  # multi-turn ShareGPT conversations (or synthetic ones)
    turns: int = 6  # user turns fed one after another
    max_turn_tokens: int = 512  # each user message / reference answer cut to this many tokens
    max_new_tokens: int = 64
    source: str = "sharegpt"  # or "synthetic"
    splits: tuple = ("test",)


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
    contexts: tuple = (1024, 2048, 4096, 8192, 16384, 32768)  # tokens already seen (synthetic cache)
    batches: tuple = (1, 4, 16)
    policies: Optional[tuple] = None  # default: the suite's policies
    cache_size: Optional[int] = None  # m for bounded policies; default: the largest of cache_sizes
    steps: int = 16  # decode steps per timed chunk
    repeats: int = 2  # timed chunks (median), after one compiling chunk
    memory_budget_gb: float = 16.0  # for the largest batch that fits: params + cache + policy state
    throughput_context: int = 8192  # context of the largest-batch throughput rows
    max_measured_batch: int = 64  # the largest batch actually timed (a CPU cannot run every fitting batch)
    beyond_model_context: bool = True  # time contexts past the model's trained context (RoPE extrapolated)


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    documents: int = 2  # Wikipedia documents (or synthetic) scored step by step
    dataset: str = "wikipedia"
    length: int = 1024  # tokens per document
    prompt_length: int = 512  # prefilled; recall is measured on the decode steps after it
    top_k: int = 64  # K of the oracle's top-K sets (<= prompt_length)
    cache_sizes: Optional[tuple] = None  # default: the suite's cache_sizes
    policies: tuple = ("window", "h2o", "adore R=0", "adore R=8")
    splits: tuple = ("test",)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = "smollm2-135m"  # embedded name, .gguf file or Hugging Face directory
    dtype: str = "float32"
    controller: Optional[str] = None  # trained controller dir; None: the model's default; "random": untrained
    out_dir: str = "runs/eval"  # results.json, report.md and the plots go here
    parts: tuple = PARTS  # which parts to run
    policies: tuple = POLICY_NAMES  # rows of every table (see policy_options)
    cache_sizes: tuple = (256, 512)  # m
    oracle_k: Optional[int] = None  # K of oracle_topk; None: K = m
    seed: int = 0
    bertscore_model: Optional[str] = None  # local encoder directory for BERTScore; None: skipped
    progress: bool = True  # progress bars on stderr
    perplexity: PerplexityConfig = PerplexityConfig()
    generation: GenerationConfig = GenerationConfig()
    streaming: StreamingConfig = StreamingConfig()
    speed: SpeedConfig = SpeedConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()


SECTIONS = {"perplexity": PerplexityConfig, "generation": GenerationConfig, "streaming": StreamingConfig,
            "speed": SpeedConfig, "diagnostics": DiagnosticsConfig}


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _build(cls, options: dict, where: str):
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(options, names, where)
    kwargs = {}
    for key, value in options.items():
        if key in SECTIONS and cls is EvalConfig:
            value = _build(SECTIONS[key], value or {}, f"{where}: {key}")
        kwargs[key] = _freeze(value)
    return cls(**kwargs)


def eval_config(options: dict, where: str = "eval config") -> EvalConfig:
    """An EvalConfig from a (nested) mapping; validates policy names, parts and sizes."""
    config = _build(EvalConfig, options, where)
    for part in config.parts:
        if part not in PARTS:
            raise ValueError(f"{where}: unknown part {part!r}; parts: {', '.join(PARTS)}")
    for name in config.policies + (config.speed.policies or ()) + config.diagnostics.policies:
        policy_options(name, 1)
    if not config.cache_sizes or min(config.cache_sizes) < 1:
        raise ValueError(f"{where}: cache_sizes must be a non-empty list of sizes >= 1")
    if config.diagnostics.top_k > config.diagnostics.prompt_length:
        raise ValueError(f"{where}: diagnostics.top_k must be <= diagnostics.prompt_length")
    return config


def apply_overrides(options: dict, overrides) -> dict:
    """Apply `key=value` / `part.key=value` strings (values parsed as YAML) to a nested mapping."""
    options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in options.items()}
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value; got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        if len(parts) > 2:
            raise ValueError(f"--set key {key!r}: at most one dot (part.key)")
        if len(parts) == 2:
            if parts[0] not in SECTIONS:
                raise ValueError(f"--set key {key!r}: {parts[0]!r} is not a part ({', '.join(SECTIONS)})")
            options.setdefault(parts[0], {})
            options[parts[0]] = {**(options[parts[0]] or {}), parts[1]: value}
        else:
            options[parts[0]] = value
    return options


def load_eval_config(path: Optional[str], overrides=()) -> EvalConfig:
    """Read a YAML suite config (or the defaults when path is None) and apply --set overrides."""
    options = {}
    if path:
        with open(path) as f:
            options = yaml.safe_load(f) or {}
        if not isinstance(options, dict):
            raise ValueError(f"{path}: expected a mapping of keys to values")
    return eval_config(apply_overrides(options, overrides), where=path or "eval config")
