"""Mutation check: break each rule on purpose and require a test to go red.

    python scripts/mutation_check.py            # every mutant (a few minutes on 2 cores)
    python scripts/mutation_check.py --list     # what each mutant changes
    python scripts/mutation_check.py --only "recall"   # the mutants whose name contains the text

A mutant names a function (`Class.method` or `function`, in one file) and a semantic change inside it: an
expression, matched by its syntax tree (not by its text, so formatting, comments and the code around it may
change), and what replaces it: a flipped sign or comparison, another index, a dropped term. The expression must
occur exactly once in the function. The mutant is applied to a scratch copy of the working tree (never the
tree itself), and the tests that guard the rule run there. A mutant that leaves them green is a rule no test can
catch: the check fails. First the same tests run on the unmutated copy and must pass, so a mutant is only
"killed" by a test that can tell the rules apart. Exit status 0 when every mutant is killed.
"""
import argparse
import ast
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # the file, relative to the repository root
    function: str  # "Class.method" or "function" in that file
    expr: str  # an expression that occurs once in the function (compared as syntax trees)
    mutated: str  # what replaces it
    tests: tuple  # pytest arguments that must go red


EVICTION = "tests/test_eviction.py::test_kept_set_and_logits_equal_the_event_reference"
H2O_RESTART = "tests/test_eviction.py::test_h2o_statistic_restarts_for_a_new_token_in_a_reused_slot"
REBUILD = "tests/test_policies.py::test_rebuild_reenters_block_and_cache_and_matches_hand_assembled_attention"
REBUILD_MARGIN = "tests/test_policies.py::test_adaptive_rebuild_margin_matches_the_event_reference"
GROUPED = "tests/test_kernels_slot_attention.py::test_grouped_matches_twin"
BY_ATTENTION = "tests/test_policies.py::test_rebuild_by_attention_matches_the_event_reference"
PREFILL_KERNELS = "tests/test_kernels_prefill_attention.py"
STORED = "tests/test_policies.py::test_stored_recall_matches_the_event_reference"
PAGE_BOUNDS = "tests/test_policies.py::test_page_bounds_bound_every_key_and_are_tight_for_one_key"
HIDDEN_INPUT = "tests/test_policies.py::test_a_hidden_state_controller_reads_each_tokens_own_pass"
HIDDEN_TRAINING = "tests/test_train_controller.py::test_a_hidden_state_controller_trains_on_what_decoding_taps"
RECALL = "returnsrecallR=3"
SNAPKV_WINDOW = "tests/test_eviction.py::test_snapkv_window_is_a_chunks_last_queries_or_a_steps_current_one"
SNAPKV_RING = "tests/test_eviction.py::test_snapkv_ring_takes_the_oldest_entries_and_restarts_written_slots"
SNAPKV = ("snapkv-window3-pool3", "snapkv-window5-pool3-recent1")
COMPRESS_ONCE = "tests/test_ruler.py::test_compress_after_prefill_releases_once_then_keeps_the_question_and_answer"
COMPRESS_FULL = "tests/test_ruler.py::test_compress_after_prefill_is_full_attention_when_m_holds_the_context"
COMPRESS_SHARED = "tests/test_ruler.py::test_one_context_prefill_serves_every_m"
RULER_AVERAGES = "tests/test_ruler.py::test_averages_leave_out_the_tasks_full_attention_fails"


def eviction(*cases):
    return tuple(f"{EVICTION}[{case}]" for case in cases)


P = "adore_jax/policies/"
MUTANTS = (
    Mutant("h2o and tova evict the most attended token (score = -mass)", P + "base.py", "MassScorer.slot_scores",
           "state", "-state", eviction("h2o-default", "h2o-recent2", "tova-default", "tova-sinks1-recent1")),
    Mutant("h2o forgets past queries (mass not accumulated)", P + "h2o.py", "H2O.update",
           "jnp.where(written_slots(block, state.shape[1]), 0.0, state) + mass", "mass",
           eviction("h2o-default", "h2o-recent2")),
    Mutant("h2o: a new token inherits its slot's old statistic", P + "h2o.py", "H2O.update",
           "jnp.where(written_slots(block, state.shape[1]), 0.0, state)", "state",
           eviction("h2o-default", "h2o-recent2") + (H2O_RESTART,)),
    Mutant("h2o counts the attention of padding rows", P + "h2o.py", "H2O.mass_weights",
           "block.valid.astype(jnp.float32)", "jnp.ones(block.valid.shape, jnp.float32)",
           eviction("h2o-default", "h2o-recent2") + (H2O_RESTART,)),
    Mutant("the prefill's release inverts the controller's scores", "adore_jax/decode.py", "prefill",
           "steps.scores(ps, current, cache.slot_positions)", "-steps.scores(ps, current, cache.slot_positions)",
           eviction("adore-default", "adore-sinks2-recent3")),
    Mutant("window keeps the oldest tokens", P + "window.py", "Window.slot_scores",
           "cache.slot_positions.astype(jnp.float32)", "-cache.slot_positions.astype(jnp.float32)",
           eviction("window-default")),
    Mutant("streaming_llm pins one sink token too many", P + "base.py", "BoundedPolicy.pinned",
           "slot_positions < self.sinks", "slot_positions <= self.sinks", eviction("streaming_llm-sinks2")),
    Mutant("the recent window is one token short", P + "base.py", "BoundedPolicy.pinned",
           "current_position[:, None] - self.recent", "current_position[:, None] - self.recent + 1",
           eviction("tova-sinks1-recent1", "adore-sinks2-recent3")),
    Mutant("tova keeps the first query of a block instead of the last", P + "base.py", "CachePolicy.mass_weights",
           "last_row", "0 * last_row", eviction("tova-default", "tova-sinks1-recent1")),
    Mutant("key norm keeps the largest keys", P + "key_norm.py", "KeyNorm.slot_scores",
           "-norms / len(cache.k)", "norms / len(cache.k)", eviction("key_norm-default", "key_norm-sinks1")),
    Mutant("key norm reads the first layer's keys alone", P + "key_norm.py", "KeyNorm.slot_scores",
           "sum((jnp.linalg.norm(k.astype(jnp.float32), axis=-1).mean(axis=-1) for k in cache.k))",
           "jnp.linalg.norm(cache.k[0].astype(jnp.float32), axis=-1).mean(axis=-1) * len(cache.k)",
           eviction("key_norm-default")),
    Mutant("random ignores its seed", P + "random.py", "Random.slot_scores",
           "position_hash(self.seed, cache.slot_positions)", "position_hash(0, cache.slot_positions)",
           eviction("random-seed7")),
    Mutant("snapkv does not pool (pool treated as 1)", P + "snapkv.py", "SnapKV.slot_scores", "self.pool == 1", "True",
           eviction(*SNAPKV)),
    Mutant("snapkv: ties of the pooled score go to the token with less mass of its own", P + "snapkv.py",
           "SnapKV.slot_scores", "jnp.lexsort((own, pooled), axis=1)", "jnp.lexsort((-own, pooled), axis=1)",
           eviction(*SNAPKV)),
    Mutant("snapkv's window is every valid query of a chunk", P + "snapkv.py", "SnapKV.mass_weights",
           "j > last_row[:, None] - self.window", "j >= 0", eviction(*SNAPKV) + (SNAPKV_WINDOW,)),
    Mutant("snapkv's window is a chunk's last query alone", P + "snapkv.py", "SnapKV.mass_weights",
           "last_row[:, None] - self.window", "last_row[:, None] - 1", eviction(*SNAPKV) + (SNAPKV_WINDOW,)),
    Mutant("snapkv's window counts the released tokens a rebuild step runs", P + "snapkv.py", "SnapKV.mass_weights",
           "block.valid & (block.positions == last_position - (last_row[:, None] - j))", "block.valid",
           (SNAPKV_WINDOW,)),
    Mutant("snapkv's ring does not advance (every block overwrites the same entries)", P + "snapkv.py",
           "SnapKV.update", "(state.oldest + count) % self.window", "state.oldest",
           eviction(*SNAPKV) + (SNAPKV_RING,)),
    Mutant("snapkv: a new token inherits its slot's ring entries", P + "snapkv.py", "SnapKV.update",
           "jnp.where(written_slots(block, state.ring.shape[1])[:, :, None], 0.0, state.ring)", "state.ring",
           eviction(*SNAPKV) + (SNAPKV_RING,)),
    Mutant("snapkv: each entry a chunk overwrites holds its window's whole mass, not the mean", P + "snapkv.py",
           "SnapKV.update", "mass / jnp.maximum(count, 1)[:, None].astype(jnp.float32)", "mass",
           eviction(*SNAPKV) + (SNAPKV_RING,)),
    Mutant("compress after prefill releases nothing", "adore_jax/decode.py", "compress",
           "steps.release(cache, ps, steps.scores(ps, position, cache.slot_positions), position, cache.num_slots)",
           "cache", (COMPRESS_ONCE,)),
    Mutant("after compressing, the questions and answers are released down to m", "adore_jax/session.py",
           "plan_compression", "m + question_padded + max_new_tokens", "m", (COMPRESS_ONCE,)),
    Mutant("a prefill block right-aligned at a negative offset feeds its leading padding", "adore_jax/decode.py",
           "prefill", "(rows < lengths[:, None]) & (positions >= 0)", "rows < lengths[:, None]", (COMPRESS_FULL,)),
    Mutant("another budget's session keeps the first budget's recent window", "adore_jax/session.py",
           "DecodeSession.at_cache_size", "self.requested_policy", "self.policy", (COMPRESS_SHARED,)),
    Mutant("RULER averages the tasks full attention fails too", "eval/ruler.py", "summary_rows",
           "full[cell['context']].get(t, 0.0) >= min_full_score", "True", (RULER_AVERAGES,)),
    Mutant("rebuild and recall pick tokens that are still cached", P + "returns.py", "released_before",
           "(jnp.arange(n)[None, :] < position[:, None]) & ~in_cache", "jnp.arange(n)[None, :] < position[:, None]",
           (f"{REBUILD}[rebuild]", f"{STORED}[from-layer-0]", f"{STORED}[long-prompt]")),
    Mutant("transient rebuild leaves the rebuilt rows in the cache", P + "rebuild.py", "Rebuild.decode_step",
           "wanted if self.into_cache else jnp.zeros_like(wanted)", "wanted", (f"{REBUILD}[transient]",)),
    Mutant("adaptive rebuild lowers the bar by its margin", P + "rebuild.py", "Rebuild.choose",
           "weakest + self.margin", "weakest - self.margin", (REBUILD_MARGIN,)),
    Mutant("block-diagonal queries read the next KV head (grouped path, TPU kernel)", "pallas_kernels/_common.py",
           "block_diagonal_queries", "jnp.eye(n_kv, dtype=q.dtype)",
           "jnp.roll(jnp.eye(n_kv, dtype=q.dtype), 1, axis=1)", (GROUPED,)),
    Mutant("future-need labels look one query short of the horizon", "train/labels.py", "union_over_horizon",
           "jnp.pad(later, ((0, 0), (0, horizon + 1), (0, 0)))[:, horizon + 1:]",
           "jnp.pad(later, ((0, 0), (0, horizon + 1), (0, 0)))[:, horizon:]",
           ("tests/test_train_labels.py::test_future_need_labels_equal_brute_force",)),
    Mutant("adore's attention term prefers the least attended tokens", P + "adore.py", "Adore.slot_scores",
           "scores + self.attention_weight * jnp.log(state.mass + MASS_FLOOR)",
           "scores - self.attention_weight * jnp.log(state.mass + MASS_FLOOR)",
           eviction("adore-default", "adore-attention_weight2.0")),
    Mutant("rebuild by attention takes the mean over heads, not the max", P + "key_logits.py", "max_head_logits",
           "jnp.max(logits, axis=-1)", "jnp.mean(logits, axis=-1)",
           (f"{BY_ATTENTION}[transient]", f"{BY_ATTENTION}[transient-long-prompt]")),
    Mutant("recall takes the mean over heads, not the max", P + "key_logits.py", "_max_over_grouped_heads",
           "jnp.max(logits, axis=(1, 4))", "jnp.mean(logits, axis=(1, 4))",
           (f"{STORED}[from-layer-0]", f"{STORED}[paged]")),
    Mutant("a rebuilt token's ranking key is overwritten by its rebuilt key", P + "rebuild.py", "Rebuild.after_block",
           "block.valid & (block.positions >= state.next_position)", "block.valid",
           (f"{BY_ATTENTION}[into-cache]", f"{BY_ATTENTION}[transient]")),
    Mutant("recall: every layer ranks with the first recalling layer's keys", P + "recall.py", "Recall.rows",
           "store.keys[index]", "store.keys[self.from_layer]", (f"{STORED}[from-layer-0]",)),
    Mutant("recall: the layers below from_layer recall too", P + "recall.py", "Recall.decode_step",
           "index < self.from_layer", "False", (f"{STORED}[from-layer-1]",) + eviction("tova-returnsrecallR=2from1")),
    Mutant("recall restores zeros (the store keeps nothing)", P + "recall.py", "Recall.after_block",
           "stored.at[r, :, where].set(block_rows(cached), mode='drop')",
           "stored.at[r, :, where].set(0 * block_rows(cached), mode='drop')",
           (f"{STORED}[from-layer-0]", f"{STORED}[long-prompt]") + eviction(f"tova-{RECALL}")),
    Mutant("recall: a page's bound reads only each key dim's max", P + "key_logits.py", "page_bounds",
           "[jnp.maximum(grouped, 0), jnp.minimum(grouped, 0)]", "[grouped, jnp.zeros_like(grouped)]",
           (PAGE_BOUNDS, f"{STORED}[paged]")),
    Mutant("recall: a page's bound keeps only its latest key's max", P + "recall.py", "Recall.after_block",
           "bounds.at[r, :, page, 0].max(block_rows(cached), mode='drop')",
           "bounds.at[r, :, page, 0].set(block_rows(cached), mode='drop')",
           (f"{STORED}[paged]", f"{STORED}[paged-long-prompt]")),
    Mutant("recall: pages without a recallable token are ranked too", P + "recall.py", "Recall.best_pages",
           "jnp.where(holds, page_bounds(query, bounds), -jnp.inf)", "page_bounds(query, bounds)",
           (f"{STORED}[paged]", f"{STORED}[paged-long-prompt]")),
    Mutant("extra rows per query: their values are left out", "adore_jax/model.py", "attend_with_rows",
           "jnp.einsum('bgjqk,bqkgd->bqgjd', row_probs, v_rows)",
           "0 * jnp.einsum('bgjqk,bqkgd->bqgjd', row_probs, v_rows)",
           (f"{STORED}[prefill-recall]", f"{STORED}[prefill-recall-paged]")),
    Mutant("recall in prefill: a chunk may recall its own tokens, not yet stored", P + "recall.py",
           "Recall.prefill_hook", "released_before(cache, start, state.keys[0].shape[2])",
           "released_before(cache, start + 10 ** 6, state.keys[0].shape[2])",
           (f"{STORED}[prefill-recall]", f"{STORED}[prefill-recall-paged]")),
    Mutant("extra rows in spare slots are left invisible", "adore_jax/model.py", "forward_block",
           "slot_valid.at[batch_rows, extra.slots].set(extra.valid)", "slot_valid",
           (f"{STORED}[from-layer-0]",) + eviction(f"h2o-{RECALL}")),
    Mutant("ranked future-need labels ignore the horizon's last query", "train/labels.py", "window_max",
           "horizon + 1 - span", "horizon - span",
           ("tests/test_train_labels.py::test_ranked_future_need_labels_equal_brute_force",)),
    Mutant("discounted future need forgets what follows", "train/labels.py", "discounted_future",
           "row + decay * later", "row + 0 * later",
           ("tests/test_train_labels.py::test_ranked_future_need_labels_equal_brute_force",)),
    Mutant("graded labels trained as if every listed key were in the top-K set", "train/controller_training.py",
           "controller_loss", "counts.astype(jnp.float32) / sets", "(counts > 0).astype(jnp.float32)",
           ("tests/test_train_controller.py::test_graded_bce_is_the_mean_bce_against_each_nested_set",)),
    Mutant("release recall keeps the lowest-scored token", "train/controller_training.py", "release_recall",
           "np.argmin(logits[t, kept])", "np.argmax(logits[t, kept])",
           ("tests/test_train_controller.py::test_release_recall_follows_a_hand_assembled_history",)),
    Mutant("a decode step's release leaves the current token unscored", P + "returns.py", "ReturnPath.decode_step",
           "steps.scores(state, position, cache.slot_positions)",
           "steps.scores(state, position, jnp.where(cache.slot_positions == position[:, None], 0, "
           "cache.slot_positions))", eviction("adore-default", "adore-attention_weight0.0")),
    Mutant("a rebuild step's release under a hidden-state controller leaves the current token unscored",
           P + "rebuild.py", "Rebuild.decode_step", "steps.scores(state, position, cache.slot_positions)",
           "steps.scores(state, position, jnp.where(cache.slot_positions == position[:, None], 0, "
           "cache.slot_positions))", (f"{REBUILD}[rebuild-hidden]",)),
    Mutant("a rebuild step's controller reads a rebuilt row's hidden state, not the current token's",
           P + "rebuild.py", "last_hidden", "layer_hidden[:, -1:]", "layer_hidden[:, :1]", (HIDDEN_INPUT,)),
    Mutant("the controller's training table holds the hidden state one layer deeper", "train/controller_inputs.py",
           "hidden_states", "params['layers'][:layer]", "params['layers'][:layer + 1]", (HIDDEN_TRAINING,)),
    Mutant("training records index the hidden-state table one token off", "train/controller_inputs.py",
           "TableRows.__getitem__", "self.starts[index] + np.arange(len(record['tokens']), dtype=np.int32)",
           "self.starts[index] + 1 + np.arange(len(record['tokens']), dtype=np.int32)", (HIDDEN_TRAINING,)),
    Mutant("decoding may run one position past max_length", "adore_jax/decode.py", "decode",
           "last >= limit", "last > limit",
           ("tests/test_decode.py::test_decoding_past_max_length_is_refused_not_silently_dropped",)),
    Mutant("the prefill kernels' bound stops one slot block short", "pallas_kernels/_common.py", "visible_slot_blocks",
           "jnp.arange(1, seen.shape[2] + 1, dtype=jnp.int32)", "jnp.arange(seen.shape[2], dtype=jnp.int32)",
           (PREFILL_KERNELS,)),
    Mutant("a block of exactly PREFILL_MIN_QUERIES queries goes to the slot kernel", "pallas_kernels/slot_attention.py",
           "slot_attention", "q.shape[1] >= PREFILL_MIN_QUERIES", "q.shape[1] > PREFILL_MIN_QUERIES",
           (PREFILL_KERNELS + "::test_dispatcher_takes_the_prefill_kernel_for_long_blocks",)),
    Mutant("the k-th largest by bisection keeps a candidate that fewer than k entries reach",
           "pallas_kernels/_common.py", "_kth_largest_rows",
           "jnp.sum(keys >= mid[:, None], axis=-1, dtype=jnp.int32) >= k",
           "jnp.sum(keys >= mid[:, None], axis=-1, dtype=jnp.int32) >= k - 1",
           ("tests/test_kernels_topk.py::test_kth_largest_by_bisection_equals_sorting",)),
)


def copy_tree(destination: str) -> None:
    """The working tree's tracked and untracked (not ignored) files, as they are now."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))


def _same(a, b) -> bool:
    return ast.dump(a, annotate_fields=False) == ast.dump(b, annotate_fields=False)


def find_function(tree, qualname: str):
    """The FunctionDef of `Class.method` or `function` in a module's tree, or None."""
    scope = tree.body
    *classes, name = qualname.split(".")
    for cls in classes:
        scope = next((n.body for n in scope if isinstance(n, ast.ClassDef) and n.name == cls), [])
    return next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


class _Replace(ast.NodeTransformer):
    def __init__(self, old, new):
        self.old, self.new, self.count = old, new, 0

    def visit(self, node):
        if isinstance(node, ast.expr) and _same(node, self.old):
            self.count += 1
            return ast.copy_location(self.new, node)
        return super().visit(node)


def mutated_text(root: str, mutant: Mutant) -> str:
    """The file's text with the mutant's function re-emitted, its expression replaced."""
    with open(os.path.join(root, mutant.path)) as f:
        text = f.read()
    function = find_function(ast.parse(text), mutant.function)
    if function is None:
        raise SystemExit(f"mutation_check: mutant {mutant.name!r}: no function {mutant.function!r} in {mutant.path}: "
                         f"update the mutant")
    old, new = ast.parse(mutant.expr, mode="eval").body, ast.parse(mutant.mutated, mode="eval").body
    replace = _Replace(old, new)
    changed = replace.visit(function)
    if replace.count != 1:
        raise SystemExit(f"mutation_check: mutant {mutant.name!r}: {mutant.expr!r} occurs {replace.count} times in "
                         f"{mutant.path}:{mutant.function} (expected once): update the mutant")
    lines = text.splitlines(keepends=True)
    first = min([function.lineno] + [d.lineno for d in function.decorator_list]) - 1
    indent = lines[function.lineno - 1][:len(lines[function.lineno - 1]) - len(lines[function.lineno - 1].lstrip())]
    body = textwrap.indent(ast.unparse(ast.fix_missing_locations(changed)), indent) + "\n"
    return "".join(lines[:first]) + body + "".join(lines[function.end_lineno:])


def apply(root: str, mutant: Mutant) -> None:
    text = mutated_text(root, mutant)
    with open(os.path.join(root, mutant.path), "w") as f:
        f.write(text)


def run_tests(root: str, tests) -> tuple:
    """(passed, seconds, output tail) of pytest over `tests` in the copy at `root`."""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                          env=env, capture_output=True, text=True)
    return done.returncode == 0, time.perf_counter() - start, (done.stdout + done.stderr)[-2000:]


def try_mutant(pristine: str, scratch: str, index: int, mutant: Mutant) -> tuple:
    """(survived, seconds) of one mutant in its own copy."""
    mutated = os.path.join(scratch, f"mutant{index}")
    shutil.copytree(pristine, mutated)
    apply(mutated, mutant)
    passed, seconds, _ = run_tests(mutated, mutant.tests)
    shutil.rmtree(mutated)
    return passed, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--only", default="", help="only the mutants whose name contains this text")
    args = parser.parse_args()
    mutants = tuple(m for m in MUTANTS if args.only in m.name)
    if not mutants:
        parser.error(f"--only {args.only!r} matches no mutant's name (see --list)")
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}\n    {mutant.path}:{mutant.function}: {mutant.expr!r} -> {mutant.mutated!r}\n"
                  f"    tests: {' '.join(mutant.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as scratch:
        pristine = os.path.join(scratch, "pristine")
        copy_tree(pristine)
        for mutant in mutants:
            mutated_text(pristine, mutant)  # every mutant's text exists, before any test runs
        passed, seconds, tail = run_tests(pristine, tuple(dict.fromkeys(t for m in mutants for t in m.tests)))
        if not passed:
            print(f"mutation_check: the unmutated tree fails the guarding tests:\n{tail}", file=sys.stderr)
            return 1
        print(f"unmutated tree: the guarding tests pass ({seconds:.0f} s)", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = [pool.submit(try_mutant, pristine, scratch, i, m) for i, m in enumerate(mutants)]
            survivors = []
            for mutant, run in zip(mutants, runs):
                survived, seconds = run.result()
                print(f"{'SURVIVED' if survived else 'killed  '} {seconds:5.0f} s  {mutant.name}", flush=True)
                if survived:
                    survivors.append(mutant.name)
    if survivors:
        print(f"mutation_check: {len(survivors)} mutant(s) survived: no test catches {survivors}", file=sys.stderr)
        return 1
    print(f"mutation_check: all {len(mutants)} mutants killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
