"""onnxruntime session options are built in one place (bnfold.sessions)."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from bnfold.options import available_cpus
from bnfold.sessions import cpu_session, session_options

ROOT = Path(__file__).resolve().parents[2]
# Servers that stand for what people write without bnfold (the comparison's reference and peers):
# they build their own sessions on purpose.
STANDALONE = {"bench/reference_service.py", "bench/kserve_model.py", "bench/ray_plain.py"}


def test_the_options_say_what_was_asked() -> None:
    options = session_options(3, optimize=False, spin=False)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(0).intra_op_num_threads == available_cpus()   # --threads 0's meaning


def test_no_other_module_builds_session_options(tiny_onnx: Path) -> None:
    builders = [str(p.relative_to(ROOT)) for folder in ("bnfold", "models", "export", "serve", "bench")
                for p in (ROOT / folder).glob("*.py") if "SessionOptions()" in p.read_text(encoding="utf-8")]
    assert sorted(set(builders) - STANDALONE) == ["bnfold/sessions.py"]
    assert cpu_session(tiny_onnx, 1).get_providers() == ["CPUExecutionProvider"]
