"""`bnfold serve MODEL --ray ADDRESS`: bnfold's own app as a Ray Serve application on a Ray cluster.

Each replica is a Ray actor that builds the same ASGI app `bnfold serve` runs under uvicorn
(`create_app(config)`: the same routes, limits, page, metrics and access log), loading the model
itself from a path its node can read. Ray Serve's proxy on every node (`--host`/`--port`) takes
the HTTP requests and hands them to a replica; Ray restarts a replica whose process dies and,
with `--replicas auto`, adds and removes replicas with the load. On a cluster that runs Ray
Serve's direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1` on every node), each replica also
answers HTTP on a port of its own, without the proxy; `deploy` prints those URLs
(`direct_ingress_urls`).

`deploy(config)` returns once the application is RUNNING (every replica loaded and warmed up);
the application stays on the cluster after this process exits, like any Serve application, until
`serve shutdown` or `deploy` of a new version replaces it.

Requires Ray Serve (`pip install 'bnfold[ray]'`); nothing else in bnfold imports Ray.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path
from typing import Any

from bnfold.errors import first_line
from bnfold.serve.config import RAY_DIRECT_LINE as DIRECT_LINE, ServeConfig
from bnfold.serve.errors import ServeError

try:
    import ray
    from ray import serve
except ImportError:   # pragma: no cover - the message is the point
    raise ServeError("--ray needs Ray Serve in this environment: pip install 'bnfold[ray]'", status=500) from None

APP_NAME = "bnfold"


# Ray's gRPC proxy learns the service's method names from this registration (tritonclient's, the
# messages bnfold's own gRPC service speaks) and calls the replica method named as each RPC.
GRPC_SERVICER = "bnfold.serve.ray_grpc.add_GRPCInferenceServiceServicer_to_server"
GRPC_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
             "ModelConfig", "ModelStatistics", "RepositoryIndex")


class _Aborted(Exception):
    """bnfold's gRPC handler refused the call; the status and details are on Ray's context."""


class _RayContext:
    """Ray's gRPC context in the shape bnfold's handlers use (peer, abort), so they run unchanged."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def peer(self) -> str:
        return self._context.peer()

    async def abort(self, code: Any, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted


class _Replica:
    """One replica: the models loaded from `config` into bnfold's ASGI app, which Ray Serve drives.

    With `--grpc-port`, the replica also answers `inference.GRPCInferenceService` through Ray's gRPC
    proxy with bnfold's own gRPC handlers (serve.grpc_service; not started as a server here).
    """

    def __init__(self, config: ServeConfig) -> None:
        from bnfold.serve.app import create_app
        from bnfold.serve.launch import _give_large_buffers_back

        _give_large_buffers_back()
        self._app = create_app(config)
        self._rpcs: dict[str, Any] = {}
        if config.grpc_port is not None:
            import bnfold.serve.ray_grpc  # noqa: F401  (the message modules' names, for Ray's pickling)
            from bnfold.serve.grpc_service import GrpcService

            service = GrpcService(self._app)
            self._rpcs = {name: (service.wrap(name, method), response)
                          for name, (method, _, response) in service.methods().items()}

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose app stopped being ready is replaced."""
        if not getattr(self._app, "ready", True):
            raise RuntimeError("bnfold app is not ready")

    async def _rpc(self, name: str, request: Any, grpc_context: Any) -> Any:
        if name not in self._rpcs:
            grpc_context.set_code(_grpc_status("UNIMPLEMENTED"))
            grpc_context.set_details("this application was deployed without --grpc-port")
            return None
        handler, response_class = self._rpcs[name]
        try:
            return await handler(request, _RayContext(grpc_context))
        except _Aborted:
            return response_class()   # empty: the status and details carry the answer


def _grpc_status(name: str) -> Any:
    import grpc

    return getattr(grpc.StatusCode, name)


def _rpc_method(name: str) -> Any:
    async def method(self: _Replica, request: Any, grpc_context: Any) -> Any:
        return await self._rpc(name, request, grpc_context)

    method.__name__ = method.__qualname__ = name
    return method


for _name in GRPC_RPCS:
    setattr(_Replica, _name, _rpc_method(_name))

BnfoldReplica = serve.deployment(name=APP_NAME)(serve.ingress()(_Replica))


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


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """HOST:PORT that nothing answers is our one-line error now; ray.init would retry it for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return   # "auto", ray://...: Ray's own lookup
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ServeError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc} (is `ray start "
                         f"--head` running there?)", status=500) from None


def direct_ingress_urls(app_name: str, host: str, expected: int = 1, timeout: float = 30.0) -> list[str]:
    """The HTTP addresses at which `app_name`'s replicas answer themselves, when the cluster runs Ray
    Serve's direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1` or `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`
    on every node); [] when it does not. Call with `ray.init` done. Ray's controller publishes the
    replicas' ports a control-loop tick after they start, so this waits (up to `timeout`) for
    `expected` of them. `host` is where the replicas listen (Serve's `http_options.host`); for all
    interfaces, each replica's node address is given instead.

    Ray has no public call for this yet: it reads the controller's target groups, which are what its
    own HAProxy ingress is configured from, and says [] if that call is not there.
    """
    import time

    import ray.exceptions
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    # The flag is the cluster's, read by Ray's controller; this process may not have it set, so
    # without it here a short wait tells (the ports are published within a tick when it is on).
    started = time.monotonic()
    wait = timeout if _direct_ingress_on() else min(timeout, 3.0)
    while True:
        try:
            groups = ray.get(controller.get_target_groups.remote(app_name))
        except (AttributeError, TypeError, ray.exceptions.RayError):
            return []
        targets = [t for g in groups if str(getattr(g.protocol, "value", g.protocol)) == "HTTP"
                   for t in g.targets if t.name.startswith("SERVE_REPLICA::")]
        late = time.monotonic() - started > wait
        if len(targets) >= expected or (late and targets):
            return sorted(f"http://{t.ip if host in ('0.0.0.0', '::') else host}:{t.port}" for t in targets)
        if late:
            return []
        time.sleep(0.2)


def _direct_ingress_on() -> bool:
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_ENABLE_DIRECT_INGRESS)


def deploy(config: ServeConfig) -> str:
    """Deploy `config` as the Serve application "bnfold" on the cluster at `config.ray`; its URL once RUNNING."""
    _check_sources(config)
    _check_reachable(config.ray)
    try:
        ray.init(address=config.ray, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ServeError(f"cannot reach the Ray cluster at {config.ray!r}: {first_line(exc)}", status=500) from None
    try:
        grpc_options = None
        if config.grpc_port is not None:
            grpc_options = {"port": config.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
        serve.start(http_options={"host": config.host, "port": config.port}, grpc_options=grpc_options)
        app = BnfoldReplica.options(**deployment_options(config)).bind(replica_config(config))
        serve.run(app, name=APP_NAME, route_prefix="/")
        expected = config.replicas if config.replicas != "auto" else config.min_replicas
        direct = direct_ingress_urls(APP_NAME, config.host, expected)
    except RuntimeError as exc:   # the deployment failed: Ray's message names the replica's error
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = next((line.strip() for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise ServeError(f"the Ray Serve application did not start: {reason}", status=500) from None
    finally:
        ray.shutdown()
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    url = f"http://{host}:{config.port}"
    grpc_note = f" and gRPC on {host}:{config.grpc_port}" if config.grpc_port is not None else ""
    count = config.replicas if config.replicas != "auto" else f"{config.min_replicas}-{config.max_replicas}"
    print(f"bnfold serve: application {APP_NAME!r} RUNNING on the Ray cluster at {config.ray} with {count} "
          f"replica(s) of {config.replica_cpus:g} CPU; Ray Serve answers on {url}{grpc_note} "
          f"(remove it with: serve shutdown -a http://DASHBOARD:8265 -y)", file=sys.stderr, flush=True)
    if direct:
        print(f"{DIRECT_LINE} {' '.join(direct)} (Ray Serve's direct ingress: each replica answers on its own "
              "port, without Ray's proxy; put them behind a load balancer)", file=sys.stderr, flush=True)
    return url


__all__ = ["APP_NAME", "DIRECT_LINE", "BnfoldReplica", "deploy", "deployment_options", "direct_ingress_urls",
           "replica_config"]
