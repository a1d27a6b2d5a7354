"""Capturing the live database: pins, WAL reading, segments and snapshots.

Everything here is blocking and meant for one worker thread at a time; the
async replicator (``_replicator``) calls it through ``anyio.to_thread``.

How continuity is kept (see docs/architecture.md for the long form). SQLite
destroys WAL frames only when it restarts or truncates the WAL, and it does
that only once every frame has been checkpointed into the database file *and*
no reader holds a WAL read-mark above zero. A checkpoint, in turn, never copies
frames beyond the smallest read-mark of any reader. So :class:`Capture` always
holds a read transaction (a *pin*) whose snapshot ends at or before the last
frame it has copied: no checkpoint, ours or another process's, can then copy,
let alone discard, a frame we have not read. To advance, it opens a second pin
*before* releasing the first, copies up to where the second one ends, and only
then releases the first. When the WAL is fully checkpointed, a new pin sits on
read-mark zero, which blocks every checkpoint while letting writers restart
the WAL from the top: that is how the WAL stays small.

Snapshots need no write lock: the state at WAL frame ``F`` is the database
file (which holds every frame up to ``nBackfill`` and, while a pin is held,
nothing beyond it that matters) overlaid with the latest copy of each page in
frames ``nBackfill+1..F``.

Continuity is checked, never assumed: a WAL shorter than our position, a
copied frame whose checksum changed, a restart that is not exactly one step
(salt-1 + 1 and checkpoint sequence + 1), or a database file whose checksum
differs from the one recorded all raise :class:`ContinuityLost`, and the
replicator starts a new generation from a snapshot.
"""

from __future__ import annotations

import array
import contextlib
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import _format
from ._errors import WalModeError
from ._format import ObjectHeader, ObjectWriter, page_hash
from ._staging import Staging
from ._wal import (
    FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    IndexHeader,
    WalHeader,
    checkpointer_waiting,
    file_replaced,
    frame_offset,
    lock_page,
    long_lived_fd,
    parse_frame_header,
    parse_wal_header,
    read_index_header,
)

__all__ = ["Capture", "CaptureRetry", "ContinuityLost", "Position", "Staged"]

_READ_CHUNK = 8 << 20
_FRAME_HDR = struct.Struct(">II")


class ContinuityLost(Exception):
    """The WAL no longer continues from the recorded position; a new
    generation (with a snapshot) is needed. The message says why."""


class CaptureRetry(Exception):
    """A transient inconsistency (the WAL changed while being read); retry."""


@dataclass(frozen=True)
class Position:
    """The last WAL frame copied: salt of its WAL incarnation, frame index
    (0 = none of this incarnation), the running checksum after it, and the WAL
    header's checkpoint sequence number (-1 when unknown)."""

    salt: bytes
    frame: int
    checksum: tuple[int, int]
    seq: int

    def as_json(self) -> dict[str, Any]:
        return {
            "salt": self.salt.hex(),
            "frame": self.frame,
            "checksum": list(self.checksum),
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Position:
        return cls(
            bytes.fromhex(d["salt"]),
            int(d["frame"]),
            (int(d["checksum"][0]), int(d["checksum"][1])),
            int(d["seq"]),
        )


@dataclass(frozen=True)
class Staged:
    """An object written to the staging directory, ready to upload."""

    key: str
    path: str
    header: ObjectHeader


@dataclass
class _Plan:
    latest: dict[int, int]  # page number -> frame holding its newest copy
    size: int  # database size in pages after the last commit
    truncate: int  # smallest size seen
    commits: int


class Capture:
    """The live database as the replicator reads it. See the module docstring.

    Not thread-safe; every method blocks. ``open`` before anything else and
    ``close`` at the end (closing releases the pins: if no other connection is
    open, SQLite then checkpoints and deletes the WAL, so flush first).
    """

    def __init__(
        self, database: str, *, busy_timeout: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.database = os.path.abspath(database)
        self.wal_path = self.database + "-wal"
        self.shm_path = self.database + "-shm"
        self._busy_timeout = busy_timeout
        self._clock = clock  # timestamps of objects
        self._pins: list[sqlite3.Connection] = []
        self._spare: list[sqlite3.Connection] = []
        self._ckpt: sqlite3.Connection | None = None
        self._barrier_conn: sqlite3.Connection | None = None
        self.wants_write_lock = False
        self._gave_way_at: IndexHeader | None = None
        self._db_fd: int | None = None
        self._shm_fd: int | None = None
        self._wal_fd: int | None = None
        self._wal_ino: tuple[int, int] | None = None
        self.page_size = 0
        self.position: Position | None = None
        self.txid = 0
        self.db_size = 0
        self.checksum = 0
        self._hashes = array.array("Q")

    # -- connections and files ------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.database, isolation_level=None, check_same_thread=False, timeout=self._busy_timeout
        )
        # Our own connections must never checkpoint on their own.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def open(self, *, set_wal: bool = False) -> None:
        """Open connections and descriptors; check (or, with ``set_wal``, set)
        WAL mode. Raises :class:`WalModeError` if the database is not in WAL
        mode and cannot be put in it."""
        if not os.path.exists(self.database):
            raise FileNotFoundError(f"database {self.database} does not exist")
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL" if set_wal else "PRAGMA journal_mode").fetchone()[0]
        except sqlite3.Error as exc:
            conn.close()
            raise WalModeError(f"{self.database}: cannot read or set the journal mode: {exc}") from exc
        if str(mode).lower() != "wal":
            conn.close()
            raise WalModeError(
                f"{self.database} is in journal_mode={mode}, not WAL; open it with sqlrepl.connect()"
                " (which sets WAL mode) or run PRAGMA journal_mode=WAL once"
            )
        self._ckpt = conn
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
        self._db_fd = long_lived_fd(self.database)
        self.page_size = self._db_page_size()

    def close(self) -> None:
        """Release pins and close connections (see the class docstring)."""
        others = [c for c in (self._ckpt, self._barrier_conn) if c is not None]
        for conn in [*self._pins, *self._spare, *others]:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._pins, self._spare, self._ckpt, self._barrier_conn = [], [], None, None
        if self._wal_fd is not None:
            os.close(self._wal_fd)  # the -wal file carries no locks of SQLite's
            self._wal_fd = None

    def replaced(self) -> str | None:
        """How the database file at our path is no longer the one we read
        (deleted, or another file put there), or ``None``. One ``stat`` and
        one ``fstat``: cheap enough for every poll."""
        if self._db_fd is None:
            return None
        return file_replaced(self.database, self._db_fd)

    def reopen(self) -> None:
        """After :meth:`replaced`: open the file now at our path and let go
        of the old one. The position is forgotten: the caller starts a new
        generation. Raises (keeping the old file) :class:`WalModeError` if the
        new file is not in WAL mode, ``FileNotFoundError`` if there is none
        yet, :class:`CaptureRetry` if it is still empty.

        Closing our connections to the old file is safe: SQLite sees that
        the file moved (``SQLITE_FCNTL_HAS_MOVED``) and then neither
        checkpoints nor deletes the ``-wal``/``-shm`` at the path, which are
        the new file's. Long-lived descriptors on the old file stay open
        (see :func:`long_lived_fd`).
        """
        old = (self._pins, self._spare, self._ckpt, self._barrier_conn, self._db_fd, self.page_size)
        self._pins, self._spare, self._barrier_conn = [], [], None
        try:
            self.open()
            if not self.page_size:
                raise CaptureRetry(f"{self.database} is still empty")
        except BaseException:
            if self._ckpt is not None and self._ckpt is not old[2]:
                self._ckpt.close()
            self._pins, self._spare, self._ckpt, self._barrier_conn, self._db_fd, self.page_size = old
            raise
        for conn in [*old[0], *old[1], old[2], old[3]]:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
        self._wal_fd, self._wal_ino, self._shm_fd = None, None, None
        self.position = None
        self.db_size, self.checksum, self._hashes = 0, 0, array.array("Q")

    def abandon(self) -> None:
        """After ``fork()``, in the child: drop everything without closing it.

        Closing SQLite connections inherited across fork can checkpoint or
        delete the parent's WAL; the objects are leaked on purpose.
        """
        _abandoned.append((self._pins, self._spare, self._ckpt, self._barrier_conn))
        self._pins, self._spare, self._ckpt, self._barrier_conn, self._wal_fd = [], [], None, None, None

    def _db_page_size(self) -> int:
        assert self._db_fd is not None
        head = os.pread(self._db_fd, 100, 0)
        if len(head) < 100:
            return 0
        (ps,) = struct.unpack_from(">H", head, 16)
        return 65536 if ps == 1 else ps

    def _wal(self) -> int | None:
        """A descriptor on the current -wal file (reopened if it was replaced)."""
        try:
            st = os.stat(self.wal_path)
        except FileNotFoundError:
            return None
        ino = (st.st_dev, st.st_ino)
        if self._wal_fd is None or self._wal_ino != ino:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
            self._wal_fd = os.open(self.wal_path, os.O_RDONLY | os.O_CLOEXEC)
            self._wal_ino = ino
        return self._wal_fd

    def _wal_header(self) -> WalHeader | None:
        fd = self._wal()
        return parse_wal_header(os.pread(fd, WAL_HEADER_SIZE, 0)) if fd is not None else None

    # -- pins ----------------------------------------------------------------

    def _begin_pin(self) -> sqlite3.Connection:
        conn = self._spare.pop() if self._spare else self._connect()
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except BaseException:
            conn.close()
            raise
        return conn

    def _release(self, conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        self._spare.append(conn)

    def _advance_pin(self, new: sqlite3.Connection) -> None:
        """Make ``new`` the only pin (the caller has copied up to its end)."""
        old, self._pins = self._pins, [new]
        for conn in old:
            self._release(conn)

    def index(self) -> IndexHeader:
        """The current wal-index header (retried while SQLite rewrites it)."""
        if self._shm_fd is None:
            self._shm_fd = long_lived_fd(self.shm_path)
        for _ in range(400):
            if self._shm_fd is not None:
                hdr = read_index_header(self._shm_fd)
                if hdr is not None:
                    return hdr
            else:
                self._shm_fd = long_lived_fd(self.shm_path)
            time.sleep(0.0005)
        raise CaptureRetry(f"{self.shm_path}: wal-index header unreadable (SQLite is rewriting it?)")

    def changed(self) -> bool:
        """Cheap (one small read): might anything be new since the position?"""
        pos = self.position
        if pos is None:
            return True
        hdr = self.index()
        return hdr.max_frame != pos.frame if hdr.salt == pos.salt else hdr.max_frame > 0

    # -- reading the WAL -------------------------------------------------------

    def _frames(self, first: int, last: int) -> Iterator[tuple[int, memoryview]]:
        """Chunks of whole frames ``first..last``: ``(first frame in chunk, bytes)``."""
        fd = self._wal()
        if fd is None:
            raise CaptureRetry(f"{self.wal_path} disappeared while reading")
        step = FRAME_HEADER_SIZE + self.page_size
        per = max(1, _READ_CHUNK // step)
        f = first
        while f <= last:
            n = min(per, last - f + 1)
            data = os.pread(fd, n * step, frame_offset(f, self.page_size))
            if len(data) != n * step:
                raise CaptureRetry(f"{self.wal_path} is shorter than the wal-index says")
            yield f, memoryview(data)
            f += n

    def _plan(self, first: int, last: int, size: int, chunks: list[tuple[int, memoryview]] | None) -> _Plan:
        """Which frame holds the newest copy of each page in ``first..last``,
        dropping pages cut off by a commit that shrank the database."""
        latest: dict[int, int] = {}
        truncate = size
        commits = 0
        max_pgno = 0
        step = FRAME_HEADER_SIZE + self.page_size
        unpack = _FRAME_HDR.unpack_from
        for f0, data in chunks if chunks is not None else self._frames(first, last):
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
        return _Plan(latest, size, truncate, commits)

    def _check_frame(self, frame: int, salt: bytes, checksum: tuple[int, int] | None) -> int:
        """Check frame ``frame`` still has ``salt`` (and ``checksum``); return
        its commit size. Raises :class:`ContinuityLost` if it does not."""
        fd = self._wal()
        raw = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(frame, self.page_size)) if fd is not None else b""
        if len(raw) < FRAME_HEADER_SIZE:
            raise ContinuityLost(f"WAL frame {frame} is gone (the WAL is shorter)")
        _pgno, commit, fsalt, c0, c1 = parse_frame_header(raw)
        if fsalt != salt or (checksum is not None and (c0, c1) != checksum):
            raise ContinuityLost(f"WAL frame {frame} was overwritten")
        return commit

    # -- establishing a position ----------------------------------------------

    def start(self, state: dict[str, Any] | None) -> str | None:
        """Take the first pin and decide whether the recorded ``state`` still
        continues in this database. Returns ``None`` if it does (the position,
        txid and checksums are loaded, verified against the database file), or
        the reason a new generation is needed."""
        old, self._pins = self._pins, [self._begin_pin()]
        for conn in old:  # a previous attempt's
            self._release(conn)
        if state is None:
            return "no replication state yet"
        if int(state.get("page_size", 0)) != self.page_size:
            return "page size changed"
        pos = Position.from_json(state["wal"])
        hdr = self.index()
        wal_header = self._wal_header()
        if pos.frame and hdr.salt == pos.salt and pos.frame <= hdr.max_frame:
            try:
                size = self._check_frame(pos.frame, pos.salt, pos.checksum)
            except ContinuityLost as exc:
                return str(exc)
            if hdr.backfilled > pos.frame:
                return "frames past the replicated position were checkpointed while sqlrepl was not running"
            at = pos
        elif hdr.backfilled == 0 and (hdr.max_frame == 0 or wal_header is not None):
            # A new WAL incarnation, nothing of it checkpointed: the database
            # file alone is the state before its first frame.
            size = 0
            at = Position(hdr.salt, 0, (0, 0), wal_header.checkpoint_seq if wal_header else -1)
        else:
            return "the WAL was reset while sqlrepl was not running"
        hashes, checksum, size = self._scan(at.frame, hdr, size)
        if checksum != int(state["db_checksum"], 16) or size != int(state["db_size"]):
            return "the database changed while sqlrepl was not running"
        self.position = at
        self.txid = int(state["txid"])
        self._hashes, self.checksum, self.db_size = hashes, checksum, size
        return None

    def state(self) -> dict[str, Any]:
        """What ``start`` needs to continue after a restart."""
        assert self.position is not None
        return {
            "page_size": self.page_size,
            "txid": self.txid,
            "db_size": self.db_size,
            "db_checksum": f"{self.checksum:016x}",
            "wal": self.position.as_json(),
        }

    # -- scanning the whole database ---------------------------------------------

    def _scan(
        self,
        frame: int,
        hdr: IndexHeader,
        size: int,
        sink: Callable[[int, bytes], None] | None = None,
    ) -> tuple[array.array[int], int, int]:
        """Hash (and feed ``sink``) every page of the state at WAL ``frame``
        of the incarnation ``hdr`` describes: the database file overlaid with
        the newest copy of each page in frames ``1..frame``.

        Not ``nBackfill+1..frame``: a checkpoint held back by a reader skips
        any page whose newest frame is past the reader, though nBackfill
        still moves (SQLite's readers then take that page from the WAL), so
        the file may lack a page's version at or below nBackfill
        (tests/test_wal.py shows it). Only a WAL checkpointed completely,
        exactly at ``frame``, leaves the file exact. ``frame`` 0 means the
        state before the incarnation's first frame (the caller knows nothing
        of it is checkpointed).

        ``size`` is the state's size in pages (0: take it from the file).
        Returns the page hashes, the database checksum and the size. Raises
        :class:`CaptureRetry` if a checkpoint moved while it read. A page
        beyond the end of the file and in no overlaid frame is absent: it
        counts in the size but is neither hashed nor passed to ``sink``.
        """
        assert self._db_fd is not None
        ps = self.page_size
        backfilled = hdr.backfilled
        exact = frame == 0 or backfilled == hdr.max_frame == frame
        plan = _Plan({}, 0, 0, 0) if exact else self._plan(1, frame, 0, None)
        if not size:
            size = plan.size if plan.commits else os.fstat(self._db_fd).st_size // ps
        overlay = {p: f for p, f in plan.latest.items() if p <= size}
        wal_fd = self._wal() if overlay else None
        hashes = array.array("Q", bytes(8 * size))
        checksum = 0
        skip = lock_page(ps)
        chunk_pages = max(1, (4 << 20) // ps)
        for start in range(1, size + 1, chunk_pages):
            n = min(chunk_pages, size - start + 1)
            data = memoryview(os.pread(self._db_fd, n * ps, (start - 1) * ps))
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
                    # Past the end of the file and in no frame: SQLite can
                    # count a page in the database before writing it, and reads
                    # it as zeros. Absent here too (no hash, not in snapshots),
                    # as restore leaves it: a hole that reads as zeros.
                    continue
                if len(page) != ps:
                    raise CaptureRetry(f"{self.database} ends inside page {pgno} (a write in progress?)")
                h = page_hash(pgno, page)
                hashes[pgno - 1] = h
                checksum ^= h
                if sink is not None:
                    sink(pgno, page)
        if self.index().backfilled != backfilled:
            raise CaptureRetry("a checkpoint ran while the database was being read")
        return hashes, checksum, size

    # -- producing objects -------------------------------------------------------

    def new_generation(self, staging: Staging, generation: str) -> Staged:
        """Snapshot the database as it is now, as the start of ``generation``.

        The snapshot gets txid ``self.txid + 1`` and becomes the position.
        """
        new = self._begin_pin()
        try:
            hdr = self.index()
            self.page_size = self._db_page_size() or self.page_size
            wal_header = self._wal_header() if hdr.max_frame else None
            if hdr.max_frame:
                if wal_header is None or wal_header.salt != hdr.salt:
                    raise CaptureRetry("WAL header does not match the wal-index")
                self._check_frame(hdr.max_frame, hdr.salt, hdr.frame_checksum)
            txid = self.txid + 1
            staged, hashes, checksum, size = self._write_snapshot(
                staging, generation, txid, hdr.max_frame, hdr
            )
        except BaseException:
            self._release(new)
            raise
        self._advance_pin(new)
        seq = wal_header.checkpoint_seq if wal_header else -1
        checksum_at = hdr.frame_checksum if hdr.max_frame else (0, 0)
        self.position = Position(hdr.salt, hdr.max_frame, checksum_at, seq)
        self.txid, self._hashes, self.checksum, self.db_size = txid, hashes, checksum, size
        return staged

    def snapshot(self, staging: Staging, generation: str) -> Staged:
        """Snapshot the state at the current position, with the current txid,
        to shorten restores. Does not move the position."""
        pos = self.position
        assert pos is not None
        hdr = self.index()
        # After a restart of the WAL the old incarnation was wholly checkpointed
        # and ended at our position: the database file alone is that state.
        frame = pos.frame if hdr.salt == pos.salt else 0
        if hdr.backfilled > frame:
            raise CaptureRetry("frames past the position were checkpointed; capture first")
        staged, _hashes, checksum, _size = self._write_snapshot(
            staging, generation, self.txid, frame, hdr, self.db_size
        )
        if checksum != self.checksum:
            raise ContinuityLost("the snapshot does not match the replicated state (the database changed)")
        return staged

    def _write_snapshot(
        self, staging: Staging, generation: str, txid: int, frame: int, hdr: IndexHeader, size: int = 0
    ) -> tuple[Staged, array.array[int], int, int]:
        with staging.temp_object() as (f, finish):
            writer = ObjectWriter(f, self.page_size)
            hashes, checksum, size = self._scan(frame, hdr, size, writer.add)
            now = int(self._clock() * 1000)
            header = writer.finish(
                kind=_format.KIND_SNAPSHOT,
                first_txid=txid,
                last_txid=txid,
                timestamp_ms=now,
                db_size=size,
                truncate_size=size,
                pre_checksum=0,
                post_checksum=checksum,
            )
            key = _format.snapshot_key(generation, txid, now)
            path = finish(key)
        return Staged(key, path, header), hashes, checksum, size

    def capture(
        self,
        staging: Staging,
        generation: str,
        *,
        sync: bool = True,
        max_bytes: int = 0,
        on_piece: Callable[[Staged], None] | None = None,
    ) -> Staged | None:
        """Copy every transaction committed since the position into staged
        segments, advance the position and the pin. ``None`` if nothing new.
        With ``sync=False`` the last segment is not yet durable (see
        :meth:`Staging.make_durable`).

        With ``max_bytes``, segments hold at most that many bytes of frames
        (or one transaction, if it alone is larger): each but the last is
        durable and handed to ``on_piece``, which must record it, as it is
        written. A failure half-way (a full disk) keeps what was recorded:
        the position has moved past it, and the next call goes on from
        there. The pin moves only once everything is copied, so it stays at
        or before the position throughout.
        """
        got = self._copy(staging, generation, sync=sync, max_bytes=max_bytes, on_piece=on_piece)
        if got is None:
            return None
        staged, new = got
        self._advance_pin(new)
        return staged

    def _copy(
        self,
        staging: Staging,
        generation: str,
        *,
        sync: bool,
        max_bytes: int,
        on_piece: Callable[[Staged], None] | None,
    ) -> tuple[Staged, sqlite3.Connection] | None:
        """:meth:`capture` up to moving the pin: the last segment and the
        new pin, which the caller makes the only one (:meth:`_advance_pin`)
        once it may, or releases."""
        pos = self.position
        assert pos is not None
        hdr = self.index()
        if not self._has_new(pos, hdr):
            return None
        assert on_piece is not None or not max_bytes
        new = self._begin_pin()
        try:
            hdr = self.index()  # ends at or after the new pin's snapshot
            while True:
                staged = self._capture(staging, generation, pos, hdr, sync, max_bytes)
                assert self.position is not None
                pos = self.position
                if pos.frame == hdr.max_frame or on_piece is None:
                    break
                on_piece(staged)
        except BaseException:
            self._release(new)
            raise
        return staged, new

    def _copy_and_record(
        self,
        staging: Staging,
        generation: str,
        on_staged: Callable[[Staged], None],
        max_bytes: int = 0,
    ) -> Staged | None:
        """:meth:`capture`, with the last segment made durable and recorded
        (``on_staged``) *before* the pin moves past it: a process killed at
        any point leaves a recorded position the pin protected, so a later
        start continues the generation (with the pin moved first, a
        checkpoint could copy the frames past the recorded position into the
        database file meanwhile, and the next start had to begin a new
        generation). Raises :class:`ContinuityLost` if the copy cannot be
        made durable."""
        on_piece = on_staged if max_bytes else None
        got = self._copy(staging, generation, sync=False, max_bytes=max_bytes, on_piece=on_piece)
        if got is None:
            return None
        staged, new = got
        try:
            try:
                staging.make_durable(staged.path)
            except OSError as exc:
                raise ContinuityLost(f"a copied segment could not be made durable: {exc}") from exc
            on_staged(staged)
        except BaseException:
            self._release(new)  # the old pin stays: at or before the recorded position
            raise
        self._advance_pin(new)
        return staged

    def _has_new(self, pos: Position, hdr: IndexHeader) -> bool:
        if hdr.salt == pos.salt:
            if hdr.max_frame < pos.frame:
                raise ContinuityLost(
                    f"the WAL is shorter ({hdr.max_frame} frames) than the position ({pos.frame})"
                )
            return hdr.max_frame > pos.frame
        return hdr.max_frame > 0

    def _capture(
        self,
        staging: Staging,
        generation: str,
        pos: Position,
        hdr: IndexHeader,
        sync: bool = True,
        max_bytes: int = 0,
    ) -> Staged:
        if not self._has_new(pos, hdr):
            raise CaptureRetry("nothing new after pinning")
        wal_header = self._wal_header()
        if wal_header is None or wal_header.salt != hdr.salt:
            raise CaptureRetry("WAL header does not match the wal-index")
        if wal_header.page_size != self.page_size:
            raise ContinuityLost(f"page size changed from {self.page_size} to {wal_header.page_size}")
        if hdr.salt == pos.salt:
            if pos.frame:
                self._check_frame(pos.frame, pos.salt, pos.checksum)
            first = pos.frame + 1
        else:
            # A new WAL. Our pin let SQLite reset the WAL only once every frame
            # in it was copied and checkpointed, and it blocks checkpoints of
            # the new one, so there was exactly one reset and the database file
            # is the state at our position. The salts are no witness: SQLite
            # takes random ones when the writing connection never reset a WAL
            # itself (after our TRUNCATE, say), and the header's checkpoint
            # counter is that connection's own. What a complete checkpoint
            # does leave is the file cut to the database's size: check that.
            if pos.frame:
                assert self._db_fd is not None
                size = os.fstat(self._db_fd).st_size
                if size != self.db_size * self.page_size:
                    raise ContinuityLost(
                        f"the WAL was reset but the database file is {size} bytes, not the"
                        f" {self.db_size * self.page_size} replicated"
                    )
            first = 1
        last = hdr.max_frame
        self._check_frame(last, hdr.salt, hdr.frame_checksum)
        if hdr.backfilled >= first and hdr.salt != pos.salt:
            raise ContinuityLost("frames were checkpointed before sqlrepl copied them")
        last_checksum = hdr.frame_checksum
        if max_bytes and (last - first + 1) * self.page_size > max_bytes:
            last, last_checksum = self._piece_end(first, last, max_bytes)
            sync = True  # not the last piece: the caller records it at once

        step = FRAME_HEADER_SIZE + self.page_size
        small = (last - first + 1) * step <= _READ_CHUNK
        chunks = list(self._frames(first, last)) if small else None
        plan = self._plan(first, last, self.db_size, chunks)

        ps = self.page_size
        skip = lock_page(ps)
        hashes = self._hashes
        pre = self.checksum
        post = pre
        for p in range(plan.truncate + 1, len(hashes) + 1):
            post ^= hashes[p - 1]
        updates: list[tuple[int, int]] = []
        latest = plan.latest
        with staging.temp_object() as (f, finish):
            writer = ObjectWriter(f, ps)
            for f0, data in chunks if chunks is not None else self._frames(first, last):
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
            now = int(self._clock() * 1000)
            header = writer.finish(
                kind=_format.KIND_SEGMENT,
                first_txid=self.txid + 1,
                last_txid=self.txid + plan.commits,
                timestamp_ms=now,
                db_size=plan.size,
                truncate_size=plan.truncate,
                pre_checksum=pre,
                post_checksum=post,
            )
            key = _format.segment_key(generation, self.txid + 1, self.txid + plan.commits, now)
            path = finish(key, sync=sync)

        # The object is durable: now move the in-memory state forward.
        if plan.truncate < len(hashes):
            del hashes[plan.truncate :]
        if plan.size > len(hashes):
            hashes.extend(array.array("Q", bytes(8 * (plan.size - len(hashes)))))
        for pgno, h in updates:
            hashes[pgno - 1] = h
        self.checksum = post
        self.db_size = plan.size
        self.txid += plan.commits
        self.position = Position(hdr.salt, last, last_checksum, wal_header.checkpoint_seq)
        return Staged(key, path, header)

    def _piece_end(self, first: int, last: int, max_bytes: int) -> tuple[int, tuple[int, int]]:
        """The last commit frame in ``first..last`` that keeps the pages of
        ``first..`` within ``max_bytes`` (or the first commit frame, if even
        that is over), and the running checksum after it (the frame header
        carries it)."""
        ps = self.page_size
        step = FRAME_HEADER_SIZE + ps
        within = first + max_bytes // ps - 1
        end = 0
        for f0, data in self._frames(first, last):
            for i, off in enumerate(range(0, len(data), step)):
                f = f0 + i
                if f > within and end:
                    return self._end_at(end)
                if _FRAME_HDR.unpack_from(data, off)[1]:
                    end = f
        return self._end_at(end or last)

    def _end_at(self, frame: int) -> tuple[int, tuple[int, int]]:
        fd = self._wal()
        raw = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(frame, self.page_size)) if fd is not None else b""
        if len(raw) < FRAME_HEADER_SIZE:
            raise CaptureRetry(f"{self.wal_path} is shorter than the wal-index says")
        _pgno, _commit, _salt, c0, c1 = parse_frame_header(raw)
        return frame, (c0, c1)

    def wal_deleted(self) -> bool:
        """The wal-index says the WAL holds commits, but there is no -wal
        file: it was deleted under the app, whose connections go on writing
        into the deleted file (ours keep it from being removed otherwise)."""
        try:
            frames = self.index().max_frame
        except CaptureRetry:
            return False
        return frames > 0 and not os.path.exists(self.wal_path)

    # -- checkpoints ------------------------------------------------------------

    def wal_frames(self) -> int:
        """Frames in the current WAL incarnation (since its last restart)."""
        return self.index().max_frame

    def uncopied_frames(self) -> int:
        """Frames committed to the WAL since the position."""
        assert self.position is not None
        hdr = self.index()
        if hdr.salt == self.position.salt:
            return max(0, hdr.max_frame - self.position.frame)
        return hdr.max_frame

    def checkpoint(
        self,
        staging: Staging,
        generation: str,
        *,
        truncate_over: int,
        on_staged: Callable[[Staged], None],
        restart: bool = True,
    ) -> Staged | None:
        """Checkpoint what has been copied and let SQLite restart the WAL.

        First a PASSIVE checkpoint (it cannot pass our pin, so only copied
        frames move into the database file). If that completes the WAL, we
        re-pin on read-mark zero so the next writer restarts it. Under a
        steady stream of commits it never completes; so, with ``restart``
        (the WAL has grown long), we then hold the
        write lock for a moment (``BEGIN IMMEDIATE``): copy the last few
        frames into a staged file, checkpoint them, re-pin, release. If a
        writer holds the lock for long, we try again next time.

        Under the lock, in this order: copy, make the copy durable, record
        the position (``on_staged``), move the pin, checkpoint. A process killed at any
        point of it leaves a recorded position that covers every frame a
        later writer could drop from the WAL, so the next start continues
        the generation. (Recording after the lock was released saved a few
        milliseconds of lock hold, but a kill in that gap cost a new
        generation: a full snapshot, found by the multi-process kill test.)
        Returns the segment captured under the lock, if any.
        """
        if self._checkpoint_and_repin(truncate_over) or not restart:
            return None
        barrier = self._barrier()
        if not self._take_write_lock(barrier, timeout=0.5):
            return None  # a long write transaction: try again next time
        try:
            # Durable and recorded before the checkpoint: once the lock is
            # released (or this process dies) a writer may restart the WAL,
            # and the position must already cover these frames.
            staged = self._copy_and_record(staging, generation, on_staged)
            self._checkpoint_and_repin(None)
        finally:
            barrier.execute("ROLLBACK")
        self._truncate_if_large(truncate_over)
        return staged

    def _barrier(self) -> sqlite3.Connection:
        if self._barrier_conn is None:
            self._barrier_conn = self._connect()
            self._barrier_conn.execute("PRAGMA busy_timeout=0")
        return self._barrier_conn

    def _take_write_lock(self, conn: sqlite3.Connection, *, timeout: float) -> bool:
        """``BEGIN IMMEDIATE`` on ``conn`` within ``timeout`` seconds.

        SQLite's own busy handler sleeps in steps of up to 100 ms and loses
        to a writer committing in a loop (measured: 0.7-1 s, often never).
        We retry every 50 us instead, and ask this process's sqlrepl
        connections to pause 200 us after their commits meanwhile
        (``wants_write_lock``): the lock is then ours within a millisecond.
        """
        deadline = time.monotonic() + timeout
        self.wants_write_lock = True
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return True
                except sqlite3.OperationalError:
                    if time.monotonic() > deadline or self.checkpointer_waiting():
                        return False  # (a checkpointer's write lock: see give_way)
                    time.sleep(0.00005)
        finally:
            self.wants_write_lock = False

    def _checkpoint_and_repin(self, truncate_over: int | None) -> bool:
        """PASSIVE checkpoint; if it completed the WAL, move our pin to
        read-mark zero (and maybe TRUNCATE). True if the WAL was completed."""
        assert self._ckpt is not None
        assert self.position is not None
        busy, log, done = self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if busy or log <= 0 or log != done:
            return False
        new = self._begin_pin()
        hdr = self.index()
        if hdr.salt != self.position.salt or hdr.max_frame != self.position.frame:
            self._release(new)  # commits raced in; the next capture moves on
            return False
        self._advance_pin(new)
        if truncate_over is not None:
            self._truncate_if_large(truncate_over)
        return True

    def _truncate_if_large(self, truncate_over: int) -> None:
        """TRUNCATE the WAL file if it is large. Safe at any time: it only
        succeeds when every frame is checkpointed and no reader uses the WAL,
        and our pin (read-mark zero, or at our position) guarantees that then
        every frame has been copied."""
        assert self._ckpt is not None
        try:
            size = os.stat(self.wal_path).st_size
        except FileNotFoundError:
            return
        if size <= truncate_over:
            return
        self._ckpt.execute("PRAGMA busy_timeout=0")
        try:
            self._ckpt.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:
            pass
        finally:
            self._ckpt.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")

    # -- other connections' checkpoints ----------------------------------------

    def checkpointer_waiting(self) -> bool:
        """Cheap (two lock queries): is a FULL, RESTART or TRUNCATE checkpoint
        of another connection (another process's, or one of the app's own)
        holding the write lock, probably waiting for our pin? False once
        :meth:`give_way` has done all it could for the WAL as it is now."""
        if self._shm_fd is None or not checkpointer_waiting(self._shm_fd):
            return False
        return self._gave_way_at is None or self.index() != self._gave_way_at

    def give_way(
        self,
        staging: Staging,
        generation: str,
        *,
        on_staged: Callable[[Staged], None],
        timeout: float = 0.5,
        max_bytes: int = 0,
    ) -> Staged | None:
        """Let another connection's FULL, RESTART or TRUNCATE checkpoint
        through, instead of making it (and, behind its write lock, every
        writer) wait for its whole busy timeout.

        Such a checkpoint holds the write lock, so the WAL cannot grow
        meanwhile. We copy every committed frame, make the copy durable and
        record the position (``on_staged``), as under our own write barrier;
        then our pin no longer holds back its copying. Its restart of the
        WAL waits for every reader to leave the WAL, so once it has copied
        the whole WAL we move our pin onto read-mark zero: a reader of the
        database file alone, which lets the WAL restart but keeps any
        checkpoint from writing the *next* WAL's frames into the file
        before we copy them. That is the state our own complete checkpoint
        leaves, and the restart is then the one :meth:`capture` proves (the
        file cut to the replicated size): the generation goes on.

        Returns the captured segment, if any (already recorded). Returns
        once the checkpointer is gone, once our pin sits on read-mark zero
        (nothing of ours is then in its way: :meth:`checkpointer_waiting`
        says False until the WAL moves), or after about ``timeout`` seconds
        of waiting, so that the caller can do its other work: it calls
        again while :meth:`checkpointer_waiting`. So we give way for as long
        as the checkpointer waits, which its own busy timeout bounds, however
        long the copy and its recording took (a fixed half second in all,
        once, let a checkpoint that finished copying after it wait out its
        busy timeout behind our pin). With ``max_bytes`` the copy is made in
        pieces as :meth:`capture` makes them, each recorded (``on_staged``)
        as it is written, so that a full staging disk that has room for a
        piece still lets the checkpoint through.
        """
        staged = None
        assert self._shm_fd is not None
        while True:
            # In pieces: a backlog larger than the staging disk's free room
            # would otherwise fail whole on every pass while the checkpoint
            # (and every writer behind it) waits.
            piece = self._copy_and_record(staging, generation, on_staged, max_bytes)
            if piece is None:
                break
            staged = piece
            if not checkpointer_waiting(self._shm_fd):
                return staged  # gone already, or it was a writer beside a PASSIVE checkpoint
        pos = self.position
        assert pos is not None
        deadline = time.monotonic() + timeout
        repinned = -1.0
        while checkpointer_waiting(self._shm_fd):
            hdr = self.index()
            if hdr.salt != pos.salt or hdr.max_frame != pos.frame:
                return staged  # reset by it, or written to: it is no longer waiting for us
            # Its busy handler retries every few to 100 ms; a fresh pin each
            # 20 ms takes the newest read-mark, and read-mark zero once the
            # whole WAL is copied.
            if time.monotonic() - repinned >= 0.02:
                repinned = time.monotonic()
                if self._repin_at(pos):
                    # Still waiting, with nothing of ours in its way (another
                    # reader, say): do not do all this again until the WAL moves.
                    self._gave_way_at = self.index()
                    return staged
            if time.monotonic() >= deadline:
                return staged
            time.sleep(0.001)
        return staged

    def _repin_at(self, pos: Position) -> bool:
        """Take a fresh pin if the WAL still ends at ``pos``; True if it sits
        on read-mark zero (the WAL wholly checkpointed before and after it
        was taken: SQLite's readers take read-mark zero exactly then)."""
        before = self.index()
        new = self._begin_pin()
        now = self.index()
        if now.salt != pos.salt or now.max_frame != pos.frame:
            self._release(new)
            return False
        self._advance_pin(new)
        return before.salt == pos.salt and before.backfilled == before.max_frame == pos.frame


_abandoned: list[Any] = []
