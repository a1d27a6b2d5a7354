"""The Django backend (``ENGINE: "sqlrepl.django"``).

Each configuration runs in a fresh Django process (settings are global to a
process): ``tests/django_settings.py`` is the example project's settings with
``DATABASES["default"]`` from the ``SQLREPL_TEST_DATABASE`` variable. The
example app (``examples/django/items``) provides the models.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, assert_same_database, file_url, integrity, query, restore_fresh

TESTS = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "django"
FAST = {"sync_interval": 0.05, "poll_interval": 0.02, "retention": None, "retry_max": 0.5}

PRELUDE = """
import json, os, sqlrepl
from django.core.management import call_command
from django.db import connection, transaction
from items.models import Item, Tag
DB = str(connection.settings_dict["NAME"])
def out(value):
    print(json.dumps(value), flush=True)
"""


def database(tmp_path: Path, **options: Any) -> dict[str, Any]:
    """A ``DATABASES`` entry for ``tmp_path/app.db`` replicated to ``tmp_path/replica``."""
    opts: dict[str, Any] = {"replica": file_url(tmp_path / "replica"), "options": FAST, **options}
    return {"ENGINE": "sqlrepl.django", "NAME": str(tmp_path / "app.db"), "OPTIONS": opts}


def django_env(db: dict[str, Any], **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), str(EXAMPLE)]),
        "DJANGO_SETTINGS_MODULE": "django_settings",
        "SQLREPL_TEST_DATABASE": json.dumps(db),
        **extra,
    }


def run_django(
    db: dict[str, Any], code: str, *, check: bool = True, setup: bool = True, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (after ``django.setup()`` and PRELUDE) in a new Django process."""
    script = ("import django\ndjango.setup()\n" + PRELUDE if setup else "") + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=django_env(db, **env),
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def manage(db: dict[str, Any], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m django ARGS`` with the test settings."""
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=django_env(db),
        check=False,
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def names(path: str | Path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM items_item ORDER BY id")]
    finally:
        conn.close()


def remove_database(path: str | Path, *, staging: bool = True) -> None:
    """Delete the database and its -wal/-shm (and staging folder): a lost disk."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if staging:
        shutil.rmtree(f"{path}-sqlrepl", ignore_errors=True)


ORM_WRITES = """
call_command("migrate", verbosity=0)
call_command("makemigrations", "items", check=True, dry_run=True, verbosity=0)
a = Item.objects.create(name="a")
b = Item.objects.create(name="b")
Item.objects.filter(pk=a.pk).update(done=True)
b.name = "b2"
b.save()
Item.objects.create(name="deleted").delete()
with transaction.atomic():
    a.tags.add(Tag.objects.create(name="t"))
try:
    with transaction.atomic():
        Item.objects.create(name="rolled back")
        raise RuntimeError
except RuntimeError:
    pass
with transaction.atomic():
    Item.objects.create(name="outer")
    try:
        with transaction.atomic():
            Item.objects.create(name="inner, rolled back to its savepoint")
            raise RuntimeError
    except RuntimeError:
        pass
from django.contrib.auth.models import User
User.objects.create_user("ada", password="pw")
sqlrepl.sync(DB)
out({
    "is_sqlrepl": isinstance(connection.connection, sqlrepl.Connection),
    "items": [[i.name, i.done, sorted(t.name for t in i.tags.all())] for i in Item.objects.order_by("id")],
})
"""


def test_migrations_and_orm_writes_restore_identically(tmp_path: Path) -> None:
    """contrib and example migrations, ORM writes and transactions go through
    sqlrepl connections, and a restore elsewhere equals the database."""
    db = database(tmp_path)
    got = last_json(run_django(db, ORM_WRITES))
    assert got["is_sqlrepl"]
    assert got["items"] == [["a", True, ["t"]], ["b2", False, []], ["outer", False, []]]
    restored = tmp_path / "restored.db"
    restore_fresh(db["OPTIONS"]["replica"], restored)
    assert_same_database(db["NAME"], restored)
    conn = sqlite3.connect(restored)
    applied = {(app, name) for app, name in conn.execute("SELECT app, name FROM django_migrations")}
    conn.close()
    assert {("items", "0001_initial"), ("auth", "0001_initial"), ("sessions", "0001_initial")} <= applied


@pytest.mark.s3
def test_round_trip_through_s3(tmp_path: Path, s3_url: str) -> None:
    """The same writes replicated to a real S3 server restore identically."""
    db = database(tmp_path, replica=s3_url)
    run_django(db, ORM_WRITES)
    restored = tmp_path / "restored.db"
    restore_fresh(s3_url, restored)
    assert_same_database(db["NAME"], restored)


def test_connection_keeps_django_sqlite_behaviour(tmp_path: Path) -> None:
    """Django's connection set-up still happens on the sqlrepl connection:
    converters, functions, pragmas, init_command, transaction_mode, a user
    factory; sqlrepl's keys never reach sqlite3.connect."""
    db = database(
        tmp_path,
        init_command="PRAGMA synchronous=NORMAL; PRAGMA cache_size=-4000",
        transaction_mode="IMMEDIATE",
        timeout=7,
        factory="MarkedConnection",
    )
    code = """
    import datetime
    from django.db import IntegrityError
    from django_settings import MarkedConnection
    call_command("migrate", verbosity=0)
    Item.objects.create(name="abc")
    raw = connection.connection
    pragma = lambda name: raw.execute(f"PRAGMA {name}").fetchone()[0]
    with connection.cursor() as cursor:
        cursor.execute("SELECT created_at FROM items_item")
        created = cursor.fetchone()[0]
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO items_item_tags (item_id, tag_id) VALUES (1, 999)")
        fk_enforced = False
    except IntegrityError:
        fk_enforced = True
    out({
        "sqlrepl": isinstance(raw, sqlrepl.Connection),
        "factory": isinstance(raw, MarkedConnection),
        "params": sorted(connection.get_connection_params()),
        "journal_mode": pragma("journal_mode"),
        "wal_autocheckpoint": pragma("wal_autocheckpoint"),
        "foreign_keys": pragma("foreign_keys"),
        "synchronous": pragma("synchronous"),
        "cache_size": pragma("cache_size"),
        "legacy_alter_table": pragma("legacy_alter_table"),
        "detect_types": isinstance(created, datetime.datetime),
        "regex": Item.objects.filter(name__regex=r"^a.c$").count(),
        "fk_enforced": fk_enforced,
        "transaction_mode": connection.transaction_mode,
    })
    """
    got = last_json(run_django(db, code))
    assert got == {
        "sqlrepl": True,
        "factory": True,
        "params": ["check_same_thread", "database", "detect_types", "factory", "timeout", "uri"],
        "journal_mode": "wal",
        "wal_autocheckpoint": 0,
        "foreign_keys": 1,
        "synchronous": 1,
        "cache_size": -4000,
        "legacy_alter_table": 0,
        "detect_types": True,
        "regex": 1,
        "fk_enforced": True,
        "transaction_mode": "IMMEDIATE",
    }


def test_replicated_durability_waits_for_the_replica(tmp_path: Path) -> None:
    """With durability="replicated", every kind of Django write is in the
    replica when it returns; a raw commit, which is not waited for, is not."""
    # A long sync interval: nothing is uploaded unless someone waits for it.
    db = database(tmp_path, durability="replicated", options={**FAST, "sync_interval": 60})
    code = """
    from django.db import connection
    call_command("migrate", verbosity=0)
    def replica_names():
        dest = f"{DB}.check-{os.urandom(4).hex()}"
        sqlrepl.restore(dest, connection.settings_dict["OPTIONS"]["replica"])
        import sqlite3
        conn = sqlite3.connect(dest)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            rows = [r[0] for r in conn.execute("SELECT name FROM items_item ORDER BY id")]
        finally:
            conn.close()
        return rows, "extra" in tables
    seen = {}
    Item.objects.create(name="autocommit")
    seen["create"] = replica_names()
    Item.objects.filter(name="autocommit").update(name="updated")
    seen["update"] = replica_names()
    with transaction.atomic():
        Item.objects.create(name="atomic 1")
        Item.objects.create(name="atomic 2")
    seen["atomic"] = replica_names()
    Item.objects.filter(name="atomic 1").delete()
    seen["delete"] = replica_names()
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE extra (x)")
    seen["ddl"] = replica_names()
    connection.connection.execute(
        "INSERT INTO items_item (name, done, created_at) VALUES ('raw', 0, '2026-01-01')"
    )
    connection.connection.commit()
    seen["raw"] = replica_names()
    out(seen)
    """
    seen = last_json(run_django(db, code))
    assert seen["create"] == [["autocommit"], False]
    assert seen["update"] == [["updated"], False]
    assert seen["atomic"] == [["updated", "atomic 1", "atomic 2"], False]
    assert seen["delete"] == [["updated", "atomic 2"], False]
    assert seen["ddl"] == [["updated", "atomic 2"], True]
    # The control: the raw connection's commit is only nudged, and with a
    # 60 s interval it is not in the replica yet. This is what the wait adds.
    assert seen["raw"] == [["updated", "atomic 2"], True]


def test_replicated_durability_survives_cleared_execute_wrappers(tmp_path: Path) -> None:
    """Code that empties or replaces connection.execute_wrappers does not turn
    the durability wait off."""
    db = database(tmp_path, durability="replicated", options={**FAST, "sync_interval": 60})
    code = """
    from django.db import connection
    call_command("migrate", verbosity=0)
    def replica_names():
        dest = f"{DB}.check-{os.urandom(4).hex()}"
        sqlrepl.restore(dest, connection.settings_dict["OPTIONS"]["replica"])
        import sqlite3
        conn = sqlite3.connect(dest)
        try:
            return [r[0] for r in conn.execute("SELECT name FROM items_item ORDER BY id")]
        finally:
            conn.close()
    seen = {}
    connection.execute_wrappers.clear()
    Item.objects.create(name="cleared")
    seen["cleared"] = replica_names()
    connection.execute_wrappers = []
    with transaction.atomic():
        Item.objects.create(name="replaced")
    seen["replaced"] = replica_names()
    out(seen)
    """
    seen = last_json(run_django(db, code))
    assert seen == {"cleared": ["cleared"], "replaced": ["cleared", "replaced"]}


@pytest.mark.slow
def test_replica_timeout_raises_after_local_commit(tmp_path: Path) -> None:
    """When the replica cannot be written, a replicated write raises
    SyncTimeoutError; the data is committed locally and on_commit callbacks run."""
    db = database(tmp_path)
    run_django(db, 'call_command("migrate", verbosity=0)')
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the replica's folder should be")
    broken = database(
        tmp_path,
        replica=file_url(blocker / "replica"),
        durability="replicated",
        replicated_timeout=1.5,
        restore=False,
    )
    code = """
    ran = []
    errors = []
    try:
        Item.objects.create(name="autocommit")
    except sqlrepl.SyncTimeoutError as exc:
        errors.append("autocommit")
    try:
        with transaction.atomic():
            transaction.on_commit(lambda: ran.append("hook"))
            Item.objects.create(name="atomic")
    except sqlrepl.SyncTimeoutError:
        errors.append("atomic")
    out({"errors": errors, "ran": ran, "names": sorted(Item.objects.values_list("name", flat=True))})
    """
    got = last_json(run_django(broken, code))
    assert got == {"errors": ["autocommit", "atomic"], "ran": ["hook"], "names": ["atomic", "autocommit"]}


def test_restore_at_startup_once(tmp_path: Path) -> None:
    """A missing database is restored before the first connection opens,
    once per process however many connections follow."""
    db = database(tmp_path)
    run_django(
        db,
        'call_command("migrate", verbosity=0)\nfor n in "xyz": Item.objects.create(name=n)\nsqlrepl.sync(DB)',
    )
    remove_database(db["NAME"])
    code = """
    counts = []
    for _ in range(3):
        counts.append(Item.objects.count())
        connection.close()
    out(counts)
    """
    proc = run_django(db, code)
    assert last_json(proc) == [3, 3, 3]
    assert proc.stderr.count(f"restored {db['NAME']} from") == 1, proc.stderr
    assert "restore skipped" not in proc.stderr
    assert integrity(db["NAME"]) == [("ok",)]


def test_unreachable_replica_stops_the_first_connection(tmp_path: Path) -> None:
    """A missing database whose replica cannot be reached is not created
    empty: the connection fails with the replica's error."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = database(tmp_path, replica=f"s3://bucket/prefix?endpoint=http://127.0.0.1:{port}&region=us-east-1")
    env = {"AWS_ACCESS_KEY_ID": "K", "AWS_SECRET_ACCESS_KEY": "S", "AWS_EC2_METADATA_DISABLED": "true"}
    code = """
    try:
        Item.objects.count()
    except sqlrepl.ReplicaUnavailableError as exc:
        out(str(exc))
    """
    assert "Connection refused" in last_json(run_django(db, code, **env))
    assert not Path(db["NAME"]).exists()


def test_no_restore_when_disabled(tmp_path: Path) -> None:
    """With restore off, a missing database starts empty (Django creates it)."""
    db = database(tmp_path)
    run_django(db, 'call_command("migrate", verbosity=0)\nItem.objects.create(name="x")')
    remove_database(db["NAME"])
    db["OPTIONS"]["restore"] = False
    proc = run_django(db, "out(connection.introspection.table_names())")
    assert last_json(proc) == []


def test_workers_starting_together_restore_once(tmp_path: Path) -> None:
    """Processes that start together on a missing database restore it once
    between them, and none loses a write to another's restore."""
    db = database(tmp_path, durability="replicated")
    run_django(db, 'call_command("migrate", verbosity=0)\nItem.objects.create(name="before")')
    remove_database(db["NAME"])
    code = PRELUDE + 'import sys\nItem.objects.create(name="w" + sys.argv[1])\nout("ok")\n'
    script = "import django\ndjango.setup()\n" + code
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=django_env(db),
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    assert sum(err.count(f"restored {db['NAME']} from") for _, err in outputs) == 1
    expected = ["before", "w0", "w1", "w2", "w3"]
    assert sorted(names(db["NAME"])) == expected
    restored = tmp_path / "restored.db"
    restore_fresh(db["OPTIONS"]["replica"], restored)
    assert sorted(names(restored)) == expected


def test_test_runner_uses_an_unreplicated_in_memory_database(tmp_path: Path) -> None:
    """``manage.py test`` (also in parallel) runs the example's tests on an
    in-memory database: the configured file and replica are never touched."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SQLREPL_DB": str(tmp_path / "db.sqlite3"),
        "SQLREPL_REPLICA": file_url(tmp_path / "replica"),
    }
    for extra in ([], ["--parallel", "2"]):
        proc = subprocess.run(
            [sys.executable, "manage.py", "test", "items", *extra],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Ran 3 tests" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_wraps_another_sqlite_backend(tmp_path: Path) -> None:
    """With OPTIONS["backend"], that backend's wrapper, features and connection
    set-up are kept, and its connections are replicated."""
    db = database(tmp_path, backend="django_custom_backend")
    code = """
    from django_custom_backend.base import DatabaseWrapper as Custom
    from sqlrepl.django.base import DatabaseWrapper as Sqlrepl
    from django.db import connections
    connection = connections["default"]  # the object, not django.db.connection's proxy
    call_command("migrate", verbosity=0)
    Item.objects.create(name="via custom")
    raw = connection.connection
    sqlrepl.sync(DB)
    out({
        "wrapper": [isinstance(connection, Custom), isinstance(connection, Sqlrepl)],
        "features": getattr(connection.features, "custom_backend_marker", False),
        "sqlrepl": isinstance(raw, sqlrepl.Connection),
        "function": raw.execute("SELECT custom_backend_answer()").fetchone()[0],
        "cache_size": raw.execute("PRAGMA cache_size").fetchone()[0],
        "copy": type(connection.copy()) is type(connection),
    })
    """
    got = last_json(run_django(db, code))
    assert got == {
        "wrapper": [True, True],
        "features": True,
        "sqlrepl": True,
        "function": 42,
        "cache_size": -2345,
        "copy": True,
    }
    restored = tmp_path / "restored.db"
    restore_fresh(db["OPTIONS"]["replica"], restored)
    assert_same_database(db["NAME"], restored)


def test_without_replica_it_is_djangos_backend(tmp_path: Path) -> None:
    """No replica: plain sqlite3 connections, no WAL switch, no staging folder."""
    db = {"ENGINE": "sqlrepl.django", "NAME": str(tmp_path / "app.db")}
    code = """
    call_command("migrate", verbosity=0)
    raw = connection.connection
    out([type(raw).__module__, raw.execute("PRAGMA journal_mode").fetchone()[0]])
    """
    assert last_json(run_django(db, code)) == ["sqlite3", "delete"]
    assert sorted(os.listdir(tmp_path)) == ["app.db"]


# -- bad settings --------------------------------------------------------------------------

BAD_SETTINGS = [
    pytest.param(
        {"replicas": "file:///x"}, "unknown key 'replicas' (did you mean 'replica'?)", id="unknown-key"
    ),
    pytest.param(
        {"durabilty": "async"}, "unknown key 'durabilty' (did you mean 'durability'?)", id="typo-key"
    ),
    pytest.param({"NAME": ":memory:"}, "an in-memory database cannot be replicated", id="memory"),
    pytest.param(
        {"NAME": "file:memdb?mode=memory&cache=shared"},
        "an in-memory database cannot be replicated",
        id="memory-uri",
    ),
    pytest.param({"replica": "s4://bucket/db"}, "unknown scheme s4://", id="unknown-scheme"),
    pytest.param({"replica": "file://relative/path"}, "a host is not allowed", id="file-host"),
    pytest.param({"replica": "file:relative"}, "the path must be absolute", id="file-relative"),
    pytest.param({"replica": "s3://a/prefix"}, "bucket", id="s3-bucket"),
    pytest.param({"replica": 42}, "must be a URL or a list of URLs", id="replica-type"),
    pytest.param({"durability": "sync"}, "must be 'async' or 'replicated'", id="durability"),
    pytest.param({"restore": "yes"}, "must be True or False", id="restore"),
    pytest.param({"options": {"sync_intervall": 1}}, "unknown field(s) 'sync_intervall'", id="options-field"),
    pytest.param(
        {"options": {"sync_interval": -1}},
        "sync_interval must be a finite number of seconds >= 0",
        id="options-value",
    ),
    pytest.param({"init_command": "PRAGMA journal_mode=DELETE"}, "breaks replication", id="journal-mode"),
    pytest.param(
        {"init_command": "PRAGMA wal_autocheckpoint = 1000"}, "breaks replication", id="autocheckpoint"
    ),
    pytest.param(
        {"backend": "django.db.backends.dummy"}, "not a subclass of Django's SQLite", id="backend-kind"
    ),
    pytest.param({"backend": "no_such_backend"}, "cannot import no_such_backend.base", id="backend-missing"),
    pytest.param({"factory": dict}, "must be a subclass of sqlite3.Connection", id="factory"),
]


def test_bad_settings_fail_when_the_backend_is_created(tmp_path: Path) -> None:
    """Each bad setting raises a clear ImproperlyConfigured when the backend
    is created (before any connection), with the ConfigError as its cause
    for replica URLs."""
    cases = [(p.id, p.values[0], p.values[1]) for p in BAD_SETTINGS]
    changes = repr([(i, {k: v for k, v in c.items() if k != "factory"}) for i, c, _ in cases])
    code = f"""
    import json
    from django.core.exceptions import ImproperlyConfigured
    from django.db.utils import load_backend
    wrapper = load_backend("sqlrepl.django").DatabaseWrapper
    results = {{}}
    for case_id, change in {changes}:
        settings = {{"NAME": {str(tmp_path / "app.db")!r}, "OPTIONS": {{"replica": "file:///tmp/r"}}}}
        if "NAME" in change:
            settings["NAME"] = change.pop("NAME")
        settings["OPTIONS"].update(change)
        if case_id == "factory":
            settings["OPTIONS"]["factory"] = dict
        try:
            wrapper(settings, "default")
            results[case_id] = None
        except ImproperlyConfigured as exc:
            cause = type(exc.__cause__).__name__ if exc.__cause__ else None
            results[case_id] = [str(exc), cause]
    print(json.dumps(results))
    """
    got = json.loads(run_django(database(tmp_path), code, setup=True).stdout.strip().splitlines()[-1])
    for case_id, change, message in cases:
        assert got[case_id] is not None, f"{case_id}: no error"
        text, cause = got[case_id]
        assert message in text, f"{case_id}: {text}"
        if "replica" in change and isinstance(change["replica"], str):
            assert cause == "ConfigError", case_id
    assert not (tmp_path / "app.db").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"OPTIONS": {"replicas": "file:///x"}}, "unknown key 'replicas'"),
        ({"NAME": ":memory:"}, "an in-memory database cannot be replicated"),
        ({"OPTIONS": {"replica": "ftp://host/db"}}, "unknown scheme ftp://"),
    ],
    ids=["unknown-key", "memory", "bad-url"],
)
def test_bad_settings_stop_django_setup(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    """With the sqlrepl.django app installed, bad settings stop ``django.setup()``
    itself: the process fails at startup, not at its first request."""
    db = database(tmp_path)
    db["OPTIONS"].update(change.get("OPTIONS", {}))
    if "NAME" in change:
        db["NAME"] = change["NAME"]
    proc = run_django(db, "print('started')", check=False)
    assert proc.returncode != 0
    assert "started" not in proc.stdout
    assert "django.core.exceptions.ImproperlyConfigured" in proc.stderr
    assert message in proc.stderr
    assert ", in setup" in proc.stderr  # raised inside django.setup()


# -- manage.py sqlrepl -----------------------------------------------------------------------


HOLDER = """
import time
Item.objects.count()
while sqlrepl.status(DB).role != "replicating":
    time.sleep(0.01)
out("ready")
time.sleep(3600)  # until the test kills it
"""


def test_first_replicated_write_of_a_process_that_stands_by(tmp_path: Path) -> None:
    """A new process (a new gunicorn worker) whose first write, with
    durability="replicated", comes while another process replicates: the
    write returns once it is in the replica, through the replicating process."""
    # A long sync interval: the row reaches the replica only if the write asks.
    slow = {**FAST, "sync_interval": 600}
    run_django(database(tmp_path, options=slow), 'call_command("migrate", verbosity=0)')
    code = """
    Item.objects.create(name="from a standby")
    role = sqlrepl.status(DB).role
    dest = DB + ".check"
    sqlrepl.restore(dest, connection.settings_dict["OPTIONS"]["replica"])
    out({"role": role, "restored": dest})
    """
    # The holder has just uploaded, so its next upload is ten minutes away.
    holds = 'Item.objects.create(name="by the holder")\nsqlrepl.sync(DB)\n' + HOLDER
    with subprocess.Popen(
        [sys.executable, "-c", "import django\ndjango.setup()\n" + PRELUDE + holds],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=django_env(database(tmp_path, options=slow)),
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == '"ready"'
            db = database(tmp_path, durability="replicated", replicated_timeout=120, options=slow)
            result = last_json(run_django(db, code, timeout=300))
        finally:
            holder.kill()
    assert result["role"] == "standby"
    assert names(result["restored"]) == ["by the holder", "from a standby"]


@pytest.mark.slow
def test_management_command(tmp_path: Path) -> None:
    """``sqlrepl status`` reports the replicator and generations (standby when
    another process replicates), ``verify`` passes, and ``restore`` restores
    in place only when missing, or a copy at a txid."""
    db = database(tmp_path, durability="replicated")
    code = """
    call_command("migrate", verbosity=0)
    Item.objects.create(name="first")
    first = sqlrepl.status(DB).txid
    Item.objects.create(name="second")
    Item.objects.create(name="third")
    out({"first": first, "last": sqlrepl.status(DB).txid})
    """
    txids = last_json(run_django(db, code))

    status = manage(db, "sqlrepl", "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["exists"]
    assert report["replicator"]["role"] == "replicating"  # nothing else runs
    (replica,) = report["replicas"]
    assert len(replica["generations"]) == 1
    assert replica["generations"][0]["last_txid"] >= txids["last"]

    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import django\ndjango.setup()\n" + PRELUDE + HOLDER,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=django_env(db),
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == '"ready"'
            verify = manage(db, "sqlrepl", "verify")  # through the holder: it replicates
            assert verify.returncode == 0, verify.stderr
            assert "OK" in verify.stdout
            report = json.loads(manage(db, "sqlrepl", "status", "--json").stdout)
            assert report["replicator"]["role"] == "standby"
            assert report["replicator"]["replicas"][0]["txid"] >= txids["last"]
        finally:
            holder.kill()

    refused = manage(db, "sqlrepl", "restore")
    assert refused.returncode == 1
    assert "exists; pass --overwrite" in refused.stderr

    copy = tmp_path / "copy.db"
    at_first = manage(db, "sqlrepl", "restore", "-o", str(copy), "--txid", str(txids["first"]))
    assert at_first.returncode == 0, at_first.stderr
    assert f"txid {txids['first']}" in at_first.stdout
    assert names(copy) == ["first"]

    empty = manage(
        db, "sqlrepl", "restore", "-o", str(tmp_path / "x.db"), "--replica", file_url(tmp_path / "none")
    )
    assert empty.returncode == 1
    assert "NoBackupError" in empty.stderr

    remove_database(db["NAME"], staging=False)
    in_place = manage(db, "sqlrepl", "restore")
    assert in_place.returncode == 0, in_place.stderr
    assert names(db["NAME"]) == ["first", "second", "third"]
    assert integrity(db["NAME"]) == [("ok",)]


# -- test databases and the production replica ------------------------------------------

LEAK_TESTS = '''
"""Tests run by Django's test runner in tests/test_django.py: each writes to
the test database from a connection made after the runner switched NAME."""
import json
import threading
import urllib.request

from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection, connections
from django.test import LiveServerTestCase, TransactionTestCase

from items.models import Item


class NewConnections(TransactionTestCase):
    def test_thread(self):
        """A new thread builds a new DatabaseWrapper."""
        def work():
            try:
                Item.objects.create(name="from a thread")
            finally:
                connections.close_all()
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        self.assertTrue(Item.objects.filter(name="from a thread").exists())

    def test_copy(self):
        """connection.copy() builds a new DatabaseWrapper from the rewritten
        settings, under the same alias or a new one."""
        for alias in (None, "dynamic_alias"):
            other = connection.copy(alias)
            try:
                with other.cursor() as cursor:
                    cursor.execute(
                        "INSERT INTO items_item (name, done, created_at) VALUES (%s, 0, '2026-01-01')",
                        [f"from a copy as {alias}"],
                    )
            finally:
                other.close()
            self.assertTrue(Item.objects.filter(name=f"from a copy as {alias}").exists())

    def test_async(self):
        """An async context runs the query in another thread, with its own wrapper."""
        create = sync_to_async(lambda: Item.objects.create(name="async").pk, thread_sensitive=False)
        self.assertTrue(async_to_sync(create)())


class LiveServer(LiveServerTestCase):
    def test_post(self):
        """The live server's thread writes through its own connection."""
        request = urllib.request.Request(
            self.live_server_url + "/api/items",
            data=json.dumps({"name": "live"}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            self.assertEqual(response.status, 201)
        self.assertTrue(Item.objects.filter(name="live").exists())
'''


def tree(path: Path) -> dict[str, int]:
    """Every file under ``path`` (relative name: size); empty if it does not exist."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def run_test_suite(tmp_path: Path, db: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """Run LEAK_TESTS with Django's test runner; return the finished run."""
    tests_dir = tmp_path / "suite"
    (tests_dir / "leakcheck").mkdir(parents=True)
    (tests_dir / "leakcheck" / "__init__.py").write_text("")
    (tests_dir / "leakcheck" / "tests.py").write_text(LEAK_TESTS)
    env = django_env(db)
    env["PYTHONPATH"] += os.pathsep + str(tests_dir)
    return subprocess.run(
        [sys.executable, "-m", "django", "test", "leakcheck.tests", "-v", "2", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("test_name", ["file", "memory"])
def test_test_databases_never_reach_the_production_replica(tmp_path: Path, test_name: str) -> None:
    """Connections the test runner's database gets from a thread, a copy, an
    async context and a live server work, and write nothing to the production
    database or replica, with a file or an in-memory test database."""
    db = database(tmp_path)
    if test_name == "file":
        db["TEST"] = {"NAME": str(tmp_path / "test.db")}
    replica = tmp_path / "replica"
    run_django(
        db, 'call_command("migrate", verbosity=0)\nItem.objects.create(name="prod")\nsqlrepl.sync(DB)\n'
    )
    before = tree(replica)
    assert before
    proc = run_test_suite(tmp_path, db)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Ran 4 tests" in proc.stderr
    assert tree(replica) == before
    assert names(db["NAME"]) == ["prod"]
    restored = tmp_path / "restored.db"
    restore_fresh(file_url(replica), restored)
    assert names(restored) == ["prod"]
    assert not (tmp_path / "test.db-sqlrepl").exists()


def test_test_database_replicates_only_when_asked(tmp_path: Path) -> None:
    """With TEST["REPLICA"], the file test database is replicated there (its
    --parallel clones hold all of it, and its replicator is stopped before
    the runner deletes it); the production replica still receives nothing."""
    db = database(tmp_path, durability="replicated")
    test_replica = tmp_path / "test-replica"
    db["TEST"] = {"NAME": str(tmp_path / "test.db"), "REPLICA": file_url(test_replica)}
    replica = tmp_path / "replica"
    run_django(
        db, 'call_command("migrate", verbosity=0)\nItem.objects.create(name="prod")\nsqlrepl.sync(DB)\n'
    )
    before = tree(replica)
    proc = run_test_suite(tmp_path, db, "--parallel", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Ran 4 tests" in proc.stderr
    assert tree(replica) == before
    assert names(db["NAME"]) == ["prod"]
    restored = tmp_path / "restored-test.db"
    restore_fresh(file_url(test_replica), restored)
    assert integrity(restored) == [("ok",)]
    # TransactionTestCase empties the tables after each test: the schema is what is left.
    assert ("items_item",) in query(restored, "SELECT name FROM sqlite_master")
    assert not (tmp_path / "test.db").exists()
    assert not (tmp_path / "test.db-sqlrepl").exists()


def test_test_replica_needs_a_file_test_database(tmp_path: Path) -> None:
    """TEST["REPLICA"] without a file TEST["NAME"] stops django.setup() with a clear message."""
    db = database(tmp_path)
    db["TEST"] = {"REPLICA": file_url(tmp_path / "test-replica")}
    proc = run_django(db, "", check=False)
    assert proc.returncode != 0
    assert "only a test database in a file can be replicated" in proc.stderr


def test_shallow_copy_of_a_connection(tmp_path: Path) -> None:
    """copy.copy(connection) (as Django's own creation tests do) gives a
    working connection object of the same class and settings."""
    db = database(tmp_path)
    code = """
    import copy
    from django.db import connections
    original = connections["default"]
    call_command("migrate", verbosity=0)
    twin = copy.copy(original)
    twin.connection = None
    twin.settings_dict = copy.deepcopy(original.settings_dict)
    with twin.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM items_item")
        count = cursor.fetchone()[0]
    twin.close()
    out({"same": type(twin) is type(original) and twin.sqlrepl == original.sqlrepl, "count": count})
    """
    assert last_json(run_django(db, code)) == {"same": True, "count": 0}


def test_management_restore_prints_its_result_once(tmp_path: Path) -> None:
    """`manage.py sqlrepl restore` prints what it restored once, even with
    sqlrepl's INFO log on the console (as the example project has it)."""
    db = database(tmp_path)
    run_django(db, 'call_command("migrate", verbosity=0)\nItem.objects.create(name="a")\nsqlrepl.sync(DB)\n')
    done = manage(db, "sqlrepl", "restore", "-o", str(tmp_path / "copy.db"))
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert [line for line in lines if "restored" in line] == [
        line for line in done.stdout.splitlines() if line.startswith(f"restored {tmp_path / 'copy.db'}:")
    ]
    assert len([line for line in lines if "restored" in line]) == 1
