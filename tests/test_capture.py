"""The capture engine directly: positions, scans and restarts on real SQLite."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from sqlrepl import _format
from sqlrepl._capture import Capture, Staged
from sqlrepl._staging import Staging


@pytest.fixture
def app(tmp_path: Path) -> sqlite3.Connection:
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    yield conn
    conn.close()


def _writes(conn: sqlite3.Connection, n: int, tag: str) -> None:
    for i in range(n):
        conn.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (i % 7, f"{tag}-{i}" * 50))


def test_restart_after_a_checkpoint_that_skipped_pages(app: sqlite3.Connection, tmp_path: Path) -> None:
    """A checkpoint held back at our position skips pages rewritten after it
    (their older versions stay only in the WAL). A new process must still
    rebuild the state at the recorded position and continue the generation."""
    db = str(tmp_path / "app.db")
    staging = Staging(db)
    staging.ensure()
    first = Capture(db)
    first.open()
    assert first.start(None) is not None
    gen = _format.new_generation_id()
    first.new_generation(staging, gen)
    _writes(app, 30, "a")
    assert first.capture(staging, gen) is not None
    state = first.state()
    _writes(app, 30, "b")  # the same pages again, past the position
    # PASSIVE, held back at our position by our pin: pages rewritten since
    # are skipped, though nBackfill reaches the position.
    first.wal.ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # type: ignore[union-attr]
    assert first.index().backfilled == first.position.frame  # type: ignore[union-attr]
    first.abandon()  # as if the process died: nothing closed
    second = Capture(db)
    second.open()
    assert second.start(state) is None  # continues; no "the database changed"
    assert second.txid == first.txid
    second.close()


def test_a_backlog_is_copied_in_bounded_pieces(app: sqlite3.Connection, tmp_path: Path) -> None:
    """A backlog larger than ``max_bytes`` is staged as a chain of segments,
    each within the bound (a larger single transaction whole), each handed
    over as it is written; their checksums chain to the database's, and the
    next capture continues from the recorded position."""
    db = str(tmp_path / "app.db")
    staging = Staging(db)
    staging.ensure()
    cap = Capture(db)
    cap.open()
    assert cap.start(None) is not None
    gen = _format.new_generation_id()
    snapshot = cap.new_generation(staging, gen)
    for i in range(120):
        app.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 3000))
    app.execute("BEGIN")
    for i in range(120, 160):  # one transaction of about 40 pages: larger than the bound
        app.execute("INSERT INTO t VALUES (?, ?)", (i, "y" * 3000))
    app.execute("COMMIT")
    pieces: list[_format.ObjectHeader] = []
    last = cap.capture(staging, gen, max_bytes=16 * 4096, on_piece=lambda s: pieces.append(s.header))
    assert last is not None
    headers = [*pieces, last.header]
    assert len(headers) >= 5
    assert [h.first_txid for h in headers[1:]] == [h.last_txid + 1 for h in headers[:-1]]
    assert [h.pre_checksum for h in headers[1:]] == [h.post_checksum for h in headers[:-1]]
    assert headers[0].pre_checksum == snapshot.header.post_checksum
    assert all(h.page_count <= 16 for h in headers[:-1])
    assert last.header.page_count >= 40  # the big transaction, not split
    assert cap.position.frame == cap.index().max_frame  # type: ignore[union-attr]
    assert cap.checksum == cap._scan(cap.position.frame, cap.index(), 0)[1]  # type: ignore[union-attr]
    app.execute("INSERT INTO t VALUES (999, 'z')")
    assert (
        cap.capture(staging, gen, max_bytes=16 * 4096, on_piece=lambda s: pieces.append(s.header)) is not None
    )
    cap.close()


def _checkpoint_in_thread(db: str, mode: str, busy_timeout: float) -> tuple[threading.Thread, list[object]]:
    """Another connection's ``wal_checkpoint(mode)``, run in a thread; its
    result row (or exception) lands in the returned list."""
    result: list[object] = []
    conn = sqlite3.connect(db, timeout=busy_timeout, isolation_level=None, check_same_thread=False)

    def run() -> None:
        try:
            result.append(conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())
        except sqlite3.Error as exc:
            result.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.mark.parametrize(
    ("record_seconds", "timeout"),
    [
        pytest.param(1.0, 0.5, id="record-slower-than-a-round"),
        pytest.param(0.0, 0.0, id="no-time-left-in-a-round"),
    ],
)
def test_give_way_lasts_as_long_as_the_checkpointer_waits(
    app: sqlite3.Connection, tmp_path: Path, record_seconds: float, timeout: float
) -> None:
    """A foreign TRUNCATE checkpoint completes, and the WAL restart keeps
    continuity, also when recording the copy takes longer than a give-way
    round (a slow fsync) or a round leaves no time to wait (a starved thread)."""
    db = str(tmp_path / "app.db")
    staging = Staging(db)
    staging.ensure()
    cap = Capture(db)
    cap.open()
    assert cap.start(None) is not None
    gen = _format.new_generation_id()
    cap.new_generation(staging, gen)
    _writes(app, 40, "a")  # frames the pin protects, not yet copied
    recorded: list[Staged] = []

    def record(staged: Staged) -> None:
        time.sleep(record_seconds)  # the injected slow step, not a wait for anything
        recorded.append(staged)

    thread, result = _checkpoint_in_thread(db, "TRUNCATE", busy_timeout=10)
    try:
        deadline = time.monotonic() + 60
        while not cap.checkpointer_waiting():
            assert thread.is_alive(), result
            assert time.monotonic() < deadline, "the checkpoint never waited for the pin"
            time.sleep(0.001)
        # As the replicator does: give way while the checkpointer waits.
        while thread.is_alive() and cap.checkpointer_waiting():
            cap.give_way(staging, gen, on_staged=record, timeout=timeout)
    finally:
        thread.join(60)
    assert result == [(0, 0, 0)]
    assert len(recorded) == 1
    assert recorded[0].header.last_txid == cap.txid
    _writes(app, 5, "b")  # the WAL restarts from the top
    assert cap.capture(staging, gen) is not None  # continuity proven: no ContinuityLost
    cap.close()


def test_a_failed_record_keeps_the_pin_at_the_recorded_position(
    app: sqlite3.Connection, tmp_path: Path
) -> None:
    """When recording the segment copied under the write barrier fails (the
    state file cannot be written), the pin stays at the recorded position, so
    no checkpoint copies the unrecorded frames into the database file."""
    db = str(tmp_path / "app.db")
    staging = Staging(db)
    staging.ensure()
    cap = Capture(db)
    cap.open()
    assert cap.start(None) is not None
    gen = _format.new_generation_id()
    cap.new_generation(staging, gen)
    assert cap.position is not None
    recorded = cap.position.frame
    _writes(app, 20, "a")

    def fail(staged: Staged) -> None:
        raise OSError(28, "injected: no room for the state file")

    with pytest.raises(OSError, match="injected"):
        cap.checkpoint(staging, gen, truncate_over=1 << 40, on_staged=fail)
    app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert cap.index().max_frame > recorded
    assert cap.index().backfilled <= recorded
    cap.close()
