"""Evaluation of adore-jax: every cache policy at the same budget, on quality and speed.

    from adore_jax.eval import load_eval_config, run_suite
    results = run_suite(load_eval_config("configs/eval_smollm2.yaml", ["speed.batches=[1]"]))

Command line: `adore eval CONFIG [--set key=value]` and `adore demo` (see eval/cli.py).
"""
from adore_jax.eval.config import EvalConfig, PolicyRow, load_eval_config, policy_rows
from adore_jax.eval.metrics import bleu, perplexity, rouge, text_scores, topk_recall
from adore_jax.eval.report import write_report
from adore_jax.eval.suite import run_suite

__all__ = ["EvalConfig", "PolicyRow", "bleu", "load_eval_config", "perplexity", "policy_rows", "rouge", "run_suite",
           "text_scores", "topk_recall", "write_report"]
