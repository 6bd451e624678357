"""`TrainConfig`: everything `bnfold train` takes, its defaults and its checks, without importing torch.

`bnfold train` builds it with `bnfold.options.from_args` (its parser reads the defaults from here);
`models.train(config)` runs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from bnfold.errors import BnfoldError

DEFAULT_LR = {"sgd": 0.1, "adamw": 3e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}
OPTIMIZERS = tuple(DEFAULT_LR)
SCHEDULES = ("cosine", "step", "none")
NORMS = ("bn", "none")


class TrainingError(BnfoldError):
    """Training cannot start or cannot go on (bad option, NaN loss, nothing to resume)."""


@dataclass
class TrainConfig:
    """Everything `bnfold train` takes; the defaults train LeNet-BN on the bundled digits."""

    model: str = "lenet"
    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    epochs: int = 5
    batch_size: int = 64                 # per process under torchrun
    lr: float | None = None              # None: 0.1 for sgd, 3e-3 for adamw
    optimizer: str = "adamw"             # "sgd" (momentum 0.9, nesterov) or "adamw"
    schedule: str = "cosine"             # "cosine", "step" (x0.1 at 1/2 and 3/4) or "none"
    weight_decay: float | None = None    # None: 5e-4 for sgd, 1e-2 for adamw
    norm: str = "bn"                     # "bn" or "none"
    activation: str | None = None        # lenet: "relu" (its default), "sigmoid" or "tanh"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    sync_bn: bool = False
    seed: int = 0
    device: str = "cpu"                  # cpu, cuda, cuda:N or auto, as every command's --device
    workers: int = 0
    out: str = "runs/train"
    resume: bool = False
    force: bool = False                  # train afresh into a folder that already holds a run
    progress: bool = True
    input_size: int | tuple[int, int] | None = None   # None: the architecture's default for the dataset
    steps_per_epoch: int | None = None   # cap on optimizer steps per epoch (smoke tests)
    eval_batch_size: int = 256
    threads: int = 0                     # torch intra-op threads; 0: the CPUs this process may use

    def __post_init__(self) -> None:
        if isinstance(self.input_size, (tuple, list)):   # --input-size H[,W], as export's
            height, width = self.input_size
            if height != width:
                raise TrainingError(f"--input-size: the architectures train on square inputs, got {height},{width}")
            self.input_size = int(height)
        if self.epochs <= 0:
            raise TrainingError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise TrainingError(f"batch_size must be positive, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}; choose sgd or adamw")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown schedule {self.schedule!r}; choose cosine, step or none")
        if self.norm not in NORMS:
            raise TrainingError(f"unknown norm {self.norm!r}; choose bn or none")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise TrainingError(f"bn_momentum must be in [0, 1], got {self.bn_momentum}")
        if self.bn_eps <= 0:
            raise TrainingError(f"bn_eps must be positive, got {self.bn_eps}")
        if self.threads is None or self.threads < 0:
            raise TrainingError(f"threads must be 0 (the CPUs this process may use) or more, got {self.threads}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise TrainingError(f"steps_per_epoch must be positive, got {self.steps_per_epoch}")
        if self.workers < 0:
            raise TrainingError(f"workers must be 0 or more, got {self.workers}")


__all__ = ["TrainConfig", "TrainingError", "DEFAULT_LR", "DEFAULT_WEIGHT_DECAY", "OPTIMIZERS", "SCHEDULES", "NORMS"]
