"""The model configuration: one frozen dataclass, read from a Hugging Face config.json or GGUF metadata."""
import dataclasses
from typing import Any, Mapping, Optional

# Hugging Face architectures whose weights and forward pass this project implements.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in transformers' `rope_parameters`/`rope_scaling`."""
    rope_type: str = "default"  # "default" (none), "linear" or "llama3".
    factor: float = 1.0  # Context extension factor (linear, llama3).
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low_freq_factor are scaled.
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high_freq_factor are kept.
    original_max_position_embeddings: int = 8192  # llama3: the pre-extension context length.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""
    vocab_size: int
    hidden_size: int  # E
    intermediate_size: int  # F, the SwiGLU width
    num_layers: int  # L
    num_heads: int  # H, query heads
    num_kv_heads: int  # G, key/value heads (GQA); H % G == 0
    head_dim: int  # D
    max_position_embeddings: int  # the longest context the model supports
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # the LM head reuses the input embedding
    attention_bias: bool = False  # q/k/v projections have biases (Qwen2)
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()  # any of these ends a sequence

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {self.head_dim}")


def _rope_scaling_from_hf(cfg: Mapping[str, Any]) -> tuple:
    """(rope_theta, RopeScaling) from either the old top-level keys or transformers 5's `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), RopeScaling()
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    kwargs = {k: v for k, v in merged.items() if k in fields and k != "rope_type"}
    return float(theta), RopeScaling(rope_type=rope_type, **kwargs)


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the dict of a Hugging Face config.json."""
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"config.json: architecture {archs} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if cfg.get("use_sliding_window") or (archs[0] == "MistralForCausalLM" and cfg.get("sliding_window")):
        raise ValueError("config.json: sliding-window attention (sliding_window / use_sliding_window) "
                         "is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported; only 'silu'")
    if cfg.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    theta, scaling = _rope_scaling_from_hf(cfg)
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", archs[0] == "Qwen2ForCausalLM")),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos,
    )
