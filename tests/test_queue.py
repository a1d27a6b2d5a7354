"""The queue of staged objects decides, without I/O, what each replica uploads next."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlrepl._queue import MERGE_STORED_MAX, SEGMENT, SNAPSHOT, Need, Role, StagedObject, StagedQueue


@dataclass
class _Pos:
    generation: str | None
    txid: int
    uploaded: set[str] = field(default_factory=set)


def _seg(
    gen: str, first: int, last: int, *, size: int = 100, pages: int = 4096, held: bool = False
) -> StagedObject:
    key = f"{gen}/seg-{first}-{last}"
    return StagedObject(gen, SEGMENT, first, last, key, "/nowhere/" + key, size, page_bytes=pages, held=held)


def _snap(gen: str, txid: int) -> StagedObject:
    key = f"{gen}/snap-{txid}"
    return StagedObject(gen, SNAPSHOT, txid, txid, key, "/nowhere/" + key, 1000)


def _queue(*objects: StagedObject) -> StagedQueue:
    queue = StagedQueue()
    queue.replace(objects)
    return queue


def test_a_replica_uploads_its_chain_in_order() -> None:
    """The segment right after a replica's txid is next; the one after that waits its turn."""
    a, b = _seg("g1", 6, 7), _seg("g1", 8, 9)
    queue = _queue(b, a)
    r = _Pos("g1", 5)
    assert queue.next_for(r, "g1", 9) is a
    assert queue.role_of(r, b, "g1") is Role.LATER
    assert queue.role_of(_Pos("g1", 7), a, "g1") is Role.USELESS
    assert queue.role_of(_Pos("g1", 5, {a.key}), a, "g1") is Role.DONE
    assert queue.next_for(_Pos("g1", 9), "g1", 9) is Need.NOTHING


def test_a_replica_of_another_generation_gets_only_the_newest_snapshot() -> None:
    """Joining the current generation takes its newest snapshot; what precedes it is useless."""
    old, mid, new, after = _snap("g2", 3), _seg("g2", 4, 10), _snap("g2", 10), _seg("g2", 11, 12)
    queue = _queue(old, mid, new, after)
    r = _Pos("g1", 50)
    assert queue.next_for(r, "g2", 12) is new
    assert queue.role_of(r, old, "g2") is Role.USELESS
    assert queue.unneeded([r, _Pos("g2", 10, {new.key})], "g2") == [old, mid]


def test_held_segments_wait_for_the_release_and_a_gap_asks_for_a_snapshot() -> None:
    """Held segments make a replica wait; one behind with nothing staged for it needs a snapshot."""
    held = _seg("g1", 6, 7, held=True)
    assert _queue(held).next_for(_Pos("g1", 5), "g1", 7) is Need.NOTHING
    assert _queue(held).lacking(_Pos("g1", 5), "g1") == [held]
    assert _queue().next_for(_Pos("g1", 5), "g1", 7) is Need.SNAPSHOT
    assert _queue().next_for(_Pos(None, 0), "g1", 7) is Need.SNAPSHOT


def test_held_runs_break_at_gaps_generations_and_size() -> None:
    """Held segments are merged in runs of consecutive small ones of one generation."""
    cap = 64 << 20
    a, b = _seg("g1", 1, 2, held=True), _seg("g1", 3, 4, held=True)
    gap = _seg("g1", 6, 6, held=True)
    big = _seg("g1", 7, 7, held=True, pages=cap // 4 + 1)
    other = _seg("g2", 8, 9, held=True)
    heavy = _seg("g2", 10, 10, held=True, size=MERGE_STORED_MAX)
    runs = _queue(a, b, gap, big, other, heavy).held_runs(cap)
    assert [[o.key for o in run] for run in runs] == [
        [a.key, b.key],
        [gap.key],
        [big.key],
        [other.key],
        [heavy.key],
    ]
