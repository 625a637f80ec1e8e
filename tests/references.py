"""Hand-built parts the tests compare against (imported by the test modules)."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adore_jax import controller as ctrl

# For the tests of what impl="auto" picks on the CPU (and that impl="pallas" is refused there); the kernel test
# files also run on a lent GPU or TPU (scripts/device_check.sh), where "auto" is the Pallas kernel.
cpu_dispatch_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="what impl='auto' picks on the CPU")


def distance_controller(embed_dim, scores_by_distance, input_layer=None):
    """A query-aware controller whose score of token i for query t is scores_by_distance[t - i].

    GRU weights are zero, so z stays 0; a learned position table carries the score. input_layer: it declares
    that it reads hidden states (the decode loop's order for such controllers), which it then ignores.
    """
    scores = np.asarray(scores_by_distance, np.float32)
    offset = 1e4  # keeps the MLP's relu input positive
    config = ctrl.ControllerConfig(embed_dim=embed_dim, width=2, hidden=1, score_form="query_aware",
                                   position_embedding="learned", max_positions=len(scores),
                                   input_layer=input_layer)
    params = jax.tree_util.tree_map(jnp.zeros_like, ctrl.init_controller(config, jax.random.key(0)))
    params.update(positions=jnp.stack([jnp.asarray(scores), jnp.zeros_like(scores)], axis=1),
                  w_1=jnp.array([[1.0], [0.0]]), b_1=jnp.array([offset]), w_2=jnp.array([1.0]),
                  b_2=jnp.array(-offset))
    return config, params


def load_script(name):
    """The module of scripts/<name>.py (the scripts are not a package)."""
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
