"""The recommended cache policies by name (adore_jax/policies/presets.py)."""
from adore_jax.policies.presets import (
                                        PRESETS,
                                        adore_attention_rebuild,
                                        adore_fixed_memory,
                                        adore_paper,
                                        adore_recall,
                                        quest,
)

__all__ = ["PRESETS", "adore_attention_rebuild", "adore_fixed_memory", "adore_paper", "adore_recall", "quest"]
