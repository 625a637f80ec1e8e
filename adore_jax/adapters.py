"""LoRA adapters on disk: a few MB beside a base model, merged into its weights when loaded.

    save_adapter("runs/ft/adapter", lora, base="smollm2-135m", alpha=16.0)
    model = load_model("smollm2-135m", adapter="runs/ft/adapter")    # merged on load

A directory holds `adapter.safetensors` (`layers.{i}.{target}.a` [in, r] and `.b` [r, out],
float32) and `adapter_config.json` (the base model, rank, alpha, targets and each target's
[in, out] shape). The update of a target weight W [in, out] is (alpha / rank) * A @ B.
"""
import json
import os

import jax.numpy as jnp
import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


def save_adapter(directory: str, lora, base: str, alpha: float) -> str:
    """Write adapters {"layers": ({target: {"a", "b"}}, ...)} trained on base model `base`."""
    from safetensors.numpy import save_file

    layers = lora["layers"]
    targets = sorted(layers[0])
    rank = int(np.shape(layers[0][targets[0]]["a"])[1])
    tensors = {f"layers.{i}.{name}.{part}": np.ascontiguousarray(np.asarray(adapter[part], np.float32))
               for i, layer in enumerate(layers) for name, adapter in layer.items() for part in ("a", "b")}
    shapes = {name: [int(np.shape(layers[0][name]["a"])[0]), int(np.shape(layers[0][name]["b"])[1])]
              for name in targets}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dict(base_model=base, rank=rank, alpha=float(alpha), targets=targets, num_layers=len(layers),
                       shapes=shapes), f, indent=2)
    return directory


def read_adapter(directory: str) -> tuple:
    """(config dict, adapters {"layers": (...)}) of a saved adapter; errors name the file at fault."""
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"adapter {directory!r}: missing {os.path.basename(path)} "
                                    f"(an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"adapter {directory!r}: {CONFIG_FILE} is not valid JSON ({error})") from None
    from safetensors.numpy import load_file

    tensors = load_file(weights_path)
    rank = config["rank"]
    layers = []
    for i in range(config["num_layers"]):
        layer = {}
        for name in config["targets"]:
            a, b = tensors.get(f"layers.{i}.{name}.a"), tensors.get(f"layers.{i}.{name}.b")
            if a is None or b is None:
                raise ValueError(f"adapter {directory!r}: {WEIGHTS_FILE} lacks layer {i} target {name!r}")
            if a.shape[1] != rank or b.shape[0] != rank:
                raise ValueError(f"adapter {directory!r}: layer {i} {name!r} has rank {a.shape[1]}x{b.shape[0]}, "
                                 f"but {CONFIG_FILE} says rank {rank}")
            layer[name] = {"a": a, "b": b}
        layers.append(layer)
    return config, {"layers": tuple(layers)}


def merge_lora(params, lora, scale: float):
    """Plain params with W + scale * A @ B folded into each adapted weight (W's dtype kept)."""
    def merged(w, adapter):
        update = jnp.dot(jnp.asarray(adapter["a"], jnp.float32), jnp.asarray(adapter["b"], jnp.float32))
        return (w.astype(jnp.float32) + scale * update).astype(w.dtype)

    layers = tuple({**layer, **{name: merged(layer[name], adapter) for name, adapter in adapters.items()}}
                   for layer, adapters in zip(params["layers"], lora["layers"]))
    return {**params, "layers": layers}


def _same_model(a: str, b: str) -> bool:
    """Model sources name the same model: equal names, or paths to the same file or directory."""
    if a == b:
        return True
    a, b = os.path.expanduser(a), os.path.expanduser(b)
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def apply_adapter(params, base: str, directory: str):
    """The params of base model `base` with the adapter in `directory` merged in."""
    config, lora = read_adapter(directory)
    if not _same_model(config["base_model"], base):
        raise ValueError(f"adapter {directory!r} was trained on base model {config['base_model']!r}, "
                         f"not on {base!r}")
    if config["num_layers"] != len(params["layers"]):
        raise ValueError(f"adapter {directory!r} has {config['num_layers']} layers, the model "
                         f"{len(params['layers'])}")
    for name, shape in config["shapes"].items():
        if name not in params["layers"][0] or list(params["layers"][0][name].shape) != shape:
            have = params["layers"][0][name].shape if name in params["layers"][0] else "none"
            raise ValueError(f"adapter {directory!r}: target {name!r} is {shape} in the adapter, {have} in the model")
    return merge_lora(params, lora, config["alpha"] / config["rank"])
