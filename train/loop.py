"""What every training stage shares: optimiser, orbax checkpoints, JSONL/progress logging, plots."""
import json
import os
import shutil
import time
import warnings
import zlib

import jax
import numpy as np
import optax


def make_optimizer(optim, total_steps: int, mask=None):
    """AdamW with linear warm-up, cosine (or constant) decay and global-norm clipping."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    if optim.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, optim.learning_rate, warmup, max(total_steps, warmup + 1), optim.learning_rate * optim.end_fraction)
    elif optim.schedule == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, optim.learning_rate, max(warmup, 1)),
             optax.constant_schedule(optim.learning_rate)],
            [max(warmup, 1)])
    else:
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant'; got {optim.schedule!r}")
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=mask))
    return optax.chain(*parts), schedule


TMP_MARKER = ".orbax-checkpoint-tmp"  # in the name of a save in progress (orbax renames it when done)


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was set aside and the run resumes from an earlier one."""


def _first_line(error) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= 200 else line[:200] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


class Checkpoints:
    """orbax CheckpointManager over {state: params + optimiser state, data: iterator state, meta}.

    Restoring checks every array's shape against the template, so a checkpoint of another model
    shape is refused with the offending path rather than silently broadcast.
    Folders of saves that never finished (orbax's `*.orbax-checkpoint-tmp-*`) are removed when the
    manager opens. `latest_step()` is the newest checkpoint that can be read: a damaged newer one
    (metadata or JSON items unreadable) is moved to `<directory>.damaged/<step>` with a
    CheckpointWarning, so the run resumes from the one before it and can save that step again; a
    checkpoint whose arrays fail to restore is an error naming the folder to delete."""

    def __init__(self, directory: str, max_to_keep: int, save_every: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._max_to_keep = max_to_keep
        self.directory = os.path.abspath(directory)
        self.removed_leftovers = self._remove_leftovers()
        self.manager = self._open()
        self.save_every = save_every

    def _remove_leftovers(self) -> list:
        """Remove the folders of saves that never finished (a run killed while saving); returns their names."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return []
        leftovers = sorted(name for name in os.listdir(self.directory) if TMP_MARKER in name)
        for name in leftovers:
            path = os.path.join(self.directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return leftovers

    def _open(self):
        ocp = self._ocp
        return ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True))

    def _problem(self, step: int):
        """Why checkpoint `step` cannot be resumed from (None: it looks whole)."""
        args = self._ocp.args
        try:
            metadata = self.manager.item_metadata(step)
            missing = [item for item in ("state", "data", "meta") if metadata is None or metadata.get(item) is None]
            if missing and "state" in missing:
                return "the metadata of its arrays is missing or unreadable"
            self.manager.restore(step, args=args.Composite(meta=args.JsonRestore(), data=args.JsonRestore()))
        except Exception as error:  # noqa: BLE001  any storage error: the checkpoint is damaged
            return _first_line(error)
        return None

    def latest_step(self):
        """The newest readable checkpoint's step (None: none); damaged newer ones are set aside (see the class)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self._problem(step)
            if problem is None:
                return step
            self._set_aside(step, problem)
        return None

    def _set_aside(self, step: int, problem: str) -> None:
        damaged = f"{self.directory}.damaged"
        target = os.path.join(damaged, str(step))
        if jax.process_index() == 0:
            os.makedirs(damaged, exist_ok=True)
            if os.path.exists(target):
                target = f"{target}.{int(time.time())}"
            shutil.move(os.path.join(self.directory, str(step)), target)
        earlier = [s for s in self.manager.all_steps() if s < step]
        warnings.warn(CheckpointWarning(
            f"checkpoint step {step} in {self.directory} is damaged ({problem}); moved it to {target} and "
            + (f"resuming from step {max(earlier)}" if earlier else "no earlier checkpoint is left: starting over")),
            stacklevel=3)
        self.manager.close()
        self.manager = self._open()

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Save at every save_every-th step (or when forced); returns whether it saved."""
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        args = self._ocp.args
        saved = self.manager.save(step, args=args.Composite(
            state=args.StandardSave(state), data=args.JsonSave(data_state), meta=args.JsonSave(meta)), force=force)
        self.manager.wait_until_finished()
        return saved

    def restore(self, step: int, template):
        """-> (state, data_state, meta); template: the state pytree (arrays with target shardings)."""
        args = self._ocp.args
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), template)
        meta = self.manager.restore(step, args=args.Composite(meta=args.JsonRestore()))["meta"]
        self._check_shapes(step, abstract)
        try:
            restored = self.manager.restore(step, args=args.Composite(
                state=args.StandardRestore(abstract), data=args.JsonRestore()))
        except Exception as error:  # noqa: BLE001  a storage error deep inside orbax / tensorstore
            earlier = [s for s in self.manager.all_steps() if s < step]
            then = f" to resume from step {max(earlier)}" if earlier else " to start over"
            raise ValueError(f"checkpoint step {step} in {self.directory} cannot be read, it is damaged "
                             f"({_first_line(error)}); delete {os.path.join(self.directory, str(step))}{then}") \
                from None
        return restored["state"], restored["data"], meta

    def _check_shapes(self, step, abstract):
        """Refuse a checkpoint whose arrays differ from the template (orbax would fail obscurely)."""
        saved = self.manager.item_metadata(step)["state"].tree
        is_leaf = lambda x: hasattr(x, "shape") and not isinstance(x, (dict, list, tuple))
        have = [tuple(x.shape) for x in jax.tree.leaves(saved, is_leaf=is_leaf)]
        want = jax.tree_util.tree_leaves_with_path(abstract)
        problems = [f"{jax.tree_util.keystr(path)}: checkpoint {shape}, this run {tuple(x.shape)}"
                    for (path, x), shape in zip(want, have) if tuple(x.shape) != shape]
        if len(have) != len(want):
            problems.insert(0, f"{len(have)} arrays in the checkpoint, {len(want)} in this run")
        if problems:
            raise ValueError(f"checkpoint {self.directory} step {step} is from a different model shape "
                             f"(or optimiser): " + "; ".join(problems[:4]))

    def close(self):
        self.manager.close()


class MetricsLog:
    """Append-only JSONL metrics plus a tqdm progress bar.

    A run that starts at `initial_step` (the checkpoint it resumed from; 0 for a fresh run) first drops
    the records past that step: a killed run logged them after its last checkpoint, and the resumed run
    logs those steps again, so the file (and its plots) never loops back. The file is rewritten whole
    (a temporary file, then a rename), so a kill cannot leave it half-written."""

    def __init__(self, path: str, total_steps: int, initial_step: int = 0, desc: str = "train"):
        from tqdm.auto import tqdm

        self.path = path
        if jax.process_index() == 0:
            drop_records_after(path, initial_step)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True,
                        disable=jax.process_index() != 0)
        self._start = time.time()

    def log(self, step: int, **metrics):
        record = {"step": int(step), "time_s": round(time.time() - self._start, 3),
                  **{k: _plain(v) for k, v in metrics.items()}}
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            shown = {k: f"{v:.4g}" for k, v in record.items()
                     if isinstance(v, float) and k in ("loss", "eval_loss", "grad_norm")}
            self.bar.set_postfix(shown, refresh=False)
        return record

    def advance(self, steps: int = 1):
        self.bar.update(steps)

    def close(self):
        self.bar.close()


def drop_records_after(path: str, step: int) -> int:
    """Remove the JSONL records of `path` whose step is past `step` (all of them when step is 0, a fresh
    start); returns how many were removed. Lines that do not parse are kept as they are."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()

    def stale(line):
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return isinstance(record, dict) and isinstance(record.get("step"), int) and (
            record["step"] > step or step == 0)

    kept = [line for line in lines if line.strip() and not stale(line)]
    removed = sum(1 for line in lines if line.strip()) - len(kept)
    if removed:
        temporary = f"{path}.tmp"
        with open(temporary, "w") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
        os.replace(temporary, path)
    return removed


def run_steps(state, iterator, step_fn, *, first_step: int, total_steps: int, log: MetricsLog,
              checkpoints: Checkpoints, schedule, evaluate, log_every: int, eval_every: int, meta,
              stop_after=None):
    """The step loop every stage shares; returns (state, the final held-out metrics), or
    (state, {"stopped_at": step}) when stopped early.

    step_fn(state, batch, step) -> (state, metrics); evaluate(step, state) -> metrics (logged).
    Each step: train, log every `log_every` (with the learning rate and a digest of the batch's
    tokens, so a resumed run can be compared step by step: of process 0's rows when each process loads
    only its own), evaluate every `eval_every`, and hand
    the checkpoint manager the state with the iterator's state and `meta(step)` (the last step is
    always saved). stop_after: end right after that step and its checkpoint, as if killed.
    """
    stopped_at = None
    for step in range(first_step, total_steps):
        batch = next(iterator)
        state, metrics = step_fn(state, batch, step)
        done = step + 1
        log.advance()
        if done % log_every == 0 or done == total_steps:
            log.log(done, **jax.device_get(metrics), learning_rate=float(schedule(step)),
                    data_digest=zlib.crc32(np.ascontiguousarray(np.asarray(batch["tokens"])).tobytes()))
        if eval_every and done % eval_every == 0 and done != total_steps:
            evaluate(done, state)
        checkpoints.save(done, state, iterator.get_state(), meta(done), force=done == total_steps)
        if stop_after is not None and done >= stop_after:
            stopped_at = done
            break
    result = {"stopped_at": stopped_at} if stopped_at else evaluate(total_steps, state)
    log.close()
    checkpoints.close()
    return state, result


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_path: str, keys) -> str:
    """One panel per metric key found in the JSONL, against the step; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return ""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def record_config(config, run_dir: str, resumed: bool) -> None:
    """Write the run's config.yaml once its checkpoint (if any) has been restored, so a resume that fails
    (another model shape) leaves the recorded config alone; warn when a resume changes settings.
    Process 0 alone reads and writes it (another process could read it half-written)."""
    import warnings

    from adore_jax.configfile import read_yaml, save_config, to_dict

    if jax.process_index() != 0:
        return
    path = os.path.join(run_dir, "config.yaml")
    if resumed and os.path.isfile(path):
        old, new = read_yaml(path), to_dict(config)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            warnings.warn(f"resuming {run_dir} with changed settings: {', '.join(changed)} "
                          "(the learning-rate schedule and data order follow the new values)", stacklevel=2)
    save_config(config, path)
