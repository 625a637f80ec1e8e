"""Top-K labels: equal to a brute-force numpy top-K; compact storage; bad input refused."""
import numpy as np
import pytest

from adore_jax.train import labels
from adore_jax.train.config import DataConfig, LabelsConfig
from adore_jax.train.testing import tiny_model


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, inv_freq):
    angles = np.arange(x.shape[0])[:, None] * inv_freq  # [T, D/2]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    x1, x2 = np.split(x, 2, -1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def numpy_attention(params, cfg, tokens):
    """Brute force: per layer, per head attention probabilities [L, H, T, T] of one sequence."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "layers"}
    layers = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params["layers"]]
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    x, t, out = p["embed"][tokens], len(tokens), []
    group = cfg.num_heads // cfg.num_kv_heads
    for layer in layers:
        h = _rms(x, layer["attn_norm"], cfg.rms_norm_eps)
        q = _rope((h @ layer["wq"]).reshape(t, cfg.num_heads, -1), inv_freq)
        k = _rope((h @ layer["wk"]).reshape(t, cfg.num_kv_heads, -1), inv_freq)
        v = (h @ layer["wv"]).reshape(t, cfg.num_kv_heads, -1)
        k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
        logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(cfg.head_dim)
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out.append(probs)
        x = x + np.einsum("hts,shd->thd", probs, v).reshape(t, -1) @ layer["wo"]
        h = _rms(x, layer["mlp_norm"], cfg.rms_norm_eps)
        gate = h @ layer["w_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ layer["w_up"])) @ layer["w_down"]
    return np.stack(out)


def brute_force_labels(probs, top_k, aggregation):
    """[L, H, T, T] -> [T, T] bool by sorting each row in numpy."""
    layers, heads, t, _ = probs.shape
    mask = np.zeros((t, t), bool)
    for query in range(t):
        if aggregation == "union":
            for l in range(layers):
                for h in range(heads):
                    mask[query, np.argsort(-probs[l, h, query, :query + 1])[:top_k]] = True
            continue
        per_layer = probs[:, :, query, :query + 1].mean(1)
        stat = per_layer.mean(0) if aggregation == "mean" else per_layer.max(0)
        mask[query, np.argsort(-stat)[:top_k]] = True
    return mask


def padded_batch(seed, valid_length, length=24):
    """Two random rows [2, length]: the first padded after valid_length tokens, the second full."""
    tokens = np.zeros((2, length), np.int32)
    tokens[:, :valid_length] = np.random.default_rng(seed).integers(2, 258, (2, valid_length))
    valid = np.arange(length)[None] < np.array([[valid_length], [length]])
    return tokens, valid


@pytest.mark.parametrize("aggregation", ["mean", "max", "union"])
def test_labels_equal_brute_force_top_k(aggregation):
    model = tiny_model()
    length, valid_length, top_k = 24, 20, 5
    tokens, valid = padded_batch(0, valid_length, length)
    got, hits = labels.label_pass_jit(model.params, model.config, tokens, valid, top_k=top_k,
                                      aggregation=aggregation, cache_sizes=(5, 10))
    got = np.asarray(got)
    for b, n in enumerate((valid_length, length)):
        probs = numpy_attention(model.params, model.config, tokens[b, :n])
        want = brute_force_labels(probs, top_k, aggregation)
        np.testing.assert_array_equal(got[b, :n, :n], want)
        assert not got[b, n:].any() and not got[b, :, n:].any()
    counts = got[1].sum(-1)
    if aggregation != "union":  # exactly min(t + 1, K) keys per query
        np.testing.assert_array_equal(counts, np.minimum(np.arange(length) + 1, top_k))
    second = np.asarray(hits)[1]
    assert np.all(second[:, 0] <= counts) and np.all(second[:, 1] >= second[:, 0])


@pytest.mark.parametrize("horizon", [1, 4, 30])
def test_future_need_labels_equal_brute_force(horizon):
    """Key i is a future-need label of query t iff it is in the top-K set of some query in [t, t + H]."""
    model = tiny_model()
    length, valid_length, top_k = 24, 19, 3
    tokens, valid = padded_batch(2, valid_length, length)
    got, _ = labels.label_pass_jit(model.params, model.config, tokens, valid, top_k=top_k, horizon=horizon)
    got = np.asarray(got)
    for b, n in enumerate((valid_length, length)):
        now = brute_force_labels(numpy_attention(model.params, model.config, tokens[b, :n]), top_k, "mean")
        want = np.zeros((n, n), bool)
        for t in range(n):
            for i in range(t + 1):
                want[t, i] = now[t:t + horizon + 1, i].any()
        np.testing.assert_array_equal(got[b, :n, :n], want)
        assert not got[b, n:].any() and not got[b, :, n:].any()
        assert (want.sum(-1) > now.sum(-1)).any(), "the horizon added no label: the test proves nothing"


@pytest.mark.parametrize("horizon", [0, 1, 2, 5, 8, 39, 100])
def test_window_max_equals_brute_force(horizon):
    values = np.random.default_rng(horizon).random((2, 12, 12)).astype(np.float32)
    got = labels.window_max(values, horizon)
    want = np.stack([[values[b, t:t + horizon + 1].max(axis=0) for t in range(12)] for b in range(2)])
    np.testing.assert_array_equal(got, want)


def brute_force_future_statistic(stat, horizon, form):
    """[T, T] mean attention (query t', key i) -> [T, T] future need of key i at query t, loop by loop."""
    n = len(stat)
    out = np.zeros_like(stat)
    for t in range(n):
        for i in range(t + 1):
            later = range(t, min(n, t + horizon + 1)) if form == "max" else range(t, n)
            values = [stat[u, i] * (1.0 if form == "max" else np.exp(-(u - t) / horizon)) for u in later]
            out[t, i] = max(values) if form == "max" else sum(values)
    return out


@pytest.mark.parametrize("form,horizon", [("max", 3), ("max", 30), ("discounted", 2), ("discounted", 8)])
def test_ranked_future_need_labels_equal_brute_force(form, horizon):
    """future_need max / discounted: each query's top-K keys of the future statistic, exactly K of them."""
    model = tiny_model()
    length, valid_length, top_k = 24, 19, 3
    tokens, valid = padded_batch(3, valid_length, length)
    got, _ = labels.label_pass_jit(model.params, model.config, tokens, valid, top_k=top_k, horizon=horizon,
                                   future_need=form)
    got = np.asarray(got)
    for b, n in enumerate((valid_length, length)):
        stat = numpy_attention(model.params, model.config, tokens[b, :n]).mean((0, 1))  # [T, T]
        future = brute_force_future_statistic(stat, horizon, form)
        want = np.zeros((n, n), bool)
        for t in range(n):
            want[t, np.argsort(-future[t, :t + 1])[:top_k]] = True
        np.testing.assert_array_equal(got[b, :n, :n], want)
        assert not got[b, n:].any() and not got[b, :, n:].any()
        now = brute_force_labels(numpy_attention(model.params, model.config, tokens[b, :n]), top_k, "mean")
        assert (want != now).any(), "the future statistic changed no label: the test proves nothing"
    np.testing.assert_array_equal(got[1].sum(-1), np.minimum(np.arange(length) + 1, top_k))


@pytest.mark.parametrize("form,horizon", [("max", 0), ("max", 6), ("union", 4)])
def test_graded_labels_count_the_nested_top_k_sets(form, horizon):
    """levels: a key's label is how many of the top-K sets (K = top_k and each level) hold it, each set
    the brute-force one of its K."""
    model = tiny_model()
    length, valid_length, top_k, levels = 24, 19, 3, (6, 10)
    tokens, valid = padded_batch(4, valid_length, length)
    got, hits = labels.label_pass_jit(model.params, model.config, tokens, valid, top_k=top_k, horizon=horizon,
                                      future_need=form, levels=levels, cache_sizes=(4,))
    plain, plain_hits = labels.label_pass_jit(model.params, model.config, tokens, valid, top_k=top_k,
                                              horizon=horizon, future_need=form, cache_sizes=(4,))
    got = np.asarray(got)
    for b, n in enumerate((valid_length, length)):
        probs = numpy_attention(model.params, model.config, tokens[b, :n])
        want = np.zeros((n, n), np.uint8)
        for k in (top_k, *levels):
            if form == "union":
                now = brute_force_labels(probs, k, "mean")
                want += np.array([[now[t:t + horizon + 1, i].any() and i <= t for i in range(n)]
                                  for t in range(n)], np.uint8)
            else:
                future = brute_force_future_statistic(probs.mean((0, 1)), horizon, "max")
                for t in range(n):
                    want[t, np.argsort(-future[t, :t + 1])[:k]] += 1
        np.testing.assert_array_equal(got[b, :n, :n], want)
        assert not got[b, n:].any() and not got[b, :, n:].any()
    assert set(np.unique(got)) == {0, 1, 2, 3}, "some grade never occurs: the test proves little"
    np.testing.assert_array_equal(got == 3, np.asarray(plain) == 1)  # the top-K set is the ungraded label
    np.testing.assert_array_equal(hits, plain_hits)  # the H2O baseline counts the top-K set


def test_levels_must_be_larger_increasing_k_values(tmp_path):
    import dataclasses
    model = tiny_model()
    tokens, valid = np.ones((1, 8), np.int32), np.ones((1, 8), bool)
    for bad in ((2,), (6, 4), (3, 3)):
        with pytest.raises(ValueError, match=r"levels must increase and exceed top_k=3; got \["):
            labels.label_pass(model.params, model.config, tokens, valid, top_k=3, levels=bad)
    with pytest.raises(ValueError, match="levels grade a ranking: they need aggregation 'mean' or 'max'"):
        labels.label_pass(model.params, model.config, tokens, valid, top_k=2, levels=(4,), aggregation="union")
    with pytest.raises(ValueError, match="levels=100 must be between 1 and the sequence length 64"):
        labels.run_labels(dataclasses.replace(_config(tmp_path), levels=(8, 100)), model)


def test_ranked_future_need_needs_a_statistic():
    model = tiny_model()
    tokens, valid = np.ones((1, 8), np.int32), np.ones((1, 8), bool)
    with pytest.raises(ValueError, match="future_need must be one of"):
        labels.label_pass(model.params, model.config, tokens, valid, top_k=2, horizon=2, future_need="mean")
    with pytest.raises(ValueError, match="future_need='max' ranks a statistic: it needs aggregation 'mean' or 'max'"):
        labels.label_pass(model.params, model.config, tokens, valid, top_k=2, horizon=2, future_need="max",
                          aggregation="union")


def test_records_are_compact_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    mask = np.tril(rng.random((30, 30)) < 0.2)
    graded = mask * rng.integers(1, 4, (30, 30)).astype(np.uint8)
    offsets, indices, _ = labels.mask_to_csr(mask)
    record = labels.encode_record(np.arange(30), offsets, indices, np.zeros((30, 2)))
    path = str(tmp_path / "x.array_record")
    offsets, indices, counts = labels.mask_to_csr(graded)
    graded_record = labels.encode_record(np.arange(30), offsets, indices, np.zeros((30, 2)), counts)
    assert labels.write_records(path, [record, graded_record]) == 2
    back = labels.LabelSource(path)[0]
    assert back["indices"].dtype == np.uint16 and len(back["indices"]) == mask.sum() and "counts" not in back
    np.testing.assert_array_equal(labels.csr_to_mask(back["offsets"], back["indices"], 30), mask)
    back = labels.LabelSource(path)[1]
    np.testing.assert_array_equal(labels.csr_to_mask(back["offsets"], back["indices"], 30, back["counts"]), graded)


def _config(tmp_path, **data):
    base = dict(dataset="news", seq_len=64, min_tokens=16, train_sequences=4, validation_sequences=2)
    return LabelsConfig(run_dir=str(tmp_path / "labels"), top_k=4, data=DataConfig(**{**base, **data}))


def test_run_labels_writes_splits_and_meta(tmp_path):
    meta = labels.run_labels(_config(tmp_path), tiny_model())
    assert meta["sequences"] == {"train": 4, "validation": 2} and meta["cache_sizes"] == [4, 8, 16]
    assert len(labels.LabelSource(str(tmp_path / "labels" / "train.array_record"))) == 4


def test_bad_label_inputs_are_refused(tmp_path):
    import dataclasses
    model = tiny_model()
    with pytest.raises(ValueError, match="top_k=100 must be between 1 and the sequence length 64"):
        labels.run_labels(dataclasses.replace(_config(tmp_path), top_k=100), model)
    with pytest.raises(ValueError, match="no rows of at least 100000 tokens: the dataset is empty"):
        labels.run_labels(_config(tmp_path, seq_len=200000, min_tokens=100000), model)
    with pytest.raises(ValueError, match=r"horizon=64 must be in \[0, seq_len=64\)"):
        labels.run_labels(dataclasses.replace(_config(tmp_path), horizon=64), model)
    with pytest.raises(ValueError, match="aggregation"):
        labels.run_labels(dataclasses.replace(_config(tmp_path), aggregation="sum"), model)
    with pytest.raises(Exception, match="(?i)split"):
        list(labels.document_rows(DataConfig(dataset="news"), "nosuchsplit", model.tokenizer, 1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        labels.LabelSource(str(tmp_path / "missing.array_record"))


def test_concatenated_sources_hold_every_record_in_order(tmp_path):
    paths = []
    for name, count in (("a", 3), ("b", 2)):
        records = [labels.encode_record(np.full(5, 10 * len(paths) + i), np.zeros(6, np.int64), np.zeros(0, np.uint16),
                                        np.zeros((5, 1))) for i in range(count)]
        paths.append(str(tmp_path / f"{name}.array_record"))
        labels.write_records(paths[-1], records)
    joined = labels.ConcatSource([labels.LabelSource(path) for path in paths])
    assert len(joined) == 5
    assert [int(joined[i]["tokens"][0]) for i in range(5)] == [0, 1, 2, 10, 11]
    with pytest.raises(IndexError, match=r"record 5 is out of range \[0, 5\)"):
        joined[5]


@pytest.mark.slow
def test_the_default_controllers_wikipedia_labels_hold_out_every_article_the_real_run_scores(smollm2):
    from adore_jax.eval import sources
    from adore_jax.eval.config import load_eval_config
    from adore_jax.train.config import load_config

    run = load_eval_config("configs/eval_smollm2_cpu.yaml").perplexity
    spec = next(spec for spec in run.datasets if spec["name"] == "wikipedia")
    scored = sources.lm_document_ids(smollm2, "wikipedia", spec["count"], spec["length"], run.splits)
    labelled = load_config(LabelsConfig, "configs/labels_smollm2_future_wikipedia.yaml").data
    assert len(scored) == spec["count"] and sorted(labelled.exclude_ids) == sorted(scored)
    rows = list(labels.document_rows(labelled, "validation", smollm2.tokenizer, 0))
    assert len(rows) == 1  # the long validation articles are the real run's, but one
