"""The model with the Pallas slot-attention kernel selected (interpreted on CPU) equals the jnp twin."""
import jax
import numpy as np
import pytest

import adore_jax
from adore_jax import controller as ctrl


@pytest.mark.parametrize("options", [dict(policy="full"), dict(policy="h2o", cache_size=6),
                                     dict(policy="adore", cache_size=6, rebuild=2)],
                         ids=lambda o: o["policy"])
def test_kernel_and_twin_give_the_same_logits(tiny_model, options):
    if options["policy"] == "adore":
        config = ctrl.ControllerConfig(embed_dim=tiny_model.config.hidden_size, width=8, hidden=4)
        options = dict(options, controller=(config, ctrl.init_controller(config, jax.random.key(2))))
    tokens = np.random.default_rng(5).integers(3, 97, size=(1, 14)).astype(np.int32)
    results = {impl: adore_jax.teacher_force(tiny_model, tokens, 4, attention_impl=impl, return_logits=True,
                                             prefill_chunk=4, **options)[1]
               for impl in ("ref", "pallas_interpret")}
    np.testing.assert_allclose(results["pallas_interpret"], results["ref"], atol=2e-5)
