"""Capturing the live database: positions, segments and snapshots.

Everything here is blocking and meant for one worker thread at a time; the
async replicator (``_replicator``) calls it through ``anyio.to_thread``.
:class:`Capture` is the face the replicator sees; it reads through a
:class:`LiveWal` (``_livewal``: pins, wal-index, frames), keeps the
replicated state as page hashes (``_pages``: planning, scanning, writing
segments) and leaves checkpoints to :class:`Checkpoints` (``_checkpoints``:
ours, and giving way to other connections').

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
file overlaid with the newest copy of each page in frames ``1..F`` of the
current WAL. (Not just ``nBackfill+1..F``: a checkpoint held back by a reader
skips pages rewritten past the reader, so the file can lack a page's version
at or below nBackfill; :func:`_pages.scan` says more.)

Continuity is checked, never assumed: a WAL shorter than our position, a
copied frame whose checksum changed, a WAL restart after which the database
file is not cut to the replicated size (what a complete checkpoint leaves;
the new salts are no witness, as SQLite picks random ones when the writer
never restarted a WAL itself), frames checkpointed before they were copied,
or a database file whose checksum differs from the one recorded all raise
:class:`ContinuityLost`, and the replicator starts a new generation from a
snapshot.
"""

from __future__ import annotations

import array
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from . import _format, _pages, _progress
from ._checkpoints import Checkpoints
from ._format import ObjectWriter
from ._livewal import CaptureRetry, ContinuityLost, LiveWal, Position
from ._pages import Staged
from ._staging import Staging
from ._wal import IndexHeader

__all__ = ["Capture", "CaptureRetry", "ContinuityLost", "Position", "Staged"]


class Capture:
    """The live database as the replicator reads it. See the module docstring.

    Not thread-safe; every method blocks. ``open`` before anything else and
    ``close`` at the end (closing releases the pins: if no other connection is
    open, SQLite then checkpoints and deletes the WAL, so flush first).
    """

    def __init__(
        self, database: str, *, busy_timeout: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.wal = LiveWal(database, busy_timeout=busy_timeout)
        self.database = self.wal.database
        self.wal_path = self.wal.wal_path
        self.shm_path = self.wal.shm_path
        self._clock = clock  # timestamps of objects
        self.position: Position | None = None
        self.txid = 0
        self.db_size = 0
        self.checksum = 0
        self._hashes = array.array("Q")
        # Progress hook: the replicator's snapshot tracker (sqlrepl._progress).
        self.snapshot_progress: _progress.SnapshotTracker | None = None
        self._checkpoints = Checkpoints(self)

    @property
    def page_size(self) -> int:
        return self.wal.page_size

    @property
    def wants_write_lock(self) -> bool:
        """Our write barrier is waiting for the lock: this process's sqlrepl
        connections pause briefly after their commits (read by app threads)."""
        return self._checkpoints.wants_write_lock

    # -- the files --------------------------------------------------------------

    def open(self, *, set_wal: bool = False) -> None:
        """Open connections and descriptors; check (or, with ``set_wal``, set)
        WAL mode. Raises :class:`WalModeError` if the database is not in WAL
        mode and cannot be put in it."""
        self.wal.open(set_wal=set_wal)

    def close(self) -> None:
        """Release pins and close connections (see the class docstring)."""
        self.wal.close()

    def replaced(self) -> str | None:
        """See :meth:`LiveWal.replaced`: how the database file at our path is
        no longer the one we read, or ``None``. Cheap enough for every poll."""
        return self.wal.replaced()

    def reopen(self) -> None:
        """After :meth:`replaced`: open the file now at our path and let go
        of the old one (:meth:`LiveWal.reopen` says what it raises, keeping
        the old file). The position is forgotten: the caller starts a new
        generation."""
        self.wal.reopen()
        self.position = None
        self.db_size, self.checksum, self._hashes = 0, 0, array.array("Q")

    def abandon(self) -> None:
        """After ``fork()``, in the child: drop everything without closing it
        (closing inherited SQLite connections can checkpoint or delete the
        parent's WAL)."""
        self.wal.abandon()

    def index(self) -> IndexHeader:
        """The current wal-index header (retried while SQLite rewrites it)."""
        return self.wal.index()

    def changed(self) -> bool:
        """Cheap (one small read): might anything be new since the position?"""
        pos = self.position
        if pos is None:
            return True
        hdr = self.index()
        return hdr.max_frame != pos.frame if hdr.salt == pos.salt else hdr.max_frame > 0

    def wal_deleted(self) -> bool:
        """See :meth:`LiveWal.wal_deleted`: the -wal file was deleted under the app."""
        return self.wal.wal_deleted()

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

    # -- establishing a position ----------------------------------------------

    def start(self, state: dict[str, Any] | None) -> str | None:
        """Take the first pin and decide whether the recorded ``state`` still
        continues in this database. Returns ``None`` if it does (the position,
        txid and checksums are loaded, verified against the database file), or
        the reason a new generation is needed."""
        self.wal.advance_pin(self.wal.begin_pin())  # (releases a previous attempt's)
        if state is None:
            return "no replication state yet"
        if int(state.get("page_size", 0)) != self.page_size:
            return "page size changed"
        pos = Position.from_json(state["wal"])
        hdr = self.index()
        wal_header = self.wal.wal_header()
        if pos.frame and hdr.salt == pos.salt and pos.frame <= hdr.max_frame:
            try:
                size = self.wal.check_frame(pos.frame, pos.salt, pos.checksum)
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

    def _scan(
        self,
        frame: int,
        hdr: IndexHeader,
        size: int,
        sink: Callable[[int, bytes], None] | None = None,
    ) -> tuple[array.array[int], int, int]:
        """The page hashes, checksum and size of the state at WAL ``frame``
        (feeding each page to ``sink``): see :func:`_pages.scan`."""
        return _pages.scan(self.wal, frame, hdr, size, sink, progress=self.snapshot_progress)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- snapshots ----------------------------------------------------------------

    def new_generation(self, staging: Staging, generation: str) -> Staged:
        """Snapshot the database as it is now, as the start of ``generation``.

        The snapshot gets txid ``self.txid + 1`` and becomes the position.
        """
        wal = self.wal
        new = wal.begin_pin()
        try:
            hdr = self.index()
            wal.page_size = wal.db_page_size() or wal.page_size
            wal_header = wal.wal_header() if hdr.max_frame else None
            if hdr.max_frame:
                if wal_header is None or wal_header.salt != hdr.salt:
                    raise CaptureRetry("WAL header does not match the wal-index")
                wal.check_frame(hdr.max_frame, hdr.salt, hdr.frame_checksum)
            txid = self.txid + 1
            staged, hashes, checksum, size = self._write_snapshot(
                staging, generation, txid, hdr.max_frame, hdr
            )
        except BaseException:
            wal.release(new)
            raise
        wal.advance_pin(new)
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

    # -- segments -------------------------------------------------------------------

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
        self.wal.advance_pin(new)
        return staged

    def copy_and_record(
        self,
        staging: Staging,
        generation: str,
        on_staged: Callable[[Staged], None],
        max_bytes: int = 0,
    ) -> Staged | None:
        """:meth:`capture`, with the last segment made durable and recorded
        (``on_staged``) *before* the pin moves past it, so that while this
        process lives no checkpoint copies a frame past the recorded position
        into the database file; if recording fails, the old pin stays. (A
        process killed before the record loses its pin all the same: a
        checkpoint run after that makes the next start begin a new
        generation, which loses nothing.) Raises :class:`ContinuityLost` if
        the copy cannot be made durable."""
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
            self.wal.release(new)  # the old pin stays: at or before the recorded position
            raise
        self.wal.advance_pin(new)
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
        new pin, which the caller makes the only one
        (:meth:`LiveWal.advance_pin`) once it may, or releases."""
        pos = self.position
        assert pos is not None
        hdr = self.index()
        if not self.wal.has_new(pos, hdr):
            return None
        assert on_piece is not None or not max_bytes
        new = self.wal.begin_pin()
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
            self.wal.release(new)
            raise
        return staged, new

    def _capture(
        self,
        staging: Staging,
        generation: str,
        pos: Position,
        hdr: IndexHeader,
        sync: bool = True,
        max_bytes: int = 0,
    ) -> Staged:
        """Stage one segment after ``pos``, up to ``hdr``'s last frame (or a
        piece of at most ``max_bytes``), and move the position past it."""
        first, wal_header = self.wal.continues(pos, hdr, self.db_size)
        last, last_checksum = hdr.max_frame, hdr.frame_checksum
        if max_bytes and (last - first + 1) * self.page_size > max_bytes:
            last, last_checksum = _pages.piece_end(self.wal, first, last, max_bytes)
            sync = True  # not the last piece: the caller records it at once
        written = _pages.write_segment(
            self.wal,
            staging,
            generation,
            first,
            last,
            txid=self.txid,
            db_size=self.db_size,
            hashes=self._hashes,
            checksum=self.checksum,
            timestamp_ms=self._now_ms,
            sync=sync,
        )
        # The object is written: now move the in-memory state forward.
        _pages.advance_hashes(self._hashes, written)
        self.checksum = written.post_checksum
        self.db_size = written.plan.size
        self.txid += written.plan.commits
        self.position = Position(hdr.salt, last, last_checksum, wal_header.checkpoint_seq)
        return written.staged

    # -- checkpoints (see _checkpoints) ------------------------------------------------

    def checkpoint(
        self,
        staging: Staging,
        generation: str,
        *,
        truncate_over: int,
        on_staged: Callable[[Staged], None],
        restart: bool = True,
    ) -> Staged | None:
        """Checkpoint what has been copied and let SQLite restart the WAL
        (:meth:`Checkpoints.checkpoint`)."""
        return self._checkpoints.checkpoint(
            staging, generation, truncate_over=truncate_over, on_staged=on_staged, restart=restart
        )

    def checkpointer_waiting(self) -> bool:
        """Is another connection's blocking checkpoint waiting, maybe for our
        pin (:meth:`Checkpoints.checkpointer_waiting`)? Cheap."""
        return self._checkpoints.checkpointer_waiting()

    def give_way(
        self,
        staging: Staging,
        generation: str,
        *,
        on_staged: Callable[[Staged], None],
        timeout: float = 0.5,
        max_bytes: int = 0,
    ) -> Staged | None:
        """Copy, record and step aside for another connection's FULL,
        RESTART or TRUNCATE checkpoint (:meth:`Checkpoints.give_way`)."""
        return self._checkpoints.give_way(
            staging, generation, on_staged=on_staged, timeout=timeout, max_bytes=max_bytes
        )
