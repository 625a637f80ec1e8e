"""Every evaluation metric on cases computed by hand."""
import math

import numpy as np
import pytest

from adore_jax.eval import metrics


def test_perplexity_is_exp_of_mean_nll():
    logprobs = np.log([0.5, 0.25, 0.125])  # NLLs ln2, 2ln2, 3ln2: mean 2 ln 2 -> perplexity 4
    assert metrics.perplexity(logprobs) == pytest.approx(4.0)
    assert metrics.perplexity(logprobs, mask=[1, 0, 1]) == pytest.approx(math.exp(2 * math.log(2)))  # (1+3)/2 ln2
    assert metrics.perplexity([[0.0, 0.0]]) == 1.0
    with pytest.raises(ValueError, match="zero tokens"):
        metrics.perplexity([1.0], mask=[0])


def test_relative_change():
    assert metrics.relative_change(10.5, 10.0) == pytest.approx(0.05)
    assert metrics.relative_change(9.0, 10.0) == pytest.approx(-0.1)


def test_rouge_by_hand():
    # hypothesis "the cat sat" vs reference "the cat sat on the mat":
    # unigrams: 3 common; P = 3/3, R = 3/6 -> F1 = 2/3. bigrams: 2 common of 2 / 5 -> F1 = 2*1*0.4/1.4 = 4/7.
    # LCS = 3 -> same as ROUGE-1: 2/3.
    scores = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    # order matters for L only: "sat cat the" vs "the cat sat": R-1 = 1, LCS = 1 -> 1/3, no common bigram.
    scores = metrics.rouge(["sat cat the"], ["the cat sat"])
    assert (scores["rouge1"], scores["rouge2"], scores["rougeL"]) == pytest.approx((1.0, 0.0, 1 / 3))


def test_rouge_averages_pairs_and_treats_two_empty_texts_as_equal():
    scores = metrics.rouge(["a b", "", "x"], ["a b", "", "y"])  # 1, 1 (both empty), 0
    assert scores["rouge1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equally many"):
        metrics.rouge(["a"], [])


def test_bleu_by_hand():
    assert metrics.bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(100.0)
    assert metrics.bleu(["a b c d"], ["e f g h"]) == pytest.approx(0.0)
    # 4 of 5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 4-grams match; equal lengths so no brevity penalty:
    # BLEU = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25
    hyp, ref = "the quick brown fox sleeps", "the quick brown fox jumps"
    assert metrics.bleu([hyp], [ref]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-6)


def test_bertscore_reports_why_it_is_skipped(tmp_path):
    ok, reason = metrics.bertscore_status(None)
    assert not ok and "BERTScore skipped" in reason
    ok, reason = metrics.bertscore_status(str(tmp_path / "missing"))
    assert not ok and "skipped" in reason
    assert "bertscore_f1" not in metrics.text_scores(["a b"], ["a b"], None)


def test_text_scores_has_rouge_and_bleu():
    scores = metrics.text_scores(["the same five words here"], ["the same five words here"])
    assert scores == pytest.approx(dict(rouge1=1.0, rouge2=1.0, rougeL=1.0, bleu=100.0))
    # BLEU needs 4-grams: a three-word corpus scores 0 even when identical (ROUGE does not).
    assert metrics.text_scores(["three words here"], ["three words here"])["bleu"] == 0.0


def test_topk_recall_by_hand():
    attended = np.array([[True, False, True, False],
                         [True, True, False, False]])
    oracle = np.array([[0, 1],    # 1 of 2 attended
                       [0, 1]])   # 2 of 2
    assert metrics.topk_recall(attended, oracle) == pytest.approx(0.75)
    assert metrics.topk_recall(np.ones((3, 5), bool), np.zeros((3, 2), int)) == 1.0
