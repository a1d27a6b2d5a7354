"""The state the replicator's parts share, guarded by one lock.

The replicator thread's event loop is the only writer of everything here
(worker threads only hand results back to it); app threads read it under
:attr:`LoopState.cond` (``status``, ``sync()``) and set a few request flags
under it. The parts are in ``_replicator.py``'s docstring.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._capture import Capture
from ._options import Options
from ._progress import SnapshotTracker
from ._queue import StagedObject, StagedQueue
from ._replica import ReplicaClient
from ._staging import Staging
from ._verify import Verification
from ._watch import ReplicaWatch, WatchView

__all__ = ["LoopState", "Replica"]

# Database checksums kept for verification: the newest captures' (a replica
# further behind than this many captures is verified once it catches up).
_CHECKSUMS_KEPT = 4096


@dataclass
class Replica:
    """One replica's position (what it holds) and health. Its uploader
    (``_uploader.py``) changes it; in a standby, a view of the replicating
    process's, read from ``progress.json``."""

    url: str
    client: ReplicaClient
    state_path: str
    generation: str | None = None
    txid: int = 0
    uploaded: set[str] = field(default_factory=set)
    last_error: str | None = None
    checked: bool = False
    work: anyio.Event | None = None
    watch: ReplicaWatch | None = None
    seen: WatchView = field(default_factory=WatchView)  # (a standby's copy of the holder's)
    last_upload_time: float | None = None  # wall clock, of the last object stored
    # Wall clock capture time of the oldest change this replica lacks; None
    # while it holds everything captured (see _uploader.lag).
    behind_since: float | None = None
    verification: Verification | None = None  # the last periodic verification's outcome
    verified_time: float | None = None  # the last one that proved the replica
    verify_failures: int = 0

    @property
    def view(self) -> WatchView:
        return self.watch.view if self.watch is not None else self.seen

    def kick(self) -> None:
        """Wake its uploader: there may be something to upload."""
        if self.work is not None:
            self.work.set()

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "generation": self.generation,
            "txid": self.txid,
            "uploaded": sorted(self.uploaded),
        }


def _nothing() -> None:
    pass


@dataclass(eq=False)
class LoopState:
    """Everything the parts share. Fields marked *(cond)* are read by app
    threads: change them under ``cond``."""

    database: str
    options: Options
    staging: Staging
    clients: list[ReplicaClient]
    cond: threading.Condition = field(default_factory=threading.Condition)
    stop: threading.Event = field(default_factory=threading.Event)
    stop_deadline: float = 0.0  # (monotonic) a flush at stop ends by then
    capture: Capture | None = None
    generation: str | None = None  # (cond) the captured generation and txid
    txid: int = 0  # (cond)
    replicas: list[Replica] = field(default_factory=list)  # (cond)
    queue: StagedQueue = field(default_factory=StagedQueue)  # (cond)
    # (cond) (monotonic ns, generation, txid): everything committed before
    # that time is captured up to that txid (what sync() compares with).
    checked: tuple[int, str | None, int] = (0, None, 0)
    role: str = "starting"  # (cond) see Status.role
    error: str | None = None  # (cond)
    replaced: str | None = None  # (cond) see Status.replaced
    sync_requests: int = 0  # (cond) sync() calls waiting
    snapshot_wanted: bool = False  # (cond) a replica needs a fresh snapshot
    peer_sync: bool = False  # (cond) a standby's sync() asked through the socket
    last_release: float = 0.0  # (monotonic) the start of the current interval
    space_short: bool = False  # (cond) the staging disk is full (see _faults.py)
    writer: str = ""  # this staging directory's writer id (see _watch.py), once locked
    snapshots: int = 0  # (cond) counters for Status
    compactions: int = 0
    generations: int = 0
    # txid -> database checksum after it, for the captures of the current
    # generation (bounded): what verification compares a replica with.
    checksums: dict[int, int] = field(default_factory=dict)
    # Set by the leadership part: wake the loop; publish progress to standbys.
    wake: Callable[[], None] = _nothing
    publish: Callable[[], None] = _nothing
    progress: SnapshotTracker = field(init=False)  # the progress hook (Options.progress)

    def __post_init__(self) -> None:
        self.progress = SnapshotTracker(self.options.progress)

    def gen(self) -> str:
        assert self.generation is not None
        return self.generation

    def remember_checksum(self, txid: int, checksum: int) -> None:
        checksums = self.checksums
        checksums[txid] = checksum
        while len(checksums) > _CHECKSUMS_KEPT:
            del checksums[next(iter(checksums))]

    def mark_behind(self) -> None:
        """The capture moved on: every replica that held everything is now
        behind, since now."""
        now = time.time()
        for r in self.replicas:
            if r.behind_since is None:
                r.behind_since = now

    def kick_all(self) -> None:
        for r in self.replicas:
            r.kick()

    def release_unmerged(self) -> None:
        """Start a new interval: hand every held segment to the uploaders as
        it is (see ``_scheduler.CaptureLoop.release_held`` for the merge)."""
        self.last_release = time.monotonic()
        for obj in self.queue.held():
            obj.held = False
        self.kick_all()

    def set_checked(self, at_ns: int) -> None:
        """Everything committed before ``at_ns`` is captured: tell sync()."""
        with self.cond:
            self.checked = (at_ns, self.generation, self.txid)
            self.cond.notify_all()
        self.publish()

    def add_staged(self, key: str, root: str | None = None) -> StagedObject:
        """Queue the object just staged as ``key`` (in ``root``)."""
        obj = self.staging.staged_object(key, root)
        assert obj is not None
        return self.queue.add(obj)
