"""Every architecture folds completely with bnfold (zero BN left, max relative error <= 1e-5)."""
from __future__ import annotations

import pytest

import bnfold
from bnfold import models


@pytest.mark.parametrize("arch,kwargs", [
    ("lenet", {}), ("lenet", {"activation": "sigmoid", "pool": "max"}), ("resnet20", {}),
    ("resnet18", {}), ("unet", {}),
])
def test_architectures_fold_completely(randomize_bn, arch, kwargs):
    model, spec = models.build_for_dataset(arch, "digits", **kwargs)
    randomize_bn(model, seed=2)
    model.eval()
    folded, report = bnfold.fold(model)
    assert bnfold.count_batchnorm(model) > 0  # the original is untouched
    assert bnfold.count_batchnorm(folded) == 0, str(report)
    assert not report.skipped
    parity = bnfold.compare(model, folded, models.sample_inputs(spec, n=8))
    parity.check(1e-5, f"folded {arch}")


def test_a_trained_checkpoint_folds(tmp_path):
    result = models.train(models.TrainConfig(model="unet", out=str(tmp_path / "unet"), epochs=1, steps_per_epoch=2,
                                             batch_size=16, progress=False, device="cpu"))
    model, spec = models.load_checkpoint(result.best)
    folded, _ = bnfold.fold(model)
    assert bnfold.count_batchnorm(folded) == 0
    parity = bnfold.compare(model, folded, models.sample_inputs(spec, n=8))
    assert parity.max_rel_error <= 1e-5
