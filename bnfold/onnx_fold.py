"""Fold inference-mode BatchNormalization nodes of any ONNX graph into their producers.

Handles BatchNormalization after Conv, ConvTranspose (grouped too), Gemm (honouring transB,
alpha, beta and any broadcastable C) and MatMul, with or without a following bias Add; and a
constant per-channel affine map (`Mul` by a constant, then optionally `Add` of a constant) after
Conv, ConvTranspose or Gemm, which is what a frozen BatchNorm exports as (the legacy exporter
folds its constants into one scale and one shift; dynamo leaves the Sqrt / Reciprocal / Mul / Sub
/ Add chain over the four buffers, evaluated here as constants). `ONNX_FOLDERS` maps the
producer's op type to its fold function; `fold_onnx(..., folders=)` extends or overrides it.

The producer's weights must be constants (initializers not also listed as graph inputs, Constant
nodes, or small chains of constant ops over those); the arithmetic is `bnfold.math`'s, in
float64. New weights get new initializer names, so a weight shared with another node is never
changed under it; the originals are dropped once nothing uses them.
"""
from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from bnfold.errors import BnfoldError, FoldSkipped
from bnfold.math import bn_scale_shift, fold_bn_after
from bnfold.fold_report import FoldReport
from bnfold.patterns import merge_table

__all__ = ["fold_onnx", "load_onnx", "graph_inputs", "count_onnx_batchnorm", "ONNX_FOLDERS", "OnnxFoldFn", "OnnxGraph", "AffineNode"]


class _NotConstant(Exception):
    """A tensor's value depends on the graph's inputs."""


def load_onnx(model_or_path: onnx.ModelProto | str | os.PathLike, *, load_external_data: bool = True,
              error: type[BnfoldError] = BnfoldError) -> onnx.ModelProto:
    """A copy of `model_or_path`, read from disk if it is a path; `error` (a `BnfoldError` class,
    e.g. export's `ExportError`) naming a missing or unreadable file. `load_external_data=False`
    leaves weights stored beside the file unread."""
    if isinstance(model_or_path, onnx.ModelProto):
        return copy.deepcopy(model_or_path)
    path = Path(model_or_path)
    if path.is_dir():
        raise error(f"{str(path)!r} is a folder; give an ONNX file")
    if not path.is_file():
        raise error(f"no ONNX file at {str(path)!r}: it does not exist")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises its own; both mean unreadable
        raise error(f"{str(path)!r} is not an ONNX model, or not a readable one ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise error(f"{str(path)!r} holds no ONNX graph (is it an ONNX file?)")
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph's inputs that are fed at run time (an initializer may be listed as an input too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def count_onnx_batchnorm(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the main graph."""
    return sum(1 for n in model.graph.node if _is_batchnorm(n))


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_inputs(graph: onnx.GraphProto) -> Iterator[str]:
    """Every name read by nodes of the subgraphs (If/Loop/Scan bodies) of `graph`."""
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                for n in sub.node:
                    yield from n.input
                yield from _subgraph_inputs(sub)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor ranks from shape inference (a help for MatMul folds, never a requirement)."""
    ranks: dict[str, int] = {}
    try:
        # Inference needs no float weights (integer ones may be Reshape shapes); dropping them
        # keeps it fast on big models.
        light = onnx.ModelProto()
        light.CopyFrom(model)
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                  onnx.TensorProto.BFLOAT16}
        for t in light.graph.initializer:
            if t.data_type in floats:
                for f in ("raw_data", "float_data", "double_data", "int32_data"):
                    t.ClearField(f)
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:
        return ranks
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def _constant(g: "OnnxGraph", node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if a.name == "value":
            return numpy_helper.to_array(value)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(value, dtype=np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(value, dtype=np.int64)
    raise _NotConstant(f"Constant {node.name!r} has an unsupported value attribute")


def _shape(g: "OnnxGraph", node: onnx.NodeProto) -> np.ndarray:
    dims = np.asarray(g._value(node.input[0]).shape, dtype=np.int64)
    start, end = int(_attr(node, "start", 0)), _attr(node, "end", None)
    return dims[start:None if end is None else int(end)]


def _reshape(g: "OnnxGraph", node: onnx.NodeProto) -> np.ndarray:
    data, shape = g._value(node.input[0]), [int(d) for d in g._value(node.input[1])]
    if not int(_attr(node, "allowzero", 0)):  # 0 means "copy this dimension from the input"
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _axes(g: "OnnxGraph", node: onnx.NodeProto) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        return [int(a) for a in g._value(node.input[1])]
    axes = _attr(node, "axes", None)
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(g: "OnnxGraph", node: onnx.NodeProto) -> np.ndarray:
    data, axes = g._value(node.input[0]), _axes(g, node) or []
    rank = data.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        data = np.expand_dims(data, axis)
    return data


def _squeeze(g: "OnnxGraph", node: onnx.NodeProto) -> np.ndarray:
    data, axes = g._value(node.input[0]), _axes(g, node)
    return np.squeeze(data) if axes is None else np.squeeze(data, axis=tuple(a % data.ndim for a in axes))


def _elementwise(fn: Callable[..., np.ndarray]) -> Callable[["OnnxGraph", onnx.NodeProto], np.ndarray]:
    # numpy in the tensors' own dtype, as onnxruntime computes them: a frozen BN's scale is then
    # the same float32 value the unfolded graph multiplies by.
    return lambda g, n: np.asarray(fn(*(g._value(name) for name in n.input)))


_CONST_OPS = {
    "Add": _elementwise(np.add), "Sub": _elementwise(np.subtract), "Mul": _elementwise(np.multiply),
    "Div": _elementwise(np.divide), "Sqrt": _elementwise(np.sqrt), "Reciprocal": _elementwise(np.reciprocal),
    "Neg": _elementwise(np.negative),
    "Concat": lambda g, n: np.concatenate([g._value(name) for name in n.input], axis=int(_attr(n, "axis", 0))),
    "Identity": lambda g, n: g._value(n.input[0]),
    "Constant": _constant,
    "Transpose": lambda g, n: np.transpose(g._value(n.input[0]), _attr(n, "perm", None)),
    "Cast": lambda g, n: g._value(n.input[0]).astype(helper.tensor_dtype_to_np_dtype(int(_attr(n, "to", 1)))),
    "CastLike": lambda g, n: g._value(n.input[0]).astype(g.elem_dtype(n.input[1])),
    "Shape": _shape,
    "Expand": lambda g, n: g._value(n.input[0]) * np.ones(tuple(int(d) for d in g._value(n.input[1])),
                                                           dtype=g._value(n.input[0]).dtype),
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
}


class OnnxGraph:
    """What a fold function sees of the graph: producers, consumers and constant values.

    Public for `fold_onnx(folders=...)`: `const(name, what)` reads a constant weight (or raises
    `FoldSkipped`), `only_consumer(name, node)` guards a rewrite, `add_initializer(base, value)`
    adds a new weight under a fresh name; `model`, `graph`, `producer`, `consumers` and `ranks`
    (the rank of each tensor, where known) are the lookup tables."""

    def __init__(self, model: onnx.ModelProto, ranks: dict[str, int] | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}
        self.outputs = {o.name for o in self.graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.sub_reads = set(_subgraph_inputs(self.graph))
        self.ranks: dict[str, int] = ranks if ranks is not None else _ranks(model)
        self._counter = 0

    def const(self, name: str, what: str) -> np.ndarray:
        """The value of a constant tensor, or `FoldSkipped` saying why `name` is not one.

        Constant means an initializer that is not also a graph input, or the output of a small
        chain of ops over constants (`_CONST_OPS`: Identity, Constant, Transpose, Cast, CastLike,
        Shape, Expand, Reshape, Squeeze, Unsqueeze, Concat and elementwise arithmetic): what
        exporters emit for a transposed weight, a zero bias or a frozen BatchNorm's scale.
        """
        if not name:
            raise FoldSkipped(f"{what} is missing")
        try:
            return self._value(name)
        except _NotConstant as exc:
            raise FoldSkipped(f"{what} {name!r} is computed at run time, not a constant initializer ({exc})") from None

    def _value(self, name: str) -> np.ndarray:
        if name in self.inits:
            if name in self.inputs:
                raise _NotConstant(f"{name!r} is an initializer that is also a graph input, so it can be "
                                   "overridden at run time")
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None:
            raise _NotConstant(f"{name!r} is a graph input")
        fn = _CONST_OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is None:
            raise _NotConstant(f"{name!r} comes from {node.op_type}")
        return fn(self, node)

    def elem_dtype(self, name: str) -> np.dtype:
        """numpy dtype of a tensor's declared element type (for CastLike)."""
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if vi.name == name and vi.type.HasField("tensor_type"):
                return helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        return self._value(name).dtype

    def only_consumer(self, name: str, node: onnx.NodeProto) -> None:
        """`FoldSkipped` unless `node` is the one reader of `name`."""
        users = self.consumers.get(name, [])
        if name in self.outputs:
            raise FoldSkipped(f"{name!r} is also a graph output")
        if name in self.sub_reads:
            raise FoldSkipped(f"{name!r} is also read inside a subgraph")
        if len(users) != 1 or users[0] is not node:
            kinds = ", ".join(f"{u.op_type} {u.name!r}" for u in users)
            raise FoldSkipped(f"the output {name!r} has {len(users)} consumers ({kinds})")

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        taken = set(self.inits) | set(self.producer) | self.inputs
        name = f"{base}_bnfold"
        while name in taken:
            self._counter += 1
            name = f"{base}_bnfold{self._counter}"
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name


def _cast(value: torch.Tensor, like: np.ndarray) -> np.ndarray:
    return value.numpy().astype(like.dtype)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64).copy())


@dataclass
class AffineNode:
    """One per-channel affine node (or pair) to fold away: a BatchNormalization, or a Mul by a
    constant optionally followed by an Add of a constant. `scale`/`shift` are the Mul's and Add's
    constants as written; a BatchNormalization has its statistics instead. Public for fold
    functions: `per_channel(rank, axis, channels, layer)` gives (mean, var, gamma, beta), eps."""

    name: str  # for the report
    input: str  # the tensor it reads
    output: str  # the tensor it writes
    nodes: list[onnx.NodeProto]  # removed once folded
    what: str  # "BatchNormalization" or "the Mul/Add affine map"
    stats: tuple[torch.Tensor, ...] | None = None  # mean, var, gamma, beta (float64)
    eps: float = 0.0
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None

    def per_channel(self, rank: int, axis: int, channels: int, layer: str) -> tuple[tuple[torch.Tensor, ...], float]:
        """`(mean, var, gamma, beta), eps` over the `channels` of axis `axis` of a rank-`rank` output,
        or `FoldSkipped` when the map is not per-channel there."""
        if self.stats is not None:
            if self.stats[0].numel() != channels:
                raise FoldSkipped(f"shapes disagree: {layer} produces {channels} channels, "
                                  f"{self.what} normalizes {self.stats[0].numel()}")
            return self.stats, self.eps
        # An affine map is a BN with mean 0, var 1, eps 0: scale * x + shift exactly.
        scale = _channel_vector(self.scale, rank, axis, channels, f"{self.what}'s scale", layer)
        shift = (_channel_vector(self.shift, rank, axis, channels, f"{self.what}'s shift", layer)
                 if self.shift is not None else torch.zeros(channels, dtype=torch.float64))
        return (torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64), scale, shift), 0.0


def _channel_vector(value: np.ndarray, rank: int, axis: int, channels: int, what: str, layer: str) -> torch.Tensor:
    """`value` broadcast over a rank-`rank` tensor as one number per channel of `axis`, or `FoldSkipped`."""
    shape = list(value.shape)
    axis = axis % rank
    if len(shape) > rank:
        raise FoldSkipped(f"{what} has rank {len(shape)}, more than {layer}'s output ({rank})")
    shape = [1] * (rank - len(shape)) + shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        raise FoldSkipped(f"{what} of shape {list(value.shape)} is not one value per channel of {layer}'s "
                          f"{channels} channels (axis {axis})")
    return _t(np.broadcast_to(value.reshape(-1), (channels,)) if value.size == 1 else value.reshape(-1))


def _batchnorm(g: OnnxGraph, bn: onnx.NodeProto) -> AffineNode:
    norm = AffineNode(bn.name or bn.output[0], bn.input[0], bn.output[0], [bn], "BatchNormalization")
    if int(_attr(bn, "training_mode", 0)):
        raise FoldSkipped("training_mode=1: it normalizes with batch statistics")
    if not int(_attr(bn, "spatial", 1)):
        raise FoldSkipped("spatial=0 (per-element statistics, opset < 9) is not supported")
    if any(out for out in bn.output[1:]):
        raise FoldSkipped("it also outputs running statistics (a training graph)")
    if len(bn.input) < 5:
        raise FoldSkipped(f"it has {len(bn.input)} inputs, expected 5")
    names = ("scale", "B", "input_mean", "input_var")
    scale, bias, mean, var = (g.const(n, f"BatchNormalization {w}") for n, w in zip(bn.input[1:5], names))
    norm.stats = (_t(mean), _t(var), _t(scale), _t(bias))
    norm.eps = float(_attr(bn, "epsilon", 1e-5))
    return norm


_AFFINE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _affine(g: OnnxGraph, mul: onnx.NodeProto) -> AffineNode | None:
    """A `Mul(x, constant)` (then `Add(., constant)` when that Add is its only reader) whose `x` comes
    from Conv / ConvTranspose / Gemm: a frozen BatchNorm's export. None when it is not one."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
        return None
    for x, c in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        producer = g.producer.get(x)
        if producer is None or producer.op_type not in _AFFINE_PRODUCERS:
            continue
        try:
            scale = g.const(c, "Mul operand")
        except FoldSkipped:
            continue
        norm = AffineNode(mul.name or mul.output[0], x, mul.output[0], [mul], "the Mul/Add affine map", scale=scale)
        users = g.consumers.get(mul.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add" and mul.output[0] not in g.outputs | g.sub_reads:
            add = users[0]
            other = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
            try:
                norm.shift = g.const(other, "Add operand")
            except FoldSkipped:
                return norm
            norm.nodes.append(add)
            norm.output = add.output[0]
            norm.name = f"{norm.name} + {add.name or add.output[0]}"
        return norm
    return None


def _set_weight_and_bias(g: OnnxGraph, layer: onnx.NodeProto, w: np.ndarray, new_w: torch.Tensor,
                         b: np.ndarray | None, new_b: torch.Tensor) -> None:
    """Point `layer`'s inputs 1 and 2 at new initializers holding the folded weight and bias, in
    the dtypes of the originals (the weight's for a bias the layer did not have)."""
    bias_base = layer.input[2] if b is not None else f"{layer.input[1]}_bias"
    inputs = [layer.input[0], g.add_initializer(layer.input[1], _cast(new_w, w)),
              g.add_initializer(bias_base, _cast(new_b, w if b is None else b))]
    del layer.input[:]
    layer.input.extend(inputs)


def _write_to(layer: onnx.NodeProto, norm: AffineNode) -> tuple[str, list[onnx.NodeProto]]:
    name = layer.name or layer.output[0]
    layer.output[0] = norm.output  # the layer now writes the normalized tensor directly
    return name, []


def _fold_conv(g: OnnxGraph, layer: onnx.NodeProto, norm: AffineNode) -> tuple[str, list[onnx.NodeProto]]:
    transposed = layer.op_type == "ConvTranspose"
    w = g.const(layer.input[1], f"{layer.op_type} weight")
    b = g.const(layer.input[2], f"{layer.op_type} bias") if len(layer.input) > 2 and layer.input[2] else None
    groups = int(_attr(layer, "group", 1))
    channels = w.shape[1] * groups if transposed else w.shape[0]
    (mean, var, gamma, beta), eps = norm.per_channel(w.ndim, 1, channels, layer.op_type)
    new_w, new_b = fold_bn_after(_t(w), None if b is None else _t(b), mean, var, eps, gamma, beta,
                                 transposed=transposed, groups=groups)
    _set_weight_and_bias(g, layer, w, new_w, b, new_b)
    return _write_to(layer, norm)


def _fold_gemm(g: OnnxGraph, layer: onnx.NodeProto, norm: AffineNode) -> tuple[str, list[onnx.NodeProto]]:
    w = g.const(layer.input[1], "Gemm B")
    c = g.const(layer.input[2], "Gemm C") if len(layer.input) > 2 and layer.input[2] else None
    beta = float(_attr(layer, "beta", 1.0))
    trans_b = int(_attr(layer, "transB", 0))
    if w.ndim != 2:
        raise FoldSkipped(f"Gemm B has rank {w.ndim}, expected 2")
    rows = w if trans_b else w.T  # (N, K): one row per output channel, like nn.Linear's weight
    n = rows.shape[0]
    (mean, var, gamma, bn_beta), eps = norm.per_channel(2, 1, n, "Gemm")
    # s*(alpha*A*B' + beta*C) + t  ==  alpha*A*(B' s) + (beta*C*s + t): alpha stays, C becomes
    # the folded bias and beta becomes 1.
    scale, shift = bn_scale_shift(mean, var, eps, gamma, bn_beta)
    new_rows = _t(rows) * scale[:, None]
    if c is None:
        new_c = shift
    else:
        if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n)):
            raise FoldSkipped(f"Gemm C of shape {list(c.shape)} does not broadcast over {n} columns")
        full = np.broadcast_to(np.asarray(c, dtype=np.float64) * beta, (*c.shape[:-1], n) if c.ndim else (n,))
        new_c = _t(full) * scale + shift
    new_w = new_rows if trans_b else new_rows.T
    _set_weight_and_bias(g, layer, w, new_w.contiguous(), c, new_c.contiguous())
    for attr in layer.attribute:
        if attr.name == "beta":
            attr.f = 1.0
    return _write_to(layer, norm)


def _fold_matmul_into(g: OnnxGraph, matmul: onnx.NodeProto, add: onnx.NodeProto | None,
                      norm: AffineNode) -> onnx.NodeProto | None:
    """Fold into `matmul` (and its bias `add`); returns a new Add node to insert in place of the BN
    when the MatMul had none."""
    rank = g.ranks.get(matmul.input[0])
    if rank != 2:
        raise FoldSkipped("MatMul input rank is " + ("unknown" if rank is None else str(rank)) +
                          "; only a 2-D MatMul puts the BatchNormalization channel on its last axis")
    w = g.const(matmul.input[1], "MatMul weight")
    if w.ndim != 2:
        raise FoldSkipped(f"MatMul weight has rank {w.ndim}, expected 2")
    n = w.shape[1]
    (mean, var, gamma, beta), eps = norm.per_channel(2, 1, n, "MatMul")
    b_name, b = None, None
    if add is not None:
        b_name = add.input[1] if add.input[0] in matmul.output else add.input[0]
        b = g.const(b_name, "Add bias")
        if b.size not in (1, n) or b.ndim > 2 or (b.ndim and b.shape[-1] != b.size):
            raise FoldSkipped(f"Add bias of shape {list(b.shape)} is not a per-column bias of {n} columns")
    bias = None if b is None else _t(np.broadcast_to(b.reshape(-1), (n,)))
    new_rows, new_b = fold_bn_after(_t(w.T), bias, mean, var, eps, gamma, beta)
    new_w_name = g.add_initializer(matmul.input[1], _cast(new_rows.T.contiguous(), w))
    matmul.input[1] = new_w_name
    if add is not None:
        bias_name = g.add_initializer(b_name, _cast(new_b, b))
        add.input[0 if add.input[0] == b_name else 1] = bias_name
        return None
    bias_name = g.add_initializer(f"{matmul.input[1]}_bias", _cast(new_b, w))
    return helper.make_node("Add", [matmul.output[0], bias_name], [norm.output],
                            name=f"{norm.nodes[0].name or matmul.name}_bias")


def _fold_matmul(g: OnnxGraph, matmul: onnx.NodeProto, norm: AffineNode) -> tuple[str, list[onnx.NodeProto]]:
    # The BN becomes an Add of its shift; the MatMul's output keeps its name.
    return matmul.name or matmul.output[0], [_fold_matmul_into(g, matmul, None, norm)]


def _fold_matmul_add(g: OnnxGraph, add: onnx.NodeProto, norm: AffineNode) -> tuple[str, list[onnx.NodeProto]]:
    matmul = next((node for name in add.input if (node := g.producer.get(name)) is not None
                   and node.op_type == "MatMul"), None)
    if matmul is None:
        raise FoldSkipped(f"its producer is Add {add.name!r}, not the bias Add of a MatMul")
    g.only_consumer(matmul.output[0], add)
    _fold_matmul_into(g, matmul, add, norm)
    add.output[0] = norm.output
    return matmul.name or matmul.output[0], []


# A fold function: (graph, producer node, the affine node(s) it feeds) -> (the layer's name for
# the report, nodes to insert where the affine node was); it rewires the producer to write the
# affine node's output, or raises FoldSkipped with the reason.
OnnxFoldFn = Callable[[OnnxGraph, onnx.NodeProto, AffineNode], tuple[str, list[onnx.NodeProto]]]

ONNX_FOLDERS: Mapping[str, OnnxFoldFn] = MappingProxyType({
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv,
    "Gemm": _fold_gemm,
    "MatMul": _fold_matmul,
    "Add": _fold_matmul_add,  # MatMul + bias Add, as exporters write nn.Linear on N-D inputs
})


def _fold_one(g: OnnxGraph, norm: AffineNode, table: Mapping[str, OnnxFoldFn]) -> tuple[str, list[onnx.NodeProto]]:
    """Fold `norm` into the node producing its input; `FoldSkipped` when it cannot."""
    producer = g.producer.get(norm.input)
    if producer is None:
        raise FoldSkipped(f"its input {norm.input!r} is a graph input or initializer, not a node output")
    g.only_consumer(norm.input, norm.nodes[0])
    if producer.domain not in ("", "ai.onnx"):
        raise FoldSkipped(f"its producer {producer.op_type} is in domain {producer.domain!r}")
    fn = table.get(producer.op_type)
    if fn is None:
        raise FoldSkipped(f"its producer is {producer.op_type} {producer.name!r}, not one of "
                          f"{', '.join(sorted(table))}")
    return fn(g, producer, norm)


def _used_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return ({name for node in graph.node for name in node.input} | set(_subgraph_inputs(graph))
            | {o.name for o in graph.output})


def _clean(model: onnx.ModelProto, originally_used: set[str]) -> None:
    """Drop what folding left unused: the constant chains that fed weights or statistics, replaced
    initializers, stale value_info. Things the file already carried unused are kept."""
    graph = model.graph
    while True:
        used = _used_names(model)
        dead = [n for n in graph.node if n.op_type in _CONST_OPS and n.output[0] in originally_used
                and not any(out in used for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = _used_names(model)
    keep = [t for t in graph.initializer if t.name in used or t.name not in originally_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    live = {name for node in graph.node for name in node.output}
    infos = [vi for vi in graph.value_info if vi.name in live]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def fold_onnx(model_or_path: onnx.ModelProto | str | os.PathLike, *,
              folders: Mapping[str, OnnxFoldFn | None] | None = None) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every inference-mode BatchNormalization, and every constant per-channel Mul(+Add), that
    follows Conv, ConvTranspose, Gemm or MatMul(+Add) (the affine map: Conv, ConvTranspose, Gemm).

    Returns `(folded_model, report)`; the input `ModelProto` is not modified. The result passes
    `onnx.checker.check_model`. `folders` extends or overrides `ONNX_FOLDERS` by producer op type
    (a value of None removes one). BatchNormalization nodes in subgraphs (If/Loop bodies) are left
    alone and noted.
    """
    table = merge_table(ONNX_FOLDERS, folders, keys="ONNX op types (str)", key_ok=lambda key: isinstance(key, str))
    model = load_onnx(model_or_path)
    g = OnnxGraph(model)
    report = FoldReport()
    originally_used = _used_names(model)
    position = 0
    while position < len(g.graph.node):
        # One pass in graph order: a fold can make the next node a candidate (a frozen BN's Mul
        # after a BatchNormalization just folded into its conv).
        node = g.graph.node[position]
        position += 1
        try:
            norm = _batchnorm(g, node) if _is_batchnorm(node) else _affine(g, node)
            if norm is None:
                continue
            layer_name, new_nodes = _fold_one(g, norm, table)
        except FoldSkipped as exc:
            report.skipped.append((node.name or node.output[0], str(exc)))
            continue
        position -= 1
        for old in norm.nodes:
            g.graph.node.remove(old)
        for offset, new in enumerate(new_nodes):
            g.graph.node.insert(position + offset, new)
        position += len(new_nodes)
        report.folded.append((layer_name, norm.name))
        g = OnnxGraph(model, g.ranks)  # the tables changed; rebuilding is cheap next to the weights
    _clean(model, originally_used)
    if any(n.op_type in ("If", "Loop", "Scan") for n in model.graph.node):
        report.notes.append("subgraphs (If/Loop/Scan bodies) were not searched for BatchNormalization")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise BnfoldError(f"the folded ONNX graph fails onnx.checker: {exc}") from None
    return model, report
