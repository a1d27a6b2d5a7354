"""The live database as capture reads it: its files, its pins, its wal-index.

A *pin* is a read transaction on one of our own connections. SQLite never
checkpoints a frame past a reader's read-mark, nor restarts the WAL while a
reader uses it, so a pin whose snapshot ends at or before the last frame
copied protects every frame not yet copied (the module docstring of
``_capture`` says how the capture moves it). :class:`LiveWal` owns those
connections and the long-lived descriptors on the database, ``-wal`` and
``-shm`` files, and reads the wal-index header and WAL frames through them.
It also checks that the WAL still continues from a :class:`Position` (the
last frame copied), raising :class:`ContinuityLost` where it does not.

Everything here is blocking and meant for one worker thread at a time.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._errors import WalModeError
from ._wal import (
    FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    IndexHeader,
    WalHeader,
    file_replaced,
    frame_offset,
    long_lived_fd,
    parse_frame_header,
    parse_wal_header,
    read_index_header,
)

__all__ = ["CaptureRetry", "ContinuityLost", "LiveWal", "Position"]

_READ_CHUNK = 8 << 20


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


class LiveWal:
    """Our connections to one database (the pins, a checkpointing one, a
    write barrier) and descriptors on its files. Not thread-safe.

    ``open`` before anything else; ``close`` releases the pins (if no other
    connection is open, SQLite then checkpoints and deletes the WAL).
    """

    def __init__(self, database: str, *, busy_timeout: float) -> None:
        self.database = os.path.abspath(database)
        self.wal_path = self.database + "-wal"
        self.shm_path = self.database + "-shm"
        self.busy_timeout = busy_timeout
        self._pins: list[sqlite3.Connection] = []
        self._spare: list[sqlite3.Connection] = []
        self.ckpt: sqlite3.Connection | None = None  # runs our checkpoints
        self._barrier: sqlite3.Connection | None = None
        self.db_fd: int | None = None
        self.shm_fd: int | None = None
        self._wal_fd: int | None = None
        self._wal_ino: tuple[int, int] | None = None
        self.page_size = 0

    # -- connections and files ------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.database, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
        )
        # Our own connections must never checkpoint on their own.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def open(self, *, set_wal: bool = False) -> None:
        """Open the checkpointing connection and the database descriptor;
        check (or, with ``set_wal``, set) WAL mode. Raises
        :class:`WalModeError` if the database is not in WAL mode and cannot
        be put in it."""
        if not os.path.exists(self.database):
            raise FileNotFoundError(f"database {self.database} does not exist")
        conn = self.connect()
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
        self.ckpt = conn
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        self.db_fd = long_lived_fd(self.database)
        self.page_size = self.db_page_size()

    def close(self) -> None:
        """Release the pins and close every connection."""
        others = [c for c in (self.ckpt, self._barrier) if c is not None]
        for conn in [*self._pins, *self._spare, *others]:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._pins, self._spare, self.ckpt, self._barrier = [], [], None, None
        if self._wal_fd is not None:
            os.close(self._wal_fd)  # the -wal file carries no locks of SQLite's
            self._wal_fd = None

    def replaced(self) -> str | None:
        """How the database file at our path is no longer the one we read
        (deleted, or another file put there), or ``None``. One ``stat`` and
        one ``fstat``: cheap enough for every poll."""
        if self.db_fd is None:
            return None
        return file_replaced(self.database, self.db_fd)

    def reopen(self) -> None:
        """After :meth:`replaced`: open the file now at our path and let go
        of the old one. Raises (keeping the old file) :class:`WalModeError`
        if the new file is not in WAL mode, ``FileNotFoundError`` if there is
        none yet, :class:`CaptureRetry` if it is still empty.

        Closing our connections to the old file is safe: SQLite sees that
        the file moved (``SQLITE_FCNTL_HAS_MOVED``) and then neither
        checkpoints nor deletes the ``-wal``/``-shm`` at the path, which are
        the new file's. Long-lived descriptors on the old file stay open
        (see :func:`long_lived_fd`).
        """
        old = (self._pins, self._spare, self.ckpt, self._barrier, self.db_fd, self.page_size)
        self._pins, self._spare, self._barrier = [], [], None
        try:
            self.open()
            if not self.page_size:
                raise CaptureRetry(f"{self.database} is still empty")
        except BaseException:
            if self.ckpt is not None and self.ckpt is not old[2]:
                self.ckpt.close()
            self._pins, self._spare, self.ckpt, self._barrier, self.db_fd, self.page_size = old
            raise
        for conn in [*old[0], *old[1], old[2], old[3]]:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
        self._wal_fd, self._wal_ino, self.shm_fd = None, None, None

    def abandon(self) -> None:
        """After ``fork()``, in the child: drop everything without closing it.

        Closing SQLite connections inherited across fork can checkpoint or
        delete the parent's WAL; the objects are leaked on purpose.
        """
        _abandoned.append((self._pins, self._spare, self.ckpt, self._barrier))
        self._pins, self._spare, self.ckpt, self._barrier, self._wal_fd = [], [], None, None, None

    def barrier(self) -> sqlite3.Connection:
        """The connection that takes the write lock for our checkpoints
        (no busy timeout: :meth:`Checkpoints.take_write_lock` retries)."""
        if self._barrier is None:
            self._barrier = self.connect()
            self._barrier.execute("PRAGMA busy_timeout=0")
        return self._barrier

    def db_page_size(self) -> int:
        """The page size in the database file's header (0 if still empty)."""
        assert self.db_fd is not None
        head = os.pread(self.db_fd, 100, 0)
        if len(head) < 100:
            return 0
        (ps,) = struct.unpack_from(">H", head, 16)
        return 65536 if ps == 1 else ps

    def wal_fd(self) -> int | None:
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

    def wal_header(self) -> WalHeader | None:
        fd = self.wal_fd()
        return parse_wal_header(os.pread(fd, WAL_HEADER_SIZE, 0)) if fd is not None else None

    # -- pins ----------------------------------------------------------------

    def begin_pin(self) -> sqlite3.Connection:
        """A new pin: a read transaction on a spare (or new) connection."""
        conn = self._spare.pop() if self._spare else self.connect()
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        self._spare.append(conn)

    def advance_pin(self, new: sqlite3.Connection) -> None:
        """Make ``new`` the only pin (the caller has copied up to its end)."""
        old, self._pins = self._pins, [new]
        for conn in old:
            self.release(conn)

    # -- the wal-index and the WAL's frames -------------------------------------

    def index(self) -> IndexHeader:
        """The current wal-index header (retried while SQLite rewrites it)."""
        if self.shm_fd is None:
            self.shm_fd = long_lived_fd(self.shm_path)
        for _ in range(400):
            if self.shm_fd is not None:
                hdr = read_index_header(self.shm_fd)
                if hdr is not None:
                    return hdr
            else:
                self.shm_fd = long_lived_fd(self.shm_path)
            time.sleep(0.0005)
        raise CaptureRetry(f"{self.shm_path}: wal-index header unreadable (SQLite is rewriting it?)")

    def frames(self, first: int, last: int) -> Iterator[tuple[int, memoryview]]:
        """Chunks of whole frames ``first..last``: ``(first frame in chunk, bytes)``."""
        fd = self.wal_fd()
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

    def chunk_frames(self) -> int:
        """How many frames :meth:`frames` reads at once."""
        return max(1, _READ_CHUNK // (FRAME_HEADER_SIZE + self.page_size))

    def check_frame(self, frame: int, salt: bytes, checksum: tuple[int, int] | None) -> int:
        """Check frame ``frame`` still has ``salt`` (and ``checksum``); return
        its commit size. Raises :class:`ContinuityLost` if it does not."""
        fd = self.wal_fd()
        raw = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(frame, self.page_size)) if fd is not None else b""
        if len(raw) < FRAME_HEADER_SIZE:
            raise ContinuityLost(f"WAL frame {frame} is gone (the WAL is shorter)")
        _pgno, commit, fsalt, c0, c1 = parse_frame_header(raw)
        if fsalt != salt or (checksum is not None and (c0, c1) != checksum):
            raise ContinuityLost(f"WAL frame {frame} was overwritten")
        return commit

    def checksum_after(self, frame: int) -> tuple[int, int]:
        """The running checksum after ``frame`` (its frame header carries it)."""
        fd = self.wal_fd()
        raw = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(frame, self.page_size)) if fd is not None else b""
        if len(raw) < FRAME_HEADER_SIZE:
            raise CaptureRetry(f"{self.wal_path} is shorter than the wal-index says")
        _pgno, _commit, _salt, c0, c1 = parse_frame_header(raw)
        return c0, c1

    # -- continuity with a position ---------------------------------------------

    def has_new(self, pos: Position, hdr: IndexHeader) -> bool:
        """Has the WAL ``hdr`` describes frames past ``pos``? Raises
        :class:`ContinuityLost` if it is shorter than ``pos``."""
        if hdr.salt == pos.salt:
            if hdr.max_frame < pos.frame:
                raise ContinuityLost(
                    f"the WAL is shorter ({hdr.max_frame} frames) than the position ({pos.frame})"
                )
            return hdr.max_frame > pos.frame
        return hdr.max_frame > 0

    def continues(self, pos: Position, hdr: IndexHeader, db_size: int) -> tuple[int, WalHeader]:
        """Check that the WAL ``hdr`` describes continues from ``pos`` (after
        which the database has ``db_size`` pages); return the first frame to
        copy and the WAL header. Raises :class:`ContinuityLost` if it does
        not, :class:`CaptureRetry` if the WAL is being rewritten."""
        if not self.has_new(pos, hdr):
            raise CaptureRetry("nothing new after pinning")
        wal_header = self.wal_header()
        if wal_header is None or wal_header.salt != hdr.salt:
            raise CaptureRetry("WAL header does not match the wal-index")
        if wal_header.page_size != self.page_size:
            raise ContinuityLost(f"page size changed from {self.page_size} to {wal_header.page_size}")
        if hdr.salt == pos.salt:
            if pos.frame:
                self.check_frame(pos.frame, pos.salt, pos.checksum)
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
                assert self.db_fd is not None
                size = os.fstat(self.db_fd).st_size
                if size != db_size * self.page_size:
                    raise ContinuityLost(
                        f"the WAL was reset but the database file is {size} bytes, not the"
                        f" {db_size * self.page_size} replicated"
                    )
            first = 1
        self.check_frame(hdr.max_frame, hdr.salt, hdr.frame_checksum)
        if hdr.backfilled >= first and hdr.salt != pos.salt:
            raise ContinuityLost("frames were checkpointed before sqlrepl copied them")
        return first, wal_header

    def wal_deleted(self) -> bool:
        """The wal-index says the WAL holds commits, but there is no -wal
        file: it was deleted under the app, whose connections go on writing
        into the deleted file (ours keep it from being removed otherwise)."""
        try:
            frames = self.index().max_frame
        except CaptureRetry:
            return False
        return frames > 0 and not os.path.exists(self.wal_path)


_abandoned: list[Any] = []
