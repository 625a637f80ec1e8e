"""Training runs as a user resumes them: metrics without repeated steps, damaged checkpoints, leftovers."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from adore_jax.train.loop import Checkpoints, CheckpointWarning, MetricsLog, read_metrics


def _write_metrics(path, steps):
    with open(path, "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")


def test_a_resumed_run_drops_the_metrics_logged_after_its_checkpoint(tmp_path):
    """Killed at step 10 with the last checkpoint at 6: steps 7-10 are logged again by the resumed run."""
    path = str(tmp_path / "metrics.jsonl")
    _write_metrics(path, range(1, 11))
    log = MetricsLog(path, total_steps=20, initial_step=6)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 6]
    log.log(7, loss=0.5)
    log.close()
    steps = [r["step"] for r in read_metrics(path)]
    assert steps == sorted(steps) == list(range(1, 8)), "the steps loop back"


def test_a_fresh_run_starts_a_fresh_metrics_file(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    _write_metrics(path, range(1, 4))
    MetricsLog(path, total_steps=5, initial_step=0).close()
    assert read_metrics(path) == []


def _save_three(directory):
    checkpoints = Checkpoints(directory, max_to_keep=5, save_every=1)
    for step in (1, 2, 3):
        state = {"w": jnp.full((2, 3), float(step)), "b": jnp.arange(3.0) + step}
        checkpoints.save(step, state, {"position": step}, {"step": step})
    checkpoints.close()
    return {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    directory = str(tmp_path / "checkpoints")
    template = _save_three(directory)
    os.remove(os.path.join(directory, "3", "state", "_METADATA"))  # a kill or a disk error mid-write
    checkpoints = Checkpoints(directory, max_to_keep=5, save_every=1)
    with pytest.warns(CheckpointWarning, match=r"step 3 .* damaged .* resuming from step 2"):
        step = checkpoints.latest_step()
    assert step == 2
    state, data, meta = checkpoints.restore(step, template)
    np.testing.assert_array_equal(state["w"], np.full((2, 3), 2.0))
    assert data == {"position": 2} and meta == {"step": 2}
    assert os.path.isdir(str(tmp_path / "checkpoints.damaged" / "3")), "the damaged checkpoint is kept aside"
    # the resumed run saves step 3 again: the damaged folder no longer blocks it
    assert checkpoints.save(3, template, {"position": 3}, {"step": 3})
    assert checkpoints.latest_step() == 3


def test_leftover_temporary_checkpoint_folders_are_removed(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_three(str(directory))
    leftover = directory / "4.orbax-checkpoint-tmp-1712345678"
    (leftover / "state").mkdir(parents=True)
    checkpoints = Checkpoints(str(directory), max_to_keep=5, save_every=1)
    assert not leftover.exists()
    assert checkpoints.latest_step() == 3
