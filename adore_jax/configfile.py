"""The one config loader: YAML files and dotted `--set key=value` overrides into frozen dataclasses.

    config = load_config(FinetuneConfig, "configs/finetune_smollm2.yaml", ["optim.learning_rate=3e-4"])

Cache policies, generation, evaluation and training all read their configs through it, so they share
one set of rules:
- an unknown key is an error naming it and the closest valid keys (difflib), so a typo never
  silently falls back to a default;
- every value is checked against the field's type (int, float, str, bool, Optional, tuple, nested
  dataclass); the error names the key and the expected type;
- YAML that does not parse, or a file that does not hold a mapping, is a one-line error naming the file.
"""
import dataclasses
import difflib
import typing
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key_error(key, valid, where: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {(where + key)!r}{hint} (valid keys: {', '.join(sorted(valid))})")


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def convert(value, kind, where: str):
    """`value` checked (and, where lossless, converted) against the type annotation `kind`."""
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} must be a mapping; got {value!r}")
        return from_dict(kind, value, prefix=where + ".")
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = [a for a in typing.get_args(kind) if a is not type(None)][0]
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where!r} must be a list; got {value!r}")
        return tuple(_freeze(v) for v in value)
    if kind is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-3" as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    bad_bool = kind in (int, float) and isinstance(value, bool)
    if kind in (int, float, str, bool) and (bad_bool or not isinstance(value, kind)):
        raise ConfigError(f"config key {where!r} must be {_type_name(kind)}; got {value!r}")
    return value


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, refusing unknown keys, missing keys and wrong types."""
    types = field_types(cls)
    for key in values:
        if key not in types:
            raise unknown_key_error(key, list(types), prefix)
    kwargs = {key: convert(value, types[key], prefix + key) for key, value in values.items()}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ConfigError(f"config is missing required key(s) {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def parse_override(override: str) -> tuple:
    """`dotted.key=value` -> (["dotted", "key"], value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({_first_line(error)})") from None
    return key.strip().split("."), value


def apply_override(values: dict, override: str, cls) -> None:
    """Apply one `dotted.key=value` to a nested dict, checking each key against dataclass `cls`."""
    parts, value = parse_override(override)
    kind, node = cls, values
    for depth, part in enumerate(parts):
        types = field_types(kind)
        if part not in types:
            raise unknown_key_error(part, list(types), ".".join(parts[:depth]) + ("." if depth else ""))
        if depth == len(parts) - 1:
            node[part] = value
        else:
            kind = types[part]
            if not dataclasses.is_dataclass(kind):
                raise ConfigError(f"config key {'.'.join(parts[:depth + 1])!r} is not a section")
            node = node.setdefault(part, {})


def _first_line(error) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def read_yaml(path: str) -> dict:
    """The mapping held by a YAML file (empty file: {}), or a ConfigError naming the file."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: "
                          f"{getattr(error, 'problem', None) or _first_line(error)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values at the top level")
    return values


def load_config(cls, path: Optional[str] = None, overrides=()):
    """Read a YAML file (optional) and `key=value` overrides into dataclass `cls`."""
    values = read_yaml(path) if path is not None else {}
    for override in overrides:
        apply_override(values, override, cls)
    return from_dict(cls, values)


def to_dict(config) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(config))


def save_config(config, path: str) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
