"""On-disk cache shared by every generated or derived artefact (simulated world, trained
reference networks, prepared tables).

One place decides where the cache lives and how keys are hashed, so concurrent trials and
drivers on one machine agree on paths. Writers hold a file lock and publish atomically
(write to a temporary sibling, then rename), so a reader never sees a half-written entry.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import glob
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn

from filelock import FileLock

ENV_VAR = "ALIGNSWEEP_CACHE"


def cache_root(*, create: bool = True) -> Path:
    """The cache directory: ``$ALIGNSWEEP_CACHE`` if set, else ``~/.cache/alignsweep``
    (created unless ``create`` is False); absolute, a relative setting taken from the
    current folder: the prepared data's paths are made from it, and Tune runs each trial in
    its own folder (a relative one failed every trial of the NSD demo: "cannot read
    'imgBrick' ... copy it again from the release")."""
    from records.uris import expand_user

    root = os.environ.get(ENV_VAR)
    path = expand_user(root, ENV_VAR) if root else Path.home() / ".cache" / "alignsweep"
    path = Path(os.path.abspath(path))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def cache_entry_of(path: str | os.PathLike) -> Path | None:
    """The cache entry (``cache_root()/<kind>/<entry>``) holding ``path``, or None (a file of
    the user's); creates nothing."""
    root = Path(os.path.realpath(cache_root(create=False)))
    rel = Path(os.path.realpath(path))
    if not rel.is_relative_to(root):
        return None
    parts = rel.relative_to(root).parts
    return root / parts[0] / parts[1] if len(parts) >= 3 else None


def content_hash(params: dict, length: int = 16) -> str:
    """Stable hex digest of a JSON-serialisable parameter dict (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


#: Lock files are made writable by every user who can reach their folder (a cache or storage
#: folder a lab shares): made under a 022 umask they were the first user's alone, and every
#: other user's run failed opening them.
SHARED_LOCK_MODE = 0o666


@contextlib.contextmanager
def build_once(final_dir: Path) -> Iterator[Path | None]:
    """Build a cache directory exactly once across processes.

    Yields ``None`` when ``final_dir`` already exists (nothing to do); otherwise yields a fresh
    temporary directory beside it, which is renamed to ``final_dir`` when the block exits
    without an exception (and removed if it raises). A file lock serialises concurrent builders,
    so the second one waits and then sees the finished entry.

    A builder killed outright (SIGKILL, out of memory, a node lost) leaves its
    ``<name>.tmp-*`` folder behind, possibly gigabytes; whoever takes the lock next removes
    every such folder of this entry. That is safe only under the lock: a live builder of the
    entry holds it, so every ``<name>.tmp-*`` seen while holding it belongs to a dead one.
    """
    final_dir = Path(final_dir)
    lock = str(final_dir) + ".lock"
    if final_dir.exists():  # made whole by one rename: used without the lock where it cannot
        # be taken (another user's lock file in a cache a lab shares, a read-only cache)
        with contextlib.suppress(OSError), FileLock(lock, mode=SHARED_LOCK_MODE):
            _remove_dead_builds(final_dir)
        yield None
        return
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _held(lock, final_dir):
        _remove_dead_builds(final_dir)
        if final_dir.exists():
            yield None
            return
        tmp = Path(tempfile.mkdtemp(prefix=final_dir.name + ".tmp-", dir=final_dir.parent))
        try:
            # mkdtemp's folder is its maker's alone (0700), and it becomes the entry: in a
            # cache a lab shares, every other user's run was refused reading it. The
            # entry's mode is what the umask gives any folder.
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            os.replace(tmp, final_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def _held(lock: str, final_dir: Path) -> Iterator[None]:
    """``final_dir``'s build lock, held for the block; another user's lock that does not open
    here (in a sticky folder, or made before stop 38) is one line, not filelock's error."""
    held = FileLock(lock, mode=SHARED_LOCK_MODE)
    try:
        held.acquire()
    except PermissionError:
        folder = final_dir.parent
        if not Path(lock).exists() and not os.access(folder, os.W_OK | os.X_OK):
            # (a group's cache whose folder another user's 022 umask made theirs alone)
            raise DamagedCacheEntry(
                f"cache entry {final_dir} cannot be built by this user: its folder {folder} "
                f"is {owner_name(folder)}'s and not writable here; accepted: its owner makes it "
                f"writable to the users who share the cache (chmod g+w or a+w '{folder}'), "
                f"or a cache of your own (ALIGNSWEEP_CACHE=DIR)") from None
        raise DamagedCacheEntry(
            f"cache entry {final_dir} cannot be built by this user: its lock {lock} is "
            f"{owner_name(Path(lock))}'s and does not open here; accepted: its owner removes the "
            f"lock (rm '{lock}') or builds the entry, or a cache of your own "
            f"(ALIGNSWEEP_CACHE=DIR)") from None
    try:
        yield
    finally:
        held.release()


def _umask() -> int:
    """This process's umask: from /proc (setting it to read it would change it for the
    process's other threads meanwhile), else by setting it and setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_dead_builds(final_dir: Path) -> None:
    """Under ``final_dir``'s lock: its ``<name>.tmp-*`` folders, each a dead builder's."""
    for stale in final_dir.parent.glob(glob.escape(final_dir.name) + ".tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per process for its (path, size, mtime): a weights file
    is hashed for the resume fingerprint and for the parent run's tag in one invocation."""
    path = Path(path)
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class DamagedCacheEntry(ValueError):
    """A cache entry that exists but is not what it was built as (``damaged_entry``'s line):
    the user's to delete, so the driver says it in one line (exit 2) like bad input."""


def damaged_entry(entry: Path, why: str) -> str:
    """One line for a cache entry that exists but cannot be read (a disk that filled, a copy
    cut short, a file deleted by hand): ``build_once`` takes an existing folder as built, so
    the way out is to delete it. An entry another user made that this user may not read (a
    cache a lab shares; entries were their maker's alone, 0700, until stop 38) is not
    damaged: its owner's chmod is the way out, not deleting a colleague's entry."""
    why = ' '.join(why.split())[:200]
    try:
        foreign = entry.stat().st_uid != os.getuid()
    except OSError:
        foreign = False
    if foreign and ("Permission denied" in why or not os.access(entry, os.R_OK | os.X_OK)):
        return (f"cache entry {entry} is {owner_name(entry)}'s and this user may not read it "
                f"({why}); accepted: its owner makes it readable (chmod -R a+rX '{entry}'), "
                f"or a cache of your own (ALIGNSWEEP_CACHE=DIR)")
    return f"cache entry {entry} is damaged ({why}); delete it to rebuild it: rm -r '{entry}'"


def unreachable_data(path: str | os.PathLike, exc: BaseException):
    """``records.errors.unreachable`` for a data file a trial reads: a
    ``records.errors.DataUnreachable`` where this node cannot reach ``path``, else None.
    A file missing from a cache entry that is here is damage to the entry
    (``damaged_entry``'s advice rebuilds it), not a path this node lacks."""
    from records.errors import unreachable

    away = unreachable(path, exc)
    if away is None:
        return None
    entry = cache_entry_of(path)
    return None if entry is not None and entry.is_dir() else away


def owner_name(path: Path) -> str:
    """``user NAME`` of ``path``'s owner, or ``another user``."""
    try:
        import pwd

        return f"user {pwd.getpwuid(path.stat().st_uid).pw_name}"
    except (ImportError, KeyError, OSError):
        return "another user"


@contextlib.contextmanager
def env_default(name: str, value: str):
    """Within the block, the environment variable ``name`` is ``value`` unless the user set it
    (a library that reads it at each call); removed again afterwards."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` (to be created if missing) cannot be written, or None. Creates nothing:
    the nearest existing ancestor must be a writable folder (a dry run writes nothing).
    Shared by the driver's plan and the post-processor's --out."""
    probe = folder
    while not probe.exists():
        if probe.is_symlink():  # dangling: mkdir would fail with "File exists"
            return (f"{probe} is a symbolic link to {os.readlink(probe)}, which does not exist "
                    f"(a share not mounted?)")
        if probe.parent == probe:
            return f"no existing folder above {folder}"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    # os.access answers from permission bits, which say yes to root on /proc, /sys or a
    # mount that refuses files: try one (an unnamed file where the system has them, else a
    # named one removed at once; nothing is left)
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return f"{probe} does not take files ({exc.strerror or type(exc).__name__})"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a kill mid-write) sees the old file or
    the new one, never a truncated one: a temporary sibling, fsync, then rename.

    An exception removes the temporary file; a kill between its creation and the rename leaves
    it behind as a hidden ``.<name>.tmp-XXXXXXXX`` beside ``path``. Such a file is never read
    (readers open ``path``) and its name is unique, so it cannot collide with a later write;
    it is left for the user to delete rather than guessed at here (with no lock, a file of
    that pattern may be another process's write in progress).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_sibling(path)
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


def _new_sibling(path: Path) -> tuple[int, Path]:
    """A new ``.<name>.tmp-<random>`` file beside ``path``, opened for writing. Not
    ``tempfile.mkstemp``: its files are mode 0600, and the rename would give the published
    file (a report, a table others read) that mode instead of the umask's usual 0644."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # a name taken by another writer (or a killed one): redraw
            continue
    raise FileExistsError(f"no free temporary name beside {path} after 100 tries")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write_bytes`` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def quiet_interrupts() -> None:
    """Ctrl-C while a command's imports still load (MLflow, matplotlib, torch: seconds, before
    its own ``except KeyboardInterrupt`` exists) ends it with the one line its ``main`` would
    print, not the imports' traceback. Called first thing under ``__main__``.

    A C extension whose initialisation the Ctrl-C lands in may turn it into its own error
    (matplotlib's ft2font: ``ImportError: initialization failed``, caused by the
    KeyboardInterrupt), and the half-initialised module then crashes the interpreter's
    shutdown ("Fatal Python error: PyThreadState_Get"). Such an error is the same one line,
    and the process ends at once with status 130, skipping that shutdown: nothing has been
    computed yet at that point."""
    default = sys.excepthook

    def hook(kind, value, tb) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
        elif _caused_by_interrupt(value):
            print("interrupted", file=sys.stderr)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(130)
        else:
            default(kind, value, tb)

    sys.excepthook = hook


def _caused_by_interrupt(error: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is among ``error``'s causes and contexts."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def traceback_file(exc: BaseException) -> Path:
    """Write ``exc``'s traceback, secrets redacted, to ``<cache>/logs/error-<time>-<pid>.log``
    (or the temporary folder's ``alignsweep-logs-<uid>`` when the cache is what failed); returns the
    path. What a command line names in its one-line error for an unexpected failure."""
    import time
    import traceback

    from records.uris import redact

    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = redact("".join(traceback.format_exception(exc)))
    try:
        return atomic_write_text(cache_root() / "logs" / name, text)
    except (OSError, ValueError, RuntimeError):  # the cache itself may be what failed (its
        # folder, or ALIGNSWEEP_CACHE=~name naming no user)
        # one folder per user: a shared one was its first maker's alone (0755), and every
        # other user's traceback was "not written"
        return atomic_write_text(
            Path(tempfile.gettempdir()) / f"alignsweep-logs-{os.getuid()}" / name, text)


#: A file system with less than this free (for this user) is called full by ``low_space``
LOW_SPACE_BYTES = 16 * 2**20


def low_space(folders: Mapping[str, str | os.PathLike | None]) -> list[str]:
    """``"<what> <folder> (<n> bytes free)"`` for each of ``folders`` (what -> folder; None
    skipped; a folder not made yet is judged by the nearest one above it) whose file system
    has under ``LOW_SPACE_BYTES`` free for this user, one per file system."""
    said, seen = [], set()
    for what, folder in folders.items():
        try:  # a folder under one this user may not search, a working folder deleted: skipped
            path = Path(folder).expanduser().absolute() if folder else None
            while path is not None and not os.path.exists(path) and path != path.parent:
                path = path.parent
            device, stats = os.stat(path).st_dev, os.statvfs(path)
        except (OSError, ValueError, TypeError, RuntimeError):
            continue
        if device in seen:
            continue
        seen.add(device)
        free = stats.f_bavail * stats.f_frsize
        if free < LOW_SPACE_BYTES:
            said.append(f"{what} {folder} ({free} bytes free)")
    return said


def _no_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what it was raised from is a full disk (ENOSPC, EDQUOT)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def unexpected_error_line(exc: BaseException,
                          folders: Mapping[str, str | os.PathLike | None]
                          | Callable[[], Mapping[str, str | os.PathLike | None]]) -> str:
    """The one line a command prints for an unexpected failure: ``error: Type: message (full
    traceback: FILE)``. Where a file system the command writes to (``folders``: what ->
    folder) is full, or the failure is a full disk, it says so and what to do: a disk that
    fills mid-run surfaces as whatever reads a cut-short file next (``EOFError: Ran out of
    input``), and h5py's ENOSPC message was clipped before its "No space left on device",
    naming no folder either way (probed at stop 37). ``folders`` may be a function that
    lists them; whatever it raises leaves the line without the note. The cache and the
    temporary folder, which every command writes, are always looked at."""
    from records.errors import exception_line

    try:
        log = str(traceback_file(exc))
    except OSError as err:  # the cache and the temporary folder are both full
        log = f"not written: {exception_line(err, 80)}"
    line = f"error: {exception_line(exc, 300)} (full traceback: {log})"
    def own(find: Callable[[], Path]) -> Path | None:
        try:  # no usable temporary folder, a bad ALIGNSWEEP_CACHE: left out
            return find()
        except Exception:
            return None

    try:
        full = low_space({**(folders() if callable(folders) else folders),
                          "the cache": own(lambda: cache_root(create=False)),
                          "the temporary folder": own(lambda: Path(tempfile.gettempdir()))})
    except Exception:  # the line is what matters: never a traceback instead of it
        full = []
    if full:
        line += (f"; no space left on {', '.join(full)}: free space there (or give another "
                 f"folder), then run it again")
    elif _no_space(exc):
        line += ("; no space left on a disk it writes to: free space there (or give another "
                 "folder), then run it again")
    return line


def integer_arg(accepted: str) -> Callable[[str], int]:
    """An argparse type for the project's command lines: an int, else a one-line error
    saying what is ``accepted`` (argparse's own said only "invalid int value")."""
    def integer(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}; accepted: {accepted}") from None
    return integer


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (``error: ...``) and exit status 2,
    as every command line of the project ends a bad input (argparse prints its usage block)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


class _StdoutAfterItsReader:
    """``sys.stdout`` of a long command: where its reader goes away (``run.py ... | head -20``,
    a log pipe that dies), the first failed write points the process's standard output at
    its standard error (file descriptor 1 too: Ray's and Tune's own writes), says so there
    once (``note``), and the command goes on. A sweep was ended at its next line, exit 1,
    the parent run FAILED, with nothing said on standard error; the post-processor wrote
    and logged the whole report, then failed "unexpectedly"."""

    def __init__(self, inner, note: str) -> None:
        self._inner = inner
        self._note = note
        self._moved = False
        self._lock = threading.Lock()  # Ray's log thread prints too

    def _move(self) -> None:
        with self._lock:
            if self._moved:  # another thread moved it: write again
                return
            self._moved = True
            sys.stderr.flush()
            os.dup2(sys.stderr.fileno(), self._inner.fileno())
            print(f"note: standard output was closed (its reader ended); {self._note}, its "
                  f"lines on standard error", file=sys.stderr, flush=True)

    def _again(self, call):
        try:
            return call()
        except BrokenPipeError:  # (standard error closed as well: the second raises)
            self._move()
            return call()

    def write(self, text: str) -> int:
        return self._again(lambda: self._inner.write(text))

    def flush(self) -> None:
        self._again(self._inner.flush)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def stdout_survives_its_reader(note: str) -> None:
    """``sys.stdout`` as ``_StdoutAfterItsReader`` (``note``: what goes on, e.g. "the sweep
    goes on"); nothing where standard output or error is not a file (a test's capture)."""
    try:
        sys.stdout.fileno()
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not file-backed (a test's capture)
        return
    if not isinstance(sys.stdout, _StdoutAfterItsReader):
        sys.stdout = _StdoutAfterItsReader(sys.stdout, note)
