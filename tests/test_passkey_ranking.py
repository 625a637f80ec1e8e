"""scripts/passkey_ranking.py ranks earlier tokens as `Rebuild(ranked_by="attention")` does."""
import dataclasses

import jax.numpy as jnp
import numpy as np

from adore_jax import cache as kv_cache
from adore_jax.config import ModelConfig
from adore_jax.policies import Rebuild
from adore_jax.policies.base import StateShape

from references import load_script


def test_the_ranking_is_the_policys_retrieval_ranking():
    """Random query [H, D] and keys [T, G, D] (3 query heads per KV head): every position's rank by the script
    equals its rank by the rebuild's attention ranking (`Rebuild.choose` with every one of the first `candidates`
    positions released and R = candidates: its picks in order), among the first `candidates` positions."""
    copied_rank = load_script("passkey_ranking").copied_rank
    rng = np.random.default_rng(0)
    heads, groups, dim, length, candidates = 6, 2, 8, 40, 30
    query = rng.normal(size=(heads, dim)).astype(np.float32)
    keys = rng.normal(size=(length, groups, dim)).astype(np.float32)
    config = ModelConfig(vocab_size=16, hidden_size=heads * dim, intermediate_size=8, num_layers=3, num_heads=heads,
                         num_kv_heads=groups, head_dim=dim, max_position_embeddings=length)
    rebuild = Rebuild(r=candidates, ranked_by="attention")
    state = rebuild.init_state(StateShape(1, 4, length, config))
    assert state.keys.shape == (1, length, groups, dim) and state.query.shape == (1, heads, dim)
    state = dataclasses.replace(state, keys=jnp.asarray(keys[None]), query=jnp.asarray(query[None]))
    empty = kv_cache.init_cache(config, 1, 4)  # no slot valid: every position before the query is released
    picked, wanted = rebuild.choose(empty, state, None, jnp.array([candidates], jnp.int32))
    order = np.asarray(picked)[0]
    assert np.asarray(wanted).all() and sorted(order.tolist()) == list(range(candidates))
    for position in range(candidates):
        assert copied_rank(query, keys, candidates, [position]) == int(np.flatnonzero(order == position)[0])
    assert copied_rank(query, keys, candidates, [order[5], order[2]]) == 2  # the best of several targets
