"""The follower's local copy on disk: its lock, its recorded states, and
batches applied to it atomically for every reader.

How readers stay safe. The copy is kept in rollback-journal mode (header
bytes 18 and 19 are 1): a rollback-mode reader takes a SHARED lock for each
read transaction and, on taking it, compares bytes 24..39 of the file (the
change counter first) with what it cached, so a reader that sees the counter
move rereads everything. :meth:`FollowedCopy.commit` applies a batch exactly
as a SQLite writer commits one (sqlite.org/atomiccommit.html):

1. ``BEGIN EXCLUSIVE`` on a sqlite3 connection of its own: SQLite takes
   RESERVED, PENDING (no new readers) and EXCLUSIVE (waits for the readers
   in flight), and tells connections in this process the same through its
   own lock bookkeeping. No page is written through that connection, so its
   COMMIT/ROLLBACK only unlocks (pager state WRITER_LOCKED).
2. A rollback journal (``<database>-journal``, sqlite.org/fileformat2.html
   "The Rollback Journal") holding the original content of every page about
   to change and the original size, fsynced: from here a crash leaves a
   *hot* journal that the next reader (or the follower's restart) plays
   back before reading, so no reader ever sees a half-applied batch.
3. The new pages, the new size and a new change counter (bytes 24 and 92)
   and in-header size (28) are written through a descriptor that stays open
   for the life of the process (closing any descriptor of the file would
   drop this process's POSIX locks, sqlite.org/howtocorrupt.html 2.2), then
   fsynced.
4. The journal is deleted: the commit point. Then the lock is released.

Before each commit both the state before and the state after are recorded
in ``follow.json`` in the staging folder, so that a restarted follower can
prove which one the file holds (:meth:`FollowedCopy.adopt`).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import struct
import threading
from collections.abc import Iterator
from typing import Any

from ._errors import CorruptObjectError, FollowedDatabaseError
from ._follow_image import (
    RUN_PAGES,
    Batch,
    Image,
    logical_page1,
    physical_page1,
    scan_hashes,
)
from ._format import page_hash
from ._staging import fsync_dir, staging_dir_for
from ._wal import lock_page

__all__ = [
    "JOURNAL_MAGIC",
    "CopyDivergedError",
    "FollowedCopy",
    "check_not_followed",
    "follow_lock_path",
    "journal_checksum",
    "state_path",
]

log = logging.getLogger("sqlrepl")

JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
_SECTOR = 512  # SQLite's journal header size on a powersafe-overwrite file
_STATE_VERSION = 1


def journal_checksum(nonce: int, page: bytes | memoryview) -> int:
    """A rollback journal record's checksum: the nonce plus every 200th byte
    of the page, from the end (the pager's rule; no page size is a multiple
    of 200, so byte 0 is never counted either way the spec is read)."""
    return (nonce + sum(page[len(page) - 200 :: -200])) & 0xFFFFFFFF


class CopyDivergedError(CorruptObjectError):
    """The copy was written by someone other than the follower."""


# Read-write descriptors on followed files, never closed (see the module
# docstring); one per file per process, reused by a later follower.
_fds: dict[tuple[int, int], int] = {}
_fds_lock = threading.Lock()


def _long_lived_rw(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _fds_lock:
        old = _fds.get(key)
        if old is not None:
            # Closing this one would drop locks: keep it too (a bounded leak,
            # once per follower start).
            _fds[(key[0], -len(_fds))] = fd
            return old
        _fds[key] = fd
        return fd


def follow_lock_path(database: str) -> str:
    return os.path.join(staging_dir_for(database), "follow.lock")


def state_path(database: str) -> str:
    return os.path.join(staging_dir_for(database), "follow.json")


def check_not_followed(database: str) -> None:
    """Raise :class:`FollowedDatabaseError` if a follower (in any process)
    keeps ``database`` (an absolute path): it is a read-only copy."""
    path = follow_lock_path(database)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = ""
        with contextlib.suppress(OSError, ValueError):
            with open(state_path(database), "rb") as f:
                state = json.loads(f.read())
            owner = f" from {state.get('replica')} (follower pid {state.get('pid')})"
        raise FollowedDatabaseError(
            f"{database} is a read replica kept by a follower{owner}: it is read-only."
            " Read it with sqlite3.connect(); write to the primary; or stop the follower first"
        ) from None
    finally:
        os.close(fd)


class FollowedCopy:
    """The file ``database`` as one follower of ``replica`` (a URL) keeps
    it. Blocking: every method but :meth:`lock` runs on a worker thread of
    the follower, one at a time.

    Knows the file and its recorded states, not the replica: each method
    takes the :class:`Image` the follower holds and returns the new one.
    """

    def __init__(self, database: str, replica: str, *, lock_timeout: float, overwrite: bool) -> None:
        self.database = database
        self.replica = replica
        self.lock_timeout = lock_timeout
        self.overwrite = overwrite
        self.staging = staging_dir_for(database)
        self._fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    # -- the follower lock -------------------------------------------------------

    def lock(self) -> None:
        """Take the follower lock (held until :meth:`close`). Raises
        :class:`FollowedDatabaseError` if the file is not a follower's copy
        (unless ``overwrite``) or another follower keeps it."""
        if (
            not self.overwrite
            and os.path.exists(self.database)
            and os.path.getsize(self.database) > 0
            and not os.path.exists(state_path(self.database))
        ):
            raise FollowedDatabaseError(
                f"{self.database} exists and is not a copy kept by a follower; delete it, or pass"
                " overwrite=True to replace it with the replica's state"
            )
        os.makedirs(self.staging, exist_ok=True)
        fd = os.open(follow_lock_path(self.database), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FollowedDatabaseError(
                f"{self.database} is already kept by another follower; one follower per copy"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Close the locking connection and release the follower lock (the
        long-lived descriptor stays open: see the module docstring)."""
        if self._conn is not None:
            self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _connect(self) -> None:
        if self._fd is None:
            self._fd = _long_lived_rw(self.database)
        if self._conn is None:
            # isolation_level=None: BEGIN/ROLLBACK are ours to issue.
            self._conn = sqlite3.connect(
                self.database, timeout=self.lock_timeout, isolation_level=None, check_same_thread=False
            )

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold SQLite's EXCLUSIVE lock on the copy (rolling back any hot
        journal first, as every SQLite connection does)."""
        self._connect()
        assert self._conn is not None
        self._conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            # Nothing was written through this connection: this only unlocks.
            self._conn.execute("ROLLBACK")

    # -- recorded states ---------------------------------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        try:
            with open(state_path(self.database), "rb") as f:
                state = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        if state.get("version") != _STATE_VERSION or state.get("replica") != self.replica:
            return None
        return state  # type: ignore[no-any-return]

    def _write_state(self, candidates: list[dict[str, Any]]) -> None:
        state = {
            "version": _STATE_VERSION,
            "replica": self.replica,
            "pid": os.getpid(),
            "candidates": candidates,
        }
        path = state_path(self.database)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(json.dumps(state, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.staging)

    # -- finding the copy's state ------------------------------------------------

    def adopt(self) -> Image | None:
        """The copy's state, if the file holds one of the states recorded
        before the last apply (the one before it, or the one it made)."""
        state = self._read_state()
        if state is None:
            if not self.overwrite and os.path.getsize(self.database) > 0:
                raise FollowedDatabaseError(
                    f"{self.database} exists and is not a copy kept by a follower of {self.replica};"
                    " delete it, or pass overwrite=True to replace it with the replica's state"
                )
            return None
        self._connect()
        assert self._fd is not None
        with self._exclusive():  # a hot journal left by a crash is rolled back here
            head = os.pread(self._fd, 100, 0)
            if len(head) < 100:
                return None
            page_size = struct.unpack_from(">H", head, 16)[0] or 65536
            size = os.fstat(self._fd).st_size // page_size
            page1 = os.pread(self._fd, page_size, 0)
            hashes = scan_hashes(self._fd, page_size, size)
        counter = struct.unpack_from(">I", page1, 24)[0]
        rest = 0
        for h in hashes[1:]:
            rest ^= h
        for cand in reversed(state["candidates"]):
            fields = bytes.fromhex(cand["fields"])
            h1 = page_hash(1, logical_page1(page1, fields))
            if (cand["page_size"], cand["size"]) == (page_size, size) and rest ^ h1 == cand["checksum"]:
                hashes[0] = h1
                return Image(
                    cand["generation"],
                    cand["txid"],
                    cand["timestamp_ms"],
                    page_size,
                    size,
                    hashes,
                    cand["checksum"],
                    fields,
                    counter,
                )
        log.warning("follower of %s: the copy matches no recorded state; re-seeding", self.database)
        return None

    def scan_unknown(self) -> Image:
        """An image of a file that holds no known state, for a re-seed: its
        pages as they are (page 1 is always rewritten anyway)."""
        self._connect()
        assert self._fd is not None
        with self._exclusive():
            head = os.pread(self._fd, 100, 0)
            page_size = (struct.unpack_from(">H", head, 16)[0] or 65536) if len(head) >= 100 else 4096
            if page_size < 512 or page_size & (page_size - 1):
                page_size = 4096
            size = os.fstat(self._fd).st_size // page_size
            hashes = scan_hashes(self._fd, page_size, size)
            counter = struct.unpack_from(">I", head, 24)[0] if len(head) >= 100 else 0
        checksum = 0
        for h in hashes:
            checksum ^= h
        return Image(
            "", 0, 0, page_size, size, hashes, checksum, head[18:20] + head[24:32] + head[92:96], counter
        )

    def install_seed(self, seed: str, image: Image) -> Image:
        """Turn ``seed`` (a restored database at ``image``, in the staging
        folder) into a rollback-journal copy and link it into place, never
        over a file that appeared meanwhile."""
        fd = os.open(seed, os.O_RDWR)
        try:
            page1 = os.pread(fd, image.page_size, 0)
            image.counter = struct.unpack_from(">I", page1, 24)[0] + 1
            os.pwrite(fd, physical_page1(page1, image.counter, image.size), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._write_state([image.describe()])
        try:
            os.link(seed, self.database)
        except FileExistsError:
            raise FollowedDatabaseError(
                f"{self.database} appeared while the follower restored it (did a reader create it?);"
                " start readers once the follower reports it is following"
            ) from None
        finally:
            os.unlink(seed)
        fsync_dir(os.path.dirname(self.database))
        return image

    # -- applying a batch --------------------------------------------------------

    def commit(self, old: Image, batch: Batch, full_hashes: array.array[int] | None = None) -> Image:
        """Apply ``batch`` (on top of ``old``, the state the file holds) to
        the copy atomically for every reader (see the module docstring);
        the new image. ``full_hashes``: every page's hash after the batch,
        when the batch knows them all (a move to a restored state)."""
        self._connect()
        fd = self._fd
        assert fd is not None
        new = self._next_image(old, batch, full_hashes)
        # Both states are recorded before the commit point: a restart finds
        # the file in one of them (the journal decides which) and proves it.
        self._write_state([old.describe(), new.describe()])
        ps0, n0, n1 = old.page_size, old.size, batch.size
        skip0 = lock_page(ps0)
        if ps0 != batch.page_size:
            saved = [p for p in range(1, n0 + 1) if p != skip0]
        else:
            saved = sorted(({p for p in batch.pages if p <= n0} | set(range(n1 + 1, n0 + 1)) | {1}) - {skip0})
        journal = self.database + "-journal"
        with self._exclusive():
            page1 = os.pread(fd, ps0, 0)
            if struct.unpack_from(">I", page1, 24)[0] != old.counter:
                raise CopyDivergedError(
                    f"{self.database} was changed by someone else (its change counter moved): a followed"
                    " copy is read-only"
                )
            self._write_journal(journal, saved, ps0, n0)
            first = batch.page(1) if 1 in batch.pages else page1
            self._write_pages(batch, physical_page1(first, new.counter, n1))
            os.ftruncate(fd, n1 * batch.page_size)
            os.fsync(fd)
            os.unlink(journal)  # the commit point
            fsync_dir(os.path.dirname(self.database))
        return new

    @staticmethod
    def _next_image(old: Image, batch: Batch, full_hashes: array.array[int] | None) -> Image:
        n1 = batch.size
        new_hashes = full_hashes if full_hashes is not None else array.array("Q", old.hashes[:n1])
        if full_hashes is None:
            if len(new_hashes) < n1:
                new_hashes.extend(array.array("Q", bytes(8 * (n1 - len(new_hashes)))))
            for p, h in batch.hashes.items():
                if p <= n1:
                    new_hashes[p - 1] = h
        return Image(
            batch.generation,
            batch.txid,
            batch.timestamp_ms,
            batch.page_size,
            n1,
            new_hashes,
            batch.checksum,
            batch.fields,
            (old.counter + 1) & 0xFFFFFFFF or 1,
        )

    def _write_journal(self, journal: str, pages: list[int], page_size: int, size: int) -> None:
        assert self._fd is not None
        nonce = secrets.randbits(32)
        head = JOURNAL_MAGIC + struct.pack(">IIIII", len(pages), nonce, size, _SECTOR, page_size)
        jfd = os.open(journal, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            buf = bytearray(head.ljust(_SECTOR, b"\0"))
            off = 0
            for p in pages:
                orig = os.pread(self._fd, page_size, (p - 1) * page_size).ljust(page_size, b"\0")
                buf += struct.pack(">I", p) + orig + struct.pack(">I", journal_checksum(nonce, orig))
                if len(buf) >= 1 << 20:
                    os.pwrite(jfd, buf, off)
                    off += len(buf)
                    buf.clear()
            os.pwrite(jfd, buf, off)
            os.fsync(jfd)
        finally:
            os.close(jfd)
        # The journal's name must survive a power loss before any page moves.
        fsync_dir(os.path.dirname(journal))

    def _write_pages(self, batch: Batch, first: bytes) -> None:
        assert self._fd is not None
        fd, ps = self._fd, batch.page_size
        os.pwrite(fd, first, 0)
        run: list[bytes] = []
        start = 0
        for p in sorted(batch.pages):
            if p == 1 or p > batch.size:
                continue
            page = batch.page(p)
            if run and p == start + len(run) and len(run) < RUN_PAGES:
                run.append(page)
                continue
            if run:
                os.pwrite(fd, b"".join(run), (start - 1) * ps)
            run, start = [page], p
        if run:
            os.pwrite(fd, b"".join(run), (start - 1) * ps)
