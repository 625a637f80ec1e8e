"""Run configs: one frozen dataclass per stage, read from YAML, overridden by `--set key=value`.

Read through the project's one loader (`adore_jax.configfile`): unknown keys, wrong types and bad
YAML are errors that name the key or the file.
"""
import dataclasses
from typing import Optional

from adore_jax.configfile import ConfigError, load_config, save_config  # noqa: F401  (the stages' loader)
from adore_jax.controller import ControllerConfig


def at_least(config, minimum: int, *names) -> None:
    """Refuse a count below `minimum` with an error that names the key."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or value < minimum:
            raise ConfigError(f"config key {name!r} must be >= {minimum}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel axis size; -1: all devices left after fsdp and tensor
    fsdp: int = 1  # fully-sharded axis: params and optimiser state are split along it
    tensor: int = 1  # tensor-parallel axis (attention heads / MLP width)
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host pods)
    coordinator_address: Optional[str] = None  # host:port of process 0; None: auto-detect (TPU, SLURM)
    num_processes: Optional[int] = None  # None: auto-detect
    process_id: Optional[int] = None  # None: auto-detect
    cpu_collectives: str = "gloo"  # collectives between CPU processes ("gloo" or "mpi"); TPU/GPU ignore it


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
    exclude_ids: tuple = ()  # record ids never used, e.g. those an evaluation scores (eval/sources.py lm_document_ids)
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
    levels: tuple = ()  # larger K values grading the labels: a key's target is the share of the nested top-K
    # sets (top_k, *levels) that hold it (see adore_jax.train.labels)
    horizon: int = 0  # future need over queries [t, t + horizon] (0: query t only; see adore_jax.train.labels)
    future_need: str = "union"  # with horizon > 0: "union" (any of those queries' top-K), "max" (top-K of the
    # max attention over them) or "discounted" (top-K of the attention summed with weight exp(-(t' - t) / horizon))
    aggregation: str = "mean"  # "mean", "max" (per-layer max) or "union" (see adore_jax.train.labels)
    eval_cache_multiples: tuple = (1, 2, 4)  # H2O baseline hits recorded at m = K * these
    batch_size: int = 1  # sequences per label pass


CONTROLLER_LOSSES = ("bce", "listwise")


@dataclasses.dataclass(frozen=True)
class ControllerTrainConfig:
    run_dir: str  # config.yaml, metrics.jsonl, checkpoints/, controller/, plots
    labels_dir: str  # output of `adore labels` (holds labels_meta.json)
    more_labels_dirs: tuple = ()  # more label directories trained on with it (the same target; rows padded to
    # the longest seq_len), e.g. two corpora; held-out metrics cover every directory's validation rows
    model: str = "smollm2-135m"  # whose frozen input embeddings the controller reads
    controller: ControllerConfig = ControllerConfig()  # embed_dim: left out, taken from the model
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    steps: int = 500
    batch_size: int = 8
    queries_per_sequence: int = 128  # queries sampled per row and step for the loss (0: all)
    loss: str = "bce"  # "bce" over every pair, or "listwise" (per query, -log softmax of its labels over i <= t)
    positive_weight: float = 1.0  # BCE weight of label-1 pairs
    eval_every: int = 100  # held-out metrics every this many steps (and at the end)
    eval_sequences: int = 0  # held-out rows evaluated (0: all)
    log_every: int = 10
    checkpoint_every: int = 100
    max_to_keep: int = 3
    seed: int = 0
    export_dir: Optional[str] = None  # where the trained controller is saved; None: run_dir/controller

    def __post_init__(self):
        at_least(self, 1, "steps", "batch_size", "log_every", "max_to_keep")
        at_least(self, 0, "queries_per_sequence", "eval_every", "eval_sequences", "checkpoint_every")
        if self.loss not in CONTROLLER_LOSSES:
            raise ConfigError(f"loss must be one of {CONTROLLER_LOSSES}; got {self.loss!r}")


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
    attention: str = "topk"  # "topk" (docs/design.md) or "full"
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
    adapter_dir: Optional[str] = None  # the trained LoRA adapter (a few MB); None: run_dir/adapter
    export_merged: bool = False  # also write the merged model as a Hugging Face directory (f32: ~0.5 GB for SmolLM2)
    export_dir: Optional[str] = None  # that directory; None: run_dir/model

    def __post_init__(self):
        at_least(self, 1, "steps", "batch_size", "log_every", "max_to_keep", "eval_batches", "top_k")
        at_least(self, 0, "eval_every", "checkpoint_every")
