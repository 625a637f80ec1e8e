"""Training for adore-jax: top-K labels, controller training, sparse LoRA fine-tuning.

    from train import LabelsConfig, ControllerTrainConfig, FinetuneConfig, load_config
    run_labels(load_config(LabelsConfig, "configs/labels_smollm2.yaml"))
    train_controller(load_config(ControllerTrainConfig, "configs/train_controller_smollm2.yaml"))
    finetune(load_config(FinetuneConfig, "configs/finetune_smollm2.yaml"))

Command line: `adore labels|train-controller|finetune CONFIG [--set key=value ...]`
(or `python -m train.cli ...`). See docs/training.md.
"""
from train.config import (ConfigError, ControllerTrainConfig, DataConfig, FinetuneConfig, LabelsConfig,
                          LoraConfig, MeshConfig, OptimConfig, load_config)
from train.controller_training import train_controller
from train.finetune import finetune
from train.labels import label_pass, run_labels
from train.lora import apply_lora, export_hf, init_lora, merge_lora
from train.sharding import make_mesh

__all__ = [
    "ConfigError", "ControllerTrainConfig", "DataConfig", "FinetuneConfig", "LabelsConfig", "LoraConfig",
    "MeshConfig", "OptimConfig", "apply_lora", "export_hf", "finetune", "init_lora", "label_pass",
    "load_config", "make_mesh", "merge_lora", "run_labels", "train_controller",
]
