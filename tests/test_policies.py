"""Snapshots, retention and the bounds on local staging."""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import pytest
from helpers import FakeClock, assert_same_database, fast_options, file_url, restore_fresh, wait_for

import sqlrepl
from sqlrepl import _format, _replica_memory


def _keys(folder: Path) -> list[_format.SnapshotKey | _format.SegmentKey]:
    out = []
    for path in folder.rglob("*"):
        parsed = _format.parse_key(path.relative_to(folder).as_posix())
        if parsed is not None:
            out.append(parsed)
    return out


def _staged_bytes(db: str) -> int:
    root = Path(db + "-sqlrepl") / "objects"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_snapshots_when_segments_outweigh_the_last_one(db_path: str, tmp_path: Path) -> None:
    """Once the segments since the last snapshot outweigh it, a new snapshot
    is taken, and a restore starts from it (reading few objects)."""
    url = file_url(tmp_path / "replica")
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    for _ in range(60):  # ~3 MiB of incompressible pages, over many segments
        conn.execute("INSERT OR REPLACE INTO t VALUES (abs(random()) % 200, randomblob(50000))")
        conn.commit()
        time.sleep(0.01)
    sqlrepl.sync(db_path)
    conn.close()
    snapshots = [k for k in _keys(tmp_path / "replica") if isinstance(k, _format.SnapshotKey)]
    assert len(snapshots) >= 2
    result = restore_fresh(url, tmp_path / "restored.db")
    segments_after = [
        k
        for k in _keys(tmp_path / "replica")
        if isinstance(k, _format.SegmentKey) and k.first_txid > max(s.txid for s in snapshots)
    ]
    assert result.objects == 1 + len(segments_after)
    assert_same_database(db_path, tmp_path / "restored.db")


@pytest.mark.slow
def test_retention_removes_old_history(db_path: str, tmp_path: Path) -> None:
    """With a short retention, snapshots and segments older than the newest
    snapshot before the horizon disappear; the newest state still restores,
    and a point before the horizon is refused."""
    url = file_url(tmp_path / "replica")
    # The replicator's clock moves only when told: the history's age does
    # not depend on how fast this machine commits.
    clock = FakeClock()
    opts = fast_options(retention=1.5, retention_check_interval=0.3, snapshot_interval=0.5, clock=clock)
    conn = sqlrepl.connect(db_path, url, options=opts)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    sqlrepl.sync(db_path)
    first_txid = sqlrepl.status(db_path).txid
    for _ in range(9):  # 4.5 s of history, in steps of the snapshot interval
        clock.advance(0.5)
        for _ in range(10):
            conn.execute("INSERT INTO t(v) VALUES (randomblob(300))")
            conn.commit()
        sqlrepl.sync(db_path)

    def first_snapshot_gone() -> bool:
        keys = _keys(tmp_path / "replica")
        return not any(isinstance(k, _format.SnapshotKey) and k.txid == first_txid for k in keys)

    wait_for("retention to remove the first snapshot", first_snapshot_gone)
    conn.close()
    keys = _keys(tmp_path / "replica")
    oldest_snapshot = min(k.txid for k in keys if isinstance(k, _format.SnapshotKey))
    assert all(k.last_txid > oldest_snapshot for k in keys if isinstance(k, _format.SegmentKey))
    restore_fresh(url, tmp_path / "latest.db")
    assert_same_database(db_path, tmp_path / "latest.db")
    with pytest.raises(sqlrepl.PointInTimeError):
        sqlrepl.restore(str(tmp_path / "old.db"), url, txid=first_txid)


@pytest.mark.slow
def test_staging_hard_limit_drops_a_failing_replicas_queue(
    db_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica that keeps failing while staging passes its hard limit loses
    its queue (with an error), not the data: the healthy replica keeps every
    segment, staging shrinks back, and once the failing store recovers it gets
    a fresh snapshot and is complete again."""
    name = f"flaky-{os.getpid()}-{time.monotonic_ns()}"
    good = file_url(tmp_path / "good")
    opts = fast_options(staging_soft_limit=200_000, staging_hard_limit=600_000, snapshot_interval=3600)
    conn = sqlrepl.connect(db_path, [good, f"memory://{name}"], options=opts)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    sqlrepl.sync(db_path)  # both replicas have the generation's base
    _replica_memory.fail_next(name, 1_000_000)
    for _ in range(40):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(30000))")
        conn.commit()
        time.sleep(0.02)
    wait_for("the hard limit to be reached", lambda: "hard limit" in caplog.text)
    assert any(r.levelno == logging.WARNING and "soft limit" in r.getMessage() for r in caplog.records)
    assert caplog.text.count("hard limit") == 1  # said once, not at every capture
    # The healthy replica is complete, and staging holds no queue: at most the
    # fresh snapshot the failing replica will need, plus the latest segment.

    def drained() -> bool:
        st = sqlrepl.status(db_path)
        return st.staged_objects <= 2 and st.replicas[0].txid == st.txid

    wait_for("the healthy replica complete and staging drained", drained)
    _replica_memory._failures[name].clear()
    sqlrepl.sync(db_path, timeout=30)
    conn.close()
    for url in (good, f"memory://{name}"):
        out = tmp_path / f"restored-{url[:4]}.db"
        restore_fresh(url, out)
        assert_same_database(db_path, out)
    # The folder replica kept its whole history: one unbroken chain.
    keys = _keys(tmp_path / "good")
    segments = sorted(k for k in keys if isinstance(k, _format.SegmentKey))
    assert all(b.first_txid == a.last_txid + 1 for a, b in itertools.pairwise(segments))


@pytest.mark.slow
def test_compaction_merges_small_segments(db_path: str, tmp_path: Path) -> None:
    """Small segments are merged into a few larger ones, uploaded beside them;
    the small ones are then deleted, and a restore reads few objects, through
    a VACUUM in the middle, with every checksum verified."""
    url = file_url(tmp_path / "replica")
    # Compaction windows follow the replicator's clock, moved here every 30
    # commits: six windows however fast this machine commits.
    clock = FakeClock()
    opts = fast_options(
        compaction_interval=0.6, segment_retention=0.0, retention_check_interval=0.3, clock=clock
    )
    conn = sqlrepl.connect(db_path, url, options=opts)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    for i in range(150):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(2000))")
        conn.commit()
        if i == 70:
            conn.execute("DELETE FROM t WHERE id % 2 = 0")
            conn.commit()
            conn.execute("VACUUM")
        if i % 30 == 29:
            sqlrepl.sync(db_path)
            clock.advance(0.6)
        time.sleep(0.02)  # pacing: many small uploads to merge
    sqlrepl.sync(db_path)
    clock.advance(0.6)  # the last window is due too
    txid = sqlrepl.status(db_path).txid
    captures = sqlrepl.status(db_path).replicas[0].requests["PUT"]

    def segments() -> list[_format.SegmentKey]:
        return sorted(k for k in _keys(tmp_path / "replica") if isinstance(k, _format.SegmentKey))

    def covered(segs: list[_format.SegmentKey]) -> bool:
        return any(a.last_txid >= b.first_txid for a, b in itertools.pairwise(segs))

    window = Path(db_path + "-sqlrepl") / "window"

    def merged() -> list[_format.SegmentKey] | None:
        # Every window merged, the merged segments uploaded, and the small
        # ones they cover deleted.
        if any(p.is_file() for p in window.rglob("*")) or sqlrepl.status(db_path).staged_objects:
            return None
        segs = segments()
        return segs if segs and segs[-1].last_txid == txid and not covered(segs) else None

    segs = wait_for("every window merged", merged)
    assert len(segs) <= captures // 4, (captures, segs)
    conn.close()
    # Still one unbroken chain from the snapshot to the last txid.
    snapshot = min(k.txid for k in _keys(tmp_path / "replica") if isinstance(k, _format.SnapshotKey))
    assert segs[0].first_txid == snapshot + 1
    assert all(b.first_txid == a.last_txid + 1 for a, b in itertools.pairwise(segs))
    assert max(k.last_txid - k.first_txid for k in segs) >= 10  # merged ones
    result = restore_fresh(url, tmp_path / "restored.db")
    assert result.txid == txid
    assert result.objects == 1 + len(segs)
    assert_same_database(db_path, tmp_path / "restored.db")
    # A point inside a merged range restores to the range's start: the
    # resolution the merged segments keep.
    wide = max(segs, key=lambda k: k.last_txid - k.first_txid)
    older = sqlrepl.restore(str(tmp_path / "older.db"), url, txid=(wide.first_txid + wide.last_txid) // 2)
    assert older is not None
    assert older.txid == wide.first_txid - 1
