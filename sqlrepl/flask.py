"""A Flask extension: a replicated SQLite database for a Flask app.

    from sqlrepl.flask import SqlRepl

    repl = SqlRepl()

    def create_app():
        app = Flask(__name__)
        app.config["SQLREPL_DATABASE"] = "app.db"            # relative: in app.instance_path
        app.config["SQLREPL_REPLICA"] = "s3://bucket/prefix"
        repl.init_app(app)                                    # restores app.db if it is missing
        # Flask-SQLAlchemy: the pool gets sqlrepl connections
        app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + repl.get_settings(app).database
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"creator": repl.creator}
        ...

    @app.get("/n")
    def count():
        return {"n": repl.get_db().execute("select count(*) from t").fetchone()[0]}

Configuration keys:

- ``SQLREPL_DATABASE`` (required): the database file; a relative path is in
  ``app.instance_path`` (as Flask-SQLAlchemy does for ``sqlite:///name``).
- ``SQLREPL_REPLICA``: a replica URL or a list; without it nothing replicates.
- ``SQLREPL_DURABILITY``: ``"async"`` (default) or ``"replicated"``
  (``commit()`` returns once the commit is in every replica).
- ``SQLREPL_RESTORE`` (default ``True``): at ``init_app``, rebuild the
  database from the replicas when the file is missing (once per process,
  serialised between processes), and log what was done (logger
  ``sqlrepl``, INFO: configure logging to see it).
- ``SQLREPL_OPTIONS``: a dict of :class:`sqlrepl.Options` fields.
- ``SQLREPL_CONNECT_ARGS``: extra ``sqlite3.connect`` keyword arguments
  (``timeout``, ``detect_types``, ...).

Bad configuration raises :class:`sqlrepl.ConfigError` from ``init_app``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flask import Flask, current_app, g, has_app_context

import sqlrepl

from ._connection import _database_path
from ._integration import options_from, replica_list, restore_once

__all__ = ["CONFIG_KEYS", "FlaskSettings", "SqlRepl"]

CONFIG_KEYS = (
    "SQLREPL_DATABASE",
    "SQLREPL_REPLICA",
    "SQLREPL_DURABILITY",
    "SQLREPL_RESTORE",
    "SQLREPL_OPTIONS",
    "SQLREPL_CONNECT_ARGS",
)
_EXTENSION = "sqlrepl"


@dataclass(frozen=True)
class FlaskSettings:
    """An app's sqlrepl configuration, checked by :meth:`SqlRepl.init_app`."""

    database: str  # absolute path
    replicas: tuple[str, ...]
    durability: Literal["async", "replicated"]
    restore: bool
    options: sqlrepl.Options | None
    connect_args: Mapping[str, Any] = field(default_factory=dict)


class SqlRepl:
    """The extension. Holds no per-app state itself (that is in
    ``app.extensions["sqlrepl"]``), so one instance serves any number of
    apps made by an app factory."""

    def __init__(self, app: Flask | None = None) -> None:
        self._default_app: Flask | None = None
        self._apps = 0
        self._g_key = f"_sqlrepl_db_{id(self)}"
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Check ``app``'s configuration (raising :class:`sqlrepl.ConfigError`),
        restore the database when it is missing and ``SQLREPL_RESTORE`` is on,
        and close :meth:`get_db` connections when app contexts end."""
        settings = read_config(app)
        if settings.restore and settings.replicas:
            restore_once(settings.database, settings.replicas)  # logs what it did (logger "sqlrepl")
        app.extensions[_EXTENSION] = settings
        app.teardown_appcontext(self._teardown)
        self._apps += 1
        self._default_app = app if self._apps == 1 else None

    def get_settings(self, app: Flask | None = None) -> FlaskSettings:
        """The settings of ``app`` (default: the current app, or the only app
        this extension was initialised with)."""
        if app is None:
            if has_app_context():
                app = current_app
            elif self._default_app is not None:
                app = self._default_app
            else:
                raise RuntimeError(
                    "no app: call this inside an app context, or use one SqlRepl instance per app"
                )
        settings = app.extensions.get(_EXTENSION)
        if not isinstance(settings, FlaskSettings):
            raise RuntimeError(f"SqlRepl.init_app() was not called for app {app.name!r}")
        return settings

    def connect(self, app: Flask | None = None, **kwargs: Any) -> sqlrepl.Connection:
        """A new :class:`sqlrepl.Connection` to the app's database; the
        caller closes it. ``kwargs`` add to ``SQLREPL_CONNECT_ARGS``."""
        settings = self.get_settings(app)
        return sqlrepl.connect(
            settings.database,
            settings.replicas or None,
            durability=settings.durability,
            options=settings.options,
            **{**settings.connect_args, **kwargs},
        )

    def get_db(self) -> sqlrepl.Connection:
        """The current app context's connection, opened on first use and
        closed when the context ends (uncommitted changes are rolled back)."""
        conn: sqlrepl.Connection | None = g.get(self._g_key)
        if conn is None:
            conn = self.connect()
            setattr(g, self._g_key, conn)
        return conn

    def creator(self) -> sqlrepl.Connection:
        """For ``SQLALCHEMY_ENGINE_OPTIONS={"creator": repl.creator}``: a new
        connection that SQLAlchemy's pool may hand to any thread (one at a
        time), hence ``check_same_thread=False``."""
        return self.connect(check_same_thread=False)

    def sync(self, timeout: float | None = 30.0) -> None:
        """Block until everything committed so far is in every replica
        (see :func:`sqlrepl.sync`)."""
        sqlrepl.sync(self.get_settings().database, timeout=timeout)

    def status(self) -> sqlrepl.Status:
        """The replicator's progress (see :func:`sqlrepl.status`)."""
        return sqlrepl.status(self.get_settings().database)

    def _teardown(self, exc: BaseException | None) -> None:
        conn = g.pop(self._g_key, None)
        if conn is not None:
            conn.close()


def read_config(app: Flask) -> FlaskSettings:
    """Check ``app.config``'s ``SQLREPL_*`` keys; raise :class:`sqlrepl.ConfigError`
    saying what is wrong. No I/O except creating ``app.instance_path`` for a
    relative database path."""
    config = app.config
    for key in config:
        if isinstance(key, str) and key.startswith("SQLREPL_") and key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise sqlrepl.ConfigError(
                f"unknown config key {key}{hint}; sqlrepl reads {', '.join(CONFIG_KEYS)}"
            )
    name = config.get("SQLREPL_DATABASE")
    if not name or not isinstance(name, str | os.PathLike):
        raise sqlrepl.ConfigError("set SQLREPL_DATABASE to the path of the SQLite database file")
    replicas = replica_list(config.get("SQLREPL_REPLICA"), "SQLREPL_REPLICA")
    path = _database_path(name)
    if path is None:
        if replicas:
            raise sqlrepl.ConfigError(
                f"SQLREPL_DATABASE {os.fspath(name)!r} is an in-memory database, which cannot be"
                " replicated; give a file path or unset SQLREPL_REPLICA"
            )
        path = os.fspath(name)
    elif not os.path.isabs(os.fspath(name)) and not os.fspath(name).startswith("file:"):
        os.makedirs(app.instance_path, exist_ok=True)
        path = os.path.join(app.instance_path, os.fspath(name))
    durability = config.get("SQLREPL_DURABILITY", "async")
    if durability not in ("async", "replicated"):
        raise sqlrepl.ConfigError(f"SQLREPL_DURABILITY must be 'async' or 'replicated', got {durability!r}")
    restore = config.get("SQLREPL_RESTORE", True)
    if not isinstance(restore, bool):
        raise sqlrepl.ConfigError(f"SQLREPL_RESTORE must be True or False, got {restore!r}")
    connect_args = config.get("SQLREPL_CONNECT_ARGS") or {}
    if not isinstance(connect_args, Mapping) or {"database", "replica"} & set(connect_args):
        raise sqlrepl.ConfigError("SQLREPL_CONNECT_ARGS must be a dict of sqlite3.connect keyword arguments")
    return FlaskSettings(
        database=path,
        replicas=replicas,
        durability=durability,
        restore=restore,
        options=options_from(config.get("SQLREPL_OPTIONS"), "SQLREPL_OPTIONS"),
        connect_args=dict(connect_args),
    )
