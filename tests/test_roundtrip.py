"""Replicate, restore elsewhere, compare: on every replica kind."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    assert_same_database,
    dump,
    fast_options,
    file_url,
    make_db,
    query,
    restore_fresh,
    run_python,
)

import sqlrepl


def test_small_transactions_from_several_threads(replica_url: str, db_path: str, tmp_path: Path) -> None:
    """Many small commits from four threads, each with its own connection."""
    opts = fast_options()
    with sqlrepl.connect(db_path, replica_url, options=opts) as conn:
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, thread INT, n INT, v TEXT)")

    def work(k: int) -> None:
        conn = sqlrepl.connect(db_path, replica_url, options=opts, timeout=30)
        try:
            for n in range(150):
                conn.execute(
                    "INSERT INTO t(thread, n, v) VALUES (?, ?, ?)", (k, n, "x" * random.randint(1, 400))
                )
                conn.commit()
                if n % 37 == 0:
                    conn.execute("UPDATE t SET v = v || 'u' WHERE thread = ? AND n < ?", (k, n))
                    conn.commit()
        finally:
            conn.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sqlrepl.sync(db_path, timeout=30)
    restored = tmp_path / "restored.db"
    result = restore_fresh(replica_url, restored)
    assert_same_database(db_path, restored)
    assert result.txid == sqlrepl.status(db_path).txid
    assert query(restored, "SELECT count(*) FROM t") == [(600,)]


def test_large_transactions(replica_url: str, db_path: str, tmp_path: Path) -> None:
    """Transactions of tens of MB (larger than one read chunk of the WAL)."""
    opts = fast_options()
    conn = sqlrepl.connect(db_path, replica_url, options=opts)
    conn.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(2):
        conn.executemany("INSERT INTO big(v) VALUES (?)", [(os.urandom(100_000),) for _ in range(120)])
        conn.commit()
    conn.execute("DELETE FROM big WHERE id % 2 = 0")
    conn.commit()
    sqlrepl.sync(db_path, timeout=60)
    conn.close()
    restored = tmp_path / "restored.db"
    restore_fresh(replica_url, restored)
    assert_same_database(db_path, restored)


def test_vacuum_shrinks(replica_url: str, db_path: str, tmp_path: Path) -> None:
    """VACUUM makes the database smaller; the restore is that small too."""
    opts = fast_options()
    conn = sqlrepl.connect(db_path, replica_url, options=opts)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(os.urandom(3000),) for _ in range(2000)])
    conn.commit()
    sqlrepl.sync(db_path, timeout=30)
    conn.execute("DELETE FROM t WHERE id > 100")
    conn.commit()
    before = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute("VACUUM")
    after = conn.execute("PRAGMA page_count").fetchone()[0]
    assert after < before / 5
    # Grow again in the same sync interval as the shrink.
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(os.urandom(500),) for _ in range(50)])
    conn.commit()
    sqlrepl.sync(db_path, timeout=30)
    conn.close()
    restored = tmp_path / "restored.db"
    restore_fresh(replica_url, restored)
    assert_same_database(db_path, restored)
    assert query(restored, "PRAGMA page_count") == query(db_path, "PRAGMA page_count")
    [(final,)] = query(restored, "PRAGMA page_count")
    assert isinstance(final, int)
    assert final < before / 2


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_page_sizes(replica_url: str, db_path: str, tmp_path: Path, page_size: int) -> None:
    """Every page size from the smallest to the largest round-trips."""
    make_db(db_path, page_size=page_size)
    conn = sqlrepl.connect(db_path, replica_url, options=fast_options())
    assert conn.execute("PRAGMA page_size").fetchone()[0] == page_size
    for i in range(30):
        conn.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(random.randint(10, 3 * page_size)),))
        conn.commit()
        if i % 10 == 9:
            conn.execute("DELETE FROM t WHERE id % 3 = 0")
            conn.commit()
    sqlrepl.sync(db_path, timeout=30)
    conn.close()
    restored = tmp_path / "restored.db"
    restore_fresh(replica_url, restored)
    assert_same_database(db_path, restored)
    assert query(restored, "PRAGMA page_size") == [(page_size,)]


@pytest.mark.parametrize("mode", ["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
def test_application_checkpoints_by_itself(replica_url: str, db_path: str, tmp_path: Path, mode: str) -> None:
    """The app runs its own checkpoints, and even turns autocheckpoint back on:
    nothing it does can make the replica miss a frame."""
    opts = fast_options(sync_interval=0.3)
    conn = sqlrepl.connect(db_path, replica_url, options=opts, timeout=0.2)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    conn.execute("PRAGMA wal_autocheckpoint=20")
    for i in range(300):
        conn.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(700),))
        conn.commit()
        if i % 25 == 0:
            # Busy is fine: sqlrepl's pin is doing its job.
            with contextlib.suppress(sqlite3.OperationalError):
                conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
    sqlrepl.sync(db_path, timeout=30)
    conn.close()
    restored = tmp_path / "restored.db"
    restore_fresh(replica_url, restored)
    assert_same_database(db_path, restored)


def test_wal_stays_bounded(tmp_path: Path, db_path: str) -> None:
    """With the app's autocheckpoint off, sqlrepl's own checkpoints keep the
    WAL from growing without end."""
    url = "file://" + str(tmp_path / "replica")
    conn = sqlrepl.connect(db_path, url, options=fast_options(checkpoint_frames=200, wal_restart_frames=400))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(6000):
        conn.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(1000),))
        conn.commit()
    sqlrepl.sync(db_path, timeout=30)
    # 6000 commits of 1.5 frames each, never checkpointed, would need 36 MB.
    assert os.path.getsize(db_path + "-wal") < 4 << 20
    conn.close()


def test_wal_restarts_within_the_interval_without_more_uploads(tmp_path: Path, db_path: str) -> None:
    """When the WAL reaches checkpoint_frames before the sync interval is up,
    its frames are copied early (so that the WAL can restart, as SQLite's own
    autocheckpoint would have it) and held: the interval still costs one
    upload, a merge of what was held, and the replica is exact."""
    url = file_url(tmp_path / "replica")
    # An interval longer than the test, so that the count below holds
    # however slowly the machine writes: only the final sync releases.
    opts = fast_options(sync_interval=3600, checkpoint_frames=100, wal_restart_frames=200)
    conn = sqlrepl.connect(db_path, url, options=opts)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    sqlrepl.sync(db_path)
    replica = tmp_path / "replica"
    uploaded_before = set(replica.rglob("*.segment"))
    largest_wal = 0
    for i in range(3000):
        # (Compressible rows: segments small beside the database, so no
        # snapshot falls due, which would be a release of its own.)
        conn.execute("INSERT INTO t(v) VALUES (?)", (b"%08d" % i * 125,))
        conn.commit()
        if i % 50 == 0:
            largest_wal = max(largest_wal, os.path.getsize(db_path + "-wal"))
    staged = sorted(p.name for p in Path(db_path + "-sqlrepl").rglob("*.segment"))
    sqlrepl.sync(db_path, timeout=30)
    # Segments in the replica, not PUT requests: other objects (the replica
    # watch's records) are not part of the batching.
    uploads = len(set(replica.rglob("*.segment")) - uploaded_before)
    # 3000 commits of ~1.5 frames: 18 MB of WAL had it grown all interval.
    assert largest_wal < 8 << 20, largest_wal
    assert len(staged) >= 5, staged  # copied early, several times, and held
    # One upload for the whole interval (the release the sync asked for, a
    # merge of everything held), not one per early copy.
    assert uploads == 1, (uploads, staged)
    conn.close()
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    assert_same_database(db_path, restored)


def test_held_frames_leave_when_the_writes_stop(tmp_path: Path, db_path: str) -> None:
    """Frames copied early (held for the interval's upload) are uploaded at
    the end of their interval even when no commit follows: without a
    ``sync()``, the replica catches up within about one interval."""
    url = file_url(tmp_path / "replica")
    opts = fast_options(sync_interval=0.5, checkpoint_frames=30, wal_restart_frames=60)
    conn = sqlrepl.connect(db_path, url, options=opts)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    for _ in range(20):
        for i in range(300):
            conn.execute("INSERT INTO t(v) VALUES (?)", (b"%08d" % i * 100,))
            conn.commit()
        if any(k.endswith(".segment") for k in _staged_keys(db_path)):
            break  # something is staged, held or on its way: stop writing now
    (committed,) = conn.execute("SELECT count(*) FROM t").fetchone()
    # Caught up means the replica holds the last commit: the captured txid
    # alone may lag the commit by a poll interval.
    deadline = time.monotonic() + 60
    for attempt in range(10**6):
        status = sqlrepl.status(db_path)
        if status.replicas[0].txid == status.txid and not _staged_keys(db_path):
            restored = tmp_path / f"restored-{attempt}.db"
            restore_fresh(url, restored)  # (no sync() was called)
            if query(restored, "SELECT count(*) FROM t") == [(committed,)]:
                break
        assert time.monotonic() < deadline, (status, _staged_keys(db_path))
        time.sleep(0.05)
    assert_same_database(db_path, restored)
    conn.close()


def _staged_keys(db: str) -> list[str]:
    return [p.name for p in Path(db + "-sqlrepl", "objects").rglob("*") if p.is_file()]


def test_writer_that_never_imported_sqlrepl(replica_url: str, db_path: str, tmp_path: Path) -> None:
    """A second process writes with plain sqlite3 (its autocheckpoint on, as
    any program has it) while this process replicates."""
    make_db(db_path)
    conn = sqlrepl.connect(db_path, replica_url, options=fast_options())
    out = run_python(
        """
        import os, sqlite3, sys
        conn = sqlite3.connect(sys.argv[1], timeout=30)
        for i in range(800):
            conn.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(900),))
            conn.commit()
            if i % 200 == 0:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.close()
        """,
        db_path,
    )
    assert out.returncode == 0, out.stderr
    sqlrepl.sync(db_path, timeout=30)
    restored = tmp_path / "restored.db"
    restore_fresh(replica_url, restored)
    assert_same_database(db_path, restored)
    assert len(dump(restored)) > 800
    conn.close()


def test_restart_continues_the_generation(tmp_path: Path, db_path: str) -> None:
    """A clean exit then a new process: same generation, no new snapshot."""
    url = "file://" + str(tmp_path / "replica")
    code = """
        import logging, sys, sqlrepl
        logging.basicConfig(level=logging.INFO)
        sys.path.insert(0, sys.argv[3])
        from helpers import fast_options
        conn = sqlrepl.connect(sys.argv[1], sys.argv[2], options=fast_options())
        conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        for i in range(50):
            conn.execute("INSERT INTO t(v) VALUES ('x')")
            conn.commit()
        sqlrepl.sync(sys.argv[1])
        print(sqlrepl.status(sys.argv[1]).generation)
        conn.close()
    """
    here = str(Path(__file__).parent)
    first = run_python(code, db_path, url, here)
    assert first.returncode == 0, first.stderr
    second = run_python(code, db_path, url, here)
    assert second.returncode == 0, second.stderr
    assert first.stdout.strip() == second.stdout.strip()
    assert "starts a new generation" in first.stderr
    assert "continues generation" in second.stderr
    snapshots = list((tmp_path / "replica").rglob("*.snapshot"))
    assert len(snapshots) == 1
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    assert_same_database(db_path, restored)


def test_changes_while_not_running_start_a_new_generation(tmp_path: Path, db_path: str) -> None:
    """A plain sqlite3 writer changes the database while sqlrepl is not running:
    sqlrepl cannot prove continuity, so it starts a new generation, and the
    restore holds the new writes."""
    url = "file://" + str(tmp_path / "replica")
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.commit()
    sqlrepl.sync(db_path)
    gen1 = sqlrepl.status(db_path).generation
    conn.close()
    sqlrepl.stop_all()
    plain = sqlite3.connect(db_path)
    plain.execute("INSERT INTO t(v) VALUES ('behind its back')")
    plain.commit()
    plain.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    plain.close()
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("INSERT INTO t(v) VALUES ('after')")
    conn.commit()
    sqlrepl.sync(db_path)
    gen2 = sqlrepl.status(db_path).generation
    conn.close()
    assert gen2 != gen1
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    assert_same_database(db_path, restored)


def test_wal_truncated_by_sqlrepl_keeps_the_generation(
    replica_url: str, db_path: str, tmp_path: Path
) -> None:
    """After sqlrepl truncates the WAL, the app's connection may start the
    new WAL with random salts (SQLite does when that connection never reset
    the WAL itself): still one generation, and an exact replica."""
    opts = fast_options(checkpoint_frames=20, wal_restart_frames=40, truncate_wal_bytes=1)
    conn = sqlrepl.connect(db_path, replica_url, options=opts)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    sqlrepl.sync(db_path)
    generation = sqlrepl.status(db_path).generation
    for i in range(400):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
        conn.commit()
        if i % 40 == 0:
            sqlrepl.sync(db_path)  # a capture, then a checkpoint that can truncate
    sqlrepl.sync(db_path)
    assert sqlrepl.status(db_path).generation == generation
    conn.close()
    restore_fresh(replica_url, tmp_path / "restored.db")
    assert_same_database(db_path, tmp_path / "restored.db")
