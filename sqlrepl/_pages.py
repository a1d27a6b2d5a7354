"""The replicated state as pages: which WAL frame holds each page's newest
copy, the page hashes of the state at a frame, and segments written from
frames.

The state is tracked as one hash per page (``page_hash``); their XOR is the
database checksum each object records before and after itself, which is how
continuity is checked, both here and by restore. Blocking, one worker thread
at a time, reading through a :class:`LiveWal`.
"""

from __future__ import annotations

import array
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import _format, _progress
from ._format import ObjectHeader, ObjectWriter, page_hash
from ._livewal import CaptureRetry, LiveWal
from ._staging import Staging
from ._wal import FRAME_HEADER_SIZE, IndexHeader, frame_offset, lock_page

__all__ = ["Plan", "Staged", "Written", "advance_hashes", "piece_end", "plan_frames", "scan", "write_segment"]

_FRAME_HDR = struct.Struct(">II")
_Chunks = list[tuple[int, memoryview]]


@dataclass(frozen=True)
class Staged:
    """An object written to the staging directory, ready to upload."""

    key: str
    path: str
    header: ObjectHeader


@dataclass
class Plan:
    latest: dict[int, int]  # page number -> frame holding its newest copy
    size: int  # database size in pages after the last commit
    truncate: int  # smallest size seen
    commits: int


def plan_frames(wal: LiveWal, first: int, last: int, size: int, chunks: _Chunks | None) -> Plan:
    """Which frame holds the newest copy of each page in ``first..last``,
    dropping pages cut off by a commit that shrank the database. ``size`` is
    the size before ``first``; ``chunks`` the frames if already read."""
    latest: dict[int, int] = {}
    truncate = size
    commits = 0
    max_pgno = 0
    step = FRAME_HEADER_SIZE + wal.page_size
    unpack = _FRAME_HDR.unpack_from
    for f0, data in chunks if chunks is not None else wal.frames(first, last):
        for i, off in enumerate(range(0, len(data), step)):
            pgno, commit = unpack(data, off)
            latest[pgno] = f0 + i
            if pgno > max_pgno:
                max_pgno = pgno
            if commit:
                commits += 1
                size = commit
                if commit < truncate:
                    truncate = commit
                if commit < max_pgno:
                    for p in [p for p in latest if p > commit]:
                        del latest[p]
                    max_pgno = max(latest, default=0)
    return Plan(latest, size, truncate, commits)


def piece_end(wal: LiveWal, first: int, last: int, max_bytes: int) -> tuple[int, tuple[int, int]]:
    """The last commit frame in ``first..last`` that keeps the pages of
    ``first..`` within ``max_bytes`` (or the first commit frame, if even that
    is over), and the running checksum after it."""
    ps = wal.page_size
    step = FRAME_HEADER_SIZE + ps
    within = first + max_bytes // ps - 1
    end = 0
    for f0, data in wal.frames(first, last):
        for i, off in enumerate(range(0, len(data), step)):
            f = f0 + i
            if f > within and end:
                return end, wal.checksum_after(end)
            if _FRAME_HDR.unpack_from(data, off)[1]:
                end = f
    end = end or last
    return end, wal.checksum_after(end)


def scan(
    wal: LiveWal,
    frame: int,
    hdr: IndexHeader,
    size: int,
    sink: Callable[[int, bytes], None] | None = None,
    *,
    progress: _progress.SnapshotTracker | None = None,
) -> tuple[array.array[int], int, int]:
    """Hash (and feed ``sink``) every page of the state at WAL ``frame`` of
    the incarnation ``hdr`` describes: the database file overlaid with the
    newest copy of each page in frames ``1..frame``.

    Not ``nBackfill+1..frame``: a checkpoint held back by a reader skips any
    page whose newest frame is past the reader, though nBackfill still moves
    (SQLite's readers then take that page from the WAL), so the file may lack
    a page's version at or below nBackfill (tests/test_wal.py shows it). Only
    a WAL checkpointed completely, exactly at ``frame``, leaves the file
    exact. ``frame`` 0 means the state before the incarnation's first frame
    (the caller knows nothing of it is checkpointed).

    ``size`` is the state's size in pages (0: take it from the file).
    Returns the page hashes, the database checksum and the size. Raises
    :class:`CaptureRetry` if a checkpoint moved while it read. A page beyond
    the end of the file and in no overlaid frame is absent: it counts in the
    size but is neither hashed nor passed to ``sink``.
    """
    db_fd = wal.db_fd
    assert db_fd is not None
    ps = wal.page_size
    backfilled = hdr.backfilled
    exact = frame == 0 or backfilled == hdr.max_frame == frame
    plan = Plan({}, 0, 0, 0) if exact else plan_frames(wal, 1, frame, 0, None)
    if not size:
        size = plan.size if plan.commits else os.fstat(db_fd).st_size // ps
    sink = _progress.scan_sink(progress, sink, size, ps)  # progress hook (snapshots only)
    overlay = {p: f for p, f in plan.latest.items() if p <= size}
    wal_fd = wal.wal_fd() if overlay else None
    hashes = array.array("Q", bytes(8 * size))
    checksum = 0
    skip = lock_page(ps)
    chunk_pages = max(1, (4 << 20) // ps)
    for start in range(1, size + 1, chunk_pages):
        n = min(chunk_pages, size - start + 1)
        data = memoryview(os.pread(db_fd, n * ps, (start - 1) * ps))
        for i in range(n):
            pgno = start + i
            if pgno == skip:
                continue
            f = overlay.get(pgno)
            if f is not None:
                assert wal_fd is not None
                page = os.pread(wal_fd, ps, frame_offset(f, ps) + FRAME_HEADER_SIZE)
            else:
                page = bytes(data[i * ps : (i + 1) * ps])
            if not page:
                # Past the end of the file and in no frame: SQLite can count
                # a page in the database before writing it, and reads it as
                # zeros. Absent here too (no hash, not in snapshots), as
                # restore leaves it: a hole that reads as zeros.
                continue
            if len(page) != ps:
                raise CaptureRetry(f"{wal.database} ends inside page {pgno} (a write in progress?)")
            h = page_hash(pgno, page)
            hashes[pgno - 1] = h
            checksum ^= h
            if sink is not None:
                sink(pgno, page)
    if wal.index().backfilled != backfilled:
        raise CaptureRetry("a checkpoint ran while the database was being read")
    return hashes, checksum, size


@dataclass
class Written:
    """A segment staged by :func:`write_segment`, and how the state moves."""

    staged: Staged
    plan: Plan
    updates: list[tuple[int, int]]  # (page number, new hash)
    post_checksum: int


def write_segment(
    wal: LiveWal,
    staging: Staging,
    generation: str,
    first: int,
    last: int,
    *,
    txid: int,
    db_size: int,
    hashes: array.array[int],
    checksum: int,
    timestamp_ms: Callable[[], int],
    sync: bool,
) -> Written:
    """Stage the transactions in frames ``first..last`` (whole commits) as
    one segment after ``txid``, from the state of ``db_size`` pages with
    ``hashes`` and ``checksum``; ``hashes`` is not changed (see
    :func:`advance_hashes`)."""
    ps = wal.page_size
    step = FRAME_HEADER_SIZE + ps
    small = last - first + 1 <= wal.chunk_frames()
    chunks = list(wal.frames(first, last)) if small else None
    plan = plan_frames(wal, first, last, db_size, chunks)
    skip = lock_page(ps)
    post = checksum
    for p in range(plan.truncate + 1, len(hashes) + 1):
        post ^= hashes[p - 1]
    updates: list[tuple[int, int]] = []
    latest = plan.latest
    with staging.temp_object() as (f, finish):
        writer = ObjectWriter(f, ps)
        for f0, data in chunks if chunks is not None else wal.frames(first, last):
            for i, off in enumerate(range(0, len(data), step)):
                (pgno,) = struct.unpack_from(">I", data, off)
                if latest.get(pgno) != f0 + i or pgno == skip:
                    continue
                page = data[off + FRAME_HEADER_SIZE : off + step]
                h = page_hash(pgno, page)
                old = hashes[pgno - 1] if pgno <= plan.truncate and pgno <= len(hashes) else 0
                post ^= old ^ h
                updates.append((pgno, h))
                writer.add(pgno, page)
        now = timestamp_ms()
        header = writer.finish(
            kind=_format.KIND_SEGMENT,
            first_txid=txid + 1,
            last_txid=txid + plan.commits,
            timestamp_ms=now,
            db_size=plan.size,
            truncate_size=plan.truncate,
            pre_checksum=checksum,
            post_checksum=post,
        )
        key = _format.segment_key(generation, txid + 1, txid + plan.commits, now)
        path = finish(key, sync=sync)
    return Written(Staged(key, path, header), plan, updates, post)


def advance_hashes(hashes: array.array[int], written: Written) -> None:
    """Move the page hashes to the state after ``written``."""
    plan = written.plan
    if plan.truncate < len(hashes):
        del hashes[plan.truncate :]
    if plan.size > len(hashes):
        hashes.extend(array.array("Q", bytes(8 * (plan.size - len(hashes)))))
    for pgno, h in written.updates:
        hashes[pgno - 1] = h
