"""The one exception family whose messages are written for the user.

Every package raises a subclass of `BnfoldError` for a mistake the caller can fix (a missing
file, a wrong shape, a parity failure). The CLI prints the message alone, without a
traceback, and exits non-zero; the HTTP service turns the service's own subclass into a 4xx.
"""
from __future__ import annotations


class BnfoldError(Exception):
    """A failure with a message meant for the person running bnfold."""


class ParityError(BnfoldError):
    """A rewritten or exported model disagrees with its source beyond the tolerance."""
