"""Choosing between a kernel's jnp twin and its Pallas versions."""
import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import triton_size

IMPLS = ("auto", "ref", "pallas", "pallas_interpret")


def resolve_impl(impl, head_dim, *, allowed=IMPLS):
    """Map an `impl` name to (kind, interpret).

    kind is "ref", "tpu" (the Mosaic kernel) or "gpu" (the Triton kernel).
    "auto" is Pallas on a TPU/GPU backend and the jnp twin elsewhere — also on a GPU when head_dim
    is not a power of two >= 16, which Triton's tensor shapes need; "pallas_interpret" runs the kernel
    of the current backend in interpret mode, or the Mosaic kernel on the TPU simulator when the
    backend is the CPU.
    """
    if impl not in allowed:
        raise ValueError(f"impl must be one of {', '.join(map(repr, allowed))}; got impl={impl!r}")
    backend = jax.default_backend()
    platform = backend if backend in ("tpu", "gpu") else None
    if impl == "auto":
        usable = platform == "tpu" or (platform == "gpu" and triton_size(head_dim))
        return (platform, False) if usable else ("ref", False)
    if impl == "pallas":
        if platform is None:
            raise ValueError(
                f"impl='pallas' needs a TPU or GPU backend, not {backend!r}; "
                "use impl='pallas_interpret' to run the kernel on the CPU")
        return platform, False
    if impl == "pallas_interpret":
        platform = platform or "tpu"
        return platform, interpret_mode(platform)
    return impl, False


def interpret_mode(platform):
    """The `interpret` argument that runs `platform`'s kernel on the CPU."""
    return pltpu.InterpretParams() if platform == "tpu" else True
