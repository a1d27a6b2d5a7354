"""Read replicas: keep a local copy of a replicated database current, readable
by any process with plain ``sqlite3`` while it is updated.

:func:`follow` starts a :class:`Follower`: a background thread that restores
the database if it is missing, then polls the replica and applies each new
segment (see docs/follow.md for the design, guarantees and cost).

How readers stay safe. The copy is kept in rollback-journal mode (header
bytes 18 and 19 are 1): a rollback-mode reader takes a SHARED lock for each
read transaction and, on taking it, compares bytes 24..39 of the file (the
change counter first) with what it cached, so a reader that sees the counter
move rereads everything. The follower applies a batch exactly as a SQLite
writer commits one (sqlite.org/atomiccommit.html):

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

The database checksum of docs/format.md is kept over the *logical* pages
(page 1 as the primary wrote it, before the follower's header changes), so
every segment and snapshot is checked exactly as a restore checks it.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import io
import json
import logging
import os
import secrets
import shutil
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from . import _format
from ._errors import (
    ConfigError,
    CorruptObjectError,
    FollowedDatabaseError,
    ReplicaError,
    RestoreError,
)
from ._format import HEADER_SIZE, SegmentKey, page_hash, read_header
from ._lifecycle import Generation, group_generations
from ._replica import ReplicaClient, open_replica
from ._restore import restore_async
from ._staging import fsync_dir, staging_dir_for
from ._wal import lock_page

__all__ = ["FollowStatus", "Follower", "check_not_followed", "follow"]

log = logging.getLogger("sqlrepl")

JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
_SECTOR = 512  # SQLite's journal header size on a powersafe-overwrite file
_STATE_VERSION = 1
_BATCH_BYTES = 64 << 20  # page bytes held before a batch is committed
_RUN_PAGES = 256


def _fields(page1: bytes | memoryview) -> bytes:
    """The header bytes of page 1 the follower rewrites on its copy (journal
    mode, change counter, in-header size, version-valid-for), as the primary
    wrote them."""
    return bytes(page1[18:20]) + bytes(page1[24:32]) + bytes(page1[92:96])


def _logical(page1: bytes | memoryview, fields: bytes) -> bytes:
    """Page 1 as the primary wrote it, from the follower's copy of it."""
    out = bytearray(page1)
    out[18:20] = fields[0:2]
    out[24:32] = fields[2:10]
    out[92:96] = fields[10:14]
    return bytes(out)


def _physical(page1: bytes | memoryview, counter: int, size: int) -> bytes:
    """Page 1 as the follower's copy holds it: rollback-journal mode, its
    own change counter (valid for the in-header size), the copy's size."""
    out = bytearray(page1)
    out[18] = out[19] = 1
    struct.pack_into(">II", out, 24, counter, size)
    struct.pack_into(">I", out, 92, counter)
    return bytes(out)


def journal_checksum(nonce: int, page: bytes | memoryview) -> int:
    """A rollback journal record's checksum: the nonce plus every 200th byte
    of the page, from the end (the pager's rule; no page size is a multiple
    of 200, so byte 0 is never counted either way the spec is read)."""
    return (nonce + sum(page[len(page) - 200 :: -200])) & 0xFFFFFFFF


@dataclass(frozen=True)
class FollowStatus:
    """A follower's progress.

    ``state``: "starting", "waiting" (the replica has no snapshot yet),
    "following", "stopped" or "failed". ``txid``/``generation``: the
    primary's state the copy holds; ``timestamp_ms``: when the primary's
    replicator captured it. ``reachable`` is False while the replica fails
    (the copy keeps serving its last state); ``error`` says why.
    """

    database: str
    replica: str
    state: str
    generation: str | None
    txid: int
    timestamp_ms: int
    applied_at: float | None
    batches: int
    reachable: bool
    error: str | None
    requests: dict[str, int] = field(default_factory=dict)


@dataclass
class _Image:
    """The committed state of the copy, as the follower knows it."""

    generation: str
    txid: int
    timestamp_ms: int
    page_size: int
    size: int
    hashes: array.array[int]  # per page, page 1 over its logical content
    checksum: int
    fields: bytes
    counter: int

    def describe(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "txid": self.txid,
            "timestamp_ms": self.timestamp_ms,
            "page_size": self.page_size,
            "size": self.size,
            "checksum": self.checksum,
            "fields": self.fields.hex(),
        }


class _Diverged(CorruptObjectError):
    """The copy was written by someone other than the follower."""


_FROM_SOURCE = b""  # a page to be read from the batch's source file


class _Batch:
    """Changes on top of an :class:`_Image`, held until committed: page
    number -> new content (``None``: zeros; ``_FROM_SOURCE``: read it from
    ``source``), with the checksum kept as they are added."""

    def __init__(self, image: _Image, source: int | None = None, page_size: int | None = None) -> None:
        self.image = image
        self.source = source
        self.page_size = page_size or image.page_size
        self.pages: dict[int, bytes | None] = {}
        self.hashes: dict[int, int] = {}
        self.size = image.size
        self.checksum = image.checksum
        self.fields = image.fields
        self.generation = image.generation
        self.txid = image.txid
        self.timestamp_ms = image.timestamp_ms
        self.held = 0
        self.objects = 0

    def hash_of(self, pgno: int) -> int:
        h = self.hashes.get(pgno)
        if h is not None:
            return h
        hashes = self.image.hashes
        return hashes[pgno - 1] if pgno <= len(hashes) else 0

    def set(self, pgno: int, page: bytes | None, h: int | None = None) -> None:
        if h is None:
            h = page_hash(pgno, page) if page is not None else 0
        self.checksum ^= self.hash_of(pgno) ^ h
        self.hashes[pgno] = h
        self.pages[pgno] = page
        if page:
            self.held += len(page)
            if pgno == 1:
                self.fields = _fields(page)

    def apply_segment(self, data: bytes, key: str) -> None:
        """Add one segment (the whole object ``data``). It may start before
        the current state (a merged segment that covers it): its pages are
        the state after its last txid either way, and the result is checked
        against its "after" checksum. Raises :class:`CorruptObjectError`."""
        header = read_header(data[:HEADER_SIZE], key=key)
        if len(data) != HEADER_SIZE + header.body_length:
            raise CorruptObjectError(f"object truncated or padded ({key})", key=key)
        if header.kind != _format.KIND_SEGMENT or header.page_size != self.page_size:
            raise CorruptObjectError(f"not a segment of this database's page size ({key})", key=key)
        if not header.first_txid - 1 <= self.txid < header.last_txid:
            raise CorruptObjectError(f"segment does not continue txid {self.txid} ({key})", key=key)
        if header.first_txid - 1 == self.txid and header.pre_checksum != self.checksum:
            raise CorruptObjectError(
                f"segment does not continue the copy (pre-checksum mismatch) ({key})", key=key
            )
        skip = lock_page(self.page_size)
        for p in range(header.truncate_size + 1, self.size + 1):
            if p != skip and (self.hash_of(p) or p in self.pages):
                self.set(p, None)
        for pgno, page in _format.iter_pages(header, io.BytesIO(data[HEADER_SIZE:]), key=key):
            if pgno < 1 or pgno > header.db_size or pgno == skip:
                raise CorruptObjectError(f"page {pgno} outside the database ({key})", key=key)
            self.set(pgno, page)
        for p in range(header.db_size + 1, self.size + 1):
            if self.hash_of(p) or p in self.pages:
                self.set(p, None)
        self.size = header.db_size
        if self.checksum != header.post_checksum:
            raise CorruptObjectError(f"copy does not match the segment's database checksum ({key})", key=key)
        self.txid, self.timestamp_ms = header.last_txid, header.timestamp_ms
        self.objects += 1

    def page(self, pgno: int) -> bytes:
        data = self.pages[pgno]
        if data is None:
            return bytes(self.page_size)
        if data is _FROM_SOURCE:
            assert self.source is not None
            data = os.pread(self.source, self.page_size, (pgno - 1) * self.page_size)
            return data.ljust(self.page_size, b"\0")
        return data


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


def _follow_lock_path(database: str) -> str:
    return os.path.join(staging_dir_for(database), "follow.lock")


def _state_path(database: str) -> str:
    return os.path.join(staging_dir_for(database), "follow.json")


def check_not_followed(database: str) -> None:
    """Raise :class:`FollowedDatabaseError` if a follower (in any process)
    keeps ``database`` (an absolute path): it is a read-only copy."""
    path = _follow_lock_path(database)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = ""
        with contextlib.suppress(OSError, ValueError):
            with open(_state_path(database), "rb") as f:
                state = json.loads(f.read())
            owner = f" from {state.get('replica')} (follower pid {state.get('pid')})"
        raise FollowedDatabaseError(
            f"{database} is a read replica kept by a follower{owner}: it is read-only."
            " Read it with sqlite3.connect(); write to the primary; or stop the follower first"
        ) from None
    finally:
        os.close(fd)


class Follower:
    """Keeps ``database`` a current, read-only copy of ``replica``. Made by
    :func:`follow`; a context manager (``with`` stops it). Thread-safe.

    Does not guarantee how fresh the copy is: it is at most one poll plus
    one apply behind what the replica holds, and the replica is up to one
    sync interval behind the primary.
    """

    def __init__(
        self,
        database: str | os.PathLike[str],
        replica: str | ReplicaClient,
        *,
        poll_interval: float = 1.0,
        generation_check_every: int = 10,
        lock_timeout: float = 5.0,
        overwrite: bool = False,
        on_apply: Callable[[FollowStatus], None] | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ConfigError(f"poll_interval must be positive, got {poll_interval!r}")
        if generation_check_every < 1:
            raise ConfigError(f"generation_check_every must be at least 1, got {generation_check_every!r}")
        self.database = os.path.abspath(os.fspath(database))
        self._client = open_replica(replica) if isinstance(replica, str) else replica
        self._own_client = isinstance(replica, str)
        self.replica = self._client.url
        self.poll_interval = poll_interval
        self.generation_check_every = generation_check_every
        self.lock_timeout = lock_timeout
        self.overwrite = overwrite
        self._on_apply = on_apply
        self._staging = staging_dir_for(self.database)
        self._image: _Image | None = None
        self._fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._cond = threading.Condition()
        self._state = "starting"
        self._error: str | None = None
        self._reachable = True
        self._batches = 0
        self._applied_at: float | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        self._ticks = 0
        self._reseed = False
        self._diverged = False
        self._failures = 0
        self._pending: _Batch | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Follower:
        """Take the follower lock and start the thread. Raises
        :class:`FollowedDatabaseError` if another follower keeps the file."""
        with self._cond:
            if self._thread is not None:
                return self
            if (
                not self.overwrite
                and os.path.exists(self.database)
                and os.path.getsize(self.database) > 0
                and not os.path.exists(_state_path(self.database))
            ):
                raise FollowedDatabaseError(
                    f"{self.database} exists and is not a copy kept by a follower; delete it, or pass"
                    " overwrite=True to replace it with the replica's state"
                )
            os.makedirs(self._staging, exist_ok=True)
            fd = os.open(_follow_lock_path(self.database), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FollowedDatabaseError(
                    f"{self.database} is already kept by another follower; one follower per copy"
                ) from None
            self._lock_fd = fd
            self._thread = threading.Thread(
                target=self._thread_main,
                name=f"sqlrepl follow {os.path.basename(self.database)}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread (an apply in progress finishes first) and release
        the follower lock. The copy stays a valid database at its last state."""
        with self._cond:
            if self._wake_w < 0:
                return
            self._stop.set()
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cond:
            # Only once the thread is gone: a descriptor number closed while
            # it might still be written to could name another file by then.
            if self._wake_w >= 0 and (thread is None or not thread.is_alive()):
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def __enter__(self) -> Follower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> FollowStatus:
        with self._cond:
            img = self._image
            return FollowStatus(
                database=self.database,
                replica=self.replica,
                state=self._state,
                generation=img.generation if img else None,
                txid=img.txid if img else 0,
                timestamp_ms=img.timestamp_ms if img else 0,
                applied_at=self._applied_at,
                batches=self._batches,
                reachable=self._reachable,
                error=self._error,
                requests=self._client.stats.as_dict(),
            )

    def wait(self, predicate: Callable[[FollowStatus], bool], timeout: float | None = None) -> FollowStatus:
        """Block until ``predicate(status())`` holds (checked after every
        change) or ``timeout`` passes; return the last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                status = self.status()
                if predicate(status) or status.state in ("stopped", "failed"):
                    return status
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return status
                self._cond.wait(left)

    # -- the thread --------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(self, "_" + name, value)
            self._cond.notify_all()

    def _thread_main(self) -> None:
        try:
            anyio.run(self._main, backend="asyncio")
        except BaseException as exc:  # never let the thread die silently
            log.exception("follower of %s crashed", self.database)
            self._set(state="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if self._conn is not None:
                self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            with self._cond:
                if self._state != "failed":
                    self._state = "stopped"
                self._cond.notify_all()

    async def _main(self) -> None:
        try:
            while not self._stop.is_set():
                delay = self.poll_interval
                try:
                    await self._tick()
                    self._failures = 0
                    if not self._reachable:
                        log.info("follower of %s: replica %s reachable again", self.database, self.replica)
                    self._set(reachable=True, error=None)
                except ReplicaError as exc:
                    if self._reachable:
                        log.warning(
                            "follower of %s: replica %s unreachable, serving txid %d: %s",
                            self.database,
                            self.replica,
                            self._image.txid if self._image else 0,
                            exc,
                        )
                    self._set(reachable=False, error=str(exc))
                except (sqlite3.OperationalError, OSError) as exc:
                    # The copy is unchanged (or a hot journal, which the next
                    # apply's BEGIN EXCLUSIVE rolls back first): try again.
                    log.warning("follower of %s: apply put off (%s); retrying", self.database, exc)
                    self._set(error=f"apply put off: {exc}")
                except (CorruptObjectError, RestoreError) as exc:
                    log.warning("follower of %s: %s; re-seeding from the newest snapshot", self.database, exc)
                    self._reseed = True
                    self._pending = None
                    self._diverged = self._diverged or isinstance(exc, _Diverged)
                    self._set(error=str(exc))
                    # A re-seed costs a restore: back off while they keep failing.
                    self._failures += 1
                    delay = min(self.poll_interval * 2**self._failures, max(self.poll_interval, 60.0))
                await self._sleep(delay)
        finally:
            if self._own_client:
                with contextlib.suppress(Exception):
                    await self._client.aclose()

    async def _sleep(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await anyio.wait_readable(self._wake_r)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 64):
                pass

    async def _tick(self) -> None:
        if self._image is None:
            await self._open()
            return
        img = self._image
        pending, self._pending = self._pending, None
        if pending is not None and pending.image is img:
            # Put off by a long reader last time: apply what was fetched.
            self._pending = pending
            await anyio.to_thread.run_sync(self._commit, pending)
            self._pending = None
            return
        self._ticks += 1
        if self._reseed or self._ticks % self.generation_check_every == 0:
            gens = group_generations(await self._client.list(_format.GENERATIONS))
            usable = [g for g in gens if g.snapshots]
            if not usable:
                return
            newest = usable[-1]
            if self._reseed or newest.id != img.generation:
                if self._diverged:
                    # What the follower knew of the file is wrong: diff the
                    # new state against the file as it is.
                    scanned = await anyio.to_thread.run_sync(self._scan_unknown)
                    scanned.generation, scanned.txid, scanned.timestamp_ms = (
                        img.generation,
                        img.txid,
                        img.timestamp_ms,
                    )
                    self._image = scanned
                await self._move(newest)
                self._diverged = False
                return
            current = next(g for g in gens if g.id == img.generation)
            candidates = [(k, s) for k, s in current.segments if k.first_txid - 1 <= img.txid < k.last_txid]
            if not candidates and current.last_txid > img.txid:
                log.info(
                    "follower of %s: segments after txid %d are gone; re-seeding", self.database, img.txid
                )
                await self._move(current)
                return
        else:
            candidates = await self._next_segments(img.generation, img.txid)
        if not candidates:
            return
        batch = _Batch(img)
        while candidates:
            key, _size = max(candidates, key=lambda c: c[0].last_txid)
            data = await self._client.get(key.key)
            await anyio.to_thread.run_sync(batch.apply_segment, data, key.key)
            if batch.held >= _BATCH_BYTES or self._stop.is_set():
                break
            # Another LIST only while catching up: a segment captured more
            # than two polls ago says more are likely waiting.
            if key.timestamp_ms > (time.time() - 2 * self.poll_interval) * 1000:
                break
            candidates = await self._next_segments(img.generation, batch.txid)
        self._pending = batch  # kept if the apply is put off
        await anyio.to_thread.run_sync(self._commit, batch)
        self._pending = None

    async def _next_segments(self, generation: str, txid: int) -> list[tuple[SegmentKey, int]]:
        """The segments that start right after ``txid`` (one LIST of a
        narrow prefix)."""
        prefix = f"{_format.GENERATIONS}{generation}/segments/{txid + 1:016x}-"
        out = []
        for obj in await self._client.list(prefix):
            parsed = _format.parse_key(obj.key)
            if isinstance(parsed, SegmentKey):
                out.append((parsed, obj.size))
        return out

    # -- opening, seeding, moving ------------------------------------------------

    async def _open(self) -> None:
        if await anyio.Path(self.database).exists():
            image = await anyio.to_thread.run_sync(self._adopt)
            if image is not None:
                self._opened(image)
                return
            # Not a copy this follower can prove: replace it through the
            # journal (readers still see whole states) from the newest state.
            gens = group_generations(await self._client.list(_format.GENERATIONS))
            usable = [g for g in gens if g.snapshots]
            if not usable:
                self._set(state="waiting")
                return
            self._image = await anyio.to_thread.run_sync(self._scan_unknown)
            await self._move(usable[-1])
            self._set(state="following")
            return
        image = await self._seed()
        if image is None:
            self._set(state="waiting")
            return
        self._opened(image)

    def _opened(self, image: _Image) -> None:
        self._image = image
        self._applied_at = time.time()
        log.info(
            "following %s into %s: generation %s, txid %d",
            self.replica,
            self.database,
            image.generation,
            image.txid,
        )
        self._set(state="following")
        self._notify()

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

    def _read_state(self) -> dict[str, Any] | None:
        try:
            with open(_state_path(self.database), "rb") as f:
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
        path = _state_path(self.database)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(json.dumps(state, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self._staging)

    def _scan(self, fd: int, page_size: int, size: int) -> array.array[int]:
        hashes = array.array("Q", bytes(8 * size))
        skip = lock_page(page_size)
        step = _RUN_PAGES * page_size
        for start in range(0, size * page_size, step):
            data = os.pread(fd, step, start)
            view = memoryview(data)
            for i in range(0, len(data) // page_size):
                p = start // page_size + i + 1
                if p <= size and p != skip:
                    hashes[p - 1] = page_hash(p, view[i * page_size : (i + 1) * page_size])
        return hashes

    def _adopt(self) -> _Image | None:
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
            hashes = self._scan(self._fd, page_size, size)
        counter = struct.unpack_from(">I", page1, 24)[0]
        rest = 0
        for h in hashes[1:]:
            rest ^= h
        for cand in reversed(state["candidates"]):
            fields = bytes.fromhex(cand["fields"])
            h1 = page_hash(1, _logical(page1, fields))
            if (cand["page_size"], cand["size"]) == (page_size, size) and rest ^ h1 == cand["checksum"]:
                hashes[0] = h1
                return _Image(
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

    def _scan_unknown(self) -> _Image:
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
            hashes = self._scan(self._fd, page_size, size)
            counter = struct.unpack_from(">I", head, 24)[0] if len(head) >= 100 else 0
        checksum = 0
        for h in hashes:
            checksum ^= h
        return _Image(
            "", 0, 0, page_size, size, hashes, checksum, head[18:20] + head[24:32] + head[92:96], counter
        )

    async def _restore_to(self, path: str, generation: str | None) -> tuple[Any, _Image] | None:
        """Restore the newest state (of ``generation``) into ``path``, a
        fresh file in the staging folder; its image (page 1 logical)."""

        def clear() -> None:
            shutil.rmtree(path + "-sqlrepl", ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        await anyio.to_thread.run_sync(clear)
        result = await restore_async(path, self._client, generation=generation, if_replica_exists=True)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(path + "-sqlrepl", ignore_errors=True))
        if result is None:
            return None

        def scan() -> _Image:
            fd = os.open(path, os.O_RDONLY)
            try:
                page1 = os.pread(fd, 100, 0)
                page_size = struct.unpack_from(">H", page1, 16)[0] or 65536
                size = os.fstat(fd).st_size // page_size
                hashes = self._scan(fd, page_size, size)
            finally:
                os.close(fd)
            checksum = 0
            for h in hashes:
                checksum ^= h
            return _Image(
                result.generation,
                result.txid,
                result.timestamp_ms,
                page_size,
                size,
                hashes,
                checksum,
                _fields(page1),
                0,
            )

        return result, await anyio.to_thread.run_sync(scan)

    async def _seed(self) -> _Image | None:
        """First start with no file: restore beside it, turn the copy into a
        rollback-journal database and link it into place (never over a file
        that appeared meanwhile)."""
        tmp = os.path.join(self._staging, "follow-seed.db")
        got = await self._restore_to(tmp, None)
        if got is None:
            return None
        _result, image = got

        def install() -> _Image:
            fd = os.open(tmp, os.O_RDWR)
            try:
                page1 = os.pread(fd, image.page_size, 0)
                image.counter = struct.unpack_from(">I", page1, 24)[0] + 1
                os.pwrite(fd, _physical(page1, image.counter, image.size), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._write_state([image.describe()])
            try:
                os.link(tmp, self.database)
            except FileExistsError:
                raise FollowedDatabaseError(
                    f"{self.database} appeared while the follower restored it (did a reader create it?);"
                    " start readers once the follower reports it is following"
                ) from None
            finally:
                os.unlink(tmp)
            fsync_dir(os.path.dirname(self.database))
            return image

        return await anyio.to_thread.run_sync(install)

    async def _move(self, gen: Generation) -> None:
        """Move the copy to the newest state of ``gen`` (a new generation, or
        a re-seed): restore it beside the copy, then apply the pages that
        differ as one journaled batch."""
        assert self._image is not None
        tmp = os.path.join(self._staging, "follow-next.db")
        got = await self._restore_to(tmp, gen.id)
        if got is None:
            return
        _result, target = got

        def apply() -> None:
            assert self._image is not None
            old = self._image
            fd = os.open(tmp, os.O_RDONLY)
            try:
                batch = _Batch(old, source=fd, page_size=target.page_size)
                same_size_pages = target.page_size == old.page_size
                for p in range(1, target.size + 1):
                    h = target.hashes[p - 1]
                    if p == 1 or not same_size_pages or batch.hash_of(p) != h or p > old.size:
                        batch.set(p, _FROM_SOURCE if h else None, h)
                batch.fields = target.fields
                for p in range(target.size + 1, old.size + 1):
                    batch.set(p, None, 0)
                batch.size = target.size
                batch.checksum = target.checksum
                batch.hashes = {p: target.hashes[p - 1] for p in range(1, target.size + 1)}
                batch.generation, batch.txid, batch.timestamp_ms = (
                    target.generation,
                    target.txid,
                    target.timestamp_ms,
                )
                self._commit(batch, full_hashes=target.hashes)
            finally:
                os.close(fd)
                os.unlink(tmp)

        await anyio.to_thread.run_sync(apply)
        self._reseed = False
        log.info(
            "follower of %s moved to generation %s, txid %d", self.database, target.generation, target.txid
        )

    # -- applying a batch --------------------------------------------------------

    def _commit(self, batch: _Batch, full_hashes: array.array[int] | None = None) -> None:
        """Apply ``batch`` to the copy atomically for every reader (see the
        module docstring), then make it the follower's image."""
        old = self._image
        assert old is not None
        self._connect()
        fd = self._fd
        assert fd is not None
        ps0, n0, ps1, n1 = old.page_size, old.size, batch.page_size, batch.size
        new_hashes = full_hashes if full_hashes is not None else array.array("Q", old.hashes[:n1])
        if full_hashes is None:
            if len(new_hashes) < n1:
                new_hashes.extend(array.array("Q", bytes(8 * (n1 - len(new_hashes)))))
            for p, h in batch.hashes.items():
                if p <= n1:
                    new_hashes[p - 1] = h
        new = _Image(
            batch.generation,
            batch.txid,
            batch.timestamp_ms,
            ps1,
            n1,
            new_hashes,
            batch.checksum,
            batch.fields,
            (old.counter + 1) & 0xFFFFFFFF or 1,
        )
        # Both states are recorded before the commit point: a restart finds
        # the file in one of them (the journal decides which) and proves it.
        self._write_state([old.describe(), new.describe()])
        skip0 = lock_page(ps0)
        if ps0 != ps1:
            saved = [p for p in range(1, n0 + 1) if p != skip0]
        else:
            saved = sorted(({p for p in batch.pages if p <= n0} | set(range(n1 + 1, n0 + 1)) | {1}) - {skip0})
        journal = self.database + "-journal"
        with self._exclusive():
            page1 = os.pread(fd, ps0, 0)
            if struct.unpack_from(">I", page1, 24)[0] != old.counter:
                raise _Diverged(
                    f"{self.database} was changed by someone else (its change counter moved): a followed"
                    " copy is read-only"
                )
            self._write_journal(journal, saved, ps0, n0)
            if 1 in batch.pages:
                first = _physical(batch.page(1), new.counter, n1)
            else:
                first = _physical(page1, new.counter, n1)
            self._write_pages(batch, first)
            os.ftruncate(fd, n1 * ps1)
            os.fsync(fd)
            os.unlink(journal)  # the commit point
            fsync_dir(os.path.dirname(self.database))
        with self._cond:
            self._image = new
            self._batches += 1
            self._applied_at = time.time()
            self._cond.notify_all()
        self._notify()

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

    def _write_pages(self, batch: _Batch, first: bytes) -> None:
        assert self._fd is not None
        fd, ps = self._fd, batch.page_size
        os.pwrite(fd, first, 0)
        run: list[bytes] = []
        start = 0
        for p in sorted(batch.pages):
            if p == 1 or p > batch.size:
                continue
            page = batch.page(p)
            if run and p == start + len(run) and len(run) < _RUN_PAGES:
                run.append(page)
                continue
            if run:
                os.pwrite(fd, b"".join(run), (start - 1) * ps)
            run, start = [page], p
        if run:
            os.pwrite(fd, b"".join(run), (start - 1) * ps)

    def _notify(self) -> None:
        if self._on_apply is not None:
            try:
                self._on_apply(self.status())
            except Exception:
                log.exception("follower of %s: on_apply callback failed", self.database)


def follow(
    database: str | os.PathLike[str],
    replica: str | ReplicaClient,
    *,
    poll_interval: float = 1.0,
    generation_check_every: int = 10,
    lock_timeout: float = 5.0,
    overwrite: bool = False,
    on_apply: Callable[[FollowStatus], None] | None = None,
) -> Follower:
    """Start keeping ``database`` a read-only copy of ``replica`` and return
    the running :class:`Follower` (use it as a context manager, or call
    :meth:`Follower.stop`).

    The follower restores ``database`` if it is missing (waiting for the
    replica's first snapshot if there is none yet), then polls the replica
    every ``poll_interval`` seconds: one LIST of the next segment's prefix,
    and every ``generation_check_every`` polls a LIST of every generation
    instead (to find a new generation). It GETs only segments it has not
    applied. Any process may read ``database`` with plain ``sqlite3``
    meanwhile: see docs/follow.md for what readers are guaranteed.

    ``lock_timeout``: how long an apply waits for readers to finish their
    read transactions before it gives up and tries again at the next poll.
    ``overwrite``: replace an existing file that is not a follower's copy.
    ``on_apply``: called after each applied batch, from a thread of the follower
    (keep it short: the next poll waits for it).

    Raises :class:`FollowedDatabaseError` if another follower keeps the file,
    :class:`ConfigError` for a bad URL or argument.
    """
    follower = Follower(
        database,
        replica,
        poll_interval=poll_interval,
        generation_check_every=generation_check_every,
        lock_timeout=lock_timeout,
        overwrite=overwrite,
        on_apply=on_apply,
    )
    try:
        return follower.start()
    except BaseException:
        follower.stop()  # (closes what __init__ opened)
        raise
