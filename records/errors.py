"""Exceptions as one line of a message: every refusal and failure the service prints, tags or
logs says its cause in one line, and these two functions are the one way it is written.
Standard library only (``records``' layering)."""

from __future__ import annotations

import errno
import os
import socket

from records.uris import redact

__all__ = ["DataUnreachable", "exception_line", "one_line", "unreachable"]


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


#: ``errno`` of a path a process cannot reach, as against a file it reached whose content is
#: wrong: not there, a folder on the way missing, no permission, a network mount stale, down
#: or unreachable, an I/O error of the device or the mount.
_UNREACHABLE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ESTALE,
                          errno.ENODEV, errno.ENXIO, errno.ENOTCONN, errno.EHOSTDOWN,
                          errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EIO})


class DataUnreachable(OSError):
    """A data file a trial cannot open where it runs, though the driver found it as it planned
    the run: a path not mounted on this node, a mount gone stale, no permission here, a file
    removed since. An OSError, so Tune retries the trial (on a cluster perhaps on a node that
    has the data), never a format error: a ValueError that a trial would meet on every node,
    which ends it for good (``sweeps.execute.RepeatedFailure``). Picklable as one message,
    so it leaves a DataLoader worker with its type."""


def unreachable(path: str | os.PathLike, exc: BaseException) -> DataUnreachable | None:
    """``exc``, raised opening or reading ``path``, as a :class:`DataUnreachable` naming this
    node and the path when its ``errno`` says the path could not be reached; None for any
    other error (a file reached whose content is wrong)."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code not in _UNREACHABLE:
        return None
    err = DataUnreachable(
        f"node {socket.gethostname()} cannot open {os.fspath(path)} ({os.strerror(code)}), "
        f"which the driver found as it planned the run; expected the data at the same path on "
        f"every node (a shared mount), unchanged while the run lasts")
    err.errno = code
    return err
