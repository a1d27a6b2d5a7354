"""The ``sqlrepl.django`` database backend: Django's SQLite backend whose
connections are made by :func:`sqlrepl.connect`.

``OPTIONS`` keys read here (and removed before Django or ``sqlite3.connect``
see them):

- ``replica``: a replica URL or a list of them. Without it the backend is
  Django's SQLite backend, unchanged.
- ``durability``: ``"async"`` (default) or ``"replicated"``: a write that
  Django reports done (a ``commit()``, the end of an outermost ``atomic``
  block, or a statement run in autocommit mode) is then in every replica, or
  raises :class:`sqlrepl.SyncTimeoutError`, after being committed locally.
- ``replicated_timeout``: seconds to wait for that (default 30).
- ``restore`` (default ``True``): before the first connection of the process
  to the database, rebuild it from the replicas when the file is missing.
- ``options``: a dict of :class:`sqlrepl.Options` fields (or an ``Options``).
- ``backend``: the dotted name of another SQLite backend (as in ``ENGINE``)
  to wrap instead of Django's own; it must subclass Django's SQLite
  ``DatabaseWrapper``.

Every other key is Django's (``init_command``, ``transaction_mode``) or
``sqlite3.connect``'s (``timeout``, ``factory``, ...) and is passed through.

Errors in these settings raise ``ImproperlyConfigured`` when the backend is
created, and at ``django.setup()`` when ``"sqlrepl.django"`` is in
``INSTALLED_APPS``, never at the first query.

What replicates is decided once per process, from ``settings.DATABASES`` as
the app wrote it (copied when the first ``sqlrepl.django`` connection object
is built, or at ``django.setup()`` with the app installed): a connection
replicates when it opens the file its alias names there, to that alias's
replicas. The test runner rewrites ``NAME`` in place (and every connection
object built afterwards -- in a new thread, a live server, an async context,
``connection.copy()`` -- sees the rewritten dictionary), so its test
databases are never replicated, in memory or in a file. A test that wants
its test database replicated says so: ``"TEST": {"NAME": "a file",
"REPLICA": "file:///..."}`` replicates that test database (not its clones
made by ``--parallel``) to that replica, never to the production one.

Not replicated either: an in-memory database (an explicit in-memory
``NAME`` with a replica is an error). Writes made on the raw ``sqlite3``
connection (``connection.connection``) are replicated but not waited for.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import difflib
import functools
import importlib
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, DatabaseError
from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteDatabaseWrapper
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

import sqlrepl

from .. import _integration
from .._connection import _database_path
from .._follow import _state_path, check_not_followed
from .._integration import options_from, replica_list
from .._replica import redact_url as redact

__all__ = [
    "DatabaseWrapper",
    "ReplicationSettings",
    "check_databases",
    "configured",
    "follow_once",
    "read_settings",
    "restore_once",
]

log = logging.getLogger("sqlrepl.django")

ENGINE = "sqlrepl.django"
SQLREPL_KEYS = (
    "replica",
    "durability",
    "replicated_timeout",
    "restore",
    "options",
    "backend",
    "follow",
    "follow_timeout",
    "poll_interval",
)
# sqlite3.connect's parameters, in order (a backend may pass some by position).
_SQLITE3_CONNECT = (
    "database",
    "timeout",
    "detect_types",
    "isolation_level",
    "check_same_thread",
    "factory",
    "cached_statements",
    "uri",
)
# Django's own SQLite OPTIONS, and sqlite3.connect's keyword arguments.
DJANGO_KEYS = ("init_command", "transaction_mode", *_SQLITE3_CONNECT[1:], "autocommit")
_STOCK_BACKEND = "django.db.backends.sqlite3"
# Statements that never change the database; anything else run in autocommit
# mode may have (DDL, VACUUM, COMMIT, ...) and is waited for.
_READ_ONLY = frozenset({"SELECT", "EXPLAIN", "PRAGMA", "VALUES", "WITH", "BEGIN", "SAVEPOINT"})
_FIRST_WORD = re.compile(r"\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*(\w+)", re.DOTALL)
_PRAGMA = re.compile(
    r"PRAGMA\s+(?:\w+\.)?(journal_mode|wal_autocheckpoint|locking_mode)\s*(?:=|\()\s*['\"]?(\w+)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ReplicationSettings:
    """sqlrepl's part of one ``DATABASES`` entry, checked by :func:`read_settings`."""

    alias: str
    name: str  # NAME as configured
    database: str | None  # its absolute path; None for an in-memory database
    replicas: tuple[str, ...]
    durability: Literal["async", "replicated"]
    replicated_timeout: float
    restore: bool
    options: sqlrepl.Options | None
    backend: str | None
    # TEST["NAME"]'s path and TEST["REPLICA"]: a test database replicated on request.
    test_database: str | None = None
    test_replicas: tuple[str, ...] = ()
    # OPTIONS["follow"]: the alias is a read replica of this replica URL.
    follow: str | None = None
    follow_timeout: float = 60.0
    poll_interval: float = 1.0


def read_settings(settings_dict: Mapping[str, Any], alias: str = DEFAULT_DB_ALIAS) -> ReplicationSettings:
    """Check one ``DATABASES`` entry and return sqlrepl's settings from it.

    Raises ``ImproperlyConfigured`` (with the :class:`sqlrepl.ConfigError`
    as its cause where there is one) for an unknown ``OPTIONS`` key, a
    malformed replica URL or unknown scheme, a bad value, an in-memory
    ``NAME`` with a replica, an ``init_command`` that would break
    replication, or a ``backend`` that cannot be wrapped. Performs no I/O
    beyond importing ``backend``.
    """
    where = f"settings.DATABASES[{alias!r}]['OPTIONS']"
    options = settings_dict.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(f"{where} must be a dict, got {type(options).__name__}")
    backend = options.get("backend")
    if backend is not None and (not isinstance(backend, str) or not backend):
        raise ImproperlyConfigured(f"{where}['backend'] must be a dotted module name, got {backend!r}")
    _check_keys(options, where, custom_backend=backend not in (None, _STOCK_BACKEND))

    replicas = _replicas(options.get("replica"), where)
    durability = options.get("durability", "async")
    if durability not in ("async", "replicated"):
        raise ImproperlyConfigured(
            f"{where}['durability'] must be 'async' or 'replicated', got {durability!r}"
        )
    timeout = options.get("replicated_timeout", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ImproperlyConfigured(f"{where}['replicated_timeout'] must be a number of seconds > 0")
    restore = options.get("restore", True)
    if not isinstance(restore, bool):
        raise ImproperlyConfigured(f"{where}['restore'] must be True or False, got {restore!r}")

    name = settings_dict.get("NAME")
    name_str = os.fspath(name) if name else ""
    database = _database_path(name_str) if name_str else None
    if replicas and database is None:
        raise ImproperlyConfigured(
            f"settings.DATABASES[{alias!r}]['NAME'] is {name_str or 'empty'!r}: an in-memory database"
            " cannot be replicated. Give a file path, or remove OPTIONS['replica'] (tests do not need it:"
            " the test runner's databases are never replicated)."
        )
    if replicas:
        _check_init_command(options.get("init_command"), where)
    factory = options.get("factory")
    if factory is not None:
        _connection_class(factory, where)
    if backend is not None:
        _backend_class(backend)
    test_database, test_replicas = _test_replication(settings_dict, alias, database)
    follow, follow_timeout, poll_interval = _follow_settings(options, where, database, name_str)
    return ReplicationSettings(
        alias=alias,
        name=name_str,
        database=database,
        replicas=replicas,
        durability=durability,
        replicated_timeout=float(timeout),
        restore=restore,
        options=_options(options.get("options"), where),
        backend=backend,
        test_database=test_database,
        test_replicas=test_replicas,
        follow=follow,
        follow_timeout=follow_timeout,
        poll_interval=poll_interval,
    )


def _follow_settings(
    options: Mapping[str, Any], where: str, database: str | None, name: str
) -> tuple[str | None, float, float]:
    """``OPTIONS["follow"]`` and its companions, checked."""
    url = options.get("follow")
    if url is None or url == "":
        for key in ("follow_timeout", "poll_interval"):
            if key in options:
                raise ImproperlyConfigured(f"{where}[{key!r}] is only for a read replica (OPTIONS['follow'])")
        return None, 60.0, 1.0
    if not isinstance(url, str):
        raise ImproperlyConfigured(f"{where}['follow'] must be one replica URL, got {url!r}")
    try:
        replica_list(url, f"{where}['follow']")
    except sqlrepl.ConfigError as exc:
        raise ImproperlyConfigured(str(exc)) from exc
    if options.get("replica"):
        raise ImproperlyConfigured(
            f"{where} has both 'replica' and 'follow': a read replica is not replicated itself."
            " Replicate the primary alias, and follow its replica on another alias"
        )
    if database is None:
        raise ImproperlyConfigured(
            f"settings.DATABASES[...]['NAME'] is {name or 'empty'!r}: a read replica ({where}['follow'])"
            " is a local file the follower keeps; give a file path"
        )
    if options.get("durability", "async") != "async" or "replicated_timeout" in options:
        raise ImproperlyConfigured(f"{where}: 'durability' is for a replicated alias, not a read replica")
    mode = str(options.get("transaction_mode") or "DEFERRED").upper()
    if mode != "DEFERRED":
        raise ImproperlyConfigured(
            f"{where}['transaction_mode'] is {mode!r}: a read replica only reads, and an"
            " IMMEDIATE or EXCLUSIVE transaction would hold off the follower's updates. Remove it"
        )
    for match in _PRAGMA.finditer(str(options.get("init_command") or "")):
        raise ImproperlyConfigured(
            f"{where}['init_command'] sets {match.group(0)!r}: the follower owns the copy's journal and"
            " locking modes (it stays in rollback-journal mode). Remove it"
        )
    timeouts = []
    for key, default in (("follow_timeout", 60.0), ("poll_interval", 1.0)):
        value = options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ImproperlyConfigured(f"{where}[{key!r}] must be a number of seconds > 0, got {value!r}")
        timeouts.append(float(value))
    return url, timeouts[0], timeouts[1]


def _test_replication(
    settings_dict: Mapping[str, Any], alias: str, database: str | None
) -> tuple[str | None, tuple[str, ...]]:
    """``TEST["NAME"]``'s path and ``TEST["REPLICA"]``, checked."""
    where = f"settings.DATABASES[{alias!r}]['TEST']"
    test = settings_dict.get("TEST") or {}
    if not isinstance(test, Mapping) or not test.get("REPLICA"):
        return None, ()
    try:
        replicas = replica_list(test["REPLICA"], f"{where}['REPLICA']")
    except sqlrepl.ConfigError as exc:
        raise ImproperlyConfigured(str(exc)) from exc
    name = test.get("NAME")
    path = _database_path(os.fspath(name)) if name else None
    if path is None:
        raise ImproperlyConfigured(
            f"{where} has a REPLICA but its NAME is {name or 'unset'!r}: only a test database in a file"
            " can be replicated. Set TEST['NAME'] to a file path."
        )
    if path == database:
        raise ImproperlyConfigured(
            f"{where}['NAME'] is the database itself ({path}); give the test database a file of its own"
        )
    return path, replicas


def _check_keys(options: Mapping[str, Any], where: str, *, custom_backend: bool) -> None:
    for key in options:
        if key in SQLREPL_KEYS or key in DJANGO_KEYS:
            continue
        close = difflib.get_close_matches(str(key), SQLREPL_KEYS + DJANGO_KEYS, n=1, cutoff=0.75)
        if custom_backend and not (close and close[0] in SQLREPL_KEYS):
            continue  # may be the wrapped backend's own option
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ImproperlyConfigured(
            f"{where} has an unknown key {key!r}{hint}. sqlrepl's keys: {', '.join(SQLREPL_KEYS)};"
            f" Django's SQLite keys: {', '.join(DJANGO_KEYS)}."
        )


def _replicas(value: Any, where: str) -> tuple[str, ...]:
    try:
        return replica_list(value, f"{where}['replica']")
    except sqlrepl.ConfigError as exc:
        raise ImproperlyConfigured(str(exc)) from exc


def _options(value: Any, where: str) -> sqlrepl.Options | None:
    try:
        return options_from(value, f"{where}['options']")
    except sqlrepl.ConfigError as exc:
        raise ImproperlyConfigured(str(exc)) from exc


def _check_init_command(command: Any, where: str) -> None:
    if not command:
        return
    for match in _PRAGMA.finditer(str(command)):
        pragma, value = match.group(1).lower(), match.group(2).lower()
        if (
            (pragma == "journal_mode" and value != "wal")
            or (pragma == "wal_autocheckpoint" and value != "0")
            or (pragma == "locking_mode" and value == "exclusive")
        ):
            raise ImproperlyConfigured(
                f"{where}['init_command'] sets {match.group(0)!r}, which breaks replication: sqlrepl needs"
                " journal_mode=WAL, owns checkpoints (wal_autocheckpoint=0) and shares the database"
                " between processes (locking_mode=NORMAL). Remove it."
            )


@functools.cache
def _connection_class(factory: Any, where: str = "OPTIONS") -> type[sqlrepl.Connection]:
    """The class ``sqlrepl.connect`` should build for a ``factory`` option."""
    if factory is None:
        return sqlrepl.Connection
    if isinstance(factory, type) and issubclass(factory, sqlrepl.Connection):
        return factory
    if isinstance(factory, type) and issubclass(factory, sqlite3.Connection):
        # sqlrepl.Connection first: its commit() runs, then the factory's.
        return type(factory.__name__, (sqlrepl.Connection, factory), {"__module__": factory.__module__})
    raise ImproperlyConfigured(
        f"{where}['factory'] must be a subclass of sqlite3.Connection, got {factory!r}"
    )


@functools.cache
def _backend_class(backend: str) -> type[DatabaseWrapper]:
    """The ``DatabaseWrapper`` class that replicates through ``backend``."""
    where = f"OPTIONS['backend'] {backend!r}"
    if backend in (ENGINE, _STOCK_BACKEND):
        return DatabaseWrapper
    try:
        module = importlib.import_module(f"{backend}.base")
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"{where}: cannot import {backend}.base ({exc}); name a backend as in ENGINE"
        ) from exc
    wrapped = getattr(module, "DatabaseWrapper", None)
    if not (isinstance(wrapped, type) and issubclass(wrapped, SQLiteDatabaseWrapper)):
        raise ImproperlyConfigured(
            f"{where}: {backend}.base.DatabaseWrapper is not a subclass of Django's SQLite"
            " DatabaseWrapper; sqlrepl can only wrap SQLite backends"
        )
    if issubclass(wrapped, DatabaseWrapper):
        return wrapped
    try:
        # DatabaseWrapper first, so its overrides run and call the wrapped
        # backend's through super(); the wrapped backend's class attributes
        # (features, operations, ...) still come before Django's.
        return type(
            "DatabaseWrapper",
            (DatabaseWrapper, wrapped),
            {"__module__": __name__, "__qualname__": f"DatabaseWrapper[{backend}]"},
        )
    except TypeError as exc:
        raise ImproperlyConfigured(f"{where}: cannot combine it with sqlrepl's backend: {exc}") from exc


def check_databases() -> None:
    """Check every ``DATABASES`` entry that uses this backend; raise
    ``ImproperlyConfigured`` on the first error. Called by the app's
    ``ready()`` so that errors stop ``django.setup()`` (and so that the
    settings are copied as the app wrote them, see :func:`configured`)."""
    for alias, settings_dict in _as_written().items():
        if settings_dict.get("ENGINE") == ENGINE:
            configured(alias)


# -- the databases as the app configured them -------------------------------------------

_written: dict[str, dict[str, Any]] | None = None
_configured: dict[str, ReplicationSettings] = {}
_written_mutex = threading.Lock()


def _as_written() -> dict[str, dict[str, Any]]:
    """``settings.DATABASES`` as it was when first asked for, copied.

    Django's test runner rewrites ``settings.DATABASES[alias]["NAME"]`` (the
    very dictionary every connection object is built from) to the test
    database's name; it builds each connection object before, so the first
    call, made when the first one is built, sees the app's own names.
    """
    global _written
    with _written_mutex:
        if _written is None:
            databases = settings.DATABASES if settings.configured else {}
            _written = {
                alias: {
                    **entry,
                    "OPTIONS": dict(entry.get("OPTIONS") or {}),
                    "TEST": dict(entry.get("TEST") or {}),
                }
                for alias, entry in databases.items()
                if isinstance(entry, Mapping)
            }
        return _written


def configured(alias: str) -> ReplicationSettings | None:
    """The replication settings of ``alias`` as the app wrote them, or
    ``None`` if the alias does not use this backend."""
    written = _as_written().get(alias)
    if written is None or written.get("ENGINE") != ENGINE:
        return None
    return _written_settings(alias, written)


def _written_settings(alias: str, written: Mapping[str, Any]) -> ReplicationSettings:
    config = _configured.get(alias)
    if config is None:
        config = _configured[alias] = read_settings(written, alias)
    return config


def _settings_for(settings_dict: Mapping[str, Any], alias: str) -> ReplicationSettings:
    """The settings a connection object of ``alias`` replicates with: the
    app's as it wrote them (see :func:`_as_written`), whatever
    ``settings_dict`` says now; for a connection object the app builds from a
    dictionary of its own (an alias not in ``DATABASES``, or another
    ``ENGINE``), that dictionary's."""
    written = _as_written().get(alias)
    if written is None or written.get("ENGINE") != settings_dict.get("ENGINE"):
        return read_settings(settings_dict, alias)
    return _written_settings(alias, written)


# -- restore at startup --------------------------------------------------------------


def restore_once(config: ReplicationSettings) -> sqlrepl.RestoreResult | None:
    """Restore ``config.database`` from its replicas if the file is missing,
    once per process (see :func:`sqlrepl._integration.restore_once`)."""
    if config.database is None or not config.replicas:
        return None
    return _integration.restore_once(config.database, config.replicas)


# -- read replicas (OPTIONS["follow"]) -------------------------------------------------

_followers: dict[str, sqlrepl.Follower | None] = {}
_followers_mutex = threading.Lock()


def follow_once(config: ReplicationSettings) -> sqlrepl.Follower | None:
    """Start, once per process, the follower that keeps ``config.database``
    a copy of ``config.follow``, and wait (up to ``config.follow_timeout``)
    until it is following. Returns ``None`` when a follower of another
    process keeps the file (a second worker of the same app): the copy is
    then read as that one keeps it.

    Raises :class:`sqlrepl.FollowTimeoutError` if the copy is not ready in
    time (the replica unreachable or still empty, or the follower failed),
    and :class:`sqlrepl.FollowedDatabaseError` if the file exists and is no
    follower's copy. Threads asking together wait for the same follower.
    """
    database, url = config.database, config.follow
    assert database is not None
    assert url is not None
    with _followers_mutex:
        if database in _followers:
            follower = _followers[database]
        else:
            follower = _followers[database] = _start_follower(database, url, config.poll_interval)
        if follower is None:
            _wait_for_other_follower(config)
            return None
        status = follower.wait(lambda s: s.state == "following", config.follow_timeout)
        if status.state != "following":
            why = status.error or ("the replica holds no snapshot yet" if status.state == "waiting" else "")
            raise sqlrepl.FollowTimeoutError(
                f"settings.DATABASES[{config.alias!r}]: the follower of {redact(url)} is {status.state!r}"
                f" after {config.follow_timeout:g} s, not following{': ' + why if why else ''}. Check that"
                " the primary replicates there, or raise OPTIONS['follow_timeout']"
            )
        return follower


def _start_follower(database: str, url: str, poll_interval: float) -> sqlrepl.Follower | None:
    try:
        check_not_followed(database)
        log.info("following %s into %s", redact(url), database)
        return sqlrepl.follow(database, url, poll_interval=poll_interval)
    except sqlrepl.FollowedDatabaseError:
        try:
            check_not_followed(database)
        except sqlrepl.FollowedDatabaseError:
            log.info("%s is kept by a follower in another process; reading its copy", database)
            return None
        raise


def _wait_for_other_follower(config: ReplicationSettings) -> None:
    """Wait until another process's follower has made the copy (its state
    file is written once the copy exists)."""
    database = config.database
    assert database is not None
    deadline = time.monotonic() + config.follow_timeout
    while not (os.path.exists(database) and os.path.exists(_state_path(database))):
        if time.monotonic() >= deadline:
            raise sqlrepl.FollowTimeoutError(
                f"settings.DATABASES[{config.alias!r}]: {database} is kept by a follower in another"
                f" process, which has not made the copy after {config.follow_timeout:g} s"
            )
        time.sleep(0.05)


@atexit.register
def _stop_followers() -> None:
    """Stop this process's followers between batches, not in the middle of one."""
    for follower in list(_followers.values()):
        if follower is not None:
            follower.stop(timeout=10)


# -- the backend -----------------------------------------------------------------------

_live: weakref.WeakSet[DatabaseWrapper] = weakref.WeakSet()
# The settings of the connection object being copied (see DatabaseWrapper.copy).
_copying: contextvars.ContextVar[ReplicationSettings | None] = contextvars.ContextVar(
    "sqlrepl_copying", default=None
)
_inherited: list[Any] = []


class _Connector:
    """Stands in for the ``factory`` of ``sqlite3.connect``.

    Django's backend opens its connection with ``sqlite3.connect(**params)``,
    and ``sqlite3.connect`` calls ``factory`` with those same arguments; so
    with this as the factory, Django's own ``get_new_connection`` (and a
    wrapped backend's) runs unchanged -- functions, pragmas, init_command --
    on a connection made by :func:`sqlrepl.connect`.
    """

    def __init__(self, config: ReplicationSettings, replicas: tuple[str, ...], factory: Any) -> None:
        self._config = config
        self._replicas = replicas
        self._factory = _connection_class(factory)

    def __call__(self, *args: Any, **kwargs: Any) -> sqlrepl.Connection:
        kwargs.update(zip(_SQLITE3_CONNECT, args, strict=False))
        kwargs.pop("factory", None)
        database = kwargs.pop("database")
        config = self._config
        # durability="async" here: the backend waits for the replicas itself,
        # after Django has recorded the commit (see DatabaseWrapper.commit).
        return sqlrepl.connect(
            database,
            self._replicas,
            durability="async",
            options=config.options,
            factory=self._factory,
            **kwargs,
        )


class DatabaseWrapper(SQLiteDatabaseWrapper):  # type: ignore[misc]  # Django ships no type information
    """Django's SQLite ``DatabaseWrapper`` (or the one of ``OPTIONS['backend']``)
    whose connections are :class:`sqlrepl.Connection` objects. See the module
    docstring for the options and guarantees."""

    sqlrepl: ReplicationSettings

    def __new__(
        cls, settings_dict: Mapping[str, Any] | None = None, alias: str = DEFAULT_DB_ALIAS
    ) -> DatabaseWrapper:
        # copy.copy() calls __new__ with the class alone, then copies __dict__.
        target = cls
        if cls is DatabaseWrapper and settings_dict is not None:
            backend = (settings_dict.get("OPTIONS") or {}).get("backend")
            if isinstance(backend, str) and backend:
                target = _backend_class(backend)
        # An instance of a subclass: Python then runs its __init__ once.
        return object.__new__(target)

    def __init__(self, settings_dict: Mapping[str, Any], alias: str = DEFAULT_DB_ALIAS) -> None:
        copied_from = _copying.get()
        _copying.set(None)
        self.sqlrepl = copied_from or _settings_for(settings_dict, alias)
        super().__init__(settings_dict, alias)
        self._sqlrepl_active = False
        self._sqlrepl_dirty = False  # a write in the open transaction
        self._sqlrepl_pending = False  # a write that commits when its cursor closes
        self._sqlrepl_database = ""  # the file the open connection replicates
        self._sqlrepl_readonly = False  # the open connection reads a follower's copy
        config = self.sqlrepl
        self._sqlrepl_waits = (
            bool(config.replicas or config.test_replicas) and config.durability == "replicated"
        )
        if config.test_replicas:
            # (On the instance: the creation class may be a wrapped backend's.)
            # Through a weak proxy: the creation object holding a strong
            # reference to itself would be a cycle that only the garbage
            # collector frees (Django's own suite checks for none).
            creation = self.creation
            weak = weakref.proxy(creation)
            creation._destroy_test_db = functools.partial(
                _destroy_test_db, functools.partial(type(creation)._destroy_test_db, weak), config
            )
            creation._clone_test_db = functools.partial(_clone_test_db, weak, config)
        _live.add(self)

    def copy(self, alias: str | None = None) -> Any:
        # The copy replicates as this object does, even under an alias the
        # app did not configure (its settings are the test runner's).
        token = _copying.set(self.sqlrepl)
        try:
            return super().copy(alias)
        finally:
            _copying.reset(token)

    def get_connection_params(self) -> dict[str, Any]:
        params: dict[str, Any] = super().get_connection_params()
        for key in SQLREPL_KEYS:
            params.pop(key, None)
        return params

    def _sqlrepl_target(self) -> tuple[str, tuple[str, ...]] | None:
        """The file the next connection opens and its replicas, if it
        replicates: the configured database, or the test database of an
        explicit ``TEST["REPLICA"]``; never another database (a test
        database the test runner switched ``NAME`` to)."""
        config = self.sqlrepl
        name = self.settings_dict.get("NAME")
        path = _database_path(os.fspath(name)) if name else None
        if path is None:
            return None
        if config.replicas and path == config.database:
            return path, config.replicas
        if config.test_replicas and path == config.test_database:
            return path, config.test_replicas
        return None

    def _sqlrepl_follows(self) -> str | None:
        """The copy the next connection reads, if this alias is a read
        replica and opens the configured file (never a test database)."""
        config = self.sqlrepl
        name = self.settings_dict.get("NAME")
        path = _database_path(os.fspath(name)) if name else None
        return path if config.follow and path is not None and path == config.database else None

    def _sqlrepl_open_copy(self, path: str, conn_params: dict[str, Any]) -> Any:
        follow_once(self.sqlrepl)
        # Read-write at the file level (mode=rw: never create an empty file
        # the follower would refuse to seed over), because a reader must be
        # able to roll back a hot journal a killed follower left; mode=ro
        # would fail on one. query_only refuses every write statement.
        params = {**conn_params, "database": f"file:{quote(path)}?mode=rw", "uri": True}
        conn = super().get_new_connection(params)
        conn.execute("PRAGMA query_only = ON")
        self._sqlrepl_readonly = True
        return conn

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        self._sqlrepl_active = self._sqlrepl_dirty = self._sqlrepl_pending = False
        self._sqlrepl_readonly = False
        copy = self._sqlrepl_follows()
        if copy is not None:
            return self._sqlrepl_open_copy(copy, conn_params)
        target = self._sqlrepl_target()
        if target is None:
            return super().get_new_connection(conn_params)
        path, replicas = target
        if self.sqlrepl.restore and path == self.sqlrepl.database:
            restore_once(self.sqlrepl)
        factory = _Connector(self.sqlrepl, replicas, conn_params.get("factory"))
        params = {**conn_params, "factory": factory}
        conn = super().get_new_connection(params)
        if not isinstance(conn, sqlrepl.Connection):
            conn.close()
            raise ImproperlyConfigured(
                f"{type(self).__qualname__}.get_new_connection() did not open its connection with"
                " sqlite3.connect(**conn_params), so sqlrepl cannot replicate it"
            )
        self._sqlrepl_active = True
        self._sqlrepl_database = path
        return conn

    # -- durability="replicated" ---------------------------------------------------

    def _sqlrepl_watch(self, run: Callable[[], Any], sql: Any, cursor: Any) -> Any:
        """Run one statement (``run``, from the cursor classes below, so that
        no ``execute_wrappers`` list decides it): note a write in a
        transaction, and wait for the replicas after a write that committed
        by itself (autocommit mode)."""
        conn = self.connection
        if not self._sqlrepl_active or conn is None:
            return run()
        if self._sqlrepl_pending:
            self._sqlrepl_wait()  # an earlier cursor with rows was left open
        before = conn.total_changes
        result = run()
        if conn.total_changes != before or _may_write(sql):
            if conn.in_transaction:
                self._sqlrepl_dirty = True
            elif getattr(cursor, "description", None) is not None:
                # It returns rows (INSERT ... RETURNING): in autocommit mode its
                # transaction commits only when the statement ends, when the
                # rows are read or the cursor closed. Wait at the close.
                self._sqlrepl_pending = True
            else:
                self._sqlrepl_wait()
        return result

    def _sqlrepl_refused(self, exc: DatabaseError) -> None:
        """Raise :class:`sqlrepl.FollowedDatabaseError` if ``exc`` is SQLite
        refusing a write to a read replica's copy."""
        cause = exc.__cause__
        code = getattr(cause, "sqlite_errorcode", None)
        if self._sqlrepl_readonly and isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_READONLY:
            config = self.sqlrepl
            raise sqlrepl.FollowedDatabaseError(
                f"settings.DATABASES[{self.alias!r}] is a read replica (OPTIONS['follow'] ="
                f" {redact(config.follow or '')}): it is read-only. Write through the primary's alias"
                " (a database router can send writes there)"
            ) from exc

    def make_cursor(self, cursor: Any) -> Any:
        if self._sqlrepl_readonly:
            return _ReadOnlyCursor(cursor, self)
        if self._sqlrepl_waits:
            return _Cursor(cursor, self)
        return super().make_cursor(cursor)

    def make_debug_cursor(self, cursor: Any) -> Any:
        if self._sqlrepl_readonly:
            return _ReadOnlyDebugCursor(cursor, self)
        if self._sqlrepl_waits:
            return _DebugCursor(cursor, self)
        return super().make_debug_cursor(cursor)

    def _sqlrepl_cursor_closed(self) -> None:
        if self._sqlrepl_pending:
            self._sqlrepl_wait()

    def _sqlrepl_wait(self) -> None:
        self._sqlrepl_dirty = self._sqlrepl_pending = False
        sqlrepl.sync(self._sqlrepl_database, timeout=self.sqlrepl.replicated_timeout)

    def commit(self) -> None:
        # Wait after Django has recorded the commit, so that on a timeout the
        # transaction still counts as committed (it is, locally): on_commit
        # callbacks run, and the SyncTimeoutError reaches the caller.
        super().commit()
        if self._sqlrepl_dirty or self._sqlrepl_pending:
            self._sqlrepl_wait()

    def rollback(self) -> None:
        self._sqlrepl_dirty = False
        super().rollback()


class _WaitOnClose:
    """The cursor of a connection with ``durability="replicated"``: each
    statement goes through ``DatabaseWrapper._sqlrepl_watch`` (innermost,
    after every execute wrapper), and closing the cursor, which ends its
    statement, waits for the replicas if that statement committed a write."""

    cursor: Any
    db: DatabaseWrapper

    def _execute(self, sql: Any, params: Any, *wrapper_args: Any) -> Any:
        run = functools.partial(super()._execute, sql, params, *wrapper_args)  # type: ignore[misc]
        return self.db._sqlrepl_watch(run, sql, self.cursor)

    def _executemany(self, sql: Any, param_list: Any, *wrapper_args: Any) -> Any:
        run = functools.partial(super()._executemany, sql, param_list, *wrapper_args)  # type: ignore[misc]
        return self.db._sqlrepl_watch(run, sql, self.cursor)

    def close(self) -> None:
        try:
            self.cursor.close()
        finally:
            self.db._sqlrepl_cursor_closed()


class _Cursor(_WaitOnClose, CursorWrapper):  # type: ignore[misc]  # Django ships no type information
    pass


class _DebugCursor(_WaitOnClose, CursorDebugWrapper):  # type: ignore[misc]  # Django ships no type information
    pass


class _RefuseWrites:
    """The cursor of a read replica's connection: SQLite's refusal of a
    write becomes :class:`sqlrepl.FollowedDatabaseError`."""

    db: DatabaseWrapper

    def _execute(self, sql: Any, params: Any, *wrapper_args: Any) -> Any:
        try:
            return super()._execute(sql, params, *wrapper_args)  # type: ignore[misc]
        except DatabaseError as exc:
            self.db._sqlrepl_refused(exc)
            raise

    def _executemany(self, sql: Any, param_list: Any, *wrapper_args: Any) -> Any:
        try:
            return super()._executemany(sql, param_list, *wrapper_args)  # type: ignore[misc]
        except DatabaseError as exc:
            self.db._sqlrepl_refused(exc)
            raise


class _ReadOnlyCursor(_RefuseWrites, CursorWrapper):  # type: ignore[misc]  # Django ships no type information
    pass


class _ReadOnlyDebugCursor(_RefuseWrites, CursorDebugWrapper):  # type: ignore[misc]  # Django ships no type information
    pass


def _destroy_test_db(
    destroy: Callable[[str, int], None], config: ReplicationSettings, name: str, verbosity: int
) -> None:
    """Before the test runner deletes a replicated test database: upload what
    is pending and stop replicating it (its replicator would otherwise see
    the file vanish and start a new generation of nothing)."""
    path = _database_path(os.fspath(name)) if name else None
    if path is not None and path == config.test_database:
        rep = sqlrepl.get_replicator(path)
        if rep is not None:
            rep.stop(flush=True, timeout=config.replicated_timeout)
    destroy(name, verbosity)
    if path is not None and path == config.test_database:
        shutil.rmtree(path + "-sqlrepl", ignore_errors=True)


def _clone_test_db(
    creation: Any, config: ReplicationSettings, suffix: Any, verbosity: int, keepdb: bool = False
) -> None:
    """``--parallel``'s clone of a replicated test database: through SQLite's
    backup, since the database is in WAL mode and its newest pages are in
    the ``-wal`` file, which the stock clone (a copy of the main file) misses.
    The clones are not replicated."""
    clone = creation.__class__._clone_test_db  # (a weak proxy's type is the proxy's)
    source = creation.connection.settings_dict["NAME"]
    path = _database_path(os.fspath(source)) if source else None
    if path is None or path != config.test_database:
        clone(creation, suffix, verbosity, keepdb)
        return
    target = creation.get_test_db_clone_settings(suffix)["NAME"]
    if keepdb:
        return
    for suffix_ in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{target}{suffix_}")
    src = sqlite3.connect(path)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def _may_write(sql: Any) -> bool:
    match = _FIRST_WORD.match(sql) if isinstance(sql, str) else None
    return match is None or match.group(1).upper() not in _READ_ONLY


def _forget_connections_after_fork() -> None:
    """In a forked child (gunicorn --preload), drop without closing the
    replicated connections inherited from the parent: SQLite connections
    must not cross fork(), and closing one here could act on the parent's
    locks. The child opens its own."""
    for wrapper in list(_live):
        # Only replicated (file) connections: Django's parallel test runner
        # relies on forked children keeping their copy of an in-memory one.
        if wrapper.connection is not None and (wrapper._sqlrepl_active or wrapper._sqlrepl_readonly):
            _inherited.append(wrapper.connection)
            wrapper.connection = None
    # The followers' threads are not in the child: it reads the copy the
    # parent's follower keeps (check_not_followed sees the parent's lock).
    _followers.clear()


os.register_at_fork(after_in_child=_forget_connections_after_fork)
