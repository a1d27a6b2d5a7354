"""The replicator: one per database file per process, on a background thread.

Its thread runs an anyio event loop (asyncio backend, which aiobotocore
needs) with one task that captures and one uploader task per replica:

- capture: copy new WAL frames into a staged segment (crash-safe on disk),
  record the position, then checkpoint when the WAL has grown. Segments are
  released to the uploaders at most once per sync interval (at once when the
  database has been idle, when ``sync()`` asks, or when a replica needs a
  snapshot); when the WAL reaches ``checkpoint_frames`` before that, the
  frames are copied early and *held*, so that the WAL can restart (as
  SQLite's own autocheckpoint would have it) without adding uploads: the
  held segments are merged into one at release;
- upload: each replica uploads the staged objects it needs, in order, with
  its own position and its own backoff, so one failing store never holds the
  others back; an object is deleted from staging once no replica needs it.

App threads only *nudge* (a flag and, if the loop is idle, one byte on a
pipe) and never wait for the loop, except in ``sync()`` or a commit with
``durability="replicated"``.

Only one process replicates a database at a time: the holder of the lock in
the staging directory. Others run in standby: they watch the lock and take
over from the recorded position when the holder dies, and meanwhile answer
``sync()`` from the progress the holder publishes.
"""

from __future__ import annotations

import asyncio  # noqa: F401 - imported early on purpose, see below
import contextlib
import errno
import functools
import importlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from . import _check, _format
from ._capture import Capture, CaptureRetry, ContinuityLost, Staged
from ._compact import merge_segments
from ._errors import (
    ConfigError,
    CorruptObjectError,
    ReplicaError,
    StagingFullError,
    SyncTimeoutError,
    WalModeError,
)
from ._lifecycle import compaction_runs, group_generations, plan_retention, snapshot_due
from ._progress import ProgressCallback, SnapshotProgress, SnapshotTracker
from ._replica import ReplicaClient, open_replica, redact_url
from ._staging import Staging
from ._verify import Verification, verify_replica
from ._watch import ReplicaWatch, WatchView, load_writer_id

# Imported here, in whatever thread imports sqlrepl, rather than lazily by
# anyio in the replicator thread: a fork() while that thread is half-way
# through an import would leave the child with half-initialised modules.
importlib.import_module("anyio._backends._asyncio")

_T = TypeVar("_T")

__all__ = ["Options", "Replicator", "Status", "get_replicator", "stop_all"]

log = logging.getLogger("sqlrepl")

# Held segments are merged only while the merged object stays this small: it
# is what saves PUTs at little cost. Under heavy writes parts are released as
# soon as this much is held and uploaded as they are (less lag, bounded merge
# work; requests are few per byte there anyway). The price, measured: a page
# rewritten in two such parts is uploaded twice (the mixed benchmark uploads
# 76 MB per 10k operations, Litestream 52).
_MERGE_STORED_MAX = 4 << 20
_SNAPSHOT = "S"
_SEGMENT = "G"
# A full staging disk shrinks segments down to this, so that one fits in what
# is left (each is uploaded and deleted before the next is written).
_MIN_PIECE = 256 << 10
# Database checksums kept for verification: the newest captures' (a replica
# further behind than this many captures is verified once it catches up).
_CHECKSUMS_KEPT = 4096


@dataclass(frozen=True)
class Options:
    """Tuning for a replicator. Every field has a sensible default.

    - ``sync_interval``: at most one upload (one PUT) per replica per this
      many seconds in steady state (or per 4 MiB under heavy writes); also
      the usual bound on replication lag.
    - ``poll_interval``: how often the WAL is looked at when the database is
      idle, to notice commits that did not go through ``sqlrepl.connect``
      (other processes, other libraries). One 136-byte read each time.
    - ``checkpoint_frames``: once this many frames are in the WAL, copy them
      (even before the sync interval is up; they are held and merged into
      the next upload) and checkpoint, so that the WAL restarts from its
      start as it would under SQLite's own autocheckpoint (whose default is
      also 1000). A WAL left to grow for a whole interval makes every commit
      slower (measured: 0.78 of no replication instead of 0.87).
    - ``wal_restart_frames``: those checkpoints never block writers, but
      under a steady stream of commits they cannot complete, and the WAL only
      restarts from its start once one does; so past this many frames
      sqlrepl holds the write lock for a moment (a few milliseconds: copy the
      last frames, checkpoint them) to let it restart. Every time at 1000
      frames measured 0.86 of no replication, at 4000 0.9.
    - ``truncate_wal_bytes``: truncate the WAL file when it has grown past
      this size (after a large transaction), once it is safe to.
    - ``snapshot_interval``: take a new snapshot at least this often while
      the database changes (seconds); snapshots are also taken when the
      segments since the last one outweigh it.
    - ``retention``: keep what is needed to restore any point this far back
      (seconds); older generations, snapshots and segments are deleted.
      ``None`` keeps everything.
    - ``compaction_interval``: merge the small segments uploaded over this
      many seconds into one, uploaded beside them, so that restores read few
      objects (``None``: never). ``compaction_max_bytes`` bounds the pages a
      merge holds in memory; larger segments are left as they are.
    - ``segment_retention``: delete small segments from the replicas this
      long after a merged one covers them (seconds; ``None``: keep them).
      Until then a point-in-time restore has one-interval resolution; after,
      the merged segments' resolution.
    - ``segment_max_bytes``: a segment copies at most this many bytes of
      WAL pages (or one transaction, if it alone is larger); a larger
      backlog is copied in several, each recorded as it is written, so that
      a staging disk with less free space than the backlog still makes
      progress (after a "no space" error the pieces shrink to fit).
    - ``staging_soft_limit`` / ``staging_hard_limit``: bytes of objects
      waiting in the staging directory before a warning / before the objects
      of replicas that keep failing are dropped (they get a fresh snapshot
      when they come back).
    - ``exit_timeout``: at interpreter exit, wait this long for pending
      uploads.
    - ``busy_timeout``: SQLite busy timeout of the replicator's connections.
    - ``replica_check_interval``: how often each replica is looked at for
      what happens behind sqlrepl's back (seconds; one LIST each time): a
      replica emptied (it is re-seeded with a fresh snapshot) or another
      writer writing to it (an error in the log and in ``status()``). See
      docs/architecture.md, "Watching the replicas".
    - ``verify_interval``: every this many seconds, prove in the background
      that each replica restores to the database's checksum at its newest
      txid (reads the replica's restore chain; see ``sqlrepl._verify``), and
      report it in ``status()``; ``None`` (default): never.
    - ``clock``: the wall clock, in seconds since the epoch (``time.time``):
      the timestamps in keys and the schedules of snapshots, compaction and
      retention read it. Tests give one they can move.
    - ``progress``: called as ``progress(done_bytes, total_bytes)`` while a
      snapshot that replicas must receive (the first of a generation, or
      one a replica asked for) is written and uploaded; see
      ``sqlrepl._progress.SnapshotTracker`` and docs/observability.md.
      Called from the replicator's threads; must be quick; one that raises
      is logged once and not called again. ``None`` (default): no calls.
    """

    sync_interval: float = 1.0
    poll_interval: float = 0.1
    checkpoint_frames: int = 1000
    wal_restart_frames: int = 4000
    truncate_wal_bytes: int = 64 << 20
    snapshot_interval: float = 24 * 3600.0
    retention: float | None = 24 * 3600.0
    retention_check_interval: float = 3600.0
    compaction_interval: float | None = 600.0
    compaction_max_bytes: int = 64 << 20
    segment_retention: float | None = 3600.0
    segment_max_bytes: int = 64 << 20
    staging_soft_limit: int = 256 << 20
    staging_hard_limit: int = 2 << 30
    exit_timeout: float = 10.0
    busy_timeout: float = 5.0
    retry_max: float = 30.0
    replica_check_interval: float = 60.0
    verify_interval: float | None = None
    clock: Callable[[], float] = time.time
    progress: ProgressCallback | None = None

    def __post_init__(self) -> None:
        _check.check_options(self)  # types first: the checks below compare values
        if self.verify_interval is not None and (
            not isinstance(self.verify_interval, int | float) or self.verify_interval <= 0
        ):
            raise ConfigError(
                f"option verify_interval must be seconds > 0, or None; got {self.verify_interval!r}"
            )
        for name in ("sync_interval", "poll_interval", "exit_timeout", "busy_timeout", "retry_max"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"option {name} must be a number >= 0, got {value!r}")
        if not isinstance(self.segment_max_bytes, int) or self.segment_max_bytes < 1:
            raise ConfigError(
                f"option segment_max_bytes must be an integer >= 1, got {self.segment_max_bytes!r}"
            )
        value = self.replica_check_interval
        if not isinstance(value, int | float) or not value > 0:  # (NaN too)
            raise ConfigError(f"option replica_check_interval must be a number of seconds > 0, got {value!r}")
        if self.checkpoint_frames < 1:
            raise ConfigError("option checkpoint_frames must be >= 1")
        if self.wal_restart_frames < self.checkpoint_frames:
            raise ConfigError(
                f"option wal_restart_frames ({self.wal_restart_frames}) must be >= checkpoint_frames"
                f" ({self.checkpoint_frames})"
            )


@dataclass
class _Obj:
    """A staged object, ordered as replicas must upload them."""

    generation: str
    kind: str
    first: int
    last: int
    key: str
    path: str
    size: int
    timestamp_ms: int = 0
    compacted: bool = False  # a merge of segments every replica already has
    page_bytes: int = 0  # uncompressed pages (known once read for compaction)
    held: bool = False  # copied early; uploaded (merged) at the next release

    @property
    def order(self) -> tuple[str, int, int]:
        return (self.generation, self.last, 0 if self.kind == _SEGMENT else 1)


@dataclass
class _Replica:
    url: str
    client: ReplicaClient
    state_path: str
    generation: str | None = None
    txid: int = 0
    uploaded: set[str] = field(default_factory=set)
    last_error: str | None = None
    failing_since: float | None = None
    checked: bool = False
    work: anyio.Event | None = None
    uploads: int = 0
    watch: ReplicaWatch | None = None
    seen: WatchView = field(default_factory=WatchView)  # (a standby's copy of the holder's)

    @property
    def view(self) -> WatchView:
        return self.watch.view if self.watch is not None else self.seen

    last_upload_time: float | None = None  # wall clock, of the last object stored
    # Wall clock capture time of the oldest change this replica lacks; None
    # while it holds everything captured (see Replicator._lag).
    behind_since: float | None = None
    verification: Verification | None = None  # the last periodic verification's outcome
    verified_time: float | None = None  # the last one that proved the replica
    verify_failures: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "generation": self.generation,
            "txid": self.txid,
            "uploaded": sorted(self.uploaded),
        }


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica's progress, as seen by :attr:`Replicator.status`."""

    url: str
    generation: str | None
    txid: int
    last_error: str | None
    requests: dict[str, int]
    #: When the replica was last checked for changes behind sqlrepl's back
    #: (``time.time()``; ``None``: not yet).
    checked_at: float | None = None
    #: How often it was found emptied (and re-seeded with a snapshot).
    wipes: int = 0
    #: Other writers seen writing to this replica (empty unless misconfigured).
    foreign_writers: tuple[str, ...] = ()
    # Seconds since the oldest change this replica lacks was captured (0 when
    # it holds everything captured), and the staged bytes (as stored,
    # compressed) it still has to upload; None where this process does not
    # replicate (standby).
    lag_seconds: float | None = None
    lag_bytes: int | None = None
    last_upload_time: float | None = None  # Unix time of the last object stored; None: none yet
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    # Periodic verification (Options.verify_interval): the last outcome, and
    # the Unix time of the last one that proved the replica restores.
    verification: Verification | None = None
    verified_time: float | None = None
    verify_failures: int = 0  # runs that found the replica would not restore


@dataclass(frozen=True)
class Status:
    """A replicator's progress: generation, captured txid, per-replica state."""

    database: str
    role: str  # "starting", "replicating", "standby", "stopped", "failed"
    generation: str | None
    txid: int
    replicas: tuple[ReplicaStatus, ...]
    staged_objects: int
    staged_bytes: int
    error: str | None
    # The last time the database file was deleted or replaced under the
    # running replicator, what was seen (the new file is replicated as a new
    # generation); None if never.
    replaced: str | None = None
    # Started by this process since it began replicating.
    snapshots: int = 0
    compactions: int = 0
    generations: int = 0
    # The newest snapshot that replicas must receive (a generation's first,
    # or one a replica asked for): bytes read and uploaded of the total.
    snapshot_progress: SnapshotProgress | None = None


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
        self._staging = Staging(self.database)
        self._capture: Capture | None = None
        self._generation: str | None = None
        self._txid = 0
        self._replicas: list[_Replica] = []
        self._staged: list[_Obj] = []
        self._window: list[_Obj] = []
        self._cond = threading.Condition()
        self._checked: tuple[int, str | None, int] = (0, None, 0)  # (monotonic ns, generation, txid)
        self._role = "starting"
        self._error: str | None = None
        self._replaced: str | None = None
        self._replaced_seen: str | None = None
        self._wal_deleted_told = False  # (logged once per incident)
        self._stop = threading.Event()
        self._stop_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._idle = False
        self._woken = False
        self._sync_requests = 0
        self._snapshot_wanted = False
        self._peer_sync = False
        self._last_release = 0.0
        self._since_snapshot_bytes = 0
        self._since_snapshot_count = 0
        self._last_snapshot_time = self.options.clock()
        self._snapshot_txids: list[int] = []  # of the current generation: compaction is cut there
        self._maintain_asked = 0
        self._maintain_done = 0
        self._maintain_retention = True
        self._soft_warned = False
        # A full staging disk (see _out_of_space): pieces shrink, the
        # compaction window is given up and periodic snapshots wait.
        self._space_short = False
        self._piece_bytes = self.options.segment_max_bytes
        self._snapshot_after = 0.0
        self._snapshot_delay = 10.0
        self._nudge_sock: socket.socket | None = None
        self._peer_nudge_at = 0.0
        self._writer = ""  # this staging directory's writer id (see _watch.py), once locked
        self._snapshots = self._compactions = self._generations = 0
        # txid -> database checksum after it, for the captures of the current
        # generation (bounded): what verification compares a replica with.
        self._checksums: dict[int, int] = {}
        self._snapshot_progress = SnapshotTracker(self.options.progress)  # progress hook

    # -- public, any thread ------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._thread_main, name=f"sqlrepl {os.path.basename(self.database)}", daemon=True
            )
            self._thread.start()

    def nudge(self) -> None:
        """A commit happened: wake the loop if it sleeps. Costs a few
        attribute reads, and one write to a pipe when the loop is idle."""
        capture = self._capture
        if capture is not None and capture.wants_write_lock:
            time.sleep(0.0002)  # let the checkpoint barrier have the write lock
        if self._role == "standby":
            self._nudge_peer()
        elif self._idle and not self._woken:
            self._woken = True
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def sync(self, timeout: float | None = 30.0) -> None:
        """Block until everything committed before the call is in every
        replica, or raise :class:`SyncTimeoutError` after ``timeout`` seconds.
        """
        self.start()
        asked = time.monotonic_ns()
        with self._cond:
            self._sync_requests += 1
        self._wake()
        deadline = None if timeout is None else time.monotonic() + timeout
        asked_peer = 0.0
        try:
            with self._cond:
                while not self._synced(asked):
                    if self._role in ("stopped", "failed") and not self._synced(asked):
                        raise SyncTimeoutError(
                            f"sync {self.database}: the replicator is {self._role}"
                            + (f" ({self._error})" if self._error else "")
                        )
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise SyncTimeoutError(self._sync_timeout_message(timeout))
                    standby = self._role == "standby"
                    if standby and time.monotonic() - asked_peer > 1.0:
                        # (Again now and then: the replicating process may
                        # have changed, or missed a datagram.)
                        self._nudge_peer(force=True)
                        asked_peer = time.monotonic()
                    # A standby learns of progress from a file: look often.
                    step = 0.005 if standby else 0.2
                    self._cond.wait(step if left is None else min(left, step))
                    if self._role == "standby":
                        self._read_progress_locked()
        finally:
            with self._cond:
                self._sync_requests -= 1

    def _synced(self, asked: int) -> bool:
        checked_at, gen, txid = self._checked
        if checked_at < asked or gen is None:
            return False
        return all(r.generation == gen and r.txid >= txid for r in self._replicas) and bool(self._replicas)

    def _sync_timeout_message(self, timeout: float | None) -> str:
        lagging = [
            f"{r.url} at txid {r.txid}" + (f" ({r.last_error})" if r.last_error else "")
            for r in self._replicas
            if r.generation != self._checked[1] or r.txid < self._checked[2]
        ]
        return (
            f"sync {self.database}: not every replica caught up within {timeout}s"
            f" (need txid {self._checked[2]}; lagging: {', '.join(lagging) or 'capture not done yet'})."
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
        self._stop_deadline = time.monotonic() + (timeout if flush else 0.0)
        self._stop.set()
        self._wake()

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
        with self._cond:
            now = time.time()
            staged = list(self._staged)
            reps = tuple(self._replica_status(r, staged, now) for r in self._replicas) or tuple(
                ReplicaStatus(c.url, None, 0, None, c.stats.as_dict()) for c in self._clients
            )
            return Status(
                self.database,
                self._role,
                self._generation,
                self._txid,
                reps,
                len(staged),
                sum(o.size for o in staged),
                self._error,
                self._replaced,
                self._snapshots,
                self._compactions,
                self._generations,
                snapshot_progress=self._snapshot_progress.current,  # progress hook
            )

    def _replica_status(self, r: _Replica, staged: list[_Obj], now: float) -> ReplicaStatus:
        lag: tuple[float | None, int | None] = (None, None)
        if self._role == "replicating":
            lag = self._lag(r, staged, now)
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

    def _lag(self, r: _Replica, staged: list[_Obj], now: float) -> tuple[float, int]:
        """(seconds, bytes) by which ``r`` trails the capture. Computed when
        asked, from what the loop keeps anyway: nothing on the commit path."""
        if r.generation == self._generation and r.txid >= self._txid:
            return 0.0, 0
        needed = [o for o in staged if not o.compacted and self._role_of(r, o) in ("upload", "later", "held")]
        since = r.behind_since
        if since is None:  # (behind since before this process started)
            since = min((o.timestamp_ms / 1000 for o in needed), default=now)
        return max(0.0, now - since), sum(o.size for o in needed)

    def _remember_checksum(self, txid: int, checksum: int) -> None:
        checksums = self._checksums
        checksums[txid] = checksum
        while len(checksums) > _CHECKSUMS_KEPT:
            del checksums[next(iter(checksums))]

    async def _verifier(self, interval: float) -> None:
        """Every ``interval`` seconds, verify each replica in turn (see
        ``sqlrepl._verify``): one request at a time, beside the uploads."""
        while True:
            await anyio.sleep(interval)
            for r in self._replicas:
                gen = r.generation
                if gen is None or gen != self._generation or r.txid == 0:
                    continue  # (it is getting a new snapshot: nothing to prove yet)
                try:
                    outcome = await verify_replica(r.client, gen, self._checksums.get)
                except Exception as exc:  # a verification bug must not stop replication
                    log.exception("verification of replica %s of %s crashed", r.url, self.database)
                    outcome = Verification(None, time.time(), gen, None, 0, 0, f"{type(exc).__name__}: {exc}")
                with self._cond:
                    r.verification = outcome
                    if outcome.ok:
                        r.verified_time = outcome.time
                    elif outcome.ok is False:
                        r.verify_failures += 1
                if outcome.ok is False:
                    log.error(
                        "VERIFICATION FAILED: replica %s of %s would not restore to the database: %s",
                        r.url,
                        self.database,
                        outcome.message,
                    )
                elif outcome.ok is None:
                    log.info("verification of replica %s of %s: %s", r.url, self.database, outcome.message)
                else:
                    log.debug("replica %s of %s verified: %s", r.url, self.database, outcome.message)

    def _mark_behind(self) -> None:
        """The capture moved on: every replica that held everything is now
        behind, since now."""
        now = time.time()
        for r in self._replicas:
            if r.behind_since is None:
                r.behind_since = now

    # -- fork ----------------------------------------------------------------

    def _abandon_after_fork(self) -> None:
        """In a forked child: forget the parent's thread, pins and lock,
        closing nothing that could touch the parent's database state."""
        if self._capture is not None:
            self._capture.abandon()
        self._staging.forget_lock_after_fork()
        self._thread = None
        self._role = "stopped"

    # -- the loop --------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            anyio.run(self._main, backend="asyncio")
        except BaseException as exc:  # never let the thread die silently
            log.exception("replicator of %s crashed", self.database)
            with self._cond:
                self._role, self._error = "failed", f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
        finally:
            with self._cond:
                if self._role != "failed":
                    self._role = "stopped"
                self._cond.notify_all()

    async def _main(self) -> None:
        try:
            if not await self._acquire_lock():
                return
            await self._run_locked()
        finally:
            for client in self._clients:
                with contextlib.suppress(Exception):
                    await client.aclose()
            if self._capture is not None:
                await anyio.to_thread.run_sync(self._capture.close)
            if self._nudge_sock is not None:
                self._nudge_sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(self._nudge_path)
            self._staging.unlock()

    @property
    def _nudge_path(self) -> str:
        return os.path.join(self._staging.root, "nudge.sock")

    async def _acquire_lock(self) -> bool:
        """Become the replicating process, or wait in standby until we can."""
        # (Both create files: the first start may meet a full staging disk.)
        await self._until_room(self._staging.ensure)
        while not self._stop.is_set():
            if await self._until_room(self._staging.try_lock):
                return True
            if self._stop.is_set():
                break
            if self._role != "standby":
                log.info("%s is replicated by another process; standing by", self.database)
                with self._cond:
                    self._role = "standby"
            await self._sleep(0.25)
            with self._cond:
                self._read_progress_locked()
                self._cond.notify_all()
        return False

    async def _sleep(self, seconds: float) -> None:
        """Sleep until woken (pipe or peer socket) or ``seconds`` pass."""
        self._idle = True
        if not self._woken:
            with anyio.move_on_after(max(0.0, seconds)):
                await self._wait_wake()
        self._idle = False
        self._woken = False
        self._drain_wake()

    async def _wait_wake(self) -> None:
        """Return when the wake pipe or the peers' nudge socket is readable."""
        sock = self._nudge_sock
        if sock is None:
            await anyio.wait_readable(self._wake_r)
            return
        async with anyio.create_task_group() as tg:

            async def wait(fd: int) -> None:
                await anyio.wait_readable(fd)
                tg.cancel_scope.cancel()

            tg.start_soon(wait, self._wake_r)
            tg.start_soon(wait, sock.fileno())

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        sock = self._nudge_sock
        if sock is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            while True:
                if sock.recv(64) == b"s":
                    # A peer process's sync(): look now and record it.
                    self._peer_sync = True

    async def _run_locked(self) -> None:
        with self._cond:
            self._role = "starting"
        self._staging.remove_temp_files()
        self._open_nudge_socket()
        capture = Capture(self.database, busy_timeout=self.options.busy_timeout, clock=self.options.clock)
        capture.snapshot_progress = self._snapshot_progress  # progress hook
        try:
            await anyio.to_thread.run_sync(capture.open)
        except (WalModeError, FileNotFoundError) as exc:
            with self._cond:
                self._role, self._error = "failed", str(exc)
                self._cond.notify_all()
            log.error("cannot replicate %s: %s", self.database, exc)
            return
        self._capture = capture
        if not await self._load_writer():
            return  # stopped while the staging disk was full
        self._load_replicas()
        await self._start_position()
        self._collect_staged()
        self._track_leftover()  # progress hook
        with self._cond:
            self._role = "replicating"
            self._cond.notify_all()
        self._publish_progress()  # standbys see the new holder's view at once
        async with anyio.create_task_group() as tg:
            for r in self._replicas:
                tg.start_soon(self._uploader, r)
            tg.start_soon(self._maintenance)
            if self.options.verify_interval is not None:
                tg.start_soon(self._verifier, self.options.verify_interval)
            await self._capture_loop()
            # Flush: let uploaders drain until the deadline, then stop them.
            with anyio.move_on_after(max(0.0, self._stop_deadline - time.monotonic())):
                while any(self._next_for(r) is not None and r.last_error is None for r in self._replicas):
                    for r in self._replicas:
                        self._kick(r)
                    await anyio.sleep(0.02)
            pending = [r.url for r in self._replicas if self._next_for(r) is not None]
            if pending:
                log.warning(
                    "stopping with objects of %s not yet uploaded to %s; they stay staged in %s"
                    " and are uploaded on the next start",
                    self.database,
                    ", ".join(pending),
                    self._staging.root,
                )
            tg.cancel_scope.cancel()

    async def _load_writer(self) -> bool:
        """Load (on the first start: make and store) this staging directory's
        writer id; False if stopped while the staging disk was full."""
        writer = await self._until_room(load_writer_id, self._staging)
        if writer is None:
            return False
        self._writer = writer
        return True

    async def _until_room(self, func: Callable[..., _T], *args: Any) -> _T | None:
        """``func(*args)`` in a worker thread. On a full staging disk, say so
        (status() and one log line) and try again, as captures do, until
        there is room; ``None`` if stopped meanwhile."""
        backoff = 0.05
        while True:
            try:
                result = await anyio.to_thread.run_sync(func, *args)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                await self._out_of_space(exc)
                if self._stop.is_set():
                    return None
                await self._pause(backoff)
                backoff = min(backoff * 2, self.options.retry_max)
                continue
            self._space_back()
            return result

    def _open_nudge_socket(self) -> None:
        path = self._nudge_path
        with contextlib.suppress(OSError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            sock.setblocking(False)
        except OSError as exc:  # a path too long for AF_UNIX: peers fall back to polling
            sock.close()
            log.debug("no nudge socket at %s: %s", path, exc)
            return
        self._nudge_sock = sock

    def _nudge_peer(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._peer_nudge_at < 0.05:
            return
        self._peer_nudge_at = now
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.sendto(b"s" if force else b"n", self._nudge_path)
            finally:
                sock.close()
        except OSError:
            pass

    def _load_replicas(self) -> None:
        staged = [self._obj_from_key(k) for k in self._staging.staged_keys()]
        merged = [
            self._obj_from_key(k, compacted=True) for k in self._staging.staged_keys(self._staging.compacted)
        ]
        self._staged = sorted((o for o in staged + merged if o is not None), key=lambda o: o.order)
        window = [self._obj_from_key(k, window=True) for k in self._staging.staged_keys(self._staging.window)]
        self._window = sorted((o for o in window if o is not None), key=lambda o: o.order)
        keys = {o.key for o in self._staged}
        self._replicas = []  # standby kept a view of the other process's; ours now
        for url, client in zip(self.urls, self._clients, strict=True):
            path = self._staging.replica_path(redact_url(url) + "\0" + url)
            saved = self._staging.read_json(path) or {}
            self._replicas.append(
                _Replica(
                    url=client.url,
                    client=client,
                    state_path=path,
                    generation=saved.get("generation"),
                    txid=int(saved.get("txid", 0)),
                    uploaded=set(saved.get("uploaded", [])) & keys,
                    watch=ReplicaWatch(
                        client, self._writer, self.options.replica_check_interval, self.database
                    ),
                )
            )
            watch = self._replicas[-1].watch
            if saved.get("generation") is not None and watch is not None:
                watch.check_soon()  # continuing: learn our records (or their loss) before uploading

    def _obj_from_key(self, key: str, *, compacted: bool = False, window: bool = False) -> _Obj | None:
        parsed = _format.parse_key(key)
        root = self._staging.compacted if compacted else self._staging.window if window else None
        path = self._staging.object_path(key, root)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        if isinstance(parsed, _format.SnapshotKey):
            return _Obj(
                parsed.generation, _SNAPSHOT, parsed.txid, parsed.txid, key, path, size, parsed.timestamp_ms
            )
        if isinstance(parsed, _format.SegmentKey):
            first, last = parsed.first_txid, parsed.last_txid
            return _Obj(
                parsed.generation, _SEGMENT, first, last, key, path, size, parsed.timestamp_ms, compacted
            )
        return None

    def _add_staged(self, staged: Staged) -> _Obj:
        obj = self._obj_from_key(staged.key)
        assert obj is not None
        self._staged = sorted([*self._staged, obj], key=lambda o: o.order)
        return obj

    async def _start_position(self) -> None:
        capture = self._capture
        assert capture is not None
        state = self._staging.read_state()
        for attempt in range(100):
            try:
                reason = await anyio.to_thread.run_sync(capture.start, state)
                break
            except CaptureRetry as exc:
                # Transient by nature (the WAL moved while we read); should it
                # persist, a new generation beats not replicating at all.
                log.debug("%s: start again: %s", self.database, exc)
                reason = f"no consistent view of the database after {attempt + 1} tries: {exc}"
                await anyio.sleep(0.05)
        if reason is None:
            assert state is not None
            self._generation = state["generation"]
            self._txid = capture.txid
            self._remember_checksum(capture.txid, capture.checksum)
            self._since_snapshot_bytes = int(state.get("since_snapshot_bytes", 0))
            self._since_snapshot_count = int(state.get("since_snapshot_count", 0))
            self._last_snapshot_time = float(state.get("last_snapshot_time", self.options.clock()))
            self._snapshot_txids = [int(t) for t in state.get("snapshot_txids", [])]
            # Staged objects past the recorded position were written just
            # before a crash; they will be captured again.
            for obj in list(self._staged):
                if obj.generation == self._generation and obj.first > self._txid:
                    self._staging.remove_object(obj.key)
                    self._staged.remove(obj)
            log.info("%s continues generation %s at txid %d", self.database, self._generation, self._txid)
        else:
            # txids grow across a replica's generations: continue after the
            # highest one known here, after a restore, or in the replicas.
            known = int(state.get("txid", 0)) if state is not None else 0
            capture.txid = max(known, self._staging.restored_txid(), await self._replica_txid())
            log.info("%s starts a new generation: %s", self.database, reason)
            asked = time.monotonic_ns()  # before the snapshot reads the WAL index
            try:
                await self._new_generation()
            except CaptureRetry:
                return  # stopping (the capture loop tries again otherwise)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # No room for the snapshot: say so; the capture loop starts
                # the generation (its position is None) once there is room.
                await self._out_of_space(exc)
                return
            self._set_checked(asked)
        # When continuing, frames past the position are captured by the first
        # pass of the capture loop, which records what it has seen.

    async def _replica_txid(self) -> int:
        """The highest txid any replica holds (one LIST each, at the start of
        a generation only). A replica that cannot be listed in time counts
        0: a new generation is not held up by a failing store."""
        highest = 0
        for client in self._clients:
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

    async def _new_generation(self) -> None:
        capture = self._capture
        assert capture is not None
        generation = _format.new_generation_id()
        self._snapshot_progress.begin(generation, "new generation", len(self._replicas))  # progress hook
        while True:
            try:
                staged = await anyio.to_thread.run_sync(capture.new_generation, self._staging, generation)
                break
            except CaptureRetry:
                if self._stop.is_set() and time.monotonic() >= self._stop_deadline:
                    raise  # (the capture loop then stops)
                await anyio.sleep(0.05)
        self._generation = generation
        self._txid = capture.txid
        self._checksums = {}
        self._remember_checksum(capture.txid, capture.checksum)
        self._generations += 1
        self._snapshots += 1
        self._mark_behind()
        self._drop_window()
        self._add_staged(staged)
        self._track_staged(staged)  # progress hook
        self._snapshot_wanted = False  # (what a replica asked for meanwhile: this one serves)
        self._since_snapshot_bytes = self._since_snapshot_count = 0
        self._last_snapshot_time = self.options.clock()
        self._snapshot_txids = [self._txid]
        await anyio.to_thread.run_sync(self._save_state, self._loop_state())

    def _loop_state(self) -> dict[str, Any]:
        """The loop's part of the persisted state, read on the loop."""
        return {
            "generation": self._generation,
            "since_snapshot_bytes": self._since_snapshot_bytes,
            "since_snapshot_count": self._since_snapshot_count,
            "last_snapshot_time": self._last_snapshot_time,
            "snapshot_txids": list(self._snapshot_txids),
        }

    def _save_state(self, loop_state: dict[str, Any]) -> None:
        """Persist the position (in a worker thread, while the capture loop
        waits on it: the capture's position is the worker's meanwhile)."""
        assert self._capture is not None
        self._staging.write_state({**self._capture.state(), **loop_state})

    def _gen(self) -> str:
        assert self._generation is not None
        return self._generation

    def _set_checked(self, at_ns: int) -> None:
        with self._cond:
            self._checked = (at_ns, self._generation, self._txid)
            self._cond.notify_all()
        self._publish_progress()

    # -- capture -----------------------------------------------------------------

    async def _capture_loop(self) -> None:
        capture = self._capture
        assert capture is not None
        opts = self.options
        backoff = 0.05
        retries = 0
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            due = now - self._last_release >= opts.sync_interval
            with self._cond:
                wanted = self._sync_requests > 0 or self._snapshot_wanted or self._peer_sync
                self._peer_sync = False
            try:
                # Taken before the index is read: all committed before it is seen.
                # (The index reads are one pread of 136 bytes: done right here,
                # not in a worker thread, as each hop to a worker and back is a
                # GIL hand-off that busy app threads can delay by milliseconds.)
                if capture.position is not None and capture.checkpointer_waiting():
                    await self._give_way()
                looked = time.monotonic_ns()
                replaced = capture.replaced()
                if replaced is not None and not await self._follow_replacement(replaced):
                    if stopping:
                        return
                    await self._sleep(opts.poll_interval)
                    continue
                if capture.position is None:  # reopened on a new file, or continuity lost
                    asked = time.monotonic_ns()
                    await self._new_generation()
                    self._set_checked(asked)
                    self._kick_all()
                changed = capture.changed()
                if changed and (due or wanted or stopping):
                    await self._capture_once()
                elif changed and capture.uncopied_frames() >= opts.checkpoint_frames:
                    await self._capture_once(hold=True)  # so that the WAL can restart
                elif wanted or stopping or (due and any(o.held for o in self._staged)):
                    # (Held segments go at the end of their interval, writes or not.)
                    self._set_checked(looked)
                    await self._release_held()
                if self._snapshot_wanted or self._snapshot_due():
                    await self._snapshot()
                if self._compaction_due():
                    await self._compact()
                await self._maintain_if_asked()
                frames = capture.wal_frames()
                if frames >= opts.checkpoint_frames:
                    await self._checkpoint(restart=frames >= opts.wal_restart_frames)
                backoff = 0.05
                self._wal_deleted_told = False
                if self._error is not None and not self._space_short:
                    with self._cond:
                        self._error = None
            except ContinuityLost as exc:
                log.warning("%s: continuity lost (%s); starting a new generation", self.database, exc)
                # Started at the top of the loop, where a full staging disk
                # is reported and retried like any failed capture.
                capture.position = None
                continue
            except CaptureRetry as exc:
                if stopping and time.monotonic() >= self._stop_deadline:
                    # (A view that stays inconsistent, e.g. the -wal deleted
                    # under the app, must not keep stop() from returning.)
                    log.warning(
                        "%s: stopping without capturing what follows txid %d: %s",
                        self.database,
                        self._txid,
                        exc,
                    )
                    return
                if capture.wal_deleted():
                    self._wal_deleted()
                retries += 1
                if retries >= 120:  # about two minutes without a consistent view
                    log.warning("%s: %s, %d times; starting a new generation", self.database, exc, retries)
                    retries = 0
                    capture.position = None
                    continue
                log.debug("%s: capture again: %s", self.database, exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            except Exception as exc:  # disk full, I/O errors: keep the WAL pinned, retry
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    await self._out_of_space(exc)
                else:
                    self._error = f"{type(exc).__name__}: {exc}"
                    log.error("capture of %s failed, retrying in %.1fs: %s", self.database, backoff, exc)
                if stopping:
                    return
                await self._pause(backoff)
                backoff = min(backoff * 2, opts.retry_max)
                continue
            if stopping:
                return
            if changed and not (due or wanted):
                # Something is pending: sleep until it is due, ignoring nudges,
                # but look at the WAL's length every poll interval meanwhile.
                due_at = self._last_release + opts.sync_interval
                await self._sleep_until(min(due_at, now + opts.poll_interval))
            else:
                await self._sleep(opts.poll_interval)

    def _wal_deleted(self) -> None:
        """The -wal file was deleted under the app: what is committed from
        then on cannot be read, so replication cannot go on in this process.
        Say so (status(), and once in the log) and what to do."""
        message = (
            f"the WAL file {self.database}-wal was deleted under the running app: commits since"
            " go into the deleted file, where sqlrepl cannot read them, and are not replicated."
            " Restart the app (once every connection to the database, sqlrepl's included, is"
            " closed, SQLite writes those commits into the database file); replication then"
            " resumes as a new generation. Never delete the -wal file of a database in use"
        )
        if not self._wal_deleted_told:
            self._wal_deleted_told = True
            log.warning("%s", message)
        with self._cond:
            self._error = message
            self._cond.notify_all()

    async def _follow_replacement(self, reason: str) -> bool:
        """The database file was deleted or replaced under the running app.
        Open the file now at the path, to be replicated as a new generation
        (the capture loop starts it); True if done. Until there is a WAL
        database there to open, say so (once in the log, and in status())
        and keep the old file's connections."""
        capture = self._capture
        assert capture is not None
        try:
            await anyio.to_thread.run_sync(capture.reopen)
        except (FileNotFoundError, WalModeError, CaptureRetry) as exc:
            message = f"{reason}; waiting for a WAL-mode database at that path to replicate ({exc})"
            if self._replaced_seen != reason:
                self._replaced_seen = reason
                log.warning("%s", message)
            with self._cond:
                self._error = message
            return False
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        message = (
            f"{reason} (seen {when}); replicating the new file as a new generation. Connections"
            " opened before still use the old, deleted file: reopen them"
        )
        log.warning("%s", message)
        with self._cond:
            self._replaced, self._replaced_seen, self._error = message, None, None
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (a retry's backoff); only stop ends it early."""
        with anyio.move_on_after(seconds):
            while not self._stop.is_set():
                await self._wait_wake()
                self._drain_wake()

    async def _out_of_space(self, exc: OSError) -> None:
        """The staging disk is full. Say so once (what, where, how much is
        free, what to do), then make what room we can: shrink the pieces
        capture writes so that one fits, hand what is staged to the uploaders
        unmerged (a merge needs room for a second copy), give up the
        compaction window (an optimisation that holds disk) and put off
        periodic snapshots. Commits never wait for any of it: the WAL keeps
        what is not copied (pinned), and grows meanwhile."""
        root = self._staging.root
        inodes = ""
        try:
            st = os.statvfs(root)
            free = st.f_bavail * st.f_frsize
            if st.f_files and not st.f_favail:  # (room for bytes, none for another file)
                inodes = ", no free inodes"
        except OSError:
            free = 0
        capture = self._capture
        try:
            waiting = capture.uncopied_frames() * capture.page_size if capture is not None else 0
        except Exception:  # only for the message
            waiting = 0
        message = (
            f"staging folder {root} is out of disk space ({exc}; {free / 2**20:.1f} MiB free{inodes}):"
            f" {waiting / 2**20:.1f} MiB of committed WAL wait to be copied. Commits go on (the WAL"
            " keeps them and grows meanwhile); free space on that filesystem, or give the staging"
            " folder a larger one, and replication resumes by itself"
        )
        if not self._space_short:
            log.error("%s", message)
        else:
            log.debug("%s", message)
        with self._cond:
            self._space_short = True
            self._error = message
            self._cond.notify_all()
        self._piece_bytes = max(_MIN_PIECE, min(self._piece_bytes // 2, free // 2))
        self._drop_window()
        self._snapshot_after = time.monotonic() + self._snapshot_delay
        self._snapshot_delay = min(self._snapshot_delay * 2, 600.0)
        await self._release_held(merge=False)
        self._check_staging_limits()

    def _space_back(self) -> None:
        """A capture went through after a full disk: back to normal pieces."""
        if self._space_short:
            self._space_short = False
            self._piece_bytes = self.options.segment_max_bytes
            log.info(
                "staging folder %s has room again; %s is replicated again", self._staging.root, self.database
            )

    async def _sleep_until(self, when: float) -> None:
        """Sleep until ``when``; only a sync, a snapshot request or stop
        (not a plain nudge) ends it early."""
        with anyio.move_on_after(max(0.0, when - time.monotonic())):
            while True:
                await self._wait_wake()
                self._drain_wake()
                with self._cond:
                    if self._sync_requests or self._snapshot_wanted or self._peer_sync or self._stop.is_set():
                        return

    async def _capture_once(self, *, hold: bool = False) -> None:
        """Copy new frames into a staged segment; unless ``hold``, release
        what is staged to the uploaders (the start of a new interval)."""
        capture = self._capture
        assert capture is not None
        asked = time.monotonic_ns()
        generation, max_bytes = self._gen(), self._piece_bytes
        staged = await self._in_worker(
            lambda record: capture.capture(self._staging, generation, max_bytes=max_bytes, on_piece=record)
        )
        if staged is not None:
            # Held either way: a release merges it with those held before it.
            self._record_segment(staged, capture.txid, capture.checksum)
            await anyio.to_thread.run_sync(self._save_state, self._loop_state())
        self._space_back()
        held = [o for o in self._staged if o.held]
        # Heavy writes: once a merge's worth is held, holding more only adds lag.
        if not hold or sum(o.size for o in held) >= _MERGE_STORED_MAX:
            await self._release_held()
        self._set_checked(asked)
        self._check_staging_limits()

    async def _in_worker(self, work: Callable[[Callable[[Staged], None]], _T]) -> _T:
        """Run the capture step ``work`` in a worker thread, handing it the
        callback that records each segment it stages on the way.

        The callback persists the position there and then (the capture
        relies on that, e.g. under its write barrier), but the accounting
        (the staged list, the checksums, the counters, the replicas' lag)
        is done here on the loop once the worker is done, also when it
        failed half-way. Those structures belong to the loop, whose
        uploaders read and replace them meanwhile: a worker appending to
        and sorting the staged list (which reads as empty while sorted)
        beside them could lose an object."""
        done: list[tuple[Staged, int, int]] = []
        base = self._loop_state()
        capture = self._capture
        assert capture is not None

        def record(staged: Staged) -> None:  # in the worker thread
            done.append((staged, capture.txid, capture.checksum))
            added = sum(os.path.getsize(s.path) for s, _, _ in done)
            self._save_state(
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
        self._txid = txid
        self._remember_checksum(txid, checksum)
        self._mark_behind()
        obj = self._add_staged(staged)
        obj.held = True
        obj.page_bytes = staged.header.page_count * staged.header.page_size
        self._since_snapshot_bytes += obj.size
        self._since_snapshot_count += 1

    async def _release_held(self, *, merge: bool = True) -> None:
        """Start a new interval: hand the held segments to the uploaders,
        the small ones merged (up to ``_MERGE_STORED_MAX`` bytes as stored,
        and ``compaction_max_bytes`` of pages in memory), so that an interval
        of small writes costs one PUT per replica."""
        self._last_release = time.monotonic()
        held = [o for o in self._staged if o.held]
        if not merge:
            for obj in held:
                obj.held = False
            held = []
        if not held:
            self._kick_all()
            return
        cap = self.options.compaction_max_bytes
        runs: list[list[_Obj]] = [[]]
        for obj in held:
            run = runs[-1]
            if run and (
                obj.page_bytes > cap // 4
                or run[-1].page_bytes > cap // 4
                or sum(o.page_bytes for o in run) + obj.page_bytes > cap
                or sum(o.size for o in run) + obj.size > _MERGE_STORED_MAX
                or run[-1].generation != obj.generation
                or run[-1].last + 1 != obj.first
            ):
                runs.append(run := [])
            run.append(obj)
        for run in runs:
            if len(run) >= 2:
                await self._merge_held(run)
            for obj in run:
                obj.held = False
        self._kick_all()

    async def _merge_held(self, run: list[_Obj]) -> None:
        """Replace the segments of ``run`` by one segment covering them. The
        parts are deleted only once the merged object is durable (after a
        crash in between, both are staged and either serves)."""
        try:
            key = await anyio.to_thread.run_sync(self._stage_merged, run, None)
        except Exception as exc:  # uploading the parts as they are is as good
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            (log.info if full else log.error)(
                "merging txids %d-%d failed, uploading them apart: %s", run[0].first, run[-1].last, exc
            )
            return
        obj = self._obj_from_key(key)
        assert obj is not None
        obj.page_bytes = sum(o.page_bytes for o in run)  # (an upper bound; only compared with limits)
        for part in run:
            self._staged.remove(part)
            self._staging.remove_object(part.key)
        self._staged = sorted([*self._staged, obj], key=lambda o: o.order)

    def _stage_merged(self, parts: list[_Obj], root: str | None) -> str:
        """Merge the consecutive segments ``parts`` into one staged object
        (in ``root``; default: the objects to upload) and return its key."""
        with self._staging.temp_object() as (f, finish):
            header = merge_segments([o.path for o in parts], f)
            key = _format.segment_key(
                parts[0].generation, header.first_txid, header.last_txid, header.timestamp_ms
            )
            finish(key, root)
        return key

    async def _checkpoint(self, *, restart: bool) -> None:
        capture = self._capture
        assert capture is not None
        asked = time.monotonic_ns()
        # A segment copied under the write barrier holds the few commits made
        # since the last capture: it goes with the next release.
        generation = self._gen()
        staged = await self._in_worker(
            lambda record: capture.checkpoint(
                self._staging,
                generation,
                truncate_over=self.options.truncate_wal_bytes,
                on_staged=record,
                restart=restart,
            )
        )
        if staged is not None:
            self._set_checked(asked)

    async def _give_way(self) -> None:
        """Another connection's blocking checkpoint waits for our pin (and
        every writer waits for it): copy, record and step aside
        (:meth:`Capture.give_way`). What is copied goes with the next release."""
        capture = self._capture
        assert capture is not None
        asked = time.monotonic_ns()
        generation, max_bytes = self._gen(), self._piece_bytes
        staged = await self._in_worker(
            lambda record: capture.give_way(self._staging, generation, on_staged=record, max_bytes=max_bytes)
        )
        if staged is not None:
            self._set_checked(asked)

    def _snapshot_due(self) -> bool:
        """A snapshot is due when the segments since the last one outweigh
        the database itself (so a restore reads at most about twice the
        database), or ``snapshot_interval`` has passed while it changed.

        Measured against the database's current size, not the last
        snapshot's: a database being filled then never re-snapshots (what is
        appended cannot outweigh the database it builds), where comparing
        with the last snapshot snapshotted it again and again as it grew
        (twice its final size uploaded, found by the benchmarks).
        """
        if self._since_snapshot_count == 0 or time.monotonic() < self._snapshot_after:
            return False
        assert self._capture is not None
        return snapshot_due(
            since_count=self._since_snapshot_count,
            since_bytes=self._since_snapshot_bytes,
            db_bytes=self._capture.db_size * self._capture.page_size,
            last_snapshot_s=self._last_snapshot_time,
            now_s=self.options.clock(),
            interval_s=self.options.snapshot_interval,
        )

    async def _snapshot(self) -> None:
        capture = self._capture
        assert capture is not None
        if await anyio.to_thread.run_sync(capture.changed):
            await self._capture_once()
        if self._snapshot_wanted:  # progress hook: a replica waits for this one
            self._snapshot_progress.begin(self._gen(), "replica needs one", len(self._replicas))
        try:
            staged = await anyio.to_thread.run_sync(capture.snapshot, self._staging, self._gen())
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or self._snapshot_wanted:
                raise  # a replica needs this one: the capture loop reports it and retries
            # A periodic snapshot only shortens restores: segments go on without it.
            (log.debug if self._snapshot_after else log.warning)(
                "no room in %s for a snapshot of %s (%s); trying again later, segments go on meanwhile",
                self._staging.root,
                self.database,
                exc,
            )
            self._snapshot_after = time.monotonic() + self._snapshot_delay
            self._snapshot_delay = min(self._snapshot_delay * 2, 600.0)
            return
        self._snapshot_wanted = False
        self._snapshots += 1
        self._add_staged(staged)
        self._track_staged(staged)  # progress hook
        self._since_snapshot_bytes = self._since_snapshot_count = 0
        self._last_snapshot_time = self.options.clock()
        self._snapshot_after, self._snapshot_delay = 0.0, 10.0
        self._space_back()
        # Only the ones a future compaction window may still reach are kept.
        pending = [
            o for o in self._window + self._staged if o.kind == _SEGMENT and o.generation == self._generation
        ]
        oldest = min((o.first for o in pending), default=self._txid)
        self._snapshot_txids = [t for t in self._snapshot_txids if t >= oldest] + [self._txid]
        await anyio.to_thread.run_sync(self._save_state, self._loop_state())
        self._kick_all()

    # -- upload ------------------------------------------------------------------

    def _track_staged(self, staged: Staged) -> None:
        """Progress hook: tell the snapshot tracker which replicas upload
        ``staged`` (a no-op unless it is a tracked snapshot)."""
        obj = next(o for o in self._staged if o.key == staged.key)
        uploaders = [(id(r), r.url) for r in self._replicas if self._role_of(r, obj) == "upload"]
        self._snapshot_progress.staged(obj.key, obj.size, uploaders)

    def _track_leftover(self) -> None:
        """Progress hook: a snapshot an earlier run staged and did not get
        into every replica that lacks the generation (a restart cut the
        upload of a first snapshot short) is tracked as it is uploaded."""
        obj = self._newest_snapshot()
        if obj is None or all(r.generation == obj.generation for r in self._replicas):
            return
        uploaders = [(id(r), r.url) for r in self._replicas if self._role_of(r, obj) == "upload"]
        if uploaders:
            self._snapshot_progress.resume(obj.generation, obj.key, obj.size, uploaders)

    def _kick(self, r: _Replica) -> None:
        if r.work is not None:
            r.work.set()

    def _kick_all(self) -> None:
        for r in self._replicas:
            self._kick(r)

    def _newest_snapshot(self) -> _Obj | None:
        """The newest staged snapshot of the current generation."""
        snaps = [o for o in self._staged if o.kind == _SNAPSHOT and o.generation == self._generation]
        return max(snaps, key=lambda o: o.first, default=None)

    def _role_of(self, r: _Replica, obj: _Obj) -> str:
        """``done``; ``upload`` (next in order for this replica); ``later``
        (needed once the ones before it are uploaded); ``held`` (copied early,
        waits for the next release); or ``useless``."""
        if obj.key in r.uploaded:
            return "done"
        if obj.held:
            return "held"
        if obj.compacted:  # an extra copy of history the replica has: send it
            return "upload" if obj.generation == r.generation else "useless"
        if obj.generation != r.generation:
            # A replica joining the current generation needs one snapshot:
            # the newest (older ones would only pile up while it is down).
            return "upload" if obj is self._newest_snapshot() else "useless"
        if obj.kind == _SNAPSHOT:
            return "upload" if obj.first >= r.txid else "useless"
        if obj.last <= r.txid:
            return "useless"
        # Staged segments of one generation form an unbroken chain, so one
        # past the next is needed later. (Should a chain ever break, the
        # replica asks for a snapshot, and its txid then jumps past them.)
        return "upload" if obj.first == r.txid + 1 else "later"

    def _next_for(self, r: _Replica) -> _Obj | str | None:
        """The next object ``r`` should upload; ``"snapshot"`` if it needs a
        fresh snapshot first; ``None`` when it is up to date."""
        held = False
        for obj in self._staged:
            role = self._role_of(r, obj)
            if role == "upload":
                return obj
            held = held or role == "held"
        if held:
            return None  # (the rest comes with the next release)
        if r.generation != self._generation or r.txid < self._txid:
            return "snapshot"
        return None

    async def _uploader(self, r: _Replica) -> None:
        r.work = anyio.Event()
        backoff = 0.25
        while True:
            try:
                if not r.checked:
                    await self._check_replica(r)
                while True:
                    if r.watch is not None and r.watch.due():  # (also amid a long backlog)
                        await self._watch_replica(r)
                    nxt = self._next_for(r)
                    if nxt is None:
                        break
                    if nxt == "snapshot":
                        if not self._snapshot_wanted:
                            self._snapshot_wanted = True
                            self._wake()
                        break
                    assert isinstance(nxt, _Obj)
                    with self._snapshot_progress.uploading(id(r), nxt.key):  # progress hook
                        await r.client.put_file(nxt.key, nxt.path)
                    r.uploads += 1
                    await self._uploaded(r, nxt)
                if r.last_error is not None:
                    log.info("replica %s recovered", r.url)
                r.last_error, r.failing_since = None, None
                backoff = 0.25
            except Exception as exc:
                first = r.last_error is None
                r.last_error = str(exc) if isinstance(exc, ReplicaError) else f"{type(exc).__name__}: {exc}"
                r.failing_since = r.failing_since or time.monotonic()
                (log.warning if first else log.debug)(
                    "replica %s failed (%s); retrying with backoff, commits are unaffected", r.url, exc
                )
                if not getattr(exc, "transient", True):
                    r.checked = False
                with self._cond:
                    self._cond.notify_all()
                await anyio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, self.options.retry_max)
                continue
            with anyio.move_on_after(r.watch.seconds_left() if r.watch is not None else math.inf):
                await r.work.wait()
            if r.work.is_set():
                r.work = anyio.Event()

    async def _watch_replica(self, r: _Replica) -> None:
        """The periodic look at a replica (see _watch.py); re-seed it if it
        was emptied."""
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
            await self._reseed(r)

    async def _reseed(self, r: _Replica) -> None:
        """Forget what ``r`` held: it gets the newest snapshot of the current
        generation (a fresh one if none is staged), then what follows."""
        with self._cond:
            r.generation, r.txid, r.uploaded = None, 0, set()
            self._cond.notify_all()
        await self._record_replica(r)
        self._publish_progress()

    async def _record_replica(self, r: _Replica) -> None:
        """Write what ``r`` holds to its file in the staging folder (in a
        worker thread; see :meth:`_write_replica_record`)."""
        await anyio.to_thread.run_sync(self._write_replica_record, r.state_path, r.as_json())

    def _write_replica_record(self, path: str, record: dict[str, Any]) -> None:
        """A full staging disk (the capture loop reports it) is no fault of
        the replica's, nor a reason to stop: the record is rewritten after
        the next upload, and a crash before that costs the replica a fresh
        snapshot, no data."""
        try:
            self._staging.write_json(path, record)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.debug("cannot record a replica's position in %s: %s", path, exc)

    async def _check_replica(self, r: _Replica) -> None:
        """At start (and after a configuration error): is the store there,
        and does it still hold the generation we think it does?"""
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
                await self._reseed(r)
        r.checked = True

    async def _uploaded(self, r: _Replica, obj: _Obj) -> None:
        self._snapshot_progress.uploaded(id(r), obj.key)  # progress hook (before sync() can see it)
        with self._cond:
            r.uploaded.add(obj.key)
            if obj.kind == _SNAPSHOT:
                if obj.generation != r.generation or obj.first > r.txid:
                    r.generation, r.txid = obj.generation, obj.first
            elif obj.generation == r.generation and obj.first == r.txid + 1:
                r.txid = obj.last
            r.last_upload_time = time.time()
            if r.generation == self._generation and r.txid >= self._txid:
                r.behind_since = None
            elif r.behind_since is not None:
                # What it lacks now was captured no earlier than the next object it needs.
                pending = [
                    o.timestamp_ms / 1000
                    for o in self._staged
                    if not o.compacted and self._role_of(r, o) in ("upload", "later", "held")
                ]
                r.behind_since = max(r.behind_since, min(pending, default=r.behind_since))
            self._cond.notify_all()
        await self._record_replica(r)
        self._collect_staged()
        self._publish_progress()
        if obj.kind == _SNAPSHOT and obj.generation == r.generation and r.watch is not None:
            # (Again with each snapshot: whatever removes the newest snapshot
            # then removes the record too, and the watch sees it.)
            await r.watch.claim(obj.generation)

    def _collect_staged(self) -> None:
        """Delete staged objects no replica needs any more; keep uploaded
        small segments of the current generation for compaction."""
        keep = []
        for obj in self._staged:
            if all(self._role_of(r, obj) in ("done", "useless") for r in self._replicas):
                self._snapshot_progress.dropped(obj.key)  # progress hook
                if not self._to_window(obj):
                    self._staging.remove_object(obj.key, self._staging.compacted if obj.compacted else None)
                for r in self._replicas:
                    r.uploaded.discard(obj.key)
            else:
                keep.append(obj)
        self._staged = keep

    def _to_window(self, obj: _Obj) -> bool:
        """Move an uploaded segment into the compaction window, if it belongs
        there. False if the caller should delete it."""
        opts = self.options
        if (
            opts.compaction_interval is None
            or self._space_short
            or obj.kind != _SEGMENT
            or obj.compacted
            or obj.generation != self._generation
            or not all(r.generation == obj.generation and obj.key in r.uploaded for r in self._replicas)
        ):
            return False
        try:
            with open(obj.path, "rb") as f:
                header = _format.read_header(f.read(_format.HEADER_SIZE), key=obj.key)
        except (OSError, CorruptObjectError):
            return False
        obj.page_bytes = header.page_count * header.page_size
        if obj.page_bytes > opts.compaction_max_bytes // 4:
            return False  # a big segment restores fast as it is
        if self._window and self._window[-1].last + 1 != obj.first:
            self._drop_window()  # not a chain (after a resync): start again
        path = self._staging.object_path(obj.key, self._staging.window)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(obj.path, path)
        obj.path = path
        self._window.append(obj)
        return True

    def _drop_window(self) -> None:
        for obj in self._window:
            self._staging.remove_object(obj.key, self._staging.window)
        self._window = []

    def _compaction_due(self) -> bool:
        opts = self.options
        if not self._window or opts.compaction_interval is None:
            return False
        if self._window[0].generation != self._generation:
            self._drop_window()
            return False
        if sum(o.page_bytes for o in self._window) >= opts.compaction_max_bytes:
            return True
        return opts.clock() * 1000 - self._window[0].timestamp_ms >= opts.compaction_interval * 1000

    async def _compact(self) -> None:
        """Merge the window into segments staged for every replica: one per
        run between snapshots (no merged segment spans a snapshot, see
        ``_lifecycle``)."""
        window, self._window = self._window, []
        runs = compaction_runs([(o.first, o.last) for o in window], self._snapshot_txids)
        for run in ([window[i] for i in idx] for idx in runs if len(idx) >= 2):
            self._compactions += 1
            try:
                key = await anyio.to_thread.run_sync(self._stage_merged, run, self._staging.compacted)
            except Exception as exc:  # a bad window is not worth stopping for
                log.error("compaction of txids %d-%d failed: %s", run[0].first, run[-1].last, exc)
                continue
            obj = self._obj_from_key(key, compacted=True)
            assert obj is not None
            staged = self._staged
            if all(o.key != key for o in staged):  # (a crash may have merged it once already)
                staged = [*staged, obj]
            self._staged = sorted(staged, key=lambda o: o.order)
            self._kick_all()
        for obj in window:
            self._staging.remove_object(obj.key, self._staging.window)

    def _check_staging_limits(self) -> None:
        total = sum(o.size for o in self._staged)
        opts = self.options
        if total >= opts.staging_soft_limit and not self._soft_warned:
            self._soft_warned = True
            failing = [r.url for r in self._replicas if r.last_error]
            if failing:
                log.warning(
                    "%d bytes staged for %s (soft limit %d) because replica(s) %s keep failing;"
                    " at %d bytes their queue is dropped and they resync from a snapshot",
                    total,
                    self.database,
                    opts.staging_soft_limit,
                    ", ".join(failing),
                    opts.staging_hard_limit,
                )
            else:
                log.info(
                    "%d bytes staged for %s (soft limit %d): writes outpace uploads for now",
                    total,
                    self.database,
                    opts.staging_soft_limit,
                )
        elif total < opts.staging_soft_limit:
            self._soft_warned = False
        # The newest snapshot is the least any replica can need (to resync):
        # the hard limit bounds the queue beyond it.
        newest = self._newest_snapshot()
        if total - (newest.size if newest else 0) < opts.staging_hard_limit:
            return
        dropped = []
        for r in self._replicas:
            if r.last_error is not None and (r.generation is not None or r.uploaded):
                dropped.append(r.url)
                r.generation, r.txid, r.uploaded = None, 0, set()
                self._write_replica_record(r.state_path, r.as_json())
        if dropped:
            err = StagingFullError(
                f"staging for {self.database} reached its hard limit ({opts.staging_hard_limit} bytes):"
                f" dropped the queue of failing replica(s) {', '.join(dropped)}; they will get a fresh"
                " snapshot when they recover (history between is not kept in them)"
            )
            log.error("%s", err)
            self._collect_staged()

    def _publish_progress(self) -> None:
        """Write ``progress.json`` for standby processes' ``sync()``."""
        checked_at, gen, txid = self._checked
        data = {
            "pid": os.getpid(),
            "checked_ns": checked_at,
            "generation": gen,
            "txid": txid,
            "replicas": [
                {
                    "url": r.url,
                    "generation": r.generation,
                    "txid": r.txid,
                    "error": r.last_error,
                    "checked_at": r.view.checked_at,
                    "wipes": r.view.wipes,
                    "foreign_writers": list(r.view.foreign_writers),
                }
                for r in self._replicas
            ],
        }
        path = os.path.join(self._staging.root, "progress.json")
        tmp = path + f".{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot publish progress: %s", exc)

    def _read_progress_locked(self) -> None:
        """Standby: adopt the replicating process's published progress."""
        try:
            with open(os.path.join(self._staging.root, "progress.json")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return
        self._checked = (int(data.get("checked_ns", 0)), data.get("generation"), int(data.get("txid", 0)))
        by_url = {r["url"]: r for r in data.get("replicas", [])}
        reps = []
        for client in self._clients:
            got = by_url.get(client.url, {})
            reps.append(
                _Replica(
                    url=client.url,
                    client=client,
                    state_path="",
                    generation=got.get("generation"),
                    txid=int(got.get("txid", 0)),
                    last_error=got.get("error"),
                    seen=WatchView(
                        got.get("checked_at"), int(got.get("wipes", 0)), tuple(got.get("foreign_writers", ()))
                    ),
                )
            )
        self._replicas = reps

    # -- maintenance ---------------------------------------------------------------

    async def _maintenance(self) -> None:
        """Apply retention now and then (never on the hot path)."""
        if self.options.retention is None and self.options.segment_retention is None:
            return
        await anyio.sleep(min(60.0, self.options.retention_check_interval))
        while True:
            await self._retention_pass()
            await anyio.sleep(self.options.retention_check_interval)

    async def _retention_pass(self) -> None:
        for r in self._replicas:
            if r.last_error is None and r.generation == self._generation:
                try:
                    await self._apply_retention(r)
                except ReplicaError as exc:
                    log.info("retention on %s skipped: %s", r.url, exc)

    async def _apply_retention(self, r: _Replica) -> None:
        opts = self.options
        gens = group_generations(await r.client.list(_format.GENERATIONS))
        plan = plan_retention(
            gens,
            current=self._generation,
            now_ms=int(opts.clock() * 1000),
            retention_ms=None if opts.retention is None else int(opts.retention * 1000),
            segment_retention_ms=None
            if opts.segment_retention is None
            else int(opts.segment_retention * 1000),
            may_retire=None
            if r.watch is None
            else functools.partial(r.watch.may_retire, current=self._generation),
        )
        if plan.problem is not None:
            log.error("replica %s: %s", r.url, plan.problem)
        delete = list(plan.delete)
        if r.watch is not None:  # a retired generation's writer records go with it
            gone = {g.id for g in gens if g.snapshots and all(k.key in plan.delete for k, _ in g.snapshots)}
            delete += [k for g in sorted(gone) for k in r.watch.record_keys(g)]
        for i in range(0, len(delete), 1000):
            await r.client.delete(delete[i : i + 1000])
        if delete:
            log.info("retention removed %d objects from %s", len(delete), r.url)
        if plan.spared:
            log.info(
                "retention on %s spares generation(s) %s: another writer wrote or may still write them",
                r.url,
                ", ".join(plan.spared),
            )

    async def _maintain_if_asked(self) -> None:
        """Run the retention pass :meth:`_maintain_now` asked for (the
        loop has just snapshotted and compacted what was due)."""
        with self._cond:
            asked, retention = self._maintain_asked, self._maintain_retention
        if asked == self._maintain_done:
            return
        if retention:
            await self._retention_pass()
        with self._cond:
            self._maintain_done = asked
            self._cond.notify_all()

    def _maintain_now(self, *, retention: bool = True, timeout: float = 60.0) -> None:
        """Capture, snapshot and compact what is due by ``options.clock``
        and (with ``retention``) run one retention pass now; return once it
        is done (merged segments are staged, not necessarily uploaded:
        ``sync()`` and ``status`` tell). For tests that move the clock;
        thread-safe, one caller at a time."""
        with self._cond:
            self._maintain_asked += 1
            self._maintain_retention = retention
            want = self._maintain_asked
            self._sync_requests += 1
        self._wake()
        deadline = time.monotonic() + timeout
        try:
            with self._cond:
                while self._maintain_done < want:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._role in ("stopped", "failed"):
                        raise SyncTimeoutError(f"maintenance of {self.database} not done ({self._role})")
                    self._cond.wait(min(left, 0.2))
        finally:
            with self._cond:
                self._sync_requests -= 1


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


# -- the per-process registry -----------------------------------------------------

_registry: dict[str, Replicator] = {}
_registry_lock = threading.Lock()
_abandoned: list[Replicator] = []


def _key(database: str) -> str:
    return os.path.realpath(os.path.abspath(database))


def get_replicator(
    database: str, replicas: Sequence[str] | None = None, options: Options | None = None
) -> Replicator | None:
    """The replicator of ``database`` in this process, created (not started)
    on first use with ``replicas``. ``None`` if there is none and no replicas
    are given. Raises :class:`ConfigError` when ``replicas`` or ``options``
    differ from those of the existing replicator."""
    key = _key(database)
    with _registry_lock:
        rep = _registry.get(key)
        if rep is not None and rep._role in ("stopped", "failed") and replicas:
            rep = None  # a stopped one is replaced by a fresh one
        if rep is None:
            if not replicas:
                return None
            rep = Replicator(key, replicas, options)
            _registry[key] = rep
            return rep
        if replicas and tuple(replicas) != rep.urls:
            raise ConfigError(
                f"{database} is already replicated to {', '.join(redact_url(u) for u in rep.urls)} in this"
                f" process; every connection must name the same replica(s)"
            )
        if options is not None and options != rep.options:
            raise ConfigError(f"{database} is already replicated with other options in this process")
        return rep


def all_replicators() -> list[Replicator]:
    """Every replicator of this process (for metrics: read their ``status``)."""
    with _registry_lock:
        return list(_registry.values())


def stop_all(*, flush: bool = True, timeout: float | None = None) -> None:
    """Stop every replicator of this process (flushing first, by default)."""
    with _registry_lock:
        reps = list(_registry.values())
        _registry.clear()
    # Ask all first, then wait for each: their flushes overlap, and no new
    # thread is needed (none can be started at interpreter shutdown).
    for rep in reps:
        rep.request_stop(flush=flush, timeout=timeout)
    for rep in reps:
        rep.join(timeout)


def _after_fork_in_child() -> None:
    with _registry_lock:
        for rep in _registry.values():
            rep._abandon_after_fork()
            _abandoned.append(rep)
        _registry.clear()


def _at_exit() -> None:
    stop_all(flush=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
# Run before concurrent.futures' exit hook (hooks run last-registered first):
# the flush may need executors (DNS lookups) that the hook shuts down.
_register: Callable[[Callable[[], None]], Any] = (
    getattr(threading, "_register_atexit", None) or __import__("atexit").register
)
_register(_at_exit)
