"""Training for adore-jax: top-K labels, controller training, sparse LoRA fine-tuning.

    from adore_jax.train import LabelsConfig, ControllerTrainConfig, FinetuneConfig, load_config
    run_labels(load_config(LabelsConfig, "configs/labels_smollm2.yaml"))
    train_controller(load_config(ControllerTrainConfig, "configs/train_controller_smollm2.yaml"))
    finetune(load_config(FinetuneConfig, "configs/finetune_smollm2.yaml"))

Command line: `adore labels|train-controller|finetune CONFIG [--set key=value ...]`
(or `python -m adore_jax.train.cli ...`). See docs/training.md.
"""
from adore_jax.train.config import (
                                    ConfigError,
                                    ControllerTrainConfig,
                                    DataConfig,
                                    FinetuneConfig,
                                    LabelsConfig,
                                    LoraConfig,
                                    MeshConfig,
                                    OptimConfig,
                                    load_config,
)
from adore_jax.train.controller_training import train_controller
from adore_jax.train.finetune import finetune
from adore_jax.train.labels import label_pass, run_labels
from adore_jax.train.lora import apply_lora, export_hf, init_lora, merge_lora
from adore_jax.train.sharding import make_mesh

__all__ = [
    "ConfigError", "ControllerTrainConfig", "DataConfig", "FinetuneConfig", "LabelsConfig", "LoraConfig",
    "MeshConfig", "OptimConfig", "apply_lora", "export_hf", "finetune", "init_lora", "label_pass",
    "load_config", "make_mesh", "merge_lora", "run_labels", "train_controller",
]
