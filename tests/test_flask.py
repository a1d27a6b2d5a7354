"""The Flask extension (``sqlrepl.flask.SqlRepl``) and the Flask example
(``examples/flask/app.py``): per-request connections, Flask-SQLAlchemy
through ``creator``, restore at startup, bad configuration."""

from __future__ import annotations

import importlib.util
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from flask import Flask
from helpers import ROOT, assert_same_database, file_url, integrity, restore_fresh
from s3fixtures import isolate_aws_env

import sqlrepl
from sqlrepl.flask import SqlRepl

FAST = {"sync_interval": 0.05, "poll_interval": 0.02, "retention": None, "retry_max": 0.5}


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_example_app", ROOT / "examples" / "flask" / "app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # SQLAlchemy resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """Build the example app on ``tmp_path`` (database, replica, instance
    folder); closes every SQLAlchemy pool at the end."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        base = {
            "SQLREPL_DATABASE": str(tmp_path / "app.db"),
            "SQLREPL_REPLICA": file_url(tmp_path / "replica"),
            "SQLREPL_DURABILITY": "replicated",
            "SQLREPL_OPTIONS": FAST,
            "TESTING": True,
        }
        app: Flask = example.create_app({**base, **config})
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            example.db.engine.dispose()


def init_db(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output


def table(path: str | Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def test_example_writes_are_in_the_replica_when_acknowledged(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """With durability "replicated", a 201 from the ORM route and from the raw
    route means the row is already in the replica; the restore equals the database."""
    app = make_app()
    init_db(app)
    client = app.test_client()
    for i in range(3):
        assert client.post("/api/items", json={"name": f"item {i}"}).status_code == 201
        assert client.post("/api/notes", json={"body": f"note {i}"}).status_code == 201
    restored = tmp_path / "restored.db"
    restore_fresh(file_url(tmp_path / "replica"), restored)  # no sync(): the 201s were enough
    assert table(restored, "SELECT name FROM item ORDER BY id") == [("item 0",), ("item 1",), ("item 2",)]
    assert table(restored, "SELECT body FROM notes ORDER BY id") == [("note 0",), ("note 1",), ("note 2",)]
    assert_same_database(tmp_path / "app.db", restored)
    assert client.get("/api/items").get_json()["count"] == 3
    assert client.get("/api/status").get_json()["role"] == "replicating"


def test_sqlalchemy_pool_gets_sqlrepl_connections(make_app: Callable[..., Flask]) -> None:
    """Flask-SQLAlchemy's pool holds sqlrepl connections, shared safely by
    request threads (the creator's connections are not bound to a thread)."""
    app = make_app(SQLREPL_DURABILITY="async")
    init_db(app)
    with app.app_context():
        raw = example.db.session.connection().connection.dbapi_connection
        assert isinstance(raw, sqlrepl.Connection)
        example.db.session.rollback()
    errors: list[BaseException] = []

    def post(worker: int) -> None:
        client = app.test_client()
        try:
            for i in range(15):
                response = client.post("/api/items", json={"name": f"{worker}-{i}"})
                assert response.status_code == 201, response.data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert app.test_client().get("/api/items").get_json()["count"] == 60


def test_restore_at_startup_from_config(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    """An app whose database file is missing starts with it restored from the
    replica (a new machine), before anything opens it."""
    first = make_app()
    init_db(first)
    first.test_client().post("/api/items", json={"name": "survivor"})
    first.test_client().post("/api/notes", json={"body": "kept"})
    fresh = tmp_path / "new-machine" / "app.db"
    second = make_app(SQLREPL_DATABASE=str(fresh))
    assert fresh.exists()  # restored by init_app, before any request
    client = second.test_client()
    assert [i["name"] for i in client.get("/api/items").get_json()["items"]] == ["survivor"]
    assert [n["body"] for n in client.get("/api/notes").get_json()["notes"]] == ["kept"]
    assert integrity(fresh) == [("ok",)]


def test_restore_can_be_turned_off(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    """With SQLREPL_RESTORE False a missing database is not restored."""
    first = make_app()
    init_db(first)
    fresh = tmp_path / "other" / "app.db"
    make_app(SQLREPL_DATABASE=str(fresh), SQLREPL_RESTORE=False)
    assert not fresh.exists()


def test_get_db_is_per_app_context_and_closed_at_teardown(tmp_path: Path) -> None:
    """get_db() returns one connection per app context, to that app's own
    database, and closes it when the context ends."""
    repl = SqlRepl()
    apps = []
    for name in ("a", "b"):
        app = Flask(name)
        app.config.update(
            SQLREPL_DATABASE=str(tmp_path / f"{name}.db"), SQLREPL_REPLICA=file_url(tmp_path / name)
        )
        repl.init_app(app)
        apps.append(app)
    for app, name in zip(apps, ("a", "b"), strict=True):
        with app.app_context():
            conn = repl.get_db()
            assert repl.get_db() is conn
            assert isinstance(conn, sqlrepl.Connection)
            assert conn.execute("PRAGMA database_list").fetchone()[2] == str(tmp_path / f"{name}.db")
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    with pytest.raises(RuntimeError, match="no app"):
        repl.creator()  # two apps and no app context: which one is ambiguous


def test_relative_path_is_in_the_instance_folder(tmp_path: Path) -> None:
    """A relative SQLREPL_DATABASE lives in app.instance_path, which is created."""
    app = Flask("rel", instance_path=str(tmp_path / "instance"))
    app.config.update(SQLREPL_DATABASE="rel.db")
    repl = SqlRepl(app)
    assert repl.get_settings().database == str(tmp_path / "instance" / "rel.db")
    conn = repl.creator()  # the only app: usable without an app context
    try:
        assert conn.execute("PRAGMA database_list").fetchone()[2] == str(tmp_path / "instance" / "rel.db")
    finally:
        conn.close()
    assert not (tmp_path / "instance" / "rel.db-sqlrepl").exists()  # no replica: nothing replicates


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"SQLREPL_DATABASE": None}, "set SQLREPL_DATABASE"),
        (
            {"SQLREPL_REPLICAS": "file:///x"},
            "unknown config key SQLREPL_REPLICAS (did you mean SQLREPL_REPLICA?)",
        ),
        ({"SQLREPL_DATABASE": ":memory:"}, "in-memory database, which cannot be replicated"),
        ({"SQLREPL_DATABASE": "file:x?mode=memory&cache=shared"}, "in-memory database"),
        ({"SQLREPL_REPLICA": "s4://bucket/x"}, "unknown scheme s4://"),
        ({"SQLREPL_REPLICA": "file://host/x"}, "a host is not allowed"),
        ({"SQLREPL_REPLICA": ["file:///x", 3]}, "must be a URL or a list of URLs"),
        ({"SQLREPL_DURABILITY": "eventually"}, "must be 'async' or 'replicated'"),
        ({"SQLREPL_RESTORE": "no"}, "must be True or False"),
        ({"SQLREPL_OPTIONS": {"sync_every": 1}}, "SQLREPL_OPTIONS has unknown field(s) 'sync_every'"),
        ({"SQLREPL_OPTIONS": {"sync_interval": -2}}, "sync_interval must be a finite number of seconds >= 0"),
        ({"SQLREPL_CONNECT_ARGS": {"database": "other.db"}}, "SQLREPL_CONNECT_ARGS must be a dict"),
    ],
    ids=lambda v: "" if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v)[:60],
)
def test_bad_config_fails_at_init_app(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    """Each bad setting raises a clear ConfigError from init_app, before any
    file is created."""
    app = Flask("bad", instance_path=str(tmp_path / "instance"))
    app.config.update(
        SQLREPL_DATABASE=str(tmp_path / "app.db"), SQLREPL_REPLICA=file_url(tmp_path / "replica")
    )
    app.config.update(config)
    repl = SqlRepl()
    with pytest.raises(sqlrepl.ConfigError) as info:
        repl.init_app(app)
    assert message in str(info.value)
    assert "sqlrepl" not in app.extensions
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["instance"])


def test_unreachable_replica_stops_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    """A missing database whose replica cannot be reached stops init_app
    rather than starting on an empty database."""
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "K")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S")
    app = Flask("unreachable")
    app.config.update(
        SQLREPL_DATABASE=str(tmp_path / "app.db"),
        SQLREPL_REPLICA=f"s3://bucket/prefix?endpoint=http://127.0.0.1:{closed_port}&region=us-east-1",
    )
    with pytest.raises(sqlrepl.ReplicaUnavailableError, match="Connection refused"):
        SqlRepl(app)
    assert not (tmp_path / "app.db").exists()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
