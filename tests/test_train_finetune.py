"""Sparse fine-tuning end to end on a tiny model, and LoRA adapters saved beside their base model."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adore_jax
from adore_jax.adapters import read_adapter, save_adapter
from adore_jax.model import forward
from adore_jax.train import lora
from adore_jax.train.config import FinetuneConfig, load_config
from adore_jax.train.finetune import finetune
from adore_jax.train.loop import read_metrics
from adore_jax.train.testing import tiny_model


def _config(run_dir, *overrides):
    return load_config(FinetuneConfig, None, [
        f"run_dir={run_dir}", "model=tiny", "data.dataset=news", "data.seq_len=48", "data.min_tokens=48",
        "top_k=8", "lora.rank=4", "lora.alpha=8", "steps=10", "batch_size=2", "log_every=1", "eval_every=5",
        "eval_batches=2", "checkpoint_every=4", "optim.learning_rate=3e-3", "optim.warmup_steps=2", *overrides])


def _steps(run_dir):
    return {r["step"]: (r["data_digest"], r["loss"]) for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if "data_digest" in r}


def test_finetune_lowers_the_top_k_loss_and_resumes_exactly_after_a_kill(tmp_path):
    model = tiny_model()
    whole = finetune(_config(tmp_path / "whole"), model=model)
    evals = [r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "eval_loss" in r]
    held_out = [r["eval_loss"] for r in evals]
    assert len(held_out) == 3  # steps 0 (the base model), 5 and 10
    assert held_out[-1] < held_out[0] - 0.05, held_out
    assert all(abs(r["eval_loss_full"] - r["eval_loss"]) > 1e-3 for r in evals)  # full attention, K = 8 of 48
    assert sorted(os.listdir(tmp_path / "whole")) == ["adapter", "checkpoints", "config.yaml", "loss.png",
                                                      "metrics.jsonl", "summary.json"]  # no merged model by default
    assert whole["adapter_dir"] == str(tmp_path / "whole" / "adapter")

    killed = _config(tmp_path / "killed")
    assert finetune(killed, stop_after=6, model=model) == {"stopped_at": 6}
    finetune(killed, model=model)  # resumes from the checkpoint at step 4
    assert _steps(tmp_path / "killed") == _steps(tmp_path / "whole")
    _, a = read_adapter(str(tmp_path / "whole" / "adapter"))
    _, b = read_adapter(str(tmp_path / "killed" / "adapter"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_merged_export_only_when_asked(tmp_path):
    out = finetune(_config(tmp_path / "run", "steps=2", "eval_every=0", "export_merged=true"), model=tiny_model())
    assert os.path.isfile(os.path.join(out["export_dir"], "model.safetensors"))


def _adapter(params, targets=("wq", "wv", "w_up")):
    adapters = lora.init_lora(params, 4, targets, jax.random.key(1))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)


def test_adapter_round_trip_equals_the_merged_and_the_unmerged_model(tmp_path, tiny_model_dir):
    base = adore_jax.load_model(tiny_model_dir)
    adapters = _adapter(base.params)
    save_adapter(str(tmp_path / "adapter"), adapters, base=tiny_model_dir, alpha=8.0)
    loaded = adore_jax.load_model(tiny_model_dir, adapter=str(tmp_path / "adapter"))
    tokens = jnp.arange(2, 30)[None]
    got = np.asarray(forward(loaded.params, loaded.config, tokens))
    merged = np.asarray(forward(lora.merge_lora(base.params, adapters, 2.0), base.config, tokens))
    unmerged = np.asarray(forward(lora.apply_lora(base.params, adapters, 2.0), base.config, tokens))
    np.testing.assert_allclose(got, merged, atol=1e-5)
    np.testing.assert_allclose(got, unmerged, atol=1e-5)
    assert np.max(np.abs(got - np.asarray(forward(base.params, base.config, tokens)))) > 1e-3
    out = adore_jax.generate(loaded, [[5, 6, 7]], 4, cache=adore_jax.Window(cache_size=8))
    assert len(out.token_ids[0]) == 4


def test_bad_adapters_are_refused_with_the_reason(tmp_path, tiny_model_dir):
    base = adore_jax.load_model(tiny_model_dir)
    other = save_adapter(str(tmp_path / "other"), _adapter(base.params), base="smollm2-135m", alpha=8.0)
    with pytest.raises(ValueError, match="was trained on base model 'smollm2-135m', not on"):
        adore_jax.load_model(tiny_model_dir, adapter=other)
    good = save_adapter(str(tmp_path / "good"), _adapter(base.params), base=tiny_model_dir, alpha=8.0)
    with open(os.path.join(good, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(good, "adapter_config.json"), "w") as f:
        json.dump({**config, "rank": 8}, f)
    with pytest.raises(ValueError, match="has rank 4x4, but adapter_config.json says rank 8"):
        adore_jax.load_model(tiny_model_dir, adapter=good)
    os.remove(os.path.join(good, "adapter.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing adapter.safetensors"):
        adore_jax.load_model(tiny_model_dir, adapter=good)
    wide = save_adapter(str(tmp_path / "wide"), _adapter(tiny_model().params, ("wq",)), base=tiny_model_dir,
                        alpha=8.0)
    with pytest.raises(ValueError, match=r"target 'wq' is \[32, 32\] in the adapter"):
        adore_jax.load_model(tiny_model_dir, adapter=wide)
