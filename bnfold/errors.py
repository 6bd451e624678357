"""The one exception family whose messages are written for the user.

Every package raises a subclass of `BnfoldError` for a mistake the caller can fix (a missing
file, a wrong shape, a parity failure). The CLI prints the message alone, without a
traceback, and exits non-zero; the HTTP service turns the service's own subclass into a 4xx.
"""
from __future__ import annotations

import re


class BnfoldError(Exception):
    """A failure with a message meant for the person running bnfold."""


class ParityError(BnfoldError):
    """A rewritten or exported model disagrees with its source beyond the tolerance."""


class FoldSkipped(BnfoldError):
    """A guard refused to fold one BatchNorm (module, functional call or ONNX node); the message is
    the reason shown in the report. Caught inside the fold pass, never raised to the caller."""


def first_line(exc: BaseException, *, with_type: bool = False, limit: int = 300, deepest: bool = False) -> str:
    """The first line of an exception's message, cut at `limit` characters, for one-line errors.

    With `with_type`, prefixed by the exception's class name ("ValueError: ..."); an exception
    without a message gives its class name alone. Tracebacks and the rest of long messages
    (exporters and onnxruntime print whole graphs) stay out of what the user reads. With
    `deepest`, the last exception of the `__cause__`/`__context__` chain is read instead: the
    exporters wrap the real cause in their own errors.
    """
    if deepest:
        seen: set[int] = set()
        while id(exc) not in seen and (exc.__cause__ or exc.__context__) is not None:
            seen.add(id(exc))
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    # torch.load's messages carry terminal colour codes; a one-line error should not.
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:limit]
