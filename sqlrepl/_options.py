"""The replicator's settings (:class:`Options`) and what it reports
(:class:`Status`, one :class:`ReplicaStatus` per replica). Values only: the
replicator's parts read them, none of them acts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import _check
from ._errors import ConfigError
from ._progress import ProgressCallback, SnapshotProgress
from ._verify import Verification

__all__ = ["Options", "ReplicaStatus", "Status"]


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
    - ``retention_check_interval``: how often the retention pass
      (``retention``, ``segment_retention``) runs (seconds); the first one
      runs within a minute of the start.
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
    - ``retry_max``: the longest wait between retries (of a failing replica,
      a capture, a full staging disk), in seconds; the wait doubles from a
      fraction of a second up to this.
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
