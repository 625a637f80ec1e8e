"""results.json, report.md (tables) and PNG plots of a suite run."""
import json
import os

import numpy as np

from adore_jax.eval.machine import summary_line

PLOTS = ("quality_vs_cache.png", "speed_vs_context.png", "recall_vs_m.png", "ruler_vs_ratio.png")


def _m(m):
    return "-" if m is None else str(m)


def _f(x, digits=2):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _pct(x):
    return "-" if x is None else f"{100 * x:+.1f}%"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _perplexity_section(part):
    out = ["## Perplexity (teacher-forced through the decode path)\n"]
    rows = part["rows"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        first = subset[0]
        out.append(f"**{dataset}**: {first['documents']} documents of {first['length']} tokens, the first "
                   f"{first['prompt_length']} prefilled, the last {first['length'] - first['prompt_length']} of each "
                   f"scored step by step ({first['tokens']} tokens in all).\n")
        out.append(_table(["policy", "m", "perplexity", "vs full", "seconds"],
                          [[r["policy"], _m(r["cache_size"]), _f(r["perplexity"], 3), _pct(r["perplexity_vs_full"]),
                            _f(r["seconds"], 0)] for r in subset]))
    return out


def _score_cells(scores):
    if not scores:
        return ["-"] * 4
    return [_f(scores["rouge1"], 3), _f(scores["rouge2"], 3), _f(scores["rougeL"], 3), _f(scores["bleu"], 1)] + \
        ([_f(scores["bertscore_f1"], 3)] if "bertscore_f1" in scores else [])


def _generation_section(part):
    rows = part["rows"]
    if not rows:
        return ["## Generation\n", "No prompts.\n"]
    bert = any("bertscore_f1" in (r.get("vs_full") or {}) for r in rows)
    extra = ["BERTScore-F1"] if bert else []
    header = ["policy", "m", "R-1 vs full", "R-2 vs full", "R-L vs full", "BLEU vs full"] + extra + \
             ["R-L vs ref", "BLEU vs ref", "tokens/s"]
    table = []
    for r in rows:
        ref = r.get("vs_reference") or {}
        table.append([r["policy"], _m(r["cache_size"])] + _score_cells(r.get("vs_full")) +
                     [_f(ref.get("rougeL"), 3), _f(ref.get("bleu"), 1), _f(r["decode_tokens_per_s"], 1)])
    lengths = part.get("prompt_tokens") or [0]
    out = ["## Generation (greedy; scored against full attention's output and the references)\n",
           f"{rows[0]['prompts']} prompts ({rows[0].get('references', 0)} with a reference answer), prompt tokens "
           f"{min(lengths)}-{max(lengths)} (median {int(np.median(lengths))}).\n", _table(header, table)]
    samples = part.get("samples") or []
    if samples:
        out.append("### Sample outputs\n")
        for i, sample in enumerate(samples[:3]):
            prompt = sample["prompt"].replace("\n", " ")
            out.append(f"**[{i}] {sample['source']}, {sample['prompt_tokens']} prompt tokens:** "
                       f"{prompt[:300]}{'...' if len(prompt) > 300 else ''}\n")
            out.append(_table(["policy", "output"], [[name, text.replace("\n", " ").replace("|", "\\|")[:400]]
                                                     for name, text in sample["outputs"].items()]))
    return out


def _streaming_section(part):
    rows = part["rows"]
    if not rows:
        return ["## Streaming\n", "No conversations.\n"]
    turns = len(rows[0]["turns"])
    header = ["policy", "m", "cache slots"] + [f"turn {t + 1} R-L vs full" for t in range(turns)] + \
             ["mean R-L vs ref"]
    table = []
    for r in rows:
        vs_full = [_f((t.get("vs_full") or {}).get("rougeL"), 3) for t in r["turns"]]
        vs_ref = np.mean([t["vs_reference"]["rougeL"] for t in r["turns"]])
        table.append([r["policy"], _m(r["cache_size"]), max(t["cache_slots"] for t in r["turns"])] + vs_full +
                     [_f(float(vs_ref), 3)])
    prompt_tokens = ", ".join(str(t["max_prompt_tokens"]) for t in rows[0]["turns"])
    return ["## Streaming (multi-turn, fed turn by turn)\n",
            f"{rows[0]['conversations']} conversations; longest prompt per turn: {prompt_tokens} tokens. "
            "Each turn's prompt (history with reference answers + the new question) goes through the policy's "
            "chunked prefill, so the cache never holds more than m tokens (cache slots = m + the decode block).\n",
            _table(header, table)]


def _speed_section(part):
    rows = part["rows"]
    out = [f"## Speed (decode, synthetic caches, m = {part['cache_size']})\n"]
    for batch in dict.fromkeys(r["batch"] for r in rows):
        subset = [r for r in rows if r["batch"] == batch]
        contexts = list(dict.fromkeys(r["context"] for r in subset))
        names = list(dict.fromkeys(r["policy"] for r in subset))
        cell = {(r["policy"], r["context"]): r for r in subset}
        table = []
        for name in names:
            line = [name]
            for c in contexts:
                r = cell.get((name, c))
                line.append("-" if r is None else f"{r['tokens_per_s']:.1f} ({r['ms_per_step']:.0f} ms"
                            + (f", {r['speedup_vs_full']:.2f}x" if r["speedup_vs_full"] else "") + ")")
            table.append(line)
        beyond = [c for c in contexts if any(r["beyond_model_context"] for r in subset if r["context"] == c)]
        out.append(f"**batch {batch}**: tokens/s (ms/step, speed-up vs full at the same batch and context)"
                   + (f"; contexts {beyond} are beyond the model's trained context (RoPE extrapolated, "
                      "speed only)" if beyond else "") + "\n")
        out.append(_table(["policy"] + [f"{c} ctx" for c in contexts], table))
    if part.get("skipped_over_budget"):
        out.append("Over the memory budget (not run): " + ", ".join(
            f"{s['policy']} b={s['batch']} ctx={s['context']} ({s['gib']:.1f} GiB)"
            for s in part["skipped_over_budget"])
            + "\n")
    tp = part.get("throughput") or []
    if tp:
        out.append(f"### Largest batch in {part['memory_budget_gb']} GiB (weights {part['weights_mib']:.0f} MiB + "
                   f"cache + policy state) at {tp[0]['context']} context\n")
        out.append(_table(["policy", "state MiB/seq", "largest batch", "measured batch", "tokens/s", "vs full"],
                          [[r["policy"], _f(r["state_mib_per_sequence"], 1), r["largest_batch"], r["measured_batch"],
                            _f(r.get("tokens_per_s"), 1),
                            "-" if r.get("speedup_vs_full") is None else f"{r['speedup_vs_full']:.2f}x"] for r in tp]))
    return out


def _diagnostics_section(part):
    rows = part["rows"]
    if not rows:
        return ["## Controller diagnostics\n", "No documents.\n"]
    return [f"## Controller diagnostics (top-{part['top_k']} recall vs the full-attention oracle)\n",
            f"{part['documents']} documents of {part['length']} tokens; queries at positions "
            f"{part['prompt_length']}-{part['length'] - 1}. Overall: the oracle set of the layer-averaged "
            "attention; per layer: each layer's own set, averaged over layers.\n",
            _table(["policy", "m", "R", "recall (overall)", "recall (per layer, mean)", "keys attended"],
                   [[r["policy"], _m(r["cache_size"]), r["rebuild"], _f(r["recall"], 3),
                     _f(r["recall_layer_mean"], 3), _f(r["attended_mean"], 0)] for r in rows])]


def _retrieval_section(part):
    rows = part["rows"]
    if not rows:
        return ["## Retrieval\n", "No prompts.\n"]
    depths = list(dict.fromkeys(d for r in rows for d in r["accuracy_by_depth"]))
    keys = part.get("keys", "?")
    out = ["## Retrieval (a numeric key hidden in the text, asked for at the end)\n",
           f"Haystack: {part.get('source', '?')}; {part.get('key_digits', '?')}-digit keys at depths "
           f"{', '.join(depths)} of the haystack, {keys} keys per depth and context; greedy answers of "
           f"{part.get('max_new_tokens', '?')} tokens{' (chat template)' if part.get('chat') else ''}, correct when "
           "the key's digits appear in the answer. vs full: the accuracy as a fraction of full attention's at "
           "the same context.\n",
           _table(["policy", "m", "context", "accuracy", "vs full", "correct"] + [f"depth {d}" for d in depths],
                  [[r["policy"], _m(r["cache_size"]), r["context"], _f(r["accuracy"]), _f(r["accuracy_vs_full"]),
                    f"{r['correct']}/{r['prompts']}"] + [_f(r["accuracy_by_depth"].get(d)) for d in depths]
                   for r in rows])]
    return out


def _ruler_section(part):
    rows = part["rows"]
    if not rows:
        return ["## RULER\n", "No cells.\n"]
    out = ["## RULER (synthetic long-context tasks)\n",
           f"{part['samples']} prompts per task and context; greedy answers scored as RULER scores them (the share "
           f"of the expected strings in the answer). Averages are over the tasks where full attention scores at "
           f"least {part['min_full_score']}; ± is the binomial standard error sqrt(a (1 - a) / n) over n prompts. "
           "bounded: the cache at m throughout; compress_after_prefill: the context prefilled in full, released to m "
           "once, then the question (not seen when compressing) and the answer.\n"]
    for context in sorted({r["context"] for r in rows}):
        full = next(r for r in rows if r["context"] == context and r["setting"] == "full")
        tasks = list(full["per_task"])
        out.append(f"### {context} tokens: full attention per task\n")
        out.append(_table(tasks + ["average"], [[_f(full["per_task"][t]) for t in tasks]
                                                + [f"{_f(full['average'])} ± {_f(full['stderr'])}"]]))
        dropped = [t for t in tasks if t not in {t for r in rows if r["setting"] != "full" for t in r["per_task"]}]
        if dropped:
            out.append(f"Not averaged (full attention under {part['min_full_score']}): {', '.join(dropped)}.\n")
        ratios = sorted({r["ratio"] for r in rows if r["context"] == context and r["ratio"] is not None})
        for setting in [s for s in part["settings"] if any(r["setting"] == s for r in rows)]:
            mine = [r for r in rows if r["context"] == context and r["setting"] == setting]
            out.append(f"**{setting}**: average (n prompts) per compression ratio\n")
            table = []
            for name in dict.fromkeys(r["policy"] for r in mine):
                cells = {r["ratio"]: r for r in mine if r["policy"] == name}
                table.append([name] + [f"{_f(cells[x]['average'])} ± {_f(cells[x]['stderr'])} ({cells[x]['prompts']})"
                                       if x in cells else "-" for x in ratios])
            out.append(_table(["policy"] + [f"{x:g} (m={round((1 - x) * context)})" for x in ratios], table))
            kept = [t for t in tasks if t not in dropped]
            out.append(f"Per task ({setting}):\n")
            out.append(_table(["policy", "ratio"] + kept,
                              [[r["policy"], f"{r['ratio']:g}"] + [_f(r["per_task"].get(t)) for t in kept]
                               for r in sorted(mine, key=lambda r: (r["ratio"], r["policy"]))]))
    return out


def _gap_section(part):
    if not part.get("sizes"):
        return ["## Gap decomposition\n", "No documents.\n"]
    out = ["## Gap decomposition (where perplexity is lost against full attention)\n",
           f"{part['documents']} {part['dataset']} documents of {part['length']} tokens, {part['prompt_length']} "
           "prefilled, the rest scored. Perfect rows: ADORE's release and rebuild scored by teacher-forced full "
           "attention A (mean over layers and heads): the current query's, or future need max A[t..t+H].\n"]
    for size in part["sizes"]:
        out.append(_table(["row", "m", "perplexity", "vs full"],
                          [[r["row"], size["cache_size"], _f(r["perplexity"], 3), _pct(r["perplexity_vs_full"])]
                           for r in size["rows"]]))
        parts = size["decomposition"]
        out.append("Split: " + ", ".join(f"{k.replace('_', ' ')} {_pct(v)}" for k, v in parts.items()) + "\n")
    return out


SECTIONS = {"perplexity": _perplexity_section, "generation": _generation_section, "streaming": _streaming_section,
            "speed": _speed_section, "diagnostics": _diagnostics_section, "retrieval": _retrieval_section,
            "ruler": _ruler_section, "gap": _gap_section}


def _machine_line(machine: dict) -> str:
    """The run's machine (results written before eval/machine.py recorded only cores, backend and jax)."""
    if "versions" in machine:
        return summary_line(machine)
    return f"machine: {machine['cpus']} CPUs ({machine['backend']}, jax {machine['jax']})."


def report_markdown(results) -> str:
    meta = results["meta"]
    controller = meta["controller"]
    out = [f"# adore-jax evaluation: {meta['model']}\n",
           f"Started {meta['started']}, {meta.get('seconds', 0) / 60:.1f} min. Controller: {controller['source']} "
           f"({'trained' if controller['trained'] else 'UNTRAINED'}).\n", _machine_line(meta["machine"]) + "\n"]
    if meta.get("notices"):
        out.append("**Notices**\n\n" + "\n".join(f"- {n}" for n in meta["notices"]) + "\n")
    for part, section in SECTIONS.items():
        if part in results:
            out += section(results[part])
    plots = [p for p in PLOTS if p in (meta.get("files") or {}).get("plots", PLOTS)]
    if plots:
        out.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    return "\n".join(out)


def write_plots(results, out_dir) -> list:
    """The PNGs that the results have data for; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ppl = (results.get("perplexity") or {}).get("rows") or []
    if ppl:
        datasets = list(dict.fromkeys(r["dataset"] for r in ppl))
        fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
        sizes = sorted({r["cache_size"] for r in ppl if r["cache_size"] is not None})
        for ax, dataset in zip(axes[0], datasets):
            for name in dict.fromkeys(r["policy"] for r in ppl):
                rs = [r for r in ppl if r["dataset"] == dataset and r["policy"] == name]
                if rs and rs[0]["cache_size"] is None:
                    ax.axhline(rs[0]["perplexity"], linestyle="--", label=name,
                               color="black" if name == "full" else None)
                elif rs:
                    rs.sort(key=lambda r: r["cache_size"])
                    ax.plot([r["cache_size"] for r in rs], [r["perplexity"] for r in rs], marker="o", label=name)
            ax.set(title=f"perplexity: {dataset}", xlabel="cache size m (tokens)", ylabel="perplexity")
            values = [r["perplexity"] for r in ppl if r["dataset"] == dataset]
            if max(values) > 3 * min(values):  # one collapsed policy would flatten the others
                ax.set_yscale("log")
            if sizes:
                ax.set_xticks(sizes)
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, PLOTS[0]))
    speed = (results.get("speed") or {}).get("rows") or []
    if speed:
        batches = list(dict.fromkeys(r["batch"] for r in speed))
        fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
        for ax, batch in zip(axes[0], batches):
            for name in dict.fromkeys(r["policy"] for r in speed):
                rs = sorted((r for r in speed if r["batch"] == batch and r["policy"] == name),
                            key=lambda r: r["context"])
                ax.plot([r["context"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=name)
            ax.set(title=f"decode speed, batch {batch}", xlabel="context (tokens)", ylabel="tokens/s", xscale="log")
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, PLOTS[1]))
    diag = (results.get("diagnostics") or {}).get("rows") or []
    if diag:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name in dict.fromkeys(r["policy"] for r in diag):
            rs = sorted((r for r in diag if r["policy"] == name), key=lambda r: r["cache_size"] or 0)
            ax.plot([r["cache_size"] for r in rs], [r["recall"] for r in rs], marker="o", label=name)
        ax.set(title=f"top-{results['diagnostics']['top_k']} recall vs m", xlabel="cache size m (tokens)",
               ylabel="recall of the oracle set", ylim=(0, 1.02))
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, PLOTS[2]))
    ruler = [r for r in (results.get("ruler") or {}).get("rows") or [] if r["average"] is not None]
    if ruler:
        panels = sorted({(r["context"], r["setting"]) for r in ruler if r["setting"] != "full"})
        fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4), squeeze=False)
        for ax, (context, setting) in zip(axes[0], panels):
            full = next(r for r in ruler if r["context"] == context and r["setting"] == "full")
            ax.axhline(full["average"], linestyle="--", color="black", label="full")
            mine = [r for r in ruler if r["context"] == context and r["setting"] == setting]
            for name in dict.fromkeys(r["policy"] for r in mine):
                rs = sorted((r for r in mine if r["policy"] == name), key=lambda r: r["ratio"])
                ax.errorbar([r["ratio"] for r in rs], [r["average"] for r in rs], [r["stderr"] for r in rs],
                            marker="o", capsize=2, label=name)
            ax.set(title=f"RULER {context}: {setting}", xlabel="compression ratio", ylabel="average score",
                   ylim=(0, 1.02))
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, PLOTS[3]))
    return written


def _save(fig, out_dir, name) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def write_report(results, out_dir) -> dict:
    """Write results.json, report.md and the plots; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    plots = write_plots(results, out_dir)
    files = dict(results=os.path.join(out_dir, "results.json"), report=os.path.join(out_dir, "report.md"),
                 plots=plots)
    results["meta"]["files"] = files
    with open(files["results"], "w") as f:
        json.dump(results, f, indent=2, default=_jsonable)
    with open(files["report"], "w") as f:
        f.write(report_markdown(results))
    return files


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
