"""The MLflow tracking URI, checked as MLflow's store registry would take it, without importing
MLflow (loading the config must not call it): ``mlflow/tracking/_tracking_service/utils.py``
registers "" and "file" (the file store), "databricks", "http(s)" and the SQLAlchemy engines,
plus the schemes of installed plugins (entry point group ``mlflow.tracking_store``). A URI MLflow
would take but that names a folder which does not exist is refused too: MLflow would create it,
and a typo would silently start an empty store elsewhere."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlsplit


def redact_credentials(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return uri
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"


_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_BUILTIN_SCHEMES = (*_DATABASE_SCHEMES, "http", "https", "file", "databricks")
_URI_FORMS = (
    "sqlite:///relative/mlflow.db, sqlite:////absolute/mlflow.db, http(s)://host:port, "
    "postgresql://, mysql://, mssql://, databricks, databricks://profile, file:///folder or a folder path"
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$", re.DOTALL)


def _plugin_schemes() -> frozenset[str]:
    """Schemes installed MLflow tracking-store plugins declare (read, not loaded). Asked only for a
    scheme MLflow does not know itself, so the common URIs cost no scan of the installed packages."""
    return frozenset(entry.name for entry in metadata.entry_points(group="mlflow.tracking_store"))


def _shown(uri: str) -> str:
    """``uri`` as an error message may quote it: never a password or token."""
    shown = redact_credentials(uri)
    if "@" in shown and "***@" not in shown:
        scheme, _, rest = shown.partition(":")
        shown = f"{scheme}:***@{rest.rpartition('@')[2]}"
    return shown


def tracking_uri_problem(uri: str, environ: Mapping[str, str]) -> str | None:
    """What is wrong with an MLflow tracking URI, and how to fix it; None when MLflow takes it."""
    if not uri.strip():
        return "must not be empty (the default is sqlite:///mlflow.db)"
    if uri == "databricks":
        return None
    if uri in ("databricks-uc", "uc"):  # MLflow takes these two bare names as schemes, as "databricks"
        return f"{uri} is a Unity Catalog model registry URI, not a tracking URI: write databricks"
    match = _SCHEME.match(uri)
    if match is None or len(match.group(1)) == 1:  # no scheme (a one-letter one is a Windows drive)
        return _missing_colon(uri) or _file_store_problem(uri, environ)
    scheme, rest = match.group(1).lower(), match.group(2)
    engine, plus, driver = scheme.partition("+")
    if engine in _DATABASE_SCHEMES:
        if "+" in driver or (plus and not driver):
            return f"{_shown(uri)}: give at most one +driver after {engine} (as in postgresql+psycopg2://)"
        if engine == "sqlite":
            return _sqlite_problem(uri, scheme, rest)
        if not rest.startswith("//"):
            return f"{_shown(uri)}: a {engine} URI starts with {scheme}:// (as in {engine}://user:password@host:port/database)"
        return None
    if scheme in ("http", "https"):
        return _http_problem(uri, scheme, rest)
    if scheme == "file":
        return _file_store_problem(uri, environ)
    if scheme == "databricks":
        return (
            None if re.fullmatch(r"//[^/\s]+", rest) else f"{_shown(uri)}: write databricks, or databricks://<profile>"
        )
    if scheme in ("databricks-uc", "uc"):
        return f"{_shown(uri)} is a Unity Catalog model registry URI, not a tracking URI: write databricks"
    if {match.group(1), scheme} & _plugin_schemes():
        return None
    return _unknown_scheme(uri, match.group(1), rest)


def _missing_colon(uri: str) -> str | None:
    name, slashes, rest = uri.partition("//")
    if not slashes or name.lower() not in _BUILTIN_SCHEMES:
        return None
    fixed = f"{name}:///{rest}" if name.lower() == "sqlite" and not rest.startswith("/") else f"{name}://{rest}"
    return f"{_shown(uri)}: the colon is missing after {name!r}: write {_shown(fixed)}"


def _unknown_scheme(uri: str, scheme: str, rest: str) -> str:
    close = difflib.get_close_matches(scheme.lower(), _BUILTIN_SCHEMES, n=1, cutoff=0.6)
    hint = f"did you mean {_shown(f'{close[0]}:{rest}')}?" if close else f"MLflow takes {_URI_FORMS}"
    return f"{_shown(uri)}: unknown scheme {scheme!r}: {hint}"


def _sqlite_problem(uri: str, scheme: str, rest: str) -> str | None:
    if not rest.startswith("///"):
        named = rest.lstrip("/")
        return (
            f"{_shown(uri)}: a sqlite URI has three slashes before a relative path and four before an "
            f"absolute one: write {scheme}:///{named} (relative to the working directory) or {scheme}:////{named}"
        )
    database = rest[3:].partition("?")[0]
    if database in ("", ":memory:"):
        return None
    path = Path(database)
    if path.is_dir():
        example = f"{scheme}:///{database.rstrip('/')}/mlflow.db"
        return f"{_shown(uri)}: {path.resolve()} is a folder, not a database file: name a file in it, e.g. {example}"
    folder = path.resolve().parent
    if not folder.is_dir():
        # MLflow would create it: a typo in the path would silently start an empty store elsewhere.
        return (
            f"{_shown(uri)}: the folder {folder} of the sqlite database does not exist: create it, or correct the path"
        )
    return None


def _http_problem(uri: str, scheme: str, rest: str) -> str | None:
    if not rest.startswith("//"):
        return f"{_shown(uri)}: write {scheme}://host:port"
    parts = urlsplit(uri)
    if not parts.hostname:
        return f"{_shown(uri)} names no host: write {scheme}://host:port"
    try:
        _ = parts.port  # raises for a port that is no number in range
    except ValueError:
        return f"{_shown(uri)}: the port is not a number from 0 to 65535"
    return None


def _file_store_problem(uri: str, environ: Mapping[str, str]) -> str | None:
    """MLflow's file store: a folder path, or ``file:`` followed by one."""
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            return f"{_shown(uri)}: a file store is a local folder: write file:///absolute/folder"
        folder = Path(unquote(parts.path))
    else:
        folder = Path(uri)
    if environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        return (
            f"{_shown(uri)} is MLflow's file store (a folder), which MLflow refuses unless MLFLOW_ALLOW_FILE_STORE=true "
            "is set: set it, or use a database such as sqlite:///mlflow.db"
        )
    parent = folder.resolve().parent
    if not parent.is_dir():
        return (
            f"{_shown(uri)}: the folder {parent} of MLflow's file store does not exist: create it, or correct the path"
        )
    return None
