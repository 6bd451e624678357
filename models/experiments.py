"""Reproducible experiments. `python -m bnfold.models.experiments bn-effect --out docs/`

bn-effect: what BatchNorm buys. LeNet-5 with the classic sigmoid activation on the bundled
digits, with and without BN, at a low and a high learning rate (plain SGD with momentum, a
constant rate, so only BN and the rate differ). Writes `bn_effect.md` (epochs to reach 95 %
test accuracy, final and best accuracy), `bn_effect.png` (test-accuracy curves) and
`bn_effect.json` (every epoch of every run) into the output folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.models.training import TrainConfig, TrainingError, train

TARGET = 0.95


@dataclass
class BnEffectRun:
    norm: str
    lr: float
    accuracy: list[float]              # test accuracy after each epoch
    seconds: float
    epochs_to_target: int | None = None  # first epoch at or above TARGET; None if never
    diverged: str | None = None          # the NaN-loss message when training blew up

    @property
    def final(self) -> float:
        return self.accuracy[-1] if self.accuracy else 0.0

    @property
    def best(self) -> float:
        return max(self.accuracy, default=0.0)


@dataclass
class BnEffectResult:
    epochs: int
    optimizer: str
    runs: list[BnEffectRun] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        lines = [
            f"LeNet-5 (sigmoid) on the bundled digits (1,437 train / 360 test), {self.epochs} epochs, "
            f"{self.optimizer}, constant learning rate, seed {self.settings.get('seed', 0)}.",
            "",
            "| BatchNorm | learning rate | epochs to 95% test accuracy | final test accuracy | best test accuracy |",
            "|---|---|---|---|---|",
        ]
        for run in self.runs:
            reach = str(run.epochs_to_target) if run.epochs_to_target else f"not within {self.epochs}"
            final = f"{run.final:.1%}"
            if run.diverged:
                final = f"diverged ({run.diverged.split(';')[0]})"
            lines.append(f"| {'yes' if run.norm == 'bn' else 'no'} | {run.lr:g} | {reach} | "
                         f"{final} | {run.best:.1%} |")
        lines += ["", f"Reproduce: `{self.settings.get('command', 'python -m bnfold.models.experiments bn-effect')}`"]
        return "\n".join(lines) + "\n"


def bn_effect(out_dir: str | Path, *, epochs: int = 10, lrs: Sequence[float] = (0.01, 0.5), seed: int = 0,
              optimizer: str = "sgd", batch_size: int = 64, runs_dir: str | Path | None = None,
              progress: bool = True, command: str | None = None,
              steps_per_epoch: int | None = None) -> BnEffectResult:
    """Train the four runs and write the table, the curves and the raw figures into `out_dir`."""
    if epochs <= 0:
        raise BnfoldError(f"epochs must be positive, got {epochs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = BnEffectResult(epochs=epochs, optimizer=f"{optimizer} (momentum 0.9)" if optimizer == "sgd" else optimizer,
                            settings={"seed": seed, "batch_size": batch_size, "lrs": list(lrs),
                                      "command": command or f"python -m bnfold.models.experiments bn-effect --out {out}"})
    with tempfile.TemporaryDirectory(prefix="bn-effect-") as tmp:
        base = Path(runs_dir) if runs_dir else Path(tmp)
        for norm in ("bn", "none"):
            for lr in lrs:
                started = time.perf_counter()
                run_dir = base / f"{norm}-lr{lr:g}"
                metrics = run_dir / "metrics.jsonl"
                # A kept --runs folder: a blow-up in epoch 1 must not read an earlier run's epochs.
                metrics.unlink(missing_ok=True)
                diverged = None
                try:
                    history = train(TrainConfig(
                        model="lenet", dataset="digits", epochs=epochs, lr=lr, optimizer=optimizer, schedule="none",
                        norm=norm, activation="sigmoid", seed=seed, batch_size=batch_size, device="cpu",
                        progress=progress, threads=1, steps_per_epoch=steps_per_epoch, out=str(run_dir),
                        force=True)).history  # a kept --runs folder is rerun on purpose
                except TrainingError as exc:  # a blow-up is a result here, not a failure
                    diverged = str(exc)
                    history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
                accuracy = [r["test_accuracy"] for r in history]
                reach = next((r["epoch"] for r in history if r["test_accuracy"] >= TARGET), None)
                result.runs.append(BnEffectRun(norm, lr, accuracy, round(time.perf_counter() - started, 1), reach,
                                               diverged))
    (out / "bn_effect.md").write_text(result.to_markdown())
    (out / "bn_effect.json").write_text(json.dumps(
        {**asdict(result), "runs": [asdict(r) for r in result.runs]}, indent=2) + "\n")
    plot_bn_effect(result, out / "bn_effect.png")
    return result


def plot_bn_effect(result: BnEffectResult, path: Path) -> None:
    from bnfold.models.plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in result.runs:
        style = "-" if run.norm == "bn" else "--"
        label = f"{'with' if run.norm == 'bn' else 'without'} BN, lr {run.lr:g}"
        ax.plot(range(1, len(run.accuracy) + 1), run.accuracy, style, marker="o", markersize=3, label=label)
    ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.0),
           title="LeNet-5 (sigmoid) on digits: what BatchNorm buys")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")  # the no-BN curves lie along the bottom
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    from bnfold.options import SHARED

    parser = argparse.ArgumentParser(prog="python -m bnfold.models.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    p = sub.add_parser("bn-effect", help="LeNet-sigmoid with and without BN at a low and a high learning rate")
    p.add_argument("--out", default="docs", help="folder for bn_effect.md, bn_effect.png, bn_effect.json")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each of the four runs")
    p.add_argument("--lrs", type=lambda s: [float(v) for v in s.split(",")], default=[0.01, 0.5],
                   help="comma-separated learning rates, low first")
    p.add_argument("--seed", type=int, default=0, help="the same seed for all four runs")
    p.add_argument("--runs", default=None, help="keep the four training runs here (default: a temporary folder)")
    p.add_argument("--no-progress", **SHARED["--no-progress"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m bnfold.models.experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        result = bn_effect(args.out, epochs=args.epochs, lrs=args.lrs, seed=args.seed, runs_dir=args.runs,
                           progress=args.progress, command=command)
    except BnfoldError as exc:
        print(f"bn-effect: error: {exc}", file=sys.stderr)
        return 2
    print(result.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
