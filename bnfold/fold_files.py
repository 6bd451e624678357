"""File-to-file folding behind `bnfold fold` and `bnfold fold-onnx`: load, fold, prove, write.

Nothing is written unless the folded model matches the original within the tolerance.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bnfold.adapters import Adapter
from bnfold.errors import BnfoldError, first_line
from bnfold.fx_fold import count_batchnorm, fold
from bnfold.onnx_fold import count_onnx_batchnorm, fold_onnx, graph_inputs, load_onnx
from bnfold.parity import Parity, compare, module_dtype
from bnfold.sessions import cpu_session
from bnfold.fold_report import FoldReport

__all__ = ["FoldOutcome", "fold_and_save", "fold_onnx_file", "onnx_input_shape"]

_SHAPE_HINT = "give it with --input-shape, e.g. --input-shape 1,3,32,32"


@dataclass
class FoldOutcome:
    """What a file fold did: the report, the parity, BN counts and where the result went."""

    report: FoldReport
    parity: Parity
    batchnorm_before: int
    batchnorm_after: int
    input_shape: tuple[int, ...]
    out: Path

    def __str__(self) -> str:
        return (f"{self.report}\n{self.parity}\nBatchNorm left: {self.batchnorm_after} of "
                f"{self.batchnorm_before} (input shape {','.join(map(str, self.input_shape))})\n"
                f"wrote {self.out}")


def fold_and_save(model: nn.Module, out: str | os.PathLike, *, input_shape: Sequence[int] | None,
                  rtol: float = 1e-5, samples: int = 8, seed: int = 0,
                  batchnorms: Mapping[type, Adapter] | None = None) -> FoldOutcome:
    """Fold `model`, compare it with the original on `samples` random batches of `input_shape`
    (batch included), and `torch.save` the folded module to `out` when the parity holds.

    The first batch is also the fold's example input: modules of the model's own are recognized
    as BatchNorms by what they compute on the input the model feeds them. `batchnorms` declares
    classes and their adapters (`bnfold.fold`'s).
    """
    if input_shape is None:
        raise BnfoldError(f"the input shape of this model is unknown: {_SHAPE_HINT}")
    shape = tuple(int(d) for d in input_shape)
    if samples < 1:
        raise BnfoldError(f"--samples must be at least 1, got {samples}")
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    dtype = module_dtype(model)
    inputs = [torch.randn(shape, generator=generator).to(dtype) for _ in range(samples)]
    folded, report = fold(model, example_inputs=inputs[0], batchnorms=batchnorms)
    try:
        parity = compare(model, folded, inputs)
    except BnfoldError:
        raise
    except Exception as exc:  # the model itself rejected the inputs: almost always a wrong shape
        raise BnfoldError(f"the model failed on inputs of shape {list(shape)} ({type(exc).__name__}: "
                          f"{first_line(exc, limit=200)}); {_SHAPE_HINT}") from None
    parity.check(rtol, "the folded model")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(folded, out)
    return FoldOutcome(report, parity, count_batchnorm(model, batchnorms=batchnorms, example_inputs=inputs[0]),
                       count_batchnorm(folded, batchnorms=batchnorms, example_inputs=inputs[0]), shape, out)


_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
             onnx.TensorProto.DOUBLE: np.float64}


def onnx_input_shape(model: onnx.ModelProto, input_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """The first graph input's shape: a symbolic first (batch) axis becomes 1; any other
    symbolic axis needs `input_shape`."""
    if input_shape is not None:
        return tuple(int(d) for d in input_shape)
    inputs = graph_inputs(model)
    if not inputs:
        raise BnfoldError("the ONNX graph has no inputs (only initializers)")
    first = inputs[0]
    dims = []
    for axis, dim in enumerate(first.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(dim.dim_value)
        elif axis == 0:
            dims.append(1)
        else:
            raise BnfoldError(f"input {first.name!r} has a symbolic axis {axis} ({dim.dim_param or '?'}): "
                              f"{_SHAPE_HINT}")
    return tuple(dims)


def fold_onnx_file(src: str | os.PathLike, dst: str | os.PathLike, *, input_shape: Sequence[int] | None = None,
                   rtol: float = 1e-5, samples: int = 8, seed: int = 0) -> FoldOutcome:
    """Fold an ONNX file, compare both graphs in onnxruntime on random inputs, write `dst`."""

    original = load_onnx(src)
    folded, report = fold_onnx(original)
    fed = graph_inputs(original)
    if len(fed) != 1:
        raise BnfoldError(f"{str(src)!r} has {len(fed)} inputs; the parity check supports one")
    elem = fed[0].type.tensor_type.elem_type
    if elem not in _NP_TYPES:
        raise BnfoldError(f"input {fed[0].name!r} is not a float tensor "
                          f"({onnx.TensorProto.DataType.Name(elem)})")
    shape = onnx_input_shape(original, input_shape)
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal(shape).astype(_NP_TYPES[elem]) for _ in range(samples)]
    try:
        # Compare the graphs as written, not as onnxruntime would rewrite them (it folds BN too).
        sessions = [cpu_session(m.SerializeToString(), 1, optimize=False) for m in (original, folded)]
        parity = compare(sessions[0], sessions[1], inputs)
    except BnfoldError:
        raise
    except Exception as exc:
        raise BnfoldError(f"onnxruntime could not run {str(src)!r} on inputs of shape {list(shape)} "
                          f"({first_line(exc, with_type=True, limit=200)}); {_SHAPE_HINT}") from None
    parity.check(rtol, "the folded ONNX graph")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(folded, str(dst))
    return FoldOutcome(report, parity, count_onnx_batchnorm(original), count_onnx_batchnorm(folded), shape, dst)
