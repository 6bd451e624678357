"""Compare two models on the same inputs: torch modules, onnxruntime sessions or numpy callables."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from bnfold.errors import BnfoldError, ParityError

__all__ = ["Parity", "compare", "as_numpy_fn", "float_parameter", "module_dtype"]

ArrayLike = Union[torch.Tensor, np.ndarray]


@dataclass
class Parity:
    """How far `candidate` is from `reference` over all compared samples.

    `max_rel_error` is max|candidate - reference| / max|reference| (one figure for the whole
    output, so near-zero logits don't blow it up); `cosine` is the cosine similarity of the
    flattened outputs; `top1_agreement` the fraction of samples whose argmax over dim 1 agrees
    (per position for outputs with more than 2 dimensions, e.g.
    segmentation masks; None for outputs with fewer than 2 dimensions).
    """

    max_abs_error: float
    max_rel_error: float
    cosine: float
    top1_agreement: float | None
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        top1 = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.4f}"
        return (f"parity over {self.samples} samples: max abs error {self.max_abs_error:.3e}, "
                f"max rel error {self.max_rel_error:.3e}, cosine {self.cosine:.8f}, top-1 agreement {top1}")

    def check(self, max_rel_error: float, what: str) -> None:
        """Raise `ParityError` naming `what` and the figures when the relative error is too big."""
        # `not <=` so that NaN fails too.
        if not self.max_rel_error <= max_rel_error:
            raise ParityError(f"{what} disagrees with its source: max relative error "
                              f"{self.max_rel_error:.3e} > tolerance {max_rel_error:.1e} ({self})")


def _is_ort_session(obj: object) -> bool:
    return hasattr(obj, "get_inputs") and hasattr(obj, "run") and hasattr(obj, "get_outputs")


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for the duration, each submodule's own mode restored after: a module
    in training mode would normalize with batch statistics and update its running statistics."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def float_parameter(module: nn.Module) -> torch.nn.Parameter | None:
    """The module's first floating-point parameter: where its float inputs must go (dtype, device)."""
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the module computes in: its first float parameter's, float32 without one."""
    param = float_parameter(module)
    return param.dtype if param is not None else torch.float32


def _module_fn(module: nn.Module) -> Callable[[np.ndarray], list[np.ndarray]]:
    param = float_parameter(module)
    dtype = module_dtype(module)
    device = param.device if param is not None else torch.device("cpu")

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad(), _eval_mode(module):
            out = module(torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype))
        return _flatten(out)
    return run


def _ort_fn(session: Any) -> Callable[[np.ndarray], list[np.ndarray]]:
    first = session.get_inputs()[0]
    dtype = _ORT_DTYPES.get(first.type, np.float32)

    def run(x: np.ndarray) -> list[np.ndarray]:
        return _flatten(session.run(None, {first.name: x.astype(dtype, copy=False)}))
    return run


def as_numpy_fn(model: Any) -> Callable[[np.ndarray], list[np.ndarray]]:
    """A function numpy batch -> list of numpy outputs, for any model `compare` accepts."""
    if isinstance(model, nn.Module):
        return _module_fn(model)
    if _is_ort_session(model):
        return _ort_fn(model)
    if type(model).__name__ == "ExportedProgram" and hasattr(model, "module"):
        return _module_fn(model.module())
    if callable(model):
        return lambda x: _flatten(model(x))
    if hasattr(model, "run"):  # a runtime wrapper with .run(x) -> array (e.g. serve.runtime.ModelRuntime)
        return lambda x: _flatten(model.run(x))
    raise BnfoldError(f"cannot run a {type(model).__name__}: expected an nn.Module, an onnxruntime "
                      "InferenceSession or a callable numpy -> numpy")


def _flatten(out: Any) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().to(torch.float64).numpy()]
    if isinstance(out, np.ndarray):
        return [out.astype(np.float64)]
    if isinstance(out, dict):
        return [a for v in out.values() for a in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [a for v in out for a in _flatten(v)]
    if isinstance(out, (int, float)):
        return [np.asarray(out, dtype=np.float64)]
    raise BnfoldError(f"cannot compare a model output of type {type(out).__name__}")


def _batches(inputs: ArrayLike | Sequence[ArrayLike]) -> list[np.ndarray]:
    items = [inputs] if isinstance(inputs, (torch.Tensor, np.ndarray)) else list(inputs)
    if not items:
        raise BnfoldError("compare needs at least one input batch")
    batches = []
    for item in items:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu()
            # numpy has no bfloat16; float32 holds every bf16 value exactly.
            item = (item.float() if item.dtype == torch.bfloat16 else item).numpy()
        batches.append(np.asarray(item))
    return batches


def compare(reference: Any, candidate: Any, inputs: ArrayLike | Sequence[ArrayLike]) -> Parity:
    """Run `reference` and `candidate` on `inputs` (one batch or a list of batches) and compare.

    Each model may be an `nn.Module` (run under `torch.no_grad` and in eval mode, as it is deployed:
    a module given in training mode is switched to eval for the comparison and back after, so
    its running statistics are never touched; inputs cast to its parameters' dtype and device), an onnxruntime `InferenceSession` (inputs cast to its first input's type),
    or a callable taking a numpy batch. Outputs that are tuples/lists/dicts are compared
    element by element; their shapes must agree.
    """
    ref_fn, cand_fn = as_numpy_fn(reference), as_numpy_fn(candidate)
    max_abs, max_ref, dot, ref_sq, cand_sq = 0.0, 0.0, 0.0, 0.0, 0.0
    agree, counted, samples = 0, 0, 0
    for x in _batches(inputs):
        refs, cands = ref_fn(x), cand_fn(x)
        if len(refs) != len(cands):
            raise ParityError(f"the reference gives {len(refs)} outputs, the candidate {len(cands)}")
        samples += int(x.shape[0]) if x.ndim else 1
        for i, (r, c) in enumerate(zip(refs, cands)):
            if r.shape != c.shape:
                raise ParityError(f"output {i}: reference shape {list(r.shape)} != candidate shape {list(c.shape)}")
            if r.size == 0:
                continue
            diff = np.abs(c - r)
            max_abs = max(max_abs, float(diff.max()) if not np.isnan(diff).any() else math.inf)
            max_ref = max(max_ref, float(np.abs(r).max()))
            dot += float((r * c).sum())
            ref_sq += float((r * r).sum())
            cand_sq += float((c * c).sum())
            if i == 0 and r.ndim >= 2:
                same = r.argmax(axis=1) == c.argmax(axis=1)
                agree += int(same.sum())
                counted += same.size
    if max_ref > 0:
        max_rel = max_abs / max_ref
    else:
        max_rel = 0.0 if max_abs == 0 else math.inf
    denom = math.sqrt(ref_sq) * math.sqrt(cand_sq)
    if denom > 0:
        cosine = dot / denom
    else:
        cosine = 1.0 if ref_sq == cand_sq else 0.0
    if not math.isfinite(max_abs):
        cosine = math.nan
    return Parity(max_abs_error=max_abs, max_rel_error=max_rel, cosine=cosine,
                  top1_agreement=(agree / counted) if counted else None, samples=samples)
