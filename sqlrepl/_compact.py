"""Compaction: many consecutive segments merged into one.

A replica that receives one small segment per sync interval would hold
tens of thousands of them after a quiet day, and a restore would read them
all. The replicator therefore keeps the segments it has uploaded for a while
(``compaction_interval``, in the staging folder) and merges them into one
segment covering the same transactions, which it uploads beside them. A
restore's plan prefers the longest segment that continues its chain, so it
reads the merged one; retention later deletes the small ones once a merged
segment covers them and they are older than ``segment_retention``.

Merging is local (no GET): the page of each number that survives is the one
from the newest segment, a page cut off by a shrink is dropped, and the
merged segment's truncate size is the smallest of its parts'. Its database
checksums are the first part's "before" and the last part's "after"; a
restore recomputes and checks them, so a merge bug cannot pass unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from . import _format
from ._errors import CorruptObjectError
from ._format import HEADER_SIZE, ObjectHeader, ObjectWriter, read_header

__all__ = ["merge_segments"]


def merge_segments(paths: Sequence[str], out: IO[bytes]) -> ObjectHeader:
    """Merge the segment files ``paths`` (consecutive, in order) into ``out``.

    Holds the surviving pages in memory: the caller bounds the total page
    bytes of what it merges. Raises :class:`CorruptObjectError` if the parts
    do not chain (txids or checksums) or fail their own checks.
    """
    if len(paths) < 2:
        raise ValueError("merging needs at least two segments")
    pages: dict[int, bytes] = {}
    first: ObjectHeader | None = None
    last: ObjectHeader | None = None
    truncate = 0
    for path in paths:
        with open(path, "rb") as f:
            header = read_header(f.read(HEADER_SIZE), key=path)
            if header.kind != _format.KIND_SEGMENT:
                raise CorruptObjectError(f"not a segment: {path}", key=path)
            if last is not None and (
                header.first_txid != last.last_txid + 1
                or header.pre_checksum != last.post_checksum
                or header.page_size != last.page_size
            ):
                raise CorruptObjectError(
                    f"segments do not chain: {path} after txid {last.last_txid}", key=path
                )
            truncate = header.truncate_size if first is None else min(truncate, header.truncate_size)
            for pgno in [p for p in pages if p > header.truncate_size]:
                del pages[pgno]
            for pgno, page in _format.iter_pages(header, f, key=path):
                pages[pgno] = page
            first = first or header
            last = header
    assert first is not None
    assert last is not None
    writer = ObjectWriter(out, last.page_size)
    for pgno in sorted(pages):
        if pgno <= last.db_size:
            writer.add(pgno, pages[pgno])
    return writer.finish(
        kind=_format.KIND_SEGMENT,
        first_txid=first.first_txid,
        last_txid=last.last_txid,
        timestamp_ms=last.timestamp_ms,
        db_size=last.db_size,
        truncate_size=min(truncate, last.db_size),
        pre_checksum=first.pre_checksum,
        post_checksum=last.post_checksum,
    )
