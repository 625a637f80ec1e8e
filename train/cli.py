"""`adore labels|train-controller|finetune CONFIG [--set key=value ...]`.

The lead's adore_jax/cli.py calls `add_subcommands(subparsers)`; each subcommand sets `run`.
"""
import json


def _add(subparsers, name, help_text, run):
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for sections (e.g. optim.learning_rate=3e-4)")
    parser.set_defaults(run=run)
    return parser


def run_labels(args):
    from adore_jax.train.config import LabelsConfig, load_config
    from adore_jax.train.labels import run_labels as run
    return _report(run(load_config(LabelsConfig, args.config, args.overrides)))


def run_train_controller(args):
    from adore_jax.train.config import ControllerTrainConfig, load_config
    from adore_jax.train.controller_training import train_controller
    return _report(train_controller(load_config(ControllerTrainConfig, args.config, args.overrides)))


def run_finetune(args):
    from adore_jax.train.config import FinetuneConfig, load_config
    from adore_jax.train.finetune import finetune
    return _report(finetune(load_config(FinetuneConfig, args.config, args.overrides)))


def _report(result):
    print(json.dumps(result, indent=2, default=str))
    return 0


def add_subcommands(subparsers):
    """Add labels, train-controller and finetune to an argparse subparsers object."""
    _add(subparsers, "labels", "compute top-K attention labels into ArrayRecord files", run_labels)
    _add(subparsers, "train-controller", "train the ADORE controller on top-K labels", run_train_controller)
    _add(subparsers, "finetune", "sparse (top-K attention) fine-tuning with LoRA or full weights", run_finetune)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m adore_jax.train.cli")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
