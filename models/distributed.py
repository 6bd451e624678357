"""Training past one process: torchrun environment, process group, SyncBatchNorm there and back."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from bnfold.errors import BnfoldError

# The original BN class is remembered on each SyncBatchNorm so the conversion back is exact.
_ORIGINAL_CLASS = "_bnfold_bn_class"


@dataclass
class DistContext:
    """Where this process stands in a torchrun job (world_size 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them."""
        try:
            return cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError as exc:
            raise BnfoldError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None

    def init(self, device: torch.device) -> None:
        """Join the process group: nccl for CUDA, gloo on CPU."""
        if not self.enabled or torch.distributed.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)

    def barrier(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """True when `flag` holds on any rank (so every rank stops together, none waits forever)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(value)
        return bool(value.item() > 0)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm`, remembering each BN's class for the way back."""
    classes = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, module in converted.named_modules():
        if isinstance(module, nn.SyncBatchNorm) and name in classes:
            setattr(module, _ORIGINAL_CLASS, classes[name])
    return converted


def from_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm by the plain BatchNorm it came from, keeping params and stats.

    Fold and export then see the same modules as a single-process run produced.
    """
    if isinstance(module, nn.SyncBatchNorm):
        cls = getattr(module, _ORIGINAL_CLASS, nn.BatchNorm2d)
        plain = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                    track_running_stats=module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                plain.weight.copy_(module.weight)
                plain.bias.copy_(module.bias)
                plain.weight.requires_grad_(module.weight.requires_grad)
                plain.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            plain.running_mean = module.running_mean
            plain.running_var = module.running_var
            plain.num_batches_tracked = module.num_batches_tracked
        plain.train(module.training)
        plain.to(next(iter(module.buffers()), torch.empty(0)).device)
        return plain
    for name, child in module.named_children():
        replacement = from_sync_batchnorm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
