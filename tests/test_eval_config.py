"""The suite config: YAML keys checked, --set overrides, policy rows; the CLI parser."""
import argparse
import os

import pytest

from adore_jax.eval import cli
from adore_jax.eval.config import apply_overrides, eval_config, load_eval_config, policy_options


def test_policy_rows():
    assert policy_options("full", 256) == dict(policy="full")
    assert policy_options("oracle_topk", 256) == dict(policy="oracle_topk", attn_top_k=256)
    assert policy_options("oracle_topk", 256, oracle_k=64)["attn_top_k"] == 64
    assert policy_options("h2o", 128) == dict(policy="h2o", cache_size=128)
    assert policy_options("adore R=8 adaptive", 256) == dict(policy="adore", cache_size=256, rebuild=8,
                                                             adaptive_rebuild=True, rebuild_into_cache=True)
    assert policy_options("adore R=8 transient", 512) == dict(policy="adore", cache_size=512, rebuild=8,
                                                              adaptive_rebuild=False, rebuild_into_cache=False)
    with pytest.raises(ValueError, match="unknown policy row"):
        policy_options("adore R=x", 256)


def test_typos_name_the_closest_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache_size: [128]\n")
    with pytest.raises(ValueError, match="did you mean cache_sizes"):
        load_eval_config(str(path))
    with pytest.raises(ValueError, match="did you mean batches"):
        eval_config(dict(speed=dict(batchs=[1])))
    with pytest.raises(ValueError, match="unknown part"):
        eval_config(dict(parts=["perplexity", "spead"]))


def test_overrides_parse_yaml_values():
    options = apply_overrides({"speed": {"steps": 4}}, ["cache_sizes=[64, 128]", "speed.batches=[1]", "seed=3"])
    config = eval_config(options)
    assert config.cache_sizes == (64, 128) and config.speed.batches == (1,) and config.speed.steps == 4
    assert config.seed == 3
    with pytest.raises(ValueError, match="not a part"):
        apply_overrides({}, ["nope.key=1"])


def test_committed_configs_load():
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    for name in ("eval_smollm2", "eval_cpu", "eval_demo"):
        load_eval_config(os.path.join(configs, f"{name}.yaml"))
    assert os.path.isfile(cli.DEMO_CONFIG)


def test_cli_subcommands_parse():
    parser = argparse.ArgumentParser(prog="adore")
    cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "configs/eval_cpu.yaml", "--set", "speed.batches=[1]"])
    assert args.run is cli.run_eval and args.set == ["speed.batches=[1]"]
    args = parser.parse_args(["demo", "--out", "runs/x"])
    assert args.run is cli.run_demo and args.out == "runs/x"
