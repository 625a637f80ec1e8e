"""Train the ADORE controller on top-K labels (docs/design.md): BCE over all pairs i <= t, or a listwise loss.

Graded labels (`adore labels` with levels: nested top-K sets for K = top_k, *levels) train the BCE on
the share of the sets that hold each key, which is the mean BCE against each set's labels; the held-out
metrics and the listwise loss use the top_k set.

    summary = train_controller(load_config(ControllerTrainConfig, "configs/train_controller_smollm2.yaml"))

Held-out metrics, per cache size m (= K x the labels' eval_cache_multiples), over the queries t
whose history is longer than m (shorter ones keep everything, recall 1 for every method):
  recall@m     |top-m controller scores of keys <= t  ∩  label set of t| / |label set of t|
  precision@m  the same hits / m
  recency / h2o recall@m: the last m tokens; the top-m accumulated attention (from the labels pass)
The kept set is the best m for each query on its own (no release history), so it measures how
well the score ranks keys, the quantity ADORE's release step relies on.
  release recall@m   the same recall when the kept set has a history: one token released for good per
                     query, the lowest-scored for that query (`release_recall`), as decoding does.
"""
import dataclasses
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adore_jax.controller import (
    ControllerConfig,
    encode_sequence,
    init_controller,
    pairwise_scores,
    save_controller,
    score,
)
from adore_jax.train import labels as label_io
from adore_jax.train import sharding
from adore_jax.train.config import ControllerTrainConfig
from adore_jax.train.controller_inputs import controller_inputs
from adore_jax.train.loop import Checkpoints, MetricsLog, make_optimizer, plot_metrics, record_config, run_steps
from pallas_kernels import kth_largest


class DenseLabels(grain.transforms.Map):
    """A decoded label record -> fixed-shape arrays of padded length T (labels: uint8 counts of the nested
    top-K sets holding each key, 1 for every label of ungraded records)."""

    def __init__(self, length: int):
        self.length = length

    def map(self, record):
        n, t = len(record["tokens"]), self.length
        tokens = np.zeros(t, np.int32)
        tokens[:n] = record["tokens"]
        valid = np.arange(t) < n
        labels = np.zeros((t, t), np.uint8)
        labels[:n, :n] = label_io.csr_to_mask(record["offsets"], record["indices"], n, record.get("counts"))
        hits = np.zeros((t, record["h2o_hits"].shape[1]), np.int32)
        hits[:n] = record["h2o_hits"]
        return {"tokens": tokens, "valid": valid, "labels": labels, "h2o_hits": hits}


def label_iterator(source, length: int, batch_size: int, seed: int, shuffle: bool = True, num_epochs=None,
                   rows=None):
    """Checkpointable batches of dense labels: grain shuffles anew every epoch.

    rows: the rows of every batch to expand and return (this process's share of the global batch, see
    sharding.process_rows; None: all). The iterator's state counts the records of whole batches, so it is
    the same on every process (process 0 saves it)."""
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dense = DenseLabels(length)
    rows = range(batch_size) if rows is None else rows

    def dense_rows(records):  # a last, partial batch (num_epochs set) keeps the rows it has
        return jax.tree.map(lambda *values: np.stack(values),
                            *[dense.map(records[row]) for row in rows if row < len(records)])

    return iter(dataset.repeat(num_epochs).to_iter_dataset().batch(
        batch_size, drop_remainder=num_epochs is None, batch_fn=dense_rows))


def query_scores(config: ControllerConfig, params, states, features, query_index):
    """Score logits of every key for some queries: states [B,T,c], features [B,T,h], query_index [Q]
    -> [B, Q, T] (callers mask keys after the query)."""
    batch, length = states.shape[:2]
    positions = jnp.arange(length)

    def one(t):
        return score(config, params, features, positions, states[:, t], jnp.full((batch,), t))

    return jax.vmap(one, out_axes=1)(query_index)


def pair_mask(valid, query_index):
    """[B,T] valid, [Q] queries -> [B,Q,T] bool: key i <= t, both real tokens."""
    keys = jnp.arange(valid.shape[1])
    return (keys[None, None, :] <= query_index[None, :, None]) & valid[:, None, :] & valid[:, query_index, None]


def controller_loss(config: ControllerConfig, params, embed, batch, query_index, positive_weight=1.0, loss="bce",
                    sets=1):
    """The training loss over the pairs (t in query_index, i <= t) of real tokens. Returns (loss, metrics).

    batch["labels"] [B,T,T]: how many of the `sets` nested top-K sets hold each key (0 or 1 ungraded).
    bce       mean binary cross-entropy of every pair against that count / sets (pairs in any set weighted
              by positive_weight);
    listwise  per query, the mean over its top_k keys (in every set) of -log softmax(scores over keys
              i <= t): the labels must outrank the rest of the history, which is what a top-m cache decides.
    """
    x = jax.lax.stop_gradient(embed[batch["tokens"]])  # the LLM's frozen input embeddings [B,T,E]
    states, features, _ = encode_sequence(config, params, x, batch["valid"])
    logits = query_scores(config, params, states, features, query_index)  # [B,Q,T]
    counts = batch["labels"][:, query_index, :]
    mask = pair_mask(batch["valid"], query_index)
    if loss == "listwise":
        logp = jax.nn.log_softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
        positives = (counts == sets) & mask
        count = jnp.sum(positives, axis=-1)  # [B,Q]
        per_query = -jnp.sum(jnp.where(positives, logp, 0.0), axis=-1) / jnp.maximum(count, 1)
        value = jnp.sum(per_query) / jnp.maximum(jnp.sum(count > 0), 1)
        return value, {"loss": value}
    weight = jnp.where(counts > 0, positive_weight, 1.0) * mask
    bce = optax.sigmoid_binary_cross_entropy(logits, counts.astype(jnp.float32) / sets)
    value = jnp.sum(bce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return value, {"loss": value}


def sample_queries(key, length: int, count: int):
    if count <= 0 or count >= length:
        return jnp.arange(length)
    return jnp.sort(jax.random.choice(key, length, (count,), replace=False))


def make_train_step(config: ControllerConfig, optimizer, queries: int, positive_weight: float, seed: int,
                    loss: str = "bce", sets: int = 1):
    def train_step(state, embed, batch, step):
        query_index = sample_queries(jax.random.fold_in(jax.random.key(seed), step), batch["tokens"].shape[1],
                                     queries)
        grad_fn = jax.value_and_grad(controller_loss, argnums=1, has_aux=True)
        (_, metrics), grads = grad_fn(config, state["params"], embed, batch, query_index, positive_weight, loss,
                                        sets)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {"params": params, "opt_state": opt_state}, metrics
    return train_step


def eval_counts(config: ControllerConfig, params, embed, batch, cache_sizes, sets=1):
    """Per-query counts for the held-out metrics, against the top_k set: dict of [B,T] / [B,T,M] arrays."""
    x = embed[batch["tokens"]]
    valid, labels = batch["valid"], batch["labels"] == sets
    states, features, _ = encode_sequence(config, params, x, valid)
    logits = pairwise_scores(config, params, states, features)  # [B,T,T]
    length = valid.shape[1]
    allowed = pair_mask(valid, jnp.arange(length))
    bce = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
    masked = jnp.where(allowed, logits, -jnp.inf)
    keys = jnp.arange(length)
    hits, recent = [], []
    for m in cache_sizes:
        kth = kth_largest(masked, m)
        hits.append(jnp.sum(labels & allowed & (masked >= kth[..., None]), axis=-1))
        in_window = keys[None, :] > keys[:, None] - m  # [T,T]
        recent.append(jnp.sum(labels & allowed & in_window[None], axis=-1))
    predicted = allowed & (logits > 0)
    return {
        "logits": logits, "hits": jnp.stack(hits, -1), "recency_hits": jnp.stack(recent, -1),
        "labels": jnp.sum(labels & allowed, -1),
        "bce_sum": jnp.sum(jnp.where(allowed, bce, 0.0), -1), "pairs": jnp.sum(allowed, -1),
        "true_positive": jnp.sum(predicted & labels, -1), "predicted": jnp.sum(predicted, -1),
    }


def release_recall(logits, labels, length: int, cache_size: int):
    """Recall under release history: a cache of m that takes every token and, once full, releases for
    good the lowest-scored one for the current query (what a decode loop does, one token per step).

    logits, labels: [T, T] of one row; length: its real tokens. Returns [length] float: the fraction of
    query t's labels still kept, NaN where t < m (nothing released yet) or t has no label.
    """
    kept = np.zeros(0, np.int64)
    out = np.full(length, np.nan)
    for t in range(length):
        kept = np.append(kept, t)
        if len(kept) > cache_size:
            kept = np.delete(kept, np.argmin(logits[t, kept]))
        wanted = labels[t, :t + 1].sum()
        if t >= cache_size and wanted:
            out[t] = labels[t, kept].sum() / wanted
    return out


def evaluate(eval_fn, params, embed, batches, cache_sizes, top_k, sets=1):
    """Aggregate held-out metrics over batches (see the module doc), against the top_k set."""
    sums = {}
    recall = {name: {m: [] for m in cache_sizes} for name in ("controller", "recency", "h2o", "release")}
    precision = {m: [] for m in cache_sizes}
    for batch in batches:
        counts = jax.device_get(eval_fn(params, embed, {k: batch[k] for k in ("tokens", "valid", "labels")}))
        for key in ("bce_sum", "pairs", "true_positive", "predicted", "labels"):
            sums[key] = sums.get(key, 0) + float(np.sum(counts[key]))
        positions = np.arange(batch["valid"].shape[1])
        for j, m in enumerate(cache_sizes):
            use = batch["valid"] & (positions[None] + 1 > m) & (counts["labels"] > 0)
            n = np.maximum(counts["labels"], 1)
            recall["controller"][m].append((counts["hits"][..., j] / n)[use])
            recall["recency"][m].append((counts["recency_hits"][..., j] / n)[use])
            recall["h2o"][m].append((batch["h2o_hits"][..., j] / n)[use])
            precision[m].append((counts["hits"][..., j] / m)[use])
            for b, length in enumerate(batch["valid"].sum(axis=1)):
                history = release_recall(counts["logits"][b], batch["labels"][b] == sets, int(length), m)
                recall["release"][m].append(history[~np.isnan(history)])
    metrics = {
        "eval_loss": sums["bce_sum"] / max(sums["pairs"], 1),
        "eval_precision@0.5": sums["true_positive"] / max(sums["predicted"], 1),
        "eval_recall@0.5": sums["true_positive"] / max(sums["labels"], 1),
    }
    for m in cache_sizes:
        tag = f"m={m}" if m % top_k else f"m={m // top_k}K"
        for name, values in recall.items():
            joined = np.concatenate(values[m]) if values[m] else np.zeros(0)
            metrics[f"eval_recall_{name}@{tag}"] = float(joined.mean()) if joined.size else float("nan")
        joined = np.concatenate(precision[m]) if precision[m] else np.zeros(0)
        metrics[f"eval_precision@{tag}"] = float(joined.mean()) if joined.size else float("nan")
    return metrics


def eval_batches(source, length, count):
    """The first `count` rows of a label source (all when count <= 0) as dense batches of one row."""
    total = len(source) if count <= 0 else min(count, len(source))
    dense = DenseLabels(length)
    for index in range(total):
        record = dense.map(source[index])
        yield {k: v[None] for k, v in record.items()}


def train_controller(config: ControllerTrainConfig, stop_after=None, model=None) -> dict:
    """Run (or resume) one controller training run; returns the final held-out metrics.

    stop_after: end right after this step (and its checkpoint), as if killed: for resume tests.
    model: the loaded LLM (adore_jax.load_model; its input embeddings, or with the controller's input_layer
    its first layers, give the controller's inputs); None loads config.model.
    """
    run_dir = os.path.abspath(config.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    sharding.initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh)
    meta, train_source, eval_source = label_io.combined_labels((config.labels_dir, *config.more_labels_dirs))
    length, top_k = meta["seq_len"], meta["top_k"]
    sets = 1 + len(meta.get("levels", ()))  # nested top-K sets of graded labels
    if sets > 1 and config.loss != "bce":
        raise ValueError(f"labels in {config.labels_dir!r} are graded (levels {meta['levels']}): loss must be "
                         f"'bce', not {config.loss!r}")
    cache_sizes = tuple(meta["cache_sizes"])
    if model is None:
        from adore_jax import load_model
        model = load_model(config.model)
    embed = model.params["embed"]
    if meta.get("embed_shape") and list(embed.shape) != list(meta["embed_shape"]):
        raise ValueError(f"labels in {config.labels_dir!r} were made with embeddings {meta['embed_shape']}, "
                         f"but model {config.model!r} has {list(embed.shape)}")
    ccfg = dataclasses.replace(config.controller, embed_dim=embed.shape[1])
    from tqdm.auto import tqdm
    with tqdm(total=len(train_source) + len(eval_source), desc=f"hidden states after {ccfg.input_layer} layers",
              dynamic_ncols=True, disable=jax.process_index() != 0 or ccfg.input_layer is None) as bar:
        # the inputs: the embeddings, or a table of hidden states that the records' tokens index
        embed, (train_source, eval_source) = controller_inputs(model, ccfg, (train_source, eval_source), bar.update)
    optimizer, schedule = make_optimizer(config.optim, config.steps)
    params = init_controller(ccfg, jax.random.key(config.seed))
    state = {"params": params, "opt_state": optimizer.init(params)}
    state_shardings = sharding.tree_shardings(state, mesh, sharding.LLM_RULES)
    state = jax.device_put(state, state_shardings)
    embed = sharding.shard_tree({"embed": embed}, mesh, sharding.LLM_RULES)["embed"]

    iterator = label_iterator(train_source, length, config.batch_size, config.seed,
                              rows=sharding.process_rows(mesh, config.batch_size))
    checkpoints = Checkpoints(os.path.join(run_dir, "checkpoints"), config.max_to_keep, config.checkpoint_every)
    start = 0
    if checkpoints.latest_step() is not None:
        start = checkpoints.latest_step()
        state, data_state, _ = checkpoints.restore(start, state)
        iterator.set_state(data_state)
    record_config(config, run_dir, resumed=bool(start))

    step_fn = jax.jit(make_train_step(ccfg, optimizer, config.queries_per_sequence, config.positive_weight,
                                      config.seed, config.loss, sets),
                      out_shardings=(state_shardings, None), donate_argnums=0)
    counts_fn = jax.jit(lambda p, e, b: eval_counts(ccfg, p, e, b, cache_sizes, sets),
                        out_shardings=sharding.replicated(mesh))

    def eval_fn(params, embed, batch):  # every process evaluates every held-out row
        return counts_fn(params, embed, sharding.replicate(batch, mesh))

    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), config.steps, start, desc="controller")

    def run_eval(step, state):
        metrics = evaluate(eval_fn, state["params"], embed, eval_batches(eval_source, length, config.eval_sequences),
                           cache_sizes, top_k, sets)
        return log.log(step, **metrics)

    def train_step(state, batch, step):
        device_batch = sharding.put_process_batch({k: batch[k] for k in ("tokens", "valid", "labels")}, mesh,
                                                  config.batch_size)
        return step_fn(state, embed, device_batch, jnp.asarray(step, jnp.int32))

    state, final = run_steps(state, iterator, train_step, first_step=start, total_steps=config.steps, log=log,
                             checkpoints=checkpoints, schedule=schedule, evaluate=run_eval,
                             log_every=config.log_every, eval_every=config.eval_every,
                             meta=lambda step: {"step": step, "top_k": top_k}, stop_after=stop_after)
    if "stopped_at" in final:
        return final
    export_dir = config.export_dir or os.path.join(run_dir, "controller")
    save_controller(export_dir, ccfg, sharding.host_tree(state["params"]))
    if jax.process_index() == 0:
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        plot_metrics(metrics_path, os.path.join(run_dir, "loss.png"), ["loss", "eval_loss", "grad_norm"])
        recall_keys = [k for k in final if k.startswith("eval_recall_")]
        plot_metrics(metrics_path, os.path.join(run_dir, "recall.png"), recall_keys)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({**final, "export_dir": export_dir, "top_k": top_k, "cache_sizes": list(cache_sizes)}, f,
                      indent=2)
    return final
