"""One uploader per replica: it uploads the staged objects its replica
needs, in order, with its own backoff, so one failing store never holds the
others back. It owns its :class:`~sqlrepl._state.Replica` (the position and
its record in ``replicas/`` of the staging folder), looks at the replica now
and then (``_watch.py``) and re-seeds it when it was emptied; it reads the
queue, and never changes it itself (``collect`` does, after each upload).

Also here: what ``status`` says of a replica, and the periodic verifier.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from . import _format
from ._errors import ReplicaError
from ._options import ReplicaStatus
from ._queue import SNAPSHOT, Need, StagedObject
from ._staging import Staging
from ._state import LoopState, Replica
from ._verify import Verification, verify_replica

__all__ = ["Uploader", "replica_status", "verifier", "write_record"]

log = logging.getLogger("sqlrepl")


class Uploader:
    """The task that keeps one replica up to date."""

    def __init__(self, st: LoopState, r: Replica, collect: Callable[[], None]) -> None:
        self.st = st
        self.r = r
        self._collect = collect  # after an upload: drop what no replica needs

    def next(self) -> StagedObject | Need:
        st = self.st
        return st.queue.next_for(self.r, st.generation, st.txid)

    async def run(self) -> None:
        st, r = self.st, self.r
        r.work = anyio.Event()
        backoff = 0.25
        while True:
            try:
                await self._upload_all()
                if r.last_error is not None:
                    log.info("replica %s recovered", r.url)
                r.last_error = None
                backoff = 0.25
            except Exception as exc:
                first = r.last_error is None
                r.last_error = str(exc) if isinstance(exc, ReplicaError) else f"{type(exc).__name__}: {exc}"
                (log.warning if first else log.debug)(
                    "replica %s failed (%s); retrying with backoff, commits are unaffected", r.url, exc
                )
                if not getattr(exc, "transient", True):
                    r.checked = False
                with st.cond:
                    st.cond.notify_all()
                await anyio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, st.options.retry_max)
                continue
            with anyio.move_on_after(r.watch.seconds_left() if r.watch is not None else math.inf):
                await r.work.wait()
            if r.work.is_set():
                r.work = anyio.Event()

    async def _upload_all(self) -> None:
        """Upload what the replica needs until it has nothing to do now."""
        st, r = self.st, self.r
        if not r.checked:
            await self._check()
        while True:
            if r.watch is not None and r.watch.due():  # (also amid a long backlog)
                await self._watch()
            nxt = self.next()
            if nxt is Need.NOTHING:
                return
            if nxt is Need.SNAPSHOT:
                if not st.snapshot_wanted:
                    st.snapshot_wanted = True
                    st.wake()
                return
            assert isinstance(nxt, StagedObject)
            with st.progress.uploading(id(r), nxt.key):  # progress hook
                await r.client.put_file(nxt.key, nxt.path)
            await self._uploaded(nxt)

    async def _watch(self) -> None:
        """The periodic look at the replica (see _watch.py); re-seed it if
        it was emptied."""
        r = self.r
        assert r.watch is not None
        generation = r.generation
        if await r.watch.check(generation) and r.generation == generation:
            log.error(
                "replica %s was emptied behind sqlrepl's back (the record of generation %s is gone):"
                " sending it a fresh snapshot; the history before it is lost there, and sync() waits"
                " until it holds the database again",
                r.url,
                generation,
            )
            await self._reseed()

    async def _reseed(self) -> None:
        """Forget what the replica held: it gets the newest snapshot of the
        current generation (a fresh one if none is staged), then what follows."""
        st, r = self.st, self.r
        with st.cond:
            r.generation, r.txid, r.uploaded = None, 0, set()
            st.cond.notify_all()
        await self._record()
        st.publish()

    async def _record(self) -> None:
        """Write what the replica holds to its file in the staging folder
        (in a worker thread; see :func:`write_record`)."""
        r = self.r
        await anyio.to_thread.run_sync(write_record, self.st.staging, r.state_path, r.as_json())

    async def _check(self) -> None:
        """At start (and after a configuration error): is the store there,
        and does it still hold the generation we think it does?"""
        r = self.r
        await r.client.check()
        if r.generation is not None:
            prefix = f"{_format.GENERATIONS}{r.generation}/snapshots/"
            if not await r.client.list(prefix):
                log.error(
                    "replica %s no longer holds generation %s (emptied behind sqlrepl's back?);"
                    " sending it a fresh snapshot",
                    r.url,
                    r.generation,
                )
                if r.watch is not None:
                    r.watch.note_wipe(r.generation)
                await self._reseed()
        r.checked = True

    async def _uploaded(self, obj: StagedObject) -> None:
        st, r = self.st, self.r
        st.progress.uploaded(id(r), obj.key)  # progress hook (before sync() can see it)
        with st.cond:
            r.uploaded.add(obj.key)
            if obj.kind == SNAPSHOT:
                if obj.generation != r.generation or obj.first > r.txid:
                    r.generation, r.txid = obj.generation, obj.first
            elif obj.generation == r.generation and obj.first == r.txid + 1:
                r.txid = obj.last
            r.last_upload_time = time.time()
            if r.generation == st.generation and r.txid >= st.txid:
                r.behind_since = None
            elif r.behind_since is not None:
                # What it lacks now was captured no earlier than the next object it needs.
                pending = [o.timestamp_ms / 1000 for o in st.queue.lacking(r, st.generation)]
                r.behind_since = max(r.behind_since, min(pending, default=r.behind_since))
            st.cond.notify_all()
        await self._record()
        self._collect()
        st.publish()
        if obj.kind == SNAPSHOT and obj.generation == r.generation and r.watch is not None:
            # (Again with each snapshot: whatever removes the newest snapshot
            # then removes the record too, and the watch sees it.)
            await r.watch.claim(obj.generation)


def write_record(staging: Staging, path: str, record: dict[str, Any]) -> None:
    """Write a replica's record. A full staging disk (the capture loop
    reports it) is no fault of the replica's, nor a reason to stop: the
    record is rewritten after the next upload, and a crash before that
    costs the replica a fresh snapshot, no data."""
    try:
        staging.write_json(path, record)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.debug("cannot record a replica's position in %s: %s", path, exc)


def replica_status(st: LoopState, r: Replica, now: float) -> ReplicaStatus:
    """What ``status`` says of ``r`` (under the state's lock)."""
    lag: tuple[float | None, int | None] = (None, None)
    if st.role == "replicating":
        lag = _lag(st, r, now)
    stats = r.client.stats
    return ReplicaStatus(
        r.url,
        r.generation,
        r.txid,
        r.last_error,
        stats.as_dict(),
        checked_at=r.view.checked_at,
        wipes=r.view.wipes,
        foreign_writers=r.view.foreign_writers,
        lag_seconds=lag[0],
        lag_bytes=lag[1],
        last_upload_time=r.last_upload_time,
        bytes_by_kind=stats.bytes_by_kind(),
        errors_by_kind=dict(stats.errors_by_kind),
        verification=r.verification,
        verified_time=r.verified_time,
        verify_failures=r.verify_failures,
    )


def _lag(st: LoopState, r: Replica, now: float) -> tuple[float, int]:
    """(seconds, bytes) by which ``r`` trails the capture. Computed when
    asked, from what the loop keeps anyway: nothing on the commit path."""
    if r.generation == st.generation and r.txid >= st.txid:
        return 0.0, 0
    needed = st.queue.lacking(r, st.generation)
    since = r.behind_since
    if since is None:  # (behind since before this process started)
        since = min((o.timestamp_ms / 1000 for o in needed), default=now)
    return max(0.0, now - since), sum(o.size for o in needed)


async def verifier(st: LoopState, interval: float) -> None:
    """Every ``interval`` seconds, verify each replica in turn (see
    ``sqlrepl._verify``): one request at a time, beside the uploads."""
    while True:
        await anyio.sleep(interval)
        for r in st.replicas:
            gen = r.generation
            if gen is None or gen != st.generation or r.txid == 0:
                continue  # (it is getting a new snapshot: nothing to prove yet)
            try:
                outcome = await verify_replica(r.client, gen, st.checksums.get)
            except Exception as exc:  # a verification bug must not stop replication
                log.exception("verification of replica %s of %s crashed", r.url, st.database)
                outcome = Verification(None, time.time(), gen, None, 0, 0, f"{type(exc).__name__}: {exc}")
            with st.cond:
                r.verification = outcome
                if outcome.ok:
                    r.verified_time = outcome.time
                elif outcome.ok is False:
                    r.verify_failures += 1
            if outcome.ok is False:
                log.error(
                    "VERIFICATION FAILED: replica %s of %s would not restore to the database: %s",
                    r.url,
                    st.database,
                    outcome.message,
                )
            elif outcome.ok is None:
                log.info("verification of replica %s of %s: %s", r.url, st.database, outcome.message)
            else:
                log.debug("replica %s of %s verified: %s", r.url, st.database, outcome.message)
