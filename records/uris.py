"""Tracking URIs as users give them: resolved once (``tracking_uri``) and never shown with
their secrets (``redact``). Shared by the driver and the post-processor."""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

__all__ = ["DEFAULT_MLFLOW_DB", "Refusal", "expand_user", "not_utf8", "redact",
           "tracking_refuses", "tracking_unreachable", "tracking_uri"]

DEFAULT_MLFLOW_DB = "mlflow.db"
_MLFLOW_ACCEPTED = ("sqlite:///PATH.db, http(s)://HOST:PORT, file:///ABSOLUTE/PATH (with "
                    "MLFLOW_ALLOW_FILE_STORE=true), postgresql://..., mysql://..., mssql://..., "
                    "databricks")

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(:[^/@\s]*)?@")
_SECRET_QUERY = re.compile(r"(?i)([?&;][^=&;\s]*(?:passw|pwd|token|secret|signature|"
                           r"credential|key)[^=&;\s]*=)[^&;\s]*")


def not_utf8(argv: list[str]) -> str | None:
    """Why the command line ``argv`` cannot be used, or None: every argument must be UTF-8.
    Python carries other bytes (a path named in Latin-1) as surrogates, which Ray's start-up,
    a UTF-8 console, a report or an MLflow request fail to encode, mid-run."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(arg)
            shown = raw.decode("utf-8", "backslashreplace")
            if sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"):
                try:  # UTF-8 bytes that this Python's locale reads as another encoding
                    shown = raw.decode("utf-8")
                except UnicodeDecodeError:
                    pass
                else:
                    locale = next((f"{k}={os.environ[k]}" for k in ("LC_ALL", "LC_CTYPE",
                                                                      "LANG")
                                   if os.environ.get(k)), "no LC_ALL, LC_CTYPE or LANG")
                    if os.environ.get("PYTHONUTF8") == "0":
                        locale += ", PYTHONUTF8=0"
                    return (f"argument '{shown}' is UTF-8, but this Python reads arguments "
                            f"as {sys.getfilesystemencoding()} (the locale: {locale}); "
                            f"accepted: a UTF-8 locale (LC_ALL=C.UTF-8) or PYTHONUTF8=1")
            return (f"argument '{shown}' is not valid UTF-8 (a path named in another "
                    f"encoding?); accepted: UTF-8 arguments -- reach such a folder through a "
                    f"symbolic link with a UTF-8 name")
    return None


def expand_user(value: str | os.PathLike, what: str | None = None) -> Path:
    """``Path(value).expanduser()``, except that a ``~name`` naming no user of this machine
    (pathlib raises RuntimeError, "Could not determine home directory") is a ValueError naming
    the path and ``what`` gave it (a flag or an environment variable)."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        head = os.fspath(value).split(os.sep, 1)[0]
        shown = f"{what} {os.fspath(value)}" if what else os.fspath(value)
        raise ValueError(f"{shown}: {head} names no user of this machine (no home directory "
                         f"found for it); accepted: a path, or ~/... for your own "
                         f"home") from None


def redact(text: str) -> str:
    """``text`` with the secrets of any URI in it replaced: ``user:password@`` becomes
    ``user:***@`` and secret-looking query values ``***`` (tracking, storage and database
    URIs are printed, tagged and written to files)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}{':***' if m.group(3) else ''}@",
                         str(text))
    return _SECRET_QUERY.sub(r"\1***", text)



def tracking_uri(value: str | None) -> str:
    """The tracking URI: --mlflow-uri, else MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db;
    sqlite paths are made absolute (Ray workers run in other folders)."""
    source = "--mlflow-uri"
    if value is None:
        value = os.environ.get("MLFLOW_TRACKING_URI") or None
        source = "MLFLOW_TRACKING_URI"
    if value is None:
        return f"sqlite:///{Path.cwd() / DEFAULT_MLFLOW_DB}"

    def bad(why: str) -> ValueError:
        return ValueError(f"{source} {redact(value)!r}: {why}; accepted: {_MLFLOW_ACCEPTED}")

    if value.lower() == "databricks":  # MLflow's name for the default Databricks profile
        return value
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for http://[::1
        raise bad(f"not a URI ({exc})") from None
    scheme = parts.scheme.lower()
    dialect = scheme.split("+", 1)[0]
    if scheme == "sqlite":
        if not value.startswith("sqlite:///") or value == "sqlite:///":
            raise bad("a SQLite URI is sqlite:/// followed by a file path")
        if value[len("sqlite:///"):] == ":memory:":
            raise bad("an in-memory store keeps nothing once the driver ends, and trials in "
                      "other processes cannot reach it")
        if "?" in value:
            raise bad("query parameters are not supported in a SQLite URI")
        try:
            db = expand_user(value[len("sqlite:///"):])
        except ValueError:
            raise bad("the path's ~name names no user of this machine") from None
        db = db if db.is_absolute() else Path.cwd() / db
        if not db.parent.is_dir():
            raise bad(f"folder {db.parent} does not exist")
        if db.is_dir():
            raise bad(f"{db} is a folder, not a database file")
        return f"sqlite:///{db}"
    if scheme in ("http", "https"):
        try:
            _ = parts.port  # raises for a port that is not a number in range
        except ValueError:
            raise bad("the port is not a number in 1..65535") from None
        if not parts.hostname:
            raise bad("no host")
        return value.rstrip("/")
    if scheme == "file":
        if not parts.path.startswith("/"):
            raise bad("a file URI needs an absolute path (file:///...)")
        if not _file_store_allowed():
            # MLflow 3 refuses its file store on first use (an MlflowException, after Ray had
            # started or the whole command had run); say so here, with its own way out
            raise ValueError(
                f"{source} {redact(value)!r}: MLflow's file store is in maintenance mode and "
                f"refused unless MLFLOW_ALLOW_FILE_STORE=true is set; accepted: "
                f"sqlite:///PATH.db or http(s)://HOST:PORT (move a file store's runs into one "
                f"with `mlflow migrate-filestore`), or set MLFLOW_ALLOW_FILE_STORE=true")
        return value
    if dialect in ("postgresql", "mysql", "mssql"):
        if not parts.hostname:
            raise bad("no host")
        missing = _missing_db_driver(value)
        if missing:
            raise bad(f"its database driver is not installed (no module {missing!r}); install "
                      f"it in this environment (and on every Ray node), e.g. pip install "
                      f"{_DRIVER_PACKAGES.get(missing, missing)}")
        return value
    if scheme == "databricks":
        return value
    if not scheme or len(scheme) == 1:  # a bare path, or a Windows drive letter
        raise bad("a bare path is not a tracking URI (write sqlite:///PATH.db)")
    raise bad(f"unsupported scheme {parts.scheme!r}")


def _file_store_allowed() -> bool:
    """Whether this MLflow opens a ``file:`` tracking store: MLflow 3 refuses it unless
    MLFLOW_ALLOW_FILE_STORE is true (read as MLflow reads it; a value MLflow cannot read
    counts as not set)."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow without the switch still opens its file store
        return True
    try:
        return bool(MLFLOW_ALLOW_FILE_STORE.get())
    except ValueError:
        return False


# SQLAlchemy's default DBAPI module per dialect -> the pip package that provides it
_DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary",
                    "MySQLdb": "mysqlclient", "pymysql": "pymysql", "pyodbc": "pyodbc",
                    "pymssql": "pymssql"}


def _missing_db_driver(uri: str) -> str | None:
    """The DBAPI module SQLAlchemy would import for ``uri`` when it is not installed (MLflow
    would fail on the run's first write, after Ray had started and the data was prepared)."""
    try:
        from sqlalchemy.engine import make_url

        make_url(uri).get_dialect().import_dbapi()
    except ModuleNotFoundError as exc:
        return exc.name or str(exc)
    except Exception:  # an unknown driver name etc.: SQLAlchemy's own error, left to MLflow
        return None
    return None


_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def tracking_unreachable(uri: str, *, timeout: float = 5.0) -> str | None:
    """Why the tracking store at ``uri`` does not answer, or None: an http(s) server is asked
    for ``/health`` (no credentials needed: MLflow's basic-auth app leaves it open), a database
    server for a TCP connection; SQLite files and other stores are not contacted."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    dialect = scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        url = f"{scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}" \
              f"{parts.path.rstrip('/')}/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return None if response.status == 200 else f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return str(getattr(reason, "strerror", None) or reason)
    if dialect in _DB_PORTS and parts.hostname:
        try:
            with socket.create_connection((parts.hostname, parts.port or _DB_PORTS[dialect]),
                                          timeout=timeout):
                return None
        except OSError as exc:
            return str(exc.strerror or exc)
    return None


def databricks_credentials_missing(uri: str) -> bool:
    """Whether MLflow finds no credentials for a Databricks tracking URI (``databricks``,
    ``databricks://PROFILE``): read as its client reads them, from the environment
    (DATABRICKS_HOST, DATABRICKS_TOKEN) or ~/.databrickscfg, without contacting anything.
    Without them the run failed on its first write, after Ray had started and the data was
    prepared (exit 1). False for every other URI."""
    if urlsplit(uri).scheme.lower() != "databricks" and uri.lower() != "databricks":
        return False
    import logging

    from mlflow.utils.databricks_utils import get_databricks_host_creds

    log = logging.getLogger("mlflow.utils.databricks_utils")  # its fallback's WARNING line
    was = log.disabled
    log.disabled = True
    try:
        get_databricks_host_creds(uri)
    except Exception:  # MlflowException: "Reading Databricks credential configuration failed"
        return True
    finally:
        log.disabled = was
    return False


class Refusal(NamedTuple):
    """An http(s) MLflow server's answer to a request it did not serve: the status and the
    start of what it said."""
    code: int
    said: str

    @property
    def server_failing(self) -> bool:
        """A 5xx: the server is up but cannot serve (its backend store down or misconfigured),
        as opposed to refusing this client (401, 403)."""
        return self.code >= 500

    def __str__(self) -> str:
        return f"HTTP {self.code}{f': {self.said}' if self.said else ''}"


def tracking_refuses(uri: str, *, timeout: float = 5.0, retry_after: float = 1.0
                     ) -> Refusal | None:
    """Why an http(s) MLflow server that answers ``/health`` does not serve this client's
    requests, or None: one search of its experiments with the credentials MLflow's client
    would send (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``MLFLOW_TRACKING_TOKEN``).
    ``/health`` is exempt from the server's host check and its authentication and touches no
    backend store, so a server that rejects the Host header this URI sends (started without
    ``--allowed-hosts`` naming it), the credentials (401, 403), or that fails every request
    (5xx: its database gone or refusing it) passed the reachability check; the run then
    failed once Ray had started, for a 5xx after MLflow's retries (minutes). A 5xx is asked
    once more after ``retry_after`` seconds before it counts. Other answers are left to the
    run."""
    import base64
    import http.client
    import json
    import time

    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return None
    if os.environ.get("MLFLOW_TRACKING_AUTH"):  # a plugin's authentication: not ours to try
        return None
    base = (f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
            f"{parts.path.rstrip('/')}")
    # URI credentials as MLflow's client sends them (requests decodes %40 into @)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or unquote(parts.username or "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or unquote(parts.password or "")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    for attempt in range(2):
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search",
                                         data=json.dumps({"max_results": 1}).encode(),
                                         headers={"Content-Type": "application/json"})
        if user and password:
            pair = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {pair}")
        elif token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return None
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403) and exc.code < 500:
                return None
            if exc.code >= 500 and attempt == 0:
                time.sleep(retry_after)
                continue
            try:
                said = exc.read(2000).decode(errors="replace")
            except (OSError, http.client.HTTPException):  # a body cut short
                said = ""
            try:  # MLflow's JSON error: its message's first line (an SQL error's, not its SQL)
                message = json.loads(said).get("message")
            except (ValueError, AttributeError):
                message = None
            if isinstance(message, str) and message.strip():
                said = message.strip().splitlines()[0]
            return Refusal(exc.code, " ".join(said.split())[:300])
        except (urllib.error.URLError, OSError):
            return None
    return None
