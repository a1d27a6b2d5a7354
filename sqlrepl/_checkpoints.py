"""Checkpoints around the pin: ours, and giving way to other connections'.

Our own checkpoints move only copied frames into the database file (the pin
sees to that) and let SQLite restart the WAL once it is wholly copied; a
short write barrier makes that happen under a steady stream of commits.
Another connection's FULL, RESTART or TRUNCATE checkpoint holds the write
lock and waits for readers, ours included: we copy what the pin protects,
record it, and step aside (:meth:`Checkpoints.give_way`). Blocking, one
worker thread at a time, like the :class:`Capture` it serves.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._livewal import Position
from ._pages import Staged
from ._staging import Staging
from ._wal import IndexHeader, checkpointer_waiting

if TYPE_CHECKING:
    from ._capture import Capture

__all__ = ["Checkpoints"]


class Checkpoints:
    """The checkpoints of one :class:`Capture` (which calls in here for its
    methods of the same names)."""

    def __init__(self, capture: Capture) -> None:
        self._capture = capture
        self._wal = capture.wal
        # Read by the app's threads (see take_write_lock): a plain attribute.
        self.wants_write_lock = False
        self._gave_way_at: IndexHeader | None = None

    # -- ours ---------------------------------------------------------------------

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
        (the WAL has grown long), we then hold the write lock for a moment
        (``BEGIN IMMEDIATE``): copy the last few frames into a staged file,
        checkpoint them, re-pin, release. If a writer holds the lock for
        long, we try again next time.

        Under the lock, in this order: copy, make the copy durable, record
        the position (``on_staged``), move the pin, checkpoint. A process
        killed after the record leaves a recorded position that covers every
        frame our checkpoint lets a later writer drop from the WAL, so the
        next start continues the generation; one killed before it has
        checkpointed nothing past the recorded position (if someone else
        does later, the next start begins a new generation: no commit is
        lost). Recording after the lock was released saved a few
        milliseconds of lock hold, but a kill in that gap cost a new
        generation: a full snapshot, found by the multi-process kill test.
        Returns the segment captured under the lock, if any.
        """
        if self._checkpoint_and_repin(truncate_over) or not restart:
            return None
        barrier = self._wal.barrier()
        if not self.take_write_lock(barrier, timeout=0.5):
            return None  # a long write transaction: try again next time
        try:
            # Durable and recorded before the checkpoint: once the lock is
            # released (or this process dies) a writer may restart the WAL,
            # and the position must already cover these frames.
            staged = self._capture.copy_and_record(staging, generation, on_staged)
            self._checkpoint_and_repin(None)
        finally:
            barrier.execute("ROLLBACK")
        self._truncate_if_large(truncate_over)
        return staged

    def take_write_lock(self, conn: sqlite3.Connection, *, timeout: float) -> bool:
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
        wal, pos = self._wal, self._capture.position
        assert wal.ckpt is not None
        assert pos is not None
        busy, log, done = wal.ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if busy or log <= 0 or log != done:
            return False
        new = wal.begin_pin()
        hdr = wal.index()
        if hdr.salt != pos.salt or hdr.max_frame != pos.frame:
            wal.release(new)  # commits raced in; the next capture moves on
            return False
        wal.advance_pin(new)
        if truncate_over is not None:
            self._truncate_if_large(truncate_over)
        return True

    def _truncate_if_large(self, truncate_over: int) -> None:
        """TRUNCATE the WAL file if it is large. Safe at any time: it only
        succeeds when every frame is checkpointed and no reader uses the WAL,
        and our pin (read-mark zero, or at our position) guarantees that then
        every frame has been copied."""
        ckpt = self._wal.ckpt
        assert ckpt is not None
        try:
            size = os.stat(self._wal.wal_path).st_size
        except FileNotFoundError:
            return
        if size <= truncate_over:
            return
        ckpt.execute("PRAGMA busy_timeout=0")
        try:
            ckpt.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:
            pass
        finally:
            ckpt.execute(f"PRAGMA busy_timeout={int(self._wal.busy_timeout * 1000)}")

    # -- other connections' ---------------------------------------------------------

    def checkpointer_waiting(self) -> bool:
        """Cheap (two lock queries): is a FULL, RESTART or TRUNCATE checkpoint
        of another connection (another process's, or one of the app's own)
        holding the write lock, probably waiting for our pin? False once
        :meth:`give_way` has done all it could for the WAL as it is now."""
        shm = self._wal.shm_fd
        if shm is None or not checkpointer_waiting(shm):
            return False
        return self._gave_way_at is None or self._wal.index() != self._gave_way_at

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
        leaves, and the restart is then the one :meth:`Capture.capture`
        proves (the file cut to the replicated size): the generation goes on.

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
        pieces as :meth:`Capture.capture` makes them, each recorded
        (``on_staged``) as it is written, so that a full staging disk that
        has room for a piece still lets the checkpoint through.
        """
        shm = self._wal.shm_fd
        assert shm is not None
        staged = None
        while True:
            # In pieces: a backlog larger than the staging disk's free room
            # would otherwise fail whole on every pass while the checkpoint
            # (and every writer behind it) waits.
            piece = self._capture.copy_and_record(staging, generation, on_staged, max_bytes)
            if piece is None:
                break
            staged = piece
            if not checkpointer_waiting(shm):
                return staged  # gone already, or it was a writer beside a PASSIVE checkpoint
        pos = self._capture.position
        assert pos is not None
        self._step_aside(shm, pos, timeout)
        return staged

    def _step_aside(self, shm: int, pos: Position, timeout: float) -> None:
        """Re-pin while the checkpointer waits and the WAL still ends at
        ``pos`` (everything copied), until our pin is on read-mark zero or
        ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        repinned = -1.0
        while checkpointer_waiting(shm):
            hdr = self._wal.index()
            if hdr.salt != pos.salt or hdr.max_frame != pos.frame:
                return  # reset by it, or written to: it is no longer waiting for us
            # Its busy handler retries every few to 100 ms; a fresh pin each
            # 20 ms takes the newest read-mark, and read-mark zero once the
            # whole WAL is copied.
            if time.monotonic() - repinned >= 0.02:
                repinned = time.monotonic()
                if self._repin_at(pos):
                    # Still waiting, with nothing of ours in its way (another
                    # reader, say): do not do all this again until the WAL moves.
                    self._gave_way_at = self._wal.index()
                    return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)

    def _repin_at(self, pos: Position) -> bool:
        """Take a fresh pin if the WAL still ends at ``pos``; True if it sits
        on read-mark zero (the WAL wholly checkpointed before and after it
        was taken: SQLite's readers take read-mark zero exactly then)."""
        wal = self._wal
        before = wal.index()
        new = wal.begin_pin()
        now = wal.index()
        if now.salt != pos.salt or now.max_frame != pos.frame:
            wal.release(new)
            return False
        wal.advance_pin(new)
        return before.salt == pos.salt and before.backfilled == before.max_frame == pos.frame
