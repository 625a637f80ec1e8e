"""Shared fixtures: tiny random Hugging Face checkpoints and the real SmolLM2 model."""
import gc
import json
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=97, hidden_size=64,
    intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, hidden_act="silu",
)


def save_tiny_hf(directory, overrides=None, seed=0, max_shard_size=None):
    """Save a random transformers model of a tiny config; returns (directory, torch model)."""
    import torch
    import transformers

    cfg = {**TINY_LLAMA, **(overrides or {})}
    arch = cfg["architectures"][0]
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config}[arch]
    torch.manual_seed(seed)
    config = config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # non-trivial norms, so a missing or misplaced norm weight shows up
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(directory, **kwargs)
    return str(directory), model


@pytest.fixture(autouse=True, scope="module")
def free_compiled_programs():
    """Drop every compiled program after each test module.

    XLA:CPU maps memory for each program it compiles (about 3.5 mappings each). The suite compiles
    enough of them to pass the kernel's vm.max_map_count (65530), and the compiler then segfaults.
    """
    yield
    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    directory, _ = save_tiny_hf(tmp_path_factory.mktemp("tiny_llama"))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import adore_jax
    return adore_jax.load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2():
    import adore_jax
    return adore_jax.load_model("smollm2-135m")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
