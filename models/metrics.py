"""Which metric a reader looks for first, chosen in one place for the CLI, the curves and REPORT.md."""
from __future__ import annotations

from typing import Any

# Held-out figures beat training ones: training accuracy (on augmented data) flatters the model.
_HELD_OUT = ("test", "val", "eval")


def task_metric(task: str) -> str:
    """`iou` for segmentation, `accuracy` for classification: the stem of the training log's keys
    (`train_accuracy`, `test_iou`, ...) and of `bnfold evaluate`'s figure."""
    return "iou" if task == "segmentation" else "accuracy"


def headline_metric(metrics: dict[str, Any]) -> tuple[str | None, float | None]:
    """The headline metric of a record: held-out accuracy for classifiers, IoU (then Dice) for masks.

    `metrics` is one epoch's record (`test_accuracy`, `train_iou`, ...) or a spec's metrics;
    returns `(key, value)`, or `(None, None)` when the record holds none of them.
    """
    for needle in ("acc", "iou", "dice"):
        candidates = [k for k, v in metrics.items() if needle in k.lower() and isinstance(v, (int, float))]
        candidates.sort(key=lambda k: not any(h in k.lower() for h in _HELD_OUT))
        if candidates:
            return candidates[0], float(metrics[candidates[0]])
    return None, None


__all__ = ["headline_metric", "task_metric"]
