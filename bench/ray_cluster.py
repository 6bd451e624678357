"""A Ray cluster on loopback for tests and benchmarks, run from Ray's own peer environment.

Ray Serve 2.60 wants protobuf 7 (through opentelemetry-proto) while tritonclient[grpc] pins
protobuf < 7, so Ray does not go into bnfold's test environment. It gets a peer environment of
its own (`bench.peers`): `ray[serve]` plus the packages the service needs (bnfold's runtime
dependencies minus torch, torchvision, onnxscript, scikit-learn and matplotlib, which `serve`
never imports), with bnfold itself installed editable and without dependencies on top.

    python = ray_python()                               # .peers/ray/bin/python, built once
    with loopback_cluster(python, nodes=2) as cluster:  # `ray start --head` + `ray start --address`
        subprocess.run([python, "-m", "bnfold.serve", "model.onnx", "--ray", cluster.address, ...])

Each cluster has its own temporary folder and free ports, and is stopped whatever happens: every
process whose command line names that folder (GCS, raylets, workers, replicas, proxies) is sent
SIGTERM, then SIGKILL, which is what `ray stop` does for every Ray process of the user; this stops
one cluster only, so a developer's own Ray session on the same machine is left alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bnfold.bench.peers import PeerError, peer_python, peers_dir
from bnfold.serve.launch import free_port

RAY_VERSION = "2.60.0"
_REPO = Path(__file__).resolve().parents[1]
# Runtime dependencies of bnfold that `bnfold.serve` never imports (it never imports torch).
_NOT_SERVING = {"torch", "torchvision", "onnxscript", "scikit-learn", "matplotlib", "tqdm"}


def _requirement_name(requirement: str) -> str:
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower()


def serving_requirements() -> list[str]:
    """bnfold's runtime dependencies (from pyproject.toml) that the service needs, plus Ray Serve."""
    project = tomllib.loads((_REPO / "pyproject.toml").read_text())["project"]
    wanted = [r for r in project["dependencies"] if _requirement_name(r) not in _NOT_SERVING]
    return wanted + project["optional-dependencies"]["ray"]


def ray_python() -> Path:
    """The interpreter of the Ray peer environment, with bnfold importable in it; built on first use."""
    python = peer_python("ray", packages=serving_requirements())
    stamp = python.parent.parent / "bnfold-editable.txt"
    if not stamp.exists() or stamp.read_text() != str(_REPO):
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                 "--no-deps", "-e", str(_REPO)], capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
            raise PeerError("pip install --no-deps -e (bnfold into the ray peer) failed:\n" + "\n".join(tail))
        stamp.write_text(str(_REPO))
    return python


@dataclass
class LoopbackCluster:
    """A running loopback cluster: its GCS address, its folder, and what `ray` commands it needs."""

    python: Path
    address: str
    temp_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ray(self) -> str:
        return str(self.python.parent / "ray")

    def run_python(self, code: str, *args: str, timeout: float = 120.0) -> str:
        """Run `code` in the Ray peer's interpreter (connected with ray.init(address=...)); its stdout."""
        result = subprocess.run([str(self.python), "-c", code, *args], capture_output=True, text=True,
                                env=self.env, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"ray peer script failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        return result.stdout

    def state(self, kind: str) -> list[dict]:
        """Ray's state API (`ray.util.state.list_<kind>`, detail): e.g. "actors", "nodes"."""
        code = ("import json, sys\nfrom ray.util import state\n"
                f"rows = state.list_{kind}(address=sys.argv[1], detail=True, limit=10000, raise_on_missing_output=False)\n"
                "print(json.dumps([r if isinstance(r, dict) else r.__dict__ for r in rows], default=str))")
        return json.loads(self.run_python(code, self.dashboard_url).strip().splitlines()[-1])

    dashboard_url: str = ""


def _cluster_pids(temp_dir: Path) -> list[int]:
    """This cluster's processes only: those whose command line names `temp_dir`, and their descendants.

    The descendants matter: Ray's dashboard and runtime-env agents rename themselves
    (`ray::DashboardAgent`) and outlive a killed raylet unless they are stopped too.
    """
    needle = str(temp_dir).encode()
    named, parent = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                parent[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    named.add(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    pids, grew = set(named), True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in pids and pid not in pids}
        pids |= more
        grew = bool(more)
    return sorted(pids)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def stop_cluster(temp_dir: Path, grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `grace` s, to every process of the cluster in `temp_dir`; how many there were."""
    pids = _cluster_pids(temp_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in set(pids) | set(_cluster_pids(temp_dir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _start(command: Sequence[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(list(command), capture_output=True, text=True, env=env, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")


@contextlib.contextmanager
def loopback_cluster(python: Path | None = None, *, nodes: int = 2, cpus_per_node: int = 1,
                     env: dict[str, str] | None = None) -> Iterator[LoopbackCluster]:
    """`ray start --head` and `nodes - 1` times `ray start --address`, all on 127.0.0.1, each `--num-cpus`
    `cpus_per_node`; stopped (this cluster's processes only) on exit, whatever happened.

    Ray's session folders go under a short temporary folder of their own (Unix socket paths are
    limited to 107 bytes). `env` is added to every node's environment (e.g. Ray Serve's settings,
    which its proxies and replicas read at start).
    """
    python = python or ray_python()
    temp_dir = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
    run_env = {**os.environ, **(env or {}), "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1"}
    run_env.pop("RAY_ADDRESS", None)   # a caller's own cluster must not be joined by mistake
    ray = str(python.parent / "ray")
    gcs_port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    cluster = LoopbackCluster(python=python, address=address, temp_dir=temp_dir,
                              env={**run_env, "RAY_ADDRESS": address},
                              dashboard_url=f"http://127.0.0.1:{dashboard_port}")
    try:
        _start([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                "--num-cpus", str(cpus_per_node), "--num-gpus", "0", "--temp-dir", str(temp_dir),
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard_port), "--disable-usage-stats"], run_env, "ray start --head")
        for _ in range(nodes - 1):
            _start([ray, "start", "--address", address, "--node-ip-address", "127.0.0.1",
                    "--num-cpus", str(cpus_per_node), "--num-gpus", "0", "--temp-dir", str(temp_dir),
                    "--disable-usage-stats"], run_env, "ray start --address")
        yield cluster
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


__all__ = ["LoopbackCluster", "RAY_VERSION", "loopback_cluster", "ray_python", "serving_requirements",
           "stop_cluster", "peers_dir"]


if __name__ == "__main__":   # build the peer environment ahead of time: python -m bnfold.bench.ray_cluster
    print(ray_python())
    sys.exit(0)
