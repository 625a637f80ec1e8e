"""Two processes on localhost (jax.distributed, gloo CPU collectives), 2 CPU devices each, train on one
mesh spanning both, the code path of a TPU pod slice: the LoRA step and the controller training equal
the same steps in one process, and runs stopped and resumed end where uninterrupted ones do.

The workers are this file run as a script: `python test_train_multiprocess.py PROCESS PORT TASKS_JSON`
runs each [task, *args] of TASKS_JSON in turn. The tests start both processes with a time bound and
kill them by process id if they outlive it. Launches are slow (imports, the cluster, compiles), so the
first one runs the LoRA steps and the first part of the controller run; the second, new processes,
resumes the controller run from its checkpoint."""
import json
import os
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.e2e  # two processes: make test-slow

TIME_BOUND_S = 300  # for both processes of one launch together
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STOP_AFTER = 8, 5  # controller run: stopped after step 5, resumed from its step-4 checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_two_processes(compile_cache: str, tasks: list) -> None:
    """Run the tasks in two processes on one jax.distributed cluster; fails with the stderr of one that failed.
    compile_cache: a persistent compilation cache the launches share (a second one compiles nothing again)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_COMPILATION_CACHE_DIR": compile_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    port = str(free_port())
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(process), port, json.dumps(tasks)],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for process in range(2)]
    deadline = time.monotonic() + TIME_BOUND_S
    results = []
    try:
        for worker in workers:
            results.append(worker.communicate(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired as late:  # one may have failed and left the other waiting for it
        partial = late.stderr or b""  # bytes, even in text mode
        stderrs = [stderr for _, stderr in results] + [
            partial.decode(errors="replace") if isinstance(partial, bytes) else partial]
        pytest.fail(f"the processes outlived {TIME_BOUND_S} s; their stderr, process 0 first:\n"
                    + "\n----\n".join(stderr[-3000:] for stderr in stderrs))
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.kill(worker.pid, 9)
                worker.wait()
    for worker, (stdout, stderr) in zip(workers, results):
        assert worker.returncode == 0, stderr[-4000:]
        assert stdout.strip().splitlines()[-1] == "ok", stdout


# LoRA sparse fine-tuning steps


def lora_steps(mesh, steps=3, checkpoint_dir=None, stop_after=2):
    """LoRA sparse fine-tuning steps of the tiny model on a fixed batch: (trained adapters, losses).
    checkpoint_dir: after `stop_after` steps, save the state there and go on from a fresh state restored
    from it, as a resumed run does."""
    from adore_jax.train import sharding
    from adore_jax.train.config import FinetuneConfig, LoraConfig
    from adore_jax.train.finetune import make_train_step, setup_training
    from adore_jax.train.forward import make_attention
    from adore_jax.train.loop import Checkpoints
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
    fresh_state = lambda: jax.device_put(state, shardings)  # noqa: E731
    frozen = sharding.shard_tree(frozen, mesh, sharding.LLM_RULES)
    step = jax.jit(make_train_step(model.config, optimizer, make_attention("topk", 4, impl="ref"), scale),
                   out_shardings=(shardings, None))
    current, losses = fresh_state(), []
    for done in range(1, steps + 1):
        current, metrics = step(current, frozen, sharding.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        if checkpoint_dir and done == stop_after:
            checkpoints = Checkpoints(checkpoint_dir, max_to_keep=1, save_every=1)
            checkpoints.save(done, current, {}, {"step": done})
            current, _, _ = checkpoints.restore(done, fresh_state())
            checkpoints.close()
    return current["params"], losses


def lora_worker(process: int, port: str, out: str, checkpoint_dir: str) -> None:
    """LoRA steps with the batch over data x fsdp = 2 x 2 (data across the processes), stopped and resumed."""
    from adore_jax.train import sharding
    from adore_jax.train.config import MeshConfig

    sharding.initialize_distributed(MeshConfig(distributed=True, coordinator_address=f"localhost:{port}",
                                               num_processes=2, process_id=process))
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    params, losses = lora_steps(sharding.make_mesh(MeshConfig(data=2, fsdp=2)), checkpoint_dir=checkpoint_dir)
    params = sharding.host_tree(params)
    if process == 0:
        np.savez(out, losses=np.asarray(losses), **{str(i): x for i, x in enumerate(jax.tree.leaves(params))})


# controller training


def controller_config(run_dir: str, labels_dir: str, *mesh):
    from adore_jax.train.config import ControllerTrainConfig, load_config

    return load_config(ControllerTrainConfig, None, [
        f"run_dir={run_dir}", f"labels_dir={labels_dir}", f"steps={STEPS}", "batch_size=4", "log_every=1",
        "eval_every=0", "checkpoint_every=4", "queries_per_sequence=16", "controller.width=16",
        "controller.hidden=16", "optim.learning_rate=1e-2", "optim.warmup_steps=2", *mesh])


def embeddings_only(path: str):
    """A stand-in for the loaded model: a controller reading input embeddings needs only them."""
    return types.SimpleNamespace(params={"embed": np.load(path)}, config=None)


def controller_worker(process: int, port: str, run_dir: str, labels_dir: str, embed: str, stop_after: int) -> None:
    """Train (or resume) the controller with the batch and w_in split over fsdp = all 4 devices of both
    processes; train_controller starts the cluster itself (when no task before it has)."""
    from adore_jax.train.controller_training import train_controller

    mesh = dict(data=1, fsdp=4, distributed="true", coordinator_address=f"localhost:{port}", num_processes=2,
                process_id=process)
    config = controller_config(run_dir, labels_dir, *[f"mesh.{k}={v}" for k, v in mesh.items()])
    result = train_controller(config, stop_after=stop_after or None, model=embeddings_only(embed))
    assert jax.process_count() == 2 and jax.device_count() == 4
    assert not stop_after or result == {"stopped_at": stop_after}


# the tests


@pytest.fixture(scope="module")
def tiny_labels(tmp_path_factory):
    """(labels directory, the tiny model's embeddings as a .npy file: all of the model the controller uses)."""
    from adore_jax.train import labels
    from adore_jax.train.config import DataConfig, LabelsConfig
    from adore_jax.train.testing import tiny_model

    directory = tmp_path_factory.mktemp("labels")
    config = LabelsConfig(run_dir=str(directory), top_k=4, batch_size=4, data=DataConfig(
        dataset="news", seq_len=48, min_tokens=16, train_sequences=8, validation_sequences=2))
    model = tiny_model()
    labels.run_labels(config, model)
    embed = str(tmp_path_factory.mktemp("embed") / "embed.npy")
    np.save(embed, np.asarray(model.params["embed"]))
    return str(directory), embed


@pytest.fixture(scope="module")
def first_launch(tmp_path_factory, tiny_labels):
    """The LoRA steps, and the controller run up to step STOP_AFTER, by two processes: their paths."""
    root = tmp_path_factory.mktemp("multiprocess")
    paths = {"lora": str(root / "lora.npz"), "controller": str(root / "controller"),
             "compile_cache": str(root / "jax_cache")}
    launch_two_processes(paths["compile_cache"], [
        ["lora", paths["lora"], str(root / "lora_checkpoints")],
        ["controller", paths["controller"], *tiny_labels, STOP_AFTER]])
    return paths


def test_two_processes_take_the_lora_step_as_one_and_resume(first_launch):
    from adore_jax.train import sharding
    from adore_jax.train.config import MeshConfig

    single, losses = lora_steps(sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    multi = np.load(first_launch["lora"])
    np.testing.assert_allclose(multi["losses"], losses, rtol=1e-6)
    assert losses[-1] < losses[0]
    for i, leaf in enumerate(jax.tree.leaves(single)):
        np.testing.assert_allclose(multi[str(i)], np.asarray(leaf), rtol=1e-6, atol=1e-7)


def logged_losses(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_two_processes_train_the_controller_as_one_and_resume(tmp_path, tiny_labels, first_launch):
    from adore_jax.controller import load_controller
    from adore_jax.train.controller_training import train_controller

    multi, single = first_launch["controller"], str(tmp_path / "single")
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["4"]
    launch_two_processes(first_launch["compile_cache"], [["controller", multi, *tiny_labels, 0]])  # resumes at 4
    labels_dir, embed = tiny_labels
    summary = train_controller(controller_config(single, labels_dir), model=embeddings_only(embed))

    # within 1e-6: the losses are f32 means over ~3000 pairs summed in another order (measured <= 4.2e-7)
    assert list(logged_losses(multi)) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(logged_losses(multi).values()), list(logged_losses(single).values()),
                               rtol=0, atol=1e-6)
    with open(os.path.join(multi, "summary.json")) as f:
        multi_summary = json.load(f)
    for key in (k for k in summary if k.startswith("eval_")):
        np.testing.assert_allclose(multi_summary[key], summary[key], rtol=0, atol=1e-6, err_msg=key)
    _, a = load_controller(os.path.join(multi, "controller"), np.load(embed).shape[1])
    _, b = load_controller(os.path.join(single, "controller"), np.load(embed).shape[1])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


WORKERS = {"lora": lora_worker, "controller": controller_worker}

if __name__ == "__main__":
    process, port, tasks = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    for task, *args in tasks:
        WORKERS[task](process, port, *args)
    print("ok", flush=True)
