"""bench.scheduling: serve configurations side by side, outputs checked before anything is timed."""
from __future__ import annotations

import json
from pathlib import Path

from bnfold.bench.scheduling import main


def test_two_configurations_are_checked_then_driven_in_turn(tiny_onnx: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "figures.json"
    assert main([str(tiny_onnx), "--config", "one=--threads 1", "--config", "two=--threads 1 --instances 2",
                 "--concurrency", "2", "--requests", "40", "--rounds", "2", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "one: outputs bit-identical to in-process onnxruntime" in printed
    assert "two: outputs bit-identical to in-process onnxruntime" in printed
    assert printed.count("round ") == 4                                   # A B A B
    figures = json.loads(out.read_text())
    assert set(figures["summary"]) == {"one", "two"}
    assert all(s["errors"] == 0 and s["rps"] > 0 for s in figures["summary"].values())
    assert len(figures["load_before"]) == 3
