"""The distribution built from this tree installs one top-level package, `bnfold`.

The folders `models/`, `export/`, `serve/` and `bench/` stand at the top of the repository but
must install as `bnfold.models` ... (pyproject's package-dir mapping): a top-level `models` in
site-packages would shadow the `models.py` most ML projects have.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: pyproject.toml (with README.md as the long description) and the packages.
SOURCES = ("pyproject.toml", "README.md", "bnfold", "models", "export", "serve", "bench")


def test_the_wheel_holds_only_the_bnfold_package_with_its_four_subpackages(tmp_path: Path) -> None:
    # Built from a copy, so that build/ and *.egg-info never land in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--no-index", "-q", "-w", str(dist), str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = dist.glob("bnfold-*.whl")
    names = zipfile.ZipFile(wheel).namelist()

    outside = [n for n in names if not (n.startswith("bnfold/") or re.match(r"bnfold-[^/]+\.dist-info/", n))]
    assert outside == [], outside
    for package in ("bnfold", "bnfold/models", "bnfold/export", "bnfold/serve", "bnfold/bench"):
        assert f"{package}/__init__.py" in names, package
    assert "bnfold/serve/static/index.html" in names  # package data travels too
    assert not any(n.startswith(("bnfold/tests/", "tests/")) for n in names)
    top_level = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/top_level.txt")))
    assert top_level.decode().split() == ["bnfold"]
