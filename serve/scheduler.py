"""The scheduler between the protocols (HTTP, gRPC) and the model's sessions, with Triton's semantics.

Every inference request of every protocol goes through `Scheduler.infer(x)`: one numpy batch in,
the model's outputs for exactly those rows out. What happens in between is read from a
repository's config.pbtxt or from `bnfold serve` options (`Scheduling`):

- `instance_group { count: N }` / `--instances N`: N onnxruntime sessions of the model, each run
  by its own worker thread, one run at a time per session. A request runs on whichever session
  is free; with N > 1 every run goes to a worker so that the sessions really run side by side.
- `dynamic_batching { max_queue_delay_microseconds, preferred_batch_size }` /
  `--dynamic-batching MICROSECONDS`: requests that arrive within the delay of the oldest waiting
  one are stacked along the batch axis (whole requests, up to the model's max batch), run once and
  split back. A batch leaves as soon as it reaches the largest preferred size (the max batch when
  none is given), or when the oldest request has waited the delay: then the largest preferred
  size that whole requests at the head of the queue form, else all of them up to the max batch.
  A request therefore waits at most the delay, plus the run in progress on a busy session.
- Neither (the default): one session, and a request small enough to run in under
  `INLINE_THRESHOLD_MS` runs right in the event loop, as before; a larger one goes to the
  session's worker thread. Runs on the session never overlap (the old default let concurrent
  requests share one session's intra-op pool, which oversubscribes the cores).

Workers are plain threads waiting on one condition variable: its timed wait is precise to tens of
microseconds, where the event loop's timers round to milliseconds. onnxruntime releases the GIL
while it runs, so N workers run N sessions at once.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.serve.errors import ServeError

if TYPE_CHECKING:   # runtime.py imports Scheduling from here
    from bnfold.serve.runtime import Runtime

KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")   # AUTO: the device served
# Bounds that keep a typo from starting 10,000 sessions or holding requests for an hour.
MAX_INSTANCES = 64
MAX_QUEUE_DELAY_US = 10_000_000

# (rows in the run, seconds each of its requests waited before the run started, seconds the run took)
RunObserver = Callable[[int, Sequence[float], float], None]


@dataclass(frozen=True)
class Scheduling:
    """How one model's requests are run: Triton's `instance_group` and `dynamic_batching`.

    `max_queue_delay_us` None means dynamic batching is off; 0 means on without waiting (only
    requests already queued behind a busy session are stacked).
    """

    instances: int = 1
    kind: str = "KIND_AUTO"   # the device the model is served on
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if type(self.instances) is not int or not 1 <= self.instances <= MAX_INSTANCES:
            raise ServeError(f"instance count must be an integer from 1 to {MAX_INSTANCES}, got {self.instances!r}",
                             status=500)
        if self.kind not in KINDS:
            raise ServeError(f"instance kind must be one of {', '.join(KINDS)}, got {self.kind!r}", status=500)
        delay = self.max_queue_delay_us
        if delay is not None and (type(delay) is not int or not 0 <= delay <= MAX_QUEUE_DELAY_US):
            raise ServeError(f"max_queue_delay_microseconds must be an integer from 0 to {MAX_QUEUE_DELAY_US}, "
                             f"got {delay!r}", status=500)
        for size in self.preferred_batch_sizes:
            if type(size) is not int or size < 1:
                raise ServeError(f"preferred_batch_size must be positive integers, got {size!r}", status=500)

    @property
    def batching(self) -> bool:
        return self.max_queue_delay_us is not None

    def check(self, model: Runtime) -> None:
        """Refuse settings the loaded model cannot follow (one line naming the model)."""
        wanted = "KIND_GPU" if model.device == "cuda" else "KIND_CPU"
        if self.kind not in (wanted, "KIND_AUTO"):
            raise ServeError(f"model {model.name!r}: instance_group kind {self.kind} does not match --device "
                             f"{model.device} (use kind {wanted})", status=500)
        if not self.batching:
            return
        if model.max_batch_size < 1:
            raise ServeError(f"model {model.name!r}: dynamic batching needs a batch axis (max_batch_size > 0); "
                             f"this model's batch axis is fixed", status=500)
        if any(len(o.shape) < 1 or o.shape[0] != -1 for o in model.outputs):
            raise ServeError(f"model {model.name!r}: dynamic batching splits outputs along their first axis, but "
                             f"outputs {[o.shape for o in model.outputs]} do not all have a dynamic batch axis",
                             status=500)
        over = [s for s in self.preferred_batch_sizes if s > model.max_batch_size]
        if over:
            raise ServeError(f"model {model.name!r}: preferred_batch_size {over} is over max_batch_size "
                             f"{model.max_batch_size}", status=500)

    def describe(self) -> str:
        text = f"{self.instances} instance{'s' if self.instances > 1 else ''} ({self.kind})"
        if self.batching:
            text += f", dynamic batching within {self.max_queue_delay_us} us"
            if self.preferred_batch_sizes:
                text += f" preferring {list(self.preferred_batch_sizes)}"
        return text


class _Pending:
    __slots__ = ("x", "rows", "future", "arrived")

    def __init__(self, x: np.ndarray, future: asyncio.Future, arrived: float) -> None:
        self.x = x
        self.rows = x.shape[0] if x.ndim else 1
        self.future = future
        self.arrived = arrived


class Scheduler:
    """Runs one model's requests on its instances; `infer` is the one entry point.

    `instances` are loaded sessions of the same model (the first one's metadata is the model's);
    `observe`, when given, is called after every run from the thread that ran it.
    """

    def __init__(self, instances: Sequence[Runtime], scheduling: Scheduling = Scheduling(),
                 observe: RunObserver | None = None) -> None:
        if len(instances) != scheduling.instances:
            raise ServeError(f"{len(instances)} sessions for {scheduling.instances} instances", status=500)
        self.instances = list(instances)
        self.model = self.instances[0]
        self.scheduling = scheduling
        scheduling.check(self.model)
        self.observe = observe
        self._delay = (scheduling.max_queue_delay_us or 0) / 1e6
        self._max_rows = self.model.max_batch_size if scheduling.batching else 0
        preferred = sorted(set(scheduling.preferred_batch_sizes))
        self._preferred = preferred
        self._full = preferred[-1] if preferred else self._max_rows   # rows that leave at once
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._locks = [threading.Lock() for _ in self.instances]
        # The inline path: off when the sessions should run side by side or requests be stacked.
        self._inline = scheduling.instances == 1 and not scheduling.batching
        self._workers: list[threading.Thread] = []

    # ------------------------------------------------------------------ the entry point
    async def infer(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output of the model for batch `x`, in the model's output order."""
        if self._inline and (x.shape[0] if x.ndim else 1) <= self.model.inline_batch:
            lock = self._locks[0]
            if lock.acquire(blocking=False):   # the session is idle: run right here
                try:
                    start = time.perf_counter()
                    results = self.model.run_all(x)
                    if self.observe is not None:
                        self.observe(x.shape[0] if x.ndim else 1, (0.0,), time.perf_counter() - start)
                    return results
                finally:
                    lock.release()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending = _Pending(x, future, time.perf_counter())
        with self._cond:
            if self._closed:
                raise ServeError("server is shutting down", status=503)
            if not self._workers:
                self._start()
            self._queue.append(pending)
            self._queued_rows += pending.rows
            self._cond.notify()
        return await future

    def close(self) -> None:
        """Stop the workers once the queue is empty (requests already queued still run).

        A later `infer` starts them again (an app whose lifespan runs twice, as in tests).
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(timeout=30)
        with self._cond:
            self._workers = []
            self._closed = False

    # ------------------------------------------------------------------ workers
    def _start(self) -> None:
        for index in range(len(self.instances)):
            worker = threading.Thread(target=self._work, args=(index,), daemon=True,
                                      name=f"bnfold-{self.model.name}-{index}")
            worker.start()
            self._workers.append(worker)

    def _take(self) -> list[_Pending] | None:
        """The next requests to run together (under the lock); None when closed and drained."""
        queue = self._queue
        while True:
            while not queue:
                if self._closed:
                    return None
                self._cond.wait()
            if not self._max_rows:   # no dynamic batching: one request per run
                item = queue.popleft()
                self._queued_rows -= item.rows
                return [item]
            deadline = queue[0].arrived + self._delay
            while queue and self._queued_rows < self._full and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if queue:   # else another worker took them while this one waited
                return self._batch()

    def _batch(self) -> list[_Pending]:
        """Whole requests from the head of the queue: a preferred size if one forms, else up to the max."""
        queue = self._queue
        limit = self._max_rows
        rows = 0
        count = 0
        best = 0   # requests that make the largest preferred size seen so far
        for item in queue:
            if rows + item.rows > limit:
                break
            rows += item.rows
            count += 1
            if rows in self._preferred:
                best = count
        count = best or max(count, 1)   # a request over the limit cannot come here; one always leaves
        taken = [queue.popleft() for _ in range(count)]
        self._queued_rows -= sum(item.rows for item in taken)
        return taken

    def _work(self, index: int) -> None:
        model = self.instances[index]
        lock = self._locks[index]
        while True:
            with self._cond:
                batch = self._take()
                if self._queue:
                    self._cond.notify()   # more waiting: let another worker look
            if batch is None:
                return
            start = time.perf_counter()
            try:
                x = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
                with lock:
                    results = model.run_all(x)
                outcome: Any = _split(batch, results)
            except BaseException as exc:   # delivered to each waiting request, which the app answers
                outcome = exc
            ran = time.perf_counter() - start
            if self.observe is not None:
                try:
                    self.observe(sum(item.rows for item in batch), [start - item.arrived for item in batch], ran)
                except Exception:  # metrics must never lose an answer
                    pass
            _post(batch, outcome)


def _split(batch: list[_Pending], results: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Each request's rows of every output (views, no copies)."""
    if len(batch) == 1:
        return [results]
    total = sum(item.rows for item in batch)
    for array in results:
        if array.ndim == 0 or array.shape[0] != total:
            raise ServeError(f"an output of shape {list(array.shape)} has no batch axis of {total} rows to split",
                             status=500)
    answers = []
    offset = 0
    for item in batch:
        answers.append([array[offset:offset + item.rows] for array in results])
        offset += item.rows
    return answers


def _post(batch: list[_Pending], outcome: Any) -> None:
    """Hand each request its answer on its own event loop (one wake-up per loop, normally one)."""
    answers = [outcome if isinstance(outcome, BaseException) else outcome[i] for i in range(len(batch))]
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
    for item, answer in zip(batch, answers):
        by_loop.setdefault(item.future.get_loop(), []).append((item.future, answer))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:   # that loop is closed: nobody waits there any more
            pass


def _deliver(items: list[tuple[asyncio.Future, Any]]) -> None:
    for future, answer in items:
        if future.done():   # the request was cancelled (client gone)
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)


def build_scheduler(runtime: Runtime, scheduling: Scheduling = Scheduling(),
                    observe: RunObserver | None = None) -> Scheduler:
    """A scheduler for `runtime`, opening `scheduling.instances - 1` more sessions of the same file."""
    scheduling.check(runtime)
    instances = [runtime]
    if scheduling.instances > 1:
        replica = getattr(runtime, "replica", None)
        if replica is None:
            raise ServeError(f"model {runtime.name!r} cannot open more than one instance", status=500)
        instances += [replica() for _ in range(scheduling.instances - 1)]
    return Scheduler(instances, scheduling, observe)


__all__ = ["Scheduling", "Scheduler", "build_scheduler", "KINDS", "MAX_INSTANCES", "MAX_QUEUE_DELAY_US"]
