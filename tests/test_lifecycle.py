"""The replica's lifecycle: compaction, retention and snapshots over time
keep every acknowledged commit restorable; txids grow across generations;
restores fall back to an older generation only when asked, and survive
objects deleted under them."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from helpers import FakeClock, fast_options, file_url, make_db, restore_fresh

import sqlrepl
from sqlrepl import _format, _lifecycle
from sqlrepl._replica import ObjectInfo, ReplicaClient, open_replica
from sqlrepl._replicator import Replicator
from sqlrepl._restore import list_generations, plan_restore


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def lifecycle_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh replica: a folder, or a bucket prefix on the real S3 server."""
    if request.param == "file":
        return file_url(tmp_path / "replica")
    return str(request.getfixturevalue("s3_url"))


def _count(path: str | os.PathLike[str]) -> int:
    conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


def _ids(path: str | os.PathLike[str]) -> list[int]:
    conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)
    try:
        return [int(r[0]) for r in conn.execute("SELECT id FROM t")] or [0]
    finally:
        conn.close()


def _listing(url: str) -> list[_lifecycle.Generation]:
    async def go() -> list[_lifecycle.Generation]:
        client = open_replica(url)
        try:
            return await list_generations(client)
        finally:
            await client.aclose()

    return anyio.run(go)


class _Writer:
    """A database written through a plain connection, replicated by a
    Replicator whose wall clock the test moves."""

    def __init__(self, db: str, url: str, clock: FakeClock, **options: object) -> None:
        self.db, self.url, self.clock = db, url, clock
        self.options = fast_options(clock=clock, **options)
        if not os.path.exists(db):
            make_db(db)
        self.conn = sqlite3.connect(db)
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self.rep = Replicator(db, [url], self.options)
        self.rep.start()

    def insert(self, n: int = 1) -> None:
        for _ in range(n):
            self.conn.execute("INSERT INTO t(v) VALUES (randomblob(100))")
            self.conn.commit()

    def rows(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM t").fetchone()[0])

    def settle(self) -> int:
        """Run what is due by the clock, wait for the replica; the txid."""
        self.rep._maintain_now()
        self.rep.sync(timeout=60)
        return self.rep.status.txid

    def restart(self) -> None:
        self.rep.stop(flush=False)
        self.rep = Replicator(self.db, [self.url], self.options)
        self.rep.start()

    def close(self) -> None:
        self.rep.stop(flush=False)
        self.conn.close()


@pytest.fixture
def writers() -> Iterator[list[_Writer]]:
    made: list[_Writer] = []
    yield made
    for w in made:
        w.close()


# -- finding 1: compaction plus segment retention ----------------------------------


def test_compaction_and_segment_retention_keep_every_point_restorable(
    lifecycle_url: str, db_path: str, tmp_path: Path, writers: list[_Writer]
) -> None:
    """Over 130 s of a moved clock with snapshots every 20 s, compaction every
    9 s, segment retention 4 s and retention 20 s, "latest" restores exactly
    after every step and a point 10 s back every few (they broke for good
    once a merged segment spanned the snapshot retention kept as its base)."""
    clock = FakeClock()
    w = _Writer(
        db_path,
        lifecycle_url,
        clock,
        compaction_interval=9,  # windows of 9-10 steps: snapshots every 20 land inside most
        segment_retention=4,
        retention=20,
        retention_check_interval=3600,
        snapshot_interval=20,
    )
    writers.append(w)
    history: dict[int, int] = {w.settle(): 0}
    by_step: list[int] = []
    for step in range(130):
        w.insert(3)
        clock.advance(1.0)
        txid = w.settle()
        history[txid] = w.rows()
        by_step.append(txid)
        latest = restore_fresh(lifecycle_url, tmp_path / "latest.db")
        assert (latest.txid, _count(latest.path)) == (txid, w.rows()), step
        os.unlink(latest.path)
        if step % 5 != 4:
            continue
        target = by_step[step - 10] if step >= 10 else by_step[0]
        point = restore_fresh(lifecycle_url, tmp_path / f"point-{step}.db", txid=target)
        assert point.txid <= target
        assert _count(point.path) == history[point.txid]
    gens = _listing(lifecycle_url)
    (gen,) = gens
    merged = [k for k, _ in gen.segments if k.last_txid - k.first_txid >= 3]
    assert merged, "compaction never ran"
    snaps = [k.txid for k, _ in gen.snapshots]
    assert len(snaps) >= 2  # the retention horizon moved past a periodic snapshot
    assert not [(m, t) for m in merged for t in snaps if m.first_txid <= t < m.last_txid]


def test_compaction_runs_are_cut_at_snapshots() -> None:
    """A compaction window is split after every segment ending at (or
    holding) a snapshot's txid, and where the chain breaks."""
    window = [(1, 2), (3, 5), (6, 6), (7, 9), (10, 12), (14, 15), (16, 20)]
    assert _lifecycle.compaction_runs(window, [5, 12, 100]) == [[0, 1], [2, 3, 4], [5, 6]]
    assert _lifecycle.compaction_runs(window, [0]) == [[0, 1, 2, 3, 4], [5, 6]]
    assert _lifecycle.compaction_runs([], [3]) == []


G = "20260101T000000000Z-aaaaaa"
G2 = "20260102T000000000Z-bbbbbb"


def _snap(txid: int, ts: int, gen: str = G) -> ObjectInfo:
    return ObjectInfo(_format.snapshot_key(gen, txid, ts), 10)


def _seg(first: int, last: int, ts: int, gen: str = G) -> ObjectInfo:
    return ObjectInfo(_format.segment_key(gen, first, last, ts), 10)


def test_retention_keeps_the_chain_a_snapshot_needs() -> None:
    """A merged segment spanning a snapshot (as compaction made them before
    it was cut at snapshots) does not let retention delete the small
    segments that continue the snapshot's chain."""
    listing = [
        _snap(1, 0),
        *[_seg(t, t, 1000 * t) for t in range(2, 11)],
        _seg(2, 7, 7000),  # spans the snapshot at 5
        _seg(8, 10, 10000),
        _snap(5, 5000),
    ]
    gens = _lifecycle.group_generations(listing)
    plan = _lifecycle.plan_retention(
        gens, current=G, now_ms=100_000, retention_ms=94_000, segment_retention_ms=0
    )
    assert plan.problem is None
    kept = [o for o in listing if o.key not in plan.delete]
    assert _snap(1, 0).key in plan.delete  # the base is the snapshot at 5
    latest = plan_restore(_lifecycle.group_generations(kept))
    assert (latest.snapshot[0].txid, latest.txid) == (5, 10)
    assert [k.first_txid for k, _ in latest.segments] == [6, 7, 8]


def test_retention_deletes_nothing_of_a_broken_generation() -> None:
    """When no snapshot of the current generation reaches its last txid,
    retention deletes nothing (older generations may be all that restores)
    and says why."""
    listing = [_snap(1, 0, G), _seg(2, 3, 10, G), _snap(4, 20, G2), _seg(6, 7, 30, G2)]
    gens = _lifecycle.group_generations(listing)
    plan = _lifecycle.plan_retention(gens, current=G2, now_ms=10_000, retention_ms=1, segment_retention_ms=1)
    assert plan.delete == []
    assert plan.problem is not None
    assert G2 in plan.problem


def test_retention_keeps_an_older_generation_until_the_next_covers_the_window() -> None:
    """An older generation goes only once the next one has a snapshot at or
    before the horizon: until then a point in the window restores from it."""
    listing = [_snap(1, 0, G), _seg(2, 3, 10, G), _snap(4, 5000, G2), _seg(5, 6, 6000, G2)]
    gens = _lifecycle.group_generations(listing)
    early = _lifecycle.plan_retention(
        gens, current=G2, now_ms=7000, retention_ms=3000, segment_retention_ms=None
    )
    assert early.delete == []
    late = _lifecycle.plan_retention(
        gens, current=G2, now_ms=9000, retention_ms=3000, segment_retention_ms=None
    )
    assert sorted(late.delete) == sorted([_snap(1, 0, G).key, _seg(2, 3, 10, G).key])


# -- finding 2: txids grow across generations -------------------------------------


def _write(db: str, url: str, n: int, first: int) -> int:
    """Insert rows ``first..first+n-1`` one commit each, sync; the txid."""
    conn = sqlrepl.connect(db, url, options=fast_options())
    conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    sqlrepl.sync(db, timeout=60)  # the generation's snapshot first: the rows go to segments
    for i in range(first, first + n):
        conn.execute("INSERT INTO t(id, v) VALUES (?, randomblob(100))", (i,))
        conn.commit()
    sqlrepl.sync(db, timeout=60)
    txid = sqlrepl.status(db).txid
    conn.close()
    sqlrepl.stop_all()
    return txid


def _lose(db: str) -> None:
    """The machine is gone: the database, its WAL and its staging folder."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    shutil.rmtree(db + "-sqlrepl")


def test_txids_continue_after_the_disaster_recovery_flow(lifecycle_url: str, tmp_path: Path) -> None:
    """Write 30, lose database and staging, restore, connect, write 30 more:
    the new generation continues after the old txids, so every txid of the
    first history still restores its state (``txid=16`` returned the new
    generation's)."""
    db = str(tmp_path / "app.db")
    first_last = _write(db, lifecycle_url, 30, 1)
    (old,) = _listing(lifecycle_url)
    assert old.segments
    _lose(db)
    sqlrepl.restore(db, lifecycle_url)
    last = _write(db, lifecycle_url, 30, 31)
    gens = _listing(lifecycle_url)
    assert len(gens) == 2
    assert min(k.txid for k, _ in gens[1].snapshots) == first_last + 1
    assert last > first_last + 1
    # Every txid of the first history still restores from it, as it was.
    for k, _ in old.segments:
        again = restore_fresh(lifecycle_url, tmp_path / f"again-{k.last_txid}.db", txid=k.last_txid)
        assert (again.generation, again.txid) == (old.id, k.last_txid)
        assert _count(again.path) == max(_ids(again.path))
    again = restore_fresh(lifecycle_url, tmp_path / "again.db", txid=first_last)
    assert (again.generation, _count(again.path)) == (old.id, 30)
    latest = restore_fresh(lifecycle_url, tmp_path / "latest.db")
    assert (latest.txid, _count(latest.path)) == (last, 60)


def test_a_fresh_database_continues_the_replicas_txids(lifecycle_url: str, tmp_path: Path) -> None:
    """A new database (no restore, no staging) replicated to a replica with
    history starts its generation after the replica's highest txid."""
    db = str(tmp_path / "app.db")
    first_last = _write(db, lifecycle_url, 10, 1)
    _lose(db)
    _write(db, lifecycle_url, 5, 1)
    gens = _listing(lifecycle_url)
    assert len(gens) == 2
    assert min(k.txid for k, _ in gens[1].snapshots) == first_last + 1


# -- finding 3: a newer generation that cannot be restored ------------------------


def test_an_unrestorable_newer_generation_is_an_error_unless_asked(
    lifecycle_url: str, tmp_path: Path
) -> None:
    """With the newest generation's snapshot deleted, restoring latest names
    that generation and fails; ``fallback=True`` (and ``--fallback``)
    restores the older generation, with a warning."""
    db = str(tmp_path / "app.db")
    _write(db, lifecycle_url, 30, 1)
    _lose(db)
    sqlrepl.restore(db, lifecycle_url)
    _write(db, lifecycle_url, 30, 31)
    old, new = _listing(lifecycle_url)

    async def drop_snapshots() -> None:
        client = open_replica(lifecycle_url)
        try:
            await client.delete([k.key for k, _ in new.snapshots])
        finally:
            await client.aclose()

    anyio.run(drop_snapshots)
    with pytest.raises(sqlrepl.GenerationUnrestorableError, match=new.id) as info:
        sqlrepl.restore(str(tmp_path / "latest.db"), lifecycle_url)
    assert "fallback=True" in str(info.value)
    assert not (tmp_path / "latest.db").exists()
    result = restore_fresh(lifecycle_url, tmp_path / "older.db", fallback=True)
    assert (result.generation, _count(result.path)) == (old.id, 30)
    cli = subprocess.run(
        [sys.executable, "-m", "sqlrepl", "restore", str(tmp_path / "cli.db"), lifecycle_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode != 0
    assert new.id in cli.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "sqlrepl", "restore", "--fallback", str(tmp_path / "cli.db"), lifecycle_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert _count(tmp_path / "cli.db") == 30


# -- finding 4: objects deleted under a running restore ---------------------------


class _Racing:
    """A replica client whose first listing predates the writer's last
    compaction (it hides the merged segments), and whose first GET of a
    small segment meets the retention that then deleted the small ones."""

    def __init__(self, inner: ReplicaClient, merged: set[str], covered: set[str]) -> None:
        self.inner, self.merged, self.covered = inner, merged, covered
        self.lists = 0
        self.deleted = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        self.lists += 1
        got = await self.inner.list(prefix)
        return [o for o in got if o.key not in self.merged] if self.lists == 1 else got

    async def get(self, key: str) -> bytes:
        if key in self.covered and not self.deleted:
            self.deleted = True
            await self.inner.delete(sorted(self.covered))
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        return await self.inner.get_range(key, start, length)


def test_a_restore_plans_again_when_objects_go_away_under_it(
    db_path: str, tmp_path: Path, writers: list[_Writer]
) -> None:
    """A restore whose segments were deleted between its LIST and its GETs
    (compaction, then retention, by the running writer) lists again and
    restores the same state from the merged segment."""
    url = file_url(tmp_path / "replica")
    clock = FakeClock()
    w = _Writer(db_path, url, clock, compaction_interval=5, segment_retention=None)
    writers.append(w)
    w.settle()
    for _ in range(8):
        w.insert(2)
        clock.advance(1.0)
        txid = w.settle()
    (gen,) = _listing(url)
    merged = {
        k
        for k, _ in gen.segments
        if any(
            k != m and k.first_txid <= m.first_txid and m.last_txid <= k.last_txid for m, _ in gen.segments
        )
    }
    assert merged, "compaction never ran"
    covered = {
        m.key
        for m, _ in gen.segments
        for k in merged
        if m != k and k.first_txid <= m.first_txid and m.last_txid <= k.last_txid
    }
    client = _Racing(open_replica(url), {k.key for k in merged}, covered)

    async def go() -> sqlrepl.RestoreResult | None:
        try:
            return await sqlrepl.restore_async(str(tmp_path / "restored.db"), client)  # type: ignore[arg-type]
        finally:
            await client.inner.aclose()

    result = anyio.run(go)
    assert result is not None
    assert client.deleted
    assert client.lists == 2
    assert (result.txid, _count(result.path)) == (txid, w.rows())
