"""``sqlrepl.connect``: a real sqlite3 connection with replication behind it."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_database, fast_options, file_url, query, restore_fresh

import sqlrepl
from sqlrepl import _replica_memory


def test_is_a_real_sqlite3_connection(db_path: str, tmp_path: Path) -> None:
    """The object is a sqlite3.Connection in WAL mode with autocheckpoint off."""
    conn = sqlrepl.connect(db_path, file_url(tmp_path / "r"), options=fast_options())
    assert isinstance(conn, sqlite3.Connection)
    assert isinstance(conn, sqlrepl.Connection)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    conn.close()


def test_with_block_commits_then_closes(db_path: str, tmp_path: Path) -> None:
    """Leaving the with block commits and closes; the commit is replicated."""
    url = file_url(tmp_path / "r")
    with sqlrepl.connect(db_path, url, options=fast_options()) as conn:
        conn.execute("CREATE TABLE t(x)")
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.execute("SELECT 1")
    sqlrepl.sync(db_path)
    restore_fresh(url, tmp_path / "restored.db")
    assert query(tmp_path / "restored.db", "SELECT x FROM t") == [(1,)]


def test_with_block_rolls_back_on_error(db_path: str, tmp_path: Path) -> None:
    """An exception in the with block rolls back, closes, and propagates."""
    url = file_url(tmp_path / "r")
    with sqlrepl.connect(db_path, url, options=fast_options()) as conn:
        conn.execute("CREATE TABLE t(x)")

    def fail_inside() -> None:
        with sqlrepl.connect(db_path, url) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_inside()
    assert query(db_path, "SELECT count(*) FROM t") == [(0,)]


def test_commits_not_through_commit_are_captured(db_path: str, tmp_path: Path) -> None:
    """Autocommit mode and explicit COMMIT statements never call commit();
    the WAL is the source of truth and they are replicated too."""
    url = file_url(tmp_path / "r")
    conn = sqlrepl.connect(db_path, url, options=fast_options(), isolation_level=None)
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (2)")
    conn.execute("COMMIT")
    sqlrepl.sync(db_path)
    conn.close()
    restore_fresh(url, tmp_path / "restored.db")
    assert_same_database(db_path, tmp_path / "restored.db")


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the autocommit attribute exists from Python 3.12")
def test_python312_autocommit_attribute(db_path: str, tmp_path: Path) -> None:
    """Python 3.12's autocommit=False mode passes through and replicates."""
    url = file_url(tmp_path / "r")
    with sqlrepl.connect(db_path, url, options=fast_options(), autocommit=False) as conn:
        assert conn.autocommit is False  # type: ignore[attr-defined]
        conn.execute("CREATE TABLE t(x)")
        conn.execute("INSERT INTO t VALUES (42)")
    sqlrepl.sync(db_path)
    restore_fresh(url, tmp_path / "restored.db")
    assert query(tmp_path / "restored.db", "SELECT x FROM t") == [(42,)]


def test_durability_replicated_waits_for_the_replica(db_path: str, tmp_path: Path) -> None:
    """With durability="replicated", commit() returns only once the commit is
    restorable, even with a long sync interval."""
    url = file_url(tmp_path / "r")
    # An hour's interval and a shorter replicated_timeout: a commit that
    # waited for the interval instead of asking would raise SyncTimeoutError.
    conn = sqlrepl.connect(
        db_path,
        url,
        durability="replicated",
        replicated_timeout=120,
        options=fast_options(sync_interval=3600),
    )
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    for i in range(3):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
        conn.commit()
        out = tmp_path / f"after-{i}.db"
        restore_fresh(url, out)
        assert query(out, "SELECT count(*) FROM t") == [(i + 1,)]
    conn.close()


def test_durability_replicated_with_a_failing_store(db_path: str, tmp_path: Path) -> None:
    """When the store fails, a replicated commit raises SyncTimeoutError after
    replicated_timeout; the transaction is committed locally all the same."""
    name = f"down-{os.getpid()}-{time.monotonic_ns()}"
    _replica_memory.fail_next(name, 100_000)
    conn = sqlrepl.connect(
        db_path, f"memory://{name}", durability="replicated", replicated_timeout=0.5, options=fast_options()
    )
    conn.execute("CREATE TABLE t(x)")
    with pytest.raises(sqlrepl.SyncTimeoutError, match="committed locally"):
        conn.commit()
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlrepl.SyncTimeoutError):
        conn.commit()
    assert query(db_path, "SELECT x FROM t") == [(1,)]
    conn.close()


def test_factory_must_subclass_connection(db_path: str, tmp_path: Path) -> None:
    """A factory that subclasses sqlrepl.Connection works; any other is refused."""

    class Mine(sqlrepl.Connection):
        pass

    conn = sqlrepl.connect(db_path, file_url(tmp_path / "r"), factory=Mine, options=fast_options())
    assert type(conn) is Mine
    conn.close()
    with pytest.raises(sqlrepl.ConfigError, match="factory"):
        sqlrepl.connect(db_path, file_url(tmp_path / "r"), factory=sqlite3.Connection)


def test_connect_without_replica_joins_the_running_replicator(db_path: str, tmp_path: Path) -> None:
    """A connection opened without a replica URL, once another connection
    started replication for the database, is replicated too."""
    url = file_url(tmp_path / "r")
    first = sqlrepl.connect(db_path, url, options=fast_options())
    first.execute("CREATE TABLE t(x)")
    first.commit()
    second = sqlrepl.connect(db_path)
    assert second.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    second.execute("INSERT INTO t VALUES ('second')")
    second.commit()
    sqlrepl.sync(db_path)
    restore_fresh(url, tmp_path / "restored.db")
    assert_same_database(db_path, tmp_path / "restored.db")
    first.close()
    second.close()


def test_sync_and_status_of_an_unreplicated_database(db_path: str) -> None:
    """Asking about a database nothing replicates is a clear error."""
    with pytest.raises(sqlrepl.ConfigError, match="not replicated"):
        sqlrepl.sync(db_path)
    with pytest.raises(sqlrepl.ConfigError, match="not replicated"):
        sqlrepl.status(db_path)


def test_status_counts_requests(db_path: str, tmp_path: Path) -> None:
    """status() reports the generation, txid and each replica's requests."""
    url = file_url(tmp_path / "r")
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    sqlrepl.sync(db_path)
    st = sqlrepl.status(db_path)
    assert st.role == "replicating"
    assert st.generation is not None
    assert st.replicas[0].url == url
    assert st.replicas[0].txid == st.txid
    assert st.replicas[0].requests["PUT"] >= 1
    assert st.replicas[0].requests["bytes_up"] > 0
    conn.close()


@pytest.mark.anyio
async def test_async_face(db_path: str, tmp_path: Path) -> None:
    """From async code: sync_async waits without blocking the event loop (a
    store failing its first requests makes the wait last), and restore_async
    restores."""
    import anyio

    name = f"slow-{os.getpid()}-{time.monotonic_ns()}"
    url = f"memory://{name}"
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    sqlrepl.sync(db_path)
    _replica_memory.fail_next(name, 3)  # retried with backoff: 0.25 s, 0.5 s, 1 s
    conn.execute("INSERT INTO t VALUES ('async')")
    conn.commit()
    # How many failures the store still had to give, seen at each tick of
    # the event loop while sync_async waited.
    seen: set[int] = set()

    async def ticker() -> None:
        while True:
            await anyio.sleep(0.01)
            seen.add(len(_replica_memory._failures.get(name, ())))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await sqlrepl.sync_async(db_path, timeout=120)
        tg.cancel_scope.cancel()
    assert not _replica_memory._failures.get(name)  # the wait outlasted every failure
    assert {2, 1} <= seen  # the loop ran on through the backoff after each failure
    result = await sqlrepl.restore_async(tmp_path / "restored.db", url)
    assert result is not None
    assert query(tmp_path / "restored.db", "SELECT x FROM t") == [("async",)]
    conn.close()
