"""A small real-text run: SmolLM2 labels on news, a controller whose loss falls and whose held-out
top-K recall beats recency (about a minute on 2 cores)."""
import json
import os

import pytest

from adore_jax.train import labels
from adore_jax.train.config import ControllerTrainConfig, DataConfig, LabelsConfig, load_config
from adore_jax.train.controller_training import train_controller

pytestmark = pytest.mark.e2e  # trains on real text: make test-slow


@pytest.mark.slow
def test_controller_beats_recency_on_real_text(tmp_path, smollm2):
    label_config = LabelsConfig(run_dir=str(tmp_path / "labels"), top_k=8, batch_size=4, data=DataConfig(
        dataset="news", seq_len=128, min_tokens=128, train_sequences=24, validation_sequences=8))
    labels.run_labels(label_config, smollm2)
    config = load_config(ControllerTrainConfig, None, [
        f"run_dir={tmp_path / 'run'}", f"labels_dir={tmp_path / 'labels'}", "steps=150", "batch_size=8",
        "eval_every=0", "log_every=5", "checkpoint_every=0", "queries_per_sequence=64",
        "controller.width=64", "controller.hidden=64", "optim.learning_rate=3e-3", "optim.warmup_steps=10"])
    summary = train_controller(config, model=smollm2)
    with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:2]) / 2
    for m in ("1K", "2K"):
        assert summary[f"eval_recall_controller@m={m}"] > summary[f"eval_recall_recency@m={m}"], summary
