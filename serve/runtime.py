"""onnxruntime sessions for serving: explicit providers and threads, no silent CPU fallback.

`open_session(path, device)` returns a `ModelRuntime`: the session, what its one input and its
outputs look like in Open Inference Protocol terms (datatype names, shapes with -1 for dynamic
dimensions), the bnfold spec read back from the file's metadata, and a `run_all(x)` that is as
short as onnxruntime allows. The app depends only on the `Runtime` protocol below, never on
onnxruntime: another kind of session only has to provide those names.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import onnxruntime as ort

from bnfold.options import DEVICES, available_cpus, resolve_threads  # --threads 0's CPUs, one definition
from bnfold.sessions import session_options
from bnfold.models.spec import MAX_BATCH_SIZE, SPEC_METADATA_KEY, ModelSpec, SpecVersionError
from bnfold.serve.errors import DeviceUnavailableError, ServeError
from bnfold.serve.scheduler import Scheduling

# A request whose estimated run time is under this runs inside the event loop: a thread hop costs
# about 50-100 us on a 2-core box, several times what onnxruntime needs for LeNet (~30 us).
# Slower requests go to a worker thread so that health checks and metrics keep answering. The
# estimate is the batch-1 warm-up time times the batch size (see `ModelRuntime.inline_batch`).
INLINE_THRESHOLD_MS = 1.0

# Open Inference Protocol datatype names <-> onnxruntime type strings <-> numpy dtypes.
_ORT_TO_V2 = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}
V2_TO_NUMPY: dict[str, np.dtype] = {
    "FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16), "FP64": np.dtype(np.float64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
}
KNOWN_DATATYPES = frozenset(V2_TO_NUMPY) | {"BYTES", "BF16"}


@dataclass(frozen=True)
class TensorMeta:
    """One model input or output as the Open Inference Protocol describes it."""

    name: str
    datatype: str          # "FP32", "INT64", ...
    shape: list[int]       # -1 for every dynamic dimension

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Runtime(Protocol):
    """What the HTTP app needs of a loaded model (`ModelRuntime` is the onnxruntime one).

    `max_batch_size` is the largest batch a request may carry (0: the batch axis is fixed, the
    shape check alone applies); a request of batch at most `inline_batch` runs on the event loop,
    a larger one in a worker thread.
    """

    name: str
    version: str
    device: str
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    spec: ModelSpec | None
    max_batch_size: int
    inline_batch: int

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output for input `x`, in `outputs` order."""
        ...

    def details(self) -> dict[str, Any]:
        """Runtime-specific facts for the metadata document and the start-up log (JSON-able)."""
        ...


def _meta(arg: ort.NodeArg) -> TensorMeta:
    datatype = _ORT_TO_V2.get(arg.type)
    if datatype is None:
        raise ServeError(f"{arg.name!r} has type {arg.type}, which the service cannot carry", status=500)
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
    return TensorMeta(arg.name, datatype, shape)


def _read_spec(session: ort.InferenceSession, path: Path) -> ModelSpec | None:
    text = session.get_modelmeta().custom_metadata_map.get(SPEC_METADATA_KEY)
    if text is None:
        return None
    try:
        return ModelSpec.from_json(text)
    except SpecVersionError as exc:  # valid, but from a newer bnfold: say that, not "not valid"
        raise ServeError(f"{path}: {exc}", status=500) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ServeError(f"{path}: metadata {SPEC_METADATA_KEY!r} is not a valid bnfold spec ({exc})",
                         status=500) from exc


@dataclass
class ModelRuntime:
    """A loaded model: its session, protocol metadata, spec and a `run` for numpy arrays."""

    name: str
    path: Path
    session: ort.InferenceSession
    device: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    spec: ModelSpec | None
    version: str = "1"
    threads: int = 1
    cuda_graph: bool = False
    max_batch_size: int = MAX_BATCH_SIZE   # 0 when the batch axis is fixed
    warmup_ms: float = 0.0
    inline_batch: int = 1          # largest batch run in the event loop (0: every request in a thread)
    # instance_group / dynamic_batching from config.pbtxt or options; serve.scheduler follows it
    scheduling: Scheduling = field(default_factory=Scheduling)
    _runner: Callable[[np.ndarray], list[np.ndarray]] | None = field(default=None, repr=False)

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    @property
    def input_dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.inputs[0].datatype]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def platform(self) -> str:
        return "onnxruntime_onnx"

    def details(self) -> dict[str, Any]:
        return {"providers": self.providers, "threads": self.threads, "warmup_ms": round(self.warmup_ms, 4),
                "path": str(self.path),
                # the rest of the ONNX metadata (fold summary, parity, ...), for the page's cards
                "metadata": {k: v for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                             if k != SPEC_METADATA_KEY}}

    def run(self, x: np.ndarray) -> np.ndarray:
        """The first output for input `x` (numpy in, numpy out, on the host)."""
        return self._runner(x)[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output, in the model's order."""
        return self._runner(x)

    def replica(self) -> ModelRuntime:
        """Another session of the same file with the same options: one more instance of an instance group."""
        twin = open_session(self.path, self.device, threads=self.threads, cuda_graph=self.cuda_graph,
                            name=self.name, version=self.version, max_batch_size=self.max_batch_size)
        twin.spec = self.spec
        twin.scheduling = self.scheduling
        return twin

    def sample_input(self, batch: int = 1) -> np.ndarray:
        """Zeros of the input's shape with the batch (and any other dynamic dimension) set."""
        shape = [batch if i == 0 and d == -1 else (d if d != -1 else 1)
                 for i, d in enumerate(self.inputs[0].shape)]
        return np.zeros(shape, dtype=self.input_dtype)


Runner = Callable[[np.ndarray], list[np.ndarray]]


def _cpu_runner(session: ort.InferenceSession, input_name: str, output_names: list[str]) -> Runner:
    run = session.run

    def runner(x: np.ndarray) -> list[np.ndarray]:
        return run(output_names, {input_name: x})
    return runner


def _cuda_runner(session: ort.InferenceSession, input_name: str, output_names: list[str]) -> Runner:
    """IO binding: the input is copied to the GPU once, outputs stay there until fetched."""

    def runner(x: np.ndarray) -> list[np.ndarray]:
        binding = session.io_binding()
        binding.bind_cpu_input(input_name, np.ascontiguousarray(x))
        for name in output_names:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
    return runner


def _cuda_graph_runner(session: ort.InferenceSession, inputs: list[TensorMeta],
                       outputs: list[TensorMeta], model: str) -> Runner:
    """Fixed device buffers bound once; every run replays the captured CUDA graph.

    onnxruntime captures the graph on the first `run_with_iobinding` and replays it while the
    bound addresses stay the same, so the input is written in place and shapes cannot change.
    """
    def batch_one(shape: list[int]) -> list[int]:
        return [1 if (i == 0 and d == -1) else d for i, d in enumerate(shape)]

    in_meta = inputs[0]
    in_shape = batch_one(in_meta.shape)
    out_shapes = [batch_one(o.shape) for o in outputs]
    if -1 in in_shape or any(-1 in s for s in out_shapes):
        raise ServeError(f"--cuda-graph needs fixed shapes apart from the batch; model {model!r} has "
                         f"input {in_meta.shape} and outputs {[o.shape for o in outputs]}", status=500)
    x_dev = ort.OrtValue.ortvalue_from_shape_and_type(in_shape, V2_TO_NUMPY[in_meta.datatype], "cuda", 0)
    outs = [ort.OrtValue.ortvalue_from_shape_and_type(s, V2_TO_NUMPY[o.datatype], "cuda", 0)
            for s, o in zip(out_shapes, outputs)]
    binding = session.io_binding()
    binding.bind_ortvalue_input(in_meta.name, x_dev)
    for meta, value in zip(outputs, outs):
        binding.bind_ortvalue_output(meta.name, value)
    expected = tuple(in_shape)

    def runner(x: np.ndarray) -> list[np.ndarray]:
        if x.shape != expected:
            raise ServeError(f"model {model!r} runs a captured CUDA graph for shape {list(expected)}; "
                             f"got {list(x.shape)}")
        x_dev.update_inplace(np.ascontiguousarray(x))
        session.run_with_iobinding(binding)
        return [value.numpy() for value in outs]
    return runner


def _session_options(threads: int) -> ort.SessionOptions:
    # Spinning workers burn the shared cores the HTTP loop needs; batch-1 work is too short to gain.
    return session_options(threads, spin=False)


def _load_cuda_libraries() -> None:
    """Make the CUDA and cuDNN libraries that pip installed (with torch) visible to onnxruntime.

    onnxruntime-gpu looks for them only on the dynamic loader's path; importing torch loads the
    copies from the nvidia-* wheels, and onnxruntime 1.21+ can also preload them itself. Neither
    is fatal: when both fail, the provider check after the session is built says what is missing.
    """
    try:
        import torch  # noqa: F401  (imported for its side effect: loading libcudart/libcudnn)
    except ImportError:
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()


def _cuda_providers(cuda_graph: bool) -> list[Any]:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise DeviceUnavailableError(
            f"device 'cuda' asked for, but this onnxruntime {ort.__version__} build has no "
            f"CUDAExecutionProvider (it offers {available}); install the GPU build: "
            f"pip uninstall -y onnxruntime && pip install onnxruntime-gpu (or 'bnfold[gpu]')")
    _load_cuda_libraries()
    options: dict[str, str] = {"device_id": "0"}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def _warm_up(runtime: ModelRuntime, rounds: int = 7) -> None:
    """Run before reporting ready: first runs allocate arenas and pick kernels (cuDNN autotune)."""
    x = runtime.sample_input(1)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        runtime.run_all(x)
        times.append((time.perf_counter() - start) * 1e3)
    runtime.warmup_ms = statistics.median(times[2:] if len(times) > 3 else times)
    # Run time grows about linearly with the batch past the fixed per-call cost, so this
    # under-estimates how many fit under the threshold: a large batch never lands on the loop.
    runtime.inline_batch = int(INLINE_THRESHOLD_MS // runtime.warmup_ms) if runtime.warmup_ms > 0 else 1


def _check_options(path: Path, device: str, threads: int | None, cuda_graph: bool) -> int:
    """Validate the options before anything is loaded; returns the thread count to use."""
    if device not in DEVICES:
        raise ServeError(f"device must be 'cpu' or 'cuda', got {device!r}", status=500)
    if cuda_graph and device != "cuda":
        raise ServeError("--cuda-graph needs --device cuda", status=500)
    if not path.is_file():
        raise ServeError(f"model file not found: {path}", status=500)
    threads = resolve_threads(threads)   # None or 0: every CPU this process may use
    if threads < 1:
        raise ServeError(f"threads must be 0 (the CPUs this process may use) or more, got {threads}", status=500)
    return threads


def _build_session(path: Path, device: str, threads: int, cuda_graph: bool) -> ort.InferenceSession:
    """The onnxruntime session on `device`, or a clear error (CUDA really active, never a fallback)."""
    providers: list[Any] = _cuda_providers(cuda_graph) if device == "cuda" else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), _session_options(threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for corrupt files or bad graphs
        if device == "cuda" and cuda_graph:
            raise DeviceUnavailableError(f"{path}: onnxruntime could not build a CUDA-graph session "
                                         f"(every node must run on CUDA): {exc}") from exc
        raise ServeError(f"{path}: onnxruntime cannot load this file: {exc}", status=500) from exc
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise DeviceUnavailableError(
            f"device 'cuda' asked for, but CUDAExecutionProvider failed to load (session providers: "
            f"{session.get_providers()}); this usually means the CUDA or cuDNN libraries do not match "
            f"the onnxruntime-gpu {ort.__version__} build, or no GPU is visible")
    return session


def _read_metadata(session: ort.InferenceSession, path: Path) -> tuple[list[TensorMeta], list[TensorMeta],
                                                                       ModelSpec | None]:
    """Inputs and outputs in protocol terms and the bnfold spec; refuses what requests cannot carry."""
    inputs = [_meta(a) for a in session.get_inputs()]
    outputs = [_meta(a) for a in session.get_outputs()]
    if len(inputs) != 1:
        raise ServeError(f"{path}: the service handles models with exactly one input, this one has "
                         f"{[i.name for i in inputs]}", status=500)
    if inputs[0].datatype not in V2_TO_NUMPY:
        raise ServeError(f"{path}: input {inputs[0].name!r} is {inputs[0].datatype}, which requests cannot "
                         f"carry as a numpy array; the service takes {sorted(V2_TO_NUMPY)}", status=500)
    return inputs, outputs, _read_spec(session, path)


def _choose_runner(session: ort.InferenceSession, device: str, cuda_graph: bool, inputs: list[TensorMeta],
                   outputs: list[TensorMeta], name: str) -> Runner:
    if device == "cuda" and cuda_graph:
        return _cuda_graph_runner(session, inputs, outputs, name)
    if device == "cuda":
        return _cuda_runner(session, inputs[0].name, [o.name for o in outputs])
    return _cpu_runner(session, inputs[0].name, [o.name for o in outputs])


def open_session(path: str | os.PathLike, device: str = "cpu", *, threads: int | None = None,
                 cuda_graph: bool = False, name: str | None = None, version: str = "1",
                 max_batch_size: int | None = None, warmup: bool = True) -> ModelRuntime:
    """Load an ONNX file for serving on `device` ("cpu" or "cuda"), warmed up and checked.

    threads: onnxruntime intra-op threads (default `available_cpus()`). For "cuda" the session
    must really run on CUDAExecutionProvider, otherwise `DeviceUnavailableError` says what is
    missing; `cuda_graph` captures a CUDA graph for the batch-1 shape. `max_batch_size` is the
    largest batch a request may carry (default `MAX_BATCH_SIZE`; 0 for a fixed batch axis).
    """
    path = Path(path)
    threads = _check_options(path, device, threads, cuda_graph)
    session = _build_session(path, device, threads, cuda_graph)
    inputs, outputs, spec = _read_metadata(session, path)
    if name is None:
        name = spec.arch if spec is not None else path.stem
    dynamic_batch = bool(inputs[0].shape) and inputs[0].shape[0] == -1
    batch_limit = (MAX_BATCH_SIZE if max_batch_size is None else max_batch_size) if dynamic_batch else 0
    runtime = ModelRuntime(name=name, path=path, session=session, device=device, inputs=inputs,
                           outputs=outputs, spec=spec, version=str(version), threads=threads,
                           cuda_graph=cuda_graph, max_batch_size=batch_limit,
                           _runner=_choose_runner(session, device, cuda_graph, inputs, outputs, name))
    if warmup:
        try:
            _warm_up(runtime)
        except Exception as exc:
            raise ServeError(f"{path}: warm-up run failed on {device}: {exc}", status=500) from exc
    return runtime
