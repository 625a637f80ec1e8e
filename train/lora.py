"""LoRA adapters for the Llama params pytree, their merge, and a Hugging Face export.

A target weight W [in, out] gets the low-rank update (alpha / rank) * A @ B, A [in, r], B [r, out],
B initialised to zero (so training starts from the base model). `apply_lora` puts `LoraWeight`
objects into the params: `x @ LoraWeight` computes x W + s (x A) B, the unmerged low-rank path, so
the model's own layer code runs unchanged. `merge_lora` folds the update into plain weights for
inference; `adore_jax.adapters.save_adapter` writes the adapter alone (a few MB), which
`load_model(base, adapter=...)` merges; `export_hf` writes a whole merged model directory.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.adapters import merge_lora  # noqa: F401  (the merge load_model also uses)

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen weight with its adapter; behaves as the matrix on the right of `@`."""
    w: jax.Array  # [in, out]
    a: jax.Array  # [in, r]
    b: jax.Array  # [r, out]
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)

    def __rmatmul__(self, x):
        low_rank = (x @ self.a.astype(x.dtype)) @ self.b.astype(x.dtype)
        return x @ self.w + (self.scale * low_rank).astype(x.dtype)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def shape(self):
        return self.w.shape


def check_targets(targets):
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"lora.targets {list(targets)} must be a non-empty subset of {list(TARGETS)}")


def init_lora(params, rank: int, targets, key, dtype=jnp.float32):
    """Adapters {"layers": ({target: {"a", "b"}}, ...)}; A ~ N(0, 1/in), B = 0."""
    check_targets(targets)
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1; got {rank}")
    layers = []
    for i, layer in enumerate(params["layers"]):
        adapters = {}
        for j, name in enumerate(targets):
            fan_in, fan_out = layer[name].shape
            k = jax.random.fold_in(key, i * len(TARGETS) + j)
            adapters[name] = {"a": (jax.random.normal(k, (fan_in, rank)) / np.sqrt(fan_in)).astype(dtype),
                              "b": jnp.zeros((rank, fan_out), dtype)}
        layers.append(adapters)
    return {"layers": tuple(layers)}


def apply_lora(params, lora, scale: float):
    """Params whose target weights are LoraWeight (unmerged): the training/forward form."""
    layers = tuple({**layer, **{name: LoraWeight(layer[name], ad["a"], ad["b"], scale)
                                for name, ad in adapters.items()}}
                   for layer, adapters in zip(params["layers"], lora["layers"]))
    return {**params, "layers": layers}


_HF_NAMES = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def hf_config(config) -> dict:
    """A transformers config.json dict for a ModelConfig."""
    scaling = config.rope_scaling
    rope = None if scaling.rope_type == "default" else {k: v for k, v in dataclasses.asdict(scaling).items()}
    arch = "Qwen2ForCausalLM" if config.attention_bias else "LlamaForCausalLM"
    eos = list(config.eos_token_ids)
    return {
        "architectures": [arch], "model_type": "qwen2" if config.attention_bias else "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta, "rope_scaling": rope, "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "hidden_act": "silu", "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "torch_dtype": "float32",
    }


def export_hf(directory: str, params, config, tokenizer=None) -> str:
    """Write config.json + model.safetensors (+ tokenizer files): a directory load_model reads."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if "lm_head" in params:
        tensors["lm_head.weight"] = params["lm_head"].T
    for i, layer in enumerate(params["layers"]):
        for name, value in layer.items():
            tensors[f"model.layers.{i}.{_HF_NAMES[name]}"] = value if value.ndim == 1 else value.T
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(config), f, indent=2)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    return directory
