"""Progress for long steps: a tqdm bar on a terminal, one plain line otherwise.

Every command that shows progress (train's epochs, export's files, bench's rounds, the zoo's
models) asks `progress(...)` here, so that the decision is made once: a bar redrawn in place is
for a person watching a terminal; in a log file or a pipe each redraw was kept, and lines grew
to thousands of characters. Off a terminal a step prints one line when it ends (or nothing, with
`summary=False`, where the caller prints its own line, as training does per epoch).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr, where the bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def _bar_class() -> type:
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc, valid-type]
        """tqdm that keeps `n` within `total`: a count past it (float sums of seconds, a loader
        longer than announced) made tqdm warn "clamping frac to range [0, 1]" on every redraw."""

        def refresh(self, *args: Any, **kwargs: Any) -> Any:
            if self.total is not None and self.n > self.total:
                self.n = self.total
            return super().refresh(*args, **kwargs)

        def update(self, n: float = 1) -> Any:
            if self.total is not None:
                n = min(n, max(self.total - self.n, 0))
            return super().update(n)

    return Bar


class PlainProgress:
    """The bar's interface (iterate, update, set_postfix, `n`, refresh, close) without drawing.

    With `summary`, closing prints `desc: 3/3 files in 12.3 s (loss=0.41)` as one line.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", summary: bool = True, stream: TextIO | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.summary = total, desc, unit, summary
        self.stream = stream
        self.n: float = 0
        self.postfix: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            return
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass   # the item in hand (the zoo's model name): nothing to say once the step is over

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass   # the closing line names the whole step (`desc` as given), not its last item

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.summary or self.n == 0:
            return
        units = self.unit if self.unit == "s" or self.n == 1 else self.unit + "s"
        count = f"{_count(self.n)}/{_count(self.total)} {units}" if self.total else f"{_count(self.n)} {units}"
        extra = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        line = f"{self.desc}: {count} in {time.perf_counter() - self._start:.1f} s" + (f" ({extra})" if extra else "")
        print(line, file=self.stream if self.stream is not None else sys.stderr, flush=True)


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, summary: bool = True, stream: TextIO | None = None, **bar_options: Any) -> Any:
    """A progress bar for `iterable` (or for `update` calls up to `total`), drawn only on a terminal.

    enabled=False (`--no-progress`): nothing at all. On a terminal: a tqdm bar on `stream`
    (default stderr) with `bar_options` (leave, ...). Otherwise a `PlainProgress`: one line when
    the step ends, unless `summary=False`.
    """
    if enabled and on_terminal(stream):
        return _bar_class()(iterable, total=total, desc=desc, unit=unit, file=stream if stream is not None
                            else sys.stderr, **{"leave": False, **bar_options})
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, summary=summary and enabled, stream=stream)


__all__ = ["PlainProgress", "on_terminal", "progress"]
