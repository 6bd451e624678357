"""Triton Inference Server model repository: `DIR/<name>/1/model.onnx` + `DIR/<name>/config.pbtxt`.

The same verified ONNX file then runs on Triton or KServe (both load this layout) when one
machine is not enough; bnfold's own server loads it too (highest numeric version folder).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold.models.spec import MAX_BATCH_SIZE, MODEL_NAME_PATTERN, ModelSpec, triton_model_config

from bnfold.export._common import staging_path
from bnfold.export.errors import ExportError
from bnfold.onnx_fold import load_onnx

# ONNX TensorProto element type -> the datatype name Triton's ModelConfig uses after "TYPE_".
_DATATYPES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.BFLOAT16: "BF16", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
}
_DEVICES = {"cpu": "cpu", "cuda": "cuda", "gpu": "cuda"}
_NAME = re.compile(MODEL_NAME_PATTERN)   # the rule serve.repository holds a repository's names to
LABELS_FILE = "labels.txt"


def _tensor(value: onnx.ValueInfoProto) -> tuple[str, str, list[int]]:
    """(name, datatype, shape with -1 for a free dimension) of a graph input or output."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in _DATATYPES:
        raise ExportError(f"tensor {value.name!r} has ONNX element type {tensor.elem_type}, "
                          "which has no Triton data type here")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return value.name, _DATATYPES[tensor.elem_type], dims


def _is_batching(model: onnx.ModelProto) -> bool:
    """True when the first axis of the first input is symbolic (a dynamic batch axis)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def _tensor_block(kind: str, tensors: list[dict], label_file: str | None) -> str:
    entries = []
    for t in tensors:
        lines = [f'    name: "{t["name"]}"', f"    data_type: {t['data_type']}",
                 f"    dims: [ {', '.join(str(d) for d in t['dims'])} ]"]
        if label_file is not None:
            lines.append(f'    label_filename: "{label_file}"')
        entries.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def triton_config(model: onnx.ModelProto, name: str, *, device: str = "cpu",
                  max_batch_size: int = MAX_BATCH_SIZE, labels: bool = False) -> str:
    """The `config.pbtxt` text for an ONNX model (Triton's ModelConfig in protobuf text format).

    The fields are `models.spec.triton_model_config`'s (what `bnfold serve` answers at /config);
    this adds the label file, dynamic batching and the version policy. A model whose batch axis
    is fixed gets `max_batch_size: 0` and full dims, as Triton requires.
    """
    target = _DEVICES.get(device.split(":")[0].lower()) if isinstance(device, str) else None
    if target is None:
        raise ExportError(f"unknown Triton device {device!r}; choose from: cpu, cuda")
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ExportError(f"max_batch_size must be a non-negative integer, got {max_batch_size!r}")
    batching = _is_batching(model) and max_batch_size > 0
    config = triton_model_config(name, [_tensor(v) for v in model.graph.input],
                                 [_tensor(v) for v in model.graph.output],
                                 max_batch_size=max_batch_size if batching else 0, device=target)
    [group] = config["instance_group"]
    parts = [f'name: "{config["name"]}"', f'platform: "{config["platform"]}"',
             f"max_batch_size: {config['max_batch_size']}",
             _tensor_block("input", config["input"], None),
             _tensor_block("output", config["output"], LABELS_FILE if labels else None)]
    if batching:
        # A short queue delay lets concurrent batch-1 requests share one run.
        parts.append("dynamic_batching {\n  max_queue_delay_microseconds: 100\n}")
    parts.append(f"instance_group [\n  {{\n    count: {group['count']}\n    kind: {group['kind']}\n  }}\n]")
    parts.append("version_policy: { latest: { num_versions: 1 } }")
    return "\n".join(parts) + "\n"


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):   # fullmatch: `$` let "name\n" through
        raise ExportError(f"invalid Triton model name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def default_model_name(spec: ModelSpec) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", spec.arch) or "model"


def write_triton_model(onnx_path: str | os.PathLike, spec: ModelSpec, model_dir: str | os.PathLike,
                       *, name: str, device: str = "cpu", max_batch_size: int = MAX_BATCH_SIZE) -> Path:
    """Write one Triton model folder at `model_dir` (which must not exist yet); no staging."""
    onnx_path, model_dir = Path(onnx_path), Path(model_dir)
    model = load_onnx(onnx_path, load_external_data=False, error=ExportError)
    labeled = spec.task == "classification" and bool(spec.labels)
    config = triton_config(model, name, device=device, max_batch_size=max_batch_size,
                           labels=labeled)
    (model_dir / "1").mkdir(parents=True)
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(config)
    if labeled:  # Triton's classification extension reads one label per line
        (model_dir / LABELS_FILE).write_text("\n".join(spec.labels) + "\n")
    return model_dir


def write_triton_repo(onnx_path: str | os.PathLike, spec: ModelSpec, repo_dir: str | os.PathLike,
                      *, name: str | None = None, device: str = "cpu",
                      max_batch_size: int = MAX_BATCH_SIZE) -> Path:
    """Add the ONNX model to a Triton model repository and return `repo_dir/<name>`.

    `name` defaults to the spec's architecture. An existing `repo_dir/<name>` is replaced as a
    whole, and only once the new folder is complete (written beside it, then renamed).
    """
    name = check_model_name(name or default_model_name(spec))
    target = Path(repo_dir) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_path(target)
    try:
        write_triton_model(onnx_path, spec, staged, name=name, device=device,
                           max_batch_size=max_batch_size)
        replace_dir(staged, target)
    finally:
        if staged.exists():
            shutil.rmtree(staged)
    return target


@dataclass
class StagedExport:
    """The hidden folders an export writes into; `staged_export` renames them into place."""
    folder: Path                 # becomes the output folder
    triton_target: Path | None   # REPO/<name>, when a Triton model folder is written too
    triton_folder: Path | None   # the hidden sibling that becomes `triton_target`

    def write_triton(self, onnx_path: Path, spec: ModelSpec, *, device: str, dynamic_batch: bool) -> None:
        """Stage the Triton model folder for `onnx_path`; nothing when no Triton target was given."""
        if self.triton_folder is None or self.triton_target is None:
            return
        self.triton_folder.parent.mkdir(parents=True, exist_ok=True)
        write_triton_model(onnx_path, spec, self.triton_folder, name=self.triton_target.name, device=device,
                           max_batch_size=MAX_BATCH_SIZE if dynamic_batch else 0)


@contextlib.contextmanager
def staged_export(out_dir: Path, triton_target: Path | None) -> Iterator[StagedExport]:
    """Yield hidden folders beside `out_dir` (and `triton_target`): all or nothing.

    When the block succeeds both are renamed into place; otherwise they are removed and the
    output folder and the Triton repository are left as they were.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = StagedExport(staging_path(out_dir), triton_target,
                          staging_path(triton_target) if triton_target is not None else None)
    try:
        staged.folder.mkdir()
        yield staged
        replace_dir(staged.folder, out_dir)
        if staged.triton_folder is not None and triton_target is not None:
            replace_dir(staged.triton_folder, triton_target)
    finally:
        for path in (staged.folder, staged.triton_folder):
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move folder `source` to `target`, replacing an existing `target` only after the move."""
    old = None
    if target.exists():
        old = staging_path(target, "old")
        os.replace(target, old)
    try:
        os.replace(source, target)
    except OSError:
        if old is not None:  # put the previous folder back
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["write_triton_repo", "write_triton_model", "triton_config", "default_model_name",
           "check_model_name", "replace_dir", "staged_export", "StagedExport"]
