"""What an existing SQLite file is, before MLflow opens it: shared by the driver (which writes
a store) and the post-processor (which only reads one).

MLflow's SqlAlchemyStore, on open, creates its tables in any SQLite file that lacks one of
them (an empty file, a text file it then fails on, another program's database) and then
migrates it to its schema (``mlflow.store.db.utils._all_tables_exist`` /
``_initialize_tables``): opening would write. ``sqlite_store_problem`` therefore looks first:
the file must start with the SQLite header and (opened read-only by Python's sqlite3, which
writes nothing) hold every table MLflow checks for, at the schema revision this MLflow
expects (an older one would be migrated, or refused with a traceback). On such a store
MLflow's open only reads (its default experiment exists; measured on MLflow 3.17: the
file's bytes and mtime are unchanged). The check reads MLflow's own lists (private names,
pinned by mlflow<4; a rename fails here loudly, not silently).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SQLITE_HEADER", "first_open_lock", "first_open_lock_path", "sqlite_path",
           "sqlite_store_problem"]

SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_path(uri: str) -> Path | None:
    """The database file a ``sqlite:`` URI names (``~`` expanded), or None when it names none
    (an in-memory database, a malformed URI)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        name = make_url(uri).database
    except ArgumentError:
        name = None
    if not name or name == ":memory:":
        return None
    return Path(name).expanduser()


def sqlite_store_problem(db: Path) -> str | None:
    """Why the existing file ``db`` is not an MLflow store of this MLflow's schema, as a
    phrase about ``db`` ("... is an empty file, so not an MLflow store ..."), or None when it
    is one. Reads the file's first bytes and, read-only, its table list; writes nothing."""
    import sqlite3
    from urllib.parse import quote

    with db.open("rb") as fh:
        header = fh.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        what = "an empty file" if not header else "not a SQLite database (no SQLite header)"
        return (f"{db} is {what}, so not an MLflow store (left as it is: MLflow would create "
                f"its tables in it)")
    try:
        # mode=ro: SQLite opens the file read-only, so this look cannot write either. The
        # timeout waits out a trial writing to the store meanwhile, as MLflow's busy_timeout.
        con = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True,
                              timeout=20)
        try:
            tables = {row[0] for row in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            revision = None
            if "alembic_version" in tables:
                row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = row[0] if row else None
        finally:
            con.close()
    except sqlite3.Error as exc:
        return f"{db} cannot be read as a SQLite database ({exc})"
    if not {"experiments", "runs", "alembic_version"} <= tables:
        found = ", ".join(sorted(tables)[:8]) or "none"
        return (f"{db} is a SQLite database but not an MLflow store (tables: {found}; an "
                f"MLflow store has experiments, runs, alembic_version)")
    from mlflow.store.db import utils as mlflow_db

    missing = sorted(set(mlflow_db.Base.metadata.tables) - tables)
    head = mlflow_db._get_latest_schema_revision()
    if missing or revision != head:
        import mlflow

        return (f"{db} is an MLflow store of another schema (revision {revision}; MLflow "
                f"{mlflow.__version__} reads {head}"
                + (f", and lacks tables {', '.join(missing[:4])}" if missing else "")
                + "), which opening it would migrate")
    return None


def first_open_lock_path(db: Path) -> Path:
    """The lock file of ``first_open_lock``: ``.<name>.lock`` beside the store."""
    return db.parent / f".{db.name}.lock"


@contextlib.contextmanager
def first_open_lock(db: Path, timeout: float = -1) -> Iterator[None]:
    """The lock beside a SQLite store (``.<name>.lock``) that a driver holds while it first
    opens the file and MLflow makes (or migrates) its tables there: another driver, or another
    driver's plan, waits on it rather than finding a store half made. An flock: released when
    its holder dies. A lock file another user left unwritable: no lock. ``timeout`` (seconds,
    -1: none) passed: ``filelock.Timeout``."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(first_open_lock_path(db)), mode=0o666)  # other users' too
    try:
        lock.acquire(timeout=timeout)
    except Timeout:  # (an OSError too, and not the unwritable file's)
        raise
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()
