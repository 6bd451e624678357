"""One model loader for every command: whatever file (or name) the user has, a module or an ONNX path out.

    loaded = load_model("r18.pt", trust_pickle=True, input_shape=(1, 3, 64, 64))
    loaded.module, loaded.spec_with(SpecOptions(labels=[...]))

What it takes, detected from the file's bytes once (not from its name):

| source | kind | needs |
|---|---|---|
| `bnfold train`'s best.pt | checkpoint | nothing: architecture, shape and labels are in its spec |
| `torch.save(model.state_dict())` | state_dict | `model_class` ("FILE.py:Class", "package.module:Class", "torchvision:NAME", "timm:NAME") |
| `torch.save(model)` | pickle | `trust_pickle=True` (unpickling runs code from the file) |
| `torch.jit.save` file | torchscript | |
| `torch.export.save` file (.pt2) | program | |
| an ONNX file | onnx | nothing (bench: onnxruntime and HTTP rows; export: fold-onnx + spec) |
| "torchvision:resnet18", "timm:NAME" | torchvision / timm | `weights` (a state_dict file) for trained weights |

`input_shape` (batch included) is needed wherever the file does not say it: pickles, state_dicts,
TorchScript. Every failure is a `LoaderError` whose one line says what the file is and what to do.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import BnfoldError, first_line
from bnfold.models.spec import SPEC_METADATA_KEY, ModelSpec
from bnfold.models.spec_options import IMAGENET_MEAN, IMAGENET_STD, SpecOptions, apply_options, build_spec

KINDS = ("checkpoint", "state_dict", "pickle", "torchscript", "program", "onnx", "torchvision", "timm")
_FILE_KINDS_HELP = ("a bnfold checkpoint, a state_dict (with --model-class), a torch.save'd module "
                    "(with --trust-pickle), a TorchScript file, a torch.export .pt2 or an ONNX file")
# Keys under which training scripts commonly nest a state_dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


class LoaderError(BnfoldError):
    """A model source that cannot be loaded as given; the message says what it is and what to pass."""


@dataclass
class LoadedModel:
    """A loaded model and what is known about it.

    `module` is a CPU eval-mode `nn.Module` (None for ONNX, then `onnx_path` is set); `spec` is
    the model's own (a checkpoint's, an ONNX file's metadata) or None; `input_shape` has the
    batch first and is None when neither the file nor the caller said it.
    """

    kind: str
    source: str
    module: nn.Module | None = None
    onnx_path: Path | None = None
    spec: ModelSpec | None = None
    input_shape: tuple[int, ...] | None = None
    description: str = ""
    name: str = "model"
    default_mean: list[float] | None = field(default=None, repr=False)
    default_std: list[float] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        shape = ",".join(map(str, self.input_shape)) if self.input_shape else "unknown (pass --input-shape)"
        return f"{self.source}: {self.description}; input shape {shape}"

    def require_module(self, command: str) -> nn.Module:
        if self.module is None:
            hint = "; fold an ONNX file with `bnfold fold-onnx IN OUT`" if command == "fold" else ""
            raise LoaderError(f"{self.source} is an ONNX file; `bnfold {command}` needs a PyTorch model "
                              f"(a checkpoint, a state_dict with --model-class, a pickled module or TorchScript){hint}")
        return self.module

    def require_shape(self) -> tuple[int, ...]:
        if self.input_shape is None:
            raise LoaderError(f"the input shape of {self.source} ({self.description}) is not stored in it: "
                              f"pass --input-shape with the batch dimension first, e.g. "
                              f"--input-shape {example_shape(self.module)}")
        return self.input_shape

    def output_shape(self) -> tuple[int, ...]:
        """The output shape of one forward pass on zeros of `input_shape` (a module's), or of the ONNX graph."""
        shape = self.require_shape()
        if self.module is None:
            return _onnx_output_shape(self.onnx_path, shape)  # type: ignore[arg-type]
        from bnfold.parity import module_dtype

        dtype = module_dtype(self.module)
        try:
            with torch.no_grad():
                out = self.module(torch.zeros(shape, dtype=dtype))
        except Exception as exc:  # noqa: BLE001 - the user's model rejects the shape in its own words
            raise LoaderError(f"{self.source} failed on an input of shape {','.join(map(str, shape))} "
                              f"({first_line(exc, with_type=True)}); check --input-shape "
                              f"(batch first, e.g. {example_shape(self.module)})") from None
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if isinstance(out, dict) and out:
            out = next(iter(out.values()))
        if not isinstance(out, torch.Tensor):
            raise LoaderError(f"{self.source} returns a {type(out).__name__}, not a tensor; bnfold handles "
                              "models with one tensor in and one tensor out")
        return tuple(out.shape)

    def spec_with(self, options: SpecOptions | None = None) -> ModelSpec:
        """The model's spec with the user's options laid over it, or one built for a model without a spec.

        A built spec names the classes "0".."N-1" from the output's width unless `--labels` says
        otherwise; mean/std default to the source's convention (ImageNet for torchvision/timm,
        else 0 and 1).
        """
        options = options or SpecOptions()
        if self.spec is not None:
            return apply_options(self.spec, options)
        shape = self.require_shape()
        out = self.output_shape()
        classes = out[-1] if len(out) == 2 else None
        return build_spec(self.name, shape, options, num_classes=classes, default_mean=self.default_mean,
                          default_std=self.default_std,
                          task="classification" if classes is not None else "unknown")


def example_shape(module: nn.Module | None) -> str:
    """An --input-shape example that fits the model's first layer where one can be read (1,3,H,W for RGB)."""
    first = _first_layer(module)
    if isinstance(first, nn.Conv1d):
        return f"1,{first.in_channels},LENGTH"
    if isinstance(first, nn.Conv3d):
        return f"1,{first.in_channels},DEPTH,HEIGHT,WIDTH"
    if isinstance(first, nn.Conv2d):
        return f"1,{first.in_channels},224,224 (batch,channels,height,width)"
    if isinstance(first, nn.Linear):
        return f"1,{first.in_features}"
    return "1,3,224,224 (batch,channels,height,width)"


def _first_layer(module: nn.Module | None) -> nn.Module | None:
    if module is None:
        return None
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return sub
    return None


def check_input_shape(module: nn.Module | None, shape: Sequence[int], source: str) -> tuple[int, ...]:
    """Refuse a shape that cannot fit the model's first layer, with an example built from that layer.

    The common mistake is leaving out the batch dimension (3,224,224 for a Conv2d model).
    """
    shape = tuple(int(d) for d in shape)
    first = _first_layer(module)
    wanted = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}.get(type(first))
    if wanted is not None and len(shape) != wanted:
        hint = f"1,{','.join(map(str, shape))}" if len(shape) == wanted - 1 else example_shape(module)
        raise LoaderError(f"--input-shape {','.join(map(str, shape))} has {len(shape)} dimensions, but "
                          f"{source} starts with a {type(first).__name__}, which takes {wanted} with the "
                          f"batch first: try --input-shape {hint}")
    channels = getattr(first, "in_channels", None)
    if wanted is not None and channels is not None and shape[1] != channels:
        example = ",".join(map(str, (shape[0], channels, *shape[2:])))
        raise LoaderError(f"--input-shape {','.join(map(str, shape))} gives {shape[1]} channels, but the first "
                          f"layer of {source} takes {channels}: try --input-shape {example}")
    return shape


# ---------------------------------------------------------------------------------------------
# Entry point


def load_model(source: str | os.PathLike, *, model_class: str | None = None,
               model_args: str | dict[str, Any] | list[Any] | None = None, weights: str | os.PathLike | None = None,
               trust_pickle: bool = False, input_shape: Sequence[int] | None = None) -> LoadedModel:
    """Load `source` as whatever it is (see the module docstring); the module is on the CPU in eval mode.

    `model_class` names the architecture of a state_dict ("FILE.py:Class", "package.module:Class",
    "torchvision:NAME", "timm:NAME"), built with `model_args` (a JSON object of keyword arguments
    or a list of positional ones). `weights` is a state_dict file for a "torchvision:NAME" or
    "timm:NAME" source. `input_shape` (batch first) overrides the shape read from the file.
    """
    args = _parse_model_args(model_args)
    text = os.fspath(source)
    if text.startswith(("torchvision:", "timm:")) and not Path(text).exists():
        loaded = _from_zoo(text, args, weights)
    else:
        if weights is not None:
            raise LoaderError("--weights goes with a torchvision:NAME or timm:NAME model; for a state_dict file "
                              "pass the file itself and --model-class")
        loaded = _from_file(Path(source), model_class, args, trust_pickle)
    if input_shape is not None:
        loaded.input_shape = check_input_shape(loaded.module, input_shape, loaded.source)
    return loaded


def _from_file(path: Path, model_class: str | None, args: Any, trust_pickle: bool) -> LoadedModel:
    source = str(path)
    if path.is_dir():
        found = [p.name for p in sorted(path.iterdir()) if p.suffix in (".pt", ".pth", ".onnx", ".ts", ".pt2")][:5]
        hint = f" It holds {', '.join(found)}: pass one of those." if found else ""
        raise LoaderError(f"{source!r} is a folder, not a model file; give {_FILE_KINDS_HELP}.{hint}")
    if not path.is_file():
        raise LoaderError(f"no file at {source!r}")
    kind = detect_kind(path)
    if kind == "onnx":
        return _from_onnx(path)
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():  # torch.jit.load warns that TorchScript is deprecated
                warnings.simplefilter("ignore")
                module = torch.jit.load(os.fspath(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise LoaderError(f"{source!r} looks like a TorchScript file but torch.jit.load failed: "
                              f"{first_line(exc)}") from None
        return LoadedModel("torchscript", source, module=module.eval(), name=path.stem,
                           description="a TorchScript file (torch.jit.save)")
    if kind == "program":
        try:
            program = torch.export.load(os.fspath(path))
        except Exception as exc:  # noqa: BLE001
            raise LoaderError(f"{source!r} looks like a torch.export file but torch.export.load failed: "
                              f"{first_line(exc)}") from None
        shape = None
        with contextlib.suppress(Exception):  # example inputs are optional in a .pt2
            shape = (1, *tuple(program.example_inputs[0][0].shape[1:]))
        return LoadedModel("program", source, module=program.module(), input_shape=shape, name=path.stem,
                           description="a torch.export program (.pt2)")
    return _from_torch_save(path, model_class, args, trust_pickle)


def detect_kind(path: Path) -> str:
    """"onnx", "torchscript", "program" or "torch" (a torch.save file) from the file's bytes."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names) or any(n.endswith("/models/model.json") for n in names):
            return "program"
        return "torch"
    if head.startswith(b"PK"):
        raise LoaderError(f"{str(path)!r} is a truncated or corrupt torch file (a zip archive without its "
                          "directory); save it again")
    if head[:1] == b"\x80":  # pickle protocol marker: torch.save's legacy (non-zip) format
        return "torch"
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, TypeError):
        model = None
    if model is not None and model.graph.node:
        return "onnx"
    raise LoaderError(f"{str(path)!r} is not a model file bnfold can read: expected {_FILE_KINDS_HELP}")


def is_onnx_file(source: str | os.PathLike) -> bool:
    """True for an existing file whose bytes are ONNX (a cheap look before choosing defaults)."""
    path = Path(source)
    try:
        return path.is_file() and detect_kind(path) == "onnx"
    except LoaderError:
        return False


def _from_onnx(path: Path) -> LoadedModel:
    import onnx

    from bnfold.onnx_fold import graph_inputs

    model = onnx.load(os.fspath(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    spec = None
    if SPEC_METADATA_KEY in props:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            spec = ModelSpec.from_json(props[SPEC_METADATA_KEY])
    shape = None
    inputs = graph_inputs(model)
    if len(inputs) == 1:
        dims = []
        for axis, dim in enumerate(inputs[0].type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif axis == 0:
                dims.append(1)  # a symbolic batch axis: batch 1
            else:
                dims = None
                break
        shape = tuple(dims) if dims else None
    if spec is not None and shape is None:
        shape = (1, *spec.input_shape)
    what = "an ONNX file written by bnfold export" if spec is not None else "an ONNX file (no bnfold spec inside)"
    return LoadedModel("onnx", str(path), onnx_path=path, spec=spec, input_shape=shape,
                       name=spec.arch if spec is not None else path.stem, description=what)


def _onnx_output_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    import numpy as np

    from bnfold.sessions import cpu_session

    try:
        session = cpu_session(path, 1)
        x = np.zeros(shape, dtype=np.float32)
        return tuple(session.run(None, {session.get_inputs()[0].name: x})[0].shape)
    except Exception as exc:  # noqa: BLE001
        raise LoaderError(f"onnxruntime could not run {str(path)!r} on an input of shape "
                          f"{','.join(map(str, shape))} ({first_line(exc)}); check --input-shape") from None


# ---------------------------------------------------------------------------------------------
# torch.save files


def _from_torch_save(path: Path, model_class: str | None, args: Any, trust_pickle: bool) -> LoadedModel:
    source = str(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "weights only" not in str(exc).lower():
            raise LoaderError(f"{source!r} is a corrupt torch file ({first_line(exc)})") from None
        if not trust_pickle:
            raise LoaderError(
                f"{source!r} holds pickled Python objects (a whole model saved with torch.save(model)?). "
                "Unpickling runs code from the file, so bnfold does it only with --trust-pickle; safer: save "
                "model.state_dict() and pass --model-class FILE.py:Class") from None
        return _unpickle(path, model_class)
    except Exception as exc:  # noqa: BLE001 - torch.load fails on bad bytes as many types
        raise LoaderError(f"{source!r} is a corrupt or truncated torch file ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None
    if isinstance(obj, dict) and obj.get("format") == "bnfold-checkpoint":
        from bnfold.models.checkpoint import check_payload, model_from_payload

        module, spec = model_from_payload(check_payload(obj, path), path)
        return LoadedModel("checkpoint", source, module=module, spec=spec, input_shape=(1, *spec.input_shape),
                           name=spec.arch, description=f"a bnfold checkpoint ({spec.arch} on {spec.dataset})")
    state = _state_dict_in(obj)
    if state is None:
        raise LoaderError(f"{source!r} holds a {type(obj).__name__}, not a model or a state_dict; "
                          f"expected {_FILE_KINDS_HELP}")
    if model_class is None:
        example = next(iter(state), "?")
        raise LoaderError(f"{source!r} is a state_dict ({len(state)} tensors, e.g. {example!r}): it has the "
                          "weights but not the architecture; pass --model-class FILE.py:Class (or "
                          "package.module:Class, torchvision:NAME, timm:NAME) and --model-args JSON if "
                          "the class takes arguments")
    module, built = build_class(model_class, args)
    _load_weights(module, state, source, built)
    loaded = LoadedModel("state_dict", source, module=module.eval(), name=_class_name(module),
                         description=f"a state_dict loaded into {built}")
    if model_class.startswith(("torchvision:", "timm:")):
        _zoo_defaults(loaded, module, model_class.split(":", 1)[0])
    return loaded


def _state_dict_in(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a state_dict, also when nested under "state_dict", "model", ... or prefixed by DataParallel."""
    if not isinstance(obj, dict) or not obj:
        return None
    if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
            return {k[len("module."):]: v for k, v in obj.items()}
        return obj
    for key in _NESTED_STATE_KEYS:
        if key in obj:
            inner = _state_dict_in(obj[key])
            if inner is not None:
                return inner
    return None


def _load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str, built: str) -> None:
    """Strict: a key missing or left over means the class or its arguments are not the saved ones."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing = [k for k in module.state_dict() if k not in state]
        unexpected = [k for k in state if k not in module.state_dict()]
        own = module.state_dict()
        shapes = [f"{k} is {list(v.shape)} in the file, {list(own[k].shape)} in the model"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if missing or unexpected:
            detail = f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected " \
                     f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        elif shapes:
            detail = "; ".join(shapes[:2]) + ("; ..." if len(shapes) > 2 else "")
        else:
            detail = " ".join(str(exc).split())[:300]
        raise LoaderError(f"the weights in {source!r} do not fit {built}: {detail}; check --model-class "
                          "and --model-args") from None


def _unpickle(path: Path, model_class: str | None) -> LoadedModel:
    source = str(path)
    _cwd_on_path()
    if model_class is not None and not model_class.startswith(("torchvision:", "timm:")):
        # A module saved from a script run as `python train.py` pickles its class as __main__.Net;
        # naming the class lets us put it where the pickle looks for it.
        cls = import_class(model_class)
        main = sys.modules["__main__"]
        if not hasattr(main, cls.__name__):
            setattr(main, cls.__name__, cls)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except AttributeError as exc:
        match = re.search(r"Can't get attribute '(\w+)' on <module '[\w.]*__main__'", str(exc))
        if match:
            raise LoaderError(
                f"{source!r} was saved from a script run directly (python SCRIPT.py), so its class "
                f"{match.group(1)!r} is recorded as __main__.{match.group(1)}; pass --model-class "
                f"SCRIPT.py:{match.group(1)} to say where it is defined") from None
        raise LoaderError(f"{source!r} needs a class that its module no longer has ({first_line(exc)})") from None
    except ModuleNotFoundError as exc:
        raise LoaderError(
            f"{source!r} needs the Python module {exc.name!r} that defined its class: run bnfold from the folder "
            f"holding {exc.name.split('.')[0] if exc.name else 'it'}.py, or set PYTHONPATH to that folder "
            "(PYTHONPATH=. for the current one)") from None
    except Exception as exc:  # noqa: BLE001
        raise LoaderError(f"{source!r} could not be unpickled ({first_line(exc, with_type=True)})") from None
    if isinstance(obj, nn.Module):
        return LoadedModel("pickle", source, module=obj.eval(), name=_class_name(obj),
                           description=f"a pickled {type(obj).__module__}.{type(obj).__qualname__} module "
                                       "(torch.save(model))")
    state = _state_dict_in(obj)
    if state is not None and model_class is not None:
        module, built = build_class(model_class, None)
        _load_weights(module, state, source, built)
        return LoadedModel("state_dict", source, module=module.eval(), name=_class_name(module),
                           description=f"a state_dict loaded into {built}")
    raise LoaderError(f"{source!r} holds a {type(obj).__name__}, not an nn.Module; expected {_FILE_KINDS_HELP}")


# ---------------------------------------------------------------------------------------------
# Classes: FILE.py:Class, package.module:Class, torchvision:NAME, timm:NAME


def _cwd_on_path() -> None:
    """Put the working folder on the import path, as `python -m` does (the console script does not)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_class(ref: str, option: str = "--model-class") -> Any:
    """The class (or builder function) that "FILE.py:Class" or "package.module:Class" names; `option`
    is the command-line option that gave it, for the messages."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise LoaderError(f"{option} {ref!r}: expected FILE.py:Class, package.module:Class, "
                          "torchvision:NAME or timm:NAME")
    _cwd_on_path()
    if target.endswith(".py") or os.sep in target or "/" in target:
        file = Path(target).expanduser()
        if not file.is_file():
            raise LoaderError(f"{option} {ref!r}: there is no file {str(file)!r}")
        folder = str(file.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # so that the file's own imports of its neighbours work
        name = file.stem
        try:
            existing = sys.modules.get(name)
            if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == file.resolve():
                module = existing
            else:
                spec = importlib.util.spec_from_file_location(name, file)
                if spec is None or spec.loader is None:
                    raise LoaderError(f"{option} {ref!r}: {str(file)!r} cannot be imported as Python")
                module = importlib.util.module_from_spec(spec)
                # Registered under its name so that pickles referring to `name.Class` find it.
                sys.modules[name] = module
                spec.loader.exec_module(module)
        except LoaderError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's file failed to import
            sys.modules.pop(name, None)
            raise LoaderError(f"{option} {ref!r}: importing {str(file)!r} failed: "
                              f"{first_line(exc, with_type=True)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise LoaderError(f"{option} {ref!r}: cannot import {target!r} ({first_line(exc)}); run from the "
                              "folder holding it or set PYTHONPATH (PYTHONPATH=. for the current folder)") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items()
                           if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
            raise LoaderError(f"{option} {ref!r}: {target!r} has no {attr!r}"
                              + (f"; its nn.Module classes: {', '.join(names)}" if names else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoaderError(f"{option} {ref!r} is a {type(obj).__name__}, not a class or function")
    return obj


def load_batchnorms(declarations: Sequence[str] | None) -> dict[type, Any]:
    """`--batchnorm CLASS=ADAPTER` declarations as `bnfold.fold`'s `batchnorms=` mapping: CLASS and
    ADAPTER are FILE.py:NAME or package.module:NAME, the adapter a function `module -> BNStats`."""
    found: dict[type, Any] = {}
    for text in declarations or ():
        cls_ref, sep, fn_ref = text.partition("=")
        if not sep or not cls_ref.strip() or not fn_ref.strip():
            raise LoaderError(f"--batchnorm {text!r}: expected CLASS=ADAPTER, e.g. "
                              "--batchnorm my_layers.py:MyBN=my_layers.py:read_bn (ADAPTER: module -> bnfold.BNStats)")
        cls, fn = import_class(cls_ref.strip(), "--batchnorm"), import_class(fn_ref.strip(), "--batchnorm")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise LoaderError(f"--batchnorm {text!r}: {cls_ref.strip()!r} is not an nn.Module class")
        found[cls] = fn
    return found


def build_class(ref: str, args: Any) -> tuple[nn.Module, str]:
    """An untrained module from `ref` and its arguments, and how it was built (for messages)."""
    if ref.startswith("torchvision:"):
        return _torchvision(ref.split(":", 1)[1], args), ref
    if ref.startswith("timm:"):
        return _timm(ref.split(":", 1)[1], args), ref
    cls = import_class(ref)
    positional = args if isinstance(args, list) else []
    keywords = args if isinstance(args, dict) else {}
    shown = f"{ref}({json.dumps(args) if args else ''})"
    try:
        module = cls(*positional, **keywords)
    except TypeError as exc:
        raise LoaderError(f"{shown} failed: {first_line(exc)}; give its arguments with --model-args "
                          "'{\"name\": value}'") from None
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        raise LoaderError(f"{shown} failed: {first_line(exc, with_type=True)}") from None
    if not isinstance(module, nn.Module):
        raise LoaderError(f"{shown} returned a {type(module).__name__}, not an nn.Module")
    return module, shown


def _torchvision(name: str, args: Any) -> nn.Module:
    import torchvision

    if isinstance(args, list):
        raise LoaderError("--model-args for torchvision models must be a JSON object of keyword arguments")
    try:
        return torchvision.models.get_model(name, weights=None, **(args or {}))
    except ValueError as exc:
        if "Unknown model" in str(exc) or name not in torchvision.models.list_models():
            raise LoaderError(f"torchvision has no model {name!r}; see torchvision.models.list_models(), "
                              "e.g. resnet18, mobilenet_v3_small, efficientnet_b0") from None
        raise LoaderError(f"torchvision:{name} refused {args}: {first_line(exc)}") from None
    except TypeError as exc:
        raise LoaderError(f"torchvision:{name} refused --model-args {args}: {first_line(exc)}") from None


def _timm(name: str, args: Any) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise LoaderError("timm:NAME needs the timm package: pip install timm") from None
    if isinstance(args, list):
        raise LoaderError("--model-args for timm models must be a JSON object of keyword arguments")
    try:
        return timm.create_model(name, pretrained=False, **(args or {}))
    except RuntimeError as exc:
        raise LoaderError(f"timm has no model {name!r} ({first_line(exc)}); see timm.list_models()") from None
    except TypeError as exc:
        raise LoaderError(f"timm:{name} refused --model-args {args}: {first_line(exc)}") from None


def _from_zoo(ref: str, args: Any, weights: str | os.PathLike | None) -> LoadedModel:
    """torchvision:NAME / timm:NAME built here (no download), with a state_dict from `weights` when given."""
    zoo = ref.split(":", 1)[0]
    module, built = build_class(ref, args)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise LoaderError(f"--weights {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise LoaderError(f"--weights {str(path)!r} is not a state_dict torch can load safely "
                              f"({first_line(exc)})") from None
        state = _state_dict_in(obj)
        if state is None:
            raise LoaderError(f"--weights {str(path)!r} holds a {type(obj).__name__}, not a state_dict")
        _load_weights(module, state, str(path), built)
        what = f"{built} with the weights of {str(path)!r}"
    else:
        what = f"{built} with random weights (no --weights given)"
    loaded = LoadedModel(zoo, ref, module=module.eval(), name=ref.split(":", 1)[1], description=what)
    _zoo_defaults(loaded, module, zoo)
    return loaded


def _zoo_defaults(loaded: LoadedModel, module: nn.Module, zoo: str) -> None:
    """ImageNet preprocessing and the architecture's usual input size for torchvision/timm models."""
    loaded.default_mean, loaded.default_std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    size = (3, 224, 224)
    cfg = getattr(module, "pretrained_cfg", None) if zoo == "timm" else None
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        size = tuple(int(d) for d in cfg["input_size"])
        loaded.default_mean = list(cfg.get("mean", IMAGENET_MEAN))
        loaded.default_std = list(cfg.get("std", IMAGENET_STD))
    loaded.input_shape = (1, *size)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _parse_model_args(model_args: str | dict[str, Any] | list[Any] | None) -> Any:
    if model_args is None or isinstance(model_args, (dict, list)):
        return model_args
    try:
        value = json.loads(model_args)
    except json.JSONDecodeError as exc:
        raise LoaderError(f"--model-args must be JSON, e.g. '{{\"num_classes\": 10}}'; got {model_args!r} "
                          f"({exc.msg})") from None
    if not isinstance(value, (dict, list)):
        raise LoaderError(f"--model-args must be a JSON object (keyword arguments) or list (positional), "
                          f"got {model_args!r}")
    return value


def _class_name(module: nn.Module) -> str:
    return type(module).__name__.lower()


__all__ = ["KINDS", "LoadedModel", "LoaderError", "build_class", "check_input_shape", "detect_kind",
           "example_shape", "import_class", "is_onnx_file", "load_batchnorms", "load_model"]
