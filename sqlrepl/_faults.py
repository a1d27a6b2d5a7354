"""Local faults: what goes wrong on this machine rather than in a replica,
and how replication carries on through it.

- a full staging disk (``ENOSPC``/``EDQUOT``): said once, then pieces
  shrink, held segments go unmerged, the compaction window is given up and
  periodic snapshots wait, until a write goes through again;
- staging over its limits (replicas that keep failing);
- the database file replaced, or its ``-wal`` deleted, under the app.

It owns the piece size and the snapshot delay (read by the capture loop)
and the once-per-incident log flags; it sets the state's ``error``.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._capture import CaptureRetry
from ._compactor import Compactor
from ._errors import StagingFullError, WalModeError
from ._leader import Leadership
from ._state import LoopState
from ._uploader import write_record
from ._wal import DELETED

__all__ = ["LocalFaults", "is_disk_full"]

_T = TypeVar("_T")

log = logging.getLogger("sqlrepl")

# A full staging disk shrinks segments down to this, so that one fits in what
# is left (each is uploaded and deleted before the next is written).
_MIN_PIECE = 256 << 10


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class LocalFaults:
    """A full disk, staging limits, a replaced database, a deleted WAL."""

    def __init__(self, st: LoopState, leader: Leadership, compactor: Compactor) -> None:
        self.st = st
        self._leader = leader
        self._compactor = compactor
        self.piece_bytes = st.options.segment_max_bytes  # a capture copies at most this much
        self.snapshot_after = 0.0  # (monotonic) periodic snapshots wait until then
        self._snapshot_delay = 10.0
        self._soft_warned = False
        self.wal_deleted_told = False  # (logged once per incident)
        self._replaced_seen: str | None = None

    async def until_room(self, func: Callable[..., _T], *args: Any) -> _T | None:
        """``func(*args)`` in a worker thread. On a full staging disk, say so
        (status() and one log line) and try again, as captures do, until
        there is room; ``None`` if stopped meanwhile."""
        backoff = 0.05
        while True:
            try:
                result = await anyio.to_thread.run_sync(func, *args)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                await self.out_of_space(exc)
                if self.st.stop.is_set():
                    return None
                await self._leader.pause(backoff)
                backoff = min(backoff * 2, self.st.options.retry_max)
                continue
            self.space_back()
            return result

    def _space_message(self, exc: OSError) -> tuple[str, int]:
        """What to log of a full disk, and the bytes free."""
        st = self.st
        root = st.staging.root
        inodes = ""
        try:
            vfs = os.statvfs(root)
            free = vfs.f_bavail * vfs.f_frsize
            if vfs.f_files and not vfs.f_favail:  # (room for bytes, none for another file)
                inodes = ", no free inodes"
        except OSError:
            free = 0
        capture = st.capture
        try:
            waiting = capture.uncopied_frames() * capture.page_size if capture is not None else 0
        except Exception:  # only for the message
            waiting = 0
        return (
            f"staging folder {root} is out of disk space ({exc}; {free / 2**20:.1f} MiB free{inodes}):"
            f" {waiting / 2**20:.1f} MiB of committed WAL wait to be copied. Commits go on (the WAL"
            " keeps them and grows meanwhile); free space on that filesystem, or give the staging"
            " folder a larger one, and replication resumes by itself",
            free,
        )

    async def out_of_space(self, exc: OSError) -> None:
        """The staging disk is full. Say so once (what, where, how much is
        free, what to do), then make what room we can: shrink the pieces
        capture writes so that one fits, hand what is staged to the uploaders
        unmerged (a merge needs room for a second copy), give up the
        compaction window (an optimisation that holds disk) and put off
        periodic snapshots. Commits never wait for any of it: the WAL keeps
        what is not copied (pinned), and grows meanwhile."""
        st = self.st
        message, free = self._space_message(exc)
        if not st.space_short:
            log.error("%s", message)
        else:
            log.debug("%s", message)
        with st.cond:
            st.space_short = True
            st.error = message
            st.cond.notify_all()
        self.piece_bytes = max(_MIN_PIECE, min(self.piece_bytes // 2, free // 2))
        self._compactor.drop_window()
        self.put_off_snapshots()
        st.release_unmerged()
        self.check_staging_limits()

    def put_off_snapshots(self) -> None:
        """No room for a periodic snapshot: try again later, each time later."""
        self.snapshot_after = time.monotonic() + self._snapshot_delay
        self._snapshot_delay = min(self._snapshot_delay * 2, 600.0)

    def snapshot_made(self) -> None:
        self.snapshot_after, self._snapshot_delay = 0.0, 10.0
        self.space_back()

    def space_back(self) -> None:
        """A capture went through after a full disk: back to normal pieces."""
        st = self.st
        if st.space_short:
            st.space_short = False
            self.piece_bytes = st.options.segment_max_bytes
            log.info("staging folder %s has room again; %s is replicated again", st.staging.root, st.database)

    def wal_deleted(self) -> None:
        """The -wal file was deleted under the app: what is committed from
        then on cannot be read, so replication cannot go on in this process.
        Say so (status(), and once in the log) and what to do."""
        st = self.st
        message = (
            f"the WAL file {st.database}-wal was deleted under the running app: commits since"
            " go into the deleted file, where sqlrepl cannot read them, and are not replicated."
            " Restart the app (once every connection to the database, sqlrepl's included, is"
            " closed, SQLite writes those commits into the database file); replication then"
            " resumes as a new generation. Never delete the -wal file of a database in use"
        )
        if not self.wal_deleted_told:
            self.wal_deleted_told = True
            log.warning("%s", message)
        with st.cond:
            st.error = message
            st.cond.notify_all()

    async def follow_replacement(self, reason: str) -> bool:
        """The database file was deleted or replaced under the running app.
        Open the file now at the path, to be replicated as a new generation
        (the capture loop starts it); True if done. Until there is a WAL
        database there to open, say so (once in the log, and in status())
        and keep the old file's connections."""
        st = self.st
        capture = st.capture
        assert capture is not None
        try:
            await anyio.to_thread.run_sync(capture.reopen)
        except (FileNotFoundError, WalModeError, CaptureRetry) as exc:
            message = f"{reason}; waiting for a WAL-mode database at that path to replicate ({exc})"
            if self._replaced_seen != reason:
                self._replaced_seen = reason
                log.warning("%s", message)
            with st.cond:
                st.error = message
            return False
        if reason.endswith(f" {DELETED}"):
            # The new file appeared after the check saw the path empty: say
            # the same as when the check saw the new file itself.
            reason = f"{st.database} was replaced (deleted, then a new file created at its path)"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        message = (
            f"{reason} (seen {when}); replicating the new file as a new generation. Connections"
            " opened before still use the old, deleted file: reopen them"
        )
        log.warning("%s", message)
        with st.cond:
            st.replaced, self._replaced_seen, st.error = message, None, None
        return True

    def check_staging_limits(self) -> None:
        st = self.st
        opts = st.options
        total = st.queue.size
        if total >= opts.staging_soft_limit and not self._soft_warned:
            self._soft_warned = True
            self._warn_soft_limit(total)
        elif total < opts.staging_soft_limit:
            self._soft_warned = False
        # The newest snapshot is the least any replica can need (to resync):
        # the hard limit bounds the queue beyond it.
        newest = st.queue.newest_snapshot(st.generation)
        if total - (newest.size if newest else 0) < opts.staging_hard_limit:
            return
        dropped = []
        for r in st.replicas:
            if r.last_error is not None and (r.generation is not None or r.uploaded):
                dropped.append(r.url)
                r.generation, r.txid, r.uploaded = None, 0, set()
                write_record(st.staging, r.state_path, r.as_json())
        if dropped:
            # (Logged, not raised: nobody waits on the loop to catch it.)
            err = StagingFullError(
                f"staging for {st.database} reached its hard limit ({opts.staging_hard_limit} bytes):"
                f" dropped the queue of failing replica(s) {', '.join(dropped)}; they will get a fresh"
                " snapshot when they recover (history between is not kept in them)"
            )
            log.error("%s", err)
            self._compactor.collect()

    def _warn_soft_limit(self, total: int) -> None:
        st = self.st
        opts = st.options
        failing = [r.url for r in st.replicas if r.last_error]
        if failing:
            log.warning(
                "%d bytes staged for %s (soft limit %d) because replica(s) %s keep failing;"
                " at %d bytes their queue is dropped and they resync from a snapshot",
                total,
                st.database,
                opts.staging_soft_limit,
                ", ".join(failing),
                opts.staging_hard_limit,
            )
        else:
            log.info(
                "%d bytes staged for %s (soft limit %d): writes outpace uploads for now",
                total,
                st.database,
                opts.staging_soft_limit,
            )
