"""`bnfold serve MODEL --ray ADDRESS`: bnfold's own app as a Ray Serve application on a Ray cluster.

Each replica is a Ray actor that builds the same ASGI app `bnfold serve` runs under uvicorn
(`create_app(config)`: the same routes, limits, page, metrics and access log), loading the model
itself from a path its node can read. Ray Serve's proxy on every node (`--host`/`--port`) takes
the HTTP requests and hands them to a replica; Ray restarts a replica whose process dies and,
with `--replicas auto`, adds and removes replicas with the load.

`deploy(config)` returns once the application is RUNNING (every replica loaded and warmed up);
the application stays on the cluster after this process exits, like any Serve application, until
`serve shutdown` or `deploy` of a new version replaces it.

Requires Ray Serve (`pip install 'bnfold[ray]'`); nothing else in bnfold imports Ray.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from bnfold.serve.config import ServeConfig
from bnfold.serve.errors import ServeError

try:
    import ray
    from ray import serve
except ImportError:   # pragma: no cover - the message is the point
    raise ServeError("--ray needs Ray Serve in this environment: pip install 'bnfold[ray]'", status=500) from None

APP_NAME = "bnfold"


@serve.deployment(name=APP_NAME)
@serve.ingress()
class BnfoldReplica:
    """One replica: the models loaded from `config` into bnfold's ASGI app, which Ray Serve drives."""

    def __init__(self, config: ServeConfig) -> None:
        from bnfold.serve.app import create_app
        from bnfold.serve.launch import _give_large_buffers_back

        _give_large_buffers_back()
        self._app = create_app(config)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose app stopped being ready is replaced."""
        if not getattr(self._app, "ready", True):
            raise RuntimeError("bnfold app is not ready")


def _absolute(source: str | os.PathLike) -> str:
    """A model source with its path made absolute: replicas start in Ray's own working folders."""
    text = os.fspath(source)
    name, sep, path = text.partition("=")
    if sep and not Path(text).exists():   # NAME=PATH
        return f"{name}={Path(path).expanduser().resolve()}"
    return str(Path(text).expanduser().resolve())


def replica_config(config: ServeConfig) -> ServeConfig:
    """What each replica runs: absolute model paths, and onnxruntime threads = its CPUs unless given."""
    model = config.model
    model = tuple(_absolute(m) for m in model) if isinstance(model, tuple) else _absolute(model)
    threads = config.threads or max(1, int(config.replica_cpus))
    return dataclasses.replace(config, model=model, threads=threads)


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve deployment options from `--replicas`, `--min/max-replicas`, `--replica-cpus`,
    `--max-ongoing-requests`; Ray's own per-request access log is off (bnfold's app writes its own)."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": config.replica_cpus},
                               "max_ongoing_requests": config.max_ongoing_requests,
                               "logging_config": {"enable_access_log": False, "log_level": "WARNING"}}
    if config.replicas == "auto":
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": 2}
    else:
        options["num_replicas"] = config.replicas
    return options


def _check_sources(config: ServeConfig) -> None:
    """A missing path is our one-line error here, not a replica's traceback after Ray's retries."""
    sources = config.model if isinstance(config.model, tuple) else (config.model,)
    for source in sources:
        path = _absolute(source).partition("=")[2] or _absolute(source)
        if not Path(path).exists():
            raise ServeError(f"model {os.fspath(source)!r} not found (every Ray node must see it at this path)",
                             status=500)


def deploy(config: ServeConfig) -> str:
    """Deploy `config` as the Serve application "bnfold" on the cluster at `config.ray`; its URL once RUNNING."""
    _check_sources(config)
    try:
        ray.init(address=config.ray, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServeError(f"cannot reach the Ray cluster at {config.ray!r}: {first}", status=500) from None
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        app = BnfoldReplica.options(**deployment_options(config)).bind(replica_config(config))
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:   # the deployment failed: Ray's message names the replica's error
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = next((line.strip() for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise ServeError(f"the Ray Serve application did not start: {reason}", status=500) from None
    finally:
        ray.shutdown()
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    url = f"http://{host}:{config.port}"
    count = config.replicas if config.replicas != "auto" else f"{config.min_replicas}-{config.max_replicas}"
    print(f"bnfold serve: application {APP_NAME!r} RUNNING on the Ray cluster at {config.ray} with {count} "
          f"replica(s) of {config.replica_cpus:g} CPU; Ray Serve answers on {url} "
          f"(remove it with: serve shutdown -a http://DASHBOARD:8265 -y)", file=sys.stderr, flush=True)
    return url


__all__ = ["APP_NAME", "BnfoldReplica", "deploy", "deployment_options", "replica_config"]
