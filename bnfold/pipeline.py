"""`bnfold pipeline`: the whole job in one call, train -> fold -> export (+ INT8) -> evaluate -> bench -> REPORT.md.

Each stage is one call into the package that owns it (`models.train`, `bnfold.fold` and
`bnfold.compare`, `export.export_model`, `export.evaluate.evaluate_artifacts`,
`bench.run.run_bench`), with plain values passed between them. The run folder ends up holding:

    OUT/train/    best.pt, last.pt, metrics.jsonl, curves.png   (models.train)
    OUT/export/   model.onnx, model.ts, model.pt2, model.int8.onnx, export.json   (export.export_model)
    OUT/bench/    report.json, report.md, latency.png, throughput.png
    OUT/REPORT.md accuracy, fold report, parity table, latency table and charts
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError
from bnfold.models.metrics import headline_metric
from bnfold.bench.backends import DEFAULT_BACKENDS
from bnfold.bench.run import BenchConfig, BenchResult, run_bench
from bnfold.bench.report import ReportFiles, render_markdown, summary_lines, write_report

if TYPE_CHECKING:  # the stages import their packages when they run
    from bnfold import FoldReport, Parity
    from bnfold.export import ExportSummary
    from bnfold.export.evaluate import EvaluationReport
    from bnfold.models import ModelSpec, TrainResult

from bnfold.fold_config import FOLD_RTOL  # the folded module's tolerance, as `bnfold fold`'s default


@dataclass
class PipelineResult:
    """What one pipeline run produced, with the time each stage took (seconds)."""

    out: Path
    checkpoint: Path
    spec: ModelSpec
    metrics: dict[str, float]
    fold_report: FoldReport
    fold_parity: Parity
    batchnorm_before: int
    batchnorm_after: int
    export_summary: ExportSummary
    bench: BenchResult
    bench_files: ReportFiles
    report: Path
    timings: dict[str, float] = field(default_factory=dict)
    evaluation: EvaluationReport | None = None   # every artifact's accuracy on the eval split

    @property
    def accuracy(self) -> float | None:
        return headline_metric(self.metrics)[1]


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BnfoldError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BnfoldError(f"--out {out} already holds files; pass --force to reuse it "
                          f"(its train/, export/ and bench/ are overwritten) or choose another folder")
    out.mkdir(parents=True, exist_ok=True)


def _train(model: str, dataset: str, data_root: str, epochs: int, out: Path, progress: bool) -> TrainResult:
    from bnfold import models

    config = models.TrainConfig(model=model, dataset=dataset, data_root=data_root, epochs=epochs,
                                out=str(out), progress=progress,
                                force=True)  # run_pipeline's own --force check already guarded `out`
    return models.train(config)


def _fold(checkpoint: Path, data_root: str) -> tuple[FoldReport, Parity, int, int]:
    """Fold the trained module and compare it with the original on real eval samples."""
    import bnfold
    from bnfold import models
    import torch

    model, spec = models.load_checkpoint(checkpoint)
    folded, report = bnfold.fold(model)
    samples = models.sample_inputs(spec, n=64, data_root=data_root)
    if samples is None:  # dataset files absent: random inputs still exercise every folded layer
        samples = torch.randn(64, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    parity = bnfold.compare(model, folded, samples)
    parity.check(FOLD_RTOL, "folded model against the trained model")
    return report, parity, bnfold.count_batchnorm(model), bnfold.count_batchnorm(folded)


def _export(checkpoint: Path, out: Path, data_root: str, progress: bool, int8: bool) -> ExportSummary:
    from bnfold import export
    from bnfold.export.config import DEFAULT_FORMATS

    formats = [*DEFAULT_FORMATS, "int8"] if int8 else list(DEFAULT_FORMATS)
    # The export folder belongs to this run: overwrite it when the run folder is reused.
    return export.export_model(export.ExportConfig(checkpoint, out, formats=formats, data_root=data_root,
                                                        force=True, progress=progress))


def _evaluate(checkpoint: Path, summary: ExportSummary, data_root: str) -> EvaluationReport:
    """The checkpoint and every exported file scored on the whole eval split."""
    from bnfold.export.evaluate import evaluate_artifacts

    return evaluate_artifacts([checkpoint, *(a.path for a in summary.artifacts)], data_root=data_root)


def bench_row_of(fmt: str) -> str | None:
    """Which bench row measures an artifact of export format `fmt` (the checkpoint: eager), read
    from the backend table (the first requestable backend that needs that format's file)."""
    from bnfold.bench.backends import BACKENDS

    if fmt == "checkpoint":
        return "eager"
    return next((name for name, b in BACKENDS.items() if b.needs == fmt and b.requestable and b.in_process), None)


def _fmt(value: float | int | None) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    return "–" if value is None else str(value)


def parity_table(export_summary: ExportSummary, fold_parity: Parity) -> str:
    """One row per checked artifact: the folded module and every exported file against PyTorch."""
    lines = ["| artifact | max abs error | max rel error | cosine | top-1 agreement | samples | tolerance |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def add(name: str, p: Parity, tolerance: float | None) -> None:
        # INT8 has no output tolerance: it is held to the accuracy gate (see the artifact table).
        limit = "accuracy gate" if tolerance is None else f"{tolerance:.0e}"
        lines.append(f"| {name} | {_fmt(p.max_abs_error)} | {_fmt(p.max_rel_error)} | {_fmt(p.cosine)} | "
                     f"{_fmt(p.top1_agreement)} | {p.samples} | {limit} |")

    add("folded module (bnfold.fold)", fold_parity, FOLD_RTOL)
    for artifact in export_summary.artifacts:
        add(artifact.path.name, artifact.parity, artifact.tolerance)
    return "\n".join(lines)


def artifact_table(result: PipelineResult) -> str:
    """One row per artifact: eval-split accuracy (or IoU), file size, CPU p50 at batch 1, speed-up vs eager."""
    if result.evaluation is None:
        return "_Not evaluated._"
    formats = {a.path.name: a.format for a in result.export_summary.artifacts}
    eager = result.bench.row("eager", "cpu", 1)
    eager_p50 = eager.p50_ms if eager is not None and eager.ok else None
    metric = result.evaluation.rows[0].metric if result.evaluation.rows else "accuracy"
    lines = [f"| artifact | weights | {metric} | size | p50 batch 1, CPU | speed-up vs eager |",
             "|---|---|---:|---:|---:|---:|"]
    from bnfold.export.evaluate import format_size

    for row in result.evaluation.rows:
        kind = "checkpoint" if row.kind == "checkpoint" else formats.get(row.artifact.name, row.kind)
        bench = result.bench.row(bench_row_of(kind) or "", "cpu", 1)
        p50 = bench.p50_ms if bench is not None and bench.ok else None
        speedup = f"{eager_p50 / p50:.2f}x" if p50 and eager_p50 else "–"
        name = "checkpoint (eager PyTorch)" if kind == "checkpoint" else row.artifact.name
        lines.append(f"| {name} | {row.dtype} | {row.value:.4f} | {format_size(row.size_bytes)} | "
                     f"{f'{p50:.3f} ms' if p50 else '–'} | {speedup} |")
    return "\n".join(lines)


def render_report(result: PipelineResult, *, command: str, train_dir: Path) -> str:
    """REPORT.md: what was trained and how well, what was folded, what was exported and verified, how fast."""
    spec = result.spec
    key, value = headline_metric(result.metrics)
    headline = f"{key} = {value:.4f}" if key else "no metric recorded"
    metric_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(result.metrics.items()))
    timing_rows = "\n".join(f"| {k} | {v:.1f} s |" for k, v in result.timings.items())
    curves = train_dir / "curves.png"
    bench_md = render_markdown(result.bench, [f"bench/{c.name}" for c in result.bench_files.charts],
                               heading="##")
    parts = [
        f"# bnfold pipeline: {spec.arch} on {spec.dataset}",
        f"`{command}` — {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
        f"**Trained {spec.arch} for {spec.epoch} epochs: {headline}.** BatchNorm modules: "
        f"{result.batchnorm_before} before folding, {result.batchnorm_after} after. "
        f"Every exported file was checked against PyTorch before it was written.",
        "## Stages", "| stage | time |\n|---|---:|\n" + timing_rows,
        "## Training", f"Checkpoint: `{result.checkpoint}`, input {list(spec.input_shape)}.",
        "| metric | value |\n|---|---:|\n" + metric_rows if metric_rows else "_No metrics recorded._",
    ]
    if curves.exists():
        parts.append(f"![training curves]({os.path.relpath(curves, result.out)})")
    parts += [
        "## Fold report", "```\n" + str(result.fold_report).rstrip() + "\n```",
        "## Artifacts: accuracy, size, latency", artifact_table(result),
        f"{result.evaluation.rows[0].metric.capitalize() if result.evaluation and result.evaluation.rows else 'Accuracy'} "
        f"on the whole eval split ({result.evaluation.rows[0].samples if result.evaluation and result.evaluation.rows else 0} "
        "samples, `bnfold evaluate`); p50 from the benchmark below (eager, ort, torchscript, program, ort-int8 rows).",
        "## Parity against the trained PyTorch model", parity_table(result.export_summary, result.fold_parity),
        f"The folded module was compared on {result.fold_parity.samples} eval-split inputs (random "
        f"inputs when the dataset files are absent); the exported files on "
        f"{result.export_summary.parity_inputs}. Max rel error = max|difference| / max|reference|.",
        bench_md,
    ]
    return "\n\n".join(parts) + "\n"


@dataclass
class PipelineConfig:
    """Everything `bnfold pipeline` takes; the defaults run LeNet-BN on the bundled digits."""

    model: str = "lenet"
    dataset: str = "digits"
    data_root: str = "data"
    epochs: int = 5
    out: str | os.PathLike = "runs/demo"
    force: bool = False                  # reuse a folder that already holds files
    bench_seconds: float = 1.0           # measured time per backend and batch size
    devices: Sequence[str] = ("cpu", "cuda")
    backends: Sequence[str] = DEFAULT_BACKENDS
    batch_sizes: Sequence[int] = (1, 8, 32)
    # One thread count for every benchmarked backend, as every command's --threads: 0 = the CPUs this
    # process may use. Batch-1 latency of small models is best single-threaded, and on a shared
    # machine a second torch thread spinning for a busy core multiplies eager latency: pass 1 there.
    threads: int = 0
    progress: bool = True
    int8: bool = True                    # also write model.int8.onnx (calibrated, accuracy-gated) and bench it

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise BnfoldError(f"epochs must be at least 1, got {self.epochs}")
        if self.threads is None or self.threads < 0:
            raise BnfoldError(f"--threads must be 0 (the CPUs this process may use) or more, got {self.threads}")

    def command(self) -> str:
        """The `bnfold pipeline` command line that runs this configuration (quoted in REPORT.md)."""
        return (f"bnfold pipeline --model {self.model} --dataset {self.dataset} --epochs {self.epochs} "
                f"--bench-seconds {self.bench_seconds} --devices {','.join(self.devices)} "
                f"--threads {self.threads} --out {self.out}"
                + ("" if self.int8 else " --no-int8"))


def run_pipeline(config: PipelineConfig, *, log: Callable[[str], None] = print) -> PipelineResult:
    """Train, fold, export, verify and benchmark one model, then write OUT/REPORT.md.

    `log` receives the human-readable progress (stage headers, the fold report, the summary);
    pass `lambda _: None` for silence. A parity failure stops the run with `bnfold.ParityError`.
    On Ctrl-C, `log` gets what was finished and how to go on from it, and KeyboardInterrupt goes up.
    """
    started: list[str] = []   # the stages begun, in order
    try:
        return _run_pipeline(config, log, started)
    except KeyboardInterrupt:
        log(interrupted_message(config, started))
        raise


def interrupted_message(config: PipelineConfig, started: list[str]) -> str:
    """What a Ctrl-C during `started[-1]` leaves behind, and the commands that carry on from it."""
    out = Path(config.out)
    if not started:
        return "pipeline interrupted before its first stage: nothing was written"
    finished = started[:-1]
    head = (f"pipeline interrupted in stage {started[-1]}"
            + (f" (finished: {', '.join(finished)})" if finished else ""))
    if not finished:   # training says itself what its last.pt holds and how to resume it
        return f"{head}; `bnfold pipeline` has no resume: run it again with --force to start afresh"
    checkpoint = out / "train" / "best.pt"
    return (f"{head}: the trained model is {checkpoint}; `bnfold pipeline` has no resume, so go on from it with "
            f"`bnfold export {checkpoint} --out {out / 'export'} --force` and `bnfold bench {checkpoint} "
            f"--out {out / 'bench'}`, or run the pipeline again with --force")


def _run_pipeline(config: PipelineConfig, log: Callable[[str], None], started: list[str]) -> PipelineResult:
    model, dataset, data_root, epochs = config.model, config.dataset, config.data_root, config.epochs
    progress = config.progress
    out_dir = Path(config.out)
    _prepare_out(out_dir, config.force)
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[], None]:
        started.append(name)
        log(f"== {name}")
        start = time.perf_counter()
        return lambda: timings.__setitem__(name, time.perf_counter() - start)

    done = stage("train")
    trained = _train(model, dataset, data_root, epochs, out_dir / "train", progress)
    done()
    checkpoint = Path(trained.best)
    spec = trained.spec
    metrics = dict(getattr(spec, "metrics", {}) or {})
    key, value = headline_metric(metrics)
    headline = f"{key} = {value:.4f}" if key else "no metric"
    log(f"trained {model} on {dataset} for {epochs} epochs: {headline} -> {checkpoint}")

    done = stage("fold")
    fold_report, fold_parity, bn_before, bn_after = _fold(checkpoint, data_root)
    done()
    log(str(fold_report))
    log(f"parity, folded against trained: {fold_parity}")

    done = stage("export + int8" if config.int8 else "export")
    summary = _export(checkpoint, out_dir / "export", data_root, progress, config.int8)
    done()
    for artifact in summary.artifacts:
        p = artifact.parity
        log(f"exported {artifact.path.name}: max rel error {p.max_rel_error:.2e}, top-1 agreement "
            f"{_fmt(p.top1_agreement)} over {p.samples} samples")
        if artifact.format == "int8":
            log(f"  {artifact.notes[0]}")

    done = stage("evaluate")
    evaluation = _evaluate(checkpoint, summary, data_root)
    done()
    log(str(evaluation))

    backends = list(config.backends)
    if config.int8 and "ort-int8" not in backends:
        backends.append("ort-int8")
    done = stage("bench")
    bench = run_bench(BenchConfig(checkpoint, devices=config.devices, backends=backends,
                                  batch_sizes=config.batch_sizes, threads=config.threads,
                                  seconds=config.bench_seconds, progress=progress, export_dir=out_dir / "export"))
    files = write_report(bench, out_dir / "bench")
    done()

    result = PipelineResult(out_dir, checkpoint, spec, metrics, fold_report, fold_parity, bn_before,
                            bn_after, summary, bench, files, out_dir / "REPORT.md", timings, evaluation)
    result.report.write_text(render_report(result, command=config.command(), train_dir=out_dir / "train"))
    log("== summary")
    log(f"{spec.arch} on {spec.dataset}: {headline}; BatchNorm {bn_before} -> {bn_after}; "
        f"fold max rel error {fold_parity.max_rel_error:.2e}")
    for line in summary_lines(bench):
        log(line)
    log("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    log(f"report: {result.report}")
    return result


__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline", "render_report", "parity_table", "artifact_table",
           "headline_metric"]
