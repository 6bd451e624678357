"""Models to serve: ONNX files, an export folder, or a Triton-layout repository folder.

`load_models` takes any number of these (what `bnfold serve A B ...` names): a `.onnx` file is
served under its spec's arch (else its file name), with what follows the first dot of the file
name kept (`model.int8.onnx` with arch lenet is `lenet.int8`); an export folder (what `bnfold
export --out DIR` writes: `*.onnx` files side by side) serves each of its ONNX files that way;
`NAME=PATH` serves one file under NAME. Two models that would get one name are refused.

A repository holds `<name>/<version>/model.onnx` and, optionally, `<name>/config.pbtxt` (what
`bnfold export --triton-repo` writes; Triton and KServe load the same folder). Everything is
checked before serving: model names follow the rule export uses, no path leaves the repository
through a symlink, a config.pbtxt is parsed and must agree with the ONNX file (names, datatypes,
dims; its `max_batch_size` is the request limit), and folders that are not versions are skipped
with a log line.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnfold.models.spec import MODEL_NAME_PATTERN
from bnfold.serve.errors import ServeError
from bnfold.serve.runtime import ModelRuntime, TensorMeta, available_cpus, open_session
from bnfold.serve.scheduler import KINDS, MAX_INSTANCES, MAX_QUEUE_DELAY_US, Scheduling

log = logging.getLogger("bnfold.serve")

_NAME = re.compile(MODEL_NAME_PATTERN)
_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<str>"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\')|(?P<punct>[{}\[\]:,;<>])'
                    r'|(?P<word>[A-Za-z0-9_.+-]+)')


def _start_error(path: Path, message: str) -> ServeError:
    return ServeError(f"{path}: {message}", status=500)


# ---------------------------------------------------------------------------------------------
# config.pbtxt: protobuf text format, read into {field: [values]} (every field may repeat).


_MAX_PBTXT_DEPTH = 32


def parse_pbtxt(text: str, path: Path) -> dict[str, list[Any]]:
    """A protobuf text-format message as nested dicts of lists; `ServeError` naming the first problem."""
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    line = 1   # kept as the text is read: counting from the start at each token made 800 KB take 46 s
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _start_error(path, f"line {line}: cannot read {text[pos:pos + 20]!r} (not protobuf text format)")
        kind = match.lastgroup
        if kind is not None:
            tokens.append((kind, match.group(kind), line))
        else:   # whitespace or a comment: the only tokens that hold line breaks (strings stop at one)
            line += match.group().count("\n")
        pos = match.end()
    # The parser below recurses per level; a file of 5,000 nested `a {` was a RecursionError and
    # a traceback at start-up. Triton's configs nest a handful of levels.
    level = 0
    for kind, tok, line in tokens:
        level += tok in ("{", "<", "[")
        level -= tok in ("}", ">", "]")
        if level > _MAX_PBTXT_DEPTH:
            raise _start_error(path, f"line {line}: messages and lists nested more than {_MAX_PBTXT_DEPTH} deep "
                                     f"(not a valid config.pbtxt)")
    index = 0

    def fail(message: str) -> ServeError:
        line = tokens[index][2] if index < len(tokens) else text.count("\n") + 1
        return _start_error(path, f"line {line}: {message} (not a valid config.pbtxt)")

    def value() -> Any:
        nonlocal index
        if index >= len(tokens):
            raise fail("a value is missing at the end")
        kind, tok, _ = tokens[index]
        if tok in ("{", "<"):
            index += 1
            return message("}" if tok == "{" else ">")
        if tok == "[":
            index += 1
            items = []
            while index < len(tokens) and tokens[index][1] != "]":
                items.append(value())
                if index < len(tokens) and tokens[index][1] == ",":
                    index += 1
            if index >= len(tokens):
                raise fail("a list is not closed with ']'")
            index += 1
            return items
        if kind == "str":
            index += 1
            return tok[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
        if kind == "word":
            index += 1
            try:
                return int(tok)
            except ValueError:
                try:
                    return float(tok)
                except ValueError:
                    return tok   # an enum name: TYPE_FP32, KIND_CPU, true
        raise fail(f"unexpected {tok!r}")

    def message(close: str | None) -> dict[str, list[Any]]:
        nonlocal index
        fields: dict[str, list[Any]] = {}
        while index < len(tokens):
            kind, tok, _ = tokens[index]
            if close is not None and tok == close:
                index += 1
                return fields
            if kind != "word" or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok):
                raise fail(f"expected a field name, got {tok!r}")
            index += 1
            if index < len(tokens) and tokens[index][1] == ":":
                index += 1
            elif index >= len(tokens) or tokens[index][1] not in ("{", "<", "["):   # `input [ {..} ]`
                raise fail(f"expected ':' after {tok!r}")
            item = value()
            fields.setdefault(tok, []).extend(item if isinstance(item, list) else [item])
            if index < len(tokens) and tokens[index][1] in (",", ";"):
                index += 1
        if close is not None:
            raise fail(f"a message is not closed with {close!r}")
        return fields

    return message(None)


_KINDS = {int: "an integer", str: "a string"}


def _one(fields: dict[str, list[Any]], key: str, kind: type, path: Path, where: str = "") -> Any:
    values = fields.get(key, [])
    if len(values) > 1:
        raise _start_error(path, f"{where}{key} is given {len(values)} times")
    if values and not isinstance(values[0], kind):
        raise _start_error(path, f"{where}{key} must be {_KINDS[kind]}, got {values[0]!r}")
    return values[0] if values else None


def _check_tensors(fields: dict[str, list[Any]], kind: str, actual: list[TensorMeta], batching: bool,
                   path: Path) -> None:
    by_name = {t.name: t for t in actual}
    declared = fields.get(kind, [])
    for entry in declared:
        if not isinstance(entry, dict):
            raise _start_error(path, f"{kind} must be a message like {{ name: ... data_type: ... dims: [...] }}")
        name = _one(entry, "name", str, path, f"{kind} ")
        if name not in by_name:
            raise _start_error(path, f"{kind} {name!r} is not in the ONNX file, whose {kind}s are {sorted(by_name)}")
        meta = by_name[name]
        data_type = _one(entry, "data_type", str, path, f"{kind} {name!r} ")
        if data_type != "TYPE_" + meta.datatype:
            raise _start_error(path, f"{kind} {name!r} has data_type {data_type}, but the ONNX file has "
                                     f"TYPE_{meta.datatype}")
        dims = entry.get("dims", [])
        if not all(isinstance(d, int) for d in dims):
            raise _start_error(path, f"{kind} {name!r} dims must be integers, got {dims}")
        onnx_dims = meta.shape[1:] if batching else meta.shape
        if len(dims) != len(onnx_dims) or any(d != o and -1 not in (d, o) for d, o in zip(dims, onnx_dims)):
            raise _start_error(path, f"{kind} {name!r} has dims {dims}, but the ONNX file's shape is {meta.shape}"
                                     + (" (the batch axis is left out when max_batch_size > 0)" if batching else ""))
    if kind == "input" and declared and len(declared) != len(actual):
        raise _start_error(path, f"config.pbtxt declares {len(declared)} inputs, the ONNX file has {len(actual)}")


def read_model_config(path: Path, name: str, runtime: ModelRuntime) -> int:
    """Check `config.pbtxt` against the loaded model; returns its `max_batch_size`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _start_error(path, f"cannot read the model configuration: {exc}") from exc
    fields = parse_pbtxt(text, path)
    declared_name = _one(fields, "name", str, path)
    if declared_name is not None and declared_name != name:
        raise _start_error(path, f"name {declared_name!r} differs from the model's folder name {name!r}")
    platform = _one(fields, "platform", str, path)
    backend = _one(fields, "backend", str, path)
    if platform not in (None, "onnxruntime_onnx") or backend not in (None, "onnxruntime"):
        raise _start_error(path, f"platform {platform!r} / backend {backend!r}: this service runs ONNX files "
                                 f"(platform \"onnxruntime_onnx\")")
    max_batch = _one(fields, "max_batch_size", int, path)
    max_batch = 0 if max_batch is None else max_batch
    if max_batch < 0:
        raise _start_error(path, f"max_batch_size must be 0 or more, got {max_batch}")
    batching = max_batch > 0
    if batching and runtime.inputs[0].shape[:1] != [-1]:
        raise _start_error(path, f"max_batch_size is {max_batch}, but the ONNX input's batch axis is fixed "
                                 f"({runtime.inputs[0].shape}); use max_batch_size: 0")
    _check_tensors(fields, "input", runtime.inputs, batching, path)
    _check_tensors(fields, "output", runtime.outputs, batching, path)
    return max_batch


def _block(fields: dict[str, list[Any]], key: str, path: Path) -> dict[str, list[Any]] | None:
    values = fields.get(key, [])
    if len(values) > 1:
        raise _start_error(path, f"{key} is given {len(values)} times")
    if values and not isinstance(values[0], dict):
        raise _start_error(path, f"{key} must be a message like {key} {{ ... }}, got {values[0]!r}")
    return values[0] if values else None


def read_scheduling(fields: dict[str, list[Any]], path: Path) -> Scheduling:
    """`instance_group` and `dynamic_batching` of a parsed config.pbtxt, checked (one line per mistake).

    One instance group is served per model (Triton allows several, e.g. one per GPU): `count`
    sessions of kind KIND_CPU, KIND_GPU or KIND_AUTO (the served device). `dynamic_batching {}`
    turns batching on with Triton's default delay, 0 microseconds.
    """
    instances, kind = 1, None
    groups = fields.get("instance_group", [])
    if len(groups) > 1:
        raise _start_error(path, f"instance_group has {len(groups)} groups; bnfold serves one group per model")
    if groups:
        group = groups[0]
        if not isinstance(group, dict):
            raise _start_error(path, "instance_group must be a list of messages like [ { count: 2 kind: KIND_CPU } ]")
        unknown = sorted(set(group) - {"count", "kind", "name"})
        if unknown:
            raise _start_error(path, f"instance_group field {unknown[0]!r} is not supported (only count and kind)")
        count = _one(group, "count", int, path, "instance_group ")
        if count is not None and not 1 <= count <= MAX_INSTANCES:
            raise _start_error(path, f"instance_group count must be from 1 to {MAX_INSTANCES}, got {count}")
        instances = 1 if count is None else count
        kind = _one(group, "kind", str, path, "instance_group ")
        if kind is not None and kind not in KINDS:
            raise _start_error(path, f"instance_group kind must be KIND_CPU, KIND_GPU or KIND_AUTO, got {kind!r}")
    delay, preferred = None, ()
    batching = _block(fields, "dynamic_batching", path)
    if batching is not None:
        unknown = sorted(set(batching) - {"max_queue_delay_microseconds", "preferred_batch_size"})
        if unknown:
            raise _start_error(path, f"dynamic_batching field {unknown[0]!r} is not supported "
                                     f"(only max_queue_delay_microseconds and preferred_batch_size)")
        delay = _one(batching, "max_queue_delay_microseconds", int, path, "dynamic_batching ")
        if delay is not None and not 0 <= delay <= MAX_QUEUE_DELAY_US:
            raise _start_error(path, f"dynamic_batching max_queue_delay_microseconds must be from 0 to "
                                     f"{MAX_QUEUE_DELAY_US}, got {delay}")
        delay = 0 if delay is None else delay
        preferred = tuple(batching.get("preferred_batch_size", []))
        bad = [p for p in preferred if not isinstance(p, int) or p < 1]
        if bad:
            raise _start_error(path, f"dynamic_batching preferred_batch_size must be positive integers, "
                                     f"got {bad[0]!r}")
    return Scheduling(instances=instances, kind=kind or "KIND_AUTO", max_queue_delay_us=delay,
                      preferred_batch_sizes=preferred)


def _scheduling(config: Path | None, device: str, instances: int | None,
                dynamic_batching: int | str | None) -> Scheduling:
    """config.pbtxt's scheduling (if any), overridden by `--instances` and `--dynamic-batching`."""
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    delay, preferred, count = None, (), 1
    if config is not None:
        try:
            text = config.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _start_error(config, f"cannot read the model configuration: {exc}") from exc
        read = read_scheduling(parse_pbtxt(text, config), config)
        if read.kind not in ("KIND_AUTO", kind):
            raise _start_error(config, f"instance_group kind {read.kind} does not match --device {device} "
                                       f"(use {kind})")
        delay, preferred, count = read.max_queue_delay_us, read.preferred_batch_sizes, read.instances
    if dynamic_batching == "off":
        delay = None
    elif dynamic_batching is not None:
        delay = int(dynamic_batching)
    return Scheduling(instances=count if instances is None else instances, kind=kind, max_queue_delay_us=delay,
                      preferred_batch_sizes=preferred if delay is not None else ())


def _open(path: Path, device: str, scheduling: Scheduling, threads: int | None, **options: Any) -> ModelRuntime:
    """Instance 0 of a model; without --threads each instance gets its share of the CPUs."""
    if not threads and device == "cpu":   # None or 0 (--threads 0): the CPUs this process may use
        threads = max(1, available_cpus() // scheduling.instances)
    runtime = open_session(path, device, threads=threads, **options)
    runtime.scheduling = scheduling
    return runtime


# ---------------------------------------------------------------------------------------------
# The repository walk.


def check_model_name(name: str, where: Path) -> str:
    if not _NAME.fullmatch(name):   # fullmatch: `$` alone would let a trailing newline through
        raise ServeError(f"{where}: invalid model name {name!r}: use letters, digits, '_', '-', '.', starting "
                         f"with a letter or digit (the rule `bnfold export --triton-name` follows)", status=500)
    return name


def _inside(path: Path, root: Path) -> Path:
    """`path` with symlinks resolved, refused when it leaves `root` (already resolved)."""
    real = path.resolve()
    if real != root and root not in real.parents:
        raise ServeError(f"{path} is a symlink to {real}, outside the repository {root}; the service only "
                         f"serves files inside the repository", status=500)
    return real


def _latest_version(model_dir: Path, root: Path) -> Path | None:
    versions = []
    skipped: dict[str, list[str]] = {}   # reason -> folder names: one warning per reason, not per folder
    for entry in sorted(model_dir.iterdir()):
        if not entry.is_dir():
            continue
        if not entry.name.isdigit() or not entry.name.isascii():
            skipped.setdefault("a version folder's name is a number (Triton's layout)", []).append(entry.name)
            continue
        if not (entry / "model.onnx").is_file():
            skipped.setdefault("no model.onnx inside", []).append(entry.name)
            continue
        _inside(entry / "model.onnx", root)
        versions.append(entry)
    for reason, names in skipped.items():
        shown = ", ".join(repr(n[:40]) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        log.warning("skipping %d folder(s) in %s: %s: %s", len(names), model_dir, reason, shown)
    return max(versions, key=lambda v: int(v.name)) if versions else None


def load_repository(root: str | os.PathLike, device: str = "cpu", *, threads: int | None = None,
                    cuda_graph: bool = False, name: str | None = None,
                    max_batch_size: int | None = None, instances: int | None = None,
                    dynamic_batching: int | str | None = None) -> dict[str, ModelRuntime]:
    """Models to serve from a `model.onnx` file or a Triton-layout folder, checked and warmed up.

    A folder holds `<name>/<version>/model.onnx`; the highest numeric version of each model is
    served. A single file is served under `name` (default: its spec's arch, else the file stem).
    `max_batch_size` given here applies to every model; otherwise a repository model's
    config.pbtxt sets it, and `MAX_BATCH_SIZE` is the default. `instances` and `dynamic_batching`
    (microseconds, or "off") likewise override config.pbtxt's instance_group and dynamic_batching;
    each model's `scheduling` says what it got (one instance, no batching by default).
    """
    root = Path(root)
    if root.is_file():
        scheduling = _scheduling(None, device, instances, dynamic_batching)
        runtime = _open(root, device, scheduling, threads, cuda_graph=cuda_graph,
                        name=None if name is None else check_model_name(name, root), max_batch_size=max_batch_size)
        return {runtime.name: runtime}
    if not root.is_dir():
        raise ServeError(f"no such model file or repository folder: {root}", status=500)
    if name is not None:
        raise ServeError("--name applies to a single model file, not a repository folder", status=500)
    real_root = root.resolve()
    models: dict[str, ModelRuntime] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            log.info("skipping hidden folder %s", model_dir)
            continue
        check_model_name(model_dir.name, model_dir)
        _inside(model_dir, real_root)
        latest = _latest_version(model_dir, real_root)
        if latest is None:
            log.warning("skipping %s: no <version>/model.onnx inside", model_dir)
            continue
        config = model_dir / "config.pbtxt"
        if config.exists():
            _inside(config, real_root)
        scheduling = _scheduling(config if config.exists() else None, device, instances, dynamic_batching)
        runtime = _open(latest / "model.onnx", device, scheduling, threads, cuda_graph=cuda_graph,
                        name=model_dir.name, version=latest.name, max_batch_size=max_batch_size)
        if config.exists():
            configured = read_model_config(config, model_dir.name, runtime)
            if max_batch_size is None and configured > 0:   # 0: Triton's 'no batching'; ours stays
                runtime.max_batch_size = configured
        models[model_dir.name] = runtime
    if not models:
        raise ServeError(f"{root}: no models found; expected <name>/<version>/model.onnx inside "
                         f"(the layout `bnfold export --triton-repo` writes)", status=500)
    return models


# ---------------------------------------------------------------------------------------------
# Several sources: files, export folders, repositories, `NAME=PATH`.


def file_model_name(path: Path, arch: str | None) -> str:
    """The name a model file is served under: its spec's arch (else the file's first name part),
    then the rest of its file name: `model.onnx` -> `lenet`, `model.int8.onnx` -> `lenet.int8`.

    Characters a model name may not hold become '_' (as `bnfold export --triton-repo` names
    a model from its arch).
    """
    first, _, rest = path.name.removesuffix(".onnx").partition(".")
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", arch) if arch else first
    return check_model_name(f"{base}.{rest}" if rest else base, path)


def _is_repository(folder: Path) -> bool:
    """A Triton layout: some `<name>/<digits>/` folder inside (an export folder has files only)."""
    return any(version.is_dir() and version.name.isdigit()
               for model_dir in folder.iterdir() if model_dir.is_dir() and not model_dir.name.startswith(".")
               for version in model_dir.iterdir())


def _export_folder(folder: Path, open_file: Any) -> list[ModelRuntime]:
    """Every ONNX file side by side in `folder` (what `bnfold export --out` writes)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".onnx"))
    for other in _pytorch_files(folder):
        log.info("skipping %s: the service runs ONNX files", folder / other)
    return [open_file(path, None) for path in files]


def _pytorch_files(folder: Path) -> list[str]:
    """The TorchScript / torch.export / PyTorch files directly in `folder` (what serve cannot run)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".ts", ".pt2", ".pt"))


def load_models(sources: str | os.PathLike | Sequence[str | os.PathLike], device: str = "cpu", *,
                threads: int | None = None, cuda_graph: bool = False, name: str | None = None,
                max_batch_size: int | None = None, instances: int | None = None,
                dynamic_batching: int | str | None = None) -> dict[str, ModelRuntime]:
    """Models to serve from ONNX files, export folders and repositories (`bnfold serve A B ...`).

    One source keeps `load_repository`'s meaning (a file, `--name` allowed, or a Triton layout);
    a folder with ONNX files in it and no version folders is an export folder. A source
    `NAME=PATH` serves the ONNX file PATH as NAME. Two models with one name are a `ServeError`
    naming both files.
    """
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise ServeError("no model given: name a model.onnx file, an export folder or a repository", status=500)
    if name is not None and (len(items) > 1 or not Path(items[0]).is_file()):
        raise ServeError("--name applies to a single model file; for several, give each as NAME=PATH",
                         status=500)

    def open_file(path: Path, as_name: str | None) -> ModelRuntime:
        runtime = _open(path, device, _scheduling(None, device, instances, dynamic_batching), threads,
                        cuda_graph=cuda_graph, name=as_name, max_batch_size=max_batch_size)
        if as_name is None:   # the name needs the spec, which only the loaded file has
            runtime.name = file_model_name(path, runtime.spec.arch if runtime.spec is not None else None)
        return runtime

    found: list[ModelRuntime] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        given, sep, target = text.partition("=")
        loose = path.is_dir() and not _is_repository(path)   # no <name>/<version>/ inside: not a repository
        if sep and not path.exists() and given and os.sep not in given:
            path = Path(target)
            if not path.is_file():
                raise ServeError(f"{text!r}: NAME=PATH needs an ONNX file, and {target!r} is not one", status=500)
            found.append(open_file(path, check_model_name(given, path)))
        elif path.is_file():
            found.append(open_file(path, None if name is None else check_model_name(name, path)))
        elif loose and any(path.glob("*.onnx")):
            found.extend(_export_folder(path, open_file))
        elif loose and (inner := sorted(path.glob("*/*.onnx"))):
            # `bnfold pipeline --out runs/demo` holds train/, export/, bench/: the ONNX files are one level down.
            folders = sorted({str(f.parent) for f in inner})
            raise ServeError(f"{path} holds no ONNX file itself; {' and '.join(folders)} "
                             f"{'does' if len(folders) == 1 else 'do'}: serve {folders[0]}", status=500)
        elif loose and (others := _pytorch_files(path)):
            raise ServeError(f"{path} holds no ONNX file, only {', '.join(others)}; `bnfold serve` runs ONNX: "
                             f"`bnfold export MODEL --format onnx --out DIR` writes one, then serve DIR", status=500)
        else:
            found.extend(load_repository(path, device, threads=threads, cuda_graph=cuda_graph,
                                         max_batch_size=max_batch_size, instances=instances,
                                         dynamic_batching=dynamic_batching).values())
    models: dict[str, ModelRuntime] = {}
    for runtime in found:
        other = models.get(runtime.name)
        if other is not None and other.path.resolve() == runtime.path.resolve():
            raise ServeError(f"{runtime.path} is given twice (as {runtime.name!r}); name each file once", status=500)
        if other is not None:
            raise ServeError(f"two models would both be served as {runtime.name!r}: {other.path} and "
                             f"{runtime.path}; give one another name with NAME=PATH (e.g. "
                             f"{runtime.name}-2={runtime.path}), or serve them separately", status=500)
        models[runtime.name] = runtime
    return models


__all__ = ["load_models", "load_repository", "file_model_name", "parse_pbtxt", "read_model_config",
           "read_scheduling", "check_model_name"]
