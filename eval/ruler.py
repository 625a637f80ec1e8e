"""The RULER part (`ruler`): eleven synthetic long-context tasks (eval/ruler_tasks.py) under every policy, at
compression ratios of the context, in two settings:

  bounded                 the cache stays at m throughout: the prompt is prefilled chunk by chunk, releasing down to
                          m after each chunk, and the answer decoded at m (the question is the prompt's end)
  compress_after_prefill  kvpress's protocol: the context is prefilled keeping every token, the policy releases down
                          to m once, then the question and the answer are appended without release (query-agnostic:
                          the question is not seen before compressing). One context prefill serves every m.

m = (1 - ratio) x context, or a row's own cache_size. Full attention runs first, once per context; a task where it
scores under `min_full_score` is reported but not run under the other policies and left out of the averages.
Answers are greedy, scored as RULER scores them: the share of the expected strings found in the answer.

Every finished cell (a setting, context, policy and m) is appended to `<out_dir>/ruler_cells.jsonl` with a
fingerprint of its prompts; a rerun with the same out_dir reuses the cells whose fingerprint matches, so a killed
run continues where it stopped.
"""
import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from adore_jax.eval import ruler_tasks
from adore_jax.eval.config import policy_rows

DECODE_CHUNK = 8  # decode steps per compiled chunk (every answer length shares one program)
CELLS_FILE = "ruler_cells.jsonl"


def cache_size_at(ratio: float, context: int) -> int:
    """m for a compression ratio (the share of the context's cache removed)."""
    return int(round((1 - ratio) * context))


def fingerprint(prompts) -> str:
    """What a cell's results depend on in its prompts: their ids, tasks and question starts (16 hex digits)."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(np.asarray(p.ids, np.int32).tobytes() + p.task.encode() + str(p.question_start).encode())
    return digest.hexdigest()[:16]


def answer_texts(model, tokens, prompts) -> list:
    """Each row's greedy answer as text: its tokens up to an end-of-sequence token, at most its task's length."""
    eos = set(model.config.eos_token_ids or ())
    texts = []
    for row, prompt in zip(np.asarray(tokens), prompts):
        ids = [int(t) for t in row[:prompt.max_new_tokens]]
        end = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        texts.append(model.decode(ids[:end]))
    return texts


def greedy_tokens(session, max_new_tokens: int) -> np.ndarray:
    """[B, T] greedy tokens of a session (prefilled here), T >= max_new_tokens; stops when every row has ended."""
    import jax.numpy as jnp

    logits = session.prefill()
    first = np.asarray(jnp.argmax(logits, axis=-1))
    session.start(first)
    out, steps = [first[:, None]], 0
    while steps < max_new_tokens - 1 and not np.asarray(session.state.done).all():
        out.append(np.asarray(session.decode(DECODE_CHUNK).tokens))
        steps += DECODE_CHUNK
    tokens = np.concatenate(out, axis=1)
    return np.pad(tokens, ((0, 0), (0, max(0, max_new_tokens - tokens.shape[1]))),
                  constant_values=session.model.pad_id)


def even_batches(count: int, size: int) -> list:
    """Indices 0..count-1 in ceil(count / size) batches of near-equal length (no padding rows to compute)."""
    parts = -(-count // size)
    return [list(part) for part in np.array_split(np.arange(count), parts)]


def session_length(max_new_tokens: int) -> int:
    """The new tokens a session must hold: the first, then whole decode chunks."""
    return 1 + -(-(max_new_tokens - 1) // DECODE_CHUNK) * DECODE_CHUNK


def run_bounded(ctx, prompts, row) -> list:
    """Answers under one policy row (None: full attention), the cache bounded at m throughout."""
    from adore_jax.session import DecodeSession

    texts = [None] * len(prompts)
    policy = row.policy if row is not None else "full"
    controller = ctx.controller if row is not None and row.policy.needs_controller else None
    for batch in even_batches(len(prompts), ctx.config.ruler.batch_size):
        new = max(prompts[i].max_new_tokens for i in batch)
        session = DecodeSession(ctx.model, [list(prompts[i].ids) for i in batch], session_length(new), policy,
                                controller=controller)
        tokens = greedy_tokens(session, new)
        for i, answer in zip(batch, answer_texts(ctx.model, tokens, [prompts[i] for i in batch])):
            texts[i] = answer
    return texts


def run_compressed(ctx, prompts, rows) -> dict:
    """Answers under one policy at several budgets (rows: PolicyRows of one policy), compressing after prefill:
    {m: texts}. Each batch's contexts are prefilled once for every m."""
    from adore_jax.session import DecodeSession

    by_m = {row.cache_size: [None] * len(prompts) for row in rows}
    largest = max(rows, key=lambda row: row.cache_size)
    controller = ctx.controller if largest.policy.needs_controller else None
    for batch in even_batches(len(prompts), ctx.config.ruler.batch_size):
        new = max(prompts[i].max_new_tokens for i in batch)
        base = DecodeSession(ctx.model, [list(prompts[i].ids) for i in batch], session_length(new), largest.policy,
                             controller=controller, compress_after=[prompts[i].question_start for i in batch])
        base.prefill_contexts()
        for row in rows:
            session = base.at_cache_size(row.cache_size)
            tokens = greedy_tokens(session, new)
            for i, answer in zip(batch, answer_texts(ctx.model, tokens, [prompts[i] for i in batch])):
                by_m[row.cache_size][i] = answer
            del session
    return by_m


class Cells:
    """The finished cells of a run: read from, and appended to, <out_dir>/ruler_cells.jsonl."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, CELLS_FILE)
        self.done = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    if line.strip():
                        cell = json.loads(line)
                        self.done[self.key(cell)] = cell

    @staticmethod
    def key(cell) -> tuple:
        return cell["setting"], cell["context"], cell["policy"], cell["cache_size"], cell["fingerprint"]

    def get(self, **key):
        return self.done.get(self.key(key))

    def add(self, cell) -> None:
        self.done[self.key(cell)] = cell
        with open(self.path, "a") as f:
            f.write(json.dumps(cell) + "\n")


def scored_cell(setting, context, label, m, prints, prompts, texts, seconds) -> dict:
    return dict(setting=setting, context=context, policy=label, cache_size=m, fingerprint=prints,
                ratio=None if m is None else 1 - m / context, seconds=seconds,
                answers=texts, scores=[ruler_tasks.score(t, p.answers) for t, p in zip(texts, prompts)],
                tasks=[p.task for p in prompts], samples=[p.sample for p in prompts])


def run_ruler(ctx) -> dict:
    """Every policy row on every task at every context, ratio and setting; see the module doc."""
    cfg = ctx.config.ruler
    if ctx.model.tokenizer is None:
        raise ValueError(f"ruler: the tasks are text; model {ctx.model.source!r} has no tokenizer")
    cells = Cells(ctx.config.out_dir)
    results = []
    for context in sorted(set(cfg.contexts) | set(cfg.needle_contexts)):
        tasks = [t for t in cfg.tasks if context in cfg.contexts or t in ruler_tasks.NEEDLE_TASKS]
        prompts = [p for task in tasks for p in ruler_tasks.build_prompts(
            ctx.model.tokenizer, task, context, cfg.samples, ctx.config.seed, text_source=cfg.text_source,
            splits=cfg.splits, chat=cfg.chat)]
        prompts.sort(key=lambda p: p.max_new_tokens)  # similar answer lengths share a batch
        full = _cell(ctx, cells, "full", context, "full", None, prompts, lambda: run_bounded(ctx, prompts, None))
        results.append(full)
        task_scores = _by_task(full)
        kept = [t for t in tasks if task_scores[t] >= cfg.min_full_score]
        ctx.log(f"ruler {context}: full attention " + ", ".join(f"{t} {task_scores[t]:.2f}" for t in tasks))
        mine = [p for p in prompts if p.task in kept]
        if not mine:
            continue
        sizes = tuple(cache_size_at(r, context) for r in cfg.ratios) if cfg.ratios else cfg.cache_sizes
        rows = [dataclasses.replace(row, cache_size=row.policy.cache_size)  # a row with its own m keeps it
                for row in policy_rows(cfg.policies or ctx.config.policies, sizes) if row.policy.bounded]
        for setting in cfg.settings:
            if setting == "bounded":
                for row in ctx.bar(rows, f"ruler {context} bounded"):
                    results.append(_cell(ctx, cells, setting, context, row.label, row.cache_size, mine,
                                         lambda: run_bounded(ctx, mine, row)))
                continue
            for label in ctx.bar(list(dict.fromkeys(row.label for row in rows)), f"ruler {context} compressed"):
                group = [row for row in rows if row.label == label]
                results += _group_cells(ctx, cells, setting, context, label, group, mine)
    return dict(cells=results, rows=summary_rows(results, cfg.min_full_score), tasks=list(cfg.tasks),
                samples=cfg.samples, min_full_score=cfg.min_full_score, settings=list(cfg.settings))


def _cell(ctx, cells, setting, context, label, m, prompts, run) -> dict:
    prints = fingerprint(prompts)
    found = cells.get(setting=setting, context=context, policy=label, cache_size=m, fingerprint=prints)
    if found is not None:
        return found
    start = time.perf_counter()
    texts = run()
    cell = scored_cell(setting, context, label, m, prints, prompts, texts, time.perf_counter() - start)
    cells.add(cell)
    ctx.log(f"ruler {setting} {context} {label} m={m}: {np.mean(cell['scores']):.3f} ({cell['seconds']:.0f} s)")
    return cell


def _group_cells(ctx, cells, setting, context, label, rows, prompts) -> list:
    """The compress_after_prefill cells of one policy at every m (one context prefill per batch serves them all)."""
    prints = fingerprint(prompts)
    found = [cells.get(setting=setting, context=context, policy=label, cache_size=row.cache_size, fingerprint=prints)
             for row in rows]
    if all(cell is not None for cell in found):
        return found
    start = time.perf_counter()
    by_m = run_compressed(ctx, prompts, rows)
    seconds = (time.perf_counter() - start) / len(rows)
    out = []
    for row in rows:
        cell = scored_cell(setting, context, label, row.cache_size, prints, prompts, by_m[row.cache_size], seconds)
        cells.add(cell)
        ctx.log(f"ruler {setting} {context} {label} m={row.cache_size}: {np.mean(cell['scores']):.3f}")
        out.append(cell)
    return out


def _by_task(cell) -> dict:
    per = {}
    for task, value in zip(cell["tasks"], cell["scores"]):
        per.setdefault(task, []).append(value)
    return {task: float(np.mean(values)) for task, values in per.items()}


def summary_rows(cells, min_full_score: float) -> list:
    """One row per (setting, context, policy, m): the per-task means, and their average over the tasks where full
    attention scores at least min_full_score, with the prompt count and the binomial standard error
    sqrt(a (1 - a) / n) of that average a."""
    full = {c["context"]: _by_task(c) for c in cells if c["setting"] == "full"}
    rows = []
    for cell in cells:
        per_task = _by_task(cell)
        kept = [t for t in per_task if full[cell["context"]].get(t, 0.0) >= min_full_score]
        scores = [s for t, s in zip(cell["tasks"], cell["scores"]) if t in kept]
        average = float(np.mean(scores)) if scores else None
        reference = np.mean([s for t, s in full[cell["context"]].items() if t in kept]) if kept else None
        rows.append(dict(setting=cell["setting"], context=cell["context"], policy=cell["policy"],
                         cache_size=cell["cache_size"], ratio=cell["ratio"], per_task=per_task, average=average,
                         prompts=len(scores),
                         stderr=None if average is None else float(np.sqrt(average * (1 - average) / len(scores))),
                         vs_full=average / reference if average is not None and reference else None,
                         seconds=cell["seconds"]))
    return rows
