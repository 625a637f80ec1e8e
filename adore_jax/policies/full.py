"""Full attention: every token kept (the cache has a slot per position). The reference."""
import dataclasses

from adore_jax.policies.base import CachePolicy


@dataclasses.dataclass(frozen=True, kw_only=True)
class Full(CachePolicy):
    name = "full"
