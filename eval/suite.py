"""The evaluation suite: every policy at the same cache budget m, on quality and on speed.

    config = load_eval_config("configs/eval_smollm2.yaml")
    results = run_suite(config)           # dict, also written as results.json + report.md + plots

Parts (EvalConfig.parts):
  perplexity   teacher-forced log-likelihood through the generation path (prefill + decode scan),
               so a policy is scored only on what it kept
  generation   greedy answers per policy, scored against full attention's and against references
  streaming    multi-turn conversations fed turn by turn, the cache bounded at m throughout
  speed        decode ms/step and tokens/s vs context and batch (synthetic caches), and the largest
               batch each policy fits in a memory budget with its throughput there
  diagnostics  top-K recall of what each query could attend (kept + rebuilt) vs the oracle
  retrieval    a numeric key hidden at several depths of a long text, asked for at the end: accuracy per
               policy, m and context, and as a fraction of full attention's (eval/retrieval.py)
  ruler        RULER's synthetic long-context tasks at compression ratios, bounded throughout and compressed
               after prefill (eval/ruler.py; only when asked)
  gap          where the loss against full attention goes: oracles and perfect-scorer eviction beside the
               policies (eval/gap.py; only when asked)
"""
import dataclasses
import os
import time
from typing import Callable

import jax
import numpy as np

import adore_jax
from adore_jax import controller as ctrl
from adore_jax.eval import diagnostics, gap, machine, metrics, retrieval, ruler, sources
from adore_jax.eval.config import EvalConfig, PolicyRow, batches, policy_grid
from adore_jax.memory import return_freed_memory
from adore_jax.policies import make_policy


@dataclasses.dataclass
class Context:
    """What every part needs: the config, the model, the controller and the notices collected."""
    config: EvalConfig
    model: adore_jax.Model
    controller: tuple  # (ControllerConfig, params) for adore rows
    notices: list
    log: Callable = print  # one line per finished row of the long parts

    def options(self, row: PolicyRow) -> dict:
        """generate() / teacher_force() arguments of a row: its policy, and the controller if it reads one."""
        return dict(cache=row.policy, controller=self.controller if row.policy.needs_controller else None)

    def controller_params(self, policy) -> dict:
        return self.controller[1] if policy.needs_controller else {}

    def bar(self, iterable, desc: str, total=None):
        """The rows of a part, with a progress bar when configured; after each row, the heap memory its freed
        buffers left resident goes back to the system (`return_freed_memory`: without it a run's resident memory
        grew with every row, and a 17-row retrieval run was killed at 24 GB)."""
        if self.config.progress:
            from tqdm.auto import tqdm
            iterable = tqdm(iterable, desc=desc, total=total, leave=False)
        for item in iterable:
            yield item
            return_freed_memory()


def resolve_controller(model, source, seed: int = 0):
    """((ControllerConfig, params), description): a trained controller, or an untrained random one."""
    from adore_jax.weights import default_controller

    default = default_controller(model.source) if source is None else None
    if source is None and not default or source == "random":
        config = ctrl.ControllerConfig(embed_dim=model.config.hidden_size)
        params = ctrl.init_controller(config, jax.random.key(seed))
        return (config, params), dict(source="random", trained=False)
    # the embedded default is named by model, not by this machine's install path
    name = f"{model.source}'s default ({os.path.basename(default)})" if default else source
    return ctrl.load_controller(default or source, model.config.hidden_size), dict(source=name, trained=True)


# ---------------------------------------------------------------- perplexity

def run_perplexity(ctx: Context) -> dict:
    """Datasets of equal (length, prompt_length) share teacher-forcing batches (one compile per policy row)."""
    cfg = ctx.config.perplexity
    groups = {}  # (length, prompt_length) -> [(dataset, [N, T] documents)]
    for spec in cfg.datasets:
        docs = sources.lm_documents(ctx.model, spec["name"], spec["count"], spec["length"], cfg.splits,
                                    ctx.config.seed)
        if len(docs) < spec["count"]:
            ctx.notices.append(f"perplexity: {spec['name']} has {len(docs)} documents of >= {spec['length']} "
                               f"tokens in splits {list(cfg.splits)} (asked for {spec['count']})")
        if len(docs):
            groups.setdefault((spec["length"], spec["prompt_length"]), []).append((spec["name"], docs))
    rows = []
    for (length, prompt_length), members in groups.items():
        docs = np.concatenate([d for _, d in members])
        owner = np.concatenate([[name] * len(d) for name, d in members])
        for row in ctx.bar(policy_grid(ctx.config), f"perplexity ({len(docs)} x {length} tokens)"):
            name, m = row.label, row.cache_size
            start = time.perf_counter()
            logprobs = np.concatenate([
                adore_jax.teacher_force(ctx.model, np.stack(batch), prompt_length, **ctx.options(row))[:real]
                for batch, real in batches(list(docs), cfg.batch_size)])  # [N, T - P]
            seconds = time.perf_counter() - start
            for dataset, _ in members:
                mine = logprobs[owner == dataset]
                nll = -float(mine.mean())
                rows.append(dict(dataset=dataset, policy=name, cache_size=m, perplexity=float(np.exp(nll)),
                                 nll_per_token=nll, tokens=int(mine.size), documents=len(mine), length=length,
                                 prompt_length=prompt_length, per_document=[metrics.perplexity(r) for r in mine],
                                 seconds=seconds))
                ctx.log(f"perplexity {dataset} {name} m={m}: {rows[-1]['perplexity']:.3f} ({seconds:.0f} s)")
    return dict(rows=_with_full_reference(rows, "perplexity", ("dataset",)))


def _with_full_reference(rows, key, group_keys):
    """Add `<key>_vs_full` (relative change against the full-attention row of the same group)."""
    full = {tuple(r[g] for g in group_keys): r[key] for r in rows if r["policy"] == "full"}
    for row in rows:
        reference = full.get(tuple(row[g] for g in group_keys))
        row[f"{key}_vs_full"] = metrics.relative_change(row[key], reference) if reference else None
    return rows


# ---------------------------------------------------------------- generation

def _generate_all(ctx, prompt_ids, row, max_new_tokens, batch_size):
    """Greedy outputs (texts) of every prompt under one policy row, and its decode speed."""
    steps, seconds = 0, 0.0
    order = np.argsort([len(p) for p in prompt_ids], kind="stable")  # similar lengths share a prefill shape
    outputs = [None] * len(prompt_ids)
    for batch, real in batches([int(i) for i in order], batch_size):
        out = adore_jax.generate(ctx.model, [prompt_ids[i] for i in batch], max_new_tokens, **ctx.options(row))
        for i, ids in zip(batch[:real], out.token_ids[:real]):
            outputs[i] = sources.as_text(ctx.model, ids)
        steps += out.stats["decode_steps"] * len(batch)
        seconds += out.stats["decode_s"]
    return outputs, (steps / seconds if seconds > 0 else float("nan"))


def _scores(ctx, hypotheses, references):
    return metrics.text_scores(hypotheses, references, ctx.config.bertscore_model)


def run_generation(ctx: Context) -> dict:
    cfg = ctx.config.generation
    prompts = sources.generation_prompts(ctx.model, cfg.sources, cfg.splits, cfg.min_prompt_tokens,
                                         cfg.max_prompt_tokens, ctx.config.seed)
    if not prompts:
        ctx.notices.append("generation: no prompts matched the configured sources and lengths")
        return dict(rows=[], samples=[])
    ids = [p.ids for p in prompts]
    outputs, rows = {}, []
    with_reference = [i for i, p in enumerate(prompts) if p.reference is not None]
    for policy_row in ctx.bar(policy_grid(ctx.config), "generation"):
        name, m = policy_row.label, policy_row.cache_size
        start = time.perf_counter()
        texts, tokens_per_s = _generate_all(ctx, ids, policy_row, cfg.max_new_tokens, cfg.batch_size)
        outputs[(name, m)] = texts
        row = dict(policy=name, cache_size=m, prompts=len(prompts), decode_tokens_per_s=tokens_per_s,
                   seconds=time.perf_counter() - start)
        if with_reference:
            row["vs_reference"] = _scores(ctx, [texts[i] for i in with_reference],
                                          [prompts[i].reference for i in with_reference])
            row["references"] = len(with_reference)
        rows.append(row)
        ctx.log(f"generation {name} m={m}: {tokens_per_s:.1f} tokens/s ({row['seconds']:.0f} s)")
    full = outputs.get(("full", None))
    if full is not None:
        for row in rows:
            row["vs_full"] = _scores(ctx, outputs[(row["policy"], row["cache_size"])], full)
    samples = [dict(source=p.source, prompt=p.text, prompt_tokens=len(p.ids), reference=p.reference,
                    outputs={f"{name}" + (f" m={m}" if m else ""): texts[i] for (name, m), texts in outputs.items()})
               for i, p in enumerate(prompts)]
    return dict(rows=rows, samples=samples, prompt_tokens=[len(p) for p in ids])


# ---------------------------------------------------------------- streaming

def run_streaming(ctx: Context) -> dict:
    cfg = ctx.config.streaming
    convs = sources.conversations(ctx.model, cfg.source, cfg.conversations, cfg.turns, cfg.max_turn_tokens,
                                  cfg.splits, ctx.config.seed)
    if not convs:
        ctx.notices.append(f"streaming: no {cfg.source} conversation has {cfg.turns} turns")
        return dict(rows=[])
    limit = ctx.model.config.max_position_embeddings - cfg.max_new_tokens
    turn_prompts = []
    for turn in range(cfg.turns):
        prompts = [sources.turn_prompt(ctx.model, conv, turn) for conv in convs]
        if max(map(len, prompts)) > limit:
            ctx.notices.append(f"streaming: stopped after {turn} turns (turn {turn + 1} exceeds the model's context)")
            break
        turn_prompts.append(prompts)
    rows, full = [], {}
    grid = policy_grid(ctx.config)
    grid.sort(key=lambda row: row.label != "full")  # full first: the others are scored against it
    for policy_row in ctx.bar(grid, "streaming"):
        name, m = policy_row.label, policy_row.cache_size
        per_turn = []
        for turn, prompts in enumerate(turn_prompts):
            out = adore_jax.generate(ctx.model, prompts, cfg.max_new_tokens, **ctx.options(policy_row))
            texts = [sources.as_text(ctx.model, ids) for ids in out.token_ids]
            if name == "full":
                full[turn] = texts
            refs = [sources.reference_text(ctx.model, conv[turn][1]) for conv in convs]
            entry = dict(turn=turn + 1, max_prompt_tokens=max(map(len, prompts)), cache_slots=out.stats["cache_slots"],
                         decode_tokens_per_s=out.stats["decode_tokens_per_s"],
                         vs_reference=_scores(ctx, texts, refs))
            if turn in full:
                entry["vs_full"] = _scores(ctx, texts, full[turn])
            per_turn.append(entry)
        rows.append(dict(policy=name, cache_size=m, conversations=len(convs), turns=per_turn))
    return dict(rows=rows)


# ---------------------------------------------------------------- speed

def _plan(ctx, row: PolicyRow, max_length):
    from adore_jax import decode

    policy = row.policy.validate(max_length)
    return decode.DecodePlan(ctx.model.config, policy, ctx.controller[0] if policy.needs_controller else None)


def state_bytes(model, plan, batch: int, context: int, steps: int) -> int:
    """Bytes of the cache and policy state of `batch` sequences decoding at `context` (no weights)."""
    from adore_jax import decode

    max_length = -(-(context + steps + 1) // 128) * 128
    policy = plan.policy
    slots = policy.cache_size + policy.block_rows if policy.bounded else max_length
    return decode.state_bytes(plan, batch, slots, max_length, model.dtype)


def run_speed(ctx: Context) -> dict:
    from adore_jax.eval.bench_policies import time_steps

    cfg = ctx.config.speed
    m = cfg.cache_size or max(ctx.config.cache_sizes)
    grid = policy_grid(ctx.config, cfg.policies, (m,))
    model = dataclasses.replace(ctx.model, config=dataclasses.replace(ctx.model.config, eos_token_ids=()))
    rng = np.random.default_rng(ctx.config.seed)
    budget = cfg.memory_budget_gb * 2 ** 30
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
    trained_context = model.config.max_position_embeddings
    rows, skipped = [], []
    runs = [(b, c, row) for b in cfg.batches for c in cfg.contexts for row in grid]
    for batch, context, policy_row in ctx.bar(runs, "speed"):
        name = policy_row.label
        if context + (cfg.repeats + 1) * cfg.steps > trained_context and not cfg.beyond_model_context:
            continue
        plan = _plan(ctx, policy_row, context + 4096)
        need = weights + state_bytes(model, plan, batch, context, (cfg.repeats + 1) * cfg.steps)
        if need > budget:
            skipped.append(dict(policy=name, batch=batch, context=context, gib=need / 2 ** 30))
            continue
        ms, _ = time_steps(model, plan, ctx.controller_params(plan.policy), batch, context, cfg.steps, cfg.repeats, rng)
        rows.append(dict(policy=name, cache_size=m if plan.policy.bounded else None, batch=batch, context=context,
                         ms_per_step=ms, tokens_per_s=1e3 * batch / ms,
                         beyond_model_context=context > trained_context))
    _speedups(rows)
    throughput = []
    for policy_row in ctx.bar(grid, "throughput"):
        name = policy_row.label
        plan = _plan(ctx, policy_row, cfg.throughput_context + 4096)
        steps = (cfg.repeats + 1) * cfg.steps
        per_sequence = state_bytes(model, plan, 2, cfg.throughput_context, steps) - \
            state_bytes(model, plan, 1, cfg.throughput_context, steps)
        largest = int((budget - weights - (state_bytes(model, plan, 1, cfg.throughput_context, steps) - per_sequence))
                      // per_sequence)
        row = dict(policy=name, context=cfg.throughput_context, state_mib_per_sequence=per_sequence / 2 ** 20,
                   largest_batch=largest, measured_batch=min(largest, cfg.max_measured_batch))
        if row["measured_batch"] >= 1:
            ms, _ = time_steps(model, plan, ctx.controller_params(plan.policy), row["measured_batch"],
                               cfg.throughput_context, cfg.steps, cfg.repeats, rng)
            row.update(ms_per_step=ms, tokens_per_s=1e3 * row["measured_batch"] / ms)
        throughput.append(row)
    full = next((r for r in throughput if r["policy"] == "full" and "tokens_per_s" in r), None)
    for row in throughput:
        row["speedup_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"] if full and "tokens_per_s" in row else None
    return dict(rows=rows, throughput=throughput, skipped_over_budget=skipped, cache_size=m,
                memory_budget_gb=cfg.memory_budget_gb, weights_mib=weights / 2 ** 20)


def _speedups(rows):
    full = {(r["batch"], r["context"]): r["tokens_per_s"] for r in rows if r["policy"] == "full"}
    for row in rows:
        reference = full.get((row["batch"], row["context"]))
        row["speedup_vs_full"] = row["tokens_per_s"] / reference if reference else None


# ---------------------------------------------------------------- the suite

PART_RUNNERS = {"perplexity": run_perplexity, "generation": run_generation, "streaming": run_streaming,
                "speed": run_speed, "diagnostics": lambda ctx: diagnostics.run_diagnostics(ctx),
                "retrieval": lambda ctx: retrieval.run_retrieval(ctx), "ruler": lambda ctx: ruler.run_ruler(ctx),
                "gap": lambda ctx: gap.run_gap(ctx)}


def run_suite(config: EvalConfig, model=None, write: bool = True, log=print) -> dict:
    """Run the configured parts; write results.json, report.md and plots into config.out_dir."""
    from adore_jax.eval.report import write_report

    started = time.time()
    if model is None:
        log(f"loading {config.model} ...")
        model = adore_jax.load_model(config.model, dtype=config.dtype)
    controller, controller_info = (None, dict(source=None, trained=False))
    if any(make_policy(spec).needs_controller
           for spec in config.policies + (config.speed.policies or ()) + config.diagnostics.policies
           + (config.retrieval.policies or ()) + (config.ruler.policies or ()) + (config.gap.policies or ())):
        controller, controller_info = resolve_controller(model, config.controller, config.seed)
    ctx = Context(config, model, controller, [], log)
    if controller_info["source"] == "random":
        ctx.notices.append("ADORE rows use an UNTRAINED random controller (no trained controller was found or "
                           "configured): their quality numbers measure the plumbing, not ADORE")
    ok, reason = metrics.bertscore_status(config.bertscore_model)
    if not ok:
        ctx.notices.append(reason)
    results = dict(meta=dict(model=model.source, config=dataclasses.asdict(config), controller=controller_info,
                             machine=machine.describe(),
                             started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))))
    for part in config.parts:
        log(f"[{part}] ...")
        part_start = time.perf_counter()
        results[part] = PART_RUNNERS[part](ctx)
        results[part]["seconds"] = time.perf_counter() - part_start
        log(f"[{part}] done in {results[part]['seconds']:.0f} s")
        results["meta"]["notices"] = ctx.notices
        results["meta"]["seconds"] = time.time() - started
        if write:  # after every part, so a long run stopped midway keeps the parts it finished
            results["meta"]["files"] = write_report(results, config.out_dir)
    return results
