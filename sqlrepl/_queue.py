"""The queue of staged objects and what each replica needs from it. Pure:
no I/O, no clock; the replicator's parts own the files and the timing.

A staged object is a snapshot or a segment waiting in the staging folder
until every replica that needs it has it. Each replica keeps a position
(its generation, its txid, the keys it uploaded); :meth:`StagedQueue.next_for`
says what it uploads next, in an order that keeps its chain unbroken.
Segments copied early in an interval are *held* until the interval's release
(:meth:`StagedQueue.held_runs` groups them for merging).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "MERGE_STORED_MAX",
    "SEGMENT",
    "SNAPSHOT",
    "Need",
    "Position",
    "Role",
    "StagedObject",
    "StagedQueue",
]

SNAPSHOT = "S"
SEGMENT = "G"
# Held segments are merged only while the merged object stays this small: it
# is what saves PUTs at little cost. Under heavy writes parts are released as
# soon as this much is held and uploaded as they are (less lag, bounded merge
# work; requests are few per byte there anyway). The price, measured: a page
# rewritten in two such parts is uploaded twice (the mixed benchmark uploads
# 76 MB per 10k operations, Litestream 52).
MERGE_STORED_MAX = 4 << 20


@dataclass
class StagedObject:
    """A staged object, ordered as replicas must upload them."""

    generation: str
    kind: str  # SNAPSHOT or SEGMENT
    first: int
    last: int
    key: str
    path: str
    size: int
    timestamp_ms: int = 0
    compacted: bool = False  # a merge of segments every replica already has
    page_bytes: int = 0  # uncompressed pages (known once read for compaction)
    held: bool = False  # copied early; uploaded (merged) at the next release

    @property
    def order(self) -> tuple[str, int, int]:
        return (self.generation, self.last, 0 if self.kind == SEGMENT else 1)


class Position(Protocol):
    """What a replica holds, as far as the queue is concerned."""

    generation: str | None
    txid: int
    uploaded: set[str]


class Role(enum.Enum):
    """What a staged object is to one replica."""

    DONE = "done"  # uploaded
    UPLOAD = "upload"  # next in order
    LATER = "later"  # needed once the ones before it are uploaded
    HELD = "held"  # copied early, waits for the next release
    USELESS = "useless"  # not needed (superseded, or another generation's)


#: The roles of an object the replica still lacks (its lag).
LACKING = (Role.UPLOAD, Role.LATER, Role.HELD)


class Need(enum.Enum):
    """What :meth:`StagedQueue.next_for` answers when no object is next."""

    NOTHING = "nothing"  # up to date, or what it lacks is held until the release
    SNAPSHOT = "snapshot"  # a fresh snapshot must be staged first


class StagedQueue:
    """The staged objects, in upload order. Owned by the replicator's loop
    (read by ``status`` under the replicator's lock)."""

    def __init__(self) -> None:
        self.objects: list[StagedObject] = []

    def replace(self, objects: Iterable[StagedObject]) -> None:
        """Keep ``objects`` (any order). A new list, never sorted in place:
        an uploader may be iterating the old one."""
        self.objects = sorted(objects, key=lambda o: o.order)

    def add(self, obj: StagedObject) -> StagedObject:
        self.replace([*self.objects, obj])
        return obj

    def remove(self, obj: StagedObject) -> None:
        self.objects = [o for o in self.objects if o is not obj]

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    def held(self) -> list[StagedObject]:
        return [o for o in self.objects if o.held]

    def newest_snapshot(self, generation: str | None) -> StagedObject | None:
        """The newest staged snapshot of ``generation``."""
        snaps = [o for o in self.objects if o.kind == SNAPSHOT and o.generation == generation]
        return max(snaps, key=lambda o: o.first, default=None)

    def role_of(self, r: Position, obj: StagedObject, generation: str | None) -> Role:
        """What ``obj`` is to replica ``r`` while ``generation`` is captured."""
        if obj.key in r.uploaded:
            return Role.DONE
        if obj.held:
            return Role.HELD
        if obj.compacted:  # an extra copy of history the replica has: send it
            return Role.UPLOAD if obj.generation == r.generation else Role.USELESS
        if obj.generation != r.generation:
            # A replica joining the current generation needs one snapshot:
            # the newest (older ones would only pile up while it is down).
            return Role.UPLOAD if obj is self.newest_snapshot(generation) else Role.USELESS
        if obj.kind == SNAPSHOT:
            return Role.UPLOAD if obj.first >= r.txid else Role.USELESS
        if obj.last <= r.txid:
            return Role.USELESS
        # Staged segments of one generation form an unbroken chain, so one
        # past the next is needed later. (Should a chain ever break, the
        # replica asks for a snapshot, and its txid then jumps past them.)
        return Role.UPLOAD if obj.first == r.txid + 1 else Role.LATER

    def next_for(self, r: Position, generation: str | None, txid: int) -> StagedObject | Need:
        """The next object ``r`` should upload while the capture is at
        ``generation``/``txid``; :attr:`Need.SNAPSHOT` if it needs a fresh
        snapshot first; :attr:`Need.NOTHING` when it has nothing to do now."""
        held = False
        for obj in self.objects:
            role = self.role_of(r, obj, generation)
            if role is Role.UPLOAD:
                return obj
            held = held or role is Role.HELD
        if held:
            return Need.NOTHING  # (the rest comes with the next release)
        if r.generation != generation or r.txid < txid:
            return Need.SNAPSHOT
        return Need.NOTHING

    def lacking(self, r: Position, generation: str | None) -> list[StagedObject]:
        """The staged objects ``r`` still needs (merged copies aside)."""
        return [o for o in self.objects if not o.compacted and self.role_of(r, o, generation) in LACKING]

    def unneeded(self, replicas: Iterable[Position], generation: str | None) -> list[StagedObject]:
        """The objects no replica needs any more."""
        reps = list(replicas)
        return [
            o
            for o in self.objects
            if all(self.role_of(r, o, generation) in (Role.DONE, Role.USELESS) for r in reps)
        ]

    def held_runs(self, page_cap: int) -> list[list[StagedObject]]:
        """The held segments grouped into runs to merge: consecutive, of one
        generation, small ones only (``page_cap`` bytes of pages, a quarter
        of it for one part) and at most :data:`MERGE_STORED_MAX` as stored."""
        runs: list[list[StagedObject]] = [[]]
        for obj in self.held():
            run = runs[-1]
            if run and (
                obj.page_bytes > page_cap // 4
                or run[-1].page_bytes > page_cap // 4
                or sum(o.page_bytes for o in run) + obj.page_bytes > page_cap
                or sum(o.size for o in run) + obj.size > MERGE_STORED_MAX
                or run[-1].generation != obj.generation
                or run[-1].last + 1 != obj.first
            ):
                runs.append(run := [])
            run.append(obj)
        return [run for run in runs if run]
