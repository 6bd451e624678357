"""`ServeConfig`: everything `bnfold serve` takes, as one typed value (the way `TrainConfig` works).

The CLI (`bnfold serve`) and `python -m bnfold.serve` share `add_arguments` and `from_args`, so the
two spellings take the same options; `bnfold.serve.launch.serve(config)` reads all of it. Every
limit that protects the service from one client is here, with a default and the option that
raises it; a refusal names that option.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from bnfold.models.spec import MAX_BATCH_SIZE
from bnfold.options import DEVICES, ConfigOptions, from_args as config_from_args
from bnfold.serve.errors import ServeError
from bnfold.serve.scheduler import MAX_INSTANCES, MAX_QUEUE_DELAY_US

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServeConfig:
    """One `bnfold serve` run: what to serve, where, and the limits each client is held to."""

    # ONNX files, export folders, NAME=PATH, or a Triton-layout repository folder (a tuple for several)
    model: str | os.PathLike | tuple[str | os.PathLike, ...]
    name: str | None = None              # URL name for a single file (default: its spec's arch, else stem)
    spec: str | os.PathLike | None = None   # a spec JSON for a file without one (labels, mean/std, input shape)
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None         # gRPC (inference.GRPCInferenceService) port; None: no gRPC; 0: a free one
    threads: int = 0                     # intra-op threads per instance; 0: the CPUs this process may use / instances
    # Scheduling (serve.scheduler); None: each model's config.pbtxt, else 1 instance and no batching.
    instances: int | None = None         # sessions per model, each run by its own worker
    dynamic_batching: int | str | None = None   # max queue delay in microseconds, or "off"
    cuda_graph: bool = False
    log_level: str = "info"
    access_log: bool = True
    strict_images: bool = False          # /predictions refuses images far from the model's input (else a warning)
    # Ray Serve (`--ray ADDRESS`, the `bnfold[ray]` extra): the app deployed as replicas on a Ray cluster
    ray: str | None = None               # the cluster's address (host:port of its GCS, or "auto"); None: no Ray
    replicas: int | str = 1              # replicas, or "auto" (Ray's autoscaling between min and max)
    min_replicas: int = 1
    max_replicas: int = 4
    replica_cpus: float = 1.0            # CPUs Ray reserves for each replica (its onnxruntime threads)
    max_ongoing_requests: int = 32       # requests Ray's router lets one replica hold at once (Ray's default: 5)
    # Limits (each a `bnfold serve` option; each refusal is a 4xx naming the option).
    max_body_mb: float = 16.0            # request body, after decompression too
    max_batch_size: int | None = None    # None: config.pbtxt's in a repository, else MAX_BATCH_SIZE
    max_header_kb: float = 64.0          # request line and headers together
    max_headers: int = 100               # header fields per request
    request_timeout: float = 30.0        # seconds from a request's first byte (or the connection) to its last
    keep_alive: float = 5.0              # seconds an idle keep-alive connection is kept
    max_connections: int = 512           # open connections; more are answered 503 and closed
    max_multipart_parts: int = 16        # parts of a multipart/form-data upload
    max_pending_mb: float = 128.0        # request bodies held at once, all connections together
    max_decode_mpx: float = 48.0         # image megapixels being decoded at once, all uploads together

    def __post_init__(self) -> None:
        if self.device not in DEVICES:   # cpu or cuda: the only values of --device that serve takes
            raise ServeError(f"--device must be one of {', '.join(DEVICES)} for serve, got {self.device!r}")
        if self.log_level not in LOG_LEVELS:
            raise ServeError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ServeError(f"--port must be between 0 and 65535, got {self.port}")
        if self.grpc_port is not None and not (isinstance(self.grpc_port, int) and 0 <= self.grpc_port <= 65535):
            raise ServeError(f"--grpc-port must be between 0 and 65535, got {self.grpc_port}")
        if self.threads is None or not 0 <= self.threads <= MAX_THREADS:
            # 100,000 threads hung start-up for minutes while onnxruntime created them
            raise ServeError(f"--threads must be from 0 (the CPUs this process may use) to {MAX_THREADS}, "
                             f"got {self.threads}")
        if self.instances is not None and not (isinstance(self.instances, int)
                                               and 1 <= self.instances <= MAX_INSTANCES):
            raise ServeError(f"--instances must be from 1 to {MAX_INSTANCES}, got {self.instances}")
        delay = self.dynamic_batching
        if delay is not None and delay != "off" and not (type(delay) is int and 0 <= delay <= MAX_QUEUE_DELAY_US):
            raise ServeError(f"--dynamic-batching must be a delay in microseconds from 0 to {MAX_QUEUE_DELAY_US}, "
                             f"or off; got {delay!r}")
        if self.ray is None and any(getattr(self, name) != default for name, default in _RAY_DEFAULTS.items()):
            raise ServeError("--replicas, --min-replicas, --max-replicas, --replica-cpus and --max-ongoing-requests "
                             "need --ray ADDRESS")
        if self.ray is not None and self.grpc_port == 0:
            raise ServeError("--grpc-port 0 cannot be used with --ray: Ray Serve's gRPC proxy listens on the same "
                             "port on every node; give it one")
        if self.replicas != "auto" and not (type(self.replicas) is int and 1 <= self.replicas <= 1024):
            raise ServeError(f"--replicas must be from 1 to 1024, or auto; got {self.replicas!r}")
        if not 1 <= self.min_replicas <= self.max_replicas <= 1024:
            raise ServeError(f"--min-replicas and --max-replicas need 1 <= min <= max <= 1024, got "
                             f"{self.min_replicas} and {self.max_replicas}")
        if not 0 < self.replica_cpus <= 1024:   # also refuses NaN
            raise ServeError(f"--replica-cpus must be positive and at most 1024, got {self.replica_cpus}")
        if not 1 <= self.max_ongoing_requests <= 100_000:
            raise ServeError(f"--max-ongoing-requests must be from 1 to 100000, got {self.max_ongoing_requests}")
        if self.cuda_graph and self.device != "cuda":
            raise ServeError("--cuda-graph needs --device cuda")
        if self.max_batch_size is not None and not 1 <= self.max_batch_size <= 1 << 24:
            raise ServeError(f"--max-batch-size must be at least 1 and at most {1 << 24}, got {self.max_batch_size}")
        for name, (option, most) in LIMIT_BOUNDS.items():
            value = getattr(self, name)
            if not 0 < value <= most:   # also refuses NaN and infinity
                raise ServeError(f"{option} must be positive and at most {most}, got {value}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def max_pending_bytes(self) -> int:
        return int(self.max_pending_mb * (1 << 20))

    @property
    def max_header_bytes(self) -> int:
        return int(self.max_header_kb * 1024)

    @property
    def max_decode_pixels(self) -> int:
        return int(self.max_decode_mpx * 1_000_000)


# The Ray-only settings and their defaults, read from the fields: any other value needs --ray.
_RAY_DEFAULTS = {f.name: f.default for f in fields(ServeConfig)
                 if f.name in ("replicas", "min_replicas", "max_replicas", "replica_cpus", "max_ongoing_requests")}

# How `bnfold serve --ray` (and bench.ray_plain) name the replicas' own URLs under Ray Serve's
# direct ingress, one line on stderr that bench.compare_ray reads back.
RAY_DIRECT_LINE = "direct ingress replicas:"

MAX_THREADS = 1024
# Each limit's option and largest value, checked when the config is made (at parse time): far above
# any real need, and low enough that the byte counts stay exact integers (1e308 MB was a traceback).
LIMIT_BOUNDS: dict[str, tuple[str, float]] = {
    "max_body_mb": ("--max-body-mb", 4096), "max_header_kb": ("--max-header-kb", 1024),
    "max_headers": ("--max-headers", 10_000), "request_timeout": ("--request-timeout", 86_400),
    "keep_alive": ("--keep-alive", 86_400), "max_connections": ("--max-connections", 1_000_000),
    "max_multipart_parts": ("--max-multipart-parts", 10_000), "max_pending_mb": ("--max-pending-mb", 1_000_000),
    "max_decode_mpx": ("--max-decode-mpx", 100_000),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bnfold serve` options (also `python -m bnfold.serve`)."""
    opts = ConfigOptions(p, ServeConfig)   # defaults from ServeConfig; shared options from bnfold.options
    opts.add("model", nargs="+", metavar="MODEL",
             help="what to serve, one or more of: an ONNX file (served under its spec's arch, else its "
                  "file name; model.int8.onnx of arch lenet is lenet.int8), an export folder (what "
                  "`bnfold export --out DIR` wrote: each of its ONNX files), NAME=PATH (the ONNX file "
                  "PATH as NAME), or a model repository folder (as --triton-repo writes); two models "
                  "with one name are refused")
    opts.shared("--name")
    opts.add("--spec", metavar="SPEC.json",
             help="preprocessing and labels for a single ONNX file that has no bnfold spec, so that "
                  "/predictions works for it: {\"labels\": [...], \"mean\": [...], \"std\": [...], "
                  "\"input_shape\": [C, H, W]}, or the \"spec\" of an export.json")
    opts.shared("--device", help="where onnxruntime runs: cpu or cuda; cuda refuses to start unless "
                                 "CUDAExecutionProvider is active")
    opts.add("--host", help="address to listen on (0.0.0.0 for every interface)")
    opts.add("--port", type=int, help="TCP port to listen on (0-65535)")
    opts.add("--grpc-port", type=int, metavar="PORT",
             help="also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService, "
                  "what tritonclient.grpc speaks) on this port, in the same process with the same "
                  "models and limits; 0 picks a free port (printed at start); default: no gRPC")
    opts.shared("--threads", help="onnxruntime's intra-op threads (the service has no torch); 0 = the CPUs this "
                                    "process may use, divided among the instances; at most 1024")
    opts.add("--instances", type=int, metavar="N",
             help="sessions of each model, each run by its own worker thread on its share of the CPUs; a "
                  "request runs on a free one (default: a repository model's instance_group count, else 1)")
    opts.add("--dynamic-batching", type=_delay, metavar="MICROSECONDS",
             help="stack requests that arrive within this delay into one run (up to the max batch) and "
                  "split the answers back, as Triton's dynamic_batching; 'off' turns off what a "
                  "repository's config.pbtxt asks for (default: config.pbtxt's, else off)")
    opts.add("--cuda-graph", action="store_true", help="capture a CUDA graph for the fixed batch-1 shape")
    opts.add("--log-level", metavar="|".join(LOG_LEVELS), help="server log level")
    opts.add("--no-access-log", dest="access_log", action="store_false",
             help="do not write the JSON-lines access log to stderr")
    opts.add("--strict-images", action="store_true",
             help="/predictions refuses (422) an image far from the model's input: enlarged more than 4 "
                  "times, shrunk more than 32 times, or an aspect ratio more than 2:1 off; without it the "
                  "answer carries a warning field and a bnfold-image-warning header")
    ray = opts.group("Ray Serve (needs the bnfold[ray] extra)")
    ray.add("--ray", metavar="ADDRESS",
            help="deploy the same app as a Ray Serve application on the Ray cluster at ADDRESS (host:port "
                 "of its head, or auto) and return once every replica is ready; --host/--port are then "
                 "Ray Serve's HTTP proxy on each node, and MODEL must be readable at the same path on "
                 "every node. On a cluster started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 each replica "
                 "also answers on a port of its own, without Ray's proxy (about 10x faster here): the "
                 "URLs are printed")
    ray.add("--replicas", type=_replicas, metavar="N|auto",
            help="replicas of the app, each with its own onnxruntime session; auto lets Ray add and "
                 "remove them with the load, between --min-replicas and --max-replicas")
    ray.add("--min-replicas", type=int, metavar="A", help="with --replicas auto: the fewest replicas")
    ray.add("--max-replicas", type=int, metavar="B", help="with --replicas auto: the most replicas")
    ray.add("--replica-cpus", type=float, metavar="F",
            help="CPUs Ray reserves for each replica, also its onnxruntime threads unless --threads")
    ray.add("--max-ongoing-requests", type=int, metavar="N",
            help="requests Ray Serve's router hands one replica at once before it queues them (Ray's own "
                 "default is 5; bnfold's, measured on a loopback cluster, is higher because a replica "
                 "answers in well under a millisecond)")
    limits = opts.group("limits (a request over one is refused with a 4xx naming the option)")
    limits.add("--max-body-mb", type=float,
               help="largest request body, also after gzip/deflate decompression (413 beyond)")
    limits.add("--max-batch-size", type=int,
               help=f"largest batch per request (400 beyond); default: max_batch_size from a "
                     f"repository's config.pbtxt, else {MAX_BATCH_SIZE}")
    limits.add("--max-header-kb", type=float,
               help="largest request line plus headers (431 beyond)")
    limits.add("--max-headers", type=int, help="most header fields per request (431 beyond)")
    limits.add("--request-timeout", type=float,
               help="seconds a client has to send a whole request, from its first byte or from "
                    "connecting; slower connections get 408 and are closed (and logged)")
    limits.add("--keep-alive", type=float, help="seconds an idle keep-alive connection is kept")
    limits.add("--max-connections", type=int,
               help="open connections at once; more are answered 503 and closed (and logged)")
    limits.add("--max-multipart-parts", type=int,
               help="parts in a multipart/form-data image upload (413 beyond)")
    limits.add("--max-pending-mb", type=float,
               help="request bodies held in memory at once, all connections together, counted as "
                    "they arrive and as they are inflated: a body that would pass this is answered "
                    "503 (each may be up to --max-body-mb)")
    limits.add("--max-decode-mpx", type=float,
               help="image megapixels being decoded at once, all /predictions uploads together (a "
                    "pixel costs 2 to 8 bytes while decoding): an upload waits for room, up to 30 s, "
                    "then 503; an image larger than this (or than 40 megapixels) is answered 413")


def _replicas(text: str) -> int | str:
    """`--replicas`: a count (an integer) or "auto"."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of replicas or auto, got {text!r}") from None


def _delay(text: str) -> int | str:
    """`--dynamic-batching`: microseconds (an integer) or "off"."""
    if text.strip().lower() == "off":
        return "off"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected microseconds (an integer) or off, got {text!r}") from None


def from_args(args: argparse.Namespace) -> ServeConfig:
    """The config for parsed `add_arguments` options; a bad value is a `ServeError`."""
    model = args.model
    if isinstance(model, list):   # nargs="+": one source stays a plain path
        model = model[0] if len(model) == 1 else tuple(model)
    return config_from_args(ServeConfig, args, model=model)


__all__ = ["ServeConfig", "add_arguments", "from_args", "MAX_BATCH_SIZE"]
