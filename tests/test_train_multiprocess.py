"""Two processes on localhost (jax.distributed, gloo CPU collectives), 2 CPU devices each, train on one
mesh spanning both: the result equals the same steps in one process on one device."""
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

WORKER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from adore_jax.train import sharding
    from adore_jax.train.config import MeshConfig
    from adore_jax.train.testing import tiny_model
    sys.path.insert(0, {tests!r})
    from test_train_multiprocess import lora_steps

    process, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sharding.initialize_distributed(MeshConfig(distributed=True, coordinator_address=f"localhost:{{port}}",
                                               num_processes=2, process_id=process))
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2))
    params, losses = lora_steps(mesh)
    params = multihost_utils.process_allgather(params, tiled=True)
    if process == 0:
        np.savez(out, losses=np.asarray(losses), **{{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}})
    print("ok", process, losses, flush=True)
""")


def lora_steps(mesh, steps=3):
    """LoRA sparse fine-tuning steps of the tiny model on a fixed batch: (trained adapters, losses)."""
    from adore_jax.train import sharding
    from adore_jax.train.config import FinetuneConfig, LoraConfig
    from adore_jax.train.finetune import make_train_step, setup_training
    from adore_jax.train.forward import make_attention
    from adore_jax.train.testing import tiny_model

    model = tiny_model()
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(2, 258, (4, 16)).astype(np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)), "segment_ids": np.ones((4, 16), np.int32)}
    config = FinetuneConfig(run_dir="unused", lora=LoraConfig(targets=("wq", "wv", "w_up")))
    trainable, frozen, scale, optimizer, _ = setup_training(config, model.params, 10)
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # non-zero B: every adapter gets gradient
    state = {"params": trainable, "opt_state": optimizer.init(trainable)}
    shardings = sharding.tree_shardings(state, mesh, sharding.LLM_RULES)
    state = jax.device_put(state, shardings)
    frozen = sharding.shard_tree(frozen, mesh, sharding.LLM_RULES)
    step = jax.jit(make_train_step(model.config, optimizer, make_attention("topk", 4, impl="ref"), scale),
                   out_shardings=(shardings, None))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, sharding.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state["params"], losses


def test_two_processes_train_as_one(tmp_path):
    from adore_jax.train import sharding
    from adore_jax.train.config import MeshConfig

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "multi.npz")
    workers = [subprocess.Popen([sys.executable, "-c", code, str(i), str(port), out], env=env, cwd=repo,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [w.communicate(timeout=600) for w in workers]
    for worker, (stdout, stderr) in zip(workers, results):
        assert worker.returncode == 0, stderr[-4000:]
        assert stdout.strip().splitlines()[-1].startswith("ok"), stdout
    single, losses = lora_steps(sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    multi = np.load(out)
    np.testing.assert_allclose(multi["losses"], losses, rtol=1e-6)
    assert losses[-1] < losses[0]
    for i, leaf in enumerate(jax.tree.leaves(single)):
        np.testing.assert_allclose(multi[str(i)], np.asarray(leaf), rtol=1e-6, atol=1e-7)
