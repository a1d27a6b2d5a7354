"""Rebuilding a database from a replica.

:func:`restore` picks a generation, the newest snapshot at or before the
target, and the chain of segments after it; downloads them in parallel
(large objects in ranged parts, so memory stays bounded); applies them
newest first to a temporary file beside the database, writing each page
once (its newest copy), while checking every object's checksums, every page
number and that each segment continues the object under it (its "before"
checksum); checks the whole database's checksum against the newest
object's (and ``PRAGMA quick_check`` if asked); and only then renames the
file into place.

Nothing is overwritten unless asked, and a failed restore leaves no partial
database behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import io
import json
import logging
import os
import queue
import secrets
import shutil
import sqlite3
import struct
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.from_thread

from . import _check, _format
from ._errors import (
    ConfigError,
    CorruptObjectError,
    DatabaseExistsError,
    GenerationUnrestorableError,
    NoBackupError,
    ObjectNotFoundError,
    PointInTimeError,
    ReplicaError,
    RestoreError,
    SqlreplError,
)
from ._format import HEADER_SIZE, SegmentKey, SnapshotKey, page_hash, read_header
from ._lifecycle import Generation, follow_chain, group_generations
from ._progress import Progress, ProgressCallback
from ._replica import ReplicaClient, open_replica, redact_url
from ._staging import RESTORED_FILE, fsync_dir, staging_dir_for
from ._wal import lock_page

__all__ = [
    "Generation",
    "RestorePlan",
    "RestoreResult",
    "list_generations",
    "plan_restore",
    "restore",
    "restore_async",
]

log = logging.getLogger("sqlrepl")

PART_SIZE = 8 << 20
_RUN_PAGES = 256  # consecutive pages written at once
FLUSH_BYTES = 64 << 20  # written between two background fdatasyncs
DEFAULT_PARALLELISM = 8


async def list_generations(client: ReplicaClient) -> list[Generation]:
    """Every generation in the replica, oldest first (one paginated LIST)."""
    return group_generations(await client.list(_format.GENERATIONS))


@dataclass
class RestorePlan:
    """The objects to apply, in order, and the state they lead to."""

    generation: str
    snapshot: tuple[SnapshotKey, int]
    segments: list[tuple[SegmentKey, int]]
    txid: int
    timestamp_ms: int

    @property
    def keys(self) -> list[tuple[str, int]]:
        return [(self.snapshot[0].key, self.snapshot[1])] + [(k.key, size) for k, size in self.segments]


def plan_restore(
    generations: Sequence[Generation],
    *,
    generation: str | None = None,
    txid: int | None = None,
    timestamp: dt.datetime | float | int | str | None = None,
    replica: str = "",
    fallback: bool = False,
) -> RestorePlan:
    """Choose what to restore. Raises :class:`NoBackupError` for an empty
    replica, :class:`PointInTimeError` when nothing matches the target, and
    :class:`GenerationUnrestorableError` when the generation holding the
    target (by default: the newest) cannot be restored, unless ``fallback``
    allows the newest older state that can.

    The state restored is the newest one at or before the target that the
    replica can prove: a point in time is restored to a segment boundary
    (one sync interval), never past the target.
    """
    if txid is not None and timestamp is not None:
        raise ConfigError("give txid or timestamp, not both")
    usable = [g for g in generations if g.snapshots]
    if not usable:
        raise NoBackupError(f"replica {replica} holds no snapshot to restore from (is the URL right?)")
    ts_ms = _check.timestamp_ms(timestamp) if timestamp is not None else None
    if generation is not None:
        candidates = [g for g in usable if g.id == generation]
        if not candidates:
            raise PointInTimeError(f"replica {replica} has no generation {generation}")
    elif txid is not None:
        candidates = [g for g in usable if min(k.txid for k, _ in g.snapshots) <= txid]
    elif ts_ms is not None:
        candidates = [g for g in usable if g.first_timestamp_ms <= ts_ms]
    else:
        candidates = usable
    if not candidates:
        target = f"txid {txid}" if txid is not None else f"time {timestamp}"
        raise PointInTimeError(f"replica {replica} has nothing at or before {target}")
    gen = candidates[-1]
    if generation is None:
        holder = _holder(generations, txid, ts_ms)
        if holder is not None and holder.id != gen.id:
            why = "its snapshot is gone" if not holder.snapshots else "no snapshot of it reaches the target"
            _unrestorable(
                fallback,
                f"replica {replica}: generation {holder.id} holds the newest state asked for (up to txid"
                f" {holder.last_txid}) but cannot be restored ({why}); the newest state that can is in the"
                f" older generation {gen.id}, without the commits of {holder.id}. Restore with fallback=True"
                f" (--fallback) to accept that, or generation=... to choose one",
            )

    snaps = [
        (k, s)
        for k, s in gen.snapshots
        if (txid is None or k.txid <= txid) and (ts_ms is None or k.timestamp_ms <= ts_ms)
    ]
    if not snaps:
        raise PointInTimeError(f"generation {gen.id} has no snapshot at or before the target")
    limit = txid if txid is not None else gen.last_txid
    # Prefer the newest snapshot whose chain of segments is complete.
    best: RestorePlan | None = None
    for snap in reversed(snaps):
        chain = follow_chain(gen.segments, snap[0], limit=limit, ts_ms=ts_ms)
        end = chain[-1][0] if chain else snap[0]
        at = end.last_txid if isinstance(end, SegmentKey) else end.txid
        plan = RestorePlan(gen.id, snap, chain, at, end.timestamp_ms)
        if best is None or plan.txid > best.txid:
            best = plan
        if txid is None and ts_ms is None and plan.txid >= gen.last_txid:
            break
    assert best is not None
    if txid is None and ts_ms is None and best.txid < gen.last_txid:
        _unrestorable(
            fallback,
            f"replica {replica}, generation {gen.id}: segments are missing after txid {best.txid}"
            f" (the newest is {gen.last_txid}); restore with fallback=True (--fallback) or txid={best.txid}"
            " to get the state before the gap",
        )
    return best


def _holder(generations: Sequence[Generation], txid: int | None, ts_ms: int | None) -> Generation | None:
    """The newest generation holding anything at or before the target."""
    held = [
        g
        for g in generations
        if g.snapshots or g.segments
        if txid is None
        or min([k.txid for k, _ in g.snapshots] + [k.first_txid - 1 for k, _ in g.segments]) <= txid
        if ts_ms is None
        or min([k.timestamp_ms for k, _ in g.snapshots] + [k.timestamp_ms for k, _ in g.segments]) <= ts_ms
    ]
    return held[-1] if held else None


def _unrestorable(fallback: bool, message: str) -> None:
    if not fallback:
        raise GenerationUnrestorableError(message)
    log.warning("%s; falling back, as asked", message)


@dataclass
class RestoreResult:
    """What :func:`restore` produced."""

    path: str
    generation: str
    txid: int
    timestamp_ms: int
    objects: int
    bytes: int
    seconds: float


class _Applier:
    """Applies a plan's objects to a file, newest first, writing each page once.

    A page's final content is its copy in the newest object that holds it,
    unless a newer object dropped it (its truncate size, or a database size
    below it): so objects are fed newest first, and a page already written,
    or above what the newer objects let survive, is checked but not hashed
    or written again. What proves the result: each object's own checksums
    (header, length, body XXH3), each page number, each segment's "before"
    checksum equal to the "after" checksum of the object under it (a chain
    of headers), and at :meth:`finish` the checksum of the whole database,
    computed from the pages written, equal to the newest object's "after"
    checksum. The intermediate states are not rebuilt, so they are not
    checked one by one: a wrong page that a newer object overwrote cannot
    reach the restored file.

    Two threads share the work of one object: the caller's reads and
    decompresses (zstd lets go of the GIL), a :class:`_PageWriter` checks,
    hashes and writes the pages.
    """

    def __init__(self, fd: int, flusher: _Flusher | None = None) -> None:
        self.fd = fd
        self.flusher = flusher
        self.page_size = 0
        self.size = 0  # the restored database's size in pages (the newest object's)
        self.limit = 0  # pages above it, in the object being applied, do not survive
        self.checksum = 0  # over the pages written so far
        self.written = bytearray()  # 1 at [p] once page p is written
        self._newest: tuple[_format.ObjectHeader, str] | None = None
        self._newer: tuple[_format.ObjectHeader, str] | None = None

    def apply(self, f: _format.Readable, key: str, size: int) -> _format.ObjectHeader:
        """Apply the object read from ``f`` (``size`` bytes long), the next
        older one after those already applied."""
        header = read_header(f.read(HEADER_SIZE), key=key)
        if size != HEADER_SIZE + header.body_length:
            expected = HEADER_SIZE + header.body_length
            raise CorruptObjectError(
                f"object truncated or padded: {size} bytes, expected {expected} ({key})", key=key
            )
        self._link(header, key)
        writer = _PageWriter(self, header, key)
        try:
            for chunk in _format.iter_records(header, f, key=key):
                writer.put(chunk)
        finally:
            writer.close()
        self._newer = (header, key)
        return header

    def _link(self, header: _format.ObjectHeader, key: str) -> None:
        """Check that ``header`` is the state under the newer object, and set
        the pages of it that can survive."""
        if self._newer is None:
            self._newest = (header, key)
            self.page_size, self.size, self.limit = header.page_size, header.db_size, header.db_size
            self.written = bytearray(header.db_size + 1)
            os.ftruncate(self.fd, header.db_size * header.page_size)
            return
        newer, newer_key = self._newer
        if header.page_size != self.page_size:
            raise CorruptObjectError(
                f"segment page size {self.page_size} != {header.page_size} ({newer_key})", key=newer_key
            )
        if newer.kind == _format.KIND_SNAPSHOT:
            self.limit = 0  # a snapshot is the whole database: nothing under it shows
        else:
            if newer.pre_checksum != header.post_checksum:
                raise CorruptObjectError(
                    f"segment does not continue the state before it (pre-checksum mismatch) ({newer_key})",
                    key=newer_key,
                )
            self.limit = min(self.limit, newer.truncate_size)
        self.limit = min(self.limit, header.db_size)

    def finish(self) -> None:
        """Check the whole: the oldest object applied is a snapshot, and the
        database checksum is the newest object's."""
        if self._newer is None or self._newest is None:
            raise RestoreError("nothing was applied")
        oldest, oldest_key = self._newer
        if oldest.kind != _format.KIND_SNAPSHOT:
            raise CorruptObjectError(
                f"the restore does not start from a snapshot ({oldest_key})", key=oldest_key
            )
        newest, newest_key = self._newest
        if self.checksum != newest.post_checksum:
            raise CorruptObjectError(
                f"restored state does not match the object's database checksum ({newest_key})", key=newest_key
            )


class _PageWriter:
    """A thread that writes one object's page records into the database file.

    Fed chunks of records (:func:`_format.iter_records`) through a short
    queue; checks each page number, and writes the pages that are new to the
    file and survive (see :class:`_Applier`), adding their hashes to the
    applier's checksum, in runs of consecutive pages with one ``pwrite``.
    The first error it meets is raised by the next :meth:`put` or by
    :meth:`close`.
    """

    _DEPTH = 4  # chunks (~1 MiB each) waiting
    _END = None

    def __init__(self, applier: _Applier, header: _format.ObjectHeader, key: str) -> None:
        self._applier = applier
        self._header = header
        self._key = key
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(self._DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sqlrepl-restore-writer", daemon=True)
        self._thread.start()

    def put(self, chunk: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(chunk)

    def close(self) -> None:
        """Wait for every page put to be written; raise the writer's error."""
        self._q.put(self._END)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            self._write_all()
        except BaseException as exc:
            self._error = exc
            while self._q.get() is not self._END:  # let put() and close() through
                pass

    def _write_all(self) -> None:
        a, header, key = self._applier, self._header, self._key
        fd, ps, written, keep, flusher = a.fd, header.page_size, a.written, a.limit, a.flusher
        rec = 4 + ps
        limit, skip = header.db_size, lock_page(ps)
        numbers = struct.Struct(f">I{ps}x")  # a record's page number, its page skipped
        checksum = a.checksum
        run: list[memoryview] = []  # consecutive pages, written at once
        run_start = 0
        while (chunk := self._q.get()) is not self._END:
            view = memoryview(chunk)
            off = 4 - rec
            for (pgno,) in numbers.iter_unpack(chunk):
                off += rec
                if pgno < 1 or pgno > limit or pgno == skip:
                    raise CorruptObjectError(f"page {pgno} outside the database ({key})", key=key)
                if pgno > keep or written[pgno]:
                    continue  # dropped or overwritten by a newer object
                written[pgno] = 1
                page = view[off : off + ps]
                checksum ^= page_hash(pgno, page)
                if run and pgno == run_start + len(run) and len(run) < _RUN_PAGES:
                    run.append(page)
                    continue
                if run:
                    _pwritev(fd, run, (run_start - 1) * ps)
                    if flusher is not None:
                        flusher.wrote(len(run) * ps)
                run, run_start = [page], pgno
        if run:
            _pwritev(fd, run, (run_start - 1) * ps)
            if flusher is not None:
                flusher.wrote(len(run) * ps)
        a.checksum = checksum


class _Flusher:
    """A thread that sends the restored file's written pages to disk while
    the restore goes on (an ``fdatasync`` after every :data:`FLUSH_BYTES`
    written), so that the final ``fsync`` has little left to wait for.
    Each page is written once (:class:`_Applier`), so no write has to wait
    for an earlier copy of its page to reach the disk (the reason this lost
    when restores wrote every version of a page). The final ``fsync`` is
    still what makes the file durable; an error here is raised by
    :meth:`close`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._every = FLUSH_BYTES
        self._pending = 0
        self._asked = 0  # flushes asked for; each is done before close() returns
        self._cond = threading.Condition()
        self._stopping = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="sqlrepl-restore-flush", daemon=True)
        self._thread.start()

    def wrote(self, nbytes: int) -> None:
        """(From the writer thread.) ``nbytes`` more were written."""
        self._pending += nbytes
        if self._pending >= self._every:
            self._pending = 0
            with self._cond:
                self._asked += 1
                self._cond.notify()

    def close(self) -> None:
        """Stop the thread once the flush asked for last is done; raise its error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise RestoreError(
                f"sending the restored database to disk failed: {self._error}"
            ) from self._error

    def _run(self) -> None:
        done = 0
        while True:
            with self._cond:
                while self._asked == done and not self._stopping:
                    self._cond.wait()
                if self._asked == done:
                    return
                done = self._asked
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self._error = exc
                return


def _pwritev(fd: int, pages: list[memoryview], offset: int) -> None:
    """Write ``pages`` at ``offset`` in one call, straight from the
    decompressed chunks (no copy into one buffer first)."""
    done = os.pwritev(fd, pages, offset)
    want = sum(len(p) for p in pages)
    if done < want:  # short writes are legal; finish with plain writes
        rest = b"".join(pages)[done:]
        offset += done
        while rest:
            n = os.pwrite(fd, rest, offset)
            rest, offset = rest[n:], offset + n


class _PartReader:
    """A blocking file-like view of an object arriving in parts.

    Fed, in order, by the event loop (:meth:`put`); read by the applier's
    worker thread. Each part taken gives its weight back to the download
    :class:`_Window` (through the loop), which bounds the parts held.
    """

    _END = object()

    def __init__(self, window: _Window, progress: Progress | None = None) -> None:
        self._q: queue.SimpleQueue[tuple[object, int]] = queue.SimpleQueue()
        self._buf = memoryview(b"")
        self._window = window
        self._progress = progress
        self._done = False

    def put(self, item: bytes | BaseException, weight: int) -> None:
        self._q.put((item, weight))

    def end(self) -> None:
        self._q.put((self._END, 0))

    def read(self, size: int = -1) -> bytes | memoryview:
        """Up to ``size`` bytes (all that is left for -1); a view into the
        part, not a copy, when one part holds them."""
        out: list[memoryview] = []
        want = size if size >= 0 else 1 << 62
        while want > 0:
            if not self._buf:
                if self._done:
                    break
                item, weight = self._q.get()
                nbytes = len(item) if isinstance(item, bytes) and self._progress is not None else 0
                if weight or nbytes:
                    anyio.from_thread.run_sync(self._taken, weight, nbytes)
                if item is self._END:
                    self._done = True
                    break
                if isinstance(item, BaseException):
                    self._done = True
                    raise item
                assert isinstance(item, bytes)
                self._buf = memoryview(item)
            take = self._buf[:want]
            out.append(take)
            # (An empty slice would still hold the whole part in memory.)
            self._buf = self._buf[len(take) :] if len(take) < len(self._buf) else memoryview(b"")
            want -= len(take)
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _taken(self, weight: int, nbytes: int) -> None:
        """(On the event loop.) A part was taken by the applier."""
        if weight:
            self._window.give(weight)
        if nbytes and self._progress is not None:
            self._progress.advance(nbytes)


def _move_aside(path: str) -> str | None:
    """Rename a stale file out of the way (never delete what may be data)."""
    if not os.path.exists(path):
        return None
    aside = f"{path}.stale-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
    os.replace(path, aside)
    return aside


@contextlib.asynccontextmanager
async def _restore_lock(path: str) -> AsyncIterator[None]:
    """Hold ``<database>-sqlrepl/restore.lock``: the workers of one app
    start together, and without it two of them could both find the file
    missing, and the second restore would replace the database (and move
    aside the WAL) that the first one already writes to."""
    folder = staging_dir_for(path)
    await anyio.to_thread.run_sync(lambda: os.makedirs(folder, exist_ok=True))
    fd = os.open(os.path.join(folder, "restore.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX, abandon_on_cancel=True)
        yield
    finally:
        os.close(fd)


async def restore_async(
    database: str | os.PathLike[str],
    replica: str | ReplicaClient | Sequence[str | ReplicaClient],
    *,
    if_db_not_exists: bool = True,
    if_replica_exists: bool = True,
    overwrite: bool = False,
    timestamp: dt.datetime | float | int | str | None = None,
    txid: int | None = None,
    generation: str | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
    progress: ProgressCallback | None = None,
    fallback: bool = False,
    quick_check: bool = False,
) -> RestoreResult | None:
    """The async form of :func:`restore` (same arguments and result;
    ``progress`` is called in the event loop's thread)."""
    tracker = Progress(progress)
    path = os.path.abspath(os.fspath(database))  # noqa: ASYNC240 - string work and getcwd() only
    replicas: list[str | ReplicaClient] = list(_check.as_urls(replica, what="replica"))
    if not replicas or not all(_check.is_client(r) or (isinstance(r, str) and r) for r in replicas):
        raise ConfigError(f"restore needs a replica URL or a non-empty list of them, got {replica!r}")
    # Checked here, before any work: a bad target found after the download
    # would be a raw Python error, and a wasted download.
    if txid is not None and timestamp is not None:
        raise ConfigError("give txid or timestamp, not both")
    if txid is not None:
        _check.txid(txid)
    if timestamp is not None:
        _check.timestamp_ms(timestamp)
    if generation is not None and not isinstance(generation, str):
        raise ConfigError(f"generation must be a generation id (a string), got {generation!r}")
    _check.count("parallelism", parallelism, minimum=1)
    for name, value in (
        ("if_db_not_exists", if_db_not_exists),
        ("if_replica_exists", if_replica_exists),
        ("overwrite", overwrite),
        ("fallback", fallback),
        ("quick_check", quick_check),
    ):
        _check.flag(name, value)
    _check.check_database_path(path, role="restore target", folder_must_exist=False)
    async with _restore_lock(path):
        # Checked under the lock: another process may have just restored it.
        if await anyio.Path(path).exists() and not overwrite:
            if if_db_not_exists:
                log.info("restore skipped: %s exists", path)
                return None
            raise DatabaseExistsError(
                f"{path} exists; restore never overwrites a database unless asked (overwrite=True,"
                " or --overwrite on the command line)"
            )
        errors: list[SqlreplError] = []
        for one in replicas:
            try:
                result = await _restore_from(
                    path,
                    one,
                    if_replica_exists=if_replica_exists or len(replicas) > 1,
                    timestamp=timestamp,
                    txid=txid,
                    generation=generation,
                    parallelism=parallelism,
                    progress=tracker,
                    fallback=fallback,
                    quick_check=quick_check,
                )
            except (ReplicaError, CorruptObjectError, NoBackupError) as exc:
                if len(replicas) == 1:
                    raise
                # An unreachable or damaged replica is not an empty one: try
                # the next, and raise this if none restores.
                log.warning("restore of %s from %s failed: %s", path, _url_of(one), exc)
                errors.append(exc)
                continue
            if result is not None:
                return result
        if errors:
            raise errors[0]
        if not if_replica_exists:
            raise NoBackupError(f"no replica of {path} holds a snapshot to restore from")
        return None


def _url_of(replica: str | ReplicaClient) -> str:
    return redact_url(replica) if isinstance(replica, str) else replica.url


# A restore that meets objects deleted under it (the writer's retention or
# compaction moved on between our LIST and GET) plans again from a fresh
# listing, this many times in all.
RESTORE_ATTEMPTS = 5


async def _restore_from(
    path: str,
    replica: str | ReplicaClient,
    *,
    if_replica_exists: bool,
    timestamp: dt.datetime | float | int | str | None,
    txid: int | None,
    generation: str | None,
    parallelism: int,
    progress: Progress | None = None,
    fallback: bool,
    quick_check: bool = False,
) -> RestoreResult | None:
    client = open_replica(replica) if isinstance(replica, str) else replica
    started = time.monotonic()
    try:
        for attempt in range(1, RESTORE_ATTEMPTS + 1):
            generations = await list_generations(client)
            if not any(g.snapshots for g in generations) and if_replica_exists:
                log.info("restore skipped: replica %s is empty", client.url)
                return None
            plan = plan_restore(
                generations,
                generation=generation,
                txid=txid,
                timestamp=timestamp,
                replica=client.url,
                fallback=fallback,
            )
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            work = tempfile.mkdtemp(prefix=".sqlrepl-restore-", dir=folder)
            try:
                try:
                    result = await _restore_plan(client, plan, path, work, parallelism, progress, quick_check)
                except BaseExceptionGroup as group:
                    raise _first_error(group) from group
            except ObjectNotFoundError as exc:
                if attempt == RESTORE_ATTEMPTS:
                    raise
                log.info(
                    "restore of %s from %s: an object went away (%s), planning again from a fresh listing",
                    path,
                    client.url,
                    exc,
                )
                continue
            finally:
                shutil.rmtree(work, ignore_errors=True)
            break
    finally:
        if isinstance(replica, str):
            await client.aclose()
    _record_restored(path, max(g.last_txid for g in generations))
    result.seconds = time.monotonic() - started
    log.info(
        "restored %s from %s: generation %s, txid %d, %d objects, %d bytes, %.2fs",
        path,
        client.url,
        result.generation,
        result.txid,
        result.objects,
        result.bytes,
        result.seconds,
    )
    return result


def _record_restored(path: str, replica_txid: int) -> None:
    """Tell the replicator that will start on ``path`` the highest txid the
    replica held, so that its new generation continues after it rather
    than at 1 (``restored.json`` in the staging folder, crash-safe)."""
    folder = staging_dir_for(path)
    target = os.path.join(folder, RESTORED_FILE)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"replica_txid": replica_txid}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(folder)


async def _restore_plan(
    client: ReplicaClient,
    plan: RestorePlan,
    path: str,
    work: str,
    parallelism: int,
    progress: Progress | None = None,
    quick_check: bool = False,
) -> RestoreResult:
    """Download and apply ``plan`` into a file in ``work``, then put it at
    ``path``. Objects are applied newest first (see :class:`_Applier`)
    while the ones after them download: small ones whole, large ones in
    ranged parts streamed into the applier. Nothing is written to disk but
    the database, and the downloaded data held at once (in flight or
    waiting) is bounded by :class:`_Window`."""
    keys = plan.keys
    progress = progress or Progress(None)
    progress.phase(sum(size for _key, size in keys))
    download = _Download(client, keys, list(reversed(range(len(keys)))), max(1, parallelism), progress)
    tmp_db = os.path.join(work, "restored.db")
    fd = os.open(tmp_db, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    flusher = _Flusher(fd)
    try:
        applier = _Applier(fd, flusher)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(download.run)
                for i in download.order:
                    source, size = await download.object(i)
                    await anyio.to_thread.run_sync(applier.apply, source, keys[i][0], size)
                    if isinstance(source, io.BytesIO):
                        progress.advance(size)
                    total += size
                tg.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(flusher.close)
        applier.finish()
        # Both must pass before the rename. The check reads the pages from
        # the page cache while the fsync writes them out.
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, os.fsync, fd)
            if quick_check:
                tg.start_soon(anyio.to_thread.run_sync, _check_database, tmp_db)
    finally:
        os.close(fd)
    _put_in_place(tmp_db, path)
    progress.finish()
    return RestoreResult(path, plan.generation, plan.txid, plan.timestamp_ms, len(keys), total, 0.0)


def _put_in_place(tmp_db: str, path: str) -> None:
    # Stale WAL or shared-memory files beside the target would be replayed
    # onto the restored database by SQLite: move them aside, keep them.
    for suffix in ("-wal", "-shm", "-journal"):
        aside = _move_aside(path + suffix)
        if aside:
            log.warning("moved stale %s aside to %s", path + suffix, aside)
    os.replace(tmp_db, path)
    fsync_dir(os.path.dirname(path))


class _Download:
    """The downloads of a restore: one queue over every object, in the
    order they are applied, so the next objects arrive while one is
    applied; ``parallelism`` GETs at a time, and the bytes held bounded by
    a :class:`_Window`. Objects up to :data:`PART_SIZE` come whole; larger
    ones in ranged parts, streamed to a :class:`_PartReader`. A failed GET
    is raised by the applier when it reaches that object."""

    def __init__(
        self,
        client: ReplicaClient,
        keys: list[tuple[str, int]],
        order: list[int],
        parallelism: int,
        progress: Progress,
    ) -> None:
        self.order = order
        self._client = client
        self._keys = keys
        # (object, start, length), length -1 for a whole GET
        self._pieces: list[tuple[int, int, int]] = []
        for i in order:
            size = keys[i][1]
            if size <= PART_SIZE:
                self._pieces.append((i, 0, -1))
            else:
                self._pieces.extend((i, s, min(PART_SIZE, size - s)) for s in range(0, size, PART_SIZE))
        self._limiter = anyio.CapacityLimiter(parallelism)
        self._window = _Window((parallelism + 2) * PART_SIZE)
        self._got: dict[int, bytes | BaseException] = {}
        self._arrived = [anyio.Event() for _ in self._pieces]
        self._readers = {
            i: _PartReader(self._window, progress) for i, (_k, size) in enumerate(keys) if size > PART_SIZE
        }
        self._whole = {i: n for n, (i, _start, length) in enumerate(self._pieces) if length < 0}

    async def run(self) -> None:
        """Download every piece (until cancelled)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._deliver)
            for n in range(len(self._pieces)):
                await self._window.take(self._weight(n))
                tg.start_soon(self._fetch, n)

    async def object(self, i: int) -> tuple[_format.Readable, int]:
        """Object ``i`` to read and its size: whole once it has arrived, or
        its parts as they arrive. Raises the error of a failed whole GET."""
        if i not in self._whole:
            return self._readers[i], self._keys[i][1]
        n = self._whole[i]
        await self._arrived[n].wait()
        data = self._got.pop(n)
        self._window.give(self._weight(n))
        if isinstance(data, BaseException):
            raise data
        return io.BytesIO(data), len(data)

    def _weight(self, n: int) -> int:
        i, _start, length = self._pieces[n]
        return max(_Window.MIN_PIECE, self._keys[i][1] if length < 0 else length)

    async def _fetch(self, n: int) -> None:
        i, start, length = self._pieces[n]
        key = self._keys[i][0]
        try:
            async with self._limiter:
                get = self._client.get(key) if length < 0 else self._client.get_range(key, start, length)
                self._got[n] = await get
        except Exception as exc:  # handed to the applier, which raises it in order
            self._got[n] = exc
        self._arrived[n].set()

    async def _deliver(self) -> None:
        """Parts of large objects, in order, to their readers."""
        try:
            for n, (i, start, length) in enumerate(self._pieces):
                if length < 0:
                    continue
                await self._arrived[n].wait()
                self._readers[i].put(self._got.pop(n), self._weight(n))
                if start + length == self._keys[i][1]:
                    self._readers[i].end()
        except BaseException:
            for reader in self._readers.values():
                reader.put(RestoreError("the download stopped"), 0)
            raise


class _Window:
    """Bytes of downloaded data held at once: in flight, or waiting to be
    applied. The download takes before each GET and the applier gives back
    as it consumes (on the event loop). One taker. A piece counts at least
    ``MIN_PIECE``, which bounds the GETs queued for tiny objects."""

    MIN_PIECE = 256 << 10

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._freed = anyio.Event()

    async def take(self, n: int) -> None:
        while self._used > 0 and self._used + n > self._limit:
            self._freed = anyio.Event()
            await self._freed.wait()
        self._used += n

    def give(self, n: int) -> None:
        self._used -= n
        self._freed.set()


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: a sqlrepl error if there is one
    (a corrupt object, a replica failure), else the first."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, SqlreplError):
            return exc
    return leaves[0]


def _check_database(path: str) -> None:
    uri = "file:" + path + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            # The image is in WAL mode; with no -wal file beside it, a
            # read-only open sees exactly the file's pages.
            result = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise RestoreError(f"restored database fails to open: {exc}") from exc
    finally:
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
    if result != [("ok",)]:
        raise RestoreError(f"restored database fails PRAGMA quick_check: {result[:5]}")


def restore(
    database: str | os.PathLike[str],
    replica: str | Sequence[str],
    *,
    if_db_not_exists: bool = True,
    if_replica_exists: bool = True,
    overwrite: bool = False,
    timestamp: dt.datetime | float | int | str | None = None,
    txid: int | None = None,
    generation: str | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
    progress: ProgressCallback | None = None,
    fallback: bool = False,
    quick_check: bool = False,
) -> RestoreResult | None:
    """Rebuild ``database`` from ``replica`` (a URL, or a list tried in
    order until one restores); call at startup, before any connection to
    the database opens. Safe to call from several processes at once: they
    take a lock, and all but the first find the database there.

    - ``if_db_not_exists`` (default): do nothing if the database exists.
      With ``False``, an existing database raises
      :class:`DatabaseExistsError` unless ``overwrite=True``.
    - ``if_replica_exists`` (default): do nothing if the replica is empty
      (first start of a new app). With ``False``, raise :class:`NoBackupError`.
    - ``txid`` / ``timestamp`` (a ``datetime``, Unix seconds, or ISO 8601
      string): restore the newest state at or before it; ``generation``: from
      that generation. Without them: the newest state.
    - ``progress``: called as ``progress(done_bytes, total_bytes)`` (bytes
      of replica objects applied, out of those the restore reads) as the
      restore proceeds; ``done`` never goes backward, and the last call,
      once the database is in place, has ``done == total``. Falling back to
      another replica adds that replica's bytes to the total.
    - ``fallback``: when the generation holding the asked state (the newest,
      by default) cannot be restored (its snapshot was deleted, a segment
      is missing), restore the newest older state that can be, with a
      warning, instead of raising :class:`GenerationUnrestorableError`:
      the commits after that state are then not in the restored database.
    - ``quick_check``: also run SQLite's ``PRAGMA quick_check`` on the
      restored file before putting it in place (off by default). The
      restore already proves the file is, page for page, the database the
      replicator captured (the database checksum of its newest object), so
      the check can only find damage that was in the source database itself,
      and it costs a read of the whole file (about a quarter of the restore
      time of a 128 MB database on the benchmark machine).

    Returns a :class:`RestoreResult`, or ``None`` when nothing was done.
    Stale ``-wal``/``-shm`` files next to the target are moved aside, not
    deleted. Runs its own event loop: from async code use
    :func:`restore_async`.
    """
    return anyio.run(
        lambda: restore_async(
            database,
            replica,
            if_db_not_exists=if_db_not_exists,
            if_replica_exists=if_replica_exists,
            overwrite=overwrite,
            timestamp=timestamp,
            txid=txid,
            generation=generation,
            parallelism=parallelism,
            progress=progress,
            fallback=fallback,
            quick_check=quick_check,
        ),
        backend="asyncio",
    )
