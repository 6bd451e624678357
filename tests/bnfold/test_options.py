"""One meaning per option name, across every command-line parser of the project.

The walk finds every module that builds an `argparse.ArgumentParser` (bnfold's CLI with all its
subcommands, `python -m bnfold.serve`, the zoo, the comparison and probe scripts, the experiments),
captures the parser its `main` builds, and compares every option name wherever it appears: the
same kind (action, value type, nargs, dest), the same default, and for on/off flags the
same help (a flag's only sense is what its help says). Deprecated spellings are skipped: they are
the old name of a setting, not a second meaning of it.
"""
from __future__ import annotations

import argparse
import re
import dataclasses
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

from bnfold import options
from bnfold.options import Deprecated

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"bnfold": "bnfold", "bench": "bnfold.bench", "export": "bnfold.export", "models": "bnfold.models",
            "serve": "bnfold.serve"}
# Where a command starts from, not what the option means: how many epochs, which dataset, where the
# output goes differ by command by nature (bn-effect's 10 epochs, pipeline's runs/demo, evaluate's
# dataset "from the spec"), and so does how much each comparison script measures (its rounds and
# request counts). Every other option keeps one default everywhere.
PER_COMMAND_DEFAULTS = {"--epochs", "--dataset", "--out", "--rounds", "--sequential", "--concurrent"}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _script_modules() -> list[str]:
    """Every module of the project that builds a parser (found by its source, so new scripts join).

    A script that imports nothing of bnfold, or that imports a peer project at its top (a peer's
    server or deployment, run in the peer's own environment, such as bench/kserve_model.py and
    bench/ray_plain.py), takes the peer's options, not bnfold's.
    """
    found = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            text = path.read_text(encoding="utf-8")
            peer = re.search(r"^(import|from) (ray|kserve)\b", text, flags=re.MULTILINE)
            if peer is None and "ArgumentParser(" in text and (
                    "from bnfold" in text or "import bnfold" in text or "from ." in text):
                found.append(f"{package}.{path.stem}")
    return found


def _capture(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser `module.main` builds: parse_args is stopped before it reads anything."""
    mod = importlib.import_module(module)

    def stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
        with pytest.raises(_Captured) as captured:
            mod.main([])
    return captured.value.parser


def _commands(name: str, parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and every subcommand's parser, by their command line."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found.extend(_commands(f"{name} {sub_name}", sub))
    return found


def _type_name(kind: object) -> str | None:
    return None if kind is None else getattr(kind, "__qualname__", repr(kind))


def meaning(action: argparse.Action) -> dict[str, object]:
    """What an option means, as far as a parser says it: kind (action, value type, nargs, dest),
    default, and a flag's sense."""
    sense: dict[str, object] = {
        "action": type(action).__name__, "type": _type_name(action.type), "nargs": action.nargs,
        "const": action.const, "dest": action.dest,
    }
    # Not `choices`: where a command has a config, the config checks the value (argparse choices
    # would be a second place), and a script without one may let argparse check it; the values
    # accepted are in the help either way.
    if not action.required and action.option_strings[0] not in PER_COMMAND_DEFAULTS:
        sense["default"] = action.default
    if action.nargs == 0:   # an on/off flag: its help is its sense
        sense["help"] = action.help
    return sense


def conflicts(commands: list[tuple[str, argparse.ArgumentParser]]) -> list[str]:
    """One line per option name that means two things, naming the commands and what differs."""
    seen: dict[str, list[tuple[str, dict[str, object]]]] = defaultdict(list)
    for command, parser in commands:
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (Deprecated, argparse._HelpAction)):
                continue
            for option in action.option_strings:
                seen[option].append((command, meaning(action)))
    problems = []
    for option, uses in sorted(seen.items()):
        first_command, first = uses[0]
        for command, other in uses[1:]:
            differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            if differ:
                problems.append(f"{option}: {first_command} and {command} differ in "
                                + ", ".join(f"{k} ({first.get(k)!r} vs {other.get(k)!r})" for k in differ))
    return problems


@pytest.fixture(scope="module")
def all_commands() -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        for module in _script_modules():
            found.extend(_commands(module, _capture(module, monkeypatch)))
    return found


def test_the_walk_reaches_every_command_of_every_script(all_commands) -> None:
    names = {name for name, _ in all_commands}
    for expected in ("bnfold.cli train", "bnfold.cli serve", "bnfold.cli bench", "bnfold.cli pipeline",
                     "bnfold.cli loadtest", "bnfold.cli fold-onnx", "bnfold.serve.__main__",
                     "bnfold.bench.zoo", "bnfold.bench.compare_reference", "bnfold.models.experiments bn-effect"):
        assert expected in names


def test_every_option_name_has_one_meaning_across_all_commands(all_commands) -> None:
    assert conflicts(all_commands) == []


def test_the_walk_fails_on_an_option_with_two_defaults_or_two_senses() -> None:
    """The check itself: --threads with two defaults, --force with two senses, --json as flag and file."""
    a, b = argparse.ArgumentParser(), argparse.ArgumentParser()
    a.add_argument("--threads", type=int, default=0)
    b.add_argument("--threads", type=int, default=1)
    a.add_argument("--force", action="store_true", help="overwrite --out")
    b.add_argument("--force", action="store_true", help="reuse --out")
    a.add_argument("--json", action="store_true")
    b.add_argument("--json", metavar="FILE")
    found = conflicts([("a", a), ("b", b)])
    assert [line.split(":")[0] for line in found] == ["--force", "--json", "--threads"]
    assert "default (0 vs 1)" in found[2]


def test_a_deprecated_spelling_is_not_a_second_meaning_and_warns(capsys) -> None:
    from bnfold.cli import build_parser

    args = build_parser().parse_args(["bench", "m.pt", "--out", "o", "--device", "cpu"])
    assert args.devices == ["cpu"]
    assert "--device is deprecated, use --devices" in capsys.readouterr().err
    args = build_parser().parse_args(["loadtest", "http://x", "--model", "lenet"])
    assert args.name == "lenet"
    args = build_parser().parse_args(["export", "m.pt", "--out", "o", "--fp16"])
    assert args.fp16_format and "--fp16 is deprecated, use --format ...,fp16" in capsys.readouterr().err


def test_every_parser_default_is_its_configs_and_every_option_reaches_the_config(all_commands) -> None:
    """One place for defaults: an option of a command with a config reads its default from it, and
    every option lands in a field of the config (or of the config nested in it)."""
    checked = 0
    for command, parser in all_commands:
        config = parser.get_default("config_class")
        if config is None:
            continue
        fields = {f.name: f for f in dataclasses.fields(config)}
        nested = [f.default_factory for f in fields.values()   # e.g. ExportConfig.int8: Int8Config
                  if dataclasses.is_dataclass(f.default_factory) if f.default_factory is not dataclasses.MISSING]
        if "spec_options" in fields:
            from bnfold.models.spec_options import SpecOptions

            nested.append(SpecOptions)
        for action in parser._actions:
            if isinstance(action, (Deprecated, argparse._HelpAction)) or action.dest in ("old_output",):
                continue
            owner = config if action.dest in fields else next(
                (n for n in nested if action.dest in {f.name for f in dataclasses.fields(n)}), None)
            assert owner is not None, f"{command}: {action.option_strings or action.dest} reaches no config field"
            assert action.choices is None, f"{command}: {action.dest} checks its value in argparse; the config checks"
            if action.required or not action.option_strings:
                continue
            try:
                default = options.config_default(owner, action.dest)
            except KeyError:   # a field the config requires (fold-onnx --out, while the positional lasts)
                continue
            assert action.default == default, \
                f"{command}: {action.option_strings[0]} default differs from {owner.__name__}.{action.dest}"
            checked += 1
    assert checked > 100


def test_the_architecture_list_in_help_is_the_registrys(capsys) -> None:
    """--model's help lists models.list_models(): a registered architecture shows up with no second edit."""
    from bnfold.cli import main
    from bnfold.models import list_models
    from bnfold.models.registry import _REGISTRY, register

    register("dummyarchforhelp")(lambda **kw: None)
    try:
        with pytest.raises(SystemExit):
            main(["train", "--help"])
    finally:
        del _REGISTRY["dummyarchforhelp"]
    text = " ".join(capsys.readouterr().out.split())
    assert "dummyarchforhelp" in text and all(name in text for name in list_models())


def test_threads_zero_means_the_cpus_this_process_may_use() -> None:
    assert options.resolve_threads(0) == options.available_cpus() >= 1
    assert options.resolve_threads(3) == 3


def test_only_the_top_floor_imports_the_top_floor() -> None:
    """cli.py and pipeline.py reach every package; nothing below imports them (pipeline stays in
    bnfold/ beside cli.py for that reason: like it, it is a command over all the packages)."""
    import re

    pattern = re.compile(r"^\s*(from bnfold\.(cli|pipeline)\b|from bnfold import .*\b(cli|pipeline)\b|"
                         r"import bnfold\.(cli|pipeline)\b)", re.M)
    importers = sorted(str(p.relative_to(ROOT)) for folder in PACKAGES for p in (ROOT / folder).glob("*.py")
                       if pattern.search(p.read_text(encoding="utf-8")))
    assert importers == ["bnfold/__main__.py", "bnfold/cli.py"]


def test_an_argument_left_over_is_refused_by_the_command_with_a_hint(capsys: pytest.CaptureFixture) -> None:
    # `bnfold serve a.onnx --spec s.json b.onnx`: argparse reads the MODELs in one run, so b.onnx was
    # left over and refused by the top-level parser ("bnfold: error: unrecognized arguments").
    from bnfold.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["serve", "a.onnx", "--spec", "s.json", "b.onnx"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert stopped.value.code == 2
    assert err.startswith("bnfold serve: error: unrecognized arguments: b.onnx (the MODEL arguments must come "
                          "together"), err
    with pytest.raises(SystemExit):
        main(["fold", "m.pt", "--out", "f.pt", "--nope"])
    assert capsys.readouterr().err.splitlines()[-1] == "bnfold fold: error: unrecognized arguments: --nope"
