"""adore-jax: ADORE adaptive token release for JAX.

    model = adore_jax.load_model("smollm2-135m")
    out = adore_jax.generate(model, ["Tell me about Paris."], max_new_tokens=64, chat=True,
                             policy="adore", cache_size=256, rebuild=8)
    print(out.texts[0], out.stats["decode_tokens_per_s"])
"""
import os as _os

# In a source checkout, train/ and eval/ sit beside this package; setup.cfg installs them as
# adore_jax.train and adore_jax.eval. Let them import under those names from the checkout too
# (no install, or a scratch copy of the tree), never as top-level `train` / `eval`.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "train", "__init__.py")):
    __path__.append(_checkout)

from adore_jax.api import GenerationResult, Model, generate, load_model, teacher_force
from adore_jax.config import ModelConfig
from adore_jax.controller import ControllerConfig, load_controller, save_controller
from adore_jax.policies import POLICIES, CacheConfig
from adore_jax.sampling import SamplingParams

__all__ = ["POLICIES", "CacheConfig", "ControllerConfig", "GenerationResult", "Model", "ModelConfig",
           "SamplingParams", "generate", "load_controller", "load_model", "save_controller", "teacher_force"]
