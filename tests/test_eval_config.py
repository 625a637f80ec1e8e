"""The suite config: YAML keys checked, --set overrides, policy rows; the CLI parser."""
import argparse
import os

import pytest

from adore_jax.eval import cli
from adore_jax.eval.config import eval_config, load_eval_config, policy_rows
from adore_jax.policies import H2O, Adore, Full, OracleTopK, Rebuild


def test_policy_rows_are_policy_objects_at_each_cache_size():
    rows = policy_rows(["full", "oracle_topk", {"policy": "oracle_topk", "attn_top_k": 64}, "h2o",
                        {"policy": "adore", "returns": {"type": "rebuild", "r": 8, "adaptive": True}},
                        {"policy": "adore", "returns": {"type": "rebuild", "r": 8, "into_cache": False}},
                        {"policy": "window", "cache_size": 32}], (128, 256))
    got = [(row.label, row.cache_size, row.policy) for row in rows]
    assert got[0] == ("full", None, Full())  # full does not depend on m: one row
    assert got[1:3] == [("oracle_topk", 128, OracleTopK(attn_top_k=128)),
                        ("oracle_topk", 256, OracleTopK(attn_top_k=256))]
    assert got[3] == ("oracle_topk attn_top_k=64", None, OracleTopK(attn_top_k=64))
    assert got[4] == ("h2o", 128, H2O(cache_size=128))
    assert got[6] == ("adore rebuild R=8 adaptive", 128, Adore(cache_size=128, returns=Rebuild(r=8, adaptive=True)))
    assert got[9][:2] == ("adore rebuild R=8 transient", 256) and not got[9][2].returns.into_cache
    assert got[10][:2] == ("window", None)  # its own m: one row
    with pytest.raises(ValueError, match="policy 'adore' has no option 'R'"):
        eval_config(dict(policies=[{"policy": "adore", "R": 8}]))
    with pytest.raises(ValueError, match="policy must be one of"):
        eval_config(dict(policies=["adore R=8"]))


def test_typos_name_the_closest_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache_size: [128]\n")
    with pytest.raises(ValueError, match="did you mean 'cache_sizes'"):
        load_eval_config(str(path))
    with pytest.raises(ValueError, match="did you mean 'batches'"):
        eval_config(dict(speed=dict(batchs=[1])))
    with pytest.raises(ValueError, match="unknown part"):
        eval_config(dict(parts=["perplexity", "spead"]))


def test_overrides_parse_yaml_values_and_types_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("speed: {steps: 4}\n")
    config = load_eval_config(str(path), ["cache_sizes=[64, 128]", "speed.batches=[1]", "seed=3"])
    assert config.cache_sizes == (64, 128) and config.speed.batches == (1,) and config.speed.steps == 4
    assert config.seed == 3
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        load_eval_config(str(path), ["nope.key=1"])
    with pytest.raises(ValueError, match="config key 'cache_sizes' must be a list; got 'abc'"):
        load_eval_config(str(path), ["cache_sizes=abc"])
    with pytest.raises(ValueError, match="config key 'speed.steps' must be int; got 4.5"):
        load_eval_config(str(path), ["speed.steps=4.5"])
    with pytest.raises(ValueError, match="cache_sizes must be a non-empty list of integers >= 1"):
        load_eval_config(str(path), ["cache_sizes=[sixty]"])
    path.write_text("speed: {steps: [4\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_eval_config(str(path))


def test_committed_configs_load():
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    loaded = {name: load_eval_config(os.path.join(configs, f"{name}.yaml"))
              for name in ("eval_smollm2", "eval_cpu", "eval_demo", "eval_smollm2_cpu", "eval_retrieval_cpu",
                           "eval_retrieval_contexts_cpu")}
    assert os.path.isfile(cli.DEMO_CONFIG)
    assert loaded["eval_retrieval_cpu"].parts == ("retrieval",)  # the pass-key run of issue 11 on its own
    assert "retrieval" in loaded["eval_smollm2"].parts and "retrieval" in loaded["eval_smollm2_cpu"].parts
    assert "retrieval" not in loaded["eval_cpu"].parts + loaded["eval_demo"].parts
    assert loaded["eval_smollm2"].retrieval.contexts == (1024, 2048, 4096)
    assert loaded["eval_smollm2"].retrieval.cache_sizes == (128, 256)
    grid = loaded["eval_retrieval_contexts_cpu"].retrieval  # the quality issue's grid on this CPU
    assert (grid.contexts, grid.cache_sizes) == ((1024, 2048, 4096), (128, 256))


def test_cli_subcommands_parse():
    parser = argparse.ArgumentParser(prog="adore")
    cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "configs/eval_cpu.yaml", "--set", "speed.batches=[1]"])
    assert args.run is cli.run_eval and args.set == ["speed.batches=[1]"]
    args = parser.parse_args(["demo", "--out", "runs/x"])
    assert args.run is cli.run_demo and args.out == "runs/x"
