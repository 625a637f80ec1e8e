"""JAX's persistent compilation cache, as the command line uses it and a notebook may turn it on:

    adore_jax.enable_compile_cache()     # before the first generate: later processes skip compiling

The directory: $ADORE_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/adore_jax/jax_cache (~/.cache/adore_jax/jax_cache);
ADORE_JAX_NO_COMPILE_CACHE=1 turns it off, and JAX's own JAX_COMPILATION_CACHE_DIR, when set, wins.
"""
import os

NO_COMPILE_CACHE_ENV = "ADORE_JAX_NO_COMPILE_CACHE"
COMPILE_CACHE_ENV = "ADORE_JAX_COMPILE_CACHE"


def compile_cache_dir():
    """The persistent compilation cache directory the CLI uses, or None when it is turned off."""
    if os.environ.get(NO_COMPILE_CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if os.environ.get(COMPILE_CACHE_ENV):
        return os.path.expanduser(os.environ[COMPILE_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "adore_jax", "jax_cache")


def enable_compile_cache():
    """Turn on JAX's persistent compilation cache (see the module doc); returns its directory or None."""
    directory = compile_cache_dir()
    if directory is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
