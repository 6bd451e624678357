"""Starting the service: in this process under uvicorn (`serve`), or as a subprocess (`running_server`).

The subprocess is `python -m bnfold.serve` (this package's own entry, the same options as
`bnfold serve`), so serving never reaches up to the CLI.
"""
from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bnfold.serve.config import ServeConfig
from bnfold.serve.errors import ServeError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _bind(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so that a busy port is our clear error, not uvicorn's exit(1)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", status=500) from exc
    sock.set_inheritable(True)
    return sock


def _give_large_buffers_back() -> None:
    """glibc only: every allocation of 128 KB or more is its own mapping, unmapped when freed.

    128 KB is glibc's own starting threshold, but glibc raises it each time a large block is freed
    (up to 32 MB), after which request bodies and decoded images come from the heap and stay there:
    probed, 12 uploads of a 40-megapixel PNG left the server at 480 MB (from 83), 40 bodies of
    15 MB at 649 MB. With the threshold fixed, RSS went back to 88 and 85 MB. A batch-1 request
    allocates nothing this large.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD (setting it also stops the dynamic raise)
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to do
        pass


def serve(config: ServeConfig) -> int:
    """Load the model(s), then serve until SIGTERM/SIGINT; in-flight requests finish first.

    Loading (and the CUDA check) happens before the port is bound, so failures surface as a
    `ServeError` for the CLI to print; uvicorn runs with uvloop and httptools under the
    connection limits of `config` (see serve.connection), its own access log off (the app
    writes JSON lines instead).
    """
    if config.ray is not None:   # the same app as replicas on a Ray cluster (serve.ray_app); returns once RUNNING
        from bnfold.serve.ray_app import deploy

        deploy(config)
        return 0
    import uvicorn

    from bnfold.serve.app import create_app
    from bnfold.serve.connection import ConnectionLimits, protocol_class

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    _give_large_buffers_back()
    app = create_app(config)
    sock = _bind(config.host, config.port)
    if config.grpc_port is not None:
        # Imported only when asked for: grpc and tritonclient's messages take ~1 s to import.
        from bnfold.serve.grpc_service import attach_grpc

        attach_grpc(app, config.host, config.grpc_port, max_concurrent_rpcs=config.max_connections)
    limits = ConnectionLimits(max_header_bytes=config.max_header_bytes, max_headers=config.max_headers,
                              request_timeout=config.request_timeout, max_connections=config.max_connections)
    # httptools, with the limits and with head and body of each response in one write.
    http = protocol_class(limits) or "httptools"
    # ws="none": the service has no WebSocket routes, so an Upgrade request is answered as plain HTTP
    # instead of reaching the app as a websocket scope (which uvicorn answered 500 and logged as an error).
    uv_config = uvicorn.Config(app, loop="uvloop", http=http, ws="none", lifespan="on", access_log=False,
                               log_level=config.log_level, server_header=False, timeout_graceful_shutdown=30,
                               timeout_keep_alive=config.keep_alive,   # type: ignore[arg-type]
                               h11_max_incomplete_event_size=config.max_header_bytes, limit_max_requests=None)
    server = uvicorn.Server(uv_config)
    print(f"bnfold serve: {', '.join(app.models)} on http://{config.host}:{sock.getsockname()[1]} ({config.device})",
          file=sys.stderr, flush=True)
    # uvicorn re-raises the signal it shut down for once its own handlers are gone; with these in
    # place a graceful SIGTERM/SIGINT ends in exit status 0 instead of death by the default handler.
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stopped_by.append(number))
    server.run(sockets=[sock])
    if stopped_by:
        print(f"bnfold serve: stopped by {signal.Signals(stopped_by[0]).name} after in-flight requests finished",
              file=sys.stderr, flush=True)
    return 0


def _ready(host: str, port: int, timeout: float = 1.0, path: str = "/v2/health/ready") -> bool:
    """True when GET `path` answers 200 (any server, so the reference service can be probed too)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def server_process(command: Sequence[str], port: int, *, ready_path: str = "/v2/health/ready",
                   env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                   startup_timeout: float = 120.0,
                   on_ready: Callable[[subprocess.Popen], None] | None = None) -> Iterator[str]:
    """Run an HTTP server `command` listening on 127.0.0.1:`port`; yield its URL once GET `ready_path` is 200.

    Its output goes to `log_path` (default: a temporary file, removed afterwards) rather than a
    pipe nobody reads, which would stall the server once full. A server that exits or is not
    ready within `startup_timeout` raises `ServeError` with the tail of its log. On exit it is
    sent SIGTERM and waited for (killed after 30 s). `on_ready` is handed the process once it is
    ready (a benchmark reads its CPU time). Used for `bnfold serve` and the reference service.
    """
    owned_log = log_path is None
    if owned_log:
        fd, temp_name = tempfile.mkstemp(prefix="bnfold-server-", suffix=".log")
        os.close(fd)   # reopened below by name; mkstemp's descriptor would otherwise leak
        log_file = Path(temp_name)
    else:
        log_file = Path(log_path)
    with open(log_file, "wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + startup_timeout
        while not _ready("127.0.0.1", port, path=ready_path):
            if process.poll() is not None:
                tail = log_file.read_text(errors="replace")[-2000:]
                raise ServeError(f"`{' '.join(command)}` exited with code {process.returncode} before it was "
                                 f"ready:\n{tail}", status=500)
            if time.monotonic() > deadline:
                raise ServeError(f"server on port {port} not ready after {startup_timeout:.0f} s; "
                                 f"log: {log_file}", status=500)
            time.sleep(0.05)
        if on_ready is not None:
            on_ready(process)
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if owned_log:
            with contextlib.suppress(OSError):
                log_file.unlink()


@contextlib.contextmanager
def running_server(model_path: str | os.PathLike | Sequence[str | os.PathLike], *, device: str = "cpu", threads: int | None = None,
                   port: int | None = None, name: str | None = None, extra_args: Sequence[str] = (),
                   log_path: str | os.PathLike | None = None, startup_timeout: float = 120.0,
                   env: dict[str, str] | None = None,
                   on_ready: Callable[[subprocess.Popen], None] | None = None) -> Iterator[str]:
    """`python -m bnfold.serve` (= `bnfold serve`) as a subprocess on 127.0.0.1; yields its URL once ready.

    The process, its log and its stop are `server_process`'s; the arguments are `bnfold serve`'s.
    """
    port = free_port() if port is None else port
    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)   # several: serve them all
    command = [sys.executable, "-m", "bnfold.serve", *map(str, paths), "--device", device,
               "--host", "127.0.0.1", "--port", str(port)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if name is not None:
        command += ["--name", name]
    command += list(extra_args)
    with server_process(command, port, env=env, log_path=log_path, startup_timeout=startup_timeout,
                        on_ready=on_ready) as url:
        yield url
