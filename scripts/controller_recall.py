"""Held-out metrics of several controllers on one label set, so that they compare on the same queries.

    python scripts/controller_recall.py LABELS_DIR CONTROLLER_DIR [CONTROLLER_DIR ...] [--model smollm2-135m]

Prints, per controller, the BCE and the top-K recall of its top-m kept set at each m of the labels
(with recency's and the optimistic H2O's on the same queries), as `adore train-controller` reports them.
"""
import argparse
import json
import os

import jax

from adore_jax import load_model
from adore_jax.controller import load_controller
from adore_jax.train import labels as label_io
from adore_jax.train.controller_inputs import controller_inputs
from adore_jax.train.controller_training import eval_batches, eval_counts, evaluate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels_dir")
    parser.add_argument("controllers", nargs="+")
    parser.add_argument("--model", default="smollm2-135m", help="the model whose embeddings (or hidden states, for "
                        "a controller with input_layer) the controllers read")
    args = parser.parse_args(argv)
    meta = label_io.read_meta(args.labels_dir)
    cache_sizes = tuple(meta["cache_sizes"])
    sets = 1 + len(meta.get("levels", ()))  # held out on the top_k set of graded labels
    source = label_io.LabelSource(os.path.join(args.labels_dir, "validation.array_record"))
    model = load_model(args.model)
    for path in args.controllers:
        config, params = load_controller(path, model.config.hidden_size)
        inputs, (rows,) = controller_inputs(model, config, (source,))
        counts = jax.jit(lambda p, e, b, config=config: eval_counts(config, p, e, b, cache_sizes, sets))
        metrics = evaluate(counts, params, inputs, eval_batches(rows, meta["seq_len"], 0), cache_sizes, meta["top_k"],
                           sets)
        print(path, json.dumps({k: round(v, 4) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
