"""The replica watch: noticing, at a bounded cost, what happens to a replica
behind its writer's back.

Two things can go wrong there without any error on the write path: the
replica is emptied (a lifecycle rule, an operator, a bucket deleted and made
again), and another writer starts writing to the same replica (two machines
restored from it, both running; two databases given one URL). Uploads keep
succeeding in both cases; only a look at the replica tells.

Each writer (one staging directory: one machine's copy of one database) has
a random id, and keeps a small *writer record* in every replica it writes,
for the generation it writes there (docs/format.md, "Writer records")::

    writers/<generation>/<writer>-<since>-<written>.json

``since`` is when the writer began writing that generation to the replica and
``written`` when the record was last written, in ms. Both are Lamport times:
never lower than one more than any record time the writer has seen, so that
the order of two writers' records holds even when their clocks disagree. The
record is written again after every snapshot uploaded, so that whatever
removed the newest snapshot (a wipe, an age-based lifecycle rule) removed
the record too.

Every ``replica_check_interval`` (60 s by default) the replica's uploader
lists ``writers/`` (one LIST: one key per writer and generation kept) and
:func:`judge` decides:

- this writer's record of the generation the replica holds is gone although
  it was seen (confirmed by a GET of it, so a stale listing cannot fool it):
  the replica was emptied, and the replicator re-seeds it;
- a record of another writer in the same generation, or one written after
  this writer's ``since``: another writer is live on this replica. It is
  logged as an error and reported in ``status()``, for as long as this
  replicator runs. This writer then writes its record again (once per newly
  seen writer), so that the other one, which may have started later, sees a
  record newer than its own ``since`` and notices in turn.

A machine that died before its replica was restored elsewhere left records
older than the new writer's ``since``: it is not taken for a live writer.

Not detected: two writers sharing one staging directory's id (a machine
cloned with its staging directory); a wipe of ``generations/`` alone that
spares ``writers/`` (the replicator's look at start sees that one); anything
between two checks.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from . import _format
from ._errors import ObjectNotFoundError, ReplicaError
from ._format import WriterKey
from ._replica import ReplicaClient
from ._staging import Staging

__all__ = ["ReplicaWatch", "Verdict", "WatchView", "judge", "load_writer_id"]

log = logging.getLogger("sqlrepl")

# Retention deletes a generation another writer recorded only once this
# writer's own record is this many check intervals old: time enough for a
# live writer of it to see our record and answer with a newer one of its own.
_GRACE_CHECKS = 3


def load_writer_id(staging: Staging) -> str:
    """This staging directory's writer id, made (and stored) on first use."""
    path = os.path.join(staging.root, "writer.json")
    saved = staging.read_json(path)
    if isinstance(saved, dict) and isinstance(saved.get("writer"), str) and len(saved["writer"]) == 16:
        return str(saved["writer"])
    writer = secrets.token_hex(8)
    staging.write_json(path, {"writer": writer})
    return writer


@dataclass(frozen=True)
class Verdict:
    """What one listing of the writer records says about a replica."""

    wiped: bool  # our record of the replica's generation was seen and is gone
    ours: WriterKey | None  # our newest record of that generation, if listed
    foreign: tuple[WriterKey, ...]  # records of other writers live on this replica


def judge(
    records: Iterable[WriterKey], *, writer: str, generation: str | None, known: WriterKey | None
) -> Verdict:
    """Judge a listing of writer records (pure).

    ``generation`` is the one the replica holds for this writer (``None``:
    none yet); ``known`` this writer's record of it as last seen or written.
    """
    records = list(records)
    mine = [r for r in records if r.writer == writer and r.generation == generation]
    ours = max(mine, key=lambda r: r.written_ms, default=None)
    since = ours.since_ms if ours is not None else None
    foreign = tuple(
        r
        for r in records
        if generation is not None
        and r.writer != writer
        and (r.generation == generation or (since is not None and r.written_ms > since))
    )
    return Verdict(known is not None and ours is None, ours, foreign)


@dataclass(frozen=True)
class WatchView:
    """What the watch of one replica has found, for ``status()``."""

    checked_at: float | None = None
    wipes: int = 0
    foreign_writers: tuple[str, ...] = ()


class ReplicaWatch:
    """The writer records of one replica and what the checks found.

    Used by that replica's uploader task only (no locking); ``view`` may be
    read from any thread.
    """

    def __init__(self, client: ReplicaClient, writer: str, interval: float, database: str) -> None:
        self.client = client
        self.writer = writer
        self.interval = interval
        self.database = database
        self.wipes = 0
        self.checked_at: float | None = None
        self._due = time.monotonic() + interval
        self._clock_ms = 0
        self._mine: dict[str, WriterKey] = {}  # our newest record per generation, known written
        self._records: list[WriterKey] | None = None  # the last listing
        self._foreign: dict[tuple[str, str], str] = {}  # (generation, writer) -> description

    # -- schedule ----------------------------------------------------------

    def due(self) -> bool:
        return time.monotonic() >= self._due

    def seconds_left(self) -> float:
        return max(0.0, self._due - time.monotonic())

    def check_soon(self) -> None:
        self._due = time.monotonic()

    @property
    def view(self) -> WatchView:
        return WatchView(self.checked_at, self.wipes, tuple(self._foreign.values()))

    # -- the check ---------------------------------------------------------

    async def check(self, generation: str | None) -> bool:
        """List the writer records (one LIST) and act on them. True when the
        replica was emptied (the caller re-seeds it); foreign writers are
        logged and remembered here. Raises ``ReplicaError`` on a failed
        request (the caller retries as for an upload)."""
        self._due = time.monotonic() + self.interval
        listing = await self.client.list(_format.WRITERS)
        records = [k for o in listing if (k := _format.parse_writer_key(o.key)) is not None]
        self._records = records
        self._clock_ms = max([self._clock_ms, *(r.written_ms for r in records)])
        known = self._mine.get(generation) if generation is not None else None
        verdict = judge(records, writer=self.writer, generation=generation, known=known)
        if verdict.wiped and known is not None and await self._gone(known):
            self.note_wipe(known.generation)
            self.checked_at = time.time()
            return True
        if verdict.ours is not None:
            self._mine[verdict.ours.generation] = verdict.ours
        elif generation is not None and known is None:
            # Never seen: written by a sqlrepl without records, or lost in a
            # crash between a snapshot's upload and its record.
            await self.claim(generation)
        new = [r for r in verdict.foreign if (r.generation, r.writer) not in self._foreign]
        for rec in new:
            self._foreign[(rec.generation, rec.writer)] = await self._describe(rec)
            log.error(
                "replica %s is also written by another writer: %s (this is writer %s of %s)."
                " A restore of the newest state returns only one of the histories; give each"
                " database its own replica URL. Meanwhile retention deletes no other generation there",
                self.client.url,
                self._foreign[(rec.generation, rec.writer)],
                self.writer,
                self.database,
            )
        if new and generation is not None:
            await self.claim(generation)  # a newer record of ours: the other writer notices us too
        self.checked_at = time.time()
        return False

    def note_wipe(self, generation: str) -> None:
        """Count a wipe of the replica, found here or by the replicator's own
        look at start; our record of ``generation`` went with it."""
        self.wipes += 1
        self._mine.pop(generation, None)

    async def _gone(self, record: WriterKey) -> bool:
        """Whether ``record`` is really absent (a listing may be stale)."""
        try:
            await self.client.get(record.key)
        except ObjectNotFoundError:
            return True
        return False

    async def _describe(self, rec: WriterKey) -> str:
        where = ""
        try:
            body = json.loads(await self.client.get(rec.key))
            where = f" on {body.get('host', '?')} (pid {body.get('pid', '?')}, {body.get('database', '?')})"
        except (ReplicaError, ValueError, AttributeError):
            pass  # the key alone says enough
        return f"writer {rec.writer}{where}, generation {rec.generation}"

    async def claim(self, generation: str) -> None:
        """Write (or write again) this writer's record of ``generation``."""
        old = self._mine.get(generation)
        written = max(int(time.time() * 1000), self._clock_ms + 1)
        rec = WriterKey(generation, self.writer, old.since_ms if old else written, written)
        body = {
            "version": 1,
            "writer": self.writer,
            "generation": generation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "database": self.database,
        }
        await self.client.put(rec.key, json.dumps(body, sort_keys=True).encode())
        self._mine[generation] = rec
        self._clock_ms = written
        if old is not None and old.key != rec.key:
            await self.client.delete([old.key])

    # -- retention ---------------------------------------------------------

    def may_retire(self, generation: str, current: str | None) -> bool:
        """Whether retention may delete ``generation`` (older than ``current``,
        past the horizon) from this replica: never while another writer is
        seen here; a generation only this writer recorded (or none: written
        before records existed) at once; another writer's (a machine that
        died before a restore elsewhere) once our own record of ``current``
        is a few check intervals old, and no newer record of it appeared."""
        if self._records is None or self._foreign:
            return False
        writers = {r.writer for r in self._records if r.generation == generation}
        if writers <= {self.writer}:
            return True
        ours = self._mine.get(current) if current is not None else None
        grace_ms = _GRACE_CHECKS * self.interval * 1000
        return ours is not None and time.time() * 1000 - ours.since_ms >= grace_ms

    def record_keys(self, generation: str) -> list[str]:
        """Keys of the writer records of ``generation`` in the last listing."""
        return [r.key for r in self._records or () if r.generation == generation]
