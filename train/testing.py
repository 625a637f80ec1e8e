"""Tiny models and label sets for the training tests (seconds on a CPU)."""
import types

import jax

from adore_jax.config import ModelConfig
from adore_jax.data.testing import ByteTokenizer

TINY_CONFIG = ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-5,
                          eos_token_ids=(1,))


def tiny_model(seed: int = 0, scale: float = 0.3):
    """A random byte-level Llama (vocab 258, ByteTokenizer) shaped like adore_jax.Model."""
    from adore_jax.model import init_params

    params = init_params(TINY_CONFIG, jax.random.key(seed), scale=scale)
    return types.SimpleNamespace(config=TINY_CONFIG, params=params, tokenizer=ByteTokenizer(), source="tiny")
