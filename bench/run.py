"""Batch-1 latency of one checkpoint across backends and devices, measured the way BENCHMARKS.md asks.

`run_bench(BenchConfig)` returns data (a `BenchResult` of `BenchRow`s) and writes nothing but
the exported files it needs in a temporary folder; `bench.report.write_report` turns the result
into report.json, report.md and charts. The backends are the table in `bench.backends`, the
timing loop is `bench.timing`, the machine description `bench.environment`.

How a figure is taken:
- every in-process backend (eager, folded, TorchScript, torch.export, torch.compile,
  onnxruntime on CPU and CUDA) is built, warmed up, then measured *interleaved* with all the
  others at the same batch size: rounds of short bursts A B C ... A B C ..., each call timed
  alone, until every backend has `seconds` of measured calls. Drift on a shared machine then
  hits every backend alike, so ratios from one run hold even when absolute figures wander;
- one thread count `n` for everything: `torch.set_num_threads(n)`, onnxruntime
  `intra_op_num_threads=n`, and `bnfold serve --threads n` for the HTTP rows;
- GPU calls end with `torch.cuda.synchronize()` (torch) or inside onnxruntime's own
  synchronizing `run` (onnxruntime), so a figure is the whole call and not a kernel launch;
- the HTTP rows start `bnfold serve` on loopback and drive it with `bench.loadtest`: one
  connection for latency, eight for throughput. They run after the in-process rounds, not
  interleaved, because the server is another process competing for the same cores.

A backend or device that cannot run here becomes a row with status "skipped" (not available,
e.g. no CUDA device) or "failed" (it broke) and the reason, never a missing row.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import BnfoldError, first_line
from bnfold.bench.backends import (BACKENDS, DEFAULT_BACKENDS, DEVICES, BackendContext, Unavailable,
                                   check_cuda_torch, expand, requestable)
from bnfold.bench.environment import collect_environment
from bnfold.export.writers import format_of_kind
from bnfold.options import resolve_threads
from bnfold.progress import progress as progress_bar
from bnfold.bench.timing import FAILED, SKIPPED, BenchRow, TimedCall, measure_interleaved, warm_up

if TYPE_CHECKING:
    from bnfold.models.loader import LoadedModel


# A ratio from a handful of calls is noise; every row gets at least this many.
MIN_ITERATIONS = 30
# A row whose p90 is this many times its p50 was disturbed (other processes, frequency changes).
NOISY_P90_OVER_P50 = 3.0


class BenchError(BnfoldError):
    """The benchmark was asked for something it cannot do (unknown backend or device, bad budget)."""


@dataclass
class BenchConfig:
    """Everything `bnfold bench` takes; `run_bench` measures, `bench.report.write_report` writes to `out`."""

    source: str | os.PathLike                 # any model models.load_model reads (ONNX: ort and HTTP rows only)
    devices: Sequence[str] = ("cpu", "cuda")
    backends: Sequence[str] = DEFAULT_BACKENDS
    batch_sizes: Sequence[int] = (1, 8, 32)   # 1 is the latency headline; HTTP rows run at 1 only
    # Every backend's threads, as every command's --threads: 0 = the CPUs this process may use. On a
    # busy machine every core gave p90 = 100x p50: pass 1 for a small model there.
    threads: int = 0
    min_iterations: int = MIN_ITERATIONS      # calls per row at least, however long they take
    seconds: float = 2.0                      # measured time per backend and batch size (warm-up on top)
    progress: bool = True
    export_dir: str | os.PathLike | None = None  # reuse model.onnx / model.ts / model.pt2 found here
    seed: int = 0                             # of the random benchmark inputs
    # A model from elsewhere (models.loader): how to build and read it.
    model_class: str | None = None
    model_args: str | dict | list | None = None
    weights: str | os.PathLike | None = None
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None   # batch first; where the file does not say it
    out: str | os.PathLike | None = None      # the report folder of `bnfold bench` (bench.report writes it)

    def __post_init__(self) -> None:
        _validate(self)   # the one place bench's values are checked


@dataclass
class Speedup:
    """`factor` = p50 of `baseline` / p50 of `candidate`: above 1 means the candidate is faster."""

    label: str
    baseline: str
    candidate: str
    batch_size: int
    factor: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchResult:
    rows: list[BenchRow]
    environment: dict[str, Any]
    speedups: list[Speedup] = field(default_factory=list)

    def row(self, backend: str, device: str = "cpu", batch_size: int = 1) -> BenchRow | None:
        for row in self.rows:
            if (row.backend, row.device, row.batch_size) == (backend, device, batch_size):
                return row
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "results": [row.to_dict() for row in self.rows],
            "speedups": [s.to_dict() for s in self.speedups],
        }


# ---------------------------------------------------------------------------------------------
# Ratios


def compute_speedups(rows: Sequence[BenchRow], batch_size: int = 1) -> list[Speedup]:
    """The comparisons the report leads with, from p50s of rows measured in the same run.

    Which pairs are compared comes from the backend table (`versus_eager`, `speedups`).
    """
    by_key = {(r.backend, r.device): r for r in rows if r.batch_size == batch_size and r.ok and r.p50_ms}
    out: list[Speedup] = []

    def add(label: str, base: tuple[str, str], cand: tuple[str, str]) -> None:
        if base in by_key and cand in by_key:
            factor = by_key[base].p50_ms / by_key[cand].p50_ms  # type: ignore[operator]
            out.append(Speedup(label, f"{base[0]}@{base[1]}", f"{cand[0]}@{cand[1]}", batch_size, factor))

    for device in DEVICES:
        for name, backend in BACKENDS.items():
            if backend.versus_eager:
                add(f"{backend.versus_eager} ({device})", ("eager", device), (name, device))
        for backend in BACKENDS.values():
            for label, base, cand in backend.speedups:
                add(f"{label} ({device})", (base, device), (cand, device))
    for name in requestable():
        add(f"GPU vs CPU, {name}", (name, "cpu"), (name, "cuda"))
    in_process = {name for name, b in BACKENDS.items() if b.in_process}
    cpu = [r for (b, d), r in by_key.items() if d == "cpu" and b in in_process]
    gpu = [r for (b, d), r in by_key.items() if d == "cuda" and b in in_process]
    if cpu and gpu:
        best_cpu = min(cpu, key=lambda r: r.p50_ms)  # type: ignore[arg-type, return-value]
        best_gpu = min(gpu, key=lambda r: r.p50_ms)  # type: ignore[arg-type, return-value]
        add("GPU vs CPU, fastest of each", (best_cpu.backend, "cpu"), (best_gpu.backend, "cuda"))
    return out


# ---------------------------------------------------------------------------------------------
# Exported files


def _prepare_artifacts(model: Any, spec: Any, kinds: set[str], work_dir: Path, export_dir: Path | None,
                       checkpoint: str | os.PathLike) -> tuple[dict[str, Path], dict[str, str]]:
    """Reuse exported files from `export_dir` when present, else export (folded, verified) into `work_dir`."""
    from bnfold.export import WRITERS, ExportConfig

    found: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for kind in sorted(kinds):
        writer = WRITERS[kind]
        if export_dir is not None and (export_dir / writer.file_name).is_file():
            found[kind] = export_dir / writer.file_name
            continue
        path = work_dir / writer.file_name
        try:
            writer.write(copy.deepcopy(model), spec, path, ExportConfig(checkpoint, work_dir), None)
            found[kind] = path
        except Exception as exc:  # noqa: BLE001 - the rows that need the file report why it is missing
            reason = first_line(exc, with_type=True, limit=400)
            # The exporter's hint names an export option; bench takes the exported folder instead.
            reason = reason.replace("try --static-batch", f"export it with `bnfold export {checkpoint} "
                                    f"--format {kind} --static-batch --out DIR` and bench with --export-dir DIR")
            errors[kind] = f"exporting {writer.file_name} failed: {reason}"
    return found, errors


# ---------------------------------------------------------------------------------------------
# The benchmark


def _validate(config: BenchConfig) -> None:
    for device in config.devices:
        if device not in DEVICES:
            raise BenchError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    names = requestable()
    for backend in config.backends:
        if backend not in names:
            raise BenchError(f"unknown backend {backend!r}; choose from {', '.join(names)}")
    if not config.devices or not config.backends or not config.batch_sizes:
        raise BenchError("devices, backends and batch sizes must each name at least one value")
    if any(int(b) < 1 for b in config.batch_sizes):
        raise BenchError(f"batch sizes must be positive, got {list(config.batch_sizes)}")
    if config.threads is None or config.threads < 0:
        raise BenchError(f"threads must be 0 (the CPUs this process may use) or more, got {config.threads}")
    if config.min_iterations < 1:
        raise BenchError(f"min_iterations must be at least 1, got {config.min_iterations}")
    if not config.seconds > 0:
        raise BenchError(f"seconds must be positive, got {config.seconds}")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(total: float, desc: str, enabled: bool) -> Any:
    return progress_bar(total=total, desc=desc, unit="s", enabled=enabled,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s")


# What a TorchScript file can run: bnfold.fold and the exporters need the eager module.
_SCRIPT_ROWS = ("eager", "torchscript")
_SCRIPT_ONLY = ("the model is a TorchScript module: bnfold cannot fold or export it, so only the eager and "
                "torchscript rows run it; for every row give the eager model (a checkpoint, or a state_dict "
                "with --model-class)")


def _build_calls(ctx: BackendContext, devices: Sequence[str], backends: Sequence[str], batch_size: int,
                 warmup_s: float, progress: bool) -> tuple[list[TimedCall], list[BenchRow]]:
    """Build and warm up every (backend, device) at one batch size; failures become rows at once."""
    calls: list[TimedCall] = []
    rows: list[BenchRow] = []
    plan = [(name, device) for device in devices for name in expand(backends, device)]
    for name, device in progress_bar(plan, desc=f"build bs={batch_size}", unit="backend", enabled=progress):
        backend = BACKENDS[name]
        row = BenchRow(name, device, batch_size, note=backend.note)
        rows.append(row)
        try:
            if ctx.model is None and backend.needs != "onnx":
                raise Unavailable("the model is an ONNX file: only the onnxruntime and HTTP rows can run it")
            if ctx.unavailable is not None and name not in _SCRIPT_ROWS:
                raise Unavailable(ctx.unavailable)
            timed = TimedCall(row, backend.build(ctx, device, batch_size))  # type: ignore[misc]
            warm_up(timed, warmup_s)
            calls.append(timed)
        except Unavailable as exc:
            row.status, row.reason = SKIPPED, str(exc)
        except Exception as exc:  # noqa: BLE001 - one broken backend must not sink the others
            row.status, row.reason = FAILED, first_line(exc, with_type=True, limit=400)
    return calls, rows


def require_some_device(devices: Sequence[str]) -> None:
    """`bnfold bench --devices cuda` alone, without CUDA, would measure nothing: refuse, as train and serve do.

    With cpu,cuda the CUDA rows are reported as skipped instead (what `bnfold pipeline` relies on).
    """
    if list(dict.fromkeys(devices)) == ["cuda"]:
        try:
            check_cuda_torch("cuda")
        except Unavailable as exc:
            raise BenchError(f"--devices cuda asked for, but {exc}; use --devices cpu, or --devices cpu,cuda "
                             "to report the CUDA rows as skipped") from None


def run_bench(config: BenchConfig) -> BenchResult:
    """Measure every requested backend on every requested device at each batch size.

    `config.source` is any model `models.load_model` reads (a bnfold checkpoint, a state_dict
    with `config.model_class`, an ONNX file, ...); `config.seconds` is the measured time per backend
    and batch size (warm-up comes on top). `config.export_dir` holds already exported files
    (`export.WRITERS`' file names) to reuse, as `bnfold pipeline` does; missing ones are exported
    into a temporary folder. HTTP rows exist only at batch size 1.
    """
    import torch

    from bnfold.models.loader import load_model

    devices = list(dict.fromkeys(config.devices))
    backends = list(dict.fromkeys(config.backends))
    batch_sizes = sorted({int(b) for b in config.batch_sizes})
    seconds = config.seconds
    threads = resolve_threads(config.threads)
    loaded = load_model(config.source, model_class=config.model_class, model_args=config.model_args,
                        weights=config.weights, trust_pickle=config.trust_pickle, input_shape=config.input_shape)
    model, spec = loaded.module, loaded.spec
    sample_shape = loaded.require_shape()[1:]

    rng = np.random.default_rng(config.seed)
    inputs = {b: rng.standard_normal((b, *sample_shape)).astype(np.float32) for b in batch_sizes}
    if 1 not in inputs:
        inputs[1] = rng.standard_normal((1, *sample_shape)).astype(np.float32)
    warmup_s = min(1.0, max(0.1, seconds / 4))

    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp, _torch_threads(threads):
        wanted = backends + [extra for name in backends for extra in BACKENDS[name].with_on_cuda]
        kinds = {BACKENDS[name].needs for name in wanted if BACKENDS[name].needs}
        export_dir = Path(config.export_dir) if config.export_dir is not None else None
        # A TorchScript, torch.export or ONNX file is its own artifact for the rows that run that kind.
        own_kind = format_of_kind(loaded.kind)   # export.WRITERS: the format whose files are of this kind
        own = (loaded.onnx_path if loaded.kind == "onnx" else Path(loaded.source)) if own_kind else None
        script = isinstance(model, torch.jit.ScriptModule)
        if model is None:  # an ONNX file: nothing else can be made from it
            artifacts, errors = {own_kind: own}, {}
        elif script:  # nor from a TorchScript module but itself
            artifacts, errors = {own_kind: own}, {}
        else:
            artifacts, errors = _prepare_artifacts(model, spec or _export_spec(loaded), kinds - {own_kind},
                                                   Path(tmp), export_dir, config.source)
            if own_kind is not None and own is not None:
                artifacts[own_kind] = own
        ctx = BackendContext(model, spec, threads, artifacts, errors, inputs,
                             unavailable=_SCRIPT_ONLY if script else None)
        if "folded" in backends and model is not None and not script:
            ctx.prepare_folded()
        for batch_size in batch_sizes:
            with torch.inference_mode():
                calls, built = _build_calls(ctx, devices, backends, batch_size, warmup_s, config.progress)
                with _progress(seconds * len(calls), f"measure bs={batch_size}", config.progress) as bar:
                    if calls:
                        measure_interleaved(calls, seconds, min_iterations=config.min_iterations, progress=bar)
            rows += built
            del calls
        for name in backends:
            measure = BACKENDS[name].measure_apart
            if measure is not None:
                for device in devices:
                    rows += measure(ctx, device, seconds)

    environment = collect_environment(threads=threads, spec=spec, checkpoint=config.source)
    environment["source"] = loaded.description  # what the file turned out to be
    if spec is None:
        environment.update({"model": loaded.name, "input_shape": list(sample_shape)})
    environment.update({"seconds_per_backend": seconds, "batch_sizes": batch_sizes,
                        "devices": devices, "backends": backends, "warmup_s": warmup_s,
                        "min_iterations": config.min_iterations,
                        "method": "interleaved bursts in one process; per-call perf_counter_ns; "
                                  "CUDA synchronized; HTTP rows measured after, by bench.loadtest"})
    warning = flag_untrustworthy(rows, environment, config.min_iterations)
    if warning:
        environment["warning"] = warning
    return BenchResult(rows, environment, compute_speedups(rows))


def _export_spec(loaded: LoadedModel) -> Any:
    """A spec for exporting a model that came without one: its shape; names and labels are not needed here."""
    from bnfold.models.spec_options import SpecOptions

    shape = loaded.require_shape()
    if len(shape) == 4 and shape[1] in (1, 3):
        return loaded.spec_with(SpecOptions())
    # Not an image model: a spec that carries the shape is all the writers read.
    from bnfold.models.spec import ModelSpec, Preprocess

    return ModelSpec(arch=loaded.name, arch_kwargs={}, task="unknown", input_shape=list(shape[1:]),
                     preprocess=Preprocess("RGB", 0, None, [], []), labels=[], dataset="")


def flag_untrustworthy(rows: Sequence[BenchRow], environment: dict[str, Any], min_iterations: int) -> str:
    """Mark rows whose figures should not be read as results; return a warning for the whole run, if any.

    A row is noisy when its p90 is `NOISY_P90_OVER_P50` times its p50 or it has fewer than
    `min_iterations` calls; the whole run is suspect when the 1-minute load average exceeds the
    CPUs this process may use (other processes competed for the cores).
    """
    for row in rows:
        if not row.ok or not row.p50_ms or row.p90_ms is None:
            continue
        notes = []
        ratio = row.p90_ms / row.p50_ms
        if ratio >= NOISY_P90_OVER_P50:
            notes.append(f"p90 is {ratio:.1f}x p50 (calls were disturbed)")
        if row.iterations < min_iterations:
            notes.append(f"only {row.iterations} calls")
        if notes:
            row.warning = "; ".join(notes) + ": do not read ratios from this row"
    load = environment.get("load_average")
    cpus = environment.get("cpus_available") or environment.get("cpu_count") or 1
    if load and load[0] > cpus:
        return (f"load average {load[0]:.1f} over {cpus} available CPU(s): other processes competed for the "
                "cores, so figures and ratios from this run are not trustworthy; rerun on a quiet machine")
    return ""


__all__ = ["BenchConfig", "BenchError", "BenchResult", "Speedup", "compute_speedups", "run_bench"]
