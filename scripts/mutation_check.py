"""Mutation check: break each eviction rule on purpose and require a test to go red.

    python scripts/mutation_check.py            # every mutant (a few minutes on 2 cores)
    python scripts/mutation_check.py --list     # what each mutant changes
    python scripts/mutation_check.py --only "stored recall"   # the mutants whose name contains the text

Each mutant edits one rule in a scratch copy of the working tree (never the tree itself), then runs
the tests that guard the rule there. A mutant that leaves those tests green is a rule no test can
catch: the check fails. First the same tests run on the unmutated copy and must pass, so a mutant
is only "killed" by a test that can tell the rules apart. Exit status 0 when every mutant is killed.
"""
import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file to edit, relative to the repository root
    old: str  # text that must occur exactly once
    new: str
    tests: tuple  # pytest arguments that must go red


EVICTION = "tests/test_eviction.py::test_kept_set_and_logits_equal_the_event_reference"
H2O_RESTART = "tests/test_eviction.py::test_h2o_statistic_restarts_for_a_new_token_in_a_reused_slot"
REBUILD = "tests/test_policies.py::test_rebuild_reenters_block_and_cache_and_matches_hand_assembled_attention"
ADMISSION = "tests/test_policies.py::test_conservative_admission_matches_the_event_reference"
REBUILD_MARGIN = "tests/test_policies.py::test_adaptive_rebuild_margin_matches_the_event_reference"
GROUPED = "tests/test_kernels_slot_attention.py::test_grouped_matches_twin"
BY_ATTENTION = "tests/test_policies.py::test_rebuild_by_attention_matches_the_event_reference"
PREFILL_KERNELS = "tests/test_kernels_prefill_attention.py"
STORED = "tests/test_policies.py::test_stored_recall_matches_the_event_reference"
HIDDEN_INPUT = "tests/test_policies.py::test_a_hidden_state_controller_reads_each_tokens_own_pass"
HIDDEN_TRAINING = "tests/test_train_controller.py::test_a_hidden_state_controller_trains_on_what_decoding_taps"


def eviction(*cases):
    return tuple(f"{EVICTION}[{case}]" for case in cases)


MUTANTS = (
    Mutant("h2o evicts the most attended token (score = -mass)", "adore_jax/policies/h2o.py",
           "    def slot_scores(self, cache, ps, token_scores):\n        return ps.mass",
           "    def slot_scores(self, cache, ps, token_scores):\n        return -ps.mass",
           eviction("h2o-default", "h2o-recent2")),
    Mutant("tova evicts the most attended token (score = -mass)", "adore_jax/policies/tova.py",
           "        return ps.mass", "        return -ps.mass", eviction("tova-default", "tova-sinks1-recent1")),
    Mutant("h2o forgets past queries (mass not accumulated)", "adore_jax/policies/h2o.py",
           "mass=jnp.where(written, 0.0, ps.mass) + mass)", "mass=mass)",
           eviction("h2o-default", "h2o-recent2")),
    Mutant("h2o: a new token inherits its slot's old statistic", "adore_jax/policies/h2o.py",
           "jnp.where(written, 0.0, ps.mass)", "ps.mass", eviction("h2o-default", "h2o-recent2") + (H2O_RESTART,)),
    Mutant("h2o counts the attention of padding rows", "adore_jax/policies/h2o.py",
           "return block.valid.astype(jnp.float32)", "return jnp.ones(block.valid.shape, jnp.float32)",
           eviction("h2o-default", "h2o-recent2") + (H2O_RESTART,)),
    Mutant("adore's prefill release inverts the controller's scores", "adore_jax/decode.py",
           "cache = release(policy, cache, ps, token_scores, current, max_evictions=chunk)",
           "cache = release(policy, cache, ps, None if token_scores is None else -token_scores, current, "
           "max_evictions=chunk)", eviction("adore-default", "adore-sinks2-recent3")),
    Mutant("window keeps the oldest tokens", "adore_jax/policies/window.py",
           "return cache.slot_positions.astype(jnp.float32)", "return -cache.slot_positions.astype(jnp.float32)",
           eviction("window-default")),
    Mutant("streaming_llm pins one sink token too many", "adore_jax/policies/base.py",
           "pinned = slot_positions < self.sinks", "pinned = slot_positions <= self.sinks",
           eviction("streaming_llm-sinks2")),
    Mutant("the recent window is one token short", "adore_jax/policies/base.py",
           "slot_positions > current_position[:, None] - self.recent",
           "slot_positions > current_position[:, None] - self.recent + 1",
           eviction("tova-sinks1-recent1", "adore-sinks2-recent3")),
    Mutant("tova keeps the first query of a block instead of the last", "adore_jax/policies/base.py",
           "jax.nn.one_hot(last_row,", "jax.nn.one_hot(0 * last_row,", eviction("tova-default", "tova-sinks1-recent1")),
    Mutant("random ignores its seed", "adore_jax/policies/random.py",
           "return position_hash(self.seed, cache.slot_positions)", "return position_hash(0, cache.slot_positions)",
           eviction("random-seed7")),
    Mutant("rebuild picks tokens that are still cached", "adore_jax/policies/adore.py",
           "released = (jnp.arange(n)[None, :] < position[:, None]) & ~in_cache",
           "released = jnp.arange(n)[None, :] < position[:, None]", (f"{REBUILD}[rebuild]",)),
    Mutant("transient rebuild leaves the rebuilt rows in the cache", "adore_jax/policies/adore.py",
           "        if not self.rebuild_into_cache:\n            return jnp.zeros_like(wanted)",
           "        if False:\n            return jnp.zeros_like(wanted)", (f"{REBUILD}[transient]",)),
    Mutant("admission lets one rebuilt token too many stay", "adore_jax/policies/adore.py",
           "jnp.cumsum(admit, axis=1) <= self.max_admissions", "jnp.cumsum(admit, axis=1) <= self.max_admissions + 1",
           (f"{ADMISSION}[at-most-1]", f"{ADMISSION}[margin-and-at-most-1]")),
    Mutant("admission ignores its margin", "adore_jax/policies/adore.py",
           "> self.weakest_cached(cache, token_scores) + self.admission_margin",
           "> self.weakest_cached(cache, token_scores)", (f"{ADMISSION}[margin]",)),
    Mutant("adaptive rebuild lowers the bar by its margin", "adore_jax/policies/adore.py",
           "self.weakest_cached(cache, token_scores) + self.rebuild_margin",
           "self.weakest_cached(cache, token_scores) - self.rebuild_margin", (REBUILD_MARGIN,)),
    Mutant("block-diagonal queries read the next KV head (grouped path, TPU kernel)", "pallas_kernels/_common.py",
           'jnp.einsum("bgqrd,gh->bgqrhd", qg, jnp.eye(n_kv, dtype=q.dtype))',
           'jnp.einsum("bgqrd,gh->bgqrhd", qg, jnp.roll(jnp.eye(n_kv, dtype=q.dtype), 1, axis=1))', (GROUPED,)),
    Mutant("future-need labels look one query short of the horizon", "train/labels.py",
           "[:, horizon + 1:]  # ... of queries > t + horizon", "[:, horizon:]  # ... of queries > t + horizon",
           ("tests/test_train_labels.py::test_future_need_labels_equal_brute_force",)),
    Mutant("adore's attention term prefers the least attended tokens", "adore_jax/policies/adore.py",
           "return scores + self.attention_weight * jnp.log", "return scores - self.attention_weight * jnp.log",
           eviction("adore-default", "adore-attention_weight2.0")),
    Mutant("decayed attention: a new token inherits its slot's old statistic", "adore_jax/policies/adore.py",
           "self.attention_decay * jnp.where(written, 0.0, ps.mass)", "self.attention_decay * ps.mass",
           ("tests/test_eviction.py::test_adore_decayed_attention_restarts_for_a_new_token_in_a_reused_slot",)),
    Mutant("decayed attention forgets the previous blocks (gamma ignored)", "adore_jax/policies/adore.py",
           "latest = jnp.maximum(latest, self.attention_decay *", "latest = jnp.maximum(latest, 0.0 *",
           eviction("adore-attention_weight50.0-attention_decay0.8")),
    Mutant("rebuild by attention takes the mean over heads, not the max", "adore_jax/model.py",
           "return jnp.max(logits, axis=-1) * dim ** -0.5", "return jnp.mean(logits, axis=-1) * dim ** -0.5",
           (f"{BY_ATTENTION}[transient]", f"{BY_ATTENTION}[transient-long-prompt]")),
    Mutant("stored recall takes the mean over heads, not the max", "adore_jax/model.py",
           "return jnp.max(logits, axis=(1, 4)).swapaxes(1, 2)", "return jnp.mean(logits, axis=(1, 4)).swapaxes(1, 2)",
           (f"{STORED}[from-layer-0]", f"{STORED}[paged]")),
    Mutant("a rebuilt token's retrieval key is overwritten by its rebuilt key", "adore_jax/policies/adore.py",
           "first_seen = block.valid & (block.positions >= ps.retrieval_next)", "first_seen = block.valid",
           (f"{BY_ATTENTION}[into-cache]", f"{BY_ATTENTION}[transient]")),
    Mutant("stored recall: every layer ranks with the first recalling layer's keys", "adore_jax/model.py",
           "keys, values, recallable = self.keys[index],", "keys, values, recallable = self.keys[self.first_layer],",
           (f"{STORED}[from-layer-0]",)),
    Mutant("stored recall: the layers below first_layer recall too", "adore_jax/model.py",
           "        if index < self.first_layer:\n            return None\n", "",
           (f"{STORED}[from-layer-1]",)),
    Mutant("stored recall: a cached token can be recalled a second time", "adore_jax/policies/adore.py",
           "released = (jnp.arange(n)[None, :] < position[:, None]) & ~in_cache",
           "released = jnp.arange(n)[None, :] < position[:, None]", (f"{STORED}[from-layer-0]", f"{STORED}[long-prompt]")),
    Mutant("stored recall restores zeros (the store keeps nothing)", "adore_jax/policies/adore.py",
           "stored.at[r, :, where].set(block_rows(cached)", "stored.at[r, :, where].set(0 * block_rows(cached)",
           (f"{STORED}[from-layer-0]", f"{STORED}[long-prompt]")),
    Mutant("stored recall: a page's bound reads only each key dim's max", "adore_jax/model.py",
           "[jnp.maximum(grouped, 0), jnp.minimum(grouped, 0)]", "[grouped, jnp.zeros_like(grouped)]",
           ("tests/test_policies.py::test_page_bounds_bound_every_key_and_are_tight_for_one_key", f"{STORED}[paged]")),
    Mutant("stored recall: a page's bound keeps only its latest key's max", "adore_jax/policies/adore.py",
           "bounds.at[r, :, page, 0].max(", "bounds.at[r, :, page, 0].set(",
           (f"{STORED}[paged]", f"{STORED}[paged-long-prompt]")),
    Mutant("stored recall: pages without a recallable token are ranked too", "adore_jax/model.py",
           "jnp.where(holds, page_bounds(query, bounds), -jnp.inf)", "page_bounds(query, bounds)",
           (f"{STORED}[paged]", f"{STORED}[paged-long-prompt]")),
    Mutant("stored recall in prefill: the recalled rows' values are left out", "adore_jax/model.py",
           '+ jnp.einsum("bgjqk,bqkgd->bqgjd", row_probs, v_rows)', '+ 0 * jnp.einsum("bgjqk,bqkgd->bqgjd", row_probs, v_rows)',
           (f"{STORED}[prefill-recall]", f"{STORED}[prefill-recall-paged]")),
    Mutant("stored recall in prefill: a chunk may recall its own tokens, not yet stored", "adore_jax/decode.py",
           "recall = policy.recall(plan.model, cache, ps, jnp.full((batch,), start))",
           "recall = policy.recall(plan.model, cache, ps, jnp.full((batch,), start + chunk))",
           (f"{STORED}[prefill-recall]", f"{STORED}[prefill-recall-paged]")),
    Mutant("prefill_recall_last: one token more of the prompt recalls", "adore_jax/decode.py",
           "positions >= lengths[:, None] + 1 - policy.prefill_recall_last",
           "positions >= lengths[:, None] - policy.prefill_recall_last", (f"{STORED}[prefill-recall-last]",)),
    Mutant("prefill_recall_last: a block skips the ranking unless all its queries recall", "adore_jax/model.py",
           "jax.lax.cond(jnp.any(self.querying)", "jax.lax.cond(jnp.all(self.querying)",
           (f"{STORED}[prefill-recall-last]",)),
    Mutant("prefill_recall_last: the prompt's earlier tokens recall too", "adore_jax/model.py",
           "found &= self.querying[:, :, None]", "found &= True", (f"{STORED}[prefill-recall-last]",)),
    Mutant("rebuild reaches one token beyond rebuild_max_distance", "adore_jax/policies/adore.py",
           "position[:, None] - self.rebuild_max_distance\n", "position[:, None] - self.rebuild_max_distance - 1\n",
           ("tests/test_policies.py::test_rebuild_max_distance_keeps_candidates_within_reach",)),
    Mutant("ranked future-need labels ignore the horizon's last query", "train/labels.py",
           "rest = horizon + 1 - span", "rest = horizon - span",
           ("tests/test_train_labels.py::test_ranked_future_need_labels_equal_brute_force",)),
    Mutant("discounted future need forgets what follows", "train/labels.py",
           "total = row + decay * later", "total = row + 0 * later",
           ("tests/test_train_labels.py::test_ranked_future_need_labels_equal_brute_force",)),
    Mutant("graded labels trained as if every listed key were in the top-K set", "train/controller_training.py",
           "counts.astype(jnp.float32) / sets)", "(counts > 0).astype(jnp.float32))",
           ("tests/test_train_controller.py::test_graded_bce_is_the_mean_bce_against_each_nested_set",)),
    Mutant("graded labels count the top-K set twice, not the largest level", "train/labels.py",
           "sets = [top_k_mask(stat, allowed, k) for k in (top_k, *levels)]",
           "sets = [top_k_mask(stat, allowed, k) for k in (top_k, top_k, *levels[1:])]",
           ("tests/test_train_labels.py::test_graded_labels_count_the_nested_top_k_sets",)),
    Mutant("release recall keeps the lowest-scored token", "train/controller_training.py",
           "kept = np.delete(kept, np.argmin(logits[t, kept]))", "kept = np.delete(kept, np.argmax(logits[t, kept]))",
           ("tests/test_train_controller.py::test_release_recall_follows_a_hand_assembled_history",)),
    Mutant("a decode step without rebuild leaves the current token unscored", "adore_jax/decode.py",
           "ps, policy.token_scores(ps, ctx, position, cache.slot_positions)",
           "ps, policy.token_scores(ps, ctx, position, jnp.where(cache.slot_positions == position[:, None], 0, "
           "cache.slot_positions))",
           eviction("adore-default", "adore-attention_weight0.0")),
    Mutant("a rebuild step's release under a hidden-state controller leaves the current token unscored",
           "adore_jax/decode.py", "token_scores = policy.token_scores(ps, ctx, position, cache.slot_positions)",
           "token_scores = policy.token_scores(ps, ctx, position, jnp.where(cache.slot_positions == "
           "position[:, None], 0, cache.slot_positions))", (f"{REBUILD}[rebuild-hidden]",)),
    Mutant("a rebuild step's controller reads a rebuilt row's hidden state, not the current token's",
           "adore_jax/decode.py", "layer_hidden[:, -1:]\n\n    if policy.adaptive_rebuild:",
           "layer_hidden[:, :1]\n\n    if policy.adaptive_rebuild:", (f"{HIDDEN_INPUT}[R=2]",)),
    Mutant("the controller's training table holds the hidden state one layer deeper", "train/controller_inputs.py",
           'params["layers"][:layer]', 'params["layers"][:layer + 1]', (HIDDEN_TRAINING,)),
    Mutant("training records index the hidden-state table one token off", "train/controller_inputs.py",
           "self.starts[index] + np.arange", "self.starts[index] + 1 + np.arange", (HIDDEN_TRAINING,)),
    Mutant("decoding may run one position past max_length", "adore_jax/decode.py",
           "if last >= limit:", "if last > limit:",
           ("tests/test_decode.py::test_decoding_past_max_length_is_refused_not_silently_dropped",)),
    Mutant("the prefill kernels' bound stops one slot block short", "pallas_kernels/_common.py",
           "jnp.arange(1, seen.shape[2] + 1, dtype=jnp.int32)", "jnp.arange(seen.shape[2], dtype=jnp.int32)",
           (PREFILL_KERNELS,)),
    Mutant("the prefill kernels visit every slot block", "pallas_kernels/_common.py",
           "jnp.where(seen, jnp.arange(1, seen.shape[2] + 1", "jnp.where(True, jnp.arange(1, seen.shape[2] + 1",
           (PREFILL_KERNELS,)),
    Mutant("the prefill kernels' mass keeps the logits of slot blocks never visited", "pallas_kernels/_common.py",
           "logits = jnp.where(visited[:, None, :, None, :], logits, MASK_VALUE)", "",
           (PREFILL_KERNELS,)),
    Mutant("a block of exactly PREFILL_MIN_QUERIES queries goes to the slot kernel", "pallas_kernels/slot_attention.py",
           "q.shape[1] >= PREFILL_MIN_QUERIES", "q.shape[1] > PREFILL_MIN_QUERIES",
           (PREFILL_KERNELS + "::test_dispatcher_takes_the_prefill_kernel_for_long_blocks",)),
    Mutant("the k-th largest by bisection keeps a candidate that fewer than k entries reach",
           "pallas_kernels/_common.py", "axis=-1, dtype=jnp.int32) >= k", "axis=-1, dtype=jnp.int32) >= k - 1",
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


def mutated_text(root: str, mutant: Mutant) -> str:
    with open(os.path.join(root, mutant.path)) as f:
        text = f.read()
    if text.count(mutant.old) != 1:
        raise SystemExit(f"mutation_check: mutant {mutant.name!r}: the text to replace occurs "
                         f"{text.count(mutant.old)} times in {mutant.path} (expected once): update the mutant")
    return text.replace(mutant.old, mutant.new)


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
            print(f"{mutant.name}\n    {mutant.path}: {mutant.old!r} -> {mutant.new!r}\n    tests: {' '.join(mutant.tests)}")
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
