"""Every error sqlrepl raises, in one place.

All derive from :class:`SqlreplError`. Messages say what failed, on what, and,
where the user must act, what to do. Secrets never appear in a message:
replicas are named by their redacted URL.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CorruptObjectError",
    "DatabaseExistsError",
    "FollowTimeoutError",
    "FollowedDatabaseError",
    "NoBackupError",
    "ObjectNotFoundError",
    "PointInTimeError",
    "ReplicaAuthError",
    "ReplicaError",
    "ReplicaNotFoundError",
    "ReplicaPermissionError",
    "ReplicaUnavailableError",
    "RestoreError",
    "SqlreplError",
    "StagingFullError",
    "SyncTimeoutError",
    "WalModeError",
]


class SqlreplError(Exception):
    """Base class of every error raised by sqlrepl."""


class ConfigError(SqlreplError, ValueError):
    """A replica URL, option or argument is malformed or unsupported.

    Raised at configuration time (``connect``, ``restore``, the CLI, the
    Django and Flask integrations), never later on a commit.
    """


class WalModeError(SqlreplError):
    """The database is not, and cannot be put, in WAL journal mode.

    Replication reads the write-ahead log; a database in another journal mode
    (or an in-memory one, or one held in exclusive locking mode) cannot be
    replicated.
    """


class ReplicaError(SqlreplError):
    """A replica (object store or folder) failed an operation.

    ``replica`` is the redacted URL of the replica. ``transient`` says whether
    retrying later may succeed (network failures, throttling, 5xx) or not
    (bad credentials, missing bucket).
    """

    transient: bool = True

    def __init__(self, message: str, *, replica: str = "") -> None:
        super().__init__(message)
        self.replica = replica


class ReplicaUnavailableError(ReplicaError):
    """The replica could not be reached or kept failing: connection refused,
    timeouts, throttling or server errors after retries."""

    transient = True


class ReplicaAuthError(ReplicaError):
    """The replica rejected the credentials (wrong key, expired token, or no
    permission on the bucket)."""

    transient = False


class ReplicaNotFoundError(ReplicaError):
    """The bucket (or the replica's root folder) does not exist."""

    transient = False


class ReplicaPermissionError(ReplicaError):
    """The replica exists but cannot be written or read by this process
    (for example a folder without write permission)."""

    transient = False


class ObjectNotFoundError(ReplicaError):
    """An object named by a key is not in the replica."""

    transient = False


class CorruptObjectError(SqlreplError):
    """An object read from a replica (or a staged file) failed its checks:
    bad magic, unknown version, truncated, or checksum mismatch."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class RestoreError(SqlreplError):
    """A restore could not produce a database."""


class NoBackupError(RestoreError):
    """The replica holds no generation to restore from."""


class DatabaseExistsError(RestoreError, FileExistsError):
    """Restore was asked to write a database that already exists."""


class PointInTimeError(RestoreError):
    """No restorable state matches the requested txid or timestamp."""


class GenerationUnrestorableError(RestoreError):
    """The generation that holds the asked state (by default the newest) has
    objects in the replica but cannot be restored (its snapshot is gone, or
    a segment of its chain is missing), while an older state could be.
    Restoring that older state would silently drop acknowledged commits, so
    it is done only when asked (``fallback=True``, ``--fallback``)."""


class SyncTimeoutError(SqlreplError, TimeoutError):
    """``sync()`` (or a commit with ``durability="replicated"``) did not see
    every replica catch up within the timeout. The data is committed locally
    and staged; it is not lost, only not yet confirmed in every replica."""


class StagingFullError(SqlreplError):
    """The local staging directory is over its hard limit because a replica
    has been failing for a long time. That replica will be resynchronised from
    a fresh snapshot when it comes back."""


class FollowedDatabaseError(SqlreplError):
    """The database is a read replica kept by a follower (``sqlrepl.follow``):
    it is read-only. Raised by ``sqlrepl.connect`` on it, and by a second
    follower of the same file."""


class FollowTimeoutError(SqlreplError, TimeoutError):
    """A read replica's follower did not reach the "following" state in time
    (the Django backend's ``OPTIONS["follow_timeout"]``): the replica is
    unreachable or still holds no snapshot, or the follower failed."""
