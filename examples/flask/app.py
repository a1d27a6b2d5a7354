"""The sqlrepl Flask example: Flask-SQLAlchemy and raw SQLite on one
replicated database.

    flask --app app init-db
    gunicorn -w 4 'app:create_app()'

Environment: ``SQLREPL_DB`` (default ``app.db`` in the instance folder),
``SQLREPL_REPLICA`` (default ``file://<this folder>/replica``; or
``s3://bucket/prefix`` with the ``AWS_*`` variables), ``SQLREPL_DURABILITY``
(default ``replicated``), ``SQLREPL_SYNC_INTERVAL`` (default 1 second),
``SQLREPL_LOG_LEVEL`` (default ``INFO``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click
from flask import Blueprint, Flask, abort, request
from flask.cli import with_appcontext
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlrepl
from sqlrepl.flask import SqlRepl

HERE = os.path.dirname(os.path.abspath(__file__))


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
repl = SqlRepl()
api = Blueprint("api", __name__, url_prefix="/api")


class Item(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    # sqlrepl says what it does (the restore at startup, a failing replica)
    # on the "sqlrepl" logger; Flask configures no logging for it.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sqlrepl").setLevel(os.environ.get("SQLREPL_LOG_LEVEL", "INFO"))
    app = Flask(__name__, instance_path=os.environ.get("SQLREPL_INSTANCE", os.path.join(HERE, "instance")))
    app.config.from_mapping(
        SQLREPL_DATABASE=os.environ.get("SQLREPL_DB", "app.db"),
        SQLREPL_REPLICA=os.environ.get("SQLREPL_REPLICA", "file://" + os.path.join(HERE, "replica")),
        SQLREPL_DURABILITY=os.environ.get("SQLREPL_DURABILITY", "replicated"),
        SQLREPL_OPTIONS={"sync_interval": float(os.environ.get("SQLREPL_SYNC_INTERVAL", "1.0"))},
        SQLREPL_CONNECT_ARGS={"timeout": 20},
    )
    if test_config:
        app.config.update(test_config)
    # First: restores the database if it is missing, before anything opens it.
    repl.init_app(app)
    # Flask-SQLAlchemy's pool gets sqlrepl connections to the same file.
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + repl.get_settings(app).database
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"creator": repl.creator}
    db.init_app(app)
    app.register_blueprint(api)
    app.cli.add_command(init_db)
    return app


@click.command("init-db")
@with_appcontext
def init_db() -> None:
    """Create the tables (once, before starting the workers)."""
    db.create_all()
    conn = repl.get_db()
    conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    conn.commit()
    click.echo(f"initialised {repl.get_settings().database}")


@api.route("/items", methods=["GET", "POST"])
def items() -> Any:
    """Flask-SQLAlchemy: with durability "replicated", a 201 means the item
    is in the replica (SQLAlchemy's commit() is sqlrepl's)."""
    if request.method == "POST":
        body = request.get_json(silent=True) or {}
        if not isinstance(body.get("name"), str):
            abort(400, 'send JSON like {"name": "..."}')
        item = Item(name=body["name"])
        db.session.add(item)
        db.session.commit()
        return item.as_json(), 201
    latest = db.session.scalars(db.select(Item).order_by(Item.id.desc()).limit(50))
    return {"count": db.session.query(Item).count(), "items": [i.as_json() for i in latest]}


@api.route("/notes", methods=["GET", "POST"])
def notes() -> Any:
    """The raw sqlite3 connection of the request (``repl.get_db()``)."""
    conn = repl.get_db()
    if request.method == "POST":
        body = request.get_json(silent=True) or {}
        if not isinstance(body.get("body"), str):
            abort(400, 'send JSON like {"body": "..."}')
        cur = conn.execute("INSERT INTO notes (body) VALUES (?)", (body["body"],))
        conn.commit()
        return {"id": cur.lastrowid, "body": body["body"]}, 201
    rows = conn.execute("SELECT id, body FROM notes ORDER BY id DESC LIMIT 50").fetchall()
    return {"notes": [{"id": i, "body": b} for i, b in rows]}


@api.get("/status")
def status() -> Any:
    """What the replicating process has done, the same from every worker
    (``sqlrepl.read_status``; ``sqlrepl status instance/app.db`` shows the
    same), and this worker's own role."""
    repl.get_db()  # the replicator starts with the first connection
    database = repl.get_settings().database
    return {
        "pid": os.getpid(),
        "role": repl.status().role,
        "replication": sqlrepl.read_status(database).as_json(),
    }
