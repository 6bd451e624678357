"""One-file checkpoints: state dict + spec, loaded with `torch.load(weights_only=True)`.

On disk: a dict {"format": "bnfold-checkpoint", "format_version": 1, "spec": spec.to_dict(),
"state_dict": ..., and optionally "optimizer", "scheduler", "rng", "history", ...}. Loading never
unpickles arbitrary objects, so a checkpoint from someone else cannot run code.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import BnfoldError, first_line
from bnfold.models.registry import build
from bnfold.models.spec import ModelSpec, SpecVersionError

FORMAT = "bnfold-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(BnfoldError):
    """A checkpoint that is missing, corrupt, foreign, or does not match its own spec."""


def save_checkpoint(path: str | os.PathLike, model: nn.Module, spec: ModelSpec, *,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write model weights and spec (plus `extra` entries, e.g. optimizer state) to one file.

    Writes to a temporary name first and renames, so a crash never leaves half a checkpoint.
    """
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        # Through JSON: plain types only (a TorchVersion or numpy float would not load weights_only).
        "spec": json.loads(spec.to_json()),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    for key, value in (extra or {}).items():
        if key in payload:
            raise CheckpointError(f"extra key {key!r} would overwrite the checkpoint's own entry")
        payload[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, checked to be ours (format, version, spec, state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and plain containers.
        raise CheckpointError(f"{str(path)!r} is not a bnfold checkpoint: it holds objects that "
                              f"weights_only loading refuses ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - torch.load surfaces corrupt bytes as many types (IndexError too)
        raise CheckpointError(f"{str(path)!r} is corrupt or not a torch file: "
                              f"{first_line(exc, with_type=True)}") from None
    return check_payload(payload, path)


def check_payload(payload: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, Any]:
    """`payload` (what torch.load returned) checked to be a bnfold checkpoint: format, version, spec, weights."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        kind = type(payload).__name__
        raise CheckpointError(f"{str(path)!r} is not a bnfold checkpoint (a {kind} without "
                              f"format={FORMAT!r}); train one with `bnfold train`")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint format_version "
                              f"{payload.get('format_version')!r}; this bnfold reads {FORMAT_VERSION}")
    if not isinstance(payload.get("state_dict"), dict) or not isinstance(payload.get("spec"), dict):
        raise CheckpointError(f"{str(path)!r} lacks a state_dict or spec")
    return payload


def spec_from_payload(payload: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> ModelSpec:
    try:
        return ModelSpec.from_dict(payload["spec"])
    except SpecVersionError as exc:  # a bnfold checkpoint, just a newer one: not "unreadable"
        raise SpecVersionError(f"{str(path)!r}: {exc}") from None
    except (TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{str(path)!r} has an unreadable spec: {exc}") from None


def model_from_payload(payload: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> tuple[nn.Module, ModelSpec]:
    spec = spec_from_payload(payload, path)
    try:
        model = build(spec.arch, **spec.arch_kwargs)
    except BnfoldError as exc:
        raise CheckpointError(f"{str(path)!r}: cannot rebuild its model from the spec: {exc}") from None
    state = payload["state_dict"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r}: its state_dict holds values that are not tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # Missing/unexpected keys or shape mismatches: the weights do not belong to this spec.
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{str(path)!r}: its weights do not match its spec ({spec.arch} "
                              f"{spec.arch_kwargs}): {detail[:500]}") from None
    return model.eval(), spec


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the module from the checkpoint's spec and load its weights; the module is in eval mode."""
    return model_from_payload(read_checkpoint(path, map_location), path)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a readable bnfold checkpoint (format and spec present)."""
    try:
        payload = read_checkpoint(path)
        spec_from_payload(payload, path)
    except CheckpointError:
        return False
    return True
