"""Handing heap memory that freed buffers left behind back to the system, between the rows of an evaluation."""
import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def return_freed_memory() -> bool:
    """glibc's malloc_trim(0). XLA:CPU frees its buffers to malloc, which keeps many of their pages resident
    (`python scripts/retained_memory.py`; docs/results/speed.md, "Memory of an evaluation"). Returns True when memory
    went back to the system, False without glibc or when nothing was kept."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
