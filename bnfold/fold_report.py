"""What a fold did and what it did not do, and why."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FoldReport"]


@dataclass
class FoldReport:
    """The outcome of `bnfold.fold` or `bnfold.fold_onnx`.

    `folded` lists `(layer_name, bn_name)` pairs that were folded, `skipped` lists
    `(bn_name, reason)` for every BatchNorm left in place, and `notes` says how the model was
    analysed (e.g. which parts FX could not trace and were walked instead).
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no BatchNorm was left in place."""
        return not self.skipped

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [{"layer": layer, "batchnorm": bn} for layer, bn in self.folded],
            "skipped": [{"batchnorm": bn, "reason": reason} for bn, reason in self.skipped],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        head = f"BatchNorm fold: {len(self.folded)} folded, {len(self.skipped)} skipped"
        rows = [("folded", bn, f"into {layer}") for layer, bn in self.folded]
        rows += [("skipped", bn, reason) for bn, reason in self.skipped]
        lines = [head]
        if rows:
            width = max(len(bn) for _, bn, _ in rows + [("", "batchnorm", "")])
            lines.append(f"  {'status':<8} {'batchnorm':<{width}}  layer / reason")
            lines += [f"  {status:<8} {bn:<{width}}  {detail}" for status, bn, detail in rows]
        else:
            lines.append("  (no BatchNorm found)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
