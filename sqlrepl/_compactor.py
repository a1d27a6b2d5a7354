"""The compactor: uploaded small segments wait in the staging folder's
``window/`` for ``compaction_interval``, then are merged locally into
segments staged for every replica (no merged segment spans a snapshot: see
``_lifecycle.compaction_runs``).

It also ends a staged object's life (:meth:`Compactor.collect`): once no
replica needs it, it is deleted, or moved into the window when it belongs
there. It owns the window; it changes the queue only to add merged segments
and drop collected objects, on the loop.
"""

from __future__ import annotations

import logging
import os

import anyio
import anyio.to_thread

from . import _format
from ._compact import merge_segments
from ._errors import CorruptObjectError
from ._lifecycle import compaction_runs
from ._queue import SEGMENT, StagedObject
from ._staging import Staging
from ._state import LoopState

__all__ = ["Compactor", "stage_merged"]

log = logging.getLogger("sqlrepl")


def stage_merged(staging: Staging, parts: list[StagedObject], root: str | None) -> str:
    """Merge the consecutive segments ``parts`` into one staged object (in
    ``root``; default: the objects to upload) and return its key. Blocking."""
    with staging.temp_object() as (f, finish):
        header = merge_segments([o.path for o in parts], f)
        key = _format.segment_key(
            parts[0].generation, header.first_txid, header.last_txid, header.timestamp_ms
        )
        finish(key, root)
    return key


class Compactor:
    """The compaction window and the end of staged objects."""

    def __init__(self, st: LoopState) -> None:
        self.st = st
        self.window: list[StagedObject] = []

    def load(self) -> None:
        """Take the window a previous run left in the staging folder."""
        staging = self.st.staging
        window = [staging.staged_object(k, staging.window) for k in staging.staged_keys(staging.window)]
        self.window = sorted((o for o in window if o is not None), key=lambda o: o.order)

    def collect(self) -> None:
        """Delete staged objects no replica needs any more; keep uploaded
        small segments of the current generation for compaction."""
        st = self.st
        gone = st.queue.unneeded(st.replicas, st.generation)
        if not gone:
            return
        for obj in gone:
            st.progress.dropped(obj.key)  # progress hook
            if not self._to_window(obj):
                st.staging.remove_object(obj.key, st.staging.compacted if obj.compacted else None)
            for r in st.replicas:
                r.uploaded.discard(obj.key)
        ids = {id(o) for o in gone}
        st.queue.objects = [o for o in st.queue.objects if id(o) not in ids]

    def _to_window(self, obj: StagedObject) -> bool:
        """Move an uploaded segment into the compaction window, if it belongs
        there. False if the caller should delete it."""
        st = self.st
        opts = st.options
        if (
            opts.compaction_interval is None
            or st.space_short
            or obj.kind != SEGMENT
            or obj.compacted
            or obj.generation != st.generation
            or not all(r.generation == obj.generation and obj.key in r.uploaded for r in st.replicas)
        ):
            return False
        try:
            with open(obj.path, "rb") as f:
                header = _format.read_header(f.read(_format.HEADER_SIZE), key=obj.key)
        except (OSError, CorruptObjectError):
            return False
        obj.page_bytes = header.page_count * header.page_size
        if obj.page_bytes > opts.compaction_max_bytes // 4:
            return False  # a big segment restores fast as it is
        if self.window and self.window[-1].last + 1 != obj.first:
            self.drop_window()  # not a chain (after a resync): start again
        path = st.staging.object_path(obj.key, st.staging.window)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(obj.path, path)
        obj.path = path
        self.window.append(obj)
        return True

    def drop_window(self) -> None:
        for obj in self.window:
            self.st.staging.remove_object(obj.key, self.st.staging.window)
        self.window = []

    def due(self) -> bool:
        st = self.st
        opts = st.options
        if not self.window or opts.compaction_interval is None:
            return False
        if self.window[0].generation != st.generation:
            self.drop_window()
            return False
        if sum(o.page_bytes for o in self.window) >= opts.compaction_max_bytes:
            return True
        return opts.clock() * 1000 - self.window[0].timestamp_ms >= opts.compaction_interval * 1000

    async def compact(self, snapshot_txids: list[int]) -> None:
        """Merge the window into segments staged for every replica: one per
        run between the snapshots at ``snapshot_txids``."""
        st = self.st
        window, self.window = self.window, []
        runs = compaction_runs([(o.first, o.last) for o in window], snapshot_txids)
        for run in ([window[i] for i in idx] for idx in runs if len(idx) >= 2):
            with st.cond:
                st.compactions += 1
            try:
                key = await anyio.to_thread.run_sync(stage_merged, st.staging, run, st.staging.compacted)
            except Exception as exc:  # a bad window is not worth stopping for
                log.error("compaction of txids %d-%d failed: %s", run[0].first, run[-1].last, exc)
                continue
            obj = st.staging.staged_object(key, st.staging.compacted)
            assert obj is not None
            if all(o.key != key for o in st.queue.objects):  # (a crash may have merged it once already)
                st.queue.add(obj)
            st.kick_all()
        for obj in window:
            st.staging.remove_object(obj.key, st.staging.window)
