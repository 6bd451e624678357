"""The command-line vocabulary: one meaning per option name, one path from arguments to a typed config.

Every command's options become one typed config (`TrainConfig`, `ExportConfig`, `ServeConfig`, ...)
through `from_args(Config, args)`. The config is the one place for defaults (a parser reads them
from the config's fields with `ConfigOptions`) and for checks (its `__post_init__`); argparse only
turns text into numbers and lists. An option that several commands take (`--device`, `--threads`,
`--out`, `--force`, `--input-size`, ...) is defined once here (`SHARED`), so it has the same kind,
default and sense wherever it appears; `tests/bnfold/test_options.py` walks every parser to hold
that line.

This module imports nothing heavy: `bnfold --help` builds every parser.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

C = TypeVar("C")


# ---------------------------------------------------------------------------------------------
# Value types: text to values, nothing more (ranges are the configs' checks).


def csv(text: str) -> list[str]:
    """a,b,c -> ["a", "b", "c"] (blanks dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def shape(text: str) -> tuple[int, ...]:
    """N,C,H,W -> a tuple of positive ints."""
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,32,32, got {text!r}")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"every dimension must be positive, got {text!r}")
    return dims


def int_list(text: str) -> list[int]:
    """1,8,32 -> [1, 8, 32], every value positive."""
    try:
        values = [int(part) for part in csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be positive, got {text!r}")
    return values


def input_size(text: str) -> tuple[int, int]:
    """H or H,W -> (H, W): the image size a model takes (models.spec_options reads it)."""
    from bnfold.models.spec_options import parse_input_size

    return _argument(parse_input_size, text)


def labels(text: str) -> list[str]:
    """FILE (one per line, or a JSON list) or a,b,c."""
    from bnfold.models.spec_options import parse_labels

    return _argument(parse_labels, text)


def floats(what: str) -> Any:
    """M or M,M,M (per channel) for option `what`."""
    from bnfold.models.spec_options import parse_floats

    def parse(text: str) -> list[float]:
        return _argument(lambda t: parse_floats(t, what), text)

    parse.__name__ = "floats"
    return parse


def _argument(parse: Any, text: str) -> Any:
    """The library's parser of a value, its one-line error turned into argparse's own (exit 2)."""
    from bnfold.errors import BnfoldError

    try:
        return parse(text)
    except BnfoldError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The values of --device and --devices that serve and bench take (train also takes cuda:N and auto).
DEVICES: tuple[str, ...] = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# Threads: one sense everywhere.


def available_cpus() -> int:
    """The CPUs this process may actually use: its affinity mask, capped by a cgroup CPU quota.

    `os.cpu_count()` reports the host's cores, which inside a container limited to two CPUs
    makes a thread pool that fights itself.
    """
    import math

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None when unlimited/unknown."""
    from pathlib import Path

    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def resolve_threads(threads: int | None) -> int:
    """`--threads N`: N threads; 0 (the default everywhere) or None: the CPUs this process may use."""
    return available_cpus() if not threads else int(threads)


# ---------------------------------------------------------------------------------------------
# Deprecated spellings


class Deprecated(argparse.Action):
    """An old spelling that still works: warns on stderr and stores into the new option's dest.

    Hidden from --help. `convert` turns the old value into the new one (e.g. a flag into a choice).
    The parser walk skips these: they are the old name, not a second meaning of the new one.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, convert: Any = None,
                 **kwargs: Any) -> None:
        self.new = new
        self.convert = convert
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        value = self.convert(values) if self.convert is not None else values
        if self.nargs == 0 and self.convert is None:
            value = self.const
        setattr(namespace, self.dest, value)


def deprecated(parser: argparse.ArgumentParser, old: str, new: str, dest: str, *, flag: bool = False,
               value: Any = None, convert: Any = None, **kwargs: Any) -> None:
    """Keep `old` working for `new`: a flag stores `value`, an option stores `convert(text)`."""
    if flag:
        parser.add_argument(old, action=Deprecated, new=new, dest=dest, nargs=0, const=value, **kwargs)
    else:
        parser.add_argument(old, action=Deprecated, new=new, dest=dest, convert=convert, **kwargs)


# ---------------------------------------------------------------------------------------------
# Shared options: the one definition of each option more than one command takes.

# Replaced by the registry's names (models.list_models) when a help text is shown, so that the list
# is the registry's and building a parser imports no torch (bnfold.cli's formatter does it).
ARCHITECTURES_PLACEHOLDER = "{architectures}"

SHARED: dict[str, dict[str, Any]] = {
    "--device": dict(metavar="DEVICE",
                     help="where it runs: cpu, cuda, cuda:N (auto: cuda when there is one); CUDA asked "
                          "for and absent is an error, never a fallback"),
    "--devices": dict(type=csv, metavar="DEVICE,...",
                      help="comma-separated devices to measure on: cpu, cuda (absent ones are reported as skipped "
                           "unless cuda is the only one)"),
    "--threads": dict(type=int, metavar="N",
                      help="threads for torch and onnxruntime (intra-op); 0 = the CPUs this process may use"),
    "--input-size": dict(type=input_size, metavar="H[,W]",
                         help="image size the model takes (default: from the model, or the architecture's for "
                              "the dataset)"),
    "--input-shape": dict(type=shape, metavar="N,C,H,W",
                          help="input shape with the batch dimension first, e.g. 1,3,224,224; needed where the "
                               "file does not say it (state_dicts, pickled modules, TorchScript, symbolic ONNX axes)"),
    "--out": dict(metavar="PATH", help="where the command writes its result"),
    "--force": dict(action="store_true",
                    help="replace what an earlier run left at --out (without it, a non-empty --out is refused)"),
    "--no-progress": dict(action="store_false", dest="progress", help="no progress bars"),
    "--json": dict(action="store_true", help="print the result as JSON instead of text"),
    "--data-root": dict(metavar="DIR", help="folder holding torchvision datasets"),
    "--dataset": dict(metavar="NAME",
                      help="digits (bundled), mnist, fashion-mnist, cifar10, or imagefolder:PATH"),
    "--rtol": dict(type=float, metavar="TOL",
                   help="largest max-relative-error accepted against the original model (default: 1e-5, "
                        "1e-2 for files with float16 weights)"),
    "--samples": dict(type=int, metavar="N", help="random inputs in the parity check"),
    "--batch-size": dict(type=int, metavar="N", help="samples per step"),
    "--seed": dict(type=int, metavar="N", help="random seed: the same seed gives the same result"),
    "--epochs": dict(type=int, metavar="N", help="passes over the training split"),
    "--model": dict(metavar="ARCH", help="architecture, one of the registry's: " + ARCHITECTURES_PLACEHOLDER),
    "--name": dict(metavar="NAME", help="the model's name on the server (default: from its spec or file name)"),
    "--concurrency": dict(type=int, metavar="N", help="connections sending requests at the same time"),
    "--trust-pickle": dict(action="store_true",
                           help="allow loading a whole module saved with torch.save(model): unpickling runs code "
                                "from the file, so only for files you trust"),
    "--batchnorm": dict(action="append", metavar="CLASS=ADAPTER",
                        help="declare a BatchNorm class of your own that running it cannot settle (repeatable): "
                             "CLASS and ADAPTER are FILE.py:NAME or package.module:NAME, ADAPTER a function "
                             "module -> bnfold.BNStats. Without it, a module of yours is folded when, run on the "
                             "input the model feeds it (from --input-shape), it computes a per-channel a*x + b"),
}



def config_default(config: type, name: str) -> Any:
    """The default of field `name` of dataclass `config` (the one place it is written)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            raise KeyError(f"{config.__name__}.{name} has no default")
    raise KeyError(f"{config.__name__} has no field {name!r}")


class ConfigOptions:
    """Adds a command's options to `parser`, each default read from `config`'s field of the same dest.

        opts = ConfigOptions(parser, TrainConfig)
        opts.add("--epochs", type=int, help="...")      # default: TrainConfig.epochs
        opts.shared("--threads")                        # the shared definition, default TrainConfig.threads
    """

    def __init__(self, parser: argparse.ArgumentParser | Any, config: type) -> None:
        self.parser = parser
        self.config = config
        if isinstance(parser, argparse.ArgumentParser):
            parser.set_defaults(config_class=config)

    def group(self, title: str, description: str | None = None) -> "ConfigOptions":
        grouped = ConfigOptions(self.parser.add_argument_group(title, description), self.config)
        return grouped

    def add(self, *flags: str, **kwargs: Any) -> argparse.Action:
        if flags and flags[0].startswith("-") and "dest" not in kwargs:
            kwargs["dest"] = flags[0].lstrip("-").replace("-", "_")
        dest = kwargs.get("dest") or (flags[0] if flags else None)
        if "default" not in kwargs and not kwargs.get("required") and dest is not None:
            try:
                kwargs["default"] = config_default(self.config, dest)
            except KeyError:
                pass
        return self.parser.add_argument(*flags, **kwargs)

    def shared(self, flag: str, **overrides: Any) -> argparse.Action:
        """The shared definition of `flag`; a command may only add `required` or a longer `help`."""
        unknown = set(overrides) - {"required", "help", "default"}
        if unknown:
            raise TypeError(f"{flag} is shared: only required/help may differ, not {sorted(unknown)}")
        kwargs = {**SHARED[flag], **overrides}
        return self.add(flag, **kwargs)


def from_args(config: type[C], args: argparse.Namespace, **values: Any) -> C:
    """The config for parsed arguments: every field whose name is a dest in `args` (plus `values`).

    Defaults are the config's own (the parser read them from it); checks are its `__post_init__`.
    """
    names = {f.name for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    given = {k: v for k, v in vars(args).items() if k in names}
    return config(**{**given, **values})


__all__ = ["ARCHITECTURES_PLACEHOLDER", "DEVICES", "SHARED", "ConfigOptions", "Deprecated", "available_cpus", "config_default",
           "csv", "deprecated", "from_args", "input_size", "int_list", "resolve_threads", "shape"]
