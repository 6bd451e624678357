"""Batch-1 latency of one checkpoint across backends and devices, measured the way BENCHMARKS.md asks.

`run_bench` returns data (a `BenchResult` of `BenchRow`s) and writes nothing but the exported
files it needs in a temporary folder; `bench.report.write_report` turns the result into
report.json, report.md and charts.

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
import datetime as _dt
import gc
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.errors import BnfoldError

#: Backends a caller can ask for. On CUDA, "ort" also yields the IO-binding and CUDA-graph rows,
#: and "http" yields a latency row ("http") and an 8-connection throughput row ("http-8conn").
BACKENDS: tuple[str, ...] = ("eager", "folded", "torchscript", "program", "compile", "ort", "http")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
DEFAULT_BACKENDS: tuple[str, ...] = ("eager", "folded", "torchscript", "program", "ort", "http")

OK, SKIPPED, FAILED = "ok", "skipped", "failed"

# How each row was measured, for the report's readers.
NOTES: dict[str, str] = {
    "eager": "the checkpoint's eval-mode module, BatchNorm unfolded",
    "folded": "bnfold.fold of the same module",
    "torchscript": "exported TorchScript file (folded) loaded with torch.jit.load",
    "program": "exported torch.export file (folded) loaded with torch.export.load",
    "compile": "torch.compile (inductor) of the unfolded module",
    "ort": "onnxruntime, numpy in and numpy out (host to host)",
    "ort-iobinding": "onnxruntime CUDA, input and output bound on the device (IO binding)",
    "ort-cudagraph": "onnxruntime CUDA with enable_cuda_graph, IO binding, batch dimension pinned",
    "http": "bnfold serve on loopback, one connection, binary tensors (bench.loadtest)",
    "http-8conn": "bnfold serve on loopback, eight connections (bench.loadtest)",
}


class BenchError(BnfoldError):
    """The benchmark was asked for something it cannot do (unknown backend or device, bad budget)."""


class _Unavailable(Exception):
    """Raised while building a backend that cannot run here; becomes a "skipped" row."""


@dataclass
class BenchRow:
    """One backend on one device at one batch size. Times are per call (one batch), in ms."""

    backend: str
    device: str
    batch_size: int
    status: str = OK
    reason: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    iterations: int = 0
    items_per_s: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
# Timing


@dataclass
class TimedCall:
    """A ready-to-call backend: `fn()` runs one batch and returns only when the result is done.

    `measure_interleaved` appends each call's time to `samples_ns` and fills `row`'s figures.
    """

    row: BenchRow
    fn: Callable[[], Any]
    samples_ns: list[int] = field(default_factory=list)
    measured_ns: int = 0


def _percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


def _warm_up(case: TimedCall, seconds: float, min_calls: int = 3) -> None:
    deadline = time.perf_counter() + seconds
    calls = 0
    while calls < min_calls or time.perf_counter() < deadline:
        case.fn()
        calls += 1


def measure_interleaved(cases: Sequence[TimedCall], seconds: float, *, burst_s: float | None = None,
                        min_iterations: int = 5, progress: Any = None) -> None:
    """Time every case in rounds of short bursts (A B C A B C ...) until each has `seconds` of calls.

    Each call is timed alone with `perf_counter_ns`; a burst is at least one call, so a slow
    backend still advances. The garbage collector is paused so that a collection triggered by
    one backend is not billed to another.
    """
    burst_ns = int((burst_s if burst_s is not None else min(0.05, max(seconds / 20, 0.002))) * 1e9)
    budget_ns = int(seconds * 1e9)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        pending = list(cases)
        while pending:
            for case in pending:
                fn, samples = case.fn, case.samples_ns
                burst_end = time.perf_counter_ns() + burst_ns
                while True:
                    t0 = time.perf_counter_ns()
                    fn()
                    t1 = time.perf_counter_ns()
                    samples.append(t1 - t0)
                    case.measured_ns += t1 - t0
                    if t1 >= burst_end:
                        break
            if progress is not None:  # set, not added: float increments would overshoot the total
                progress.n = sum(min(c.measured_ns, budget_ns) for c in cases) / 1e9
                progress.refresh()
            pending = [c for c in pending if c.measured_ns < budget_ns or len(c.samples_ns) < min_iterations]
    finally:
        if gc_was_enabled:
            gc.enable()
    for case in cases:
        stats = _percentiles(case.samples_ns)
        row = case.row
        row.p50_ms, row.p90_ms, row.p99_ms = stats["p50_ms"], stats["p90_ms"], stats["p99_ms"]
        row.mean_ms, row.min_ms = stats["mean_ms"], stats["min_ms"]
        row.iterations = len(case.samples_ns)
        row.items_per_s = row.batch_size / (row.mean_ms / 1e3)


# ---------------------------------------------------------------------------------------------
# Environment


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is simply reported as None
        return None


def collect_environment(*, threads: int, spec: Any = None, checkpoint: str | os.PathLike | None = None,
                        dtype: str = "float32") -> dict[str, Any]:
    """What ran, for the report: device names, library versions, threads, date, model and input."""
    import onnxruntime

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_available": _available_cpus(),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "threads": threads,
        # Other processes competing for the cores: the first thing to check when figures look odd.
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "dtype": dtype,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "onnx": _version("onnx"),
        "numpy": np.__version__,
    }
    if spec is not None:
        env["model"] = spec.arch
        env["arch_kwargs"] = dict(spec.arch_kwargs)
        env["task"] = spec.task
        env["dataset"] = spec.dataset
        env["input_shape"] = list(spec.input_shape)
    if checkpoint is not None:
        env["checkpoint"] = str(checkpoint)
    return env


def _available_cpus() -> int:
    from bnfold.serve.runtime import available_cpus

    return available_cpus()


# ---------------------------------------------------------------------------------------------
# Backends


@dataclass
class _Context:
    """Everything the backend builders share: the modules, the exported files, the inputs."""

    model: nn.Module
    spec: Any
    threads: int
    artifacts: dict[str, Path]
    artifact_errors: dict[str, str]
    inputs: dict[int, np.ndarray]
    _folded: nn.Module | None = None
    _fold_error: str | None = None

    def prepare_folded(self) -> None:
        """Fold once, outside inference mode (parameters made under it cannot be copied freely)."""
        import bnfold

        try:
            self._folded, _ = bnfold.fold(self.model)
        except Exception as exc:  # noqa: BLE001 - the folded rows report it
            self._fold_error = f"bnfold.fold failed: {_describe_error(exc)}"

    def folded(self) -> nn.Module:
        if self._folded is None:
            raise RuntimeError(self._fold_error or "the model was not folded")
        return self._folded

    def artifact(self, kind: str) -> Path:
        if kind not in self.artifacts:
            raise RuntimeError(self.artifact_errors.get(kind, f"no {kind} file was exported"))
        return self.artifacts[kind]


def _check_cuda_torch(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise _Unavailable("CUDA is not available: torch.cuda.is_available() is False "
                           "(no CUDA device or driver on this machine)")


def _check_cuda_ort(device: str) -> None:
    import onnxruntime

    _check_cuda_torch(device)
    if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise _Unavailable("onnxruntime has no CUDAExecutionProvider (this is the CPU build; "
                           "install onnxruntime-gpu: pip install 'bnfold[gpu]')")


def _torch_call(module: Callable[..., Any], x: torch.Tensor, device: str) -> Callable[[], Any]:
    """A call that returns only when the result exists: CUDA work is synchronized."""
    if device == "cuda":
        sync = torch.cuda.synchronize

        def call() -> Any:
            y = module(x)
            sync()
            return y
        return call
    return lambda: module(x)


def _torch_input(ctx: _Context, device: str, batch_size: int) -> torch.Tensor:
    # Device-resident input: the torch CUDA rows compare with onnxruntime's IO-binding row.
    return torch.from_numpy(ctx.inputs[batch_size]).to(device)


def _build_eager(ctx: _Context, device: str, batch_size: int) -> Callable[[], Any]:
    _check_cuda_torch(device)
    module = copy.deepcopy(ctx.model).eval().to(device)
    return _torch_call(module, _torch_input(ctx, device, batch_size), device)


def _build_folded(ctx: _Context, device: str, batch_size: int) -> Callable[[], Any]:
    _check_cuda_torch(device)
    module = copy.deepcopy(ctx.folded()).eval().to(device)
    return _torch_call(module, _torch_input(ctx, device, batch_size), device)


def _build_torchscript(ctx: _Context, device: str, batch_size: int) -> Callable[[], Any]:
    _check_cuda_torch(device)
    if device == "cpu":
        from bnfold.export import load_torchscript  # quiet: no deprecation warning per load

        module = load_torchscript(ctx.artifact("torchscript"))
    else:
        module = torch.jit.load(str(ctx.artifact("torchscript")), map_location=device)
    module.eval()
    return _torch_call(module, _torch_input(ctx, device, batch_size), device)


def _build_program(ctx: _Context, device: str, batch_size: int) -> Callable[[], Any]:
    _check_cuda_torch(device)
    program = torch.export.load(str(ctx.artifact("program")))
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return _torch_call(program.module(), _torch_input(ctx, device, batch_size), device)


def _build_compile(ctx: _Context, device: str, batch_size: int) -> Callable[[], Any]:
    _check_cuda_torch(device)
    module = torch.compile(copy.deepcopy(ctx.model).eval().to(device))
    call = _torch_call(module, _torch_input(ctx, device, batch_size), device)
    try:
        call()  # compiles here, so that compilation is not counted as warm-up noise
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, unsupported op, ...: a row that says why
        raise _Unavailable(f"torch.compile does not work here: {_describe_error(exc)}") from exc
    return call


def _build_ort(ctx: _Context, device: str, batch_size: int) -> Callable[[], Any]:
    _check_cuda_ort(device)
    from bnfold.serve.runtime import open_session

    runtime = open_session(ctx.artifact("onnx"), device, threads=ctx.threads)
    x = ctx.inputs[batch_size]
    return lambda: runtime.run(x)


def _ort_cuda_session(ctx: _Context, cuda_graph: bool, batch_size: int) -> tuple[Any, np.ndarray]:
    """A CUDA session with no CPU fallback, and the CPU session's output for the benchmark input."""
    import onnxruntime

    path = str(ctx.artifact("onnx"))
    # Output shape and reference values come from a CPU run: a CUDA-graph session must only
    # ever run bound buffers.
    probe = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_meta = probe.get_inputs()[0]
    expected = probe.run(None, {input_meta.name: ctx.inputs[batch_size]})[0]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cuda_graph and isinstance(input_meta.shape[0], str):
        # A CUDA graph needs every node on the GPU; a symbolic batch leaves Shape/Reshape
        # arithmetic on the CPU. Pinning the batch dimension lets onnxruntime fold it away.
        options.add_free_dimension_override_by_name(input_meta.shape[0], batch_size)
    provider = ("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1" if cuda_graph else "0"})
    session = onnxruntime.InferenceSession(path, options, providers=[provider, "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        # No silent fallback: a CPU-run figure must never be reported as a CUDA one.
        raise _Unavailable(f"onnxruntime did not activate CUDA (providers: {session.get_providers()})")
    return session, expected


def _build_ort_bound(ctx: _Context, device: str, batch_size: int, *, cuda_graph: bool) -> Callable[[], Any]:
    """onnxruntime CUDA with input and output living on the GPU (IO binding), optionally a CUDA graph.

    A CUDA graph replays fixed device addresses, so the input and output OrtValues are
    allocated once and bound once; the first runs capture the graph (done during warm-up).
    """
    if device != "cuda":
        raise _Unavailable("IO binding and CUDA graphs are CUDA-only rows")
    _check_cuda_ort(device)
    session, expected = _ort_cuda_session(ctx, cuda_graph, batch_size)
    return bound_runner(session, ctx.inputs[batch_size], expected, "cuda")


def bound_runner(session: Any, x: np.ndarray, expected: np.ndarray, device: str = "cuda") -> Callable[[], Any]:
    """A call running `session` on buffers bound once on `device` (onnxruntime IO binding).

    The input and output OrtValues are allocated and bound once: a CUDA graph replays fixed
    device addresses. The call is run three times (past a CUDA-graph capture) and its result
    checked against `expected` before the runner is handed out.
    """
    import onnxruntime

    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    x_dev = onnxruntime.OrtValue.ortvalue_from_numpy(x, device, 0)
    y_dev = onnxruntime.OrtValue.ortvalue_from_shape_and_type(expected.shape, expected.dtype, device, 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(input_name, x_dev)
    binding.bind_ortvalue_output(output_name, y_dev)

    def call() -> Any:
        # Session.run synchronizes the CUDA stream before returning, unless told otherwise.
        session.run_with_iobinding(binding)
        return y_dev  # also keeps the bound device buffers alive as long as the call

    for _ in range(3):
        call()
    scale = float(np.abs(expected).max()) or 1.0
    error = float(np.abs(y_dev.numpy() - expected).max()) / scale
    if error > 1e-3:
        raise RuntimeError(f"bound {device} output differs from onnxruntime CPU: max relative error {error:.2e}")
    return call


_BUILDERS: dict[str, Callable[[_Context, str, int], Callable[[], Any]]] = {
    "eager": _build_eager,
    "folded": _build_folded,
    "torchscript": _build_torchscript,
    "program": _build_program,
    "compile": _build_compile,
    "ort": _build_ort,
    "ort-iobinding": lambda ctx, d, b: _build_ort_bound(ctx, d, b, cuda_graph=False),
    "ort-cudagraph": lambda ctx, d, b: _build_ort_bound(ctx, d, b, cuda_graph=True),
}


def _expand_backends(backends: Sequence[str], device: str) -> list[str]:
    """The rows one device gets for the requested backends, HTTP excluded (measured apart)."""
    rows: list[str] = []
    for backend in backends:
        if backend == "http":
            continue
        rows.append(backend)
        if backend == "ort" and device == "cuda":
            rows += ["ort-iobinding", "ort-cudagraph"]
    return rows


def _describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:400]


# ---------------------------------------------------------------------------------------------
# Exported files


_ARTIFACT_FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "program": "model.pt2"}
_NEEDS = {"torchscript": "torchscript", "program": "program", "ort": "onnx", "http": "onnx"}


def _prepare_artifacts(model: nn.Module, spec: Any, kinds: set[str], work_dir: Path,
                       export_dir: Path | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Reuse exported files from `export_dir` when present, else export (folded, verified) into `work_dir`."""
    found: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for kind in sorted(kinds):
        name = _ARTIFACT_FILES[kind]
        if export_dir is not None and (export_dir / name).is_file():
            found[kind] = export_dir / name
            continue
        import bnfold.export as exporter

        writer = {"onnx": exporter.export_onnx, "torchscript": exporter.export_torchscript,
                  "program": exporter.export_program}[kind]
        path = work_dir / name
        try:
            writer(copy.deepcopy(model), spec, path)
            found[kind] = path
        except Exception as exc:  # noqa: BLE001 - the rows that need the file report why it is missing
            errors[kind] = f"exporting {name} failed: {_describe_error(exc)}"
    return found, errors


# ---------------------------------------------------------------------------------------------
# HTTP


def _bench_http(ctx: _Context, device: str, seconds: float) -> list[BenchRow]:
    """Latency over one connection and throughput over eight, against `bnfold serve` on loopback."""
    rows = [BenchRow("http", device, 1, note=NOTES["http"]), BenchRow("http-8conn", device, 1, note=NOTES["http-8conn"])]
    try:
        _check_cuda_ort(device)
        onnx_path = ctx.artifact("onnx")
        from bnfold.serve.launch import running_server
        from bnfold.bench.loadtest import run_loadtest

        name = "bench"
        with running_server(onnx_path, device=device, threads=ctx.threads, name=name) as url:
            x = ctx.inputs[1]
            probe = run_loadtest(url, name, concurrency=1, requests=30, inputs=x)
            # Size the runs so that each lasts about `seconds`.
            requests = int(np.clip(seconds * 1e3 / max(probe.mean_ms, 1e-3), 50, 50_000))
            single = run_loadtest(url, name, concurrency=1, requests=requests, inputs=x)
            many = run_loadtest(url, name, concurrency=8, requests=max(2 * requests, 200), inputs=x)
        for row, result in zip(rows, (single, many)):
            row.p50_ms, row.p90_ms, row.p99_ms, row.mean_ms = (result.p50_ms, result.p90_ms,
                                                               result.p99_ms, result.mean_ms)
            row.iterations = int(result.requests)
            row.items_per_s = float(result.rps)
            if result.errors:
                row.status = FAILED
                row.reason = f"{result.errors} of {result.requests} requests failed: {result.first_error}"
    except _Unavailable as exc:
        for row in rows:
            row.status, row.reason = SKIPPED, str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken server is a failed row, not a lost benchmark
        for row in rows:
            row.status, row.reason = FAILED, _describe_error(exc)
    return rows


# ---------------------------------------------------------------------------------------------
# Ratios


def compute_speedups(rows: Sequence[BenchRow], batch_size: int = 1) -> list[Speedup]:
    """The comparisons the report leads with, from p50s of rows measured in the same run."""
    by_key = {(r.backend, r.device): r for r in rows if r.batch_size == batch_size and r.ok and r.p50_ms}
    out: list[Speedup] = []

    def add(label: str, base: tuple[str, str], cand: tuple[str, str]) -> None:
        if base in by_key and cand in by_key:
            factor = by_key[base].p50_ms / by_key[cand].p50_ms  # type: ignore[operator]
            out.append(Speedup(label, f"{base[0]}@{base[1]}", f"{cand[0]}@{cand[1]}", batch_size, factor))

    for device in DEVICES:
        add(f"folded vs unfolded eager ({device})", ("eager", device), ("folded", device))
        for backend in ("torchscript", "program", "compile", "ort", "ort-iobinding", "ort-cudagraph"):
            add(f"{backend} vs eager ({device})", ("eager", device), (backend, device))
        add(f"ort IO binding vs ort host-to-host ({device})", ("ort", device), ("ort-iobinding", device))
        add(f"ort CUDA graph vs ort IO binding ({device})", ("ort-iobinding", device), ("ort-cudagraph", device))
        add(f"ort vs http, in-process against one HTTP hop ({device})", ("http", device), ("ort", device))
    for backend in ("eager", "folded", "torchscript", "program", "compile", "ort", "http"):
        add(f"GPU vs CPU, {backend}", (backend, "cpu"), (backend, "cuda"))
    cpu = [r for (b, d), r in by_key.items() if d == "cpu" and not b.startswith("http")]
    gpu = [r for (b, d), r in by_key.items() if d == "cuda" and not b.startswith("http")]
    if cpu and gpu:
        best_cpu = min(cpu, key=lambda r: r.p50_ms)  # type: ignore[arg-type, return-value]
        best_gpu = min(gpu, key=lambda r: r.p50_ms)  # type: ignore[arg-type, return-value]
        add("GPU vs CPU, fastest of each", (best_cpu.backend, "cpu"), (best_gpu.backend, "cuda"))
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark


def _validate(devices: Sequence[str], backends: Sequence[str], batch_sizes: Sequence[int],
              threads: int | None, seconds: float) -> None:
    for device in devices:
        if device not in DEVICES:
            raise BenchError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    for backend in backends:
        if backend not in BACKENDS:
            raise BenchError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if not devices or not backends or not batch_sizes:
        raise BenchError("devices, backends and batch sizes must each name at least one value")
    if any(int(b) < 1 for b in batch_sizes):
        raise BenchError(f"batch sizes must be positive, got {list(batch_sizes)}")
    if threads is not None and threads < 1:
        raise BenchError(f"threads must be at least 1, got {threads}")
    if not seconds > 0:
        raise BenchError(f"seconds must be positive, got {seconds}")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(total: float, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="s", disable=not enabled, leave=False,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s")


def _build_cases(ctx: _Context, devices: Sequence[str], backends: Sequence[str], batch_size: int,
                 warmup_s: float, progress: bool) -> tuple[list[TimedCall], list[BenchRow]]:
    """Build and warm up every (backend, device) at one batch size; failures become rows at once."""
    cases: list[TimedCall] = []
    rows: list[BenchRow] = []
    plan = [(backend, device) for device in devices for backend in _expand_backends(backends, device)]
    from tqdm.auto import tqdm

    for backend, device in tqdm(plan, desc=f"build bs={batch_size}", disable=not progress, leave=False):
        row = BenchRow(backend, device, batch_size, note=NOTES.get(backend, ""))
        rows.append(row)
        try:
            case = TimedCall(row, _BUILDERS[backend](ctx, device, batch_size))
            _warm_up(case, warmup_s)
            cases.append(case)
        except _Unavailable as exc:
            row.status, row.reason = SKIPPED, str(exc)
        except Exception as exc:  # noqa: BLE001 - one broken backend must not sink the others
            row.status, row.reason = FAILED, _describe_error(exc)
    return cases, rows


def run_bench(checkpoint: str | os.PathLike, *, devices: Sequence[str] = ("cpu", "cuda"),
              backends: Sequence[str] = DEFAULT_BACKENDS, batch_sizes: Sequence[int] = (1, 8, 32),
              threads: int | None = None, seconds: float = 2.0, progress: bool = True,
              export_dir: str | os.PathLike | None = None, seed: int = 0) -> BenchResult:
    """Measure every requested backend on every requested device at each batch size.

    `checkpoint` is a bnfold checkpoint; `seconds` is the measured time per backend and batch
    size (warm-up comes on top); `threads` defaults to the CPUs this process may use.
    `export_dir` holds already exported `model.onnx` / `model.ts` / `model.pt2` to reuse
    (as `bnfold pipeline` does); missing ones are exported into a temporary folder.
    HTTP rows exist only at batch size 1.
    """
    from bnfold import models

    _validate(devices, backends, batch_sizes, threads, seconds)
    devices = list(dict.fromkeys(devices))
    backends = list(dict.fromkeys(backends))
    batch_sizes = sorted({int(b) for b in batch_sizes})
    threads = threads or _available_cpus()
    model, spec = models.load_checkpoint(checkpoint)
    model.eval()

    rng = np.random.default_rng(seed)
    inputs = {b: rng.standard_normal((b, *spec.input_shape)).astype(np.float32) for b in batch_sizes}
    if 1 not in inputs:
        inputs[1] = rng.standard_normal((1, *spec.input_shape)).astype(np.float32)
    warmup_s = min(1.0, max(0.1, seconds / 4))

    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp, _torch_threads(threads):
        kinds = {_NEEDS[b] for b in backends if b in _NEEDS}
        artifacts, errors = _prepare_artifacts(model, spec, kinds, Path(tmp),
                                               Path(export_dir) if export_dir is not None else None)
        ctx = _Context(model, spec, threads, artifacts, errors, inputs)
        if "folded" in backends:
            ctx.prepare_folded()
        for batch_size in batch_sizes:
            with torch.inference_mode():
                cases, built = _build_cases(ctx, devices, backends, batch_size, warmup_s, progress)
                with _progress(seconds * len(cases), f"measure bs={batch_size}", progress) as bar:
                    if cases:
                        measure_interleaved(cases, seconds, progress=bar)
            rows += built
            del cases
        if "http" in backends:
            for device in devices:
                rows += _bench_http(ctx, device, seconds)

    environment = collect_environment(threads=threads, spec=spec, checkpoint=checkpoint)
    environment.update({"seconds_per_backend": seconds, "batch_sizes": batch_sizes,
                        "devices": devices, "backends": backends, "warmup_s": warmup_s,
                        "method": "interleaved bursts in one process; per-call perf_counter_ns; "
                                  "CUDA synchronized; HTTP rows measured after, by bench.loadtest"})
    return BenchResult(rows, environment, compute_speedups(rows))


__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "DEVICES", "BenchError", "BenchResult", "BenchRow",
           "Speedup", "TimedCall", "bound_runner", "collect_environment", "compute_speedups", "measure_interleaved", "run_bench"]
