"""Generations and snapshots: where replication starts (continue the
recorded generation, or start a new one with txids that keep growing), when
a periodic snapshot is due (``_lifecycle.snapshot_due``), and the loop's
persisted state in ``state.json`` beside the capture's position.

It owns the snapshot schedule (bytes and segments since the last snapshot,
its time, the snapshot txids compaction is cut at); it sets the state's
generation and txid when a generation starts, and stages snapshots.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import anyio.to_thread

from . import _format
from ._capture import CaptureRetry
from ._compactor import Compactor
from ._faults import LocalFaults, is_disk_full
from ._lifecycle import group_generations, snapshot_due
from ._queue import SEGMENT, Role, StagedObject
from ._state import LoopState

__all__ = ["Generations"]

log = logging.getLogger("sqlrepl")


class Generations:
    """The start of replication, new generations, periodic snapshots."""

    def __init__(self, st: LoopState, faults: LocalFaults, compactor: Compactor) -> None:
        self.st = st
        self._faults = faults
        self._compactor = compactor
        self.since_bytes = 0  # staged segment bytes since the last snapshot
        self.since_count = 0
        self.last_snapshot_time = st.options.clock()
        self.snapshot_txids: list[int] = []  # of the current generation: compaction is cut there

    def loop_state(self) -> dict[str, Any]:
        """The loop's part of the persisted state, read on the loop."""
        return {
            "generation": self.st.generation,
            "since_snapshot_bytes": self.since_bytes,
            "since_snapshot_count": self.since_count,
            "last_snapshot_time": self.last_snapshot_time,
            "snapshot_txids": list(self.snapshot_txids),
        }

    def save_state(self, loop_state: dict[str, Any]) -> None:
        """Persist the position (in a worker thread, while the capture loop
        waits on it: the capture's position is the worker's meanwhile)."""
        assert self.st.capture is not None
        self.st.staging.write_state({**self.st.capture.state(), **loop_state})

    async def save(self) -> None:
        await anyio.to_thread.run_sync(self.save_state, self.loop_state())

    def note_segment(self, size: int) -> None:
        self.since_bytes += size
        self.since_count += 1

    async def start_position(self) -> None:
        """Continue the recorded generation, or start a new one."""
        st = self.st
        capture = st.capture
        assert capture is not None
        state = st.staging.read_state()
        for attempt in range(100):
            try:
                reason = await anyio.to_thread.run_sync(capture.start, state)
                break
            except CaptureRetry as exc:
                # Transient by nature (the WAL moved while we read); should it
                # persist, a new generation beats not replicating at all.
                log.debug("%s: start again: %s", st.database, exc)
                reason = f"no consistent view of the database after {attempt + 1} tries: {exc}"
                await anyio.sleep(0.05)
        if reason is None:
            assert state is not None
            self._continue(state)
        else:
            await self._start_new(state, reason)
        # When continuing, frames past the position are captured by the first
        # pass of the capture loop, which records what it has seen.

    def _continue(self, state: dict[str, Any]) -> None:
        st = self.st
        capture = st.capture
        assert capture is not None
        st.generation = state["generation"]
        st.txid = capture.txid
        st.remember_checksum(capture.txid, capture.checksum)
        self.since_bytes = int(state.get("since_snapshot_bytes", 0))
        self.since_count = int(state.get("since_snapshot_count", 0))
        self.last_snapshot_time = float(state.get("last_snapshot_time", st.options.clock()))
        self.snapshot_txids = [int(t) for t in state.get("snapshot_txids", [])]
        # Staged objects past the recorded position were written just
        # before a crash; they will be captured again.
        for obj in list(st.queue.objects):
            if obj.generation == st.generation and obj.first > st.txid:
                st.staging.remove_object(obj.key)
                st.queue.remove(obj)
        log.info("%s continues generation %s at txid %d", st.database, st.generation, st.txid)

    async def _start_new(self, state: dict[str, Any] | None, reason: str) -> None:
        st = self.st
        capture = st.capture
        assert capture is not None
        # txids grow across a replica's generations: continue after the
        # highest one known here, after a restore, or in the replicas.
        known = int(state.get("txid", 0)) if state is not None else 0
        capture.txid = max(known, st.staging.restored_txid(), await self._replica_txid())
        log.info("%s starts a new generation: %s", st.database, reason)
        asked = time.monotonic_ns()  # before the snapshot reads the WAL index
        try:
            await self.new_generation()
        except CaptureRetry:
            return  # stopping (the capture loop tries again otherwise)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # No room for the snapshot: say so; the capture loop starts
            # the generation (its position is None) once there is room.
            await self._faults.out_of_space(exc)
            return
        st.set_checked(asked)

    async def _replica_txid(self) -> int:
        """The highest txid any replica holds (one LIST each, at the start of
        a generation only). A replica that cannot be listed in time counts
        0: a new generation is not held up by a failing store."""
        highest = 0
        for client in self.st.clients:
            try:
                with anyio.fail_after(10.0):
                    gens = group_generations(await client.list(_format.GENERATIONS))
            except (Exception, TimeoutError) as exc:
                log.warning(
                    "cannot list %s to continue its txids (%s); they may restart lower", client.url, exc
                )
                continue
            highest = max([highest] + [g.last_txid for g in gens])
        return highest

    async def new_generation(self) -> None:
        st = self.st
        capture = st.capture
        assert capture is not None
        generation = _format.new_generation_id()
        st.progress.begin(generation, "new generation", len(st.replicas))  # progress hook
        while True:
            try:
                staged = await anyio.to_thread.run_sync(capture.new_generation, st.staging, generation)
                break
            except CaptureRetry:
                if st.stop.is_set() and time.monotonic() >= st.stop_deadline:
                    raise  # (the capture loop then stops)
                await anyio.sleep(0.05)
        st.generation = generation
        st.txid = capture.txid
        st.checksums = {}
        st.remember_checksum(capture.txid, capture.checksum)
        st.generations += 1
        st.snapshots += 1
        st.mark_behind()
        self._compactor.drop_window()
        self._track_staged(st.add_staged(staged.key))  # progress hook
        st.snapshot_wanted = False  # (what a replica asked for meanwhile: this one serves)
        self.since_bytes = self.since_count = 0
        self.last_snapshot_time = st.options.clock()
        self.snapshot_txids = [st.txid]
        await self.save()

    def snapshot_due(self) -> bool:
        """A snapshot is due when the segments since the last one outweigh
        the database itself (so a restore reads at most about twice the
        database), or ``snapshot_interval`` has passed while it changed.

        Measured against the database's current size, not the last
        snapshot's: a database being filled then never re-snapshots (what is
        appended cannot outweigh the database it builds), where comparing
        with the last snapshot snapshotted it again and again as it grew
        (twice its final size uploaded, found by the benchmarks).
        """
        if self.since_count == 0 or time.monotonic() < self._faults.snapshot_after:
            return False
        capture = self.st.capture
        assert capture is not None
        return snapshot_due(
            since_count=self.since_count,
            since_bytes=self.since_bytes,
            db_bytes=capture.db_size * capture.page_size,
            last_snapshot_s=self.last_snapshot_time,
            now_s=self.st.options.clock(),
            interval_s=self.st.options.snapshot_interval,
        )

    async def snapshot(self) -> None:
        """Stage a snapshot of the database as it is (the caller captured
        what preceded it)."""
        st = self.st
        capture = st.capture
        assert capture is not None
        if st.snapshot_wanted:  # progress hook: a replica waits for this one
            st.progress.begin(st.gen(), "replica needs one", len(st.replicas))
        try:
            staged = await anyio.to_thread.run_sync(capture.snapshot, st.staging, st.gen())
        except OSError as exc:
            if not is_disk_full(exc) or st.snapshot_wanted:
                raise  # a replica needs this one: the capture loop reports it and retries
            # A periodic snapshot only shortens restores: segments go on without it.
            (log.debug if self._faults.snapshot_after else log.warning)(
                "no room in %s for a snapshot of %s (%s); trying again later, segments go on meanwhile",
                st.staging.root,
                st.database,
                exc,
            )
            self._faults.put_off_snapshots()
            return
        st.snapshot_wanted = False
        st.snapshots += 1
        self._track_staged(st.add_staged(staged.key))  # progress hook
        self.since_bytes = self.since_count = 0
        self.last_snapshot_time = st.options.clock()
        self._faults.snapshot_made()
        # Only the ones a future compaction window may still reach are kept.
        pending = [
            o
            for o in self._compactor.window + st.queue.objects
            if o.kind == SEGMENT and o.generation == st.generation
        ]
        oldest = min((o.first for o in pending), default=st.txid)
        self.snapshot_txids = [t for t in self.snapshot_txids if t >= oldest] + [st.txid]
        await self.save()
        st.kick_all()

    def _track_staged(self, obj: StagedObject) -> None:
        """Progress hook: tell the snapshot tracker which replicas upload
        ``obj`` (a no-op unless it is a tracked snapshot)."""
        st = self.st
        uploaders = [
            (id(r), r.url) for r in st.replicas if st.queue.role_of(r, obj, st.generation) is Role.UPLOAD
        ]
        st.progress.staged(obj.key, obj.size, uploaders)

    def track_leftover(self) -> None:
        """Progress hook: a snapshot an earlier run staged and did not get
        into every replica that lacks the generation (a restart cut the
        upload of a first snapshot short) is tracked as it is uploaded."""
        st = self.st
        obj = st.queue.newest_snapshot(st.generation)
        if obj is None or all(r.generation == obj.generation for r in st.replicas):
            return
        uploaders = [
            (id(r), r.url) for r in st.replicas if st.queue.role_of(r, obj, st.generation) is Role.UPLOAD
        ]
        if uploaders:
            st.progress.resume(obj.generation, obj.key, obj.size, uploaders)
