"""The machine a measurement ran on, for every benchmark's JSON and table.

XLA:CPU and torch gain differently from AVX-512, AVX-512-BF16 and AMX, so a speed number means little without the
CPU model, those features, the cores this process may use, the library versions and the XLA flags in force.
"""
import importlib.metadata
import os
import platform

# The vector and matrix features the two CPU backends dispatch on (x86 names from /proc/cpuinfo, then Arm's).
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
            "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")
LIBRARIES = ("jax", "jaxlib", "flax", "torch", "transformers")


def _cpuinfo(path="/proc/cpuinfo") -> dict:
    """The first processor's fields (lower-case keys); empty where there is no such file."""
    try:
        with open(path) as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {}
    fields = (line.partition(":") for line in first.splitlines())
    return {key.strip().lower(): value.strip() for key, _, value in fields}


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _memory_gib(path="/proc/meminfo"):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe(cpuinfo_path="/proc/cpuinfo") -> dict:
    """CPU model and generation, its FEATURES present, usable cores, memory, library versions, XLA flags and the
    jax backend."""
    import jax

    info = _cpuinfo(cpuinfo_path)
    flags = set((info.get("flags") or info.get("features") or "").split())
    # A virtual machine may hide the model name ("AMD EPYC"); family/model/stepping still tell the generation.
    cpu_id = " ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0]
    return dict(cpu=info.get("model name") or platform.processor() or platform.machine(), cpu_id=cpu_id,
                features=[f for f in FEATURES if f in flags],
                cpus=os.cpu_count(), usable_cpus=usable, memory_gib=_memory_gib(),
                platform=platform.platform(), backend=jax.default_backend(), device=device.device_kind,
                versions={name: _version(name) for name in LIBRARIES},
                xla_flags=os.environ.get("XLA_FLAGS", ""))


def summary_line(info: dict) -> str:
    """One line for the top of a benchmark's table: where its numbers come from."""
    versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items() if v)
    features = " ".join(info["features"]) or "(none of those listed)"
    flags = info["xla_flags"] or "(none)"
    return (f"machine: {info['cpu']} ({info['cpu_id'] or 'no cpu id'}), {info['usable_cpus']} of {info['cpus']} CPUs, "
            f"{info['memory_gib']} GiB; "
            f"features: {features}; backend {info['backend']} ({info['device']}); {versions}; XLA_FLAGS {flags}")
