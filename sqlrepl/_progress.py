"""Progress of long work (restore, verify, a replicator's snapshots):
``callback(done_bytes, total_bytes)``.

:class:`Progress` turns the work's steps into calls that never go backward
and end with ``done == total``; :class:`SnapshotTracker` does the same for
the snapshots a replicator writes and uploads (and keeps what ``status()``
shows of them); :func:`terminal_bar` is the CLI's progress bar (tqdm, from
the ``cli`` extra), shown only on a terminal. tqdm is imported by this
module only.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ._format import HEADER_SIZE

__all__ = [
    "Progress",
    "ProgressCallback",
    "SnapshotProgress",
    "SnapshotTracker",
    "scan_sink",
    "terminal_bar",
    "upload_sent",
]

ProgressCallback = Callable[[int, int], None]

log = logging.getLogger("sqlrepl")


class Progress:
    """Reports bytes done out of a total to ``callback``, from the thread that
    calls :meth:`advance` (restore: its event loop's thread).

    Guarantees: ``done`` never decreases, never exceeds ``total``, and the
    last call of a finished job has ``done == total``. A job in several
    phases (a restore that falls back to another replica after a failure)
    calls :meth:`phase` for each: the totals then add up, so the bar goes on
    rather than back. A callback that raises is logged once and not called
    again: progress display never fails the work.
    """

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._report_to = _Reporter(callback)
        self._base = 0  # done in earlier phases
        self._total = 0
        self.done = 0

    @property
    def total(self) -> int:
        return self._total

    def phase(self, total: int) -> None:
        """Start a phase of ``total`` more bytes (what is done so far stays done)."""
        self._base = self.done
        self._total = self.done + max(0, total)
        self._report()

    def advance(self, n: int) -> None:
        if n > 0:
            self.done = min(self._total, self.done + n)
            self._report()

    def finish(self) -> None:
        """The job is complete: report ``done == total``."""
        self.done = self._total
        self._report()

    def _report(self) -> None:
        self._report_to(self.done, self._total)


class _Reporter:
    """Calls ``callback``; one that raises is logged once and not called again."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback

    def __call__(self, done: int, total: int) -> None:
        callback = self.callback
        if callback is None:
            return
        try:
            callback(done, total)
        except Exception:
            log.exception("progress callback %r failed; no more progress is reported", callback)
            self.callback = None


# -- a replicator's snapshots --------------------------------------------------------


@dataclass(frozen=True)
class SnapshotProgress:
    """A snapshot that replicas must receive before they hold the database:
    the first of a generation (a database replicated for the first time, or
    after lost continuity), or one a replica asked for (a replica added,
    emptied, or dropped for falling too far behind), or such a snapshot
    left staged by an earlier run whose upload a restart cut short
    (``"resumed"``: nothing is read for it, so its database figures are 0).
    Periodic snapshots, which only shorten restores, are not tracked.

    Figures are bytes. ``database_bytes`` is the database's size, which the
    snapshot reads whole; ``read_bytes`` how much of it has been read into
    the staged snapshot. ``snapshot_bytes`` is the staged object's size as
    stored (compressed), ``None`` until it is written; ``uploaded_bytes``
    how much of it each replica has stored (by replica URL, secrets
    removed; empty until it is written). ``done`` and ``total`` add these
    up: read plus uploaded, out of the database's size plus the object's
    size once per replica. Until the object is written its size is not
    known and ``total`` counts the most it can take (pages that do not
    compress at all); it drops to the real size then, so the fraction
    done only rises.

    ``state``: ``"writing"`` (reading the database into staging),
    ``"uploading"``, ``"done"`` (every replica that needs it stores it), or
    ``"given up"`` (superseded: a newer snapshot serves instead).
    """

    generation: str
    reason: str  # "new generation", "replica needs one" or "resumed"
    state: str
    started: float  # Unix time
    finished: float | None
    database_bytes: int
    read_bytes: int
    snapshot_bytes: int | None
    uploaded_bytes: dict[str, int] = field(default_factory=dict)
    done: int = 0
    total: int = 0


def stored_bound(database_bytes: int, page_size: int) -> int:
    """The most a snapshot of ``database_bytes`` can take as stored: each
    page a record (a 4-byte number and the page) in zstd frames of about
    1 MiB (docs/format.md), none compressing. zstd's worst case adds 1/256
    and a few dozen bytes per frame."""
    if page_size <= 0:
        return 0
    raw = database_bytes // page_size * (page_size + 4)
    frames = raw // (1 << 20) + 1
    return HEADER_SIZE + raw + raw // 256 + frames * 128


class _Part:
    """Bytes done of one part of a job (the scan, one replica's upload),
    over attempts: a retry counts again from zero, and ``done`` moves only
    once it passes what an earlier attempt reached."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.attempt = 0

    def add(self, n: int) -> None:
        self.attempt += n
        self.done = max(self.done, min(self.total, self.attempt))


class _Job:
    def __init__(self, generation: str, reason: str, replicas: int, now: float) -> None:
        self.generation = generation
        self.reason = reason
        self.replicas = replicas  # uploads expected, until the object is written
        self.started = now
        self.finished: float | None = None
        self.state = "writing"
        self.scan = _Part(0)
        self.page_size = 0
        self.key: str | None = None
        self.stored: int | None = None
        self.uploads: dict[int, tuple[str, _Part]] = {}

    def totals(self) -> tuple[int, int]:
        if self.stored is None:
            upload = self.replicas * stored_bound(self.scan.total, self.page_size) if self.scan.total else 0
            return self.scan.done, self.scan.total + upload
        parts = [p for _url, p in self.uploads.values()]
        return self.scan.done + sum(p.done for p in parts), self.scan.total + sum(p.total for p in parts)


_upload: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar(
    "sqlrepl_upload_progress", default=None
)


def upload_sent(n: int) -> None:
    """A replica client's ``put_file`` has stored ``n`` more bytes of the
    file it uploads (a part, a chunk). Costs a context-variable read when
    nobody watches; clients that never call it report the whole object at
    once when ``put_file`` returns."""
    report = _upload.get()
    if report is not None:
        report(n)


class SnapshotTracker:
    """The replicator's snapshots that replicas must receive (see
    :class:`SnapshotProgress`), for ``status()`` (:attr:`current`) and the
    ``Options.progress`` callback.

    The callback gets ``(done, total)`` summed over every tracked snapshot
    since the replicator started, as restore's phases add up: each new
    snapshot adds its bytes to the total, so the count goes on rather than
    back; one given up adds what was done of it. ``done`` never decreases
    and never exceeds ``total``; once every replica stores the newest
    tracked snapshot, ``done == total``. Called from the replicator's
    threads (its loop and its worker threads), one call at a time; a
    callback that raises is logged once and not called again.

    The replicator calls :meth:`begin` before it writes a tracked snapshot;
    the capture reports the scan through :func:`scan_sink` (reports while no
    tracked snapshot is being written are ignored: periodic snapshots).
    """

    def __init__(self, callback: ProgressCallback | None, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._report = _Reporter(callback)
        self._clock = clock
        self._job: _Job | None = None
        self._base = (0, 0)  # (done, total) of the jobs before the current one
        self._last = (-1, -1)
        #: What ``status()`` shows: the newest tracked snapshot (read without a lock).
        self.current: SnapshotProgress | None = None

    def begin(self, generation: str, reason: str, replicas: int) -> None:
        """A tracked snapshot of ``generation`` is about to be written, for
        about ``replicas`` replicas. An unfinished earlier one is given up."""
        with self._lock:
            self._close("given up")
            self._job = _Job(generation, reason, replicas, self._clock())
            self._publish()

    def resume(self, generation: str, key: str, size: int, uploaders: list[tuple[int, str]]) -> None:
        """Track the upload of snapshot ``key`` (``size`` bytes) of
        ``generation``, left staged by an earlier run (a restart cut its
        upload short), to ``uploaders`` (id, URL). Nothing is read for it in
        this run: its figures are the uploads alone."""
        with self._lock:
            if self._job is not None and self._job.key == key:
                return
            self._close("given up")
            job = self._job = _Job(generation, "resumed", len(uploaders), self._clock())
            job.key, job.stored, job.state = key, size, "uploading"
            job.uploads = {rid: (url, _Part(size)) for rid, url in uploaders}
            self._finish_if_done()
            self._publish()

    def scanning(self, database_bytes: int, page_size: int) -> bool:
        """A scan for a snapshot starts (again, after a retry): True if the
        snapshot is tracked."""
        with self._lock:
            job = self._job
            if job is None or job.state != "writing":
                return False
            job.scan.total = max(job.scan.total, database_bytes)
            job.page_size = page_size
            job.scan.attempt = 0
            self._publish()
            return True

    def scanned(self, n: int) -> None:
        with self._lock:
            job = self._job
            if job is not None and job.state == "writing":
                job.scan.add(n)
                self._publish()

    def staged(self, key: str, size: int, uploaders: list[tuple[int, str]]) -> None:
        """The tracked snapshot is written as ``key`` (``size`` bytes), and
        the replicas ``uploaders`` (id, URL) will upload it."""
        with self._lock:
            job = self._job
            if job is None or job.state != "writing":
                return
            job.scan.done = job.scan.total
            job.key, job.stored, job.state = key, size, "uploading"
            job.uploads = {rid: (url, _Part(size)) for rid, url in uploaders}
            self._finish_if_done()
            self._publish()

    @contextmanager
    def uploading(self, replica: int, key: str) -> Iterator[None]:
        """Around one attempt of replica ``replica`` at uploading ``key``:
        :func:`upload_sent` calls inside count for it, if it is tracked."""
        with self._lock:
            job = self._job
            entry = job.uploads.get(replica) if job is not None and job.key == key else None
            if entry is not None:
                entry[1].attempt = 0
        if job is None or entry is None:
            yield
            return
        part = entry[1]

        def sent(n: int) -> None:
            with self._lock:
                if self._job is job and job.state == "uploading":
                    part.add(n)
                    self._publish()

        token = _upload.set(sent)
        try:
            yield
        finally:
            _upload.reset(token)

    def uploaded(self, replica: int, key: str) -> None:
        """Replica ``replica`` stores ``key``."""
        with self._lock:
            job = self._job
            entry = job.uploads.get(replica) if job is not None and job.key == key else None
            if job is None or entry is None or job.state != "uploading":
                return
            entry[1].done = entry[1].total
            self._finish_if_done()
            self._publish()

    def dropped(self, key: str) -> None:
        """``key`` left staging: if it is the tracked snapshot and some
        replica still lacked it, a newer snapshot serves it instead."""
        with self._lock:
            job = self._job
            if job is not None and job.key == key and job.finished is None:
                self._close("given up")
                self._publish()

    def _finish_if_done(self) -> None:
        job = self._job
        assert job is not None
        if all(p.done >= p.total for _url, p in job.uploads.values()):
            done, total = job.totals()
            self._base = (self._base[0] + done, self._base[1] + total)
            job.state, job.finished = "done", self._clock()

    def _close(self, state: str) -> None:
        """End the current job unfinished: what was done of it stays done,
        the rest leaves the total."""
        job = self._job
        if job is None or job.finished is not None:
            return
        done, _total = job.totals()
        self._base = (self._base[0] + done, self._base[1] + done)
        job.state, job.finished = state, self._clock()

    def _publish(self) -> None:
        job = self._job
        assert job is not None
        done, total = job.totals()
        self.current = SnapshotProgress(
            generation=job.generation,
            reason=job.reason,
            state=job.state,
            started=job.started,
            finished=job.finished,
            database_bytes=job.scan.total,
            read_bytes=job.scan.done,
            snapshot_bytes=job.stored,
            uploaded_bytes={url: p.done for url, p in job.uploads.values()},
            done=done,
            total=total if job.state != "given up" else done,
        )
        report = self._base if job.finished is not None else (self._base[0] + done, self._base[1] + total)
        if report != self._last and report[1] > 0:
            self._last = report
            self._report(*report)


def scan_sink(
    tracker: SnapshotTracker | None,
    sink: Callable[[int, bytes], None] | None,
    pages: int,
    page_size: int,
) -> Callable[[int, bytes], None] | None:
    """``sink``, counting into ``tracker`` the bytes of a scan of ``pages``
    pages for a snapshot (every 4 MiB), if that snapshot is tracked."""
    if tracker is None or sink is None or not tracker.scanning(pages * page_size, page_size):
        return sink
    every = max(1, (4 << 20) // page_size)
    count = 0
    feed = sink

    def counting(pgno: int, page: bytes) -> None:
        nonlocal count
        feed(pgno, page)
        count += 1
        if count == every:
            tracker.scanned(count * page_size)
            count = 0

    return counting


# -- the command line's bar -------------------------------------------------------------


def _wants_bar() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def terminal_bar(description: str) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a bar on stderr, or ``None`` when stdout
    or stderr is not a terminal (a pipe, a file, a log collector) or tqdm is
    not installed (``pip install "sqlrepl[cli]"``).

    A bar is closed (and left on the screen) when ``done`` reaches
    ``total``; should the total then grow (a replicator's next tracked
    snapshot, see :class:`SnapshotTracker`), a new bar counts the new part
    from zero. Safe to call from several threads, one call at a time."""
    if not _wants_bar():
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    bars: list[Any] = []  # the open bar, if any
    closed_at = [0]  # the total when the last bar was closed

    def update(done: int, total: int) -> None:
        base = closed_at[0]
        if not bars:
            if total <= base:
                return  # (a repeat of the finished job's last call)
            bars.append(_make_bar(description, tqdm, total - base))
        bar = bars[0]
        if bar.total != total - base:
            bar.total = total - base
            bar.refresh()
        bar.update(max(0, done - base) - bar.n)
        if done >= total:
            bars.pop().close()
            closed_at[0] = total

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def _make_bar(description: str, tqdm: Any, total: int) -> Any:
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    return tqdm(
        desc=description,
        total=total,  # (not 0 then the total: that draws a bar of no size first)
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=True,
        # A terminal that reports no size (a fresh pseudo-terminal) would
        # get a bar cut to nothing.
        ncols=size.columns or 80,
        nrows=size.lines or 24,
    )
