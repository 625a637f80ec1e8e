"""YAML config files whose keys are checked: a typo is an error naming the key and the closest valid ones."""
import difflib

import yaml

CACHE_KEYS = ("policy", "cache_size", "rebuild", "adaptive_rebuild", "rebuild_into_cache", "attn_top_k", "sinks",
              "recent", "controller", "cache_update", "prefill_chunk", "max_length", "attention_impl")


def check_keys(options: dict, allowed, where: str) -> dict:
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(allowed)}"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
    return options


def read_config(path: str, allowed=CACHE_KEYS) -> dict:
    """The mapping in a YAML file, every key checked against `allowed`."""
    with open(path) as f:
        options = yaml.safe_load(f) or {}
    if not isinstance(options, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values")
    return check_keys(options, allowed, path)
