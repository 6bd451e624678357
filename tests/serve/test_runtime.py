"""serve.runtime: sessions equal a plain onnxruntime run, the CUDA check is real, repositories pick versions."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bnfold.serve.protocol import check_datatype, check_shape
from bnfold.serve.repository import load_repository
from bnfold.serve.runtime import DeviceUnavailableError, ServeError, available_cpus, open_session


def _direct(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_available_cpus_is_within_affinity() -> None:
    cpus = available_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))


def test_open_session_matches_direct_onnxruntime(tiny_onnx: Path) -> None:
    runtime = open_session(tiny_onnx, "cpu", threads=1)
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(runtime.run(x), _direct(tiny_onnx, x), rtol=1e-6, atol=1e-6)
    assert runtime.providers == ["CPUExecutionProvider"]
    assert (runtime.input_name, runtime.output_name) == ("input", "logits")
    assert runtime.inputs[0].shape == [-1, 1, 28, 28] and runtime.inputs[0].datatype == "FP32"
    assert runtime.spec is not None and runtime.spec.labels[3] == "3"
    assert runtime.name == "tiny"          # from the spec's arch
    assert runtime.warmup_ms > 0


def test_cuda_absent_is_a_clear_error(tiny_onnx: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal path cannot be exercised here")
    with pytest.raises(DeviceUnavailableError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        open_session(tiny_onnx, "cuda")


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
    ({"threads": -1}, "threads must be 0 .the CPUs this process may use. or more"),
    ({"cuda_graph": True}, "needs --device cuda"),
])
def test_bad_options_are_named(tiny_onnx: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ServeError, match=message):
        open_session(tiny_onnx, **kwargs)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="not found"):
        open_session(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ServeError, match="cannot load"):
        open_session(junk)


def test_repository_serves_the_highest_version(tmp_path: Path, make_tiny_onnx) -> None:
    for name, version, seed in [("a", "1", 0), ("a", "10", 1), ("a", "9", 2), ("b", "3", 3)]:
        (tmp_path / name / version).mkdir(parents=True)
        make_tiny_onnx(tmp_path / name / version / "model.onnx", seed=seed)
    (tmp_path / "empty").mkdir()
    models = load_repository(tmp_path, threads=1)
    assert sorted(models) == ["a", "b"]
    assert models["a"].version == "10" and models["b"].version == "3"
    x = np.ones((1, 1, 28, 28), np.float32)
    np.testing.assert_allclose(models["a"].run(x), _direct(tmp_path / "a" / "10" / "model.onnx", x), rtol=1e-6)
    with pytest.raises(ServeError, match="no models found"):
        load_repository(tmp_path / "empty")


def test_validation_helpers_name_expected_and_got(tiny_onnx: Path) -> None:
    runtime = open_session(tiny_onnx, threads=1, name="lenet", warmup=False)
    with pytest.raises(ServeError, match=r"unexpected shape for input 'input' for model 'lenet'\. "
                                         r"Expected \[-1,1,28,28\], got \[1,1,28\]") as info:
        check_shape(runtime, "input", [1, 1, 28])
    assert info.value.status == 400
    assert check_shape(runtime, "input", [5, 1, 28, 28]) == (5, 1, 28, 28)
    with pytest.raises(ServeError, match="unexpected datatype FP64 .* Expected FP32"):
        check_datatype(runtime, "input", "FP64")
    with pytest.raises(ServeError, match="invalid datatype"):
        check_datatype(runtime, "input", "FLOAT")


@pytest.mark.gpu
def test_cuda_session_matches_cpu(tiny_onnx: Path) -> None:
    x = np.random.default_rng(2).standard_normal((1, 1, 28, 28)).astype(np.float32)
    cuda = open_session(tiny_onnx, "cuda", threads=1)
    assert cuda.providers[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(cuda.run(x), _direct(tiny_onnx, x), rtol=1e-3, atol=1e-4)
    graph = open_session(tiny_onnx, "cuda", threads=1, cuda_graph=True)
    for i in range(3):  # replays of the captured graph must see the new input every time
        x = np.random.default_rng(3 + i).standard_normal((1, 1, 28, 28)).astype(np.float32)
        np.testing.assert_allclose(graph.run(x), _direct(tiny_onnx, x), rtol=1e-3, atol=1e-4)
    with pytest.raises(ServeError, match="captured CUDA graph"):
        graph.run(np.zeros((2, 1, 28, 28), np.float32))


def test_repository_written_by_export_is_served(tmp_path: Path, make_tiny_onnx) -> None:
    """The folder `export.write_triton_repo` writes (what `bnfold export --triton-repo` makes) loads as is."""
    from bnfold.export import write_triton_repo
    from bnfold.models.spec import ModelSpec
    import onnx

    a, b = make_tiny_onnx(tmp_path / "a.onnx", seed=4), make_tiny_onnx(tmp_path / "b.onnx", seed=5)
    spec = ModelSpec.from_json(next(p.value for p in onnx.load(str(a)).metadata_props if p.key == "bnfold.spec"))
    write_triton_repo(a, spec, tmp_path / "repo", name="first")
    write_triton_repo(b, spec, tmp_path / "repo", name="second")
    models = load_repository(tmp_path / "repo", threads=1)
    assert sorted(models) == ["first", "second"]
    x = np.random.default_rng(6).standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(models["second"].run(x), _direct(b, x), rtol=1e-6, atol=1e-6)
    assert models["first"].spec == spec


def test_an_input_numpy_cannot_hold_is_refused_at_load(tmp_path: Path) -> None:
    """A bfloat16 input used to load and then fail as "warm-up run failed: 'BF16'" (a KeyError)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["input"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("input", TensorProto.BFLOAT16, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    for warmup in (True, False):
        with pytest.raises(ServeError, match="input 'input' is BF16, which requests cannot carry") as info:
            open_session(path, warmup=warmup)
        assert info.value.status == 500


def test_a_model_whose_spec_is_from_a_newer_bnfold_is_refused_by_name(tmp_path: Path, make_tiny_onnx) -> None:
    from bnfold.export import read_spec
    from bnfold.models.spec import SPEC_VERSION

    path = make_tiny_onnx(tmp_path / "model.onnx")
    spec = read_spec(path)
    spec.spec_version = SPEC_VERSION + 1
    make_tiny_onnx(path, spec=spec)
    with pytest.raises(ServeError, match=f"spec_version {SPEC_VERSION + 1}.*upgrade bnfold"):
        open_session(path)
