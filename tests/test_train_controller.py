"""Controller training: kill-and-resume is bit-identical; loss falls; held-out recall is right and improves;
bad checkpoints refused."""
import json
import os

import jax
import numpy as np
import pytest

from adore_jax import cache as kv_cache
from adore_jax.controller import encode_sequence, init_controller, load_controller, pairwise_scores
from adore_jax.model import BlockInput, forward_block
from adore_jax.train import labels
from adore_jax.train.config import ControllerTrainConfig, DataConfig, LabelsConfig, load_config
from adore_jax.train.controller_training import train_controller
from adore_jax.train.testing import tiny_model


@pytest.fixture(scope="module")
def tiny_labels(tmp_path_factory):
    directory = tmp_path_factory.mktemp("labels")
    config = LabelsConfig(run_dir=str(directory), top_k=4, batch_size=4, data=DataConfig(
        dataset="news", seq_len=48, min_tokens=16, train_sequences=12, validation_sequences=4))
    labels.run_labels(config, tiny_model())
    return str(directory)


def _config(run_dir, labels_dir, *overrides):
    return load_config(ControllerTrainConfig, None, [
        f"run_dir={run_dir}", f"labels_dir={labels_dir}", "steps=8", "batch_size=4", "log_every=1",
        "eval_every=0", "checkpoint_every=4", "queries_per_sequence=16", "controller.width=16",
        "controller.hidden=16", "optim.learning_rate=1e-2", "optim.warmup_steps=2", *overrides])


def _digests(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["data_digest"], r["loss"]) for r in map(json.loads, f) if "data_digest" in r]


def test_kill_and_resume_is_bit_identical(tmp_path, tiny_labels):
    model = tiny_model()
    whole = _config(tmp_path / "whole", tiny_labels)
    train_controller(whole, model=model)
    killed = _config(tmp_path / "killed", tiny_labels)
    assert train_controller(killed, stop_after=5, model=model) == {"stopped_at": 5}
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["4"]  # step 5 was never saved
    # the restarted run resumes from step 4; its step 5 overwrites nothing and replays the same batch
    train_controller(killed, model=model)
    resumed = _digests(tmp_path / "killed")
    whole_log = _digests(tmp_path / "whole")
    assert dict((s, d) for s, d, _ in resumed) == dict((s, d) for s, d, _ in whole_log)
    assert [loss for s, _, loss in resumed if s > 5] == [loss for s, _, loss in whole_log if s > 5]
    _, a = load_controller(str(tmp_path / "whole" / "controller"), model.config.hidden_size)
    _, b = load_controller(str(tmp_path / "killed" / "controller"), model.config.hidden_size)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.isfile(tmp_path / "whole" / "loss.png") and os.path.isfile(tmp_path / "whole" / "config.yaml")


def test_resume_with_another_width_is_refused_before_the_recorded_config_changes(tmp_path, tiny_labels):
    model = tiny_model()
    train_controller(_config(tmp_path / "run", tiny_labels, "steps=4"), model=model)
    with pytest.raises(ValueError, match="different model shape"):
        train_controller(_config(tmp_path / "run", tiny_labels, "steps=8", "controller.width=32"),
                         model=model)
    recorded = load_config(ControllerTrainConfig, str(tmp_path / "run" / "config.yaml"))
    assert recorded.controller.width == 16 and recorded.steps == 4
    with pytest.warns(UserWarning, match="resuming .* with changed settings: steps"):
        train_controller(_config(tmp_path / "run", tiny_labels, "steps=6"), model=model)


@pytest.fixture(scope="module")
def static_run(tmp_path_factory, tiny_labels):  # query_aware: the resume test and the real-text test
    run_dir = tmp_path_factory.mktemp("static")
    config = _config(run_dir, tiny_labels, "steps=20", "controller.score_form=static", "checkpoint_every=0")
    return str(run_dir), train_controller(config, model=tiny_model())


def _held_out_recall(controller, labels_dir, m):
    return np.mean(_held_out_recalls(controller, labels_dir, m))


def _controller_inputs(config, tokens):
    """[1, n, E]: the input embeddings of tokens, or their hidden states after input_layer layers as the
    decoding forward taps them (not the training's table)."""
    model = tiny_model()
    tokens = np.asarray(tokens, np.int32)[None]
    if config.input_layer is None:
        return model.params["embed"][tokens]
    positions = np.arange(tokens.shape[1])[None]
    cache = kv_cache.init_cache(model.config, 1, tokens.shape[1])
    block = BlockInput(tokens, positions, positions, np.ones(tokens.shape, bool))
    return forward_block(model.params, model.config, cache, block, hidden_after=config.input_layer)[-1]


def _held_out_recalls(controller, labels_dir, m):
    """Brute force: per validation query t >= m with labels, |top-m scores of keys <= t ∩ labels| / |labels|."""
    config, params = controller
    source = labels.LabelSource(os.path.join(labels_dir, "validation.array_record"))
    recalls = []
    for record in (source[i] for i in range(len(source))):
        n = len(record["tokens"])
        truth = labels.csr_to_mask(record["offsets"], record["indices"], n)  # [n, n]
        states, features, _ = encode_sequence(config, params, _controller_inputs(config, record["tokens"]))
        scores = np.asarray(pairwise_scores(config, params, states, features))[0]  # [n, n]
        for t in range(m, n):
            kept = np.argsort(-scores[t, :t + 1])[:m]
            if truth[t].any():
                recalls.append(truth[t, kept].sum() / truth[t].sum())
    return recalls


def test_static_form_loss_falls(static_run):
    losses = [loss for _, _, loss in _digests(static_run[0])]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])


def test_held_out_recall_is_the_brute_force_recall(static_run, tiny_labels):
    run_dir, summary = static_run
    controller = load_controller(os.path.join(run_dir, "controller"), tiny_model().config.hidden_size)
    for m, tag in ((4, "1K"), (8, "2K"), (16, "4K")):  # K = 4
        assert summary[f"eval_recall_controller@m={tag}"] == pytest.approx(_held_out_recall(controller, tiny_labels, m))


def test_a_hidden_state_controller_trains_on_what_decoding_taps(tmp_path, tiny_labels):
    """input_layer = 1: the training table holds each token's hidden state after one layer (a truncated
    forward), so held-out recall equals the brute force on the states the decoding forward taps."""
    run = _config(tmp_path / "run", tiny_labels, "steps=4", "checkpoint_every=0", "controller.input_layer=1")
    summary = train_controller(run, model=tiny_model())
    controller = load_controller(str(tmp_path / "run" / "controller"), tiny_model().config.hidden_size)
    assert controller[0].input_layer == 1
    for m, tag in ((4, "1K"), (8, "2K")):
        assert summary[f"eval_recall_controller@m={tag}"] == pytest.approx(_held_out_recall(controller, tiny_labels, m))
    with pytest.raises(ValueError, match=r"input_layer must be in \[1, 2\) for this model"):
        train_controller(_config(tmp_path / "deep", tiny_labels, "controller.input_layer=2"), model=tiny_model())


def test_trained_ranking_beats_untrained_and_inverted(static_run, tiny_labels):
    run_dir, summary = static_run
    config, params = load_controller(os.path.join(run_dir, "controller"), tiny_model().config.hidden_size)
    trained = summary["eval_recall_controller@m=4K"]  # measured 0.59
    start = init_controller(config, jax.random.key(0))  # the run's own initialisation (seed 0)
    untrained = _held_out_recall((config, start), tiny_labels, 16)  # measured 0.51
    inverted = {**params, "w_2": -params["w_2"], "b_2": -params["b_2"]}  # every score logit negated
    assert trained > untrained + 0.03
    assert trained > _held_out_recall((config, inverted), tiny_labels, 16) + 0.05  # measured 0.49


def test_checkpoint_of_other_shape_refused(tmp_path, tiny_labels):
    model = tiny_model()
    train_controller(_config(tmp_path / "run", tiny_labels, "steps=2", "checkpoint_every=2"), model=model)
    wider = _config(tmp_path / "run", tiny_labels, "steps=4", "controller.width=24")
    with pytest.raises(ValueError, match="different model shape"):
        train_controller(wider, model=model)


@pytest.fixture(scope="module")
def longer_labels(tmp_path_factory):  # the same target on another corpus, in longer rows
    directory = tmp_path_factory.mktemp("labels_sharegpt")
    config = LabelsConfig(run_dir=str(directory), top_k=4, batch_size=2, data=DataConfig(
        dataset="sharegpt", seq_len=64, min_tokens=16, train_sequences=4, validation_sequences=2))
    labels.run_labels(config, tiny_model())
    return str(directory)


def test_two_label_directories_train_together_and_are_all_held_out(tmp_path, tiny_labels, longer_labels):
    model = tiny_model()
    config = _config(tmp_path / "both", tiny_labels, f"more_labels_dirs=[{longer_labels}]", "steps=2",
                     "controller.score_form=static")
    summary = train_controller(config, model=model)
    meta, train_source, eval_source = labels.combined_labels((tiny_labels, longer_labels))
    assert meta["seq_len"] == 64 and meta["dataset"] == ["news", "sharegpt"]
    assert (len(train_source), len(eval_source)) == (12 + 4, 4 + 2)
    controller = load_controller(str(tmp_path / "both" / "controller"), model.config.hidden_size)
    # every query of both validation splits, the shorter rows padded to 64 tokens
    queries = [_held_out_recalls(controller, directory, 4) for directory in (tiny_labels, longer_labels)]
    assert summary["eval_recall_controller@m=1K"] == pytest.approx(np.mean(queries[0] + queries[1]))
    assert summary["eval_recall_controller@m=1K"] != pytest.approx(np.mean(queries[0]))


def test_label_directories_of_different_targets_are_refused(tmp_path, tiny_labels):
    other = LabelsConfig(run_dir=str(tmp_path / "k8"), top_k=8, batch_size=2, data=DataConfig(
        dataset="news", seq_len=48, min_tokens=16, train_sequences=2, validation_sequences=1))
    labels.run_labels(other, tiny_model())
    with pytest.raises(ValueError, match=r"have top_k=8 but .* has 4: labels trained together must share"):
        train_controller(_config(tmp_path / "run", tiny_labels, f"more_labels_dirs=[{other.run_dir}]"),
                         model=tiny_model())


def test_missing_labels_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels_meta.json"):
        train_controller(_config(tmp_path / "run", str(tmp_path / "nolabels")), model=tiny_model())


def test_listwise_loss_is_the_mean_negative_log_softmax_of_each_querys_labels():
    from adore_jax.controller import ControllerConfig
    from adore_jax.train.controller_training import controller_loss, query_scores

    rng = np.random.default_rng(5)
    length, valid_length = 10, 8
    config = ControllerConfig(embed_dim=6, width=8, hidden=8)
    params = init_controller(config, jax.random.key(1))
    embed = rng.normal(size=(20, 6)).astype(np.float32)
    tokens = rng.integers(0, 20, (1, length)).astype(np.int32)
    valid = np.arange(length)[None] < valid_length
    label_mask = np.tril(rng.random((length, length)) < 0.4)[None] & valid[:, None, :] & valid[:, :, None]
    label_mask[0, 3] = False  # a query without labels is left out of the mean
    batch = {"tokens": tokens, "valid": valid, "labels": label_mask}
    queries = np.arange(length)
    got, _ = controller_loss(config, params, embed, batch, queries, loss="listwise")
    states, features, _ = encode_sequence(config, params, embed[tokens], valid)
    logits = np.asarray(query_scores(config, params, states, features, queries))[0]  # [T, T]
    per_query = []
    for t in range(valid_length):
        keys = np.flatnonzero(label_mask[0, t])
        if keys.size:
            row = logits[t, :t + 1]
            logp = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
            per_query.append(-logp[keys].mean())
    assert len(per_query) < valid_length
    assert float(got) == pytest.approx(np.mean(per_query), rel=1e-5)


def test_listwise_run_learns_and_bad_loss_is_refused(tmp_path, tiny_labels):
    run_dir = tmp_path / "listwise"
    run_config = _config(run_dir, tiny_labels, "loss=listwise", "steps=24", "controller.score_form=static")
    summary = train_controller(run_config, model=tiny_model())
    config, _ = load_controller(os.path.join(run_dir, "controller"), tiny_model().config.hidden_size)
    untrained = _held_out_recall((config, init_controller(config, jax.random.key(0))), tiny_labels, 16)
    print("listwise", summary["eval_recall_controller@m=4K"], "untrained", untrained)
    assert summary["eval_recall_controller@m=4K"] > untrained + 0.03
    with pytest.raises(Exception, match="loss must be one of"):
        _config(tmp_path / "bad", tiny_labels, "loss=hinge")


def test_release_recall_follows_a_hand_assembled_history():
    """m = 2: each query releases its lowest-scored kept token for good; recall counts what is left."""
    from adore_jax.train.controller_training import release_recall

    logits = np.zeros((5, 5))
    logits[2, :3] = [5, 1, 3]  # releases 1: kept {0, 2}
    logits[3, :4] = [0, 9, 4, 2]  # releases 0 (1, scored 9, is already gone): kept {2, 3}
    logits[4, :5] = [9, 9, 1, 5, 6]  # releases 2: kept {3, 4}
    labels = np.zeros((5, 5), bool)
    labels[1, [0, 1]] = True  # t = 1 < m: nothing released yet, not counted
    labels[2, [1, 2]] = True
    labels[3, [0, 1, 3]] = True
    labels[4, [3]] = True
    got = release_recall(logits, labels, 5, 2)
    np.testing.assert_allclose(got, [np.nan, np.nan, 1 / 2, 1 / 3, 1.0])


def test_graded_bce_is_the_mean_bce_against_each_nested_set():
    """labels counting 3 nested sets: the loss is the mean over pairs and sets of BCE(logit, key in set)."""
    from adore_jax.controller import ControllerConfig
    from adore_jax.train.controller_training import controller_loss, query_scores

    rng = np.random.default_rng(6)
    length, valid_length, sets = 10, 8, 3
    config = ControllerConfig(embed_dim=6, width=8, hidden=8)
    params = init_controller(config, jax.random.key(2))
    embed = rng.normal(size=(20, 6)).astype(np.float32)
    tokens = rng.integers(0, 20, (1, length)).astype(np.int32)
    valid = np.arange(length)[None] < valid_length
    counts = (np.tril(rng.integers(0, sets + 1, (length, length))) * (valid[0, :, None] & valid[0, None, :]))
    batch = {"tokens": tokens, "valid": valid, "labels": counts[None].astype(np.uint8)}
    queries = np.arange(length)
    got, _ = controller_loss(config, params, embed, batch, queries, sets=sets)
    states, features, _ = encode_sequence(config, params, embed[tokens], valid)
    logits = np.asarray(query_scores(config, params, states, features, queries))[0]  # [T, T]
    losses = []
    for t in range(valid_length):
        for i in range(t + 1):
            for level in range(1, sets + 1):  # the set of the level-th largest K holds keys counted >= level
                y = float(counts[t, i] >= level)
                losses.append(max(logits[t, i], 0) - logits[t, i] * y + np.log1p(np.exp(-abs(logits[t, i]))))
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.fixture(scope="module")
def graded_labels(tmp_path_factory):  # tiny_labels' rows, graded by the top-8 and top-16 sets
    directory = tmp_path_factory.mktemp("graded")
    config = LabelsConfig(run_dir=str(directory), top_k=4, levels=(8, 16), batch_size=4, data=DataConfig(
        dataset="news", seq_len=48, min_tokens=16, train_sequences=12, validation_sequences=4))
    labels.run_labels(config, tiny_model())
    return str(directory)


def test_graded_run_is_held_out_on_its_top_k_set_and_refuses_listwise(tmp_path, tiny_labels, graded_labels):
    model = tiny_model()
    assert labels.read_meta(graded_labels)["levels"] == [8, 16]
    summary = train_controller(_config(tmp_path / "graded", graded_labels, "controller.score_form=static"),
                               model=model)
    controller = load_controller(str(tmp_path / "graded" / "controller"), model.config.hidden_size)
    # the same rows' ungraded labels are the top-4 set: the brute-force recall reads them
    assert summary["eval_recall_controller@m=2K"] == pytest.approx(_held_out_recall(controller, tiny_labels, 8))
    with pytest.raises(ValueError, match=r"are graded \(levels \[8, 16\]\): loss must be 'bce', not 'listwise'"):
        train_controller(_config(tmp_path / "listwise", graded_labels, "loss=listwise"), model=model)
    with pytest.raises(ValueError, match=r"have levels=\[8, 16\] but .* has \[\]: labels trained together must"):
        train_controller(_config(tmp_path / "mixed", tiny_labels, f"more_labels_dirs=[{graded_labels}]"),
                         model=model)
