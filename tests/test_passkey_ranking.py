"""scripts/passkey_ranking.py ranks earlier tokens as `rebuild_by="attention"` does."""
import dataclasses

import jax.numpy as jnp
import numpy as np

import adore_jax
from references import load_script


def test_the_ranking_is_the_policys_retrieval_ranking():
    """Random query [H, D] and keys [T, G, D] (3 query heads per KV head): every position's rank by the script
    equals its rank by Adore.retrieval_scores, among the first `candidates` positions."""
    copied_rank = load_script("passkey_ranking").copied_rank
    rng = np.random.default_rng(0)
    heads, groups, dim, length, candidates = 6, 2, 8, 40, 30
    query = rng.normal(size=(heads, dim)).astype(np.float32)
    keys = rng.normal(size=(length, groups, dim)).astype(np.float32)
    policy = adore_jax.make_policy("adore", cache_size=8, rebuild=2, rebuild_by="attention")
    state = dataclasses.make_dataclass("State", ["retrieval_keys", "retrieval_query"])(
        jnp.asarray(keys[None, :candidates]), jnp.asarray(query[None]))
    order = np.argsort(-np.asarray(policy.retrieval_scores(state))[0], kind="stable")
    for position in range(candidates):
        assert copied_rank(query, keys, candidates, [position]) == int(np.flatnonzero(order == position)[0])
    assert copied_rank(query, keys, candidates, [order[5], order[2]]) == 2  # the best of several targets
