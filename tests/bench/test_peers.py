"""bench.peers: a peer's own virtual environment, built once with pip, rebuilt when its package list changes.

A successful build is exercised by the KServe tests (tests/serve/test_grpc.py), which need the real one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bnfold.bench.peers import PeerError, peer_python


@pytest.mark.slow
def test_a_built_peer_is_reused_until_its_package_list_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNFOLD_PEERS_DIR", str(tmp_path))
    root = tmp_path / "probe"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").symlink_to(sys.executable)
    (root / "bnfold-peer.txt").write_text("pip\n")   # what a finished build leaves: its package list
    marker = root / "marker"
    marker.write_text("kept")
    assert peer_python("probe", packages=["pip"]) == root / "bin" / "python" and marker.exists()   # reused
    # another list: the old environment goes, a fresh venv is made, and pip's failure is a PeerError
    with pytest.raises(PeerError, match="pip install ./no-such-folder-here failed"):
        peer_python("probe", packages=["./no-such-folder-here"])
    assert not marker.exists() and (root / "bin" / "python").exists()
    assert not (root / "bnfold-peer.txt").exists()   # no stamp: the next call builds again


def test_an_unknown_peer_is_a_peer_error_naming_the_known_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNFOLD_PEERS_DIR", str(tmp_path))
    with pytest.raises(PeerError, match=r"unknown peer 'nope'; known: \[.*'kserve'"):
        peer_python("nope")
    assert not (tmp_path / "nope").exists()
