"""What a follower reads from the replica: which segments come next, which
generation to move to, a generation's newest state restored beside the
copy, and a batch of segments fetched and checked.

:func:`next_step` decides from a listing alone (no I/O); :class:`Feed` does
the requests. Neither touches the copy: that is :mod:`._follow_copy`'s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from . import _format
from ._follow_image import Batch, Image, scan_image
from ._format import SegmentKey
from ._lifecycle import Generation, group_generations
from ._replica import ReplicaClient
from ._restore import restore_async

__all__ = ["BATCH_BYTES", "Feed", "Step", "next_step"]

BATCH_BYTES = 64 << 20  # page bytes held before a batch is committed

Segments = list[tuple[SegmentKey, int]]  # keys and sizes


@dataclass(frozen=True)
class Step:
    """What a follower at some state does after listing every generation:
    ``move_to`` a generation's newest state (``fresh``: because the replica
    has a newer generation, or a re-seed was asked; else because the
    segments after the copy's txid are gone), or apply ``segments`` (the
    ones that continue the copy; none: nothing new)."""

    move_to: Generation | None = None
    fresh: bool = False
    segments: Segments = field(default_factory=list)


def next_step(gens: list[Generation], generation: str, txid: int, *, reseed: bool) -> Step:
    """The :class:`Step` for a copy at ``txid`` of ``generation``, given
    the replica's generations (as :func:`group_generations` makes them)."""
    usable = [g for g in gens if g.snapshots]
    if not usable:
        return Step()
    newest = usable[-1]
    if reseed or newest.id != generation:
        return Step(move_to=newest, fresh=True)
    current = next(g for g in gens if g.id == generation)
    segments = [(k, s) for k, s in current.segments if k.first_txid - 1 <= txid < k.last_txid]
    if not segments and current.last_txid > txid:
        return Step(move_to=current)
    return Step(segments=segments)


class Feed:
    """The follower's requests to ``client``."""

    def __init__(self, client: ReplicaClient) -> None:
        self.client = client

    async def generations(self) -> list[Generation]:
        """Every generation of the replica (one LIST of everything)."""
        return group_generations(await self.client.list(_format.GENERATIONS))

    async def newest_usable(self) -> Generation | None:
        """The newest generation that has a snapshot, if any."""
        usable = [g for g in await self.generations() if g.snapshots]
        return usable[-1] if usable else None

    async def next_segments(self, generation: str, txid: int) -> Segments:
        """The segments that start right after ``txid`` (one LIST of a
        narrow prefix)."""
        prefix = f"{_format.GENERATIONS}{generation}/segments/{txid + 1:016x}-"
        out = []
        for obj in await self.client.list(prefix):
            parsed = _format.parse_key(obj.key)
            if isinstance(parsed, SegmentKey):
                out.append((parsed, obj.size))
        return out

    async def fetch(
        self, image: Image, segments: Segments, *, poll_interval: float, stopping: Callable[[], bool]
    ) -> Batch:
        """A batch on top of ``image``: the newest of ``segments``, then,
        while the replica looks behind (catching up), the ones after it,
        up to :data:`BATCH_BYTES` of pages or until ``stopping()``. Each is
        checked as it is added (raises :class:`CorruptObjectError`)."""
        batch = Batch(image)
        while segments:
            key, _size = max(segments, key=lambda c: c[0].last_txid)
            data = await self.client.get(key.key)
            await anyio.to_thread.run_sync(batch.apply_segment, data, key.key)
            if batch.held >= BATCH_BYTES or stopping():
                break
            # Another LIST only while catching up: a segment captured more
            # than two polls ago says more are likely waiting.
            if key.timestamp_ms > (time.time() - 2 * poll_interval) * 1000:
                break
            segments = await self.next_segments(image.generation, batch.txid)
        return batch

    async def restore_to(self, path: str, generation: str | None) -> Image | None:
        """Restore the newest state (of ``generation``) into ``path``, a
        fresh file in the staging folder; its image (page 1 logical), or
        ``None`` if the replica holds no such state."""

        def clear() -> None:
            shutil.rmtree(path + "-sqlrepl", ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        await anyio.to_thread.run_sync(clear)
        result = await restore_async(path, self.client, generation=generation, if_replica_exists=True)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(path + "-sqlrepl", ignore_errors=True))
        if result is None:
            return None
        return await anyio.to_thread.run_sync(
            scan_image, path, result.generation, result.txid, result.timestamp_ms
        )
