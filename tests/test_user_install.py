"""`make demo` installs what the main job runs, not the test extra; `make setup` / `make test` add it."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(target, tmp_path):
    done = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if "pip install" in line]


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode != 0, reason="no make")
def test_demo_installs_no_test_extra_and_test_does(tmp_path):
    demo = _dry_run("demo", tmp_path)
    assert demo and not any("test]" in line for line in demo), demo
    assert any('".[eval]"' in line for line in demo) and any("requirements-assets.txt" in line for line in demo)
    test = _dry_run("test", tmp_path)
    assert any("test]" in line for line in test), test
    assert any("requirements-assets.txt" in line for line in test)


def test_the_eval_extra_holds_what_the_demo_scores_with():
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    extras = config["options.extras_require"]
    eval_extra = extras["eval"]
    assert "rouge-score" in eval_extra and "sacrebleu" in eval_extra
    assert "torch" not in eval_extra and "torch" in extras["test"]
    assert "torch" not in config["options"]["install_requires"]
