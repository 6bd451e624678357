"""Checkpoints: round trip through one file, and clear refusal of anything else."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnfold import models
from bnfold.models.checkpoint import FORMAT


@pytest.fixture
def saved_lenet(tmp_path, randomize_bn):
    model, spec = models.build_for_dataset("lenet", "digits")
    randomize_bn(model)
    spec.epoch, spec.metrics = 3, {"test_accuracy": 0.5}
    path = models.save_checkpoint(tmp_path / "ck.pt", model, spec, extra={"note": "hello"})
    return path, model.eval(), spec


@pytest.mark.parametrize("arch", ["lenet", "resnet20", "unet"])
def test_round_trip_rebuilds_the_same_model(tmp_path, randomize_bn, arch):
    model, spec = models.build_for_dataset(arch, "digits")
    randomize_bn(model, seed=3)
    model.eval()
    path = models.save_checkpoint(tmp_path / f"{arch}.pt", model, spec)
    loaded, loaded_spec = models.load_checkpoint(path)
    assert not loaded.training
    assert loaded_spec == spec
    x = models.sample_inputs(spec, n=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_file_layout_is_the_contract(saved_lenet):
    path, _, spec = saved_lenet
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT == "bnfold-checkpoint" and payload["format_version"] == 1
    assert payload["spec"] == spec.to_dict() and payload["note"] == "hello"
    assert set(payload["state_dict"]) == set(models.build("lenet").state_dict())
    assert models.is_checkpoint(path)


def test_bn_eps_survives_the_round_trip(tmp_path):
    model, spec = models.build_for_dataset("lenet", bn_eps=1e-3, bn_momentum=0.2)
    loaded, _ = models.load_checkpoint(models.save_checkpoint(tmp_path / "eps.pt", model, spec))
    bns = [m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.2 for m in bns)


def _rewrite(path, mutate):
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    torch.save(payload, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(models.CheckpointError, match="does not exist"):
        models.load_checkpoint(tmp_path / "absent.pt")
    assert not models.is_checkpoint(tmp_path / "absent.pt")


def test_state_dict_that_does_not_match_the_spec(saved_lenet):
    path, _, _ = saved_lenet

    def widen(payload):
        payload["state_dict"]["features.0.weight"] = torch.zeros(8, 1, 5, 5)
    _rewrite(path, widen)
    with pytest.raises(models.CheckpointError, match="do not match its spec"):
        models.load_checkpoint(path)


def test_missing_key_and_non_tensor_values(saved_lenet):
    path, _, _ = saved_lenet
    _rewrite(path, lambda p: p["state_dict"].pop("classifier.1.weight"))
    with pytest.raises(models.CheckpointError, match="classifier.1.weight"):
        models.load_checkpoint(path)
    _rewrite(path, lambda p: p["state_dict"].__setitem__("classifier.1.weight", [1.0, 2.0]))
    with pytest.raises(models.CheckpointError, match="not tensors"):
        models.load_checkpoint(path)


def test_pickled_module_is_refused_without_running_it(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(models.build("lenet"), path)  # a whole pickled module: weights_only refuses it
    with pytest.raises(models.CheckpointError, match="not a bnfold checkpoint"):
        models.load_checkpoint(path)
    assert not models.is_checkpoint(path)


def test_code_in_a_pickle_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "format_version": 1, "spec": {}, "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(models.CheckpointError):
        models.load_checkpoint(path)
    assert not marker.exists()


def test_foreign_state_dict_and_wrong_version(tmp_path, saved_lenet):
    plain = tmp_path / "plain.pt"
    torch.save(models.build("lenet").state_dict(), plain)  # a bare state dict: someone else's format
    with pytest.raises(models.CheckpointError, match="bnfold-checkpoint"):
        models.load_checkpoint(plain)
    path, _, _ = saved_lenet
    _rewrite(path, lambda p: p.__setitem__("format_version", 99))
    with pytest.raises(models.CheckpointError, match="99"):
        models.load_checkpoint(path)


def test_spec_naming_an_unknown_architecture(saved_lenet):
    path, _, _ = saved_lenet
    _rewrite(path, lambda p: p["spec"].__setitem__("arch", "alexnet"))
    with pytest.raises(models.CheckpointError, match="alexnet"):
        models.load_checkpoint(path)
    _rewrite(path, lambda p: p.__setitem__("spec", {"arch": "lenet"}))
    with pytest.raises(models.CheckpointError, match="spec"):
        models.load_checkpoint(path)


def test_truncated_and_garbage_bytes(tmp_path, saved_lenet):
    path, _, _ = saved_lenet
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file at all" * 10)
    # torch.load fails on these with IndexError and KeyError rather than its usual errors.
    one_byte = tmp_path / "one_byte.pt"
    one_byte.write_bytes(b"\x80")
    text = tmp_path / "text.pt"
    text.write_bytes(b"hello world\n" * 5)
    for bad in (truncated, garbage, one_byte, text):
        with pytest.raises(models.CheckpointError, match="corrupt|not a bnfold"):
            models.load_checkpoint(bad)
        assert not models.is_checkpoint(bad)


def test_extra_cannot_overwrite_own_entries(tmp_path):
    model, spec = models.build_for_dataset("lenet")
    with pytest.raises(models.CheckpointError, match="state_dict"):
        models.save_checkpoint(tmp_path / "x.pt", model, spec, extra={"state_dict": {}})


def test_randomly_damaged_bytes_are_a_checkpoint_error(tmp_path, saved_lenet):
    # torch.load reports damaged archives with many exception types (IndexError among them);
    # every one must reach the user as a CheckpointError, and is_checkpoint must say False.
    import random

    path, _, _ = saved_lenet
    raw = path.read_bytes()
    rng = random.Random(0)
    for i in range(30):
        data = bytearray(raw)
        for _ in range(20):
            data[rng.randrange(len(data))] = rng.randrange(256)
        damaged = tmp_path / f"damaged{i}.pt"
        damaged.write_bytes(bytes(data[: rng.randrange(1, len(data))] if i % 2 else data))
        try:
            models.load_checkpoint(damaged)
        except models.CheckpointError:
            assert not models.is_checkpoint(damaged)
        else:
            assert models.is_checkpoint(damaged)  # the damage missed everything that matters


def test_a_spec_from_a_newer_bnfold_is_refused_by_name(saved_lenet, capsys):
    """A newer spec may carry fields (or meanings) this bnfold does not know: say so, not "unreadable"."""
    from bnfold.cli import main
    from bnfold.models.spec import SPEC_VERSION, SpecVersionError

    path, _, _ = saved_lenet
    newer = SPEC_VERSION + 1

    def newer_spec(payload):
        payload["spec"]["spec_version"] = newer
        payload["spec"]["a_field_from_the_future"] = 1
    _rewrite(path, newer_spec)
    with pytest.raises(SpecVersionError, match=f"spec_version {newer}.*upgrade bnfold") as info:
        models.load_checkpoint(path)
    assert str(path) in str(info.value)
    code = main(["export", str(path), "--format", "torchscript", "--out", str(path.parent / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"spec_version {newer}" in err and "Traceback" not in err
    # The current version and older ones still load.
    _rewrite(path, lambda p: (p["spec"].pop("a_field_from_the_future"), p["spec"].__setitem__("spec_version", 1)))
    assert models.load_checkpoint(path)[1].spec_version == 1
