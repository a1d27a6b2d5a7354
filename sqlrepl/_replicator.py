"""The replicator: one per database file per process, on a background thread.

Its thread runs an anyio event loop (asyncio backend, which aiobotocore
needs) with one task that captures and one uploader task per replica. The
work is done by parts, each in its own module, sharing one
:class:`~sqlrepl._state.LoopState` guarded by one lock:

- ``_leader.py``: the lock that makes one process the replicator, standby,
  ``progress.json``, the peers' nudge socket and the wake pipe;
- ``_scheduler.py``: the capture loop (copy new WAL frames into staged
  segments, release them once per sync interval, checkpoint);
- ``_snapshots.py``: where replication starts, new generations, periodic
  snapshots, the persisted loop state;
- ``_queue.py``: the staged objects and what each replica needs next (pure);
- ``_uploader.py``: one uploader per replica, with its own position and
  backoff, so one failing store never holds the others back;
- ``_compactor.py``: the compaction window, and the end of staged objects;
- ``_retention.py``: the periodic retention pass over each replica;
- ``_faults.py``: a full staging disk, staging limits, the database
  replaced or its WAL deleted under the app;
- ``_registry.py``: one replicator per database per process, fork and exit.

This class wires them: start, stop, ``sync()``, ``status``, nudges.

App threads only *nudge* (a flag and, if the loop is idle, one byte on a
pipe) and never wait for the loop, except in ``sync()`` or a commit with
``durability="replicated"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence

import anyio
import anyio.to_thread

from ._capture import Capture
from ._compactor import Compactor
from ._errors import ConfigError, SyncTimeoutError, WalModeError
from ._faults import LocalFaults
from ._leader import Leadership
from ._options import Options, ReplicaStatus, Status
from ._queue import Need
from ._registry import all_replicators, get_replicator, stop_all
from ._replica import open_replica, redact_url
from ._retention import Retention
from ._scheduler import CaptureLoop
from ._snapshots import Generations
from ._staging import Staging
from ._state import LoopState, Replica
from ._uploader import Uploader, replica_status, verifier
from ._watch import ReplicaWatch, load_writer_id

__all__ = [
    "Options",
    "ReplicaStatus",
    "Replicator",
    "Status",
    "all_replicators",
    "get_replicator",
    "stop_all",
]

log = logging.getLogger("sqlrepl")


class Replicator:
    """Continuously replicates one database file. See the module docstring.

    Made by :func:`get_replicator` (one per database per process), started
    lazily, stopped at interpreter exit. Every public method is thread-safe.
    """

    def __init__(self, database: str, replicas: Sequence[str], options: Options | None = None) -> None:
        self.database = os.path.abspath(database)
        self.urls = tuple(replicas)
        self.options = options or Options()
        if not self.urls:
            raise ConfigError("a replicator needs at least one replica URL")
        # Parse every URL now (no I/O) so that a bad one fails in connect().
        self._clients = [open_replica(u) for u in self.urls]
        st = self._st = LoopState(self.database, self.options, Staging(self.database), self._clients)
        self._leader = Leadership(st)
        self._compactor = Compactor(st)
        self._faults = LocalFaults(st, self._leader, self._compactor)
        self._generations = Generations(st, self._faults, self._compactor)
        self._retention = Retention(st)
        self._loop = CaptureLoop(
            st, self._leader, self._faults, self._compactor, self._generations, self._retention
        )
        self._uploaders: list[Uploader] = []
        self._thread: threading.Thread | None = None

    # -- public, any thread ------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        with self._st.cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._thread_main, name=f"sqlrepl {os.path.basename(self.database)}", daemon=True
            )
            self._thread.start()

    def nudge(self) -> None:
        """A commit happened: wake the loop if it sleeps. Costs a few
        attribute reads, and one write to a pipe when the loop is idle."""
        capture = self._st.capture
        if capture is not None and capture.wants_write_lock:
            time.sleep(0.0002)  # let the checkpoint barrier have the write lock
        if self._st.role == "standby":
            self._leader.nudge_peer()
        else:
            self._leader.nudge_idle()

    @property
    def stopped(self) -> bool:
        """The thread ended (stopped or failed): a new replicator is needed."""
        return self._st.role in ("stopped", "failed")

    def sync(self, timeout: float | None = 30.0) -> None:
        """Block until everything committed before the call is in every
        replica, or raise :class:`SyncTimeoutError` after ``timeout`` seconds.
        """
        st = self._st
        self.start()
        asked = time.monotonic_ns()
        with st.cond:
            st.sync_requests += 1
        st.wake()
        deadline = None if timeout is None else time.monotonic() + timeout
        asked_peer = 0.0
        try:
            with st.cond:
                while not self._synced(asked):
                    if self.stopped and not self._synced(asked):
                        raise SyncTimeoutError(
                            f"sync {self.database}: the replicator is {st.role}"
                            + (f" ({st.error})" if st.error else "")
                        )
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise SyncTimeoutError(self._sync_timeout_message(timeout))
                    standby = st.role == "standby"
                    if standby and time.monotonic() - asked_peer > 1.0:
                        # (Again now and then: the replicating process may
                        # have changed, or missed a datagram.)
                        self._leader.nudge_peer(force=True)
                        asked_peer = time.monotonic()
                    # A standby learns of progress from a file: look often.
                    step = 0.005 if standby else 0.2
                    st.cond.wait(step if left is None else min(left, step))
                    if st.role == "standby":
                        self._leader.read_progress_locked()
        finally:
            with st.cond:
                st.sync_requests -= 1

    def _synced(self, asked: int) -> bool:
        checked_at, gen, txid = self._st.checked
        if checked_at < asked or gen is None:
            return False
        replicas = self._st.replicas
        return all(r.generation == gen and r.txid >= txid for r in replicas) and bool(replicas)

    def _sync_timeout_message(self, timeout: float | None) -> str:
        _, gen, txid = self._st.checked
        lagging = [
            f"{r.url} at txid {r.txid}" + (f" ({r.last_error})" if r.last_error else "")
            for r in self._st.replicas
            if r.generation != gen or r.txid < txid
        ]
        return (
            f"sync {self.database}: not every replica caught up within {timeout}s"
            f" (need txid {txid}; lagging: {', '.join(lagging) or 'capture not done yet'})."
            " The data is committed locally and staged; it will be uploaded when the replica recovers."
        )

    def stop(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """Stop the thread; with ``flush``, first capture and upload what is
        pending, for at most ``timeout`` seconds (default ``exit_timeout``)."""
        self.request_stop(flush=flush, timeout=timeout)
        self.join(timeout)

    def request_stop(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """Ask the thread to stop (see :meth:`stop`) without waiting for it."""
        timeout = self.options.exit_timeout if timeout is None else timeout
        self._st.stop_deadline = time.monotonic() + (timeout if flush else 0.0)
        self._st.stop.set()
        self._st.wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (``timeout`` plus a grace period)."""
        timeout = self.options.exit_timeout if timeout is None else timeout
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout + 5.0)
            if thread.is_alive():
                log.warning("replicator of %s did not stop within %.1fs", self.database, timeout)

    @property
    def status(self) -> Status:
        st = self._st
        with st.cond:
            now = time.time()
            staged = list(st.queue.objects)
            reps = tuple(replica_status(st, r, now) for r in st.replicas) or tuple(
                ReplicaStatus(c.url, None, 0, None, c.stats.as_dict()) for c in self._clients
            )
            return Status(
                self.database,
                st.role,
                st.generation,
                st.txid,
                reps,
                len(staged),
                sum(o.size for o in staged),
                st.error,
                st.replaced,
                st.snapshots,
                st.compactions,
                st.generations,
                snapshot_progress=st.progress.current,  # progress hook
            )

    def _maintain_now(self, *, retention: bool = True, timeout: float = 60.0) -> None:
        """Capture, snapshot and compact what is due by ``options.clock``
        and (with ``retention``) run one retention pass now; return once it
        is done (merged segments are staged, not necessarily uploaded:
        ``sync()`` and ``status`` tell). For tests that move the clock;
        thread-safe, one caller at a time."""
        self._retention.ask(retention=retention, timeout=timeout)

    # -- fork ----------------------------------------------------------------

    def _abandon_after_fork(self) -> None:
        """In a forked child: forget the parent's thread, pins and lock,
        closing nothing that could touch the parent's database state."""
        if self._st.capture is not None:
            self._st.capture.abandon()
        self._st.staging.forget_lock_after_fork()
        self._thread = None
        self._st.role = "stopped"

    # -- the loop --------------------------------------------------------------

    def _thread_main(self) -> None:
        st = self._st
        try:
            anyio.run(self._main, backend="asyncio")
        except BaseException as exc:  # never let the thread die silently
            log.exception("replicator of %s crashed", self.database)
            with st.cond:
                st.role, st.error = "failed", f"{type(exc).__name__}: {exc}"
                st.cond.notify_all()
        finally:
            self._leader.close_pipe()
            with st.cond:
                if st.role != "failed":
                    st.role = "stopped"
                st.cond.notify_all()

    async def _main(self) -> None:
        try:
            if not await self._leader.acquire_lock(self._faults.until_room):
                return
            await self._run_locked()
        finally:
            for client in self._clients:
                with contextlib.suppress(Exception):
                    await client.aclose()
            if self._st.capture is not None:
                await anyio.to_thread.run_sync(self._st.capture.close)
            self._leader.close()

    async def _run_locked(self) -> None:
        """Replicate, as the holder of the lock, until stopped."""
        st = self._st
        with st.cond:
            st.role = "starting"
        st.staging.remove_temp_files()
        self._leader.open_nudge_socket()
        capture = Capture(self.database, busy_timeout=self.options.busy_timeout, clock=self.options.clock)
        capture.snapshot_progress = st.progress  # progress hook
        try:
            await anyio.to_thread.run_sync(capture.open)
        except (WalModeError, FileNotFoundError) as exc:
            with st.cond:
                st.role, st.error = "failed", str(exc)
                st.cond.notify_all()
            log.error("cannot replicate %s: %s", self.database, exc)
            return
        st.capture = capture
        writer = await self._faults.until_room(load_writer_id, st.staging)
        if writer is None:
            return  # stopped while the staging disk was full
        st.writer = writer
        self._load_replicas()
        await self._generations.start_position()
        self._compactor.collect()
        self._generations.track_leftover()  # progress hook
        with st.cond:
            st.role = "replicating"
            st.cond.notify_all()
        st.publish()  # standbys see the new holder's view at once
        async with anyio.create_task_group() as tg:
            for uploader in self._uploaders:
                tg.start_soon(uploader.run)
            tg.start_soon(self._retention.loop)
            if self.options.verify_interval is not None:
                tg.start_soon(verifier, st, self.options.verify_interval)
            await self._loop.run()
            await self._flush()
            tg.cancel_scope.cancel()

    async def _flush(self) -> None:
        """Stopping: let uploaders drain until the deadline."""
        st = self._st
        with anyio.move_on_after(max(0.0, st.stop_deadline - time.monotonic())):
            while any(u.next() is not Need.NOTHING and u.r.last_error is None for u in self._uploaders):
                st.kick_all()
                await anyio.sleep(0.02)
        pending = [u.r.url for u in self._uploaders if u.next() is not Need.NOTHING]
        if pending:
            log.warning(
                "stopping with objects of %s not yet uploaded to %s; they stay staged in %s"
                " and are uploaded on the next start",
                self.database,
                ", ".join(pending),
                st.staging.root,
            )

    def _load_replicas(self) -> None:
        """Take the staged objects, the window and each replica's recorded
        position from the staging folder."""
        st = self._st
        staging = st.staging
        staged = [staging.staged_object(k) for k in staging.staged_keys()]
        merged = [staging.staged_object(k, staging.compacted) for k in staging.staged_keys(staging.compacted)]
        st.queue.replace(o for o in staged + merged if o is not None)
        self._compactor.load()
        keys = {o.key for o in st.queue.objects}
        st.replicas = []  # standby kept a view of the other process's; ours now
        for url, client in zip(self.urls, self._clients, strict=True):
            path = staging.replica_path(redact_url(url) + "\0" + url)
            saved = staging.read_json(path) or {}
            watch = ReplicaWatch(client, st.writer, self.options.replica_check_interval, self.database)
            st.replicas.append(
                Replica(
                    url=client.url,
                    client=client,
                    state_path=path,
                    generation=saved.get("generation"),
                    txid=int(saved.get("txid", 0)),
                    uploaded=set(saved.get("uploaded", [])) & keys,
                    watch=watch,
                )
            )
            if saved.get("generation") is not None:
                watch.check_soon()  # continuing: learn our records (or their loss) before uploading
        self._uploaders = [Uploader(st, r, self._compactor.collect) for r in st.replicas]
