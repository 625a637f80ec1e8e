"""Run configs: one frozen dataclass per stage, read from YAML, overridden by `--set key=value`.

Every field is validated: an unknown key is an error that names it and the closest valid keys
(difflib), so a typo never silently falls back to a default.
"""
import dataclasses
import difflib
import typing
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel axis size; -1: all devices left after fsdp and tensor
    fsdp: int = 1  # fully-sharded axis: params and optimiser state are split along it
    tensor: int = 1  # tensor-parallel axis (attention heads / MLP width)
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host pods)
    coordinator_address: Optional[str] = None  # host:port of process 0; None: auto-detect (TPU, SLURM)
    num_processes: Optional[int] = None  # None: auto-detect
    process_id: Optional[int] = None  # None: auto-detect


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3  # peak learning rate
    warmup_steps: int = 20  # linear warm-up from 0 to the peak
    schedule: str = "cosine"  # after warm-up: "cosine" (to end_fraction * peak) or "constant"
    end_fraction: float = 0.1  # cosine: final learning rate as a fraction of the peak
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float = 1.0  # clip the global gradient norm to this; 0 disables clipping


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "sharegpt"  # any adore_jax.data dataset: sharegpt, wikipedia, news, ultrachat, ...
    data_dir: Optional[str] = None  # built tfds datasets; None: $ADORE_DATA_DIR or ~/.cache/adore_jax/tfds
    seq_len: int = 512  # tokens per row; longer documents are truncated (rows are not packed)
    min_tokens: int = 64  # skip documents shorter than this
    train_sequences: int = 200  # rows taken from the train split (0: all)
    validation_sequences: int = 40  # rows taken from the validation split (0: all)
    seed: int = 0  # document shuffle seed


@dataclasses.dataclass(frozen=True)
class LabelsConfig:
    run_dir: str  # everything of this run goes here: labels/, config.yaml, metrics
    model: str = "smollm2-135m"  # load_model source: embedded name, .gguf or Hugging Face directory
    dtype: str = "float32"
    data: DataConfig = DataConfig()
    top_k: int = 32  # K: keys labelled per query
    aggregation: str = "mean"  # "mean", "max" (per-layer max) or "union" (see adore_jax.train.labels)
    eval_cache_multiples: tuple = (1, 2, 4)  # H2O baseline hits recorded at m = K * these
    batch_size: int = 1  # sequences per label pass


@dataclasses.dataclass(frozen=True)
class ControllerModelConfig:
    width: int = 128  # c: GRU state and position-embedding width
    hidden: int = 64  # h: MLP hidden width
    score_form: str = "query_aware"  # "static" or "query_aware" (ADORE.md 2)
    position_embedding: str = "sinusoidal"  # or "learned"
    max_positions: int = 8192  # learned position table size


@dataclasses.dataclass(frozen=True)
class ControllerTrainConfig:
    run_dir: str  # config.yaml, metrics.jsonl, checkpoints/, controller/, plots
    labels_dir: str  # output of `adore labels` (holds labels_meta.json)
    model: str = "smollm2-135m"  # whose frozen input embeddings the controller reads
    controller: ControllerModelConfig = ControllerModelConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    steps: int = 500
    batch_size: int = 8
    queries_per_sequence: int = 128  # queries sampled per row and step for the loss (0: all)
    positive_weight: float = 1.0  # BCE weight of label-1 pairs
    eval_every: int = 100  # held-out metrics every this many steps (and at the end)
    eval_sequences: int = 0  # held-out rows evaluated (0: all)
    log_every: int = 10
    checkpoint_every: int = 100
    max_to_keep: int = 3
    seed: int = 0
    export_dir: Optional[str] = None  # where the trained controller is saved; None: run_dir/controller


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True  # False: full fine-tuning of every weight
    rank: int = 8
    alpha: float = 16.0  # the update is (alpha / rank) * A @ B
    targets: tuple = ("wq", "wk", "wv", "wo")  # any of wq wk wv wo w_gate w_up w_down


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    run_dir: str
    model: str = "smollm2-135m"
    dtype: str = "float32"
    data: DataConfig = DataConfig()
    attention: str = "topk"  # "topk" (ADORE.md 1) or "full"
    top_k: int = 32
    kernel_impl: str = "auto"  # pallas_kernels.topk_attention impl
    remat: bool = False  # gradient checkpointing: recompute each layer's activations in the backward pass
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig(learning_rate=2e-4)
    mesh: MeshConfig = MeshConfig()
    steps: int = 100
    batch_size: int = 4
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 5
    checkpoint_every: int = 50
    max_to_keep: int = 2
    seed: int = 0
    export_dir: Optional[str] = None  # merged Hugging Face directory; None: run_dir/model


def _field_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key, valid, where):
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {(where + key)!r}{hint} (valid keys: {', '.join(sorted(valid))})")


def _convert(value, kind, where):
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} must be a mapping; got {value!r}")
        return from_dict(kind, value, prefix=where + ".")
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = [a for a in typing.get_args(kind) if a is not type(None)][0]
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where!r} must be a list; got {value!r}")
        return tuple(value)
    if kind is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-3" as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    bad_bool = kind in (int, float) and isinstance(value, bool)
    if kind in (int, float, str, bool) and (bad_bool or not isinstance(value, kind)):
        raise ConfigError(f"config key {where!r} must be {kind.__name__}; got {value!r}")
    return value


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, refusing unknown and missing keys."""
    types = _field_types(cls)
    for key in values:
        if key not in types:
            raise _unknown_key(key, list(types), prefix)
    kwargs = {key: _convert(value, types[key], prefix + key) for key, value in values.items()}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ConfigError(f"config is missing required key(s) {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def apply_override(values: dict, override: str, cls) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML) to a nested dict, checking the key."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    kind, node = cls, values
    for depth, part in enumerate(parts):
        types = _field_types(kind)
        if part not in types:
            raise _unknown_key(part, list(types), ".".join(parts[:depth]) + ("." if depth else ""))
        if depth == len(parts) - 1:
            node[part] = yaml.safe_load(raw)
        else:
            kind = types[part]
            if not dataclasses.is_dataclass(kind):
                raise ConfigError(f"config key {'.'.join(parts[:depth + 1])!r} is not a section")
            node = node.setdefault(part, {})


def load_config(cls, path: Optional[str] = None, overrides=()):
    """Read a YAML file (optional) and `key=value` overrides into dataclass `cls`."""
    values = {}
    if path is not None:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    for override in overrides:
        apply_override(values, override, cls)
    return from_dict(cls, values)


def to_dict(config) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(config))


def save_config(config, path: str) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
