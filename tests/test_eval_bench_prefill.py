"""eval/bench_prefill.py times every row it is given on the same prompts, and names a row it does not know."""
import json

import pytest

from adore_jax.eval import bench_prefill


def test_every_row_is_timed_and_written(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    bench_prefill.main(["--model", tiny_model_dir, "--context", "40", "--cache-size", "8", "--repeats", "1",
                        "--policies", "window", "tova", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["policy"] for row in result["rows"]] == ["window", "tova"]
    assert all(row["seconds"] > 0 and row["first_call_seconds"] > 0 for row in result["rows"])
    assert (result["context"], result["cache_size"]) == (40, 8)
    assert result["machine"]["cpu"] and result["machine"]["versions"]["jax"]


def test_an_unknown_row_or_size_is_named(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_prefill.main(["--model", tiny_model_dir, "--policies", "windows", "--out", str(tmp_path / "b.json")])
    assert "--policies: unknown rows ['windows']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_prefill.main(["--model", tiny_model_dir, "--context", "0", "--out", str(tmp_path / "b.json")])
    assert "--context must be >= 1; got 0" in capsys.readouterr().err
