"""Exceptions as one line of a message: every refusal and failure the service prints, tags or
logs says its cause in one line, and these two functions are the one way it is written.
Standard library only (``records``' layering)."""

from __future__ import annotations

from records.uris import redact

__all__ = ["exception_line", "one_line"]


def one_line(exc: BaseException | str) -> str:
    """An exception's message (or a text) on one line: each run of whitespace, line breaks
    included, as one space (nibabel's, h5py's, torch's and MLflow's messages may span
    several lines)."""
    return " ".join(str(exc).split())


def exception_line(exc: BaseException, limit: int | None = 200, *, first_line: bool = False) -> str:
    """``Type: message`` on one line, the message clipped to ``limit`` characters (None: whole)
    and the secrets of any URI in it redacted; the type alone when the message is empty.
    ``first_line``: the message's first non-empty line only, for messages whose later lines
    are advice or a dump rather than the cause (torch's zip reader and unpickler)."""
    text = str(exc)
    if first_line:
        text = next((line for line in text.splitlines() if line.strip()), "")
    text = redact(one_line(text))
    if limit is not None:
        text = text[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
