"""Config-driven runs: every shipped config loads; typos and bad overrides are refused clearly."""
import argparse
import glob
import os

import pytest

from adore_jax.eval.config import load_eval_config
from adore_jax.train import cli
from adore_jax.train.config import ConfigError, ControllerTrainConfig, FinetuneConfig, LabelsConfig, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"labels": LabelsConfig, "train": ControllerTrainConfig, "finetune": FinetuneConfig}


SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))
                 + glob.glob(os.path.join(REPO, "docs", "experiments", "configs", "*.yaml")))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, REPO))
def test_shipped_configs_load(path):
    kind = os.path.basename(path).split("_")[0]
    assert kind in (*KINDS, "eval"), f"{path}: not a labels, train, finetune or eval config"
    if kind == "eval":
        load_eval_config(path)
    else:
        load_config(KINDS[kind], path)


def test_typo_names_key_and_closest_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: x\nlabels_dir: y\noptim:\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"'optim.learnin_rate'; did you mean 'learning_rate'"):
        load_config(ControllerTrainConfig, str(path))
    with pytest.raises(ConfigError, match=r"'batchsize'; did you mean 'batch_size'"):
        load_config(ControllerTrainConfig, str(path), ["batchsize=4"])
    with pytest.raises(ConfigError, match="must be int"):
        load_config(FinetuneConfig, None, ["run_dir=x", "steps=many"])
    with pytest.raises(ConfigError, match="missing required key"):
        load_config(ControllerTrainConfig, None, ["run_dir=x"])


def test_cli_subcommands_parse_and_apply_overrides(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    config = os.path.join(REPO, "configs", "train_controller_tiny.yaml")
    args = parser.parse_args(["train-controller", config, "--set", "steps=3", "--set", "optim.clip_norm=0.5"])
    assert args.run is cli.run_train_controller and args.overrides == ["steps=3", "optim.clip_norm=0.5"]
    loaded = load_config(ControllerTrainConfig, args.config, args.overrides)
    assert loaded.steps == 3 and loaded.optim.clip_norm == 0.5
    bad = parser.parse_args(["train-controller", config, "--set", "optim.clipnorm=1"])
    with pytest.raises(ConfigError, match="clip_norm"):
        bad.run(bad)
    missing = parser.parse_args(["train-controller", config, "--set", f"labels_dir={tmp_path}/none",
                                 "--set", f"run_dir={tmp_path}/run"])
    with pytest.raises(FileNotFoundError, match="labels_meta.json"):
        missing.run(missing)
    for name in ("labels", "finetune"):
        assert parser.parse_args([name, "x.yaml"]).run.__name__ == f"run_{name}"


@pytest.mark.parametrize("kind, override, message", [
    (FinetuneConfig, "steps=-5", "'steps' must be >= 1; got -5"),
    (FinetuneConfig, "batch_size=0", "'batch_size' must be >= 1; got 0"),
    (ControllerTrainConfig, "eval_every=-1", "'eval_every' must be >= 0; got -1"),
])
def test_counts_out_of_range_are_refused(kind, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(kind, None, ["run_dir=x", "labels_dir=y", override] if kind is ControllerTrainConfig
                    else ["run_dir=x", override])
