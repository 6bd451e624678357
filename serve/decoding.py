"""Image decoding off the event loop, in a pool of its own, bounded by pixels held at once.

A compressed image says little about what it costs: a 78 KB 16-bit PNG of 8000x5000 pixels
decodes to hundreds of megabytes. So an upload's header is read first (`images.open_upload`,
cheap), its pixels are taken from a `PixelBudget` shared by every request, and only then is it
decoded; the pixels are given back when its input array is made. An image larger than the whole
budget can never be decoded and is refused (413); one that does not fit now waits for room,
and after `wait` seconds is refused (503), both naming `--max-decode-mpx`. Smaller images pass
larger waiting ones when they fit, so a 28x28 upload is not queued behind a 40-megapixel one.

The decoding threads are their own `ThreadPoolExecutor`, not the event loop's default one,
which runs large inference batches: a burst of big images cannot occupy the threads inference
needs, and at most `workers` images decode at once whatever the host's core count.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from bnfold.serve.errors import limit_error

OPTION = "--max-decode-mpx"


class PixelBudget:
    """Pixels being decoded, all requests together; `hold(n)` waits for room (event-loop side only)."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self.held = 0
        self._waiters: list[asyncio.Future[None]] = []

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, what: str = "image") -> AsyncIterator[None]:
        if pixels > self.limit:
            raise limit_error(f"{what} of {pixels} pixels", f"{self.limit} pixels decoded at once", OPTION)
        if self.held + pixels > self.limit:
            await self._wait_for_room(pixels, what)
        self.held += pixels
        try:
            yield
        finally:
            self.held -= pixels   # no await here: a cancelled request gives its pixels back too
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait_for_room(self, pixels: int, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while self.held + pixels > self.limit:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise limit_error(f"pixels being decoded ({self.held}, and {pixels} more for this {what}, "
                                  f"after waiting {self.wait:g} s)", f"{self.limit} pixels", OPTION, status=503)
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)   # woken by every release; checked again
            except asyncio.TimeoutError:
                pass
            finally:
                self._waiters.remove(waiter)


def decode_pool(workers: int) -> ThreadPoolExecutor:
    """The threads that inflate bodies and decode images (named, so a stack dump tells them apart)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnfold-decode")


__all__ = ["PixelBudget", "decode_pool", "OPTION"]
