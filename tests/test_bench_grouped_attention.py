"""scripts/bench_grouped_attention.py: both variants agree and the table names the group size per batch."""
import json

import pytest

from references import load_script


def test_the_benchmark_writes_a_row_per_batch_with_its_group(tmp_path):
    bench = load_script("bench_grouped_attention")
    out = tmp_path / "grouped.json"
    bench.main(["--batch", "2", "6", "--slots", "600", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["cpu"]
    # 460 KB of K per sequence: 4 fit in 2 MiB, so 6 sequences go in groups of 3
    assert [(row["batch"], row["group"]) for row in result["rows"]] == [(2, 2), (6, 3)]
    assert all(row["one_batch_ms"] > 0 and row["groups_ms"] > 0 for row in result["rows"])


def test_batch_1_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        load_script("bench_grouped_attention").main(["--batch", "1"])
    assert "--batch must be >= 2" in capsys.readouterr().err
