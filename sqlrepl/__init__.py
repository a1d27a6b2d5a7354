"""sqlrepl: continuous replication of SQLite databases to S3 or a folder,
from inside the Python process.

    import sqlrepl

    sqlrepl.restore("app.db", "s3://bucket/prefix")        # at startup
    with sqlrepl.connect("app.db", "s3://bucket/prefix") as conn:
        conn.execute("insert ...")
    sqlrepl.sync("app.db")                                  # wait for the replicas

See README.md and docs/ for the guarantees and the replica format.
"""

from __future__ import annotations

from ._connection import Connection, connect, status, sync, sync_async
from ._errors import (
    ConfigError,
    CorruptObjectError,
    DatabaseExistsError,
    FollowedDatabaseError,
    FollowTimeoutError,
    GenerationUnrestorableError,
    NoBackupError,
    ObjectNotFoundError,
    PointInTimeError,
    ReplicaAuthError,
    ReplicaError,
    ReplicaNotFoundError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
    RestoreError,
    SqlreplError,
    StagingFullError,
    SyncTimeoutError,
    WalModeError,
)
from ._follow import Follower, FollowStatus, follow
from ._progress import SnapshotProgress
from ._replica import ObjectInfo, ReplicaClient, RequestStats, open_replica
from ._replicator import Options, Replicator, Status, get_replicator, stop_all
from ._report import ReplicaReport, StatusReport, read_status
from ._restore import RestoreResult, restore, restore_async
from ._verify import Verification

__version__ = "0.1.0.dev0"

__all__ = [
    # replicate
    "connect",
    "sync",
    "sync_async",
    "status",
    "stop_all",
    "Connection",
    "Options",
    "Replicator",
    "Status",
    "SnapshotProgress",
    "Verification",
    "get_replicator",
    "read_status",
    "StatusReport",
    "ReplicaReport",
    # restore
    "restore",
    "restore_async",
    "RestoreResult",
    # read replicas
    "follow",
    "Follower",
    "FollowStatus",
    # storage
    "ReplicaClient",
    "ObjectInfo",
    "RequestStats",
    "open_replica",
    # errors
    "SqlreplError",
    "ConfigError",
    "WalModeError",
    "ReplicaError",
    "ReplicaUnavailableError",
    "ReplicaAuthError",
    "ReplicaNotFoundError",
    "ReplicaPermissionError",
    "ObjectNotFoundError",
    "CorruptObjectError",
    "RestoreError",
    "NoBackupError",
    "DatabaseExistsError",
    "FollowedDatabaseError",
    "GenerationUnrestorableError",
    "FollowTimeoutError",
    "PointInTimeError",
    "SyncTimeoutError",
    "StagingFullError",
]
