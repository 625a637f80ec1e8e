"""The two-backbone table: each policy against its own backbone's full attention and the base's."""
import json

import pytest

from eval import compare_backbones


def _results(model, full, tova, length=4096):
    rows = [dict(dataset="wikipedia", policy="full", cache_size=None, perplexity=full),
            dict(dataset="wikipedia", policy="tova", cache_size=256, perplexity=tova)]
    datasets = [dict(name="wikipedia", count=20, length=length, prompt_length=length - 128)]
    return {"meta": {"model": model, "config": {"perplexity": {"datasets": datasets, "splits": ["test"]}}},
            "perplexity": {"rows": rows}}


def test_each_policy_is_compared_with_both_full_attentions(tmp_path, capsys):
    base, tuned = _results("base", 20.0, 25.0), _results("tuned", 20.4, 22.0)
    rows = compare_backbones.compare(base, tuned)
    tova = next(r for r in rows if r["policy"] == "tova")
    assert tova["base_vs_base_full"] == pytest.approx(0.25)
    assert tova["tuned_vs_tuned_full"] == pytest.approx(22.0 / 20.4 - 1)
    assert tova["tuned_vs_base_full"] == pytest.approx(0.10)
    full = next(r for r in rows if r["policy"] == "full")
    assert full["tuned_vs_base_full"] == pytest.approx(0.02)  # the fine-tune's damage to full attention
    base_h2o = _results("base", 20.0, 25.0)
    base_h2o["perplexity"]["rows"][1].update(policy="h2o", perplexity=30.0)  # a second base run, pooled
    paths = [tmp_path / "base.json", tmp_path / "base_h2o.json", tmp_path / "tuned.json"]
    for path, results in zip(paths, (base, base_h2o, tuned)):
        path.write_text(json.dumps(results))
    compare_backbones.main(["--base", str(paths[0]), str(paths[1]), "--tuned", str(paths[2]),
                            "--out", str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    assert "| tova | 256 | 25.000 (+25.0%) | 22.000 (+7.8%) | +10.0% |" in table
    assert "h2o" not in table  # measured on one backbone only


def test_runs_on_different_documents_are_refused():
    with pytest.raises(ValueError, match="dataset 'wikipedia' was scored differently"):
        compare_backbones.compare(_results("base", 20.0, 25.0), _results("tuned", 20.4, 22.0, length=2048))
