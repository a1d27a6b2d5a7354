"""The capture loop: when to copy the WAL, release segments, snapshot,
compact and checkpoint.

Segments are released to the uploaders at most once per sync interval (at
once when the database has been idle, when ``sync()`` asks, or when a
replica needs a snapshot); when the WAL reaches ``checkpoint_frames`` before
that, the frames are copied early and *held*, so that the WAL can restart
(as SQLite's own autocheckpoint would have it) without adding uploads: the
held segments are merged into one at release.

The blocking steps are :class:`~sqlrepl._capture.Capture`'s, run in worker
threads; what they stage is accounted for here, on the loop. This part
drives the others (generations and snapshots, the compactor, retention,
local faults) and owns no state of its own beyond its retry counters.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from ._capture import Capture, CaptureRetry, ContinuityLost, Staged
from ._compactor import Compactor, stage_merged
from ._faults import LocalFaults, is_disk_full
from ._leader import Leadership
from ._queue import MERGE_STORED_MAX, StagedObject
from ._retention import Retention
from ._snapshots import Generations
from ._state import LoopState

__all__ = ["CaptureLoop"]

_T = TypeVar("_T")

log = logging.getLogger("sqlrepl")


class CaptureLoop:
    """The replicator's main task while it replicates."""

    def __init__(
        self,
        st: LoopState,
        leader: Leadership,
        faults: LocalFaults,
        compactor: Compactor,
        generations: Generations,
        retention: Retention,
    ) -> None:
        self.st = st
        self._leader = leader
        self._faults = faults
        self._compactor = compactor
        self._gens = generations
        self._retention = retention
        self._backoff = 0.05
        self._retries = 0

    async def run(self) -> None:
        """Capture until stopped; at stop, capture what is committed first."""
        st = self.st
        opts = st.options
        while True:
            stopping = st.stop.is_set()
            now = time.monotonic()
            due = now - st.last_release >= opts.sync_interval
            with st.cond:
                wanted = st.sync_requests > 0 or st.snapshot_wanted or st.peer_sync
                st.peer_sync = False
            try:
                changed = await self._pass(due=due, wanted=wanted, stopping=stopping)
            except ContinuityLost as exc:
                log.warning("%s: continuity lost (%s); starting a new generation", st.database, exc)
                # Started at the top of the loop, where a full staging disk
                # is reported and retried like any failed capture.
                self._capture().position = None
                continue
            except CaptureRetry as exc:
                if await self._retry(exc, stopping):
                    return
                continue
            except Exception as exc:  # disk full, I/O errors: keep the WAL pinned, retry
                if await self._failed(exc, stopping):
                    return
                continue
            if changed is None:  # (the database file is gone: wait for one)
                if stopping:
                    return
                await self._leader.sleep(opts.poll_interval)
                continue
            self._backoff = 0.05
            if stopping:
                return
            if changed and not (due or wanted):
                # Something is pending: sleep until it is due, ignoring nudges,
                # but look at the WAL's length every poll interval meanwhile.
                due_at = st.last_release + opts.sync_interval
                await self._leader.sleep_until(min(due_at, now + opts.poll_interval))
            else:
                await self._leader.sleep(opts.poll_interval)

    def _capture(self) -> Capture:
        capture = self.st.capture
        assert capture is not None
        return capture

    async def _pass(self, *, due: bool, wanted: bool, stopping: bool) -> bool | None:
        """One look at the database and what is due; whether the WAL had
        changed, or ``None`` while the file at the path cannot be opened."""
        st = self.st
        opts = st.options
        capture = self._capture()
        # Taken before the index is read: all committed before it is seen.
        # (The index reads are one pread of 136 bytes: done right here,
        # not in a worker thread, as each hop to a worker and back is a
        # GIL hand-off that busy app threads can delay by milliseconds.)
        if capture.position is not None and capture.checkpointer_waiting():
            await self._give_way()
        looked = time.monotonic_ns()
        replaced = capture.replaced()
        if replaced is not None and not await self._faults.follow_replacement(replaced):
            return None
        if capture.position is None:  # reopened on a new file, or continuity lost
            asked = time.monotonic_ns()
            await self._gens.new_generation()
            st.set_checked(asked)
            st.kick_all()
        changed = capture.changed()
        if changed and (due or wanted or stopping):
            await self.capture_once()
        elif changed and capture.uncopied_frames() >= opts.checkpoint_frames:
            await self.capture_once(hold=True)  # so that the WAL can restart
        elif wanted or stopping or (due and st.queue.held()):
            # (Held segments go at the end of their interval, writes or not.)
            st.set_checked(looked)
            await self.release_held()
        if st.snapshot_wanted or self._gens.snapshot_due():
            await self._snapshot()
        if self._compactor.due():
            await self._compactor.compact(self._gens.snapshot_txids)
        await self._retention.if_asked()
        frames = capture.wal_frames()
        if frames >= opts.checkpoint_frames:
            await self._checkpoint(restart=frames >= opts.wal_restart_frames)
        self._faults.wal_deleted_told = False
        if st.error is not None and not st.space_short:
            with st.cond:
                st.error = None
        return changed

    async def _retry(self, exc: CaptureRetry, stopping: bool) -> bool:
        """No consistent view of the WAL this time: try again after a
        backoff; True if the loop should end (stopping, past the deadline)."""
        st = self.st
        if stopping and time.monotonic() >= st.stop_deadline:
            # (A view that stays inconsistent, e.g. the -wal deleted
            # under the app, must not keep stop() from returning.)
            log.warning("%s: stopping without capturing what follows txid %d: %s", st.database, st.txid, exc)
            return True
        capture = self._capture()
        if capture.wal_deleted():
            self._faults.wal_deleted()
        self._retries += 1
        if self._retries >= 120:  # about two minutes without a consistent view
            log.warning("%s: %s, %d times; starting a new generation", st.database, exc, self._retries)
            self._retries = 0
            capture.position = None
            return False
        log.debug("%s: capture again: %s", st.database, exc)
        await anyio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, 1.0)
        return False

    async def _failed(self, exc: Exception, stopping: bool) -> bool:
        """A capture failed (disk full, I/O errors): the WAL stays pinned;
        report it and try again after a backoff. True if stopping."""
        st = self.st
        if isinstance(exc, OSError) and is_disk_full(exc):
            await self._faults.out_of_space(exc)
        else:
            st.error = f"{type(exc).__name__}: {exc}"
            log.error("capture of %s failed, retrying in %.1fs: %s", st.database, self._backoff, exc)
        if stopping:
            return True
        await self._leader.pause(self._backoff)
        self._backoff = min(self._backoff * 2, st.options.retry_max)
        return False

    async def capture_once(self, *, hold: bool = False) -> None:
        """Copy new frames into a staged segment; unless ``hold``, release
        what is staged to the uploaders (the start of a new interval)."""
        st = self.st
        capture = self._capture()
        asked = time.monotonic_ns()
        generation, max_bytes = st.gen(), self._faults.piece_bytes
        staged = await self._in_worker(
            lambda record: capture.capture(st.staging, generation, max_bytes=max_bytes, on_piece=record)
        )
        if staged is not None:
            # Held either way: a release merges it with those held before it.
            self._record_segment(staged, capture.txid, capture.checksum)
            await self._gens.save()
        self._faults.space_back()
        held = st.queue.held()
        # Heavy writes: once a merge's worth is held, holding more only adds lag.
        if not hold or sum(o.size for o in held) >= MERGE_STORED_MAX:
            await self.release_held()
        st.set_checked(asked)
        self._faults.check_staging_limits()

    async def _in_worker(self, work: Callable[[Callable[[Staged], None]], _T]) -> _T:
        """Run the capture step ``work`` in a worker thread, handing it the
        callback that records each segment it stages on the way.

        The callback persists the position there and then (the capture
        relies on that, e.g. under its write barrier), but the accounting
        (the queue, the checksums, the counters, the replicas' lag) is done
        here on the loop once the worker is done, also when it failed
        half-way. Those structures belong to the loop, whose uploaders read
        and replace them meanwhile: a worker appending to and sorting the
        staged list (which reads as empty while sorted) beside them could
        lose an object."""
        done: list[tuple[Staged, int, int]] = []
        base = self._gens.loop_state()
        capture = self._capture()

        def record(staged: Staged) -> None:  # in the worker thread
            done.append((staged, capture.txid, capture.checksum))
            added = sum(os.path.getsize(s.path) for s, _, _ in done)
            self._gens.save_state(
                {
                    **base,
                    "since_snapshot_bytes": base["since_snapshot_bytes"] + added,
                    "since_snapshot_count": base["since_snapshot_count"] + len(done),
                }
            )

        try:
            return await anyio.to_thread.run_sync(work, record)
        finally:
            for staged, txid, checksum in done:
                self._record_segment(staged, txid, checksum)

    def _record_segment(self, staged: Staged, txid: int, checksum: int) -> None:
        """Account for a new staged segment (ending at ``txid``, after which
        the database's checksum is ``checksum``), held until the next
        release. On the loop only (see :meth:`_in_worker`)."""
        st = self.st
        st.txid = txid
        st.remember_checksum(txid, checksum)
        st.mark_behind()
        obj = st.add_staged(staged.key)
        obj.held = True
        obj.page_bytes = staged.header.page_count * staged.header.page_size
        self._gens.note_segment(obj.size)

    async def release_held(self) -> None:
        """Start a new interval: hand the held segments to the uploaders,
        the small ones merged (up to ``MERGE_STORED_MAX`` bytes as stored,
        and ``compaction_max_bytes`` of pages in memory), so that an interval
        of small writes costs one PUT per replica."""
        st = self.st
        st.last_release = time.monotonic()
        for run in st.queue.held_runs(st.options.compaction_max_bytes):
            if len(run) >= 2:
                await self._merge_held(run)
        for obj in st.queue.held():
            obj.held = False
        st.kick_all()

    async def _merge_held(self, run: list[StagedObject]) -> None:
        """Replace the segments of ``run`` by one segment covering them. The
        parts are deleted only once the merged object is durable (after a
        crash in between, both are staged and either serves)."""
        st = self.st
        try:
            key = await anyio.to_thread.run_sync(stage_merged, st.staging, run, None)
        except Exception as exc:  # uploading the parts as they are is as good
            (log.info if is_disk_full(exc) else log.error)(
                "merging txids %d-%d failed, uploading them apart: %s", run[0].first, run[-1].last, exc
            )
            return
        obj = st.staging.staged_object(key)
        assert obj is not None
        obj.page_bytes = sum(o.page_bytes for o in run)  # (an upper bound; only compared with limits)
        for part in run:
            st.queue.remove(part)
            st.staging.remove_object(part.key)
        st.queue.add(obj)

    async def _checkpoint(self, *, restart: bool) -> None:
        st = self.st
        capture = self._capture()
        asked = time.monotonic_ns()
        # A segment copied under the write barrier holds the few commits made
        # since the last capture: it goes with the next release.
        generation = st.gen()
        staged = await self._in_worker(
            lambda record: capture.checkpoint(
                st.staging,
                generation,
                truncate_over=st.options.truncate_wal_bytes,
                on_staged=record,
                restart=restart,
            )
        )
        if staged is not None:
            st.set_checked(asked)

    async def _give_way(self) -> None:
        """Another connection's blocking checkpoint waits for our pin (and
        every writer waits for it): copy, record and step aside
        (:meth:`Capture.give_way`). What is copied goes with the next release."""
        st = self.st
        capture = self._capture()
        asked = time.monotonic_ns()
        generation, max_bytes = st.gen(), self._faults.piece_bytes
        staged = await self._in_worker(
            lambda record: capture.give_way(st.staging, generation, on_staged=record, max_bytes=max_bytes)
        )
        if staged is not None:
            st.set_checked(asked)

    async def _snapshot(self) -> None:
        """Capture what is committed, then stage a snapshot."""
        capture = self._capture()
        if await anyio.to_thread.run_sync(capture.changed):
            await self.capture_once()
        await self._gens.snapshot()
