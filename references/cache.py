"""On-disk cache shared by every generated or derived artefact (simulated world, trained
reference networks, prepared tables).

One place decides where the cache lives and how keys are hashed, so concurrent trials and
drivers on one machine agree on paths. Writers hold a file lock and publish atomically
(write to a temporary sibling, then rename), so a reader never sees a half-written entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

ENV_VAR = "ALIGNSWEEP_CACHE"


def cache_root() -> Path:
    """The cache directory: ``$ALIGNSWEEP_CACHE`` if set, else ``~/.cache/alignsweep``."""
    root = os.environ.get(ENV_VAR)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "alignsweep"
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_hash(params: dict, length: int = 16) -> str:
    """Stable hex digest of a JSON-serialisable parameter dict (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@contextlib.contextmanager
def build_once(final_dir: Path) -> Iterator[Path | None]:
    """Build a cache directory exactly once across processes.

    Yields ``None`` when ``final_dir`` already exists (nothing to do); otherwise yields a fresh
    temporary directory beside it, which is renamed to ``final_dir`` when the block exits
    without an exception (and removed if it raises). A file lock serialises concurrent builders,
    so the second one waits and then sees the finished entry.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final_dir) + ".lock"):
        if final_dir.exists():
            yield None
            return
        tmp = Path(tempfile.mkdtemp(prefix=final_dir.name + ".tmp-", dir=final_dir.parent))
        try:
            yield tmp
            os.replace(tmp, final_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a kill mid-write) sees the old file or
    the new one, never a truncated one: a temporary sibling, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write_bytes`` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))
