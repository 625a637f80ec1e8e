"""Every policy on two backbones, each compared with both full attentions: one perplexity table.

    python eval/compare_backbones.py --base runs/eval_base/results.json --tuned runs/eval_adore/results.json \
        --out runs/backbones.md

The two results.json come from `adore eval` runs that differ in `model` (e.g. smollm2-135m and its
sparse fine-tune smollm2-135m-adore); either side may be several runs on the same documents, their rows
pooled. A dataset, policy or m that only one run has is left out; a
dataset both runs scored must have the same documents. Per dataset, a row per (policy, m): its
perplexity on the base and on the fine-tuned backbone, each against its own backbone's full
attention, and the fine-tuned one also against the base's full attention (what the fine-tune buys a
bounded cache once its own damage to full attention is counted). The full row's last cell is that
damage. --json writes the same rows.
"""
import argparse
import json


def perplexities(results: dict) -> dict:
    """{(dataset, policy, m): perplexity} of a results.json's perplexity part."""
    if "perplexity" not in results:
        raise ValueError(f"results of model {results.get('meta', {}).get('model')!r} have no perplexity part")
    return {(r["dataset"], r["policy"], r["cache_size"]): r["perplexity"] for r in results["perplexity"]["rows"]}


def check_same_documents(base: dict, tuned: dict) -> None:
    """Every dataset both runs scored was scored the same way (same documents, lengths and splits)."""
    configs = [r["meta"]["config"]["perplexity"] for r in (base, tuned)]
    specs = [{d["name"]: d for d in config["datasets"]} for config in configs]
    for name in specs[0].keys() & specs[1].keys():
        if specs[0][name] != specs[1][name] or configs[0]["splits"] != configs[1]["splits"]:
            raise ValueError(f"dataset {name!r} was scored differently: {specs[0][name]}, splits "
                             f"{configs[0]['splits']} vs {specs[1][name]}, splits {configs[1]['splits']}")


def compare(base: dict, tuned: dict) -> list:
    """Rows {dataset, policy, cache_size, base, tuned, base_vs_base_full, tuned_vs_tuned_full,
    tuned_vs_base_full} for every (dataset, policy, m) measured on both backbones."""
    check_same_documents(base, tuned)
    a, b = perplexities(base), perplexities(tuned)
    rows = []
    for key in (k for k in a if k in b):
        dataset, policy, m = key
        full_a, full_b = a.get((dataset, "full", None)), b.get((dataset, "full", None))
        if full_a is None or full_b is None:
            raise ValueError(f"dataset {dataset!r}: both runs need the full-attention row")
        rows.append(dict(dataset=dataset, policy=policy, cache_size=m, base=a[key], tuned=b[key],
                         base_vs_base_full=a[key] / full_a - 1, tuned_vs_tuned_full=b[key] / full_b - 1,
                         tuned_vs_base_full=b[key] / full_a - 1))
    return rows


def markdown(rows: list, base_name: str, tuned_name: str) -> str:
    pct = lambda x: f"{100 * x:+.1f}%"
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        lines += [f"**{dataset}**\n", f"| policy | m | {base_name} (vs its full) | {tuned_name} (vs its full) | "
                  f"{tuned_name} vs {base_name}'s full |", "|---|---|---|---|---|"]
        for r in (r for r in rows if r["dataset"] == dataset):
            lines.append(f"| {r['policy']} | {'-' if r['cache_size'] is None else r['cache_size']} | "
                         f"{r['base']:.3f} ({pct(r['base_vs_base_full'])}) | {r['tuned']:.3f} "
                         f"({pct(r['tuned_vs_tuned_full'])}) | {pct(r['tuned_vs_base_full'])} |")
        lines.append("")
    return "\n".join(lines)


def pooled(paths: list) -> dict:
    """One results dict from the perplexity rows of several runs of one model on the same documents."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
        perplexities(runs[-1])  # refuses a run without a perplexity part
    for run in runs[1:]:
        check_same_documents(runs[0], run)
        if run["meta"]["model"] != runs[0]["meta"]["model"]:
            raise ValueError(f"{paths[0]} and the other runs of one side must share a model; got "
                             f"{runs[0]['meta']['model']!r} and {run['meta']['model']!r}")
    rows = [row for run in runs for row in run["perplexity"]["rows"]]
    return {**runs[0], "perplexity": {"rows": rows}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", nargs="+", required=True, help="results.json of the base backbone's runs")
    parser.add_argument("--tuned", nargs="+", required=True, help="results.json of the fine-tuned backbone's runs")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    base, tuned = pooled(args.base), pooled(args.tuned)
    rows = compare(base, tuned)
    text = markdown(rows, base["meta"]["model"], tuned["meta"]["model"])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
