"""The replica watch: a replica emptied behind sqlrepl's back is noticed and
re-seeded, and two writers on one replica notice each other and keep each
other's history (file and S3 replicas)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import assert_same_database, dump, fast_options

import sqlrepl
from sqlrepl._format import GENERATIONS, WRITERS, parse_writer_key
from sqlrepl._replica import ObjectInfo, open_replica
from sqlrepl._watch import judge

DEADLINE = 90.0


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty replica: a folder, or a prefix in a bucket of the real S3 server."""
    if request.param == "file":
        return (tmp_path / "replica").as_uri()
    return str(request.getfixturevalue("s3_url"))


def _listing(url: str, prefix: str = "") -> list[ObjectInfo]:
    """Every object of the replica under ``prefix``, through a client of its own."""

    async def run() -> list[ObjectInfo]:
        client = open_replica(url)
        try:
            return await client.list(prefix)
        finally:
            await client.aclose()

    return asyncio.run(run())


def _wipe(url: str) -> int:
    """Delete every object under the replica's prefix, as an operator or a
    lifecycle rule would; return how many there were."""

    async def run() -> int:
        client = open_replica(url)
        try:
            keys = [o.key for o in await client.list()]
            await client.delete(keys)
            return len(keys)
        finally:
            await client.aclose()

    return asyncio.run(run())


def _wait_until(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE}s waiting for {what}")
        time.sleep(0.02)


def _insert(conn: sqlite3.Connection, n: int, tag: str) -> None:
    for i in range(n):
        conn.execute("INSERT INTO t(v) VALUES (?)", (f"{tag}-{i}",))
        conn.commit()


def _restores_to(url: str, live: str, dest: Path, **kwargs: object) -> bool:
    """Whether ``url`` restores (into the fresh path ``dest``) to what ``live`` holds."""
    if dest.exists():
        dest.unlink()
    try:
        result = sqlrepl.restore(str(dest), url, **kwargs)  # type: ignore[arg-type]
    except sqlrepl.RestoreError:
        return False
    return result is not None and dump(dest) == dump(live)


def test_judge_tells_wipes_and_live_writers_from_dead_ones() -> None:
    """judge: our record gone is a wipe; another writer's record newer than our
    'since' (or in our generation) is a live writer; an older one is not."""
    k = parse_writer_key
    ga, gb, g0 = "20261130T100000000Z-aaaaaa", "20261130T110000000Z-bbbbbb", "20261130T090000000Z-000000"
    me, other = "1" * 16, "2" * 16
    mine = k(f"{WRITERS}{gb}/{me}-2000-3000.json")
    dead = k(f"{WRITERS}{g0}/{other}-100-1999.json")
    live = k(f"{WRITERS}{ga}/{other}-1000-3001.json")
    twin = k(f"{WRITERS}{gb}/{other}-500-500.json")
    assert mine is not None
    assert dead is not None
    assert live is not None
    assert twin is not None
    ok = judge([mine, dead], writer=me, generation=gb, known=mine)
    assert (ok.wiped, ok.ours, ok.foreign) == (False, mine, ())
    gone = judge([dead], writer=me, generation=gb, known=mine)
    assert (gone.wiped, gone.foreign) == (True, ())
    assert judge([mine, dead, live], writer=me, generation=gb, known=mine).foreign == (live,)
    assert judge([mine, twin], writer=me, generation=gb, known=mine).foreign == (twin,)
    idle = judge([dead, live], writer=me, generation=None, known=None)
    assert (idle.wiped, idle.ours, idle.foreign) == (False, None, ())


def test_emptied_replica_is_noticed_and_reseeded(
    url: str, db_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica emptied behind sqlrepl's back: the check notices it, logs an
    error, shows it in status(), and re-seeds it, after which a returning
    sync() means the replica restores to the live database."""
    conn = sqlrepl.connect(db_path, url, options=fast_options(replica_check_interval=0.2))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    _insert(conn, 30, "before")
    sqlrepl.sync(db_path, timeout=60)
    assert sqlrepl.status(db_path).replicas[0].wipes == 0
    assert _restores_to(url, db_path, tmp_path / "first.db")
    assert _wipe(url) > 0

    # Until the check notices, sync() returns over an empty replica; from then
    # on it waits for the fresh snapshot, so the replica restores again.
    attempt = 0

    def restores() -> bool:
        nonlocal attempt
        attempt += 1
        _insert(conn, 1, f"after-{attempt}")
        sqlrepl.sync(db_path, timeout=60)
        return _restores_to(url, db_path, tmp_path / "restored.db")

    _wait_until("the emptied replica to restore to the live database again", restores)
    status = sqlrepl.status(db_path).replicas[0]
    assert status.wipes >= 1
    assert status.checked_at is not None
    assert status.foreign_writers == ()
    assert any(r.levelno == logging.ERROR and "emptied" in r.getMessage() for r in caplog.records)
    _insert(conn, 10, "last")
    sqlrepl.sync(db_path, timeout=60)
    conn.close()
    restored = tmp_path / "last.db"
    assert sqlrepl.restore(str(restored), url) is not None
    assert_same_database(db_path, restored)


def test_two_writers_notice_each_other_and_spare_each_others_history(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two databases written to one replica URL: each replicator reports the
    other writer (error log, status), and the newer one's retention keeps the
    older one's generation, which still restores."""
    db_a, db_b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    conn_a = sqlrepl.connect(db_a, url, options=fast_options(replica_check_interval=0.2))
    conn_a.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    _insert(conn_a, 20, "a")
    sqlrepl.sync(db_a, timeout=60)
    gen_a = sqlrepl.status(db_a).generation
    assert gen_a is not None
    # B deletes generations that went quiet 8 s ago: A's, unless it is spared.
    opts_b = fast_options(replica_check_interval=0.2, retention=8.0, retention_check_interval=0.2)
    conn_b = sqlrepl.connect(db_b, url, options=opts_b)
    conn_b.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    _insert(conn_b, 30, "b")
    sqlrepl.sync(db_b, timeout=60)

    def a_present() -> bool:
        return any(o.key.endswith(".snapshot") for o in _listing(url, f"{GENERATIONS}{gen_a}/"))

    def spared() -> int:
        return sum("spares generation" in r.getMessage() and gen_a in r.getMessage() for r in caplog.records)

    _wait_until("B's retention to pass over A's quiet generation", lambda: spared() > 0 or not a_present())
    assert a_present(), "the other writer's retention deleted this writer's history"

    def foreign(db: str) -> tuple[str, ...]:
        return sqlrepl.status(db).replicas[0].foreign_writers

    _wait_until("both writers to notice each other", lambda: bool(foreign(db_a) and foreign(db_b)))
    gen_b = sqlrepl.status(db_b).generation
    assert gen_b is not None
    assert gen_b > gen_a
    assert gen_b in foreign(db_a)[0]
    assert gen_a in foreign(db_b)[0]
    assert socket.gethostname() in foreign(db_a)[0]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sum("also written by another writer" in m for m in errors) >= 2

    seen = spared()
    _wait_until("another retention pass of B after the detection", lambda: spared() > seen)
    assert a_present()
    assert _restores_to(url, db_a, tmp_path / "restored-a.db", generation=gen_a)
    assert _restores_to(url, db_b, tmp_path / "restored-b.db")  # the newest: only B's history
    conn_a.close()
    conn_b.close()


def _write_and_retire(db: str, url: str, tmp_path: Path) -> str:
    """A first machine: write ``db`` to ``url``, stop, and lose the database
    and its staging directory. Returns its generation."""
    conn = sqlrepl.connect(db, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    _insert(conn, 20, "old")
    sqlrepl.sync(db, timeout=60)
    generation = sqlrepl.status(db).generation
    assert generation is not None
    conn.close()
    sqlrepl.stop_all()
    for path in tmp_path.glob(Path(db).name + "*"):  # the database, its WAL, its staging
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return generation


def _checks(db: str) -> Callable[[], int]:
    """A counter of the completed checks of ``db``'s replica seen so far
    (each poll that finds a new ``checked_at`` counts one)."""
    seen: list[float] = []

    def count() -> int:
        at = sqlrepl.status(db).replicas[0].checked_at
        if at is not None and (not seen or at != seen[-1]):
            seen.append(at)
        return len(seen)

    return count


def test_disaster_recovery_raises_no_alarm_and_retires_the_dead_generation(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented recovery (lose the machine, restore elsewhere, write):
    the dead machine's records are not taken for a live writer, and once the
    grace period is over retention deletes its generation."""
    db = str(tmp_path / "app.db")
    dead = _write_and_retire(db, url, tmp_path)
    assert sqlrepl.restore(db, url) is not None
    opts = fast_options(replica_check_interval=0.2, retention=0.5, retention_check_interval=0.2)
    conn = sqlrepl.connect(db, url, options=opts)
    _insert(conn, 10, "new")
    sqlrepl.sync(db, timeout=60)
    assert sqlrepl.status(db).generation != dead
    checks = _checks(db)
    _wait_until("several checks", lambda: checks() >= 5)

    def dead_present() -> bool:
        return bool(_listing(url, f"{GENERATIONS}{dead}/"))

    _wait_until("retention to delete the dead machine's generation", lambda: not dead_present())
    assert not _listing(url, f"{WRITERS}{dead}/")  # its records went with it
    assert sqlrepl.status(db).replicas[0].foreign_writers == ()
    alarms = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [m for m in alarms if "another writer" in m or "emptied" in m]
    _insert(conn, 5, "last")
    sqlrepl.sync(db, timeout=60)
    conn.close()
    assert _restores_to(url, db, tmp_path / "restored.db")


def test_two_machines_restored_from_one_replica_notice_each_other(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two machines restore the same replica and both write: each reports the
    other (and not the dead machine they restored from), and neither's
    retention deletes the other's generation."""
    dead = _write_and_retire(str(tmp_path / "app.db"), url, tmp_path)
    # Generations quiet for 8 s are past retention: time enough to notice first.
    opts = fast_options(replica_check_interval=0.2, retention=8.0, retention_check_interval=0.2)
    dbs = [str(tmp_path / "one.db"), str(tmp_path / "two.db")]
    for db in dbs:
        assert sqlrepl.restore(db, url) is not None
    conns = []
    for db in dbs:
        conns.append(sqlrepl.connect(db, url, options=opts))
        _insert(conns[-1], 10, db)
        sqlrepl.sync(db, timeout=60)
    gens = [sqlrepl.status(db).generation for db in dbs]

    def foreign(db: str) -> tuple[str, ...]:
        return sqlrepl.status(db).replicas[0].foreign_writers

    _wait_until("both machines to notice each other", lambda: all(foreign(db) for db in dbs))
    assert gens[1] in foreign(dbs[0])[0]
    assert gens[0] in foreign(dbs[1])[0]
    assert not any(dead in f for db in dbs for f in foreign(db))

    def spared() -> bool:
        return any(
            "spares generation" in r.getMessage() and str(gens[0]) in r.getMessage() for r in caplog.records
        )

    _wait_until("the second machine's retention to pass over the first one's generation", spared)
    for db, conn in zip(dbs, conns, strict=True):
        _insert(conn, 3, "last")
        sqlrepl.sync(db, timeout=60)
        conn.close()
    assert _restores_to(url, dbs[0], tmp_path / "restored-one.db", generation=gens[0])
    assert _restores_to(url, dbs[1], tmp_path / "restored-two.db")


def test_replica_emptied_while_stopped_is_reseeded_at_start(
    url: str, db_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica emptied while no replicator ran: the next start notices it
    (an error, counted in status()) and re-seeds it before sync() returns."""
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    _insert(conn, 20, "before")
    sqlrepl.sync(db_path, timeout=60)
    conn.close()
    sqlrepl.stop_all()
    assert _wipe(url) > 0
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    _insert(conn, 5, "after")
    sqlrepl.sync(db_path, timeout=60)
    assert sqlrepl.status(db_path).replicas[0].wipes == 1
    assert any(r.levelno == logging.ERROR and "no longer holds" in r.getMessage() for r in caplog.records)
    conn.close()
    assert _restores_to(url, db_path, tmp_path / "restored.db")


def test_check_interval_must_be_positive() -> None:
    """A check interval of zero or less is refused, naming the option."""
    with pytest.raises(sqlrepl.ConfigError, match="replica_check_interval"):
        sqlrepl.Options(replica_check_interval=0)


def test_check_interval_must_not_be_nan() -> None:
    """A NaN check interval (which made every uploader spin: no wait ever
    lasted) is refused, naming the option."""
    with pytest.raises(sqlrepl.ConfigError, match="replica_check_interval"):
        sqlrepl.Options(replica_check_interval=float("nan"))
