"""Cache policies: one frozen dataclass each, all over the same slot cache (protocol: base.py).

  full          keep everything (a slot per position): the reference
  window        the m most recent tokens
  streaming_llm `sinks` first tokens + the most recent ones
  h2o           accumulated attention mass ("heavy hitters") + a protected recent window
  tova          the attention mass of the current query
  oracle_topk   full cache, each query attends to its own top-K logits per head (the upper bound)
  adore         the controller's score; the top-R released tokens are rebuilt each step
  random        a fixed pseudo-random score per token (a control)
  score_table   adore's release and rebuild over given (query, token) scores (the gap decomposition's
                perfect scorers)

    policy = Adore(cache_size=256, rebuild=8)                       # or make_policy("adore", cache_size=256, rebuild=8)
    policy = make_policy({"policy": "h2o", "cache_size": 512})      # a mapping, as in configs/policies/*.yaml

Every policy keeps at most m tokens except `full` and `oracle_topk`: after each block (a decode step
or a prefill chunk) the valid slots with the lowest scores are released until m remain. The slot
assignment is shared by all layers (ADORE's uniform policy).

Adding a policy: one file with its frozen dataclass (a `name` and the protocol methods it needs), one
entry in POLICIES below, a config in configs/policies/ and its reference test.
"""
import dataclasses
import difflib

from adore_jax.configfile import ConfigError, convert, field_types, parse_override, read_yaml
from adore_jax.policies.adore import Adore
from adore_jax.policies.base import BoundedPolicy, CachePolicy, PolicyState
from adore_jax.policies.full import Full
from adore_jax.policies.h2o import H2O
from adore_jax.policies.oracle_topk import OracleTopK, TopKSlotAttention
from adore_jax.policies.random import Random
from adore_jax.policies.score_table import ScoreTable
from adore_jax.policies.streaming_llm import StreamingLLM
from adore_jax.policies.tova import TOVA
from adore_jax.policies.window import Window

POLICIES = {policy.name: policy for policy in (Full, Window, StreamingLLM, H2O, TOVA, OracleTopK, Adore, Random,
                                                  ScoreTable)}


def policy_class(name) -> type:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
    return POLICIES[name]


def make_policy(spec=None, **options) -> CachePolicy:
    """A policy from a policy object, a name, or a mapping with a `policy` key (None: full).

    `options` set or override the policy's fields. Every key is checked against the policy's fields
    and every value against the field's type: an error names the key and what is allowed.
    """
    if isinstance(spec, CachePolicy):
        cls, values = type(spec), {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    else:
        values = dict(spec) if isinstance(spec, dict) else {"policy": spec}
        cls = policy_class(values.pop("policy", None) or "full")
    values.update(options)
    types = field_types(cls)
    for key in values:
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ConfigError(f"policy {cls.name!r} has no option {key!r}{hint}; its options: {', '.join(types)}")
    return cls(**{key: convert(value, types[key], key) for key, value in values.items()})


def load_policy(path=None, overrides=(), **options) -> CachePolicy:
    """A policy from a YAML mapping (configs/policies/*.yaml), `key=value` overrides and keyword options."""
    values = read_yaml(path) if path else {}
    for override in overrides:
        parts, value = parse_override(override)
        if len(parts) != 1:
            raise ConfigError(f"override {override!r}: cache policy options are not nested (use key=value)")
        values[parts[0]] = value
    values.update({k: v for k, v in options.items() if v is not None})
    return make_policy(values)


__all__ = ["POLICIES", "Adore", "BoundedPolicy", "CachePolicy", "Full", "H2O", "OracleTopK", "PolicyState", "Random",
           "ScoreTable", "StreamingLLM", "TOVA", "TopKSlotAttention", "Window", "load_policy", "make_policy",
           "policy_class"]
