"""Counting compilations and timing calls without counting the compile time as run time."""
import contextlib
import dataclasses
import time

import jax


@dataclasses.dataclass(eq=False)  # trackers are told apart by identity: two with equal counts are not one
class CompileStats:
    count: int = 0  # XLA backend compilations
    seconds: float = 0.0  # tracing + lowering + compiling


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_active_trackers = []


def _on_event(name, seconds, **_):
    for stats in _active_trackers:
        if name in _COMPILE_EVENTS:
            stats.seconds += seconds
        if name == _COMPILE_EVENTS[-1]:
            stats.count += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def track_compiles():
    """Count the compilations, and the seconds spent on them, inside the block."""
    stats = CompileStats()
    _active_trackers.append(stats)
    try:
        yield stats
    finally:
        _active_trackers.remove(stats)


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CompileStats) of a call, waiting for its device work to finish."""
    with track_compiles() as stats:
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args, **kwargs))
        elapsed = time.perf_counter() - start
    return result, elapsed, stats
