"""adore-jax: ADORE adaptive token release for JAX.

    model = adore_jax.load_model("smollm2-135m")
    out = adore_jax.generate(model, ["Tell me about Paris."], 64, chat=True,
                             cache=adore_jax.presets.adore_recall(256))
    print(out.texts[0], out.stats["decode_tokens_per_s"])
"""
import os as _os

# In a source checkout, train/ and eval/ sit beside this package; setup.cfg installs them as
# adore_jax.train and adore_jax.eval. Let them import under those names from the checkout too
# (no install, or a scratch copy of the tree), never as top-level `train` / `eval`.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "train", "__init__.py")):
    __path__.append(_checkout)

from adore_jax import presets
from adore_jax.api import GenerationResult, Model, generate, load_model, teacher_force
from adore_jax.compile_cache import enable_compile_cache
from adore_jax.config import ModelConfig
from adore_jax.controller import ControllerConfig, load_controller, save_controller
from adore_jax.policies import (
    H2O,
    POLICIES,
    TOVA,
    Adore,
    CachePolicy,
    Full,
    KeyNorm,
    NoReturn,
    OracleTopK,
    Random,
    Rebuild,
    Recall,
    SnapKV,
    StreamingLLM,
    Window,
    make_policy,
)
from adore_jax.sampling import SamplingParams
from adore_jax.session import DecodeSession

__all__ = ["H2O", "POLICIES", "TOVA", "Adore", "CachePolicy", "ControllerConfig", "DecodeSession", "Full",
           "GenerationResult", "KeyNorm", "Model", "ModelConfig", "NoReturn", "OracleTopK", "Random", "Recall",
           "Rebuild", "SamplingParams", "SnapKV", "StreamingLLM", "Window", "enable_compile_cache", "generate",
           "load_controller", "load_model", "make_policy", "presets", "save_controller", "teacher_force"]
