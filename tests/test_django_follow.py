"""The Django backend's read replicas (``OPTIONS["follow"]``): a second alias
whose file a follower keeps a copy of the primary's replica, read through
Django's plain SQLite behaviour, refusing writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import file_url
from test_django import database, last_json, run_django, run_test_suite, tree


def follower_alias(tmp_path: Path, source: Path, **options: Any) -> dict[str, Any]:
    """A ``DATABASES`` entry following ``source`` into ``tmp_path/copy/app.db``."""
    opts = {"follow": file_url(source), "poll_interval": 0.05, "follow_timeout": 60, **options}
    return {"ENGINE": "sqlrepl.django", "NAME": str(tmp_path / "copy" / "app.db"), "OPTIONS": opts}


FOLLOW = """
from django.db import connections
from sqlrepl.django import base
call_command("migrate", verbosity=0)
Item.objects.create(name="first")
sqlrepl.sync(DB)
seen_first = list(Item.objects.using("replica").values_list("name", flat=True))
Item.objects.create(name="second")
sqlrepl.sync(DB)
txid = sqlrepl.status(DB).txid
copy = str(connections["replica"].settings_dict["NAME"])
follower = base._followers[copy]
status = follower.wait(lambda s: s.txid >= txid, timeout=60)
seen = list(Item.objects.using("replica").order_by("id").values_list("name", flat=True))
errors = []
for write in (
    lambda: Item.objects.using("replica").create(name="on the replica"),
    lambda: Item.objects.using("replica").filter(name="first").update(name="changed"),
    lambda: connections["replica"].cursor().execute("DELETE FROM items_item"),
):
    try:
        write()
        errors.append(None)
    except Exception as exc:
        errors.append([type(exc).__name__, str(exc)])
out({
    "first": seen_first, "status": [status.state, status.txid], "txid": txid, "seen": seen,
    "errors": errors,
    "after": list(Item.objects.using("replica").order_by("id").values_list("name", flat=True)),
})
"""


def test_replica_alias_follows_the_primary_and_refuses_writes(tmp_path: Path) -> None:
    """A write through the default alias, synced, is read through the follow
    alias once the follower's txid reaches it; writes through the follow
    alias raise FollowedDatabaseError and change nothing."""
    db = database(tmp_path)
    replica = follower_alias(tmp_path, tmp_path / "replica")
    got = last_json(run_django(db, FOLLOW, SQLREPL_TEST_REPLICA_DATABASE=json.dumps(replica)))
    assert got["first"] == ["first"]
    assert got["status"][0] == "following"
    assert got["status"][1] >= got["txid"]
    assert got["seen"] == ["first", "second"]
    for error in got["errors"]:
        assert error is not None
        kind, message = error
        assert kind == "FollowedDatabaseError", error
        assert "'replica'] is a read replica" in message
        assert "read-only" in message
    assert got["after"] == ["first", "second"]


def test_follower_timeout_is_a_clear_error(tmp_path: Path) -> None:
    """A follow alias whose replica holds no snapshot raises FollowTimeoutError
    at its first query, after follow_timeout, saying what to check."""
    db = database(tmp_path)
    replica = follower_alias(tmp_path, tmp_path / "empty-replica", follow_timeout=0.5)
    code = """
    try:
        Item.objects.using("replica").count()
        out(None)
    except sqlrepl.FollowTimeoutError as exc:
        out(str(exc))
    """
    got = last_json(run_django(db, code, SQLREPL_TEST_REPLICA_DATABASE=json.dumps(replica)))
    assert got is not None
    assert "not following" in got
    assert "follow_timeout" in got


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replica": "file:///x"}, "both 'replica' and 'follow'"),
        ({"follow": "ftp://host/db"}, "unknown scheme ftp://"),
        ({"transaction_mode": "IMMEDIATE"}, "a read replica only reads"),
        ({"init_command": "PRAGMA journal_mode=WAL"}, "the follower owns the copy's journal"),
        ({"poll_interval": 0}, "'poll_interval'] must be a number of seconds > 0"),
    ],
    ids=["with-replica", "bad-url", "immediate", "journal-mode", "poll-interval"],
)
def test_bad_follow_settings_stop_django_setup(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    """Bad OPTIONS on a follow alias stop ``django.setup()`` with ImproperlyConfigured."""
    replica = follower_alias(tmp_path, tmp_path / "replica", **options)
    proc = run_django(
        database(tmp_path), "print('started')", check=False, SQLREPL_TEST_REPLICA_DATABASE=json.dumps(replica)
    )
    assert proc.returncode != 0
    assert "started" not in proc.stdout
    assert "django.core.exceptions.ImproperlyConfigured" in proc.stderr
    assert message in proc.stderr


def test_poll_interval_needs_follow(tmp_path: Path) -> None:
    """``poll_interval`` on a replicated (not following) alias is an error."""
    proc = run_django(database(tmp_path, poll_interval=1), "print('started')", check=False)
    assert proc.returncode != 0
    assert "only for a read replica" in proc.stderr


FOLLOW_TESTS = '''
from django.db import connections
from django.test import TestCase
from items.models import Item
from sqlrepl.django import base


class ReplicaAliasTests(TestCase):
    databases = {"default", "replica"}

    def test_replica_alias_is_a_plain_test_database(self):
        """The follow alias's test database is empty, writable and followed by no one."""
        self.assertEqual(Item.objects.using("replica").count(), 0)
        Item.objects.using("replica").create(name="test write")
        self.assertEqual(Item.objects.using("replica").count(), 1)
        self.assertEqual(base._followers, {})
        self.assertFalse(connections["replica"]._sqlrepl_readonly)
'''


def test_test_runner_never_follows_the_production_replica(tmp_path: Path, monkeypatch: Any) -> None:
    """Under Django's test runner the follow alias gets a plain empty test
    database: no follower starts, the copy's file is never made."""
    import test_django

    monkeypatch.setattr(test_django, "LEAK_TESTS", FOLLOW_TESTS)
    db = database(tmp_path)
    run_django(db, 'call_command("migrate", verbosity=0)\nItem.objects.create(name="prod")\n')
    replica = follower_alias(tmp_path, tmp_path / "replica")
    before = tree(tmp_path / "replica")
    monkeypatch.setenv("SQLREPL_TEST_REPLICA_DATABASE", json.dumps(replica))
    proc = run_test_suite(tmp_path, db)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Ran 1 test" in proc.stderr
    assert not (tmp_path / "copy").exists()
    assert tree(tmp_path / "replica") == before


HOLDER = """
import sys
from django.db import connections
call_command("migrate", verbosity=0)
Item.objects.create(name="first")
sqlrepl.sync(DB)
out(list(Item.objects.using("replica").values_list("name", flat=True)))
sys.stdin.read()  # keep the follower until the test closes stdin
"""

SECOND = """
from django.db import connections
from sqlrepl.django import base
names = list(Item.objects.using("replica").values_list("name", flat=True))
copy = str(connections["replica"].settings_dict["NAME"])
out({"names": names, "own_follower": base._followers[copy] is not None})
"""


def test_second_process_reads_the_copy_another_follows(tmp_path: Path) -> None:
    """A second process whose follow alias finds the copy kept by another
    process's follower starts none of its own and reads that copy."""
    import subprocess
    import sys
    import textwrap

    from test_django import PRELUDE, django_env

    db = database(tmp_path)
    replica = follower_alias(tmp_path, tmp_path / "replica")
    env = django_env(db, SQLREPL_TEST_REPLICA_DATABASE=json.dumps(replica))
    script = "import django\ndjango.setup()\n" + PRELUDE + textwrap.dedent(HOLDER)
    with subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        try:
            assert json.loads(holder.stdout.readline()) == ["first"]
            got = last_json(run_django(db, SECOND, SQLREPL_TEST_REPLICA_DATABASE=json.dumps(replica)))
            assert got == {"names": ["first"], "own_follower": False}
        finally:
            holder.stdin.close()
            holder.wait(timeout=60)
