"""The memory accounting of eval/bench_throughput.py against a hand count of the bytes each policy holds."""

import pytest

from adore_jax import controller as ctrl
from adore_jax import decode
from adore_jax.eval.bench_throughput import batch_ladder, largest_batch, state_bytes
from adore_jax.policies import make_policy


def hand_count(config, policy, controller, batch, max_length):
    """Bytes by hand: K and V of every layer (f32), slot positions (int32) and validity (bool) per slot,
    then the policy state: ADORE's features per position and GRU state, a rebuild's token ids per position,
    H2O/TOVA's (and ADORE's attention term's) mass per slot, and the rebuild counters (one int32 per sequence and
    one shared)."""
    slots = policy.cache_size + policy.block_rows if policy.bounded else max_length
    cache = 2 * config.num_layers * slots * config.num_kv_heads * config.head_dim * 4 + slots * (4 + 1)
    state = 4  # returned_tokens
    if policy.needs_controller:
        state += max_length * 4 * controller.feature_width + 4 * controller.width
    if policy.returns.r:
        state += max_length * 4  # the token ids a rebuild runs again
    if policy.needs_mass:
        state += 4 * slots
    return batch * (cache + state) + 4  # + return_steps


@pytest.mark.parametrize("spec", [dict(policy="full"), dict(policy="window"), dict(policy="tova"),
                                  dict(policy="adore"), dict(policy="adore", returns=dict(type="rebuild", r=2))],
                         ids=["full", "window", "tova", "adore", "adore-rebuild"])
def test_state_bytes_and_largest_batch_equal_a_hand_count(tiny_model, spec):
    config, max_length = tiny_model.config, 384
    controller = ctrl.ControllerConfig(embed_dim=config.hidden_size)
    policy = make_policy(spec).at_cache_size(64).validate(max_length)
    plan = decode.DecodePlan(config, policy, controller if policy.needs_controller else None)
    for batch in (1, 3):
        assert state_bytes(tiny_model, plan, batch, max_length) == hand_count(config, policy, controller, batch,
                                                                              max_length)
    budget = 10 * hand_count(config, policy, controller, 1, max_length) + 123
    largest = largest_batch(tiny_model, plan, budget, max_length)
    assert hand_count(config, policy, controller, largest, max_length) <= budget
    assert hand_count(config, policy, controller, largest + 1, max_length) > budget
    assert largest_batch(tiny_model, plan, 10, max_length) == 0


def test_batch_ladder():
    assert batch_ladder(22, 256) == [1, 4, 16, 22]
    assert batch_ladder(363, 256) == [1, 4, 16, 64, 256]
    assert batch_ladder(16, 256) == [1, 4, 16]
    assert batch_ladder(0, 256) == []
