"""Cache policies: a scorer (what to keep) and a return path (what comes back), all over one slot cache.

Scorers (one frozen dataclass each; protocol: base.py):
  full          keep everything (a slot per position): the reference
  window        the m most recent tokens
  streaming_llm `sinks` first tokens + the most recent ones
  h2o           accumulated attention mass ("heavy hitters") + a protected recent window
  tova          the attention mass of the current query
  key_norm      the keys of smallest L2 norm
  snapkv        the attention of the latest w queries (the observation window), max-pooled over neighbours
  adore         a learned controller's score (+ beta * log of the current query's attention)
  random        a fixed pseudo-random score per token (a control)
  score_table   given (query, token) scores (the gap decomposition's perfect scorers)
  oracle_topk   full cache, each query attends to its own top-K logits per head (the upper bound)
Return paths (returns.py, rebuild.py, recall.py), any bounded scorer's `returns`:
  NoReturn()    a released token is gone (the default)
  Rebuild(r)    the R best released tokens run again with the current one (ADORE's rebuild)
  Recall(r)     each layer attends the R released tokens its query ranks best, from a store of every token's K/V

    policy = TOVA(cache_size=256, returns=Recall(r=32))
    policy = make_policy({"policy": "adore", "cache_size": 512, "returns": {"type": "rebuild", "r": 8}})

Every bounded policy keeps at most m tokens: after each block (a decode step or a prefill chunk) the valid
slots with the lowest scores are released until m remain. The slot assignment is shared by all layers.
adore_jax.presets names the recommended combinations.

Adding a scorer: one file with its frozen dataclass (a `name` and the protocol methods it needs), one entry in
POLICIES below, a config in configs/policies/ and its reference test; a return path likewise, in RETURN_PATHS.
"""
import dataclasses
import difflib

from adore_jax.configfile import ConfigError, convert, field_types, parse_override, read_yaml
from adore_jax.policies.adore import Adore
from adore_jax.policies.base import BoundedPolicy, CachePolicy, PolicyState
from adore_jax.policies.full import Full
from adore_jax.policies.h2o import H2O
from adore_jax.policies.key_norm import KeyNorm
from adore_jax.policies.oracle_topk import OracleTopK, TopKSlotAttention
from adore_jax.policies.presets import PRESETS
from adore_jax.policies.random import Random
from adore_jax.policies.rebuild import Rebuild
from adore_jax.policies.recall import Recall
from adore_jax.policies.returns import NoReturn, ReturnPath
from adore_jax.policies.score_table import ScoreTable
from adore_jax.policies.snapkv import SnapKV
from adore_jax.policies.streaming_llm import StreamingLLM
from adore_jax.policies.tova import TOVA
from adore_jax.policies.window import Window

POLICIES = {policy.name: policy for policy in (Full, Window, StreamingLLM, H2O, TOVA, KeyNorm, SnapKV, OracleTopK,
                                                  Adore, Random, ScoreTable)}
RETURN_PATHS = {path.kind: path for path in (NoReturn, Rebuild, Recall)}


def policy_class(name) -> type:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
    return POLICIES[name]


def _checked_options(cls, values: dict, what: str) -> dict:
    types = field_types(cls)
    for key in values:
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ConfigError(f"{what} has no option {key!r}{hint}; its options: {', '.join(types) or 'none'}")
    return {key: convert(value, types[key], key) for key, value in values.items()}


def make_return_path(spec) -> ReturnPath:
    """A return path from an object, a kind ("none", "rebuild", "recall") or a mapping with a `type` key."""
    if isinstance(spec, ReturnPath):
        return spec
    values = dict(spec) if isinstance(spec, dict) else {"type": spec}
    kind = values.pop("type", None)
    if kind not in RETURN_PATHS:
        raise ConfigError(f"returns: type must be one of {', '.join(RETURN_PATHS)}; got {kind!r}")
    cls = RETURN_PATHS[kind]
    return cls(**_checked_options(cls, values, f"return path {kind!r}"))


def make_policy(spec=None, **options) -> CachePolicy:
    """A policy from a policy object, a policy or preset name, or a mapping with a `policy` or `preset` key (None:
    full).

    `options` set or override the policy's fields; `returns` may be a return path, its kind, a mapping with a
    `type` key, or a mapping without one that changes fields of the policy's current return path. Every key is
    checked against the fields and every value against the field's type: an error names the key and what is
    allowed.
    """
    if isinstance(spec, str) and spec in PRESETS:
        spec = PRESETS[spec]()
    elif isinstance(spec, dict) and "preset" in spec:
        options = {**{k: v for k, v in spec.items() if k != "preset"}, **options}
        if spec["preset"] not in PRESETS or "policy" in options:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, with no `policy` beside it; got "
                              f"{spec['preset']!r}")
        spec = PRESETS[spec["preset"]]()
    if isinstance(spec, CachePolicy):
        cls, values = type(spec), {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    else:
        values = dict(spec) if isinstance(spec, dict) else {"policy": spec}
        cls = policy_class(values.pop("policy", None) or "full")
    current = values.pop("returns", None)
    values.update(options)
    returns = values.pop("returns", current)
    if returns is not None and not issubclass(cls, BoundedPolicy):
        raise ConfigError(f"policy {cls.name!r} keeps every token: it has no return path (returns)")
    checked = _checked_options(cls, values, f"policy {cls.name!r}")
    if isinstance(returns, dict) and "type" not in returns and isinstance(current, ReturnPath):
        returns = dataclasses.replace(current, **_checked_options(type(current), returns, "returns"))
    if returns is not None:
        checked["returns"] = make_return_path(returns)
    return cls(**checked)


def load_policy(path=None, overrides=(), **options) -> CachePolicy:
    """A policy from a YAML mapping (configs/policies/*.yaml), `key=value` overrides (`returns.r=32` sets a field
    of the return path) and keyword options."""
    values = read_yaml(path) if path else {}
    for override in overrides:
        parts, value = parse_override(override)
        if len(parts) == 2 and parts[0] == "returns":
            returns = values.get("returns") or {}
            values["returns"] = dict(returns if isinstance(returns, dict) else {"type": returns}, **{parts[1]: value})
        elif len(parts) == 1:
            values[parts[0]] = value
        else:
            raise ConfigError(f"override {override!r}: use key=value, or returns.key=value for the return path")
    values.update({k: v for k, v in options.items() if v is not None})
    return make_policy(values)


__all__ = ["POLICIES", "RETURN_PATHS", "Adore", "BoundedPolicy", "CachePolicy", "Full", "H2O", "KeyNorm",
           "NoReturn", "OracleTopK", "PolicyState", "Random", "Recall", "Rebuild", "ReturnPath", "ScoreTable",
           "SnapKV", "StreamingLLM", "TOVA", "TopKSlotAttention", "Window", "load_policy", "make_policy",
           "make_return_path", "policy_class"]
