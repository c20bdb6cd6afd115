"""Folders held by a live process, and each process's scratch folder.

A held folder is ``<prefix><host>-<random>`` holding ``HELD_LOCK``, locked (flock) for as long
as its owner lives. The kernel releases the lock however the owner dies (SIGKILL, the OOM
killer), so the next owner of such a folder in the same parent can tell a dead one's leftovers
from a live one's, whatever their process-id namespaces. Used by the trials' temporary files
(``scratch_dir``) and the post-processor's stage folder. Standard library only (every layer
imports it; ``records``' layering).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["HELD_LOCK", "SCRATCH_PREFIX", "host_tag", "new_held", "remove_stale_held",
           "scratch_dir"]

HELD_LOCK = ".lock"


def host_tag() -> str:
    """This host's name as a file-name part (a shared file system holds several hosts'
    folders, and flock may be local to each host)."""
    return re.sub(r"[^0-9A-Za-z.]", "_", socket.gethostname())[:64] or "host"


def remove_stale_held(parent: Path, prefix: str) -> None:
    """Delete the held folders ``<prefix><host>-*`` in ``parent`` whose owner no longer runs:
    named for this host and holding a lock file that can be locked (a live owner holds it).
    Another host's are left (a file system whose locks are local to each host, such as NFS
    mounted with nolock, would let any lock be taken), as are folders without a lock file
    (still being made, or left by an older version), unless they are empty and older than
    ``UNHELD_GRACE_S`` (their maker was killed before it locked them).

    A stale folder is first renamed, under its lock, to ``.<name>.removing`` and deleted
    from there: a cleaner killed part-way through (the tests' and the OOM killer's SIGKILL)
    had left a folder whose lock file was already gone, and so kept for good. Such
    ``.removing`` folders of this host are deleted by the next cleaner whatever they hold."""
    host = glob.escape(host_tag())
    for folder in Path(parent).glob(f"{glob.escape(prefix)}{host}-*"):
        trash = folder.with_name(f".{folder.name}{_REMOVING}")
        try:
            with open(folder / HELD_LOCK) as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(folder, trash)  # while holding it: no one reuses it
        except FileNotFoundError:  # no lock file: being made, or its maker killed meanwhile
            _remove_if_abandoned(folder)
            continue
        except OSError:  # held by a live owner, or a file system without locks
            continue
        shutil.rmtree(trash, ignore_errors=True)
    for trash in Path(parent).glob(f".{glob.escape(prefix)}{host}-*{_REMOVING}"):
        shutil.rmtree(trash, ignore_errors=True)


_REMOVING = ".removing"

#: A folder without a lock file and with nothing in it (but its lock file being made) that has
#: not changed for this long was left by an owner killed between making it and locking it
#: (tests' and the OOM killer's SIGKILL at a trial's first checkpoint: a few per test suite)
UNHELD_GRACE_S = 600


def _remove_if_abandoned(folder: Path) -> None:
    """Delete ``folder`` when it holds nothing but possibly its lock file being made
    (``HELD_LOCK``.new) and has not changed for ``UNHELD_GRACE_S``. A live owner locks its
    folder at once; an owner on a file system without locks (no lock file at all) fills its
    folder when it makes it, and makes it again if it is gone (``scratch_dir``)."""
    try:
        names = [p.name for p in folder.iterdir()]
        old = time.time() - folder.stat().st_mtime > UNHELD_GRACE_S
    except OSError:
        return
    if old and set(names) <= {f"{HELD_LOCK}.new"}:
        shutil.rmtree(folder, ignore_errors=True)


def new_held(parent: Path, prefix: str) -> tuple[Path, contextlib.AbstractContextManager]:
    """A new folder ``<prefix><host>-<random>`` in ``parent`` and the open lock file that
    holds it: (folder, file). Closing the file (or the process's end) lets the next
    ``remove_stale_held`` delete the folder. The lock is taken under a temporary name and only
    then renamed into place, so no cleaner ever finds it unlocked while its owner lives.

    On a file system without locks (Lustre without ``-o flock``, some FUSE mounts: flock
    fails with ENOLCK, EOPNOTSUPP or ENOSYS) the folder is made all the same, without a lock
    file (``remove_stale_held`` leaves such folders), and the "file" is a no-op context:
    what used a plain temporary folder there still works, only a killed owner's folder is
    left as before."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{host_tag()}-", dir=parent))
    fh = open(folder / f"{HELD_LOCK}.new", "w")  # noqa: SIM115 (held for the owner's life)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        os.replace(folder / f"{HELD_LOCK}.new", folder / HELD_LOCK)
    except OSError as exc:
        fh.close()
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            shutil.rmtree(folder, ignore_errors=True)
            raise
        (folder / f"{HELD_LOCK}.new").unlink(missing_ok=True)
        return folder, contextlib.nullcontext()
    except BaseException:
        fh.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, fh


SCRATCH_PREFIX = "alignsweep-scratch-"
_scratch: tuple[Path, contextlib.AbstractContextManager, int] | None = None


def scratch_dir() -> Path:
    """This process's folder for temporary files, in the system's temporary folder
    (``alignsweep-scratch-<host>-<random>``, held for the process's life): a trial's
    checkpoint before Ray persists it, its artifacts, a checkpoint it restores from. A
    process killed outright (SIGKILL, the OOM killer) runs no cleanup, and at paper scale
    each checkpoint left behind is hundreds of MB; so the first call in each process deletes
    the folders of this host's processes that are gone. Removed at a normal exit."""
    global _scratch
    if _scratch is None or not _scratch[0].is_dir():
        if _scratch is not None and os.getpid() == _scratch[2]:  # deleted under us: its
            _scratch[1].__exit__(None, None, None)  # lock goes with it
        parent = Path(tempfile.gettempdir())
        remove_stale_held(parent, SCRATCH_PREFIX)
        folder, fh = new_held(parent, SCRATCH_PREFIX)
        pid = os.getpid()
        _scratch = (folder, fh, pid)

        def remove() -> None:  # not from a forked child that inherited the folder
            if os.getpid() == pid:
                shutil.rmtree(folder, ignore_errors=True)

        atexit.register(remove)
    return _scratch[0]
