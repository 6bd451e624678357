"""The distribution built from this tree installs one top-level package, `bnfold`.

The folders `models/`, `export/`, `serve/` and `bench/` stand at the top of the repository but
must install as `bnfold.models` ... (pyproject's package-dir mapping): a top-level `models` in
site-packages would shadow the `models.py` most ML projects have.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: pyproject.toml (with README.md as the long description) and the packages.
SOURCES = ("pyproject.toml", "README.md", "bnfold", "models", "export", "serve", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this tree, built from a copy so that build/ and *.egg-info never land in the working tree."""
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    [built] = dist.glob("bnfold-*.whl")
    return built


def test_the_wheel_holds_only_the_bnfold_package_with_its_four_subpackages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()

    outside = [n for n in names if not (n.startswith("bnfold/") or re.match(r"bnfold-[^/]+\.dist-info/", n))]
    assert outside == [], outside
    for package in ("bnfold", "bnfold/models", "bnfold/export", "bnfold/serve", "bnfold/bench"):
        assert f"{package}/__init__.py" in names, package
    assert "bnfold/serve/static/index.html" in names  # package data travels too
    assert "bnfold/bench/reference_service.py" in names   # compare_reference's yardstick, inside the package
    assert not any(n.startswith(("bnfold/tests/", "tests/")) for n in names)
    top_level = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/top_level.txt")))
    assert top_level.decode().split() == ["bnfold"]


@pytest.mark.slow   # installs the wheel and runs both services for one short round
def test_compare_reference_runs_from_the_installed_wheel(wheel: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    """From the wheel it died with uvicorn's 'Could not import module plain_fastapi_service' (a file
    outside the package); the reference service now ships inside it."""
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                              str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    # Run away from the repository, the installed copy first on the path (before the editable install).
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import bnfold.bench.compare_reference as m; print(m.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    result = subprocess.run([sys.executable, "-m", "bnfold.bench.compare_reference", "--onnx", str(tiny_onnx),
                             "--rounds", "1", "--sequential", "20", "--concurrent", "40", "--concurrency", "2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "reference json" in result.stdout and "bnfold binary vs reference" in result.stdout


def test_compare_reference_without_fastapi_says_what_it_needs_in_one_line(tiny_onnx: Path) -> None:
    code = ("import sys; sys.modules['fastapi'] = None  # as if not installed\n"
            "from bnfold.bench.compare_reference import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "--onnx", str(tiny_onnx)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "compare_reference: error: the reference service needs fastapi, which is not installed: "
        "pip install 'bnfold[compare]'"]
