"""What every writer shares: preparing the module, parity inputs, exporter errors, staged writes,
a quiet exporter.

Each writer (`export.onnx`, `export.torchscript`, `export.program`) follows the same steps:
fold a copy of the model (the caller's module is never touched), export it into a temporary
file beside the target, load that file back with the runtime that will serve it, compare it
with the original eval-mode model, and only then move it into place.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import bnfold
from bnfold import errors
from bnfold.models.spec import ModelSpec

from bnfold.export.errors import ExportError, UnsupportedOpError
from bnfold.export.summary import ArtifactReport


# Parity tolerances on max relative error (max |diff| / max |reference|). Folding is done in
# float64 and stored in float32, which leaves rounding differences around 1e-7..1e-6; float16
# weights keep about 3 decimal digits, and errors grow through a deep network, so 1e-2.
FP32_RTOL = 1e-5
FP16_RTOL = 1e-2

# The batch size of a --static-batch artifact: batch 1 is what the serving benchmark measures.
STATIC_BATCH = 1
# The example batch used while tracing a dynamic-batch artifact. torch.export specializes
# sizes 0 and 1, so tracing with 2 keeps the batch axis symbolic.
TRACE_BATCH = 2
# How many random inputs the parity check uses when no dataset sample is given.
RANDOM_SAMPLES = 16


def output_name(spec: ModelSpec) -> str:
    """`mask` for segmentation models, `logits` for everything else."""
    return "mask" if spec.task == "segmentation" else "logits"


class Float16WithFloat32IO(nn.Module):
    """Runs a float16 module behind float32 edges: callers keep feeding and reading float32."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.float16)).to(torch.float32)


@dataclass
class Prepared:
    """The module to export, the module to compare against, and what folding did."""

    module: nn.Module
    reference: nn.Module
    fold_report: "bnfold.FoldReport | None"
    dtype: str


def reference_module(model: nn.Module) -> nn.Module:
    """The caller's model as a CPU float32 eval-mode module, copied only when it must change."""
    params = list(model.parameters()) + list(model.buffers())
    on_cpu = all(t.device.type == "cpu" for t in params)
    fp32 = all(t.dtype == torch.float32 for t in params if t.is_floating_point())
    if on_cpu and fp32 and not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).cpu().float().eval()


def prepare(model: nn.Module, *, fold: bool, fp16: bool, example: torch.Tensor | None = None,
            batchnorms: Any = None) -> Prepared:
    """Fold (or copy) the model for export; the given module is left exactly as it was. `example`
    is an input of the model's shape: modules of its own are recognized by what they compute on it;
    `batchnorms` declares classes and their adapters (`bnfold.fold`'s)."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module to export, got {type(model).__name__}")
    reference = reference_module(model)
    if fold:
        # bnfold.fold works on a copy, computes in float64 and returns an eval-mode module.
        module, report = bnfold.fold(reference, example_inputs=example, batchnorms=batchnorms)
    else:
        module, report = copy.deepcopy(reference), None
    module = module.cpu().float().eval()
    if fp16:
        module = Float16WithFloat32IO(module.half()).eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return Prepared(module=module, reference=reference, fold_report=report,
                    dtype="float16" if fp16 else "float32")


def example_input(spec: ModelSpec, dynamic_batch: bool) -> torch.Tensor:
    """A float32 input of the spec's shape used to trace the exporters."""
    batch = TRACE_BATCH if dynamic_batch else STATIC_BATCH
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *spec.input_shape, generator=generator)


def batch_dynamic_shapes(dynamic_batch: bool) -> tuple[dict[int, torch.export.Dim], ...] | None:
    """torch.export's `dynamic_shapes` for the one input: a symbolic batch axis, or None (static)."""
    return ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None


def parity_batches(spec: ModelSpec, samples: torch.Tensor | None, *, dynamic_batch: bool,
                   seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """Split the parity inputs into batches, and say where they came from.

    A dynamic-batch artifact sees a batch of 1 and larger batches, which also proves the batch
    axis really is dynamic; a static one sees batches of `STATIC_BATCH`.
    """
    if samples is None:
        generator = torch.Generator().manual_seed(seed)
        samples = torch.randn(RANDOM_SAMPLES, *spec.input_shape, generator=generator)
        source = f"random normal inputs of shape {list(spec.input_shape)}"
    else:
        samples = torch.as_tensor(samples)
        source = f"{samples.shape[0]} given samples"
    expected = tuple(spec.input_shape)
    if samples.ndim != len(expected) + 1 or tuple(samples.shape[1:]) != expected:
        raise ExportError(f"parity samples have shape {list(samples.shape)}, expected "
                          f"[N, {', '.join(map(str, expected))}] from the spec")
    if samples.shape[0] == 0:
        raise ExportError("parity samples are empty: give at least one input")
    samples = samples.detach().float().cpu().contiguous()
    if not dynamic_batch:
        return list(samples.split(STATIC_BATCH)), source
    batches = [samples[:1]]
    if samples.shape[0] > 1:
        batches += list(samples[1:].split(16))
    return batches, source


def float32_runner(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], torch.Tensor]:
    """Run a loaded artifact on float32 input as a caller would.

    `bnfold.compare` casts an `nn.Module`'s input to its parameters' dtype; a float16 artifact
    takes float32 at its edges, so it is handed over as a plain numpy -> tensor function.
    """
    def run(x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return run


def tolerance(fp16: bool) -> float:
    return FP16_RTOL if fp16 else FP32_RTOL


# ---------------------------------------------------------------------------------------------
# Exporter errors


# Patterns that find the operator name in the exporters' messages (dynamo, then legacy).
_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w]+\.[\w]+)\.\w+\]"),
    re.compile(r"operator '([\w:.]+)'"),
    re.compile(r"unrecognized namespace ([\w:.]+)"),
    re.compile(r"Unsupported(?: ONNX)? op(?:erator)?:? '?([\w:.]+)'?"),
)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def unsupported_op(exc: BaseException) -> str | None:
    """The operator an exporter failure is about, as `namespace::name`, when one is named."""
    for error in _exception_chain(exc):
        text = str(error)
        for pattern in _OP_PATTERNS:
            match = pattern.search(text)
            if match:
                op = match.group(1).rstrip(".:")
                return op if "::" in op else op.replace(".", "::", 1)
    return None


def exporter_failure(exc: Exception, spec: ModelSpec, exporter: str,
                     dynamic_batch: bool = False) -> ExportError:
    """One clear error for whatever an exporter raised, naming the operator when there is one."""
    op = unsupported_op(exc)
    if op is not None:
        hint = " or try the other ONNX exporter (--legacy-onnx toggles it)" if "onnx" in exporter else ""
        return UnsupportedOpError(op, f"{exporter} cannot export operator {op!r} of the {spec.arch} "
                                      f"model; replace that operator{hint}")
    hint = ""
    if dynamic_batch and re.search(r"(?i)constraint|specializ|guard", str(exc)):
        hint = " (the model seems to fix its batch size: try --static-batch)"
    cause = errors.first_line(exc, with_type=True, deepest=True)
    return ExportError(f"{exporter} failed on the {spec.arch} model: {cause}{hint}")


# ---------------------------------------------------------------------------------------------
# Writing


def staging_path(target: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `target`: same folder, so the final move is an atomic rename."""
    # Keep the suffix: torch.export.load insists on a name ending in .pt2.
    return target.with_name(f".{target.stem}.{kind}-{uuid.uuid4().hex[:8]}{target.suffix}")


@contextlib.contextmanager
def staged_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; move it into place only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------
# The writer skeleton: prepare -> export -> staged write -> reload -> compare, once for every format


@dataclass(frozen=True)
class FormatSteps:
    """What one format does at the skeleton's steps (`write_verified`)."""

    format: str                                          # "onnx", "torchscript", "program"
    exporter: str                                        # named in reports and exporter errors
    what: str                                            # the artifact in a parity error ({arch}, {dtype})
    export: Callable[[nn.Module, torch.Tensor], Any]     # (module, example input) -> exported object
    save: Callable[[Any, Path], None]                    # exported object -> file
    load: Callable[[Path], Any]                          # file -> something bnfold.compare can run
    static_batch_hint: bool = False                      # say "try --static-batch" on a batch guard


@dataclass(frozen=True)
class WriteOptions:
    """How to write one artifact, whatever its format."""

    fold: bool = True
    fp16: bool = False
    dynamic_batch: bool = True
    verbose: bool = False
    rtol: float | None = None            # None: FP32_RTOL, or FP16_RTOL with float16 weights (--rtol)
    batchnorms: Any = None               # bnfold.fold's batchnorms= (--batchnorm CLASS=ADAPTER), or None


def write_verified(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, steps: FormatSteps,
                   options: WriteOptions, samples: torch.Tensor | None = None) -> tuple[ArtifactReport, Any]:
    """Write one verified artifact at `path`; return its report and what `steps.export` produced.

    The steps every format shares: fold a copy of `model` (`prepare`), export it quietly (any
    exception becomes one `ExportError`, naming the operator when there is one), save it to a
    hidden file beside `path`, load that file back, compare it with the eval-mode `model` on
    `samples` (random inputs when None), and only then move it into place.
    """
    start = time.perf_counter()
    dynamic_batch = options.dynamic_batch
    example = example_input(spec, dynamic_batch)
    prepared = prepare(model, fold=options.fold, fp16=options.fp16, example=example, batchnorms=options.batchnorms)
    # Exported under no_grad, as it will run: a module that picks its inference path from
    # torch.is_grad_enabled() (Dive into Deep Learning's BatchNorm) would otherwise be exported in
    # its training branch.
    with quiet(not options.verbose), torch.no_grad():
        try:
            exported = steps.export(prepared.module, example)
        except ExportError:
            raise
        except Exception as exc:  # the exporters raise many types; all become one clear error
            raise exporter_failure(exc, spec, steps.exporter, steps.static_batch_hint and dynamic_batch) from exc
    batches, source = parity_batches(spec, samples, dynamic_batch=dynamic_batch)
    label = steps.what.format(arch=spec.arch, dtype=prepared.dtype)
    with staged_file(path) as tmp:
        with quiet(not options.verbose):
            steps.save(exported, tmp)
            try:
                runner = steps.load(tmp)
            except Exception as exc:  # e.g. onnxruntime refusing an opset: say so in one line
                raise ExportError(f"the written file cannot be loaded back for the {label}: "
                                  f"{errors.first_line(exc, with_type=True, deepest=True)}") from exc
        with torch.no_grad():
            parity = bnfold.compare(prepared.reference, runner, batches)
        tol = options.rtol if options.rtol is not None else tolerance(options.fp16)
        parity.check(tol, label)
        size = tmp.stat().st_size
    report = ArtifactReport(format=steps.format, path=Path(path), exporter=steps.exporter, dtype=prepared.dtype,
                            dynamic_batch=dynamic_batch, folded=options.fold, parity=parity, tolerance=tol,
                            parity_inputs=source, size_bytes=size,
                            seconds=time.perf_counter() - start, output_name=output_name(spec),
                            fold_report=prepared.fold_report)
    return report, exported


# ---------------------------------------------------------------------------------------------
# Keeping exporters quiet


@dataclass
class Captured:
    """What an exporter printed and warned while it ran quietly."""

    text: str = ""
    warnings: list[str] = field(default_factory=list)

    def tail(self, lines: int = 20) -> str:
        return "\n".join((self.text.strip().splitlines() + self.warnings)[-lines:])


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[Captured]:
    """Capture everything an exporter prints, at the file-descriptor level.

    The dynamo ONNX exporter prints progress lines from Python and the TorchScript-based one
    dumps whole graphs from C++ straight to fd 2, so redirecting `sys.stdout` is not enough.
    Deprecation warnings (torch.jit, the legacy exporter) are recorded rather than shown.
    """
    captured = Captured()
    if not enabled:
        yield captured
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    py_buffer = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with warnings.catch_warnings(record=True) as caught, \
                    contextlib.redirect_stdout(py_buffer), contextlib.redirect_stderr(py_buffer):
                warnings.simplefilter("always")
                try:
                    yield captured
                finally:
                    captured.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text = py_buffer.getvalue() + sink.read().decode("utf-8", "replace")
