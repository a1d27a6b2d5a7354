"""The replica's lifecycle, decided without I/O.

Which segments a compaction merges together, which objects retention may
delete, when a snapshot is due, and which chain of segments a restore
follows: pure functions over a listing of keys, a clock reading and the
options, so that they can be checked exhaustively (tests/test_lifecycle.py)
and the replicator and restore only carry them out.

The invariant they keep, for the current generation of a replica: for
``latest`` and for every point inside the retention window there is a
snapshot and an unbroken chain of segments from it to that point (to a
segment boundary at or before it: the resolution of point-in-time restores
is one sync interval until the merged segment covering the point is older
than ``segment_retention``, that merged segment's span after). Two rules
keep it:

- *compaction is cut at snapshots*: no merged segment spans a snapshot's
  txid (``first <= T < last``), so the merged segments continue every
  snapshot's chain and the small segments they cover can go;
- *retention keeps what a chain needs*: whatever it would delete by age or
  by coverage, it keeps every segment on the chain that a restore of
  ``latest`` follows from each snapshot it keeps; and it deletes nothing of
  a generation whose ``latest`` no snapshot reaches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from . import _format
from ._format import SegmentKey, SnapshotKey
from ._replica import ObjectInfo

__all__ = [
    "Generation",
    "RetentionPlan",
    "compaction_runs",
    "follow_chain",
    "group_generations",
    "plan_retention",
    "snapshot_due",
]


@dataclass
class Generation:
    """What a replica holds of one generation."""

    id: str
    snapshots: list[tuple[SnapshotKey, int]] = field(default_factory=list)  # (key, size)
    segments: list[tuple[SegmentKey, int]] = field(default_factory=list)

    @property
    def first_timestamp_ms(self) -> int:
        stamps = [k.timestamp_ms for k, _ in self.snapshots]
        return min(stamps) if stamps else 0

    @property
    def last_txid(self) -> int:
        return max([k.txid for k, _ in self.snapshots] + [k.last_txid for k, _ in self.segments], default=0)

    @property
    def last_timestamp_ms(self) -> int:
        return max(
            [k.timestamp_ms for k, _ in self.snapshots] + [k.timestamp_ms for k, _ in self.segments],
            default=0,
        )


def group_generations(objects: Iterable[ObjectInfo]) -> list[Generation]:
    """Generations (oldest first) from a listing of ``generations/``."""
    gens: dict[str, Generation] = {}
    for obj in objects:
        parsed = _format.parse_key(obj.key)
        if parsed is None:
            continue
        gen = gens.setdefault(parsed.generation, Generation(parsed.generation))
        if isinstance(parsed, SnapshotKey):
            gen.snapshots.append((parsed, obj.size))
        else:
            gen.segments.append((parsed, obj.size))
    for gen in gens.values():
        gen.snapshots.sort()
        gen.segments.sort()
    return [gens[g] for g in sorted(gens)]


# -- restore chains -------------------------------------------------------------


def follow_chain(
    segments: Iterable[tuple[SegmentKey, int]],
    start: SnapshotKey,
    *,
    limit: int,
    ts_ms: int | None = None,
) -> list[tuple[SegmentKey, int]]:
    """The chain a restore applies after snapshot ``start``: from its txid
    ``t``, repeatedly the segment with ``first == t + 1`` and the largest
    ``last`` not beyond ``limit`` (nor timestamped after ``ts_ms``), until
    none continues. It may end before ``limit``: the caller compares."""
    by_first: dict[int, list[tuple[SegmentKey, int]]] = {}
    for k, s in segments:
        by_first.setdefault(k.first_txid, []).append((k, s))
    chain: list[tuple[SegmentKey, int]] = []
    at = start.txid
    while True:
        options = [
            (k, s)
            for k, s in by_first.get(at + 1, [])
            if k.last_txid <= limit and (ts_ms is None or k.timestamp_ms <= ts_ms)
        ]
        if not options:
            return chain
        best = max(options, key=lambda o: o[0].last_txid)
        chain.append(best)
        at = best[0].last_txid


def _reaches(segments: Sequence[tuple[SegmentKey, int]], snap: SnapshotKey, last: int) -> bool:
    chain = follow_chain(segments, snap, limit=last)
    return (chain[-1][0].last_txid if chain else snap.txid) >= last


# -- retention ------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention pass deletes, and a problem it found (or ``None``)."""

    delete: list[str]
    problem: str | None = None
    #: older generations past the horizon that ``may_retire`` kept
    spared: tuple[str, ...] = ()


def plan_retention(
    generations: Sequence[Generation],
    *,
    current: str | None,
    now_ms: int,
    retention_ms: int | None,
    segment_retention_ms: int | None,
    may_retire: Callable[[str], bool] | None = None,
) -> RetentionPlan:
    """The objects a retention pass deletes from a replica listed as
    ``generations``, for the writer of generation ``current``.

    - In ``current``: the snapshots older than the *base* (the newest
      snapshot at or before ``now - retention`` from which ``latest``
      restores), and the segments ending at or before it; and the small
      segments that a longer segment covers and that are older than
      ``segment_retention``. Never a segment on the chain that a restore of
      ``latest`` follows from a snapshot that is kept. Nothing at all when
      no snapshot of ``current`` reaches its last txid (``problem`` says so).
    - An older generation, once its last object is older than the horizon
      and the generation after it has a snapshot at or before the horizon
      (no point of the window restores from it then).
    - Nothing of a generation newer than ``current`` (another writer's).
    - Of an older generation, only if ``may_retire(generation)`` (when given)
      allows it: another writer's history is spared (``spared`` names them).
    """
    horizon = None if retention_ms is None else now_ms - retention_ms
    seg_limit = None if segment_retention_ms is None else now_ms - segment_retention_ms
    ours = next((g for g in generations if g.id == current), None)
    delete: list[str] = []
    spared: list[str] = []
    if ours is not None:
        kept, problem = _prune_generation(ours, horizon, seg_limit)
        if problem is not None:
            # The older generations may be all that restores: touch nothing.
            return RetentionPlan([], problem)
        delete += kept
    if horizon is not None and current is not None:
        older = [g for g in generations if g.id < current]
        later = [g for g in generations if current >= g.id and g.snapshots]
        for gen in older:
            successor = next((g for g in later if g.id > gen.id), None)
            if (
                gen.last_timestamp_ms < horizon
                and successor is not None
                and successor.first_timestamp_ms <= horizon
            ):
                if may_retire is not None and not may_retire(gen.id):
                    spared.append(gen.id)
                    continue
                delete += [k.key for k, _ in gen.snapshots] + [k.key for k, _ in gen.segments]
    return RetentionPlan(sorted(set(delete)), spared=tuple(spared))


def _prune_generation(
    gen: Generation, horizon: int | None, seg_limit: int | None
) -> tuple[list[str], str | None]:
    last = gen.last_txid
    snaps = sorted((k for k, _ in gen.snapshots), key=lambda k: k.txid)
    reaching = [s for s in snaps if _reaches(gen.segments, s, last)]
    if not reaching:
        return [], (
            f"no snapshot of generation {gen.id} has an unbroken chain of segments to its last txid {last};"
            " retention deletes nothing from the replica"
        )
    base = None
    if horizon is not None:
        base = next((s for s in reversed(reaching) if s.timestamp_ms <= horizon), None)
    doomed: set[str] = set()
    if base is not None:
        doomed |= {s.key for s in snaps if s.txid < base.txid}
        doomed |= {k.key for k, _ in gen.segments if k.last_txid <= base.txid}
    if seg_limit is not None:
        # Judged by the covering segment's age (its last transaction's), so
        # that the parts of one merge go together: a point keeps its fine
        # resolution until then.
        merged = [m for m, _ in gen.segments if m.timestamp_ms <= seg_limit and m.key not in doomed]
        for k, _ in gen.segments:
            if k.key not in doomed and any(
                m.first_txid <= k.first_txid and k.last_txid <= m.last_txid and m != k for m in merged
            ):
                doomed.add(k.key)
    # Whatever the rules above chose, the chain that a restore of latest
    # follows from each kept snapshot stays: over the objects that remain,
    # the longest segment continuing at each step is then on that chain, so
    # the restore follows exactly it.
    remaining = [(k, s) for k, s in gen.segments if k.last_txid > (base.txid if base else -1)]
    for snap in snaps:
        if snap.key in doomed:
            continue
        for k, _ in follow_chain(remaining, snap, limit=last):
            doomed.discard(k.key)
    return sorted(doomed), None


# -- compaction -----------------------------------------------------------------


def compaction_runs(window: Sequence[tuple[int, int]], snapshot_txids: Iterable[int]) -> list[list[int]]:
    """Split a compaction window (consecutive segments as ``(first, last)``
    txids, in order) into the runs merged together: a run ends at every
    snapshot's txid, so that no merged segment spans a snapshot. Returns
    lists of indexes into ``window``; a run of one is left as it is."""
    cuts = sorted(set(snapshot_txids))
    runs: list[list[int]] = []
    run: list[int] = []
    for i, (first, last) in enumerate(window):
        if run and window[run[-1]][1] + 1 != first:
            runs.append(run)
            run = []
        run.append(i)
        if any(first <= t <= last for t in cuts):
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return runs


# -- snapshots ------------------------------------------------------------------


def snapshot_due(
    *,
    since_count: int,
    since_bytes: int,
    db_bytes: int,
    last_snapshot_s: float,
    now_s: float,
    interval_s: float,
) -> bool:
    """A snapshot is due when segments were added since the last one and
    either they outweigh the database (at least 1 MiB) or ``interval_s``
    has passed since the last one."""
    if since_count == 0:
        return False
    if since_bytes >= max(db_bytes, 1 << 20):
        return True
    return now_s - last_snapshot_s >= interval_s
