"""Quality metrics: perplexity, ROUGE, BLEU, BERTScore (when an encoder is local), top-K recall.

Every function takes plain Python / numpy values and returns floats, so each is checked by hand in
tests/test_eval_metrics.py.
"""
import importlib.util
import os
from typing import Optional, Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def perplexity(logprobs, mask=None) -> float:
    """exp of the mean negative log-likelihood: logprobs [...] natural-log, mask [...] (1 = counted)."""
    logprobs = np.asarray(logprobs, np.float64)
    mask = np.ones_like(logprobs) if mask is None else np.asarray(mask, np.float64)
    count = mask.sum()
    if count == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(np.exp(-(logprobs * mask).sum() / count))


def relative_change(value: float, reference: float) -> float:
    """(value - reference) / reference: +0.05 means 5% above the reference."""
    return (value - reference) / reference


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F1 over pairs (stemmed, rouge-score's tokenizer). Two empty texts score 1."""
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        if not hyp.strip() and not ref.strip():
            scores = dict.fromkeys(ROUGE_TYPES, 1.0)
        else:
            scores = {name: s.fmeasure for name, s in scorer.score(ref, hyp).items()}
        for name in ROUGE_TYPES:
            totals[name] += scores[name]
    return {name: totals[name] / len(hypotheses) for name in ROUGE_TYPES}


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of hypotheses against one reference each."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def bertscore_status(model_path: Optional[str]) -> tuple:
    """(available, reason): BERTScore needs the bert_score package and an encoder on local disk."""
    if importlib.util.find_spec("bert_score") is None:
        return False, "BERTScore skipped: the bert_score package is not installed"
    if not model_path:
        return False, "BERTScore skipped: no local encoder configured (set bertscore_model to a local directory)"
    if not os.path.isdir(os.path.expanduser(model_path)):
        return False, f"BERTScore skipped: encoder directory {model_path!r} not found (nothing is downloaded)"
    return True, f"BERTScore-F1 with the local encoder {model_path}"


def bertscore_f1(hypotheses: Sequence[str], references: Sequence[str], model_path: str, num_layers: int = 9):
    """Mean BERTScore-F1 with a local encoder directory (see `bertscore_status`)."""
    import bert_score

    _check_pairs(hypotheses, references)
    _, _, f1 = bert_score.score(list(hypotheses), list(references), model_type=os.path.expanduser(model_path),
                                num_layers=num_layers, verbose=False)
    return float(f1.mean())


def text_scores(hypotheses: Sequence[str], references: Sequence[str], bertscore_model: Optional[str] = None) -> dict:
    """ROUGE-1/2/L, BLEU and (when available) BERTScore-F1 of hypotheses against references."""
    scores = {**rouge(hypotheses, references), "bleu": bleu(hypotheses, references)}
    if bertscore_status(bertscore_model)[0]:
        scores["bertscore_f1"] = bertscore_f1(hypotheses, references, bertscore_model)
    return scores


def topk_recall(attended, oracle_indices) -> float:
    """Mean fraction of each query's oracle top-K keys that it could attend to.

    attended: [Q, N] bool, key i visible to query q; oracle_indices: [Q, K] int, the oracle's keys.
    """
    attended = np.asarray(attended, bool)
    oracle_indices = np.asarray(oracle_indices)
    hits = np.take_along_axis(attended, oracle_indices, axis=1)  # [Q, K]
    return float(hits.mean())


def _check_pairs(hypotheses, references):
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need equally many hypotheses and references (>= 1); got {len(hypotheses)} "
                         f"and {len(references)}")
