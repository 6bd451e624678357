"""`BACKENDS`: every way `bnfold bench` can run the model, one entry each.

An entry names its builder (context, device, batch size -> a call that runs one batch and
returns only when the result exists), the exported file it needs (a key of `export.WRITERS`),
the note the report prints for its rows, and how it enters the speed-up table. A new backend
is one builder and one entry here; `run_bench`, the CLI's option check and the report follow.

Builders raise `Unavailable` for what cannot run on this machine (no CUDA, a CPU-only
onnxruntime); that becomes a "skipped" row with the reason, anything else a "failed" row.
torch is imported inside the builders, so that `bnfold --help` can read this table cheaply.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import first_line
from bnfold.options import DEVICES
from bnfold.sessions import session_options
from bnfold.bench.timing import FAILED, SKIPPED, BenchRow, latency_stats

if TYPE_CHECKING:
    from torch import nn



class Unavailable(Exception):
    """Raised while building a backend that cannot run here; becomes a "skipped" row."""


@dataclass
class BackendContext:
    """Everything the backend builders share: the modules, the exported files, the inputs."""

    model: nn.Module
    spec: Any
    threads: int
    artifacts: dict[str, Path]
    artifact_errors: dict[str, str]
    inputs: dict[int, np.ndarray]
    _folded: nn.Module | None = None
    _fold_error: str | None = None
    # Why nothing can be folded or exported from this model (a TorchScript module): a skipped row.
    unavailable: str | None = None

    def prepare_folded(self) -> None:
        """Fold once, outside inference mode (parameters made under it cannot be copied freely)."""
        import torch

        import bnfold

        # An input the model really takes: modules of the user's own are folded by what they compute on it.
        example = torch.from_numpy(self.inputs[min(self.inputs)]) if self.inputs else None
        try:
            self._folded, _ = bnfold.fold(self.model, example_inputs=example)
        except Exception as exc:  # noqa: BLE001 - the folded rows report it
            self._fold_error = f"bnfold.fold failed: {first_line(exc, with_type=True, limit=400)}"

    def folded(self) -> nn.Module:
        if self._folded is None:
            raise RuntimeError(self._fold_error or "the model was not folded")
        return self._folded

    def artifact(self, kind: str) -> Path:
        if kind not in self.artifacts:
            if self.unavailable is not None:
                raise Unavailable(self.unavailable)
            raise RuntimeError(self.artifact_errors.get(kind, f"no {kind} file was exported"))
        return self.artifacts[kind]


Builder = Callable[[BackendContext, str, int], Callable[[], Any]]
# Rows measured apart from the interleaved rounds (another process): context, device, seconds -> rows.
ApartMeasure = Callable[[BackendContext, str, float], list[BenchRow]]


@dataclass(frozen=True)
class Backend:
    """One backend: how to build it, what it needs, and how the report treats its rows."""

    note: str                                  # how the row was measured, for the report's readers
    build: Builder | None = None               # in-process: measured interleaved with the others
    measure_apart: ApartMeasure | None = None  # or: measured after the rounds (HTTP)
    needs: str | None = None                   # the exported file it runs (a key of export.WRITERS)
    requestable: bool = True                   # False: a row that comes with another backend
    default: bool = True                       # in `bnfold bench`'s default --backends
    with_on_cuda: tuple[str, ...] = ()         # extra rows this backend brings on a CUDA device
    versus_eager: str | None = None            # label of its "<x> vs eager" speed-up, if any
    # Further speed-ups: (label, baseline backend, candidate backend), on each device.
    speedups: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)
    label: str = ""                            # the name people know it by, for charts and tables

    @property
    def in_process(self) -> bool:
        return self.build is not None


# ---------------------------------------------------------------------------------------------
# Shared pieces of the builders


def check_cuda_torch(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available: torch.cuda.is_available() is False "
                          "(no CUDA device or driver on this machine)")


def check_cuda_ort(device: str) -> None:
    import onnxruntime

    check_cuda_torch(device)
    if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Unavailable("onnxruntime has no CUDAExecutionProvider (this is the CPU build; "
                          "install onnxruntime-gpu: pip install 'bnfold[gpu]')")


def torch_call(module: Callable[..., Any], x: Any, device: str) -> Callable[[], Any]:
    """A call that returns only when the result exists: CUDA work is synchronized."""
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize

        def call() -> Any:
            y = module(x)
            sync()
            return y
        return call
    return lambda: module(x)


def torch_input(ctx: BackendContext, device: str, batch_size: int) -> Any:
    import torch

    # Device-resident input: the torch CUDA rows compare with onnxruntime's IO-binding row.
    return torch.from_numpy(ctx.inputs[batch_size]).to(device)


# ---------------------------------------------------------------------------------------------
# Builders


def _build_eager(ctx: BackendContext, device: str, batch_size: int) -> Callable[[], Any]:
    check_cuda_torch(device)
    module = copy.deepcopy(ctx.model).eval().to(device)
    return torch_call(module, torch_input(ctx, device, batch_size), device)


def _build_folded(ctx: BackendContext, device: str, batch_size: int) -> Callable[[], Any]:
    check_cuda_torch(device)
    module = copy.deepcopy(ctx.folded()).eval().to(device)
    return torch_call(module, torch_input(ctx, device, batch_size), device)


def _build_torchscript(ctx: BackendContext, device: str, batch_size: int) -> Callable[[], Any]:
    import torch

    check_cuda_torch(device)
    if device == "cpu":
        from bnfold.export import WRITERS  # its reader is quiet: no deprecation warning per load

        module = WRITERS["torchscript"].read(ctx.artifact("torchscript"))
    else:
        module = torch.jit.load(str(ctx.artifact("torchscript")), map_location=device)
    module.eval()
    return torch_call(module, torch_input(ctx, device, batch_size), device)


def _build_program(ctx: BackendContext, device: str, batch_size: int) -> Callable[[], Any]:
    from bnfold.export import WRITERS

    check_cuda_torch(device)
    program = WRITERS["program"].read(ctx.artifact("program"))
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return torch_call(program.module(), torch_input(ctx, device, batch_size), device)


def _build_compile(ctx: BackendContext, device: str, batch_size: int) -> Callable[[], Any]:
    import torch

    check_cuda_torch(device)
    module = torch.compile(copy.deepcopy(ctx.model).eval().to(device))
    call = torch_call(module, torch_input(ctx, device, batch_size), device)
    try:
        call()  # compiles here, so that compilation is not counted as warm-up noise
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, unsupported op, ...: a row that says why
        raise Unavailable(f"torch.compile does not work here: {first_line(exc, with_type=True, limit=400)}") from exc
    return call


def _build_ort(kind: str) -> Builder:
    """onnxruntime on the exported file of `kind` (an `export.WRITERS` key: onnx, int8, fp16), host to host."""
    def build(ctx: BackendContext, device: str, batch_size: int) -> Callable[[], Any]:
        if kind == "int8" and device == "cuda":
            # QDQ int8 runs on onnxruntime's CPU kernels; on a GPU it needs TensorRT, not the CUDA EP.
            raise Unavailable("INT8 QDQ is a CPU row: onnxruntime's CUDA provider has no int8 convolutions "
                              "(TensorRT does)")
        check_cuda_ort(device)
        from bnfold.serve.runtime import open_session

        runtime = open_session(ctx.artifact(kind), device, threads=ctx.threads)
        x = ctx.inputs[batch_size]
        return lambda: runtime.run(x)
    return build


def _ort_cuda_session(ctx: BackendContext, cuda_graph: bool, batch_size: int) -> tuple[Any, np.ndarray]:
    """A CUDA session with no CPU fallback, and the CPU session's output for the benchmark input."""
    import onnxruntime

    path = str(ctx.artifact("onnx"))
    # Output shape and reference values come from a CPU run: a CUDA-graph session must only
    # ever run bound buffers.
    probe = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_meta = probe.get_inputs()[0]
    expected = probe.run(None, {input_meta.name: ctx.inputs[batch_size]})[0]
    options = session_options(ctx.threads)
    if cuda_graph and isinstance(input_meta.shape[0], str):
        # A CUDA graph needs every node on the GPU; a symbolic batch leaves Shape/Reshape
        # arithmetic on the CPU. Pinning the batch dimension lets onnxruntime fold it away.
        options.add_free_dimension_override_by_name(input_meta.shape[0], batch_size)
    provider = ("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1" if cuda_graph else "0"})
    session = onnxruntime.InferenceSession(path, options, providers=[provider, "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        # No silent fallback: a CPU-run figure must never be reported as a CUDA one.
        raise Unavailable(f"onnxruntime did not activate CUDA (providers: {session.get_providers()})")
    return session, expected


def _build_ort_bound(ctx: BackendContext, device: str, batch_size: int, *, cuda_graph: bool) -> Callable[[], Any]:
    """onnxruntime CUDA with input and output living on the GPU (IO binding), optionally a CUDA graph.

    A CUDA graph replays fixed device addresses, so the input and output OrtValues are
    allocated once and bound once; the first runs capture the graph (done during warm-up).
    """
    if device != "cuda":
        raise Unavailable("IO binding and CUDA graphs are CUDA-only rows")
    check_cuda_ort(device)
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


def _measure_http(ctx: BackendContext, device: str, seconds: float) -> list[BenchRow]:
    """Latency over one connection (HTTP and gRPC, interleaved) and HTTP throughput over eight, on loopback.

    One `bnfold serve --grpc-port` process answers both protocols; the one-connection HTTP and gRPC
    runs alternate in two halves each, and their latencies are pooled per protocol.
    """
    rows = [BenchRow("http", device, 1, note=BACKENDS["http"].note),
            BenchRow("http-8conn", device, 1, note=BACKENDS["http-8conn"].note),
            BenchRow("grpc", device, 1, note=BACKENDS["grpc"].note)]
    try:
        check_cuda_ort(device)
        onnx_path = ctx.artifact("onnx")
        from bnfold.bench.loadtest import run_loadtest
        from bnfold.serve.launch import free_port, running_server

        name = "bench"
        grpc_address = f"127.0.0.1:{free_port()}"
        with running_server(onnx_path, device=device, threads=ctx.threads, name=name,
                            extra_args=["--grpc-port", grpc_address.rsplit(":", 1)[1]]) as url:
            x = ctx.inputs[1]
            probe = run_loadtest(url, name, concurrency=1, requests=30, inputs=x)
            # Size the runs so that each lasts about `seconds`.
            requests = int(np.clip(seconds * 1e3 / max(probe.mean_ms, 1e-3), 50, 50_000))
            single, over_grpc = [], []
            for _ in range(2):
                single.append(run_loadtest(url, name, concurrency=1, requests=requests // 2, inputs=x))
                over_grpc.append(run_loadtest(grpc_address, name, concurrency=1, requests=requests // 2, inputs=x,
                                              protocol="grpc"))
            many = run_loadtest(url, name, concurrency=8, requests=max(2 * requests, 200), inputs=x)
        for row, results in zip(rows, (single, [many], over_grpc)):
            ms = np.concatenate([r.latencies_ms for r in results])
            stats = latency_stats(ms)
            row.p50_ms, row.p90_ms, row.p99_ms, row.mean_ms = (stats["p50_ms"], stats["p90_ms"], stats["p99_ms"],
                                                               stats["mean_ms"])
            row.iterations = int(ms.size)
            row.items_per_s = float(sum(r.requests for r in results) / sum(r.seconds for r in results))
            errors = sum(r.errors for r in results)
            if errors:
                row.status = FAILED
                first = next(r.first_error for r in results if r.first_error)
                row.reason = f"{errors} of {ms.size} requests failed: {first}"
    except Unavailable as exc:
        for row in rows:
            row.status, row.reason = SKIPPED, str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken server is a failed row, not a lost benchmark
        for row in rows:
            row.status, row.reason = FAILED, first_line(exc, with_type=True, limit=400)
    return rows


# ---------------------------------------------------------------------------------------------
# The table. Order is the order of the report's rows and speed-ups. A backend's key is what
# --backends takes; its label is what a reader knows it as (charts and report tables).

BACKENDS: dict[str, Backend] = {
    "eager": Backend("the checkpoint's eval-mode module, BatchNorm unfolded", _build_eager, label="PyTorch eager"),
    "folded": Backend("bnfold.fold of the same module", _build_folded,
                      versus_eager="folded vs unfolded eager", label="PyTorch eager, BN folded"),
    "torchscript": Backend("exported TorchScript file (folded) loaded with torch.jit.load", _build_torchscript,
                           needs="torchscript", versus_eager="TorchScript vs eager", label="TorchScript"),
    "program": Backend("exported torch.export file (folded) loaded with torch.export.load", _build_program,
                       needs="program", versus_eager="torch.export vs eager", label="torch.export"),
    "compile": Backend("torch.compile (inductor) of the unfolded module", _build_compile, default=False,
                       versus_eager="torch.compile vs eager", label="torch.compile"),
    "ort": Backend("onnxruntime, numpy in and numpy out (host to host)", _build_ort("onnx"), needs="onnx",
                   with_on_cuda=("ort-iobinding", "ort-cudagraph"), versus_eager="ort vs eager", label="onnxruntime"),
    "ort-iobinding": Backend("onnxruntime CUDA, input and output bound on the device (IO binding)",
                             lambda ctx, d, b: _build_ort_bound(ctx, d, b, cuda_graph=False),
                             needs="onnx", requestable=False, versus_eager="ort-iobinding vs eager",
                             speedups=(("ort IO binding vs ort host-to-host", "ort", "ort-iobinding"),),
                             label="onnxruntime, IO binding"),
    "ort-cudagraph": Backend("onnxruntime CUDA with enable_cuda_graph, IO binding, batch dimension pinned",
                             lambda ctx, d, b: _build_ort_bound(ctx, d, b, cuda_graph=True),
                             needs="onnx", requestable=False, versus_eager="ort-cudagraph vs eager",
                             speedups=(("ort CUDA graph vs ort IO binding", "ort-iobinding", "ort-cudagraph"),),
                             label="onnxruntime, CUDA graph"),
    "ort-int8": Backend("onnxruntime CPU on model.int8.onnx (QDQ, calibrated, accuracy-gated), host to host",
                        _build_ort("int8"), needs="int8", default=False, versus_eager="ort-int8 vs eager",
                        speedups=(("ort INT8 vs ort FP32", "ort", "ort-int8"),), label="onnxruntime INT8"),
    "ort-fp16": Backend("onnxruntime on model.fp16.onnx (float16 weights, float32 edges), host to host",
                        _build_ort("fp16"), needs="fp16", default=False, versus_eager="ort-fp16 vs eager",
                        speedups=(("ort FP16 vs ort FP32", "ort", "ort-fp16"),), label="onnxruntime FP16"),
    "http": Backend("bnfold serve on loopback, one connection, binary tensors (bench.loadtest)",
                    measure_apart=_measure_http, needs="onnx",
                    speedups=(("ort vs http, in-process against one HTTP hop", "http", "ort"),),
                    label="HTTP, 1 connection"),
    "http-8conn": Backend("bnfold serve on loopback, eight connections (bench.loadtest)", requestable=False,
                          label="HTTP, 8 connections"),
    "grpc": Backend("bnfold serve --grpc-port on loopback, one connection, raw tensor contents, "
                    "interleaved with the HTTP row (bench.grpc_load)", requestable=False,
                    speedups=(("http vs grpc, one HTTP hop against one gRPC call", "grpc", "http"),),
                    label="gRPC, 1 connection"),
}


def backend_label(name: str) -> str:
    """The name a reader knows a backend by ("program" is torch.export); an unknown name as given."""
    backend = BACKENDS.get(name)
    return backend.label if backend is not None and backend.label else name


# What a caller can ask for; on CUDA, "ort" also yields the IO-binding and CUDA-graph rows, and
# "http" yields a latency row ("http"), an 8-connection throughput row ("http-8conn") and a gRPC
# latency row ("grpc", the same server's gRPC port).
def requestable() -> list[str]:
    """The backend names a caller may ask for, read from the table as it is now."""
    return [name for name, b in BACKENDS.items() if b.requestable]


REQUESTABLE: tuple[str, ...] = tuple(requestable())
DEFAULT_BACKENDS: tuple[str, ...] = tuple(name for name, b in BACKENDS.items() if b.requestable and b.default)


def expand(backends: list[str] | tuple[str, ...], device: str) -> list[str]:
    """The in-process rows one device gets for the requested backends (HTTP is measured apart)."""
    rows: list[str] = []
    for name in backends:
        backend = BACKENDS[name]
        if not backend.in_process:
            continue
        rows.append(name)
        if device == "cuda":
            rows += list(backend.with_on_cuda)
    return rows


__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "DEVICES", "REQUESTABLE", "Backend", "BackendContext", "Unavailable",
           "backend_label", "bound_runner", "check_cuda_ort", "requestable", "check_cuda_torch", "expand", "torch_call", "torch_input"]
