"""bnfold.compare across torch modules, onnxruntime sessions and numpy callables."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bnfold import Parity, ParityError, compare


def test_identical_models_agree_exactly() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    parity = compare(model, model, torch.randn(5, 4))
    assert parity.max_abs_error == 0 and parity.max_rel_error == 0
    assert parity.cosine == pytest.approx(1.0) and parity.top1_agreement == 1.0 and parity.samples == 5


def test_figures_are_what_they_claim() -> None:
    x = np.array([[1.0, 2.0, 0.0], [0.0, -4.0, 3.0]], dtype=np.float32)
    ref = lambda a: a  # noqa: E731
    cand = lambda a: a + np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)  # noqa: E731
    parity = compare(ref, cand, x)
    assert parity.max_abs_error == 3.0
    assert parity.max_rel_error == pytest.approx(3.0 / 4.0)
    assert parity.top1_agreement == 0.5  # the first row's argmax moved from 1 to 2
    r, c = x.ravel().astype(np.float64), cand(x).ravel().astype(np.float64)
    assert parity.cosine == pytest.approx(r @ c / np.linalg.norm(r) / np.linalg.norm(c))


def test_torch_module_against_onnxruntime_session(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(tmp_path / "m.onnx"), dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "b"}})
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batches = [torch.randn(3, 1, 8, 8) for _ in range(2)]
    parity = compare(model, session, batches)
    assert parity.samples == 6 and parity.max_rel_error < 1e-5
    parity.check(1e-5, "ONNX export")
    broken = lambda a: session.run(None, {"input": a})[0] * 1.01  # noqa: E731
    with pytest.raises(ParityError, match="ONNX export disagrees") as info:
        compare(model, broken, batches).check(1e-5, "ONNX export")
    assert "max relative error" in str(info.value) and "cosine" in str(info.value)


def test_low_precision_module_gets_inputs_in_its_dtype() -> None:
    model = nn.Linear(4, 3).eval()
    half = nn.Linear(4, 3).to(torch.bfloat16).eval()
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    parity = compare(model, half, torch.randn(16, 4))
    assert 0 < parity.max_rel_error < 0.05


def test_nan_fails_the_check_and_shapes_must_match() -> None:
    x = np.ones((2, 3), np.float32)
    parity = compare(lambda a: a, lambda a: a * np.nan, x)
    assert math.isinf(parity.max_abs_error)
    with pytest.raises(ParityError):
        parity.check(1.0, "nan model")
    with pytest.raises(ParityError, match="shape"):
        compare(lambda a: a, lambda a: a[:, :2], x)


def test_multiple_outputs_and_to_dict() -> None:
    x = torch.randn(2, 3)
    parity = compare(lambda a: (a, {"b": a * 2}), lambda a: (a, {"b": a * 2}), x)
    assert parity.max_abs_error == 0
    assert set(parity.to_dict()) == {"max_abs_error", "max_rel_error", "cosine", "top1_agreement", "samples"}
    assert "parity over 2 samples" in str(parity)
    assert isinstance(parity, Parity)


def test_1d_outputs_have_no_top1() -> None:
    parity = compare(lambda a: a.sum(axis=1), lambda a: a.sum(axis=1), np.ones((4, 2), np.float32))
    assert parity.top1_agreement is None


def test_training_mode_module_is_compared_in_eval_mode_without_touching_it(randomize_bn) -> None:
    # In training mode a BN normalizes with batch statistics and updates its running ones: the
    # same model compared with itself gave a max relative error of 0.45 before.
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())).train()
    model[3].eval()  # a submodule's own mode is restored too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parity = compare(model, model, [torch.randn(4, 3, 6, 6) for _ in range(2)])
    assert parity.max_abs_error == 0.0  # the Dropout ran in eval mode too
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[1].training and model[2].training and not model[3].training
