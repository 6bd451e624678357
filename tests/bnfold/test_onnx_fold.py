"""bnfold.fold_onnx on exporter outputs and on hand-built graphs, checked with onnxruntime."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnfold import BnfoldError, compare, count_onnx_batchnorm, fold_onnx


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # onnxruntime would fold BN itself; compare the graphs as written.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _assert_parity(original: onnx.ModelProto, folded: onnx.ModelProto, x: np.ndarray, tol: float = 1e-5) -> None:
    onnx.checker.check_model(folded, full_check=True)
    compare(_session(original), _session(folded), x).check(tol, "folded ONNX")


class _LeNetBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.ConvTranspose2d(6, 8, 2, stride=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, groups=4, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 13 * 13, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Linear(32, 10, bias=False), nn.BatchNorm1d(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def lenet(randomize_bn) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(_LeNetBN()).eval()


def _export(model: nn.Module, path: Path, **kwargs) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 1, 28, 28),), str(path), input_names=["input"],
                          output_names=["logits"], **kwargs)
    return onnx.load(str(path))


@pytest.mark.parametrize("constant_folding", [True, False])
def test_legacy_exporter_output(lenet, tmp_path: Path, constant_folding: bool) -> None:
    original = _export(lenet, tmp_path / "m.onnx", dynamo=False, do_constant_folding=constant_folding,
                       dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    bn_before = count_onnx_batchnorm(original)
    assert bn_before >= 2  # the legacy exporter leaves at least the Gemm + BatchNormalization pairs
    folded, report = fold_onnx(tmp_path / "m.onnx")
    assert count_onnx_batchnorm(folded) == 0 and len(report.folded) == bn_before, str(report)
    assert any(layer.endswith("Gemm") for layer, _ in report.folded)
    _assert_parity(original, folded, np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32))


@pytest.mark.slow
def test_dynamo_exporter_output_without_optimization(lenet, tmp_path: Path) -> None:
    original = _export(lenet, tmp_path / "d.onnx", dynamo=True, optimize=False)
    assert count_onnx_batchnorm(original) == 5
    folded, report = fold_onnx(original)
    assert count_onnx_batchnorm(folded) == 0, str(report)
    assert count_onnx_batchnorm(original) == 5  # the input proto is untouched
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("ConvTranspose") == 1 and ops.count("Gemm") + ops.count("MatMul") == 2
    _assert_parity(original, folded, np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32))


# -- hand-built graphs -----------------------------------------------------------------------


def _bn_inits(n: int, seed: int, prefix: str = "bn") -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    values = {"scale": rng.uniform(0.5, 1.5, n), "B": rng.uniform(-1, 1, n), "mean": rng.uniform(-1, 1, n),
              "var": rng.uniform(0.2, 2, n)}
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in values.items()]


def _bn_node(x: str, y: str, prefix: str = "bn", **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("scale", "B", "mean", "var")],
                            [y], name=prefix, epsilon=1e-3, **attrs)


def _model(nodes, inits, x_shape, y_shape, extra_inputs=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
                                           *extra_inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (6,), (1, 6), (4, 6)])
def test_gemm_honours_trans_b_alpha_beta_and_c(trans_b: int, c_shape: tuple | None) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), *_bn_inits(6, 3)]
    gemm_inputs = ["x", "W"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "C"))
        gemm_inputs.append("C")
    nodes = [helper.make_node("Gemm", gemm_inputs, ["h"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
             _bn_node("h", "y")]
    original = _model(nodes, inits, [4, 5], [4, 6])
    folded, report = fold_onnx(original)
    assert report.folded == [("gemm", "bn")] and count_onnx_batchnorm(folded) == 0
    _assert_parity(original, folded, rng.standard_normal((4, 5)).astype(np.float32))


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_with_and_without_bias_add(with_add: bool) -> None:
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "W"), *_bn_inits(6, 5)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")]
    if with_add:
        inits.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["b", "h"], ["h2"], name="add"))
    nodes.append(_bn_node("h2" if with_add else "h", "y"))
    original = _model(nodes, inits, ["batch", 5], ["batch", 6])
    folded, report = fold_onnx(original)
    assert report.folded == [("mm", "bn")] and count_onnx_batchnorm(folded) == 0
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    _assert_parity(original, folded, rng.standard_normal((3, 5)).astype(np.float32))


def test_matmul_on_3d_input_is_skipped() -> None:
    # BatchNormalization normalizes axis 1; a 3-D MatMul's features are on axis 2.
    inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "W"), *_bn_inits(4, 6)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), _bn_node("h", "y")]
    folded, report = fold_onnx(_model(nodes, inits, [2, 4, 4], [2, 4, 4]))
    assert count_onnx_batchnorm(folded) == 1 and "rank is 3" in report.skipped[0][1]


def _conv_graph(extra_consumer: bool = False, stats_as_input: bool = False, training: bool = False):
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"), *_bn_inits(4, 8)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv", pads=[1, 1, 1, 1])]
    extra = []
    if training:
        nodes.append(_bn_node("h", "y", training_mode=1))
    else:
        nodes.append(_bn_node("h", "y0"))
        nodes.append(helper.make_node("Add", ["y0", "h" if extra_consumer else "y0"], ["y"]))
    if stats_as_input:
        inits = [t for t in inits if t.name != "bn.mean"]
        extra = [helper.make_tensor_value_info("bn.mean", TensorProto.FLOAT, [4])]
    return _model(nodes, inits, [1, 3, 5, 5], [1, 4, 5, 5], extra_inputs=extra)


def test_conv_folds_and_weights_get_new_names() -> None:
    original = _conv_graph()
    folded, report = fold_onnx(original)
    assert report.folded == [("conv", "bn")]
    conv = folded.graph.node[0]
    assert conv.input[1] != "W" and len(conv.input) == 3
    assert {t.name for t in folded.graph.initializer} == {conv.input[1], conv.input[2]}
    _assert_parity(original, folded, np.random.default_rng(9).standard_normal((1, 3, 5, 5)).astype(np.float32))


@pytest.mark.parametrize("case, reason", [
    ("extra_consumer", "2 consumers"),
    ("stats_as_input", "computed at run time"),
    ("training", "training_mode=1"),
])
def test_guards_skip_with_reason(case: str, reason: str) -> None:
    original = _conv_graph(**{case: True})
    folded, report = fold_onnx(original)
    assert report.folded == [] and count_onnx_batchnorm(folded) == 1
    assert reason in report.skipped[0][1]


def test_overridable_initializer_is_not_a_constant() -> None:
    model = _conv_graph()
    model.graph.input.append(helper.make_tensor_value_info("bn.var", TensorProto.FLOAT, [4]))
    _, report = fold_onnx(model)
    assert "also a graph input" in report.skipped[0][1]


def test_bn_after_something_else_is_reported() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), _bn_node("h", "y")]
    _, report = fold_onnx(_model(nodes, _bn_inits(3, 1), [1, 3, 4, 4], [1, 3, 4, 4]))
    assert "Relu" in report.skipped[0][1]


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(BnfoldError, match="no ONNX file"):
        fold_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(BnfoldError, match="not an ONNX model|holds no ONNX graph"):
        fold_onnx(bad)


def test_statistics_behind_identity_nodes() -> None:
    # The legacy exporter deduplicates equal initializers and feeds the copies through Identity.
    model = _conv_graph()
    nodes = list(model.graph.node)
    nodes[1].input[4] = "bn.var.copy"
    del model.graph.node[:]
    model.graph.node.extend([helper.make_node("Identity", ["bn.scale"], ["bn.var.copy"], name="dedup"), *nodes])
    folded, report = fold_onnx(model)
    assert report.folded == [("conv", "bn")]
    assert "dedup" not in {n.name for n in folded.graph.node}  # the dead Identity went with the BN
    _assert_parity(model, folded, np.random.default_rng(10).standard_normal((1, 3, 5, 5)).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_initializer_dtype_is_kept(dtype) -> None:
    rng = np.random.default_rng(11)
    w = rng.standard_normal((6, 5)).astype(dtype)
    stats = {k: v for k, v in zip(("scale", "B", "mean", "var"),
                                  (rng.uniform(0.5, 1.5, 6), rng.uniform(-1, 1, 6), rng.uniform(-1, 1, 6),
                                   rng.uniform(0.2, 2, 6)))}
    inits = [numpy_helper.from_array(w, "W")] + [numpy_helper.from_array(v.astype(dtype), f"bn.{k}")
                                                 for k, v in stats.items()]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["h"], name="gemm", transB=1),
                               _bn_node("h", "y")], "g",
                              [helper.make_tensor_value_info("x", elem, [2, 5])],
                              [helper.make_tensor_value_info("y", elem, [2, 6])], inits)
    folded, _ = fold_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    gemm = folded.graph.node[0]
    new = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    s = {k: numpy_helper.to_array(t).astype(np.float64) for k, t in
         ((i.name.split(".")[1], i) for i in inits[1:])}
    scale = s["scale"] / np.sqrt(s["var"] + float(np.float32(1e-3)))  # ONNX stores epsilon as float32
    assert new[gemm.input[1]].dtype == dtype and new[gemm.input[2]].dtype == dtype
    expected = (w.astype(np.float64) * scale[:, None]).astype(dtype)
    np.testing.assert_array_equal(new[gemm.input[1]], expected)  # float64 math, one rounding


# -- constant per-channel affine maps (frozen BatchNorm) and the folders table --------------------


class _FrozenNet(nn.Module):
    """torchvision's FrozenBatchNorm2d after a conv and a transposed conv, a Linear with a frozen
    per-feature scale and shift: what detection backbones export as."""

    def __init__(self) -> None:
        from torchvision.ops.misc import FrozenBatchNorm2d
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), FrozenBatchNorm2d(4), nn.ReLU(),
                                      nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), FrozenBatchNorm2d(6))
        self.fc = nn.Linear(6, 3)
        self.register_buffer("s", torch.rand(3) + 0.5)
        self.register_buffer("t", torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3))) * self.s + self.t


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_frozen_batchnorm_exported_as_mul_add_is_folded(dynamo: bool, tmp_path: Path, randomize_bn) -> None:
    torch.manual_seed(0)
    model = randomize_bn(_FrozenNet()).eval()
    kwargs = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 1, 6, 6),), str(tmp_path / "f.onnx"), input_names=["input"],
                          **kwargs)
    original = onnx.load(str(tmp_path / "f.onnx"))
    muls = sum(n.op_type == "Mul" for n in original.graph.node)
    assert count_onnx_batchnorm(original) == 0 and muls >= 3
    folded, report = fold_onnx(original)
    assert len(report.folded) == 3 and report.ok, str(report)
    ops = {n.name: n.op_type for n in folded.graph.node}
    assert sorted(ops[layer] for layer, _ in report.folded) == ["Conv", "ConvTranspose", "Gemm"]
    # Every data-path Mul is gone; what Muls remain only compute constants nobody reads.
    assert sum(n.op_type == "Mul" for n in folded.graph.node) == 0, [n.op_type for n in folded.graph.node]
    _assert_parity(original, folded, np.random.default_rng(12).standard_normal((2, 1, 6, 6)).astype(np.float32))


def test_affine_that_is_not_per_channel_is_left() -> None:
    rng = np.random.default_rng(13)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 1, 3, 3)).astype(np.float32), "S")]  # per pixel
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), helper.make_node("Mul", ["h", "S"], ["y"], name="mul")]
    folded, report = fold_onnx(_model(nodes, inits, [1, 3, 5, 5], [1, 4, 3, 3]))
    assert report.folded == [] and [n for n, _ in report.skipped] == ["mul"]
    assert "not one value per channel" in report.skipped[0][1]


def test_onnx_folders_table_can_remove_and_add(tmp_path: Path) -> None:
    original = _conv_graph()
    _, report = fold_onnx(original, folders={"Conv": None})
    assert report.folded == [] and "not one of" in report.skipped[0][1]
    calls = []

    def spy(g, layer, norm):
        calls.append((layer.op_type, norm.name))
        from bnfold.onnx_fold import ONNX_FOLDERS
        return ONNX_FOLDERS["Conv"](g, layer, norm)

    folded, report = fold_onnx(original, folders={"Conv": spy})
    assert calls == [("Conv", "bn")] and report.folded == [("conv", "bn")]
    with pytest.raises(BnfoldError, match="op types"):
        fold_onnx(original, folders={1: spy})


def test_a_fold_function_is_written_against_public_types_only() -> None:
    """`OnnxFoldFn` is spelled in public names (it was `_Graph`/`_Norm`): a fold function written
    with them and their documented methods is one entry in `folders=`."""
    import typing

    from bnfold.onnx_fold import ONNX_FOLDERS, AffineNode, OnnxFoldFn, OnnxGraph

    assert typing.get_args(OnnxFoldFn)[0] == [OnnxGraph, onnx.NodeProto, AffineNode]
    seen = []

    def fold_conv_again(g: OnnxGraph, layer: onnx.NodeProto, norm: AffineNode) -> tuple[str, list]:
        seen.append((type(g), type(norm), g.const(layer.input[1], "the weight").shape))
        return ONNX_FOLDERS["Conv"](g, layer, norm)

    _, report = fold_onnx(_conv_graph(), folders={"Conv": fold_conv_again})
    assert report.folded == [("conv", "bn")] and seen and seen[0][:2] == (OnnxGraph, AffineNode)
