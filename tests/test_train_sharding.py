"""A training step on a mesh of 8 CPU devices (data x fsdp) equals the 1-device step.

The 8 devices exist only with XLA_FLAGS set before jax starts, so the check runs in a subprocess.
"""
import os
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from adore_jax.train import sharding
    from adore_jax.train.config import FinetuneConfig, LoraConfig, MeshConfig
    from adore_jax.train.finetune import make_train_step, setup_training
    from adore_jax.train.forward import make_attention
    from adore_jax.train.testing import tiny_model

    assert len(jax.devices()) == 8, jax.devices()
    model = tiny_model()
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(2, 258, (8, 16)).astype(np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
             "segment_ids": np.ones((8, 16), np.int32)}

    def one_step(mesh_config, devices, lora, attention):
        config = FinetuneConfig(run_dir="unused", lora=LoraConfig(enabled=lora, targets=("wq", "wv", "w_up")))
        trainable, frozen, scale, optimizer, _ = setup_training(config, model.params, 10)
        trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # non-zero B: every adapter gets gradient
        mesh = sharding.make_mesh(mesh_config, devices)
        state = {"params": trainable, "opt_state": optimizer.init(trainable)}
        shardings = sharding.tree_shardings(state, mesh, sharding.LLM_RULES)
        state = jax.device_put(state, shardings)
        frozen = None if frozen is None else sharding.shard_tree(frozen, mesh, sharding.LLM_RULES)
        step = jax.jit(make_train_step(model.config, optimizer, make_attention(attention, 4, impl="ref"), scale),
                       out_shardings=(shardings, None))
        for _ in range(2):
            state, metrics = step(state, frozen, sharding.shard_batch(batch, mesh))
        return state, metrics

    for lora, attention in ((True, "topk"), (False, "full")):
        single, m1 = one_step(MeshConfig(data=1), jax.devices()[:1], lora, attention)
        multi, m8 = one_step(MeshConfig(data=2, fsdp=4), jax.devices(), lora, attention)
        specs = {leaf.sharding.spec for leaf in jax.tree.leaves(multi["params"])}
        assert any("fsdp" in str(s) for s in specs), specs  # really sharded, not replicated
        assert abs(float(m1["loss"]) - float(m8["loss"])) <= 1e-5 * abs(float(m1["loss"]))
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            error, scale = np.max(np.abs(a - b)), np.max(np.abs(a))
            assert error <= 1e-5 * max(scale, 1e-3), (error, scale)
        print("ok", lora, attention, float(m8["loss"]))
""")


def test_eight_device_step_equals_one_device_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=repo, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("ok") == 2, result.stdout
