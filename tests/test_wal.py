"""The WAL reader against WAL files written by real SQLite."""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from sqlrepl import _wal

_open: list[sqlite3.Connection] = []


@pytest.fixture(autouse=True)
def _close_writers() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def _writer(path: Path, *, page_size: int = 4096) -> sqlite3.Connection:
    """A connection writing ``path`` in WAL mode, never checkpointing, closed
    at the end of the test (closing earlier would checkpoint and delete the
    WAL under inspection)."""
    conn = sqlite3.connect(path, isolation_level=None)
    _open.append(conn)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t(x)")
    return conn


def _commits(conn: sqlite3.Connection, n: int, size: int = 200) -> None:
    for i in range(n):
        conn.execute("INSERT INTO t VALUES (?)", (os.urandom(size) + bytes([i % 256]),))


def _frozen_wal(tmp_path: Path, conn: sqlite3.Connection, db: Path) -> bytes:
    """A copy of the WAL as it is now (the writer stays open, so it stays)."""
    shutil.copyfile(str(db) + "-wal", tmp_path / "copy-wal")
    return (tmp_path / "copy-wal").read_bytes()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "w.db"


def test_scan_agrees_with_sqlite_index(tmp_path: Path, db: Path) -> None:
    """A full checksum scan finds exactly the last commit the wal-index records."""
    conn = _writer(db)
    _commits(conn, 40)
    data = _frozen_wal(tmp_path, conn, db)
    scan = _wal.scan_wal(data)
    fd = _wal.long_lived_fd(str(db) + "-shm")
    assert fd is not None
    hdr = _wal.read_index_header(fd)
    assert hdr is not None
    assert scan.header is not None
    assert scan.last_commit == hdr.max_frame > 40
    assert scan.last_checksum == hdr.frame_checksum
    assert scan.header.salt == hdr.salt
    assert len(scan.commit_frames) == 41  # CREATE TABLE + 40 inserts


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_page_sizes(tmp_path: Path, page_size: int) -> None:
    """Headers decode the page size (65536 is stored as 1) and frames step by it."""
    db = tmp_path / f"p{page_size}.db"
    conn = _writer(db, page_size=page_size)
    _commits(conn, 5, size=page_size)
    scan = _wal.scan_wal(_frozen_wal(tmp_path, conn, db))
    assert scan.header is not None
    assert scan.header.page_size == page_size
    assert len(scan.commit_frames) == 6


def test_torn_last_frame_ends_the_wal(tmp_path: Path, db: Path) -> None:
    """A WAL cut in the middle of its last frame ends at the commit before it."""
    conn = _writer(db)
    _commits(conn, 10)
    data = _frozen_wal(tmp_path, conn, db)
    full = _wal.scan_wal(data)
    torn = _wal.scan_wal(data[: len(data) - 100])
    assert torn.last_commit == full.commit_frames[-2]
    assert torn.commit_frames == full.commit_frames[:-1]


def test_checksum_mismatch_stops_the_scan(tmp_path: Path, db: Path) -> None:
    """A flipped byte in a frame invalidates it and every frame after it."""
    conn = _writer(db)
    _commits(conn, 10)
    data = bytearray(_frozen_wal(tmp_path, conn, db))
    full = _wal.scan_wal(bytes(data))
    victim = full.commit_frames[5]  # a commit frame in the middle
    data[_wal.frame_offset(victim, 4096) + 24 + 1000] ^= 0x40
    scan = _wal.scan_wal(bytes(data))
    assert scan.last_commit == full.commit_frames[4]


def test_salt_mismatch_after_checkpoint_restart(tmp_path: Path, db: Path) -> None:
    """After a checkpoint restarts the WAL, old frames beyond the new ones
    remain in the file with old salts and are not valid."""
    conn = _writer(db)
    _commits(conn, 30)
    before = _frozen_wal(tmp_path, conn, db)
    old = _wal.scan_wal(before)
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    _commits(conn, 2)  # restarts the WAL from frame 1 with new salts
    after = _frozen_wal(tmp_path, conn, db)
    assert len(after) == len(before)  # old frames still in the file
    scan = _wal.scan_wal(after)
    assert scan.header is not None
    assert old.header is not None
    assert scan.header.salt != old.header.salt
    assert scan.header.salt1 == old.header.salt1 + 1
    assert scan.header.checkpoint_seq == old.header.checkpoint_seq + 1
    assert scan.commit_frames == [1, 2]
    # The stale frame right after the new ones still carries the old salt.
    _pgno, _commit, salt, _c0, _c1 = _wal.parse_frame_header(after, _wal.frame_offset(3, 4096))
    assert salt == old.header.salt


def test_wal_restarted_under_reader(tmp_path: Path, db: Path) -> None:
    """A reader that held a copy of the old WAL sees the restart as a salt change
    in the live file, and the wal-index follows the new incarnation."""
    conn = _writer(db)
    _commits(conn, 5)
    fd = _wal.long_lived_fd(str(db) + "-shm")
    assert fd is not None
    first = _wal.read_index_header(fd)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert os.path.getsize(str(db) + "-wal") == 0
    assert _wal.scan_wal(b"").header is None
    _commits(conn, 3)
    second = _wal.read_index_header(fd)
    assert first is not None
    assert second is not None
    assert second.salt != first.salt
    assert second.max_frame == 3
    live = _wal.scan_wal((Path(str(db) + "-wal")).read_bytes())
    assert live.header is not None
    assert live.header.salt == second.salt
    assert live.last_commit == 3


def test_big_endian_checksums(tmp_path: Path, db: Path) -> None:
    """A WAL whose magic asks for big-endian checksums is verified that way.

    The fixture is a real WAL re-encoded: the magic switched to 0x377f0683 and
    every checksum recomputed big-endian (what a big-endian host writes).
    """
    conn = _writer(db)
    _commits(conn, 6)
    data = bytearray(_frozen_wal(tmp_path, conn, db))
    struct.pack_into(">I", data, 0, 0x377F0683)
    s = _wal.checksum(bytes(data[:24]), 0, 0, True)
    struct.pack_into(">II", data, 24, *s)
    step = 24 + 4096
    frames = (len(data) - 32) // step
    for i in range(frames):
        off = 32 + i * step
        s = _wal.checksum(bytes(data[off : off + 8]), *s, True)
        s = _wal.checksum(bytes(data[off + 24 : off + step]), *s, True)
        struct.pack_into(">II", data, off + 16, *s)
    scan = _wal.scan_wal(bytes(data))
    assert scan.header is not None
    assert scan.header.big_endian_checksum
    assert len(scan.commit_frames) == 7
    # And the same bytes read as little-endian fail at once.
    struct.pack_into(">I", data, 0, 0x377F0682)
    assert _wal.scan_wal(bytes(data)).header is None


def test_bad_header_strict(db: Path) -> None:
    """A strict parse of garbage says what is wrong; a lenient one returns None."""
    junk = b"\x00" * 32
    assert _wal.parse_wal_header(junk) is None
    with pytest.raises(_wal.WalFormatError, match="bad WAL magic"):
        _wal.parse_wal_header(junk, strict=True)


def test_index_header_rejects_inconsistent_copies(tmp_path: Path, db: Path) -> None:
    """The two copies of the wal-index header must agree, or it is not used."""
    conn = _writer(db)
    _commits(conn, 3)
    raw = bytearray(Path(str(db) + "-shm").read_bytes()[:136])
    path = tmp_path / "fake-shm"
    raw[48 + 16] ^= 1  # second copy's mxFrame
    path.write_bytes(bytes(raw))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _wal.read_index_header(fd) is None
    finally:
        os.close(fd)


def test_lock_page_numbers() -> None:
    """The lock page is the one holding byte 2**30, whatever the page size."""
    assert _wal.lock_page(4096) == 262145
    assert _wal.lock_page(512) == 2097153
    assert _wal.lock_page(65536) == 16385


def test_checkpoint_may_skip_pages_below_nbackfill(tmp_path: Path) -> None:
    """SQLite fact the capture relies on knowing: a PASSIVE checkpoint held
    back by a reader skips every page whose newest frame is past the reader,
    even if an older frame of it is below; nBackfill still moves. So the
    database file may lack a page's version at or below nBackfill."""
    db = tmp_path / "skip.db"
    conn = _writer(db)
    conn.execute("INSERT INTO t VALUES ('v1')")
    reader = sqlite3.connect(db, isolation_level=None)
    _open.append(reader)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM t").fetchall()  # pins the WAL here
    fd = _wal.long_lived_fd(str(db) + "-shm")
    assert fd is not None
    pinned = _wal.read_index_header(fd)
    assert pinned is not None
    conn.execute("UPDATE t SET x = 'v2'")  # the same page again, past the reader
    checkpointer = sqlite3.connect(db, isolation_level=None)
    _open.append(checkpointer)
    busy, log, done = checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert (busy, done) == (0, pinned.max_frame)  # nBackfill moved up to the reader
    assert log > done
    # ...but the table's page holds neither version in the file: it was skipped.
    with open(db, "rb") as f:
        image = f.read()
    assert b"v1" not in image
    assert b"v2" not in image
