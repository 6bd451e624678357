"""The service's errors: each carries the HTTP status it is answered with."""
from __future__ import annotations

import re

from bnfold.errors import BnfoldError

# `<_io.BytesIO object at 0x7fb52eed1210>`: library messages sometimes embed object reprs; an
# error body must not show heap addresses (or anything else about the process) to a client.
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


class ServeError(BnfoldError):
    """A request or start-up problem with the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 400, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.allow = allow       # for 405: the methods the route takes (the `Allow` header)


class DeviceUnavailableError(ServeError):
    """The device asked for (CUDA) is not active in this onnxruntime; nothing falls back silently."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503)


def limit_error(what: str, limit: str, option: str, status: int = 413) -> ServeError:
    """A refusal that names the limit and the `bnfold serve` option that raises it."""
    return ServeError(f"{what} is over the limit of {limit} (raise it with `bnfold serve {option}`)", status=status)


def client_text(message: str) -> str:
    """`message` with object reprs such as `<_io.BytesIO object at 0x...>` replaced."""
    return _OBJECT_REPR.sub("<object>", message)


__all__ = ["ServeError", "DeviceUnavailableError", "limit_error", "client_text"]
