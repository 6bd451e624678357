"""The training loop: `train(TrainConfig) -> TrainResult`, single process or under torchrun (DDP).

Per epoch: train (model.train(): BN learns running statistics), evaluate (model.eval(): BN uses
them), append to `metrics.jsonl`, redraw `curves.png`, write `last.pt` (with optimizer,
scheduler and RNG state for `resume`) and `best.pt` when the test metric improved.
"""
from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from bnfold.errors import BnfoldError
from bnfold.options import resolve_threads
from bnfold.progress import progress as progress_bar
from bnfold.models.checkpoint import model_from_payload, read_checkpoint, save_checkpoint, spec_from_payload
from bnfold.models.data import load_datasets
from bnfold.models.distributed import DistContext, from_sync_batchnorm, to_sync_batchnorm
from bnfold.models.factory import build_for_dataset
from bnfold.models.metrics import headline_metric, task_metric
from bnfold.models.spec import ModelSpec

# The config, its defaults and its checks live torch-free in train_config (the CLI reads them).
from .train_config import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, TrainConfig, TrainingError  # noqa: E402


@dataclass
class TrainResult:
    best: Path
    last: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    spec: ModelSpec | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda when available else cpu; asking for an absent CUDA is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device {name!r} asked for, but CUDA is not available on this machine "
                                f"(torch.cuda.is_available() is False); use --device cpu")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise TrainingError(f"device cuda:{index} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise TrainingError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False  # benchmark mode picks kernels by timing: not reproducible


def capture_rng() -> dict[str, Any]:
    """RNG states as plain values and tensors, so they load with weights_only=True."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    # random.setstate wants tuples; a round trip through the checkpoint may turn them into lists.
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]
    wd = config.weight_decay if config.weight_decay is not None else DEFAULT_WEIGHT_DECAY[config.optimizer]
    # No weight decay on BN affine parameters and biases: decaying gamma shrinks activations for nothing.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=_milestones(config.epochs), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _milestones(epochs: int) -> list[int]:
    """The step schedule's x0.1 epochs: half and three quarters of the way."""
    return sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})


def _restretch_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Fit a resumed schedule to a new --epochs: the rate is what the new schedule has at this epoch.

    torch's cosine and step schedulers compute each rate from the previous one, so changing
    T_max or the milestones alone would carry on from the old curve (a finished cosine run sits
    at 0 and would stay there for every added epoch).
    """
    done = scheduler.last_epoch
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        scheduler.T_max = config.epochs
        factor = (1 + math.cos(math.pi * done / config.epochs)) / 2
    elif isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR):
        milestones = _milestones(config.epochs)
        scheduler.milestones = Counter(milestones)
        factor = 0.1 ** sum(done >= m for m in milestones)
    else:
        return
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor


# ---------------------------------------------------------------------------------------------
# One epoch


class _Task:
    """Loss and metric of a task: cross-entropy + accuracy, or BCE + foreground IoU."""

    def __init__(self, task: str) -> None:
        self.segmentation = task == "segmentation"
        self.metric = task_metric(task)
        self.loss = nn.BCEWithLogitsLoss() if self.segmentation else nn.CrossEntropyLoss()

    def counts(self, output: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
        """(numerator, denominator) of the metric for one batch."""
        if self.segmentation:
            pred, truth = output > 0, target > 0.5
            return float((pred & truth).sum()), float((pred | truth).sum())
        return float((output.argmax(1) == target).sum()), float(target.numel())


def train_one_epoch(model: nn.Module, loader: DataLoader, task: _Task, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, *, dist: DistContext, progress: bool,
                    max_steps: int | None = None) -> dict[str, float]:
    model.train()  # BN: normalize with batch statistics and update the running ones
    total = min(len(loader), max_steps) if max_steps else len(loader)
    # A bar on a terminal only; off one, the epoch line that follows the epoch is the progress.
    bar = progress_bar(loader, total=total, desc=f"epoch {epoch}", unit="batch", enabled=progress, summary=False)
    loss_sum = num = den = 0.0
    samples = 0
    for step, (x, y) in enumerate(bar, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        output = model(x)
        loss = task.loss(output, y)
        if dist.any_true(not bool(torch.isfinite(loss)), device):
            where = " on at least one rank" if dist.enabled else ""
            raise TrainingError(f"loss became {loss.item()} at epoch {epoch}, step {step}{where}; "
                                f"try a lower --lr (now {optimizer.param_groups[0]['lr']:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_num, batch_den = task.counts(output.detach(), y)
        loss_sum += loss.item() * len(x)
        samples += len(x)
        num, den = num + batch_num, den + batch_den
        bar.set_postfix(loss=f"{loss_sum / samples:.4f}", **{task.metric: f"{num / max(den, 1):.4f}"})
        if step >= total:
            break
    bar.close()
    return {"train_loss": loss_sum / max(samples, 1), f"train_{task.metric}": num / max(den, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: _Task, device: torch.device) -> dict[str, float]:
    """Loss and metric over the whole eval split, in eval mode (BN uses its running statistics)."""
    was_training = model.training
    model.eval()
    loss_sum = num = den = 0.0
    samples = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        output = model(x)
        loss_sum += task.loss(output, y).item() * len(x)
        samples += len(x)
        batch_num, batch_den = task.counts(output, y)
        num, den = num + batch_num, den + batch_den
    model.train(was_training)
    return {"test_loss": loss_sum / max(samples, 1), f"test_{task.metric}": num / max(den, 1)}


# ---------------------------------------------------------------------------------------------
# Files


def write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in history))


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss and metric curves, train and test, against the epoch."""
    from bnfold.models.plotting import pyplot  # matplotlib only when curves are drawn

    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    metric = (headline_metric(history[-1])[0] or "test_accuracy").removeprefix("test_")
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_metric.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train (augmented)")
    ax_metric.plot(epochs, [r[f"test_{metric}"] for r in history], "o-", label="test")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=metric)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plain_model(model: nn.Module) -> nn.Module:
    """The module to save: DDP unwrapped, SyncBatchNorm turned back into plain BatchNorm."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if any(isinstance(m, nn.SyncBatchNorm) for m in inner.modules()):
        inner = from_sync_batchnorm(copy.deepcopy(inner))
    return inner


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class _State:
    start_epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = -math.inf


def _loaders(config: TrainConfig, train_ds: Dataset, test_ds: Dataset, dist: DistContext,
             device: torch.device) -> tuple[DataLoader, DataLoader, Any]:
    generator = torch.Generator()
    if dist.enabled:
        sampler: Any = torch.utils.data.DistributedSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank,
                                                           shuffle=True, seed=config.seed)
    else:
        sampler = RandomSampler(train_ds, generator=generator)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                              pin_memory=pin, drop_last=len(train_ds) > config.batch_size * dist.world_size,
                              generator=generator, persistent_workers=False)
    test_loader = DataLoader(test_ds, batch_size=config.eval_batch_size, shuffle=False,
                             num_workers=config.workers, pin_memory=pin)
    return train_loader, test_loader, (sampler, generator)


def _resume(config: TrainConfig, out: Path, model: nn.Module, spec: ModelSpec,
            optimizer: torch.optim.Optimizer, scheduler: Any) -> _State:
    last = out / "last.pt"
    if not last.is_file():
        raise TrainingError(f"--resume: there is no {str(last)!r} to continue from")
    payload = read_checkpoint(last)
    saved = spec_from_payload(payload, last)
    if (saved.arch, saved.dataset, saved.arch_kwargs) != (spec.arch, spec.dataset, spec.arch_kwargs):
        raise TrainingError(f"--resume: {str(last)!r} holds {saved.arch} {saved.arch_kwargs} on {saved.dataset}, "
                            f"but this run asks for {spec.arch} {spec.arch_kwargs} on {spec.dataset}")
    if "optimizer" not in payload or "rng" not in payload:
        raise TrainingError(f"--resume: {str(last)!r} has no optimizer/RNG state (is it a best.pt copy?)")
    restored, _ = model_from_payload(payload, last)
    model.load_state_dict(restored.state_dict())
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    restore_rng(payload["rng"])
    if payload.get("config", {}).get("epochs", config.epochs) != config.epochs:
        _restretch_schedule(config, optimizer, scheduler)  # --epochs has grown: anneal to the new end
    history = list(payload.get("history", []))
    metric = f"test_{_Task(spec.task).metric}"
    best = max((r[metric] for r in history), default=-math.inf)
    return _State(start_epoch=saved.epoch + 1, history=history, best_metric=best)


# What marks a folder as holding a run: replacing these without being asked loses a trained model.
RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl")


def _check_out(config: TrainConfig) -> None:
    """A folder that holds a run is continued (--resume) or replaced (--force), never silently overwritten."""
    if config.resume and config.force:
        raise TrainingError("--resume and --force contradict each other: continue the run, or start it afresh")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {str(out)!r} is a file; give a folder for the run")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (config.resume or config.force):
        raise TrainingError(f"{str(out)!r} already holds a run ({', '.join(found)}); pass --resume to continue "
                            "it, --force to train afresh and replace it, or choose another --out")
    if found and config.force:
        # Afresh means afresh: a run that fails in its first epoch must not leave the old best.pt beside it.
        for name in (*RUN_FILES, "curves.png"):
            (out / name).unlink(missing_ok=True)


def train(config: TrainConfig) -> TrainResult:
    """Train `config.model` on `config.dataset`; write OUT/best.pt, last.pt, metrics.jsonl, curves.png.

    A folder that already holds a run needs `resume` (continue from last.pt) or `force` (replace it).
    """
    _check_out(config)
    torch.set_num_threads(resolve_threads(config.threads))
    dist = DistContext.from_env()
    device = resolve_device(config.device, dist.local_rank)
    if config.sync_bn and device.type != "cuda":
        raise TrainingError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm only runs on GPU modules, "
                            f"and this run's device is {device}")
    if config.sync_bn and not dist.enabled:
        raise TrainingError("--sync-bn only makes sense under torchrun with more than one process "
                            "(WORLD_SIZE is 1)")
    dist.init(device)
    try:
        return _train(config, dist, device)
    finally:
        dist.close()


def _train(config: TrainConfig, dist: DistContext, device: torch.device) -> TrainResult:
    seed_everything(config.seed)
    out = Path(config.out)
    model, spec = build_for_dataset(config.model, config.dataset, input_size=config.input_size, data_root=config.data_root,
                         norm=config.norm, activation=config.activation, bn_momentum=config.bn_momentum,
                         bn_eps=config.bn_eps)
    task = _Task(spec.task)
    # Rank 0 downloads (when allowed) while the others wait, then they read the same files.
    if not dist.is_main:
        dist.barrier()
    train_ds, test_ds = load_datasets(spec, config.data_root, download=config.download and dist.is_main)
    if dist.is_main:
        dist.barrier()
        tqdm.write(_data_line(spec, train_ds, test_ds))
    model.to(device)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer)
    state = _resume(config, out, model, spec, optimizer, scheduler) if config.resume else _State()
    if state.start_epoch > config.epochs:
        raise TrainingError(f"nothing to do: {str(out / 'last.pt')!r} already reached epoch {state.start_epoch - 1}"
                            f" >= --epochs {config.epochs}; raise --epochs to train further")
    if config.resume and dist.is_main:
        tqdm.write(f"resuming from epoch {state.start_epoch} of {config.epochs} "
                   f"({out / 'last.pt'} finished epoch {state.start_epoch - 1})")
    if config.sync_bn:
        model = to_sync_batchnorm(model)
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_loader, test_loader, (sampler, generator) = _loaders(config, train_ds, test_ds, dist, device)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if dist.enabled:
            backend = torch.distributed.get_backend()
            tqdm.write(f"distributed: {dist.world_size} processes ({backend}), batch {config.batch_size} per process"
                       f"{', SyncBatchNorm' if config.sync_bn else ''}")
    progress = config.progress and dist.is_main
    best_path, last_path = out / "best.pt", out / "last.pt"
    try:   # Ctrl-C: say what is on disk and how to continue, then let the CLI exit 130
        for epoch in range(state.start_epoch, config.epochs + 1):
            # Shuffling depends on (seed, epoch) only, so a resumed run sees the same batches.
            generator.manual_seed(config.seed * 1000 + epoch)
            if dist.enabled:
                sampler.set_epoch(epoch)
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            record: dict[str, Any] = {"epoch": epoch, "lr": lr}
            record.update(train_one_epoch(model, train_loader, task, optimizer, device, epoch, dist=dist,
                                          progress=progress, max_steps=config.steps_per_epoch))
            scheduler.step()
            if dist.is_main:
                plain = _plain_model(model)  # a copy under SyncBatchNorm: made once for eval and save
                record.update(evaluate(plain, test_loader, task, device))
                record["seconds"] = round(time.perf_counter() - started, 3)
                state.history.append(record)
                _save_epoch(config, plain, spec, optimizer, scheduler, state, record, task, out)
                tqdm.write(_epoch_line(record, config.epochs, task.metric))
            dist.barrier()  # nobody runs ahead while rank 0 writes
    except KeyboardInterrupt:
        if dist.is_main:
            print(interrupted_message(config, state, task.metric), file=sys.stderr, flush=True)
        raise
    if not dist.is_main:
        return TrainResult(best=best_path, last=last_path, history=[], spec=spec)
    spec.epoch = state.history[-1]["epoch"]
    return TrainResult(best=best_path, last=last_path, history=state.history, spec=spec)


def interrupted_message(config: TrainConfig, state: _State, metric: str) -> str:
    """What Ctrl-C left on disk and the command that continues from it."""
    out = Path(config.out)
    epoch = state.history[-1]["epoch"] + 1 if state.history else state.start_epoch
    head = f"interrupted in epoch {epoch} of {config.epochs}"
    if not state.history:
        return f"{head}, before any epoch finished: nothing was saved in {str(out)!r}"
    key = f"test_{metric}"
    best = max(state.history, key=lambda r: r.get(key, -math.inf))
    command = (f"bnfold train --model {config.model} --dataset {config.dataset} --epochs {config.epochs} "
               f"--out {out} --resume")
    return (f"{head}: {out / 'last.pt'} holds epoch {state.history[-1]['epoch']} (best.pt: epoch {best['epoch']}, "
            f"{metric} {best.get(key, float('nan')):.4f}); to continue, run the same command with --resume, "
            f"e.g. {command}")


def _save_epoch(config: TrainConfig, plain: nn.Module, spec: ModelSpec, optimizer: torch.optim.Optimizer,
                scheduler: Any, state: _State, record: dict[str, Any], task: _Task, out: Path) -> None:
    """Write last.pt, best.pt (when the test metric improved), metrics.jsonl and curves.png.

    `plain` is the model as `_plain_model` returns it: no DDP wrapper, no SyncBatchNorm.
    """
    spec.epoch = record["epoch"]
    spec.metrics = {k: float(v) for k, v in record.items() if k.startswith(("test_", "train_"))}
    config_dict = asdict(config)
    save_checkpoint(out / "last.pt", plain, spec, extra={
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng(),
        "history": state.history, "config": config_dict})
    metric = record[f"test_{task.metric}"]
    if metric > state.best_metric:
        state.best_metric = metric
        save_checkpoint(out / "best.pt", plain, spec, extra={"history": state.history, "config": config_dict})
    write_metrics(state.history, out / "metrics.jsonl")
    plot_curves(state.history, out / "curves.png", title=f"{spec.arch} on {spec.dataset}")


def _data_line(spec: ModelSpec, train_ds: Dataset, test_ds: Dataset) -> str:
    """What the run learns from, said once before the first epoch: classes, split sizes, input shape."""
    labels = spec.labels if len(spec.labels) <= 12 else [*spec.labels[:12], "..."]
    return (f"data: {spec.dataset}, {len(spec.labels)} classes ({', '.join(labels)}); train {len(train_ds)}, "
            f"eval {len(test_ds)} samples; input shape {'x'.join(map(str, spec.input_shape))}")


def _epoch_line(record: dict[str, Any], epochs: int, metric: str) -> str:
    return (f"epoch {record['epoch']}/{epochs}  lr {record['lr']:.3g}  "
            f"train loss {record['train_loss']:.4f} {metric} {record[f'train_{metric}']:.4f}  |  "
            f"test loss {record['test_loss']:.4f} {metric} {record[f'test_{metric}']:.4f}  "
            f"({record['seconds']:.1f}s)")


def train_summary(result: TrainResult) -> str:
    """A few lines for the console: the final and best test metric and where the files are."""
    metric = headline_metric(result.final)[0] or "test_accuracy"
    best = max(result.history, key=lambda r: r[metric])
    seconds = sum(r.get("seconds", 0.0) for r in result.history)
    return (f"final epoch {result.final['epoch']}: {metric} {result.final[metric]:.4f}\n"
            f"best  epoch {best['epoch']}: {metric} {best[metric]:.4f} -> {result.best}\n"
            f"last checkpoint -> {result.last}\n"
            f"training time {seconds:.1f}s over {len(result.history)} epoch(s)")
