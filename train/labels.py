"""Top-K attention labels (docs/design.md): which keys each query's ideal sparse attention keeps.

A jit-compiled full-attention pass aggregates the attention of every layer and head into one
[T, T] statistic per sequence and marks, per query t, its top-K keys i <= t:
  mean   (default) top-K of the attention probability averaged over heads and layers;
  max    top-K of max over layers of the head-averaged probability ("per-layer max");
  union  every key in the top-K of at least one (layer, head): may be more than K keys.
Queries with fewer than K predecessors label all of them. With a horizon H > 0 the labels mark
future need instead (docs/results/gap.md: release is permanent, so the current query's top-K is a myopic
target), in one of three forms (`future_need`), always over keys i <= t, the window cut at the
row's last query:
  union       key i is a label of query t if it is in the top-K set of any query in [t, t + H]
              (may be far more than K keys);
  max         the top-K keys of max over t' in [t, t + H] of the statistic at (t', i): exactly
              the ranking of the gap decomposition's perfect future-need scorer, K keys per query;
  discounted  the top-K keys of sum over t' >= t of exp(-(t' - t) / H) times the statistic at (t', i).
Graded labels (`levels`, larger K values): the same ranking cut at each K gives nested sets, and a
key's label counts the sets that hold it (the controller's BCE target is that count over their number:
the mean BCE against every set's labels, so the ranking is trained down to the largest K, which a
cache of m comparable to it needs).
The same pass records, for the evaluation, how many label keys an H2O-style cache of size m would keep: its score is the
accumulated mean attention sum_{s<=t} A[s, i] (computed here from full attention, so it is an
optimistic H2O that never lost a token it later wanted).

Labels are stored compactly, one ArrayRecord record per sequence (see `encode_record`): the
tokens and, per query, a CSR list of label key indices — O(T K), never a [T, T] mask — with each
key's count of sets when the labels are graded.
"""
import io
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.train.forward import attention_mask, causal_attention, forward_hidden
from pallas_kernels import kth_largest

AGGREGATIONS = ("mean", "max", "union")
FUTURE_NEEDS = ("union", "max", "discounted")


def _label_attention(q, k, v, *, valid, top_k, aggregation):
    """Full attention that also returns this layer's statistic: [B,T,T] f32 (or bool for union)."""
    out, probs = causal_attention(q, k, v, valid.astype(jnp.int32))  # padding is its own segment (id 0)
    if aggregation == "union":
        mask = attention_mask(q.shape[1], valid.astype(jnp.int32))[:, None]
        kth = kth_largest(jnp.where(mask, probs, -1.0), top_k)
        stat = jnp.any(mask & (probs >= kth[..., None]), axis=1)
    else:
        stat = jnp.mean(probs, axis=1)
    return out, stat


def union_over_horizon(labels, allowed, horizon: int):
    """labels [B,T,T] bool (query t, key i) -> key i is a label of some query in [t, t + horizon], masked
    by allowed [B,T,T] (i <= t, real tokens)."""
    if horizon == 0:
        return labels
    later = jnp.cumsum(labels[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]  # [B,T,T]: labels of queries >= t
    beyond = jnp.pad(later, ((0, 0), (0, horizon + 1), (0, 0)))[:, horizon + 1:]  # ... of queries > t + horizon
    return allowed & (later > beyond)


def window_max(values, horizon: int):
    """[..., T, T] (query t, key i) -> max over queries t' in [t, t + horizon] (cut at the last query)."""
    out, span = values, 1  # out[t] = max over queries [t, t + span - 1]

    def shifted(x, by):  # row t holds row t + by (-inf past the last query)
        by = min(by, x.shape[-2])
        pad = [(0, 0)] * (x.ndim - 2) + [(0, by), (0, 0)]
        return jnp.pad(x[..., by:, :], pad, constant_values=-jnp.inf)

    while 2 * span <= horizon + 1:
        out, span = jnp.maximum(out, shifted(out, span)), 2 * span
    rest = horizon + 1 - span  # two windows of `span` queries, `rest` apart, cover [t, t + horizon]
    return jnp.maximum(out, shifted(out, rest)) if rest else out


def discounted_future(values, horizon: int):
    """[B, T, T] (query t, key i) -> sum over queries t' >= t of exp(-(t' - t) / horizon) values[t']."""
    decay = np.exp(-1.0 / horizon)

    def step(later, row):  # later: the sum from query t + 1 on
        total = row + decay * later
        return total, total

    _, out = jax.lax.scan(step, jnp.zeros_like(values[:, 0]), values.transpose(1, 0, 2), reverse=True)
    return out.transpose(1, 0, 2)


def top_k_mask(stat, allowed, top_k: int):
    """[B,T,T] statistic -> bool: per query, the top_k allowed keys (every allowed key when fewer)."""
    stat = jnp.where(allowed, stat, -1.0)
    return allowed & (stat >= kth_largest(stat, top_k)[..., None])


def check_target(aggregation: str, future_need: str, top_k: int = 1, levels: tuple = ()) -> None:
    """The label target's options: named errors for unknown ones, for a ranked future need of a union and for
    levels that are not K values above top_k in increasing order."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
    if future_need not in FUTURE_NEEDS:
        raise ValueError(f"future_need must be one of {FUTURE_NEEDS}; got {future_need!r}")
    if future_need != "union" and aggregation == "union":
        raise ValueError(f"future_need={future_need!r} ranks a statistic: it needs aggregation 'mean' or 'max', "
                         "not 'union'")
    if levels and aggregation == "union":
        raise ValueError("levels grade a ranking: they need aggregation 'mean' or 'max', not 'union'")
    if any(k <= below for below, k in zip((top_k, *levels), levels)):
        raise ValueError(f"levels must increase and exceed top_k={top_k}; got {list(levels)}")


def label_pass(params, config, tokens, valid, *, top_k: int, aggregation: str = "mean",
               cache_sizes: tuple = (), horizon: int = 0, future_need: str = "union", levels: tuple = ()):
    """tokens [B,T] int32, valid [B,T] bool (real tokens first, padding after).

    Returns (labels [B,T,T] uint8: 1 where key i is in query t's top-K set, or with horizon H > 0 a
    future-need label of the `future_need` form (module doc); with levels, how many of the nested sets of
    K = top_k, *levels hold it, so 1 + len(levels) marks the top_k set; h2o_hits [B,T,len(cache_sizes)]
    int32: keys of the top_k set inside the top-m of accumulated attention, per cache size m).
    """
    check_target(aggregation, future_need, top_k, levels)
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    def attention(q, k, v):
        return _label_attention(q, k, v, valid=valid, top_k=top_k, aggregation=aggregation)

    _, stats = forward_hidden(params, config, tokens, positions, attention)
    allowed = attention_mask(length, valid.astype(jnp.int32)) & valid[:, None, :]  # [B,T,T]
    mean = sum(s.astype(jnp.float32) for s in stats) / len(stats) if aggregation != "union" else None
    if aggregation == "union":
        sets = [union_over_horizon(allowed & jnp.any(jnp.stack(stats), axis=0), allowed, horizon)]
    else:
        stat = mean if aggregation == "mean" else jnp.max(jnp.stack(stats), axis=0)
        real_queries = valid[:, :, None]  # padding queries never count as future need
        if horizon and future_need == "max":
            stat = window_max(jnp.where(real_queries, stat, -1.0), horizon)
        elif horizon and future_need == "discounted":
            stat = discounted_future(jnp.where(real_queries, stat, 0.0), horizon)
        sets = [top_k_mask(stat, allowed, k) for k in (top_k, *levels)]
        if future_need == "union":
            sets = [union_over_horizon(labels, allowed, horizon) for labels in sets]
    labels = sets[0]  # the top_k set: inside every larger one
    hits = []
    if cache_sizes:
        if mean is None:  # union: the accumulated-attention baseline still needs mean attention
            mean = _mean_attention(params, config, tokens, valid)
        accumulated = jnp.where(allowed, jnp.cumsum(jnp.where(allowed, mean, 0.0), axis=1), -1.0)
        for m in cache_sizes:
            kept = allowed & (accumulated >= kth_largest(accumulated, m)[..., None])
            hits.append(jnp.sum(labels & kept, axis=-1))
    hits = jnp.stack(hits, axis=-1).astype(jnp.int32) if hits else jnp.zeros((batch, length, 0), jnp.int32)
    return sum(labels.astype(jnp.uint8) for labels in sets), hits


def _mean_attention(params, config, tokens, valid):
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    def attention(q, k, v):
        return _label_attention(q, k, v, valid=valid, top_k=1, aggregation="mean")

    _, stats = forward_hidden(params, config, tokens, positions, attention)
    return sum(stats) / len(stats)


label_pass_jit = jax.jit(label_pass, static_argnames=("config", "top_k", "aggregation", "cache_sizes", "horizon",
                                                     "future_need", "levels"))


def mask_to_csr(mask):
    """[T, T] counts (or bool) -> (offsets [T+1] int32, indices [nnz] int32, counts [nnz] uint8), row t
    listing its nonzero keys and their counts."""
    rows, cols = np.nonzero(mask)
    offsets = np.zeros(mask.shape[0] + 1, np.int64)
    np.add.at(offsets, rows + 1, 1)
    return np.cumsum(offsets).astype(np.int32), cols.astype(np.int32), np.asarray(mask[rows, cols], np.uint8)


def csr_to_mask(offsets, indices, length, counts=None):
    """Inverse of `mask_to_csr`: -> [length, length] uint8 counts (1 for every listed key without counts)."""
    mask = np.zeros((length, length), np.uint8)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    mask[rows, indices] = 1 if counts is None else counts
    return mask


def encode_record(tokens, offsets, indices, h2o_hits, counts=None) -> bytes:
    """One sequence's labels as bytes (an .npz): tokens [n], CSR offsets [n+1]/indices, h2o_hits [n, M] and,
    for graded labels, the counts [nnz] of the listed keys."""
    buffer = io.BytesIO()
    index_dtype = np.uint16 if len(tokens) <= np.iinfo(np.uint16).max else np.int32
    graded = {} if counts is None else {"counts": np.asarray(counts, np.uint8)}
    np.savez(buffer, tokens=np.asarray(tokens, np.int32), offsets=np.asarray(offsets, np.int32),
             indices=np.asarray(indices).astype(index_dtype), h2o_hits=np.asarray(h2o_hits, np.int16), **graded)
    return buffer.getvalue()


def decode_record(data: bytes) -> dict:
    """-> tokens, offsets, indices, h2o_hits and, for graded labels, counts."""
    with np.load(io.BytesIO(data)) as f:
        return {name: f[name] for name in f.files}


def write_records(path: str, records) -> int:
    """Write encoded records (bytes) to one ArrayRecord file; returns how many."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = ArrayRecordWriter(path, "group_size:1")
    count = 0
    for record in records:
        writer.write(record)
        count += 1
    writer.close()
    return count


_RECORD_READS = threading.Lock()  # one labels record read at a time, see LabelSource.__getitem__


class LabelSource:
    """Random access to a labels ArrayRecord file (a grain data source): record i -> dict."""

    def __init__(self, path: str):
        import grain

        if not os.path.isfile(path):
            raise FileNotFoundError(f"labels file {path!r} does not exist (run `adore labels` first)")
        self._source = grain.sources.ArrayRecordDataSource([path])
        self.path = path
        if len(self._source) == 0:
            raise ValueError(f"labels file {path!r} holds no sequences: the dataset is empty")

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        # grain's prefetch threads call this concurrently. One two-process test run failed on a record
        # whose .npz header did not parse, which a garbled concurrent read would explain; records are
        # small, so reads are serialized (decoding still runs in parallel).
        with _RECORD_READS:
            data = self._source[index]
        return decode_record(data)


class ConcatSource:
    """Several label sources as one (a grain data source): the records of the first, then of the next..."""

    def __init__(self, sources):
        self.sources = list(sources)
        self._ends = np.cumsum([len(source) for source in self.sources])

    def __len__(self):
        return int(self._ends[-1])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is out of range [0, {len(self)})")
        which = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[which - 1]) if which else 0
        return self.sources[which][index - start]


# What labels must share to train one controller on them together (seq_len may differ: rows are padded).
SHARED_META = ("model", "top_k", "levels", "horizon", "future_need", "aggregation", "cache_sizes", "embed_shape")


def combined_labels(directories):
    """Label directories -> (meta, train source, validation source) over all of them.

    The meta is the first directory's, with seq_len the longest of any (rows are padded to it) and the
    datasets and row counts of each. Raises ValueError naming the field where two directories differ in
    what they label (SHARED_META)."""
    metas = [read_meta(directory) for directory in directories]
    for directory, meta in zip(directories[1:], metas[1:]):
        for key in SHARED_META:
            if meta.get(key) != metas[0].get(key):
                raise ValueError(f"labels in {directory!r} have {key}={meta.get(key)!r} but {directories[0]!r} "
                                 f"has {metas[0].get(key)!r}: labels trained together must share {SHARED_META}")
    meta = dict(metas[0], seq_len=max(meta["seq_len"] for meta in metas),
                dataset=[meta["dataset"] for meta in metas], sequences=[meta["sequences"] for meta in metas])
    sources = [ConcatSource([LabelSource(os.path.join(directory, f"{split}.array_record"))
                             for directory in directories]) for split in ("train", "validation")]
    return meta, *sources


def label_sequences(params, config, rows, *, top_k, aggregation="mean", cache_sizes=(), batch_size=1,
                    progress=None, horizon=0, future_need="union", levels=()):
    """Label token rows (each a 1-D int32 array of one document, length <= T, padded to T here).

    rows: an iterable of arrays that all share the padded length T = len(row) of the first.
    Yields encoded records (bytes), one per row, in order.
    """
    pending = []

    def flush():
        width = len(pending[0])
        tokens = np.zeros((batch_size, width), np.int32)
        valid = np.zeros((batch_size, width), bool)
        for b, (row, length) in enumerate(zip(pending, lengths)):
            tokens[b, :length] = row[:length]
            valid[b, :length] = True
        labels, hits = label_pass_jit(params, config, jnp.asarray(tokens), jnp.asarray(valid), top_k=top_k,
                                      aggregation=aggregation, cache_sizes=tuple(cache_sizes), horizon=horizon,
                                      future_need=future_need, levels=tuple(levels))
        labels, hits = np.asarray(labels), np.asarray(hits)
        out = []
        for b, length in enumerate(lengths):
            offsets, indices, counts = mask_to_csr(labels[b, :length, :length])
            out.append(encode_record(tokens[b, :length], offsets, indices, hits[b, :length],
                                     counts if levels else None))
        return out

    lengths = []
    for row, length in rows:
        if max((top_k, *levels)) > len(row):
            raise ValueError(f"top_k={top_k} and levels={list(levels)} must not exceed the sequence length "
                             f"{len(row)}")
        pending.append(row)
        lengths.append(length)
        if len(pending) == batch_size:
            yield from flush()
            if progress is not None:
                progress.update(len(pending))
            pending, lengths = [], []
    if pending:
        yield from flush()
        if progress is not None:
            progress.update(len(pending))


def write_meta(directory, meta: dict):
    with open(os.path.join(directory, "labels_meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(directory) -> dict:
    path = os.path.join(directory, "labels_meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels directory {directory!r} has no labels_meta.json (run `adore labels`)")
    with open(path) as f:
        return json.load(f)


def document_rows(data_config, split: str, tokenizer, count: int):
    """Up to `count` (0: all) rows (tokens [T] int32, length) of one split, documents truncated to
    seq_len, shorter than min_tokens or of an excluded id skipped, in the seeded shuffle order."""
    from adore_jax.data import BatchConfig, batch_iterator, load_split

    records = load_split(data_config.dataset, split, data_config.data_dir)
    batches = batch_iterator(records, tokenizer, BatchConfig(
        seq_len=data_config.seq_len, batch_size=1, pack=False, shuffle=True, seed=data_config.seed,
        num_epochs=1, drop_remainder=False, exclude_ids=data_config.exclude_ids))
    taken = 0
    for batch in batches:
        length = int(np.sum(batch["segment_ids"][0] > 0))
        if length < data_config.min_tokens:
            continue
        yield batch["tokens"][0], length
        taken += 1
        if count and taken >= count:
            return


def run_labels(config, model=None) -> dict:
    """The `adore labels` stage: label train and validation rows into config.run_dir.

    model: an adore_jax Model (or anything with .config, .params, .tokenizer); None loads config.model.
    Writes train.array_record, validation.array_record, labels_meta.json and config.yaml.
    """
    import time

    from tqdm.auto import tqdm

    from adore_jax.train.config import save_config

    data = config.data
    check_target(config.aggregation, config.future_need, config.top_k, config.levels)
    for name, k in (("top_k", config.top_k), *(("levels", k) for k in config.levels)):
        if k < 1 or k > data.seq_len:
            raise ValueError(f"{name}={k} must be between 1 and the sequence length {data.seq_len}")
    if not 0 <= config.horizon < data.seq_len:
        raise ValueError(f"horizon={config.horizon} must be in [0, seq_len={data.seq_len})")
    if data.min_tokens > data.seq_len:
        raise ValueError(f"data.min_tokens={data.min_tokens} is larger than data.seq_len={data.seq_len}")
    cache_sizes = tuple(int(config.top_k * multiple) for multiple in config.eval_cache_multiples)
    run_dir = os.path.abspath(config.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    save_config(config, os.path.join(run_dir, "config.yaml"))
    if model is None:
        from adore_jax import load_model
        model = load_model(config.model, config.dtype)
    counts, start = {}, time.time()
    for split, count in (("train", data.train_sequences), ("validation", data.validation_sequences)):
        rows = document_rows(data, split, model.tokenizer, count)
        with tqdm(total=count or None, desc=f"labels {split}", dynamic_ncols=True) as progress:
            records = label_sequences(model.params, model.config, rows, top_k=config.top_k,
                                      aggregation=config.aggregation, cache_sizes=cache_sizes,
                                      batch_size=config.batch_size, progress=progress, horizon=config.horizon,
                                      future_need=config.future_need, levels=config.levels)
            path = os.path.join(run_dir, f"{split}.array_record")
            counts[split] = write_records(path, records)
        if counts[split] == 0:
            raise ValueError(f"dataset {data.dataset!r} split {split!r} gave no rows of at least "
                             f"{data.min_tokens} tokens: the dataset is empty")
    meta = {"model": config.model, "dataset": data.dataset, "seq_len": data.seq_len, "top_k": config.top_k,
            "levels": list(config.levels), "horizon": config.horizon, "future_need": config.future_need,
            "aggregation": config.aggregation,
            "cache_sizes": list(cache_sizes), "sequences": counts,
            "embed_shape": list(model.params["embed"].shape), "wall_s": round(time.time() - start, 1)}
    write_meta(run_dir, meta)
    return meta
