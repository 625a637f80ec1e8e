"""The evaluation suite's configuration: one frozen dataclass per part, every field commented.

A YAML file (configs/eval_*.yaml) holds a mapping of these fields; nested parts are mappings too.
It is read by the project's one config loader (adore_jax.configfile): unknown keys and wrong types
are errors naming the key; `--set part.key=value` overrides a key.

Policy rows (`policies`, `speed.policies`, `diagnostics.policies`) are cache policy specs: a name
(`tova`), a preset name (`adore_recall`) or a mapping (`{policy: tova, returns: {type: recall, r: 32}}`,
`{preset: adore_recall, returns: {r: 8}}`), as
`adore_jax.make_policy` takes them. A row without a cache size runs at every m of `cache_sizes`;
its name in the report is the policy's label (e.g. "adore rebuild R=8 transient").
"""
import dataclasses
from typing import Optional

from adore_jax.configfile import ConfigError, from_dict, load_config
from adore_jax.policies import CachePolicy, make_policy

PARTS = ("perplexity", "generation", "streaming", "speed", "diagnostics", "retrieval", "ruler", "gap")
DEFAULT_PARTS = PARTS[:-2]  # RULER (its own config) and the gap decomposition (oracles, a dozen perfect-scorer rows)
# run when asked
RETRIEVAL_SOURCES = ("wikipedia", "news", "sharegpt", "synthetic")
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")  # eval/ruler_tasks.TASKS
RULER_SETTINGS = ("bounded", "compress_after_prefill")  # eval/ruler.SETTINGS
DEFAULT_POLICIES = ("full", "window", "streaming_llm", "h2o", "tova", "snapkv", "key_norm", "oracle_topk",
                    {"preset": "adore_fixed_memory"}, {"preset": "adore_recall"})


@dataclasses.dataclass(frozen=True)
class PolicyRow:
    """One row of the tables: a policy at one cache budget m (None: the row does not depend on m)."""
    label: str
    cache_size: Optional[int]
    policy: CachePolicy


def policy_rows(specs, cache_sizes) -> list:
    """The rows of `specs` at each budget of `cache_sizes`; a row that does not change with m runs once."""
    rows = []
    for spec in specs:
        policy = make_policy(spec)
        sized = [(m, policy.at_cache_size(m)) for m in cache_sizes]
        if all(p == policy for _, p in sized):
            rows.append(PolicyRow(policy.label, None, policy))
        else:
            rows += [PolicyRow(policy.label, m, p) for m, p in sized]
    return rows


def policy_grid(config: "EvalConfig", specs=None, cache_sizes=None) -> list:
    """The rows to run (PolicyRow); rows that do not depend on m run once, at m = None."""
    return policy_rows(specs or config.policies, cache_sizes or config.cache_sizes)


def batches(items, size):
    """Fixed-size batches, the last padded by repeating its first item: [(batch, real count)]."""
    out = []
    for start in range(0, len(items), size):
        batch = list(items[start:start + size])
        real = len(batch)
        batch += [batch[0]] * (size - real) if len(items) > size else []
        out.append((batch, real))
    return out


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
    policies: tuple = ("window", "h2o", {"policy": "adore"},
                       {"policy": "adore", "returns": {"type": "rebuild", "r": 8}})
    splits: tuple = ("test",)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    source: str = "wikipedia"  # haystack text: wikipedia, news, sharegpt, or synthetic (random tokens, for tests)
    splits: tuple = ("test",)  # records read in order (wrapping around) until a haystack is long enough
    contexts: tuple = (1024, 2048, 4096)  # prompt length in tokens: template + haystack + key sentence + question
    depths: tuple = (0.1, 0.5, 0.9)  # where the key sentence goes: the fraction of the haystack before it, in [0, 1]
    keys: int = 4  # prompts per (context, depth), each with its own key; haystack k starts at the k-th record
    key_digits: int = 5  # digits of each key (random, seeded by the suite's seed)
    max_new_tokens: int = 10  # greedy answer length; correct when the key's digits appear in the answer
    chat: bool = True  # wrap the prompt in the model's chat template (when it has one)
    policies: Optional[tuple] = None  # default: the suite's policies
    cache_sizes: Optional[tuple] = None  # m for bounded policies; default: the suite's cache_sizes
    batch_size: int = 8  # prompts generated together (every prompt of a context has the same length)
    max_sentence_tokens: int = 64  # longer sentences are split at words: the key's depth is exact to one piece


@dataclasses.dataclass(frozen=True)
class RulerConfig:
    tasks: tuple = RULER_TASKS  # of eval/ruler_tasks.TASKS
    contexts: tuple = (4096,)  # prompt lengths (tokens) of every task
    needle_contexts: tuple = ()  # further prompt lengths for the needle tasks (niah_*) only
    samples: int = 4  # prompts per task and context (needle depths spread over them)
    ratios: Optional[tuple] = (0.25, 0.5, 0.75, 0.875)  # compression ratios: m = (1 - ratio) x context
    cache_sizes: Optional[tuple] = None  # m instead of ratios (ratios: null)
    settings: tuple = ("bounded", "compress_after_prefill")  # of eval/ruler.SETTINGS
    policies: Optional[tuple] = None  # bounded rows (full attention always runs first); default: the suite's
    min_full_score: float = 0.2  # tasks where full attention scores less are reported but not averaged (or run)
    text_source: str = "wikipedia"  # the real-text haystacks
    splits: tuple = ("test",)
    chat: bool = True  # the model's chat template, when it has one
    batch_size: int = 4  # most prompts run together (all of a context have the same length; batches of near-equal
    # size, unpadded)


@dataclasses.dataclass(frozen=True)
class GapConfig:
    dataset: str = "wikipedia"  # documents (or synthetic, for tests)
    documents: int = 2
    length: int = 1536  # tokens per document
    prompt_length: int = 1408  # prefilled through each policy's chunked prefill; the rest scored step by step
    horizons: tuple = (64, 512)  # H of the perfect future-need rankers (the current-query ranker always runs)
    rebuild: int = 8  # R of the perfect rankers' rebuild rows (transient and into the cache)
    cache_sizes: Optional[tuple] = None  # default: the suite's cache_sizes
    policies: Optional[tuple] = None  # rows beside the oracles (bounded ones only); default: the suite's policies
    splits: tuple = ("test",)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = "smollm2-135m"  # embedded name, .gguf file or Hugging Face directory
    dtype: str = "float32"
    controller: Optional[str] = None  # trained controller dir; None: the model's default; "random": untrained
    out_dir: str = "runs/eval"  # results.json, report.md and the plots go here
    parts: tuple = DEFAULT_PARTS  # which parts to run (of PARTS)
    policies: tuple = DEFAULT_POLICIES  # rows of every table: policy names or mappings (see make_policy)
    cache_sizes: tuple = (256, 512)  # m
    seed: int = 0
    bertscore_model: Optional[str] = None  # local encoder directory for BERTScore; None: skipped
    progress: bool = True  # progress bars on stderr
    perplexity: PerplexityConfig = PerplexityConfig()
    generation: GenerationConfig = GenerationConfig()
    streaming: StreamingConfig = StreamingConfig()
    speed: SpeedConfig = SpeedConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    ruler: RulerConfig = RulerConfig()
    gap: GapConfig = GapConfig()


def _positive_ints(values) -> bool:
    return bool(values) and all(not isinstance(v, bool) and isinstance(v, int) and v >= 1 for v in values)


def _check_retrieval(cfg: RetrievalConfig, where: str) -> None:
    def fail(message):
        raise ConfigError(f"{where}: retrieval.{message}")

    if cfg.source not in RETRIEVAL_SOURCES:
        fail(f"source must be one of {', '.join(RETRIEVAL_SOURCES)}; got {cfg.source!r}")
    if not _positive_ints(cfg.contexts):
        fail(f"contexts must be a non-empty list of integers >= 1; got {cfg.contexts}")
    if not cfg.depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1
                             for d in cfg.depths):
        fail(f"depths must be a non-empty list of numbers in [0, 1]; got {cfg.depths}")
    if len(set(cfg.depths)) < len(cfg.depths):
        fail(f"depths must not repeat; got {cfg.depths}")
    for key, low, high in (("keys", 1, None), ("key_digits", 1, 18), ("max_new_tokens", 1, None),
                           ("batch_size", 1, None), ("max_sentence_tokens", 1, None)):
        value = getattr(cfg, key)
        if value < low or (high is not None and value > high):
            fail(f"{key} must be >= {low}" + (f" and <= {high}" if high else "") + f"; got {value}")
    if cfg.cache_sizes is not None and not _positive_ints(cfg.cache_sizes):
        fail(f"cache_sizes must be null or a non-empty list of integers >= 1; got {cfg.cache_sizes}")


def _check_ruler(cfg: RulerConfig, where: str) -> None:
    def fail(message):
        raise ConfigError(f"{where}: ruler.{message}")

    unknown = [t for t in cfg.tasks if t not in RULER_TASKS]
    if not cfg.tasks or unknown:
        fail(f"tasks must be a non-empty list of {', '.join(RULER_TASKS)}; got {list(cfg.tasks)}")
    if not _positive_ints(cfg.contexts) or not (cfg.needle_contexts == () or _positive_ints(cfg.needle_contexts)):
        fail(f"contexts and needle_contexts must be lists of integers >= 1; got {cfg.contexts}, {cfg.needle_contexts}")
    if (cfg.ratios is None) == (cfg.cache_sizes is None):
        fail("give exactly one of ratios and cache_sizes (the other null)")
    if cfg.ratios is not None and (not cfg.ratios or any(
            isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1 for r in cfg.ratios)):
        fail(f"ratios must be a non-empty list of numbers in (0, 1); got {cfg.ratios}")
    if cfg.cache_sizes is not None and not _positive_ints(cfg.cache_sizes):
        fail(f"cache_sizes must be a non-empty list of integers >= 1; got {cfg.cache_sizes}")
    if not cfg.settings or any(s not in RULER_SETTINGS for s in cfg.settings):
        fail(f"settings must be a non-empty list of {', '.join(RULER_SETTINGS)}; got {list(cfg.settings)}")
    if cfg.samples < 1 or cfg.batch_size < 1:
        fail(f"samples and batch_size must be >= 1; got {cfg.samples}, {cfg.batch_size}")
    if not 0 <= cfg.min_full_score <= 1:
        fail(f"min_full_score must be in [0, 1]; got {cfg.min_full_score}")


def _check(config: EvalConfig, where: str) -> EvalConfig:
    """The checks beyond types: parts, policy rows, sizes."""
    for part in config.parts:
        if part not in PARTS:
            raise ConfigError(f"{where}: unknown part {part!r}; parts: {', '.join(PARTS)}")
    if not _positive_ints(config.cache_sizes):
        raise ConfigError(f"{where}: cache_sizes must be a non-empty list of integers >= 1; got {config.cache_sizes}")
    _check_retrieval(config.retrieval, where)
    _check_ruler(config.ruler, where)
    for key, specs in (("policies", config.policies), ("speed.policies", config.speed.policies or ()),
                       ("diagnostics.policies", config.diagnostics.policies),
                       ("retrieval.policies", config.retrieval.policies or ()),
                       ("ruler.policies", config.ruler.policies or ()),
                       ("gap.policies", config.gap.policies or ())):
        if "." in key and key.split(".")[0] not in config.parts:
            continue  # a part that does not run: its defaults need not fit these cache sizes
        for spec in specs:
            try:
                policy_rows([spec], config.cache_sizes)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"{where}: {key}: row {spec!r}: {error}") from None
    if config.diagnostics.top_k > config.diagnostics.prompt_length:
        raise ConfigError(f"{where}: diagnostics.top_k must be <= diagnostics.prompt_length")
    gap = config.gap
    if not 1 <= gap.prompt_length < gap.length:
        raise ConfigError(f"{where}: gap.prompt_length must be in [1, gap.length={gap.length}); "
                          f"got {gap.prompt_length}")
    if not (_positive_ints(gap.horizons) or gap.horizons == ()) or not _positive_ints(gap.cache_sizes or (1,)):
        raise ConfigError(f"{where}: gap.horizons and gap.cache_sizes must be lists of integers >= 1")
    if isinstance(gap.rebuild, bool) or gap.rebuild < 1:
        raise ConfigError(f"{where}: gap.rebuild must be >= 1; got {gap.rebuild}")
    return config


def eval_config(options: dict, where: str = "eval config") -> EvalConfig:
    """An EvalConfig from a (nested) mapping, checked."""
    return _check(from_dict(EvalConfig, options), where)


def load_eval_config(path: Optional[str], overrides=()) -> EvalConfig:
    """Read a YAML suite config (or the defaults when path is None) and apply --set overrides."""
    return _check(load_config(EvalConfig, path, overrides), path or "eval config")
