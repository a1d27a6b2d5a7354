"""Progress of the snapshots a replicator writes and uploads: Options(progress=...),
status().snapshot_progress, and `sqlrepl replicate`'s bar on a terminal only."""

from __future__ import annotations

import glob
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, assert_same_database, fast_options, file_url, read_until_closed, wait_for

import sqlrepl
from sqlrepl._progress import SnapshotTracker, stored_bound, upload_sent


def _large_database(path: Path, mib: int = 12) -> str:
    """A WAL-mode database of about ``mib`` MiB of random (incompressible)
    rows, written with plain sqlite3 before any replication."""
    db = str(path)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute(
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {mib * 10})"
        " INSERT INTO t(v) SELECT randomblob(100000) FROM n"
    )
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


class Calls:
    """A progress callback that records its calls (from any thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self.calls.append((done, total))


def _assert_forward_to_total(calls: list[tuple[int, int]], *, one_job: bool = True) -> None:
    assert len(calls) >= 3, calls
    dones = [d for d, _ in calls]
    assert dones == sorted(dones), calls
    assert all(0 <= d <= t for d, t in calls), calls
    if one_job:  # (a next snapshot adds to the total; within one, the estimate only shrinks)
        fractions = [d / t for d, t in calls]
        assert fractions == sorted(fractions), calls
    assert calls[-1][0] == calls[-1][1] > 0, calls


def _check_first_snapshot(db: str, url: str, tmp_path: Path) -> None:
    calls = Calls()
    conn = sqlrepl.connect(db, url, options=fast_options(progress=calls))
    conn.close()
    sqlrepl.sync(db, timeout=120)
    _assert_forward_to_total(calls.calls)

    status = sqlrepl.status(db)
    snap = status.snapshot_progress
    assert isinstance(snap, sqlrepl.SnapshotProgress)
    assert (snap.state, snap.reason, snap.generation) == ("done", "new generation", status.generation)
    size = os.path.getsize(db)
    assert snap.database_bytes == snap.read_bytes == size
    assert snap.snapshot_bytes is not None
    assert snap.snapshot_bytes <= stored_bound(size, 4096)
    assert list(snap.uploaded_bytes.values()) == [snap.snapshot_bytes]
    assert snap.done == snap.total == size + snap.snapshot_bytes == calls.calls[-1][0]
    # Reported as it went: while reading, and part by part while uploading.
    assert any(0 < d < size for d, _ in calls.calls), calls.calls
    assert any(size < d < snap.total for d, _ in calls.calls), calls.calls

    out = tmp_path / "restored.db"
    assert sqlrepl.restore(str(out), url) is not None
    assert_same_database(db, out)


def test_first_snapshot_progress_file(tmp_path: Path) -> None:
    """A 12 MiB database's first snapshot to a folder is reported as read and uploaded, up to its total."""
    db = _large_database(tmp_path / "app.db")
    _check_first_snapshot(db, file_url(tmp_path / "replica"), tmp_path)


@pytest.mark.s3
def test_first_snapshot_progress_s3(tmp_path: Path, s3_url: str) -> None:
    """The same to S3, where the snapshot goes in 5 MiB parts, each reported as it is stored."""
    db = _large_database(tmp_path / "app.db")
    _check_first_snapshot(db, s3_url + "&multipart_threshold=5MiB&part_size=5MiB", tmp_path)


def test_a_raising_callback_does_not_break_replication(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A progress callback that raises is logged once and dropped; replication and status() go on."""
    db = _large_database(tmp_path / "app.db", mib=6)
    url = file_url(tmp_path / "replica")
    called = []

    def broken(done: int, total: int) -> None:
        called.append(done)
        raise RuntimeError("the display went away")

    conn = sqlrepl.connect(db, url, options=fast_options(progress=broken))
    conn.execute("INSERT INTO t(v) VALUES (randomblob(5000))")
    conn.commit()
    sqlrepl.sync(db, timeout=120)
    conn.close()
    assert len(called) == 1
    failures = [r for r in caplog.records if "progress callback" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    status = sqlrepl.status(db)
    assert status.role == "replicating"
    assert status.error is None
    assert status.snapshot_progress is not None
    assert status.snapshot_progress.state == "done"
    out = tmp_path / "restored.db"
    assert sqlrepl.restore(str(out), url) is not None
    assert_same_database(db, out)


def test_bad_progress_option_is_refused() -> None:
    """Options(progress=...) that is not callable is a ConfigError saying how it is called."""
    with pytest.raises(sqlrepl.ConfigError, match=r"progress\(done_bytes, total_bytes\)"):
        sqlrepl.Options(progress=42)  # type: ignore[arg-type]


def test_tracker_adds_up_jobs_and_never_goes_back() -> None:
    """A snapshot given up keeps what was done; the next one adds to the total; retries do not count twice."""
    calls = Calls()
    t = SnapshotTracker(calls)
    t.begin("g1", "new generation", 1)
    t.scanning(4096 * 10, 4096)
    t.scanned(4096 * 4)
    t.scanning(4096 * 10, 4096)  # a retried scan: counts again from zero
    t.scanned(4096 * 2)
    assert t.current is not None
    assert t.current.read_bytes == 4096 * 4
    t.begin("g2", "new generation", 1)  # (the first was superseded)
    t.scanning(4096 * 5, 4096)
    t.staged("k2", 1000, [(7, "file:///r")])
    with t.uploading(7, "k2"):
        upload_sent(600)
    with t.uploading(7, "k2"):  # a retried upload: counts from zero again
        upload_sent(300)
    assert t.current.uploaded_bytes == {"file:///r": 600}
    t.uploaded(7, "k2")
    _assert_forward_to_total(calls.calls, one_job=False)
    assert calls.calls[-1] == (4096 * 4 + 4096 * 5 + 1000,) * 2
    assert t.current.state == "done"
    assert t.current.done == t.current.total == 4096 * 5 + 1000
    t.scanning(4096 * 50, 4096)  # a periodic snapshot's scan: not tracked
    t.scanned(4096 * 10)
    assert calls.calls[-1] == (4096 * 4 + 4096 * 5 + 1000,) * 2


# -- the command line ----------------------------------------------------------------


def _replicate_args(db: str, url: str) -> list[str]:
    return [sys.executable, "-m", "sqlrepl", "replicate", db, url]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}


def _snapshot_stored(replica: Path) -> bool:
    return bool(glob.glob(str(replica / "generations" / "*" / "snapshots" / "*")))


def test_replicate_bar_on_a_terminal(tmp_path: Path) -> None:
    """Under a pseudo-terminal, `sqlrepl replicate` draws a bar for the first snapshot that reaches 100%."""
    db = _large_database(tmp_path / "app.db", mib=8)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        _replicate_args(db, file_url(tmp_path / "replica")),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=_env(),
    )
    os.close(follower)
    out = bytearray()
    deadline = time.monotonic() + 120
    # poll, not select: after hundreds of tests in one process the
    # descriptor's number may be past select()'s limit of 1024.
    readable = select.poll()
    readable.register(leader, select.POLLIN)
    try:
        while b"snapshot: 100%" not in out and time.monotonic() < deadline:
            if readable.poll(1000):
                try:
                    out += os.read(leader, 4096)
                except OSError:
                    break  # (the child closed the terminal: it ended)
        proc.send_signal(signal.SIGINT)
        out += read_until_closed(leader)  # the rest
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    text = out.decode(errors="replace")
    assert proc.wait(timeout=60) == 0, text
    assert "snapshot: 100%" in text, text
    assert "\r" in text  # redrawn in place
    assert _snapshot_stored(tmp_path / "replica")


def test_replicate_no_bar_in_a_pipe(tmp_path: Path) -> None:
    """With stdout and stderr piped, `sqlrepl replicate` draws no bar for the first snapshot."""
    db = _large_database(tmp_path / "app.db", mib=8)
    replica = tmp_path / "replica"
    proc = subprocess.Popen(
        _replicate_args(db, file_url(replica)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        wait_for("the snapshot in the replica", lambda: _snapshot_stored(replica) or proc.poll() is not None)
        assert _snapshot_stored(replica), proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout.startswith("replicating ")
    assert "%" not in stdout + stderr
    assert "\r" not in stdout + stderr


def test_a_replica_added_later_is_reported(tmp_path: Path) -> None:
    """A replica added later gets a snapshot, reported ("replica needs one") up to its total."""
    db = _large_database(tmp_path / "app.db", mib=6)
    first, second = file_url(tmp_path / "r1"), file_url(tmp_path / "r2")
    sqlrepl.connect(db, first, options=fast_options()).close()
    sqlrepl.sync(db, timeout=120)
    sqlrepl.stop_all()

    calls = Calls()
    sqlrepl.connect(db, [first, second], options=fast_options(progress=calls)).close()
    sqlrepl.sync(db, timeout=120)
    _assert_forward_to_total(calls.calls)
    snap = sqlrepl.status(db).snapshot_progress
    assert snap is not None
    assert (snap.reason, snap.state) == ("replica needs one", "done")
    assert snap.database_bytes == os.path.getsize(db)
    assert second in snap.uploaded_bytes
    out = tmp_path / "restored.db"
    assert sqlrepl.restore(str(out), second) is not None
    assert_same_database(db, out)


def test_a_first_snapshot_left_staged_is_reported_after_a_restart(tmp_path: Path) -> None:
    """A first snapshot whose upload a restart cut short is reported as "resumed" as it is uploaded."""
    db = _large_database(tmp_path / "app.db", mib=6)
    (tmp_path / "a-file").write_text("not a folder")
    unreachable = file_url(tmp_path / "a-file" / "replica")  # (every upload there fails)
    sqlrepl.connect(db, unreachable, options=fast_options()).close()

    def staged() -> bool:
        snap = sqlrepl.status(db).snapshot_progress
        return snap is not None and snap.state == "uploading"

    wait_for("the first snapshot to be staged", staged)
    sqlrepl.stop_all(flush=False)

    calls = Calls()
    good = file_url(tmp_path / "replica")
    sqlrepl.connect(db, good, options=fast_options(progress=calls)).close()
    sqlrepl.sync(db, timeout=120)
    _assert_forward_to_total(calls.calls)
    snap = sqlrepl.status(db).snapshot_progress
    assert snap is not None
    assert (snap.reason, snap.state, snap.database_bytes) == ("resumed", "done", 0)
    assert snap.snapshot_bytes is not None
    assert snap.done == snap.total == snap.uploaded_bytes[good] == snap.snapshot_bytes
    assert any(0 < d < snap.total for d, _ in calls.calls), calls.calls
