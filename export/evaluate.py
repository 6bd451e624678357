"""Accuracy (or foreground IoU) of any bnfold artifact on its dataset's whole eval split.

    report = evaluate_artifacts(["runs/lenet/best.pt", "export/model.onnx", "int8/model.int8.onnx"])
    print(report)           # one table: artifact, kind, weights, metric, samples, size

An artifact is a bnfold checkpoint, a folded module (`bnfold fold --out`), an ONNX file (FP32,
FP16 or INT8), a TorchScript file or a torch.export program. Its spec (dataset, preprocessing,
task) comes from `--checkpoint` when given, else from the artifact itself: a checkpoint holds
one, an ONNX file carries it in its metadata, and a TorchScript or torch.export file is read
with the `export.json` that `bnfold export` wrote beside it.

The metric is the training loop's own: top-1 accuracy for classifiers, foreground IoU (summed
over the whole split, not averaged per image) for the segmentation model, so that a
checkpoint's figure here equals the test figure in its training log.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.models.metrics import task_metric
from bnfold.models.spec import ModelSpec

from bnfold.export.errors import ExportError
from bnfold.export.onnx import cpu_session

# Batch size for running an artifact over the eval split; any size gives the same figure.
EVAL_BATCH = 64

Runner = Callable[[np.ndarray], np.ndarray]


class EvaluationError(ExportError):
    """An artifact that cannot be evaluated (unknown kind, no spec, no eval data)."""


# ---------------------------------------------------------------------------------------------
# The eval split and the metric


@dataclass
class EvalSplit:
    """The whole eval split, preprocessed by the spec: inputs (N, C, H, W) float32 and targets."""

    inputs: np.ndarray
    targets: np.ndarray | None   # class indices (N,), masks (N, 1, H, W) for segmentation; None: unlabelled
    dataset: str
    task: str

    @property
    def samples(self) -> int:
        return int(self.inputs.shape[0])

    def batches(self, batch_size: int = EVAL_BATCH) -> list[np.ndarray]:
        return [self.inputs[i:i + batch_size] for i in range(0, self.samples, batch_size)]


def load_eval_split(spec: ModelSpec, data_root: str | os.PathLike = "data") -> EvalSplit:
    """The eval split of `spec.dataset` through the spec's eval preprocessing (never augmented)."""
    from torch.utils.data import DataLoader

    from bnfold import models

    if not spec.dataset:  # a model from elsewhere, exported with its spec options: no bnfold dataset
        raise EvaluationError("this model's spec names no dataset to evaluate on: pass --eval-data PATH "
                              "(class folders of images for accuracy; unlabelled images, .npy or .npz for "
                              "agreement with the first artifact) or --dataset NAME")
    try:
        _, test = models.load_datasets(spec, str(data_root), download=False, augment=False)
    except models.DatasetError as exc:
        raise EvaluationError(f"the eval split of {spec.dataset!r} is not available: {exc}") from None
    inputs, targets = [], []
    for x, y in DataLoader(test, batch_size=256, shuffle=False, num_workers=0):
        inputs.append(x.float().numpy())
        targets.append(y.numpy())
    if not inputs:
        raise EvaluationError(f"the eval split of {spec.dataset!r} is empty")
    return EvalSplit(np.concatenate(inputs), np.concatenate(targets), spec.dataset, spec.task)


def score(task: str, outputs: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy, or foreground IoU over all pixels of the split (logit > 0 is foreground)."""
    if outputs.shape[0] != targets.shape[0]:
        raise EvaluationError(f"{outputs.shape[0]} outputs for {targets.shape[0]} targets")
    if task == "segmentation":
        pred, truth = outputs > 0, targets > 0.5
        union = float((pred | truth).sum())
        return float((pred & truth).sum()) / max(union, 1.0)
    if outputs.ndim != 2:
        raise EvaluationError(f"a classifier's output should be (N, classes), got shape {list(outputs.shape)}")
    return float((outputs.argmax(axis=1) == targets).mean())


def run_batches(runner: Runner, split: EvalSplit, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """`runner` over the whole split, outputs concatenated (float32)."""
    return np.concatenate([np.asarray(runner(x), dtype=np.float32) for x in split.batches(batch_size)])


# ---------------------------------------------------------------------------------------------
# Loading an artifact


@dataclass
class LoadedArtifact:
    """A runnable artifact: numpy batch in, numpy output out, plus what it is."""

    path: Path
    kind: str
    dtype: str
    runner: Runner
    spec: ModelSpec | None        # its own spec, when the file carries one


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """`export.onnx.cpu_session`, with an `EvaluationError` naming a file onnxruntime cannot load."""
    try:
        return cpu_session(path, threads)
    except Exception as exc:  # onnxruntime raises its own types for corrupt files or bad graphs
        text = str(exc).strip().splitlines()
        raise EvaluationError(f"onnxruntime cannot load {str(path)!r}: {text[0] if text else type(exc).__name__}") from None


def session_runner(session: Any) -> Runner:
    """A numpy float32 batch -> first output function for an onnxruntime session."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def module_runner(module: Callable[[torch.Tensor], Any]) -> Runner:
    """A numpy float32 batch -> float32 output function for a torch module (TorchScript, program too)."""
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().numpy()
    return run


def onnx_weights_dtype(model: Any) -> str:
    """`int8` for a quantized graph, `float16` for half weights, else `float32`."""
    ops = {node.op_type for node in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger"}:
        return "int8"
    import onnx

    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return "float16"
    return "float32"


def _module_dtype(module: torch.nn.Module) -> str:
    from bnfold.parity import module_dtype

    return str(module_dtype(module)).replace("torch.", "")


# The loader's kind names, as the evaluation table says them.
_KIND_NAMES = {"pickle": "module", "state_dict": "module"}


def load_artifact(path: str | os.PathLike, threads: int | None = None, *, trust_pickle: bool = False,
                  model_class: str | None = None, model_args: str | None = None,
                  weights: str | os.PathLike | None = None) -> LoadedArtifact:
    """Open any artifact bnfold writes as a runner; its kind is detected from the file's bytes
    (`models.loader`). A pickled module (`bnfold fold --out`) is unpickled only with `trust_pickle`;
    a state_dict needs `model_class` (and `model_args`), torchvision:NAME / timm:NAME take `weights`."""
    from bnfold.models.loader import detect_kind, load_model

    path = Path(path)
    if path.is_file() and detect_kind(path) == "onnx":
        from bnfold.export.onnx import read_spec
        from bnfold.onnx_fold import load_onnx

        proto = load_onnx(path, load_external_data=False, error=ExportError)
        try:
            spec = read_spec(proto)
        except ExportError:
            spec = None
        return LoadedArtifact(path, "onnx", onnx_weights_dtype(proto),
                              session_runner(onnx_session(path, threads)), spec)
    loaded = load_model(path, trust_pickle=trust_pickle, model_class=model_class, model_args=model_args,
                        weights=weights)
    module = loaded.module
    if module is None:  # pragma: no cover - the loader gives a module for every non-ONNX kind
        raise EvaluationError(f"{str(path)!r}: nothing to run")
    # The loader hands out eval-mode modules (a torch.export module refuses .eval() altogether).
    dtype = "float32" if loaded.kind == "checkpoint" else _module_dtype(module)
    if loaded.kind == "checkpoint":
        module = module.float()
    return LoadedArtifact(path, _KIND_NAMES.get(loaded.kind, loaded.kind), dtype, module_runner(module),
                          loaded.spec)


def _size(path: str | os.PathLike, weights: str | os.PathLike | None) -> int:
    """The artifact's bytes on disk; for torchvision:NAME / timm:NAME, which is no file, its --weights file's."""
    for candidate in (path, weights):
        if candidate is not None and Path(candidate).is_file():
            return Path(candidate).stat().st_size
    return 0


def spec_beside(path: Path) -> ModelSpec | None:
    """The spec in the `export.json` that `bnfold export` wrote next to `path`, if there is one."""
    record = path.parent / "export.json"
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        return ModelSpec.from_dict(data["spec"])
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Evaluating


@dataclass
class Evaluation:
    """One artifact's figure on the eval split."""

    artifact: Path
    kind: str
    dtype: str
    metric: str                  # "accuracy" or "iou"
    value: float
    samples: int
    dataset: str
    size_bytes: int
    seconds: float
    spec_source: str             # where the spec (dataset, preprocessing) came from
    logged: float | None = None  # the training log's test figure for the spec's checkpoint
    output_error: float | None = None   # unlabelled data: ||out - first|| / ||first||

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["artifact"] = str(self.artifact)
        return data


@dataclass
class EvaluationReport:
    rows: list[Evaluation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "bnfold-evaluate", "results": [row.to_dict() for row in self.rows]}

    def row(self, artifact: str | os.PathLike) -> Evaluation:
        for row in self.rows:
            if row.artifact == Path(artifact):
                return row
        raise KeyError(str(artifact))

    def __str__(self) -> str:
        # Unlabelled data: the second figure is the output error against the first artifact.
        errors = any(r.output_error is not None for r in self.rows)
        header = ("artifact", "kind", "weights", "metric", "value", "output error" if errors else "training log",
                  "samples", "dataset", "size", "seconds")
        lines = [header]
        for r in self.rows:
            second = r.output_error if errors else r.logged
            lines.append((str(r.artifact), r.kind, r.dtype, r.metric, f"{r.value:.4f}",
                          "–" if second is None else f"{second:.4f}", str(r.samples), r.dataset,
                          format_size(r.size_bytes), f"{r.seconds:.1f}"))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) if i in (0, 1, 2, 3, 7) else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(row, widths))) for row in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(text)


def format_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _resolve_spec(loaded: LoadedArtifact, given: ModelSpec | None, dataset: str | None) -> tuple[ModelSpec, str]:
    if given is not None:
        spec, source = given, "--checkpoint"
    elif loaded.spec is not None:
        spec, source = loaded.spec, "ONNX metadata" if loaded.kind == "onnx" else "checkpoint"
    else:
        spec, source = spec_beside(loaded.path), "export.json beside it"
        if spec is None:
            raise EvaluationError(f"{str(loaded.path)!r} ({loaded.kind}) carries no model spec and there is "
                                  "no export.json beside it: pass --checkpoint with the checkpoint it came from, or give it "
                                  f"a spec with `bnfold export {loaded.path} --out DIR` (--labels, --mean, --std) "
                                  "and evaluate DIR/model.onnx")
    if dataset is not None and dataset != spec.dataset:
        spec = dataclasses.replace(spec, dataset=dataset)
        source += f", dataset {dataset!r}"
    return spec, source


def evaluate_artifacts(paths: Sequence[str | os.PathLike], *, checkpoint: str | os.PathLike | None = None,
                       dataset: str | None = None, data_root: str | os.PathLike = "data",
                       batch_size: int = EVAL_BATCH, threads: int | None = None,
                       trust_pickle: bool = False, model_class: str | None = None,
                       model_args: str | None = None, weights: str | os.PathLike | None = None,
                       eval_data: str | os.PathLike | None = None) -> EvaluationReport:
    """Evaluate every artifact on the whole eval split of its dataset, in the order given.

    `eval_data` replaces the dataset (`export.user_data`): class folders of images (or a .npz with
    labels) give each artifact's accuracy on them; unlabelled images, .npy or .npz give each
    artifact's top-1 agreement with the first artifact and its output error against it
    (||out - first|| / ||first||), the figures INT8's agreement gate uses.

    `checkpoint` supplies the spec for artifacts that carry none (and overrides theirs);
    `dataset` evaluates on another dataset than the spec's (same preprocessing and labels);
    `trust_pickle` allows unpickling a whole saved module (it runs code from the file);
    `model_class`, `model_args` and `weights` are `models.load_model`'s, for state_dicts and
    torchvision:NAME / timm:NAME artifacts.
    The eval split is loaded once per distinct (dataset, preprocessing).
    """
    from bnfold import models

    if not paths:
        raise EvaluationError("give at least one artifact to evaluate")
    if batch_size < 1:
        raise EvaluationError(f"batch size must be at least 1, got {batch_size}")
    given = None
    if checkpoint is not None:
        if not models.is_checkpoint(checkpoint):
            raise EvaluationError(f"--checkpoint {str(checkpoint)!r} is not a bnfold checkpoint")
        _, given = models.load_checkpoint(checkpoint)
    splits: dict[str, EvalSplit] = {}
    reference: tuple[Path, np.ndarray] | None = None   # the first artifact's outputs on unlabelled data
    report = EvaluationReport()
    for path in paths:
        loaded = load_artifact(path, threads, trust_pickle=trust_pickle, model_class=model_class,
                               model_args=model_args, weights=weights)
        spec, source = _resolve_spec(loaded, given, dataset)
        key = json.dumps([spec.dataset, spec.task, spec.input_shape, dataclasses.asdict(spec.preprocess)],
                         sort_keys=True)
        if key not in splits:
            splits[key] = load_eval_split(spec, data_root) if eval_data is None else _user_split(eval_data, spec)
        split = splits[key]
        start = time.perf_counter()
        try:
            outputs = run_batches(loaded.runner, split, batch_size)
        except EvaluationError:
            raise
        except Exception as exc:  # a runtime refusing the input shape, a module failing: one line
            text = str(exc).strip().splitlines()
            raise EvaluationError(f"running {str(loaded.path)!r} on {split.samples} {spec.dataset!r} inputs "
                                  f"of shape {list(split.inputs.shape[1:])} failed: "
                                  f"{type(exc).__name__}: {text[0] if text else ''}") from None
        if split.targets is None:  # unlabelled: agreement with the first artifact
            if reference is None:
                reference = (Path(path), outputs)
            metric, value, error = _agreement(reference, outputs)
            logged = None
        else:
            metric, value, error = task_metric(spec.task), score(spec.task, outputs, split.targets), None
            logged = (spec.metrics.get(f"test_{metric}") if eval_data is None and (dataset is None or
                                                                                  dataset == spec.dataset) else None)
        report.rows.append(Evaluation(
            artifact=Path(path), kind=loaded.kind, dtype=loaded.dtype, metric=metric,
            value=value, samples=split.samples, dataset=split.dataset if eval_data is not None else spec.dataset,
            size_bytes=_size(path, weights), seconds=time.perf_counter() - start, spec_source=source,
            logged=float(logged) if logged is not None else None, output_error=error))
    return report


def _user_split(path: str | os.PathLike, spec: ModelSpec) -> EvalSplit:
    from bnfold.export.user_data import load_user_data

    data = load_user_data(path, spec, option="--eval-data")
    return EvalSplit(data.inputs, data.labels, str(path), "classification" if data.labels is not None else spec.task)


def _agreement(reference: tuple[Path, np.ndarray], outputs: np.ndarray) -> tuple[str, float, float]:
    """Top-1 agreement with the first artifact's outputs (per position beyond 2-D) and the output error."""
    first, ref = reference
    if ref.shape != outputs.shape:
        raise EvaluationError(f"outputs of shape {list(outputs.shape[1:])} cannot be compared with those of "
                              f"{str(first)!r} ({list(ref.shape[1:])})")
    agree = float((ref.argmax(axis=1) == outputs.argmax(axis=1)).mean()) if ref.ndim >= 2 else 1.0
    return f"agreement with {first.name}", agree, output_error(ref, outputs)


def output_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||candidate - reference|| / ||reference|| over all outputs (10^(-SQNR/20)): quantization noise
    against signal, which one outlying logit does not dominate as a maximum would."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    return float(np.linalg.norm(cand - ref) / max(float(np.linalg.norm(ref)), 1e-30))


__all__ = ["EvalSplit", "Evaluation", "EvaluationError", "EvaluationReport", "LoadedArtifact",
           "evaluate_artifacts", "load_artifact", "load_eval_split", "module_runner",
           "onnx_session", "output_error", "run_batches", "score", "session_runner"]
