"""The BN-effect experiment on a tiny budget: it writes the table, the curves and the figures."""
from __future__ import annotations

import json

import bnfold.models.experiments as experiments


def test_bn_effect_writes_table_png_and_json(tmp_path):
    result = experiments.bn_effect(tmp_path, epochs=2, lrs=(0.05,), steps_per_epoch=2, progress=False)
    assert [(r.norm, r.lr) for r in result.runs] == [("bn", 0.05), ("none", 0.05)]
    assert all(len(r.accuracy) == 2 and 0 <= r.final <= 1 for r in result.runs)
    table = (tmp_path / "bn_effect.md").read_text()
    assert "| yes | 0.05 |" in table and "| no | 0.05 |" in table and "epochs to 95%" in table
    raw = json.loads((tmp_path / "bn_effect.json").read_text())
    assert raw["runs"][0]["accuracy"] == result.runs[0].accuracy
    assert (tmp_path / "bn_effect.png").read_bytes()[:4] == b"\x89PNG"


def test_bn_effect_cli_rejects_bad_epochs(tmp_path, capsys):
    assert experiments.main(["bn-effect", "--out", str(tmp_path), "--epochs", "0", "--no-progress"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_bn_effect_records_a_blow_up_instead_of_failing(tmp_path):
    # An earlier run's metrics in a kept --runs folder must not be read as this run's epochs.
    stale = tmp_path / "runs" / f"none-lr{1e38:g}" / "metrics.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"epoch": 1, "test_accuracy": 0.99}) + "\n")
    result = experiments.bn_effect(tmp_path, epochs=1, lrs=(1e38,), steps_per_epoch=5, progress=False,
                                   runs_dir=tmp_path / "runs")
    by_norm = {r.norm: r for r in result.runs}
    assert by_norm["none"].diverged and "loss became" in by_norm["none"].diverged
    assert by_norm["none"].accuracy == []
    assert "diverged" in (tmp_path / "bn_effect.md").read_text()
