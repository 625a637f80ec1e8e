"""Parity of the JAX model with transformers' torch models on tiny random checkpoints."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import save_tiny_hf

import adore_jax
from adore_jax.model import forward

CASES = {
    "gqa_untied": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3": dict(rope_theta=500000.0, max_position_embeddings=512, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2_qkv_bias": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=1),
    "head_dim_override": dict(head_dim=32),
}


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    directory, reference = save_tiny_hf(tmp_path, CASES[case], seed=hash(case) % 1000)
    model = adore_jax.load_model(directory)
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 200)).astype(np.int32)
    ours = np.asarray(forward(model.params, model.config, tokens))
    diff = np.max(np.abs(ours - _torch_logits(reference, tokens)))
    assert diff <= 1e-4, f"{case}: max |logit difference| {diff:.2e}"


def test_old_and_new_rope_config_formats_agree(tmp_path):
    """transformers 5 writes `rope_parameters`; older configs have top-level rope_theta + rope_scaling."""
    directory, reference = save_tiny_hf(tmp_path, dict(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    new = adore_jax.load_model(directory)
    del cfg["rope_parameters"]
    cfg.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    old = adore_jax.load_model(directory)
    assert old.config == new.config and old.config.rope_scaling.factor == 4.0
    tokens = np.arange(120, dtype=np.int32)[None] % 97
    diff = np.max(np.abs(np.asarray(forward(old.params, old.config, tokens)) - _torch_logits(reference, tokens)))
    assert diff <= 1e-4


def test_sharded_safetensors_load(tmp_path):
    directory, reference = save_tiny_hf(tmp_path, max_shard_size="20KB")
    import glob
    assert len(glob.glob(f"{directory}/*.safetensors")) > 1, "the checkpoint did not shard"
    model = adore_jax.load_model(directory)
    tokens = np.arange(40, dtype=np.int32)[None] % 97
    diff = np.max(np.abs(np.asarray(forward(model.params, model.config, tokens)) - _torch_logits(reference, tokens)))
    assert diff <= 1e-4
