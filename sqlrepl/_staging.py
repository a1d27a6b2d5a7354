"""The local staging directory beside the database (``app.db-sqlrepl/``).

It holds the replicator's position (``state.json``), the objects captured but
not yet in every replica (``objects/``, laid out like the replica itself),
each replica's upload position (``replicas/``), and the lock that makes one
process the replicator (``lock``). Every file is written crash-safe: a
temporary file, fsync, rename, fsync of the folder. A crash at any moment
leaves either the old or the new version of each file, never a mix.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any

from . import _format
from ._queue import SEGMENT, SNAPSHOT, StagedObject

__all__ = ["RESTORED_FILE", "Staging", "fsync_dir", "staging_dir_for"]

STATE_VERSION = 1
# Written by restore: the highest txid the replica held (a new generation
# continues after it).
RESTORED_FILE = "restored.json"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder, so that renames and creations in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir_for(database: str) -> str:
    """The staging folder of ``database``: ``<database>-sqlrepl``."""
    return os.path.abspath(database) + "-sqlrepl"


class Staging:
    """Files in the staging directory of one database. Not thread-safe: one
    replicator (one thread at a time) owns it while it holds the lock."""

    def __init__(self, database: str) -> None:
        self.root = staging_dir_for(database)
        self.objects = os.path.join(self.root, "objects")  # waiting for upload
        self.compacted = os.path.join(self.root, "compacted")  # merged segments waiting for upload
        self.window = os.path.join(self.root, "window")  # uploaded, kept for the next merge
        self.replicas = os.path.join(self.root, "replicas")
        self._lock_fd: int | None = None

    def ensure(self) -> None:
        for path in (self.root, self.objects, self.replicas):
            os.makedirs(path, exist_ok=True)

    # -- the replicator lock -------------------------------------------------

    def try_lock(self) -> bool:
        """Take the replicator lock without waiting; True if this process has it.

        A ``flock`` on ``lock``: tied to this descriptor only (unlike POSIX
        record locks it is not dropped when some other descriptor of the file
        closes) and released by the kernel when the process dies.
        """
        if self._lock_fd is not None:
            return True
        self.ensure()
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        return True

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def forget_lock_after_fork(self) -> None:
        """In a forked child: close the inherited lock descriptor. The parent's
        lock is unaffected (it holds its own descriptor of the same open file)."""
        self.unlock()

    # -- small JSON files ----------------------------------------------------

    def write_json(self, path: str, value: Any) -> None:
        data = json.dumps(value, sort_keys=True, indent=1).encode()
        with self.atomic_file(path) as f:
            f.write(data)

    def read_json(self, path: str) -> Any:
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    @property
    def state_path(self) -> str:
        return os.path.join(self.root, "state.json")

    def read_state(self) -> dict[str, Any] | None:
        state = self.read_json(self.state_path)
        if state is not None and state.get("version") != STATE_VERSION:
            return None
        return state  # type: ignore[no-any-return]

    def write_state(self, state: dict[str, Any]) -> None:
        self.write_json(self.state_path, {**state, "version": STATE_VERSION})

    def restored_txid(self) -> int:
        """The highest txid of the replica a restore rebuilt the database
        from (``restored.json``), or 0."""
        try:
            data = self.read_json(os.path.join(self.root, RESTORED_FILE))
            return int(data.get("replica_txid", 0)) if isinstance(data, dict) else 0
        except (OSError, ValueError):
            return 0

    def replica_path(self, url: str) -> str:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return os.path.join(self.replicas, digest + ".json")

    # -- staged objects ------------------------------------------------------

    def object_path(self, key: str, root: str | None = None) -> str:
        return os.path.join(root or self.objects, *key.split("/"))

    @contextmanager
    def atomic_file(self, path: str) -> Iterator[IO[bytes]]:
        """Write ``path`` crash-safe: yields a file to write; on success it is
        fsynced and renamed over ``path`` and the folder fsynced."""
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(6)}")
        f = open(tmp, "w+b")  # noqa: SIM115 - closed below on every path
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
            fsync_dir(folder)
        except BaseException:
            # (Closing flushes again, and on a full disk fails again: the
            # temporary, which holds what room there was, must go anyway.)
            with suppress(OSError):
                f.close()
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def staged_keys(self, root: str | None = None) -> list[str]:
        """Keys of every object (complete files only) under ``root`` (default:
        those waiting for upload), sorted."""
        root = root or self.objects
        out = []
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            rel = os.path.relpath(folder, root)
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                out.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
        return sorted(out)

    def staged_object(self, key: str, root: str | None = None) -> StagedObject | None:
        """The staged object ``key`` in ``root`` (default: those to upload;
        in :attr:`compacted`, a merged copy), sized; ``None`` if it is gone
        or ``key`` names no snapshot or segment."""
        parsed = _format.parse_key(key)
        path = self.object_path(key, root)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        if isinstance(parsed, _format.SnapshotKey):
            return StagedObject(
                parsed.generation, SNAPSHOT, parsed.txid, parsed.txid, key, path, size, parsed.timestamp_ms
            )
        if isinstance(parsed, _format.SegmentKey):
            first, last, compacted = parsed.first_txid, parsed.last_txid, root == self.compacted
            return StagedObject(
                parsed.generation, SEGMENT, first, last, key, path, size, parsed.timestamp_ms, compacted
            )
        return None

    def remove_object(self, key: str, root: str | None = None) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.object_path(key, root))

    def remove_temp_files(self) -> None:
        """Delete temporaries left by a crash mid-write."""
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    os.unlink(os.path.join(folder, name))

    @contextmanager
    def temp_object(self) -> Iterator[tuple[IO[bytes], Any]]:
        """Write a staged object whose key is known only at the end.

        Yields ``(file, finish)``; call ``finish(key)`` once the content is
        complete: the file is fsynced and renamed to the key's path (folders
        fsynced), and ``finish`` returns that path. With ``sync=False`` it is
        only renamed; :meth:`make_durable` does the rest later. Without
        ``finish`` (or on an error) the temporary is removed.
        """
        self.ensure()
        tmp = os.path.join(self.objects, f".tmp-{secrets.token_hex(6)}")
        f = open(tmp, "w+b")  # noqa: SIM115 - closed below on every path
        done: list[str] = []

        def finish(key: str, root: str | None = None, *, sync: bool = True) -> str:
            f.flush()
            if sync:
                os.fsync(f.fileno())
            path = self.object_path(key, root)
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            os.replace(tmp, path)
            if sync:
                fsync_dir(folder)
                fsync_dir(self.objects)
            done.append(path)
            return path

        try:
            yield f, finish
        finally:
            try:
                f.close()  # (after a failed write this fails too: see atomic_file)
            finally:
                if not done:
                    with suppress(FileNotFoundError):
                        os.unlink(tmp)

    def make_durable(self, path: str) -> None:
        """Finish what ``finish(key, sync=False)`` left: fsync the object and
        the folders that name it."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path))
        fsync_dir(self.objects)
