"""Scale-out with JAX's own sharding: a Mesh with data/fsdp/tensor axes and named rules.

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    params = shard_tree(params, mesh, LLM_RULES)        # params and optimiser state by the rules
    batch = shard_batch(batch, mesh)                    # leading (batch) axis over data x fsdp
    batch = put_process_batch(rows, mesh, batch_size)   # multi-host: each process loads process_rows() only

A rule is (regex over the leaf's path "layers/3/wq", per-dimension mesh axes). The first rule whose
regex matches a leaf's path decides its PartitionSpec; a dimension that the axis size does not
divide stays unsharded there, and leaves no rule matches are replicated. The optimiser state's
paths end in the parameter paths (".../mu/layers/3/wq"), so the same rules shard it.
The batch is split over both data and fsdp (FSDP is data parallelism with sharded weights).
Several processes (a TPU pod slice, or CPU processes with gloo) run the same program on one mesh over
all their devices (initialize_distributed first); each feeds the rows of the global batch that its
own devices hold, and host_tree brings sharded results back to every process.
"""
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Llama params, LoRA adapters and the controller: weights [in, out].
LLM_RULES = (
    (r"(^|/)embed$", ("fsdp", "tensor")),
    (r"(^|/)lm_head$", ("fsdp", "tensor")),
    (r"(^|/)(wq|wk|wv|w_gate|w_up)/a$", ("fsdp", None)),  # LoRA A [in, r]
    (r"(^|/)(wq|wk|wv|w_gate|w_up)/b$", (None, "tensor")),  # LoRA B [r, out]
    (r"(^|/)(wo|w_down)/a$", ("tensor", None)),
    (r"(^|/)(wo|w_down)/b$", (None, "fsdp")),
    (r"(^|/)(wq|wk|wv|w_gate|w_up)$", ("fsdp", "tensor")),
    (r"(^|/)(wo|w_down)$", ("tensor", "fsdp")),
    (r"(^|/)w_in$", ("fsdp", None)),  # controller input projection [E, c]
)


def initialize_distributed(mesh_config) -> None:
    """jax.distributed.initialize for multi-host runs (a no-op unless mesh.distributed is set, and once
    done: a process may run several trainings).

    On TPU pods and SLURM every argument is detected; elsewhere give the coordinator address,
    the process count and this process's id in the config (or the JAX_COORDINATOR_ADDRESS, ...
    environment variables that jax reads)."""
    if not mesh_config.distributed or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", mesh_config.cpu_collectives)  # before any backend
    kwargs = {k: v for k, v in dict(coordinator_address=mesh_config.coordinator_address,
                                    num_processes=mesh_config.num_processes,
                                    process_id=mesh_config.process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of all hosts); data=-1 takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    fsdp, tensor = mesh_config.fsdp, mesh_config.tensor
    if fsdp < 1 or tensor < 1:
        raise ValueError(f"mesh.fsdp and mesh.tensor must be >= 1; got {fsdp}, {tensor}")
    data = mesh_config.data if mesh_config.data != -1 else len(devices) // (fsdp * tensor)
    if data < 1 or data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={mesh_config.data} x fsdp={fsdp} x tensor={tensor} does not "
                         f"match the {len(devices)} devices")
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def path_string(path) -> str:
    """A tree path as 'layers/3/wq' (dict keys, sequence indices and attribute names)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def spec_for(path: str, shape, mesh: Mesh, rules) -> P:
    for pattern, axes in rules:
        if re.search(pattern, path) and len(axes) == len(shape):
            return P(*[axis if axis is None or dim % mesh.shape[axis] == 0 else None
                       for axis, dim in zip(axes, shape)])
    return P()


def tree_shardings(tree, mesh: Mesh, rules):
    """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_string(path), np.shape(x), mesh, rules)), tree)


def shard_tree(tree, mesh: Mesh, rules):
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """The rows of a global batch of `batch_size` that this process's devices hold (sorted): all of them
    on one process, its own share when several processes feed one mesh."""
    check_batch_size(mesh, batch_size)
    slices = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,)).values()
    return np.unique(np.concatenate([np.arange(batch_size)[index] for index in slices]))


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
    size = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % size:
        raise ValueError(f"batch size {batch_size} must be a multiple of data x fsdp = {size}")


def put_process_batch(batch, mesh: Mesh, batch_size: int):
    """The global batch [batch_size, ...] as arrays split over data x fsdp, from this process's rows of it
    (host arrays [len(process_rows(mesh, batch_size)), ...], in that order)."""
    check_batch_size(mesh, batch_size)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, (batch_size, *x.shape[1:]))
    return jax.tree.map(put, batch)


def shard_batch(batch, mesh: Mesh):
    """Place host arrays [B, ...] with B split over data x fsdp (B must divide evenly); every process
    passes the same global batch and keeps its rows (put_process_batch when each loads only its own)."""
    size = len(jax.tree.leaves(batch)[0])
    rows = process_rows(mesh, size)
    return put_process_batch(jax.tree.map(lambda x: np.asarray(x)[rows], batch), mesh, size)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """Host arrays, the same on every process, as arrays replicated over the whole mesh."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        replicated(mesh), np.asarray(x), np.shape(x)), tree)


def host_tree(tree):
    """Every leaf's whole value as a numpy array, on every process (all processes must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
