"""What every training stage shares: optimiser, orbax checkpoints, JSONL/progress logging, plots."""
import json
import os
import time
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
            [optax.linear_schedule(0.0, optim.learning_rate, max(warmup, 1)), optax.constant_schedule(optim.learning_rate)],
            [max(warmup, 1)])
    else:
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant'; got {optim.schedule!r}")
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=mask))
    return optax.chain(*parts), schedule


class Checkpoints:
    """orbax CheckpointManager over {state: params + optimiser state, data: iterator state, meta}.

    Restoring checks every array's shape against the template, so a checkpoint of another model
    shape is refused with the offending path rather than silently broadcast."""

    def __init__(self, directory: str, max_to_keep: int, save_every: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False))
        self.save_every = save_every

    def latest_step(self):
        return self.manager.latest_step()

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
        restored = self.manager.restore(step, args=args.Composite(
            state=args.StandardRestore(abstract), data=args.JsonRestore()))
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
    """Append-only JSONL metrics plus a tqdm progress bar."""

    def __init__(self, path: str, total_steps: int, initial_step: int = 0, desc: str = "train"):
        from tqdm.auto import tqdm

        self.path = path
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


def run_steps(state, iterator, step_fn, *, first_step: int, total_steps: int, log: MetricsLog,
              checkpoints: Checkpoints, schedule, evaluate, log_every: int, eval_every: int, meta,
              stop_after=None):
    """The step loop every stage shares; returns (state, the final held-out metrics), or
    (state, {"stopped_at": step}) when stopped early.

    step_fn(state, batch, step) -> (state, metrics); evaluate(step, state) -> metrics (logged).
    Each step: train, log every `log_every` (with the learning rate and a digest of the batch's
    tokens, so a resumed run can be compared step by step), evaluate every `eval_every`, and hand
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
