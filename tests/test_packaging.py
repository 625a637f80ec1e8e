"""The installed names: train/ and eval/ import as adore_jax.train / adore_jax.eval, never as top-level
modules that a user's own train.py or eval.py could shadow."""
import subprocess
import sys


def test_a_users_train_and_eval_files_do_not_shadow_the_cli(tmp_path):
    for name in ("train.py", "eval.py"):
        (tmp_path / name).write_text("raise SystemExit(1)\n")
    for command in ([sys.executable, "-m", "adore_jax.cli", "--help"],
                    [sys.executable, "-c", "import adore_jax.cli, adore_jax.train, adore_jax.eval"]):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    listed = subprocess.run([sys.executable, "-m", "adore_jax.cli", "--help"], cwd=tmp_path, capture_output=True,
                            text=True).stdout
    assert "finetune" in listed and "eval" in listed


def test_importing_the_cli_does_not_import_training_or_evaluation():
    code = ("import sys, adore_jax.cli; "
            "assert not any(m.startswith(('adore_jax.train', 'adore_jax.eval')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('adore_jax'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
