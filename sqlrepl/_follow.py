"""Read replicas: keep a local copy of a replicated database current, readable
by any process with plain ``sqlite3`` while it is updated.

:func:`follow` starts a :class:`Follower`: a background thread that restores
the database if it is missing, then polls the replica and applies each new
segment (see docs/follow.md for the design, guarantees and cost). The
follower is the thread and its states; the work is done by three parts:

- :mod:`._follow_feed`: what to read from the replica (the next segments,
  the generation to move to) and reading it;
- :mod:`._follow_image`: the copy's state in memory and batches on top of
  it, checked by the database checksum of docs/format.md;
- :mod:`._follow_copy`: the copy on disk, its lock and recorded states, and
  the journaled apply that keeps every reader safe.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from . import _check
from ._errors import ConfigError, CorruptObjectError, ReplicaError, RestoreError
from ._follow_copy import CopyDivergedError, FollowedCopy, check_not_followed, state_path
from ._follow_feed import Feed, next_step
from ._follow_image import Batch, Image, batch_towards
from ._lifecycle import Generation
from ._replica import ReplicaClient, open_replica

__all__ = ["FollowStatus", "Follower", "check_not_followed", "follow"]

log = logging.getLogger("sqlrepl")

# The name the Django backend knows the state file by.
_state_path = state_path


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


def _checked_arguments(
    database: object,
    replica: object,
    poll_interval: object,
    generation_check_every: object,
    lock_timeout: object,
    overwrite: object,
    on_apply: object,
) -> tuple[str, ReplicaClient]:
    """The copy's absolute path and the replica client, once every argument
    of :func:`follow` is checked; raises :class:`ConfigError` saying which
    is wrong and what it must be."""
    raw = os.fspath(database) if isinstance(database, str | os.PathLike) else None
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"database must be the path of the copy to keep, got {database!r}")
    path = os.path.abspath(raw)
    _check.check_database_path(path, role="followed copy", folder_must_exist=False)
    if isinstance(replica, str):
        client: ReplicaClient = open_replica(replica)
    elif _check.is_client(replica):
        client = replica  # type: ignore[assignment]
    else:
        raise ConfigError(f"replica must be one replica URL or a replica client, got {replica!r}")
    _check.seconds("poll_interval", poll_interval, positive=True)
    _check.count("generation_check_every", generation_check_every, minimum=1)
    _check.seconds("lock_timeout", lock_timeout)
    _check.flag("overwrite", overwrite)
    if on_apply is not None and not callable(on_apply):
        raise ConfigError(f"on_apply must be a function taking a FollowStatus, or None, got {on_apply!r}")
    return path, client


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
        self.database, client = _checked_arguments(
            database, replica, poll_interval, generation_check_every, lock_timeout, overwrite, on_apply
        )
        self._own_client = isinstance(replica, str)
        self._client = client
        self._feed = Feed(client)
        self.replica = client.url
        self.poll_interval = poll_interval
        self.generation_check_every = generation_check_every
        self.lock_timeout = lock_timeout
        self.overwrite = overwrite
        self._on_apply = on_apply
        self._copy = FollowedCopy(self.database, self.replica, lock_timeout=lock_timeout, overwrite=overwrite)
        self._image: Image | None = None
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
        self._pending: Batch | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Follower:
        """Take the follower lock and start the thread. Raises
        :class:`FollowedDatabaseError` if another follower keeps the file."""
        with self._cond:
            if self._thread is not None:
                return self
            self._copy.lock()
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
        timeout = _check.check_timeout("timeout", timeout)
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
        timeout = _check.check_timeout("timeout", timeout)
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
            self._copy.close()
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
                    self._diverged = self._diverged or isinstance(exc, CopyDivergedError)
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
            step = next_step(await self._feed.generations(), img.generation, img.txid, reseed=self._reseed)
            if step.move_to is not None:
                await self._move_to(step.move_to, fresh=step.fresh)
                return
            segments = step.segments
        else:
            segments = await self._feed.next_segments(img.generation, img.txid)
        if not segments:
            return
        batch = await self._feed.fetch(
            img, segments, poll_interval=self.poll_interval, stopping=self._stop.is_set
        )
        self._pending = batch  # kept if the apply is put off
        await anyio.to_thread.run_sync(self._commit, batch)
        self._pending = None

    async def _move_to(self, gen: Generation, *, fresh: bool) -> None:
        """Move to ``gen``'s newest state, as :func:`next_step` decided."""
        assert self._image is not None
        if not fresh:
            log.info(
                "follower of %s: segments after txid %d are gone; re-seeding", self.database, self._image.txid
            )
            await self._move(gen)
            return
        if self._diverged:
            # What the follower knew of the file is wrong: diff the new
            # state against the file as it is.
            img = self._image
            scanned = await anyio.to_thread.run_sync(self._copy.scan_unknown)
            scanned.generation, scanned.txid, scanned.timestamp_ms = (
                img.generation,
                img.txid,
                img.timestamp_ms,
            )
            self._image = scanned
        await self._move(gen)
        self._diverged = False

    # -- opening, seeding, moving ------------------------------------------------

    async def _open(self) -> None:
        if await anyio.Path(self.database).exists():
            image = await anyio.to_thread.run_sync(self._copy.adopt)
            if image is not None:
                self._opened(image)
                return
            # Not a copy this follower can prove: replace it through the
            # journal (readers still see whole states) from the newest state.
            newest = await self._feed.newest_usable()
            if newest is None:
                self._set(state="waiting")
                return
            self._image = await anyio.to_thread.run_sync(self._copy.scan_unknown)
            await self._move(newest)
            self._set(state="following")
            return
        image = await self._seed()
        if image is None:
            self._set(state="waiting")
            return
        self._opened(image)

    def _opened(self, image: Image) -> None:
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

    async def _seed(self) -> Image | None:
        """First start with no file: restore beside it, turn the copy into a
        rollback-journal database and link it into place."""
        tmp = os.path.join(self._copy.staging, "follow-seed.db")
        image = await self._feed.restore_to(tmp, None)
        if image is None:
            return None
        return await anyio.to_thread.run_sync(self._copy.install_seed, tmp, image)

    async def _move(self, gen: Generation) -> None:
        """Move the copy to the newest state of ``gen`` (a new generation, or
        a re-seed): restore it beside the copy, then apply the pages that
        differ as one journaled batch."""
        assert self._image is not None
        tmp = os.path.join(self._copy.staging, "follow-next.db")
        target = await self._feed.restore_to(tmp, gen.id)
        if target is None:
            return

        def apply() -> None:
            assert self._image is not None
            fd = os.open(tmp, os.O_RDONLY)
            try:
                self._commit(batch_towards(self._image, target, fd), full_hashes=target.hashes)
            finally:
                os.close(fd)
                os.unlink(tmp)

        await anyio.to_thread.run_sync(apply)
        self._reseed = False
        log.info(
            "follower of %s moved to generation %s, txid %d", self.database, target.generation, target.txid
        )

    # -- applying a batch --------------------------------------------------------

    def _commit(self, batch: Batch, full_hashes: array.array[int] | None = None) -> None:
        """Apply ``batch`` to the copy, then make it the follower's image."""
        assert self._image is not None
        new = self._copy.commit(self._image, batch, full_hashes)
        with self._cond:
            self._image = new
            self._batches += 1
            self._applied_at = time.time()
            self._cond.notify_all()
        self._notify()

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

    ``poll_interval``: seconds, finite and > 0. ``generation_check_every``:
    a whole number >= 1. ``lock_timeout``: how long an apply waits for
    readers to finish their read transactions before it gives up and tries
    again at the next poll (seconds, finite and >= 0; 0 never waits).
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
