"""scripts/profile_step.py: the union of busy intervals, and a real trace of the tiny model's decode and prefill."""
import json

import pytest

from references import load_script


def test_busy_time_is_the_union_of_intervals():
    profile = load_script("profile_step")
    assert profile.busy_time([(0, 10), (5, 10), (30, 5), (31, 1)]) == 20  # [0, 15) and [30, 35)
    assert profile.busy_time([]) == 0


def test_the_profile_names_ops_and_threads(tiny_model_dir, tmp_path):
    profile = load_script("profile_step")
    out = tmp_path / "profile.json"
    profile.main(["--model", tiny_model_dir, "--context", "40", "--steps", "2", "--prefill-len", "16",
                  "--policy", "tova", "--cache-size", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["cpu"]
    for part in ("decode", "prefill"):
        summary = result[part]
        assert summary["wall_ms"] > 0 and summary["ops"] and summary["kinds"]
        assert all(0 <= share <= 1 for share in summary["threads"])
        assert sum(row["ms"] for row in summary["kinds"]) == pytest.approx(sum(row["ms"] for row in summary["ops"]))


def test_a_bad_size_is_named(tiny_model_dir, tmp_path, capsys):
    profile = load_script("profile_step")
    with pytest.raises(SystemExit):
        profile.main(["--model", tiny_model_dir, "--steps", "0", "--out", str(tmp_path / "p.json")])
    assert "--steps must be >= 1; got 0" in capsys.readouterr().err
