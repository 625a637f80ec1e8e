"""Builds datasets once into the data directory and prints their split sizes.

    python scripts/build_datasets.py                    # sharegpt, wikipedia, news (local)
    python scripts/build_datasets.py samsum             # downloads from the Hugging Face Hub
    python scripts/build_datasets.py samsum --source-dir DIR   # a local copy of the Hub's Parquet files

The data directory is --data-dir, else $ADORE_DATA_DIR, else ~/.cache/adore_jax/tfds.
"""

import argparse

from adore_jax.data import DATASETS, default_data_dir, load_split

LOCAL = ("sharegpt", "wikipedia", "news")
SPLITS = ("train", "validation", "test")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "names", nargs="*", default=list(LOCAL), metavar="NAME", help=f"any of: {', '.join(sorted(DATASETS))}"
    )
    parser.add_argument("--data-dir", default=None, help="where the built datasets live")
    parser.add_argument("--source-dir", default=None, help="Hub datasets: a local copy of their Parquet layout")
    args = parser.parse_args()
    print(f"data dir: {args.data_dir or default_data_dir()}")
    for name in args.names:
        counts = {split: len(load_split(name, split, args.data_dir, source_dir=args.source_dir)) for split in SPLITS}
        print(f"{name}: " + ", ".join(f"{split} {count}" for split, count in counts.items()))


if __name__ == "__main__":
    main()
