"""Periodic verification: would a restore from this replica work today?

:func:`verify_replica` proves, without rebuilding the database, that the
replica restores to the state the replicator captured at some txid. It
reads the restore chain of the replica's generation (the objects a restore
would apply, chosen as restore chooses them) and checks, object by object:

- the header is intact (magic, version, header checksum) and says what its
  key says (kind, txids);
- the body is intact: its length and its XXH3-64 are the header's;
- the chain is unbroken: each segment's "database checksum before" is the
  previous object's "after" (docs/format.md, The database checksum);

then that the chain's last "after" checksum is the database checksum the
replicator computed when it captured that txid. A restore checks the same
links as it applies, and recomputes each page's hash; so a chain that
passes here restores to that database, unless a body's bytes changed and
still matched its XXH3-64 (an accident beyond reason) or the decompression
of a stored body fails (not checked here: it would take a restore's CPU).

Downloads are sequential, in parts of at most ``part_size`` bytes, so that
verification stays in the background: one request at a time beside the
uploads, bounded memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread
import xxhash

from . import _format
from ._errors import CorruptObjectError, ObjectNotFoundError, ReplicaError, RestoreError
from ._lifecycle import group_generations
from ._replica import ReplicaClient
from ._restore import plan_restore

__all__ = ["Verification", "verify_replica"]

_PART = 8 << 20


@dataclass(frozen=True)
class Verification:
    """The outcome of one verification of a replica.

    ``ok``: True when proven, False when the replica would not restore to the
    database's state (a damaged or missing object, a broken chain, a
    checksum that differs), None when this run could not tell (the store did
    not answer, objects changed under it, the replica's txid is older than
    the checksums the replicator keeps). ``txid`` is the state proven (or
    found wrong); ``time`` the Unix time the run ended.
    """

    ok: bool | None
    time: float
    generation: str | None
    txid: int | None
    objects: int
    bytes: int
    message: str


async def verify_replica(
    client: ReplicaClient,
    generation: str,
    checksum_at: Callable[[int], int | None],
    *,
    part_size: int = _PART,
) -> Verification:
    """Verify ``generation`` in ``client`` (see the module docstring).
    ``checksum_at(txid)`` is the database checksum the replicator computed at
    ``txid``, or None if it no longer knows. Never raises for what it finds:
    the outcome says it."""
    result = Verification(None, time.time(), generation, None, 0, 0, "not run")
    for _attempt in range(2):  # retention may delete objects between the LIST and the GETs
        try:
            return await _verify_once(client, generation, checksum_at, part_size)
        except ObjectNotFoundError as exc:
            result = Verification(None, time.time(), generation, None, 0, 0, f"an object went away: {exc}")
        except ReplicaError as exc:
            return Verification(None, time.time(), generation, None, 0, 0, f"the store failed: {exc}")
    return result


async def _verify_once(
    client: ReplicaClient, generation: str, checksum_at: Callable[[int], int | None], part_size: int
) -> Verification:
    listing = await client.list(f"{_format.GENERATIONS}{generation}/")
    try:
        plan = plan_restore(group_generations(listing), generation=generation, replica=client.url)
    except RestoreError as exc:  # no snapshot, or segments missing: a restore would fail
        return Verification(False, time.time(), generation, None, 0, 0, str(exc))
    after: int | None = None
    read = 0
    for n, (key, size) in enumerate(plan.keys):
        try:
            header = await _check_object(client, key, size, part_size)
        except CorruptObjectError as exc:
            return Verification(False, time.time(), generation, None, n, read, str(exc))
        read += size
        parsed = _format.parse_key(key)
        expected_kind = _format.KIND_SNAPSHOT if n == 0 else _format.KIND_SEGMENT
        if (
            parsed is None
            or header.kind != expected_kind
            or (header.first_txid, header.last_txid) != _txids(parsed)
        ):
            return Verification(
                False, time.time(), generation, None, n, read, f"{key}: the header does not match the key"
            )
        if after is not None and header.pre_checksum != after:
            return Verification(
                False,
                time.time(),
                generation,
                header.first_txid,
                n + 1,
                read,
                f"{key}: the chain is broken: it applies to database checksum {header.pre_checksum:016x},"
                f" the objects before it lead to {after:016x}",
            )
        after = header.post_checksum
    assert after is not None
    expected = checksum_at(plan.txid)
    objects = len(plan.keys)
    if expected is None:
        return Verification(
            None,
            time.time(),
            generation,
            plan.txid,
            objects,
            read,
            f"the chain to txid {plan.txid} is intact, but the database's checksum at that txid is no"
            " longer known here; the next run compares a newer one",
        )
    if expected != after:
        return Verification(
            False,
            time.time(),
            generation,
            plan.txid,
            objects,
            read,
            f"the replica restores to database checksum {after:016x} at txid {plan.txid}, but the database"
            f" had {expected:016x} there",
        )
    return Verification(
        True,
        time.time(),
        generation,
        plan.txid,
        objects,
        read,
        f"restores to the database's checksum {after:016x} at txid {plan.txid} ({objects} objects)",
    )


def _txids(parsed: _format.SnapshotKey | _format.SegmentKey) -> tuple[int, int]:
    if isinstance(parsed, _format.SnapshotKey):
        return parsed.txid, parsed.txid
    return parsed.first_txid, parsed.last_txid


async def _check_object(client: ReplicaClient, key: str, size: int, part_size: int) -> _format.ObjectHeader:
    """Read ``key`` in parts: check its header, body length and body hash."""
    first = await client.get_range(key, 0, min(size, max(part_size, _format.HEADER_SIZE)))
    header = _format.read_header(first, key=key)
    if size != _format.HEADER_SIZE + header.body_length:
        raise CorruptObjectError(
            f"{key}: {size} bytes stored, the header says {_format.HEADER_SIZE + header.body_length}", key=key
        )
    digest = xxhash.xxh3_64()
    digest.update(first[_format.HEADER_SIZE :])
    at = len(first)
    while at < size:
        part = await client.get_range(key, at, min(part_size, size - at))
        if not part:
            raise CorruptObjectError(f"{key}: ends at {at} bytes, {size} listed", key=key)
        await anyio.to_thread.run_sync(digest.update, part)
        at += len(part)
    if digest.intdigest() != header.body_checksum:
        raise CorruptObjectError(
            f"{key}: the body does not match its checksum (damaged in the store)", key=key
        )
    return header
