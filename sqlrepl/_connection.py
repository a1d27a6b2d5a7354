"""``sqlrepl.connect``: a real ``sqlite3.Connection`` whose commits nudge the
replicator of its database, and ``sqlrepl.sync``."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from typing import Any, Literal

import anyio.to_thread

from . import _check
from ._errors import ConfigError, WalModeError
from ._follow import check_not_followed
from ._replicator import Options, Replicator, Status, get_replicator

__all__ = ["Connection", "connect", "status", "sync", "sync_async"]

Durability = Literal["async", "replicated"]
_MEMORY = (":memory:", "")


class Connection(sqlite3.Connection):
    """A ``sqlite3.Connection`` that tells sqlrepl about its commits.

    Usable anywhere a ``sqlite3.Connection`` is (it is one). ``commit()``
    nudges the replicator; with ``durability="replicated"`` it also waits
    until the commit is in every replica (raising
    :class:`sqlrepl.SyncTimeoutError` after ``replicated_timeout`` seconds;
    the transaction is committed locally either way). ``with conn:`` commits
    (or rolls back on an exception) and then closes the connection.

    Commits made any other way (``execute("COMMIT")``, autocommit mode, other
    processes) are captured too, from the WAL, within ``poll_interval``.
    """

    _sqlrepl_db: str | None = None
    _sqlrepl_pid: int = 0
    _sqlrepl_rep: Replicator | None = None
    _sqlrepl_durability: Durability = "async"
    _sqlrepl_timeout: float | None = 30.0

    def _sqlrepl_replicator(self) -> Replicator | None:
        if self._sqlrepl_pid != os.getpid() and self._sqlrepl_db is not None:
            # After fork(): the parent's replicator does not exist here.
            self._sqlrepl_rep = get_replicator(self._sqlrepl_db, self._sqlrepl_urls, self._sqlrepl_options)
            self._sqlrepl_pid = os.getpid()
            if self._sqlrepl_rep is not None:
                self._sqlrepl_rep.start()
        return self._sqlrepl_rep

    _sqlrepl_urls: tuple[str, ...] = ()
    _sqlrepl_options: Options | None = None

    def commit(self) -> None:
        super().commit()
        self._sqlrepl_committed()

    def _sqlrepl_committed(self) -> None:
        rep = self._sqlrepl_replicator()
        if rep is None:
            return
        if self._sqlrepl_durability == "replicated":
            rep.sync(self._sqlrepl_timeout)
        else:
            rep.nudge()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        try:
            super().__exit__(exc_type, exc, tb)
            if exc_type is None:
                # Python 3.12+ commits here without calling commit().
                self._sqlrepl_committed()
        finally:
            self.close()
        return False


def _database_path(database: Any) -> str | None:
    """The file path of ``database``, or ``None`` for an in-memory one."""
    if isinstance(database, bytes):
        database = os.fsdecode(database)
    database = os.fspath(database)
    if database in _MEMORY:
        return None
    if database.startswith("file:"):
        path, _, query = database[5:].partition("?")
        if "mode=memory" in query or path in _MEMORY or path.startswith(":memory:"):
            return None
        if path.startswith("//"):
            path = path[2:]
            path = path[path.index("/") :] if "/" in path else path
        from urllib.parse import unquote

        return os.path.abspath(unquote(path))
    return os.path.abspath(str(database))


def connect(
    database: str | os.PathLike[str],
    replica: str | Sequence[str] | None = None,
    *,
    durability: Durability = "async",
    replicated_timeout: float | None = 30.0,
    options: Options | None = None,
    **sqlite3_kwargs: Any,
) -> Connection:
    """Open ``database`` and replicate it to ``replica`` (one URL or a list).

    Returns a :class:`Connection` (a ``sqlite3.Connection`` subclass); every
    other keyword goes to ``sqlite3.connect`` (``timeout``,
    ``isolation_level``, ``check_same_thread``, ``autocommit`` on 3.12+, a
    ``factory`` that subclasses :class:`Connection`, ...).

    Puts the database in WAL mode (raising :class:`WalModeError` if it cannot
    be), turns SQLite's automatic checkpoints off on this connection (the
    replicator checkpoints once frames are copied), and starts the
    replicator on first use. Every connection to one database in a process
    must name the same replica(s). Without ``replica``, the connection only
    nudges a replicator that already runs for this database.

    ``durability="replicated"`` makes ``commit()`` wait until the commit is
    in every replica.
    """
    if durability not in ("async", "replicated"):
        raise ConfigError(f"durability must be 'async' or 'replicated', got {durability!r}")
    replicated_timeout = _check.check_timeout("replicated_timeout", replicated_timeout)
    _check.check_options(options)
    urls: tuple[str, ...] = ()
    if replica is not None:
        urls = _check.as_urls(replica, what="replica")
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ConfigError(f"replica must be a URL or a non-empty list of URLs, got {replica!r}")
    path = _database_path(database)
    if path is None and urls:
        raise ConfigError(
            f"cannot replicate an in-memory database ({os.fspath(database)!r}); give a file path"
        )
    if path is not None:
        _check.check_database_path(path, role="database", folder_must_exist=True)
        # A follower's copy is read-only: its next apply would find the
        # change counter moved and replace the writes.
        check_not_followed(path)
    factory = sqlite3_kwargs.pop("factory", Connection)
    if not (isinstance(factory, type) and issubclass(factory, Connection)):
        raise ConfigError("factory must be a subclass of sqlrepl.Connection")
    rep = get_replicator(path, urls, options) if path is not None else None
    conn: Connection = sqlite3.connect(database, factory=factory, **sqlite3_kwargs)
    try:
        if rep is not None or urls:
            _prepare(conn, path)
    except BaseException:
        conn.close()
        raise
    conn._sqlrepl_db = path
    conn._sqlrepl_urls = urls
    conn._sqlrepl_options = options
    conn._sqlrepl_pid = os.getpid()
    conn._sqlrepl_rep = rep
    conn._sqlrepl_durability = durability
    conn._sqlrepl_timeout = replicated_timeout
    if rep is not None:
        rep.start()
    return conn


def _prepare(conn: sqlite3.Connection, path: str | None) -> None:
    # With Python 3.12's autocommit=False a transaction is always open, and
    # SQLite changes journal modes only outside one: step out for a moment.
    # (setattr: the attribute does not exist before 3.12, for mypy either.)
    pep249 = getattr(conn, "autocommit", None) is False
    if pep249:
        setattr(conn, "autocommit", True)  # noqa: B010
    try:
        _set_wal(conn, path)
    finally:
        if pep249:
            setattr(conn, "autocommit", False)  # noqa: B010


def _set_wal(conn: sqlite3.Connection, path: str | None) -> None:
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise WalModeError(
                f"{path} is not a SQLite database ({exc}); give the path of a database file, or of a new one"
            ) from exc
        raise WalModeError(f"{path}: cannot put the database in WAL mode: {exc}") from exc
    if str(mode).lower() != "wal":
        raise WalModeError(
            f"{path}: cannot put the database in WAL mode (it stays in journal_mode={mode});"
            " close other connections that hold it in another mode, or run PRAGMA journal_mode=WAL"
            " while nothing else has it open"
        )
    # The replicator owns checkpoints: SQLite's automatic ones would copy
    # frames into the database before they are replicated.
    conn.execute("PRAGMA wal_autocheckpoint=0")


def sync(database: str | os.PathLike[str], timeout: float | None = 30.0) -> None:
    """Block until everything committed to ``database`` before the call is
    in every replica; raise :class:`SyncTimeoutError` after ``timeout``.

    Works in any process of a multi-process app (the one replicating, or one
    standing by). Raises :class:`ConfigError` if nothing in this process
    replicates ``database``.
    """
    timeout = _check.check_timeout("timeout", timeout)
    path = _database_path(database)
    rep = get_replicator(path) if path is not None else None
    if rep is None:
        raise ConfigError(
            f"{os.fspath(database)} is not replicated by this process (use sqlrepl.connect first)"
        )
    rep.sync(timeout)


async def sync_async(database: str | os.PathLike[str], timeout: float | None = 30.0) -> None:  # noqa: ASYNC109 - same contract as sync(): a SyncTimeoutError that names the lagging replica
    """:func:`sync` for async code (anyio: asyncio or trio): waits in a
    worker thread, so the event loop keeps running. Cancelling the caller
    stops the wait (the replication itself goes on)."""
    timeout = _check.check_timeout("timeout", timeout)
    path = _database_path(database)
    rep = get_replicator(path) if path is not None else None
    if rep is None:
        raise ConfigError(
            f"{os.fspath(database)} is not replicated by this process (use sqlrepl.connect first)"
        )
    await anyio.to_thread.run_sync(rep.sync, timeout, abandon_on_cancel=True)


def status(database: str | os.PathLike[str]) -> Status:
    """The replicator of ``database``'s progress, with request counts per
    replica. Raises :class:`ConfigError` if nothing replicates it here."""
    path = _database_path(database)
    rep = get_replicator(path) if path is not None else None
    if rep is None:
        raise ConfigError(f"{os.fspath(database)} is not replicated by this process")
    return rep.status
