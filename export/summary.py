"""Results of an export: one `ArtifactReport` per file, an `ExportSummary` per checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bnfold


@dataclass
class ArtifactReport:
    """One written, verified file and the figures that prove it matches its source model."""

    format: str                    # "onnx", "torchscript" or "program"
    path: Path
    exporter: str                  # e.g. "torch.onnx.export(dynamo=True)"
    dtype: str                     # weights: "float32" or "float16" (inputs/outputs stay float32)
    dynamic_batch: bool
    folded: bool
    parity: "bnfold.Parity"
    tolerance: float | None        # the largest max relative error accepted (None: INT8, held
                                   # to an accuracy gate on the eval split instead)
    parity_inputs: str             # where the parity inputs came from
    size_bytes: int
    seconds: float                 # export + verification wall time
    input_name: str = "input"
    output_name: str = "logits"
    opset: int | None = None
    fold_report: "bnfold.FoldReport | None" = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)   # format-specific records, e.g. "int8"

    def to_dict(self) -> dict[str, Any]:
        parity = self.parity.to_dict()
        return {
            "format": self.format,
            "path": str(self.path),
            "exporter": self.exporter,
            "dtype": self.dtype,
            "dynamic_batch": self.dynamic_batch,
            "folded": self.folded,
            "opset": self.opset,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "parity": parity,
            "max_abs_error": parity.get("max_abs_error"),
            "max_rel_error": parity.get("max_rel_error"),
            "top1_agreement": parity.get("top1_agreement"),
            "samples": parity.get("samples"),
            "tolerance": {"max_rel_error": self.tolerance},
            "parity_inputs": self.parity_inputs,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            "fold_report": self.fold_report.to_dict() if self.fold_report is not None else None,
            "notes": list(self.notes),
            **self.details,
        }

    def __str__(self) -> str:
        return format_parity_table([self])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_parity_table(artifacts: list[ArtifactReport]) -> str:
    """A plain-text table: one row per artifact with its parity figures against the source."""
    header = ("file", "dtype", "batch", "max abs err", "max rel err", "tolerance", "top-1 agree",
              "samples", "size", "seconds")
    rows = [header]
    for a in artifacts:
        p = a.parity
        rows.append((
            a.path.name, a.dtype, "dynamic" if a.dynamic_batch else "static",
            f"{p.max_abs_error:.3e}", f"{p.max_rel_error:.3e}",
            "gate" if a.tolerance is None else f"{a.tolerance:.0e}",
            "n/a" if p.top1_agreement is None else f"{p.top1_agreement:.4f}", str(p.samples), _size(a.size_bytes), f"{a.seconds:.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class ExportSummary:
    """Everything `export_model` wrote, as also saved to `export.json`."""

    out_dir: Path
    checkpoint: Path
    artifacts: list[ArtifactReport]
    fold_report: "bnfold.FoldReport | None"
    parity_inputs: str
    export_json: Path
    triton_model_dir: Path | None = None
    source: str = ""               # what the exported file was (models.loader's description)

    def artifact(self, fmt: str) -> ArtifactReport:
        for a in self.artifacts:
            if a.format == fmt:
                return a
        raise KeyError(fmt)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "checkpoint": str(self.checkpoint),
            "parity_inputs": self.parity_inputs,
            "fold_report": self.fold_report.to_dict() if self.fold_report is not None else None,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "triton_model_dir": str(self.triton_model_dir) if self.triton_model_dir else None,
        }

    def __str__(self) -> str:
        lines = [f"model: {self.checkpoint}: {self.source}", ""] if self.source else []
        if self.fold_report is not None:
            lines += [str(self.fold_report), ""]
        lines += [f"parity against the eval-mode source model ({self.parity_inputs}):",
                  format_parity_table(self.artifacts), ""]
        lines += [f"note ({a.path.name}): {note}" for a in self.artifacts for note in a.notes]
        written = ", ".join(a.path.name for a in self.artifacts)
        lines.append(f"wrote {self.out_dir} ({written}, export.json)")
        if self.triton_model_dir is not None:
            lines.append(f"wrote Triton model {self.triton_model_dir}")
        return "\n".join(lines)
