"""The object format on its own: how bodies are written and read back, and
the restore's applier on objects made here (no replicator, no store)."""

from __future__ import annotations

import io
import os
import random
import struct
from pathlib import Path

import pytest
import xxhash
import zstandard

import sqlrepl
from sqlrepl import _format, _restore
from sqlrepl._format import HEADER_SIZE, KIND_SNAPSHOT, ObjectWriter, page_hash

PS = 4096


def _pages(n: int, seed: int = 1) -> list[tuple[int, bytes]]:
    """``n`` pages 1..n: half text (compresses), half random bytes."""
    rng = random.Random(seed)
    return [(p, (rng.randbytes(PS // 4).hex() + "x" * PS)[:PS].encode()) for p in range(1, n + 1)]


def _snapshot(pages: list[tuple[int, bytes]], db_size: int | None = None) -> bytes:
    out = io.BytesIO()
    w = ObjectWriter(out, PS)
    checksum = 0
    for pgno, page in pages:
        w.add(pgno, page)
        checksum ^= page_hash(pgno, page)
    w.finish(
        kind=KIND_SNAPSHOT,
        first_txid=1,
        last_txid=1,
        timestamp_ms=0,
        db_size=db_size if db_size is not None else len(pages),
        truncate_size=0,
        pre_checksum=0,
        post_checksum=checksum,
    )
    return out.getvalue()


def _frames(body: bytes) -> list[int]:
    """Content size of each zstd frame in ``body``."""
    sizes = []
    while body:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        sizes.append(len(dobj.decompress(body)))
        body = dobj.unused_data
    return sizes


class _Trickle:
    """A reader that never returns more than ``step`` bytes at once, as a
    download arriving in parts can."""

    def __init__(self, data: bytes, step: int) -> None:
        self._f = io.BytesIO(data)
        self._step = step

    def read(self, size: int = -1) -> bytes:
        return self._f.read(self._step if size < 0 else min(size, self._step))


def test_a_body_is_frames_of_whole_records_that_read_back() -> None:
    """Each ~1 MiB of records is its own zstd frame (independent, its size in
    its header); the body reads back page for page, in chunks of whole records."""
    pages = _pages(700)  # ~2.8 MiB of records: three frames
    obj = _snapshot(pages)
    header = _format.read_header(obj[:HEADER_SIZE])
    body = obj[HEADER_SIZE:]
    sizes = _frames(body)
    assert len(sizes) == 3, sizes
    assert all(size % (4 + PS) == 0 for size in sizes)
    assert zstandard.get_frame_parameters(body).content_size == sizes[0]
    assert list(_format.iter_pages(header, io.BytesIO(body))) == pages
    chunks = list(_format.iter_records(header, io.BytesIO(body)))
    assert all(len(c) % (4 + PS) == 0 for c in chunks)
    assert sum(len(c) for c in chunks) == 700 * (4 + PS)


def test_an_empty_body_is_one_empty_frame() -> None:
    obj = _snapshot([], db_size=0)
    header = _format.read_header(obj[:HEADER_SIZE])
    assert header.page_count == 0
    assert _frames(obj[HEADER_SIZE:]) == [0]
    assert list(_format.iter_pages(header, io.BytesIO(obj[HEADER_SIZE:]))) == []


def _uncompressed(pages: list[tuple[int, bytes]]) -> bytes:
    """The same object with flag bit 0 clear: records stored as they are."""
    body = b"".join(struct.pack(">I", p) + page for p, page in pages)
    checksum = 0
    for pgno, page in pages:
        checksum ^= page_hash(pgno, page)
    header = _format.ObjectHeader(
        kind=KIND_SNAPSHOT,
        page_size=PS,
        first_txid=1,
        last_txid=1,
        timestamp_ms=0,
        db_size=len(pages),
        truncate_size=0,
        page_count=len(pages),
        body_length=len(body),
        body_checksum=xxhash.xxh3_64_intdigest(body),
        pre_checksum=0,
        post_checksum=checksum,
        flags=0,
    )
    return header.pack() + body


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("step", [1000, 4099, 65536])
def test_short_reads_are_put_back_together(compressed: bool, step: int) -> None:
    """Records cut across reads (a stored body read in odd pieces) come out whole."""
    pages = _pages(300)
    obj = _snapshot(pages) if compressed else _uncompressed(pages)
    header = _format.read_header(obj[:HEADER_SIZE])
    assert list(_format.iter_pages(header, _Trickle(obj[HEADER_SIZE:], step))) == pages


def _apply(tmp_path: Path, obj: bytes) -> bytes:
    path = tmp_path / "applied.db"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        applier = _restore._Applier(fd)
        applier.apply(_Trickle(obj, 1 << 20), "the-key", len(obj))
        applier.finish()
    finally:
        os.close(fd)
    return path.read_bytes()


def test_the_applier_writes_every_page_in_place(tmp_path: Path) -> None:
    """Pages in any order, with gaps in their numbers, land at their offsets."""
    pages = _pages(600)
    shuffled = pages[300:] + pages[:300]
    shuffled = [pg for pg in shuffled if pg[0] % 7]  # holes: never written, read as zeros
    data = _apply(tmp_path, _snapshot(shuffled, db_size=600))
    assert len(data) == 600 * PS
    for pgno, page in pages:
        assert data[(pgno - 1) * PS : pgno * PS] == (page if pgno % 7 else bytes(PS))


def test_a_page_outside_the_database_fails_the_apply(tmp_path: Path) -> None:
    """A page number past the database, deep in a body (well after the
    first chunk), is a CorruptObjectError naming the object, not a hang."""
    pages = _pages(600)
    pages[550] = (601, pages[550][1])
    with pytest.raises(sqlrepl.CorruptObjectError, match=r"page 601 outside the database \(the-key\)"):
        _apply(tmp_path, _snapshot(pages, db_size=600))


def test_a_wrong_checksum_fails_the_apply(tmp_path: Path) -> None:
    obj = bytearray(_snapshot(_pages(10)))
    header = _format.read_header(bytes(obj[:HEADER_SIZE]))
    bad = _format.ObjectHeader(**{**header.__dict__, "post_checksum": header.post_checksum ^ 1})
    obj[:HEADER_SIZE] = bad.pack()
    with pytest.raises(sqlrepl.CorruptObjectError, match="database checksum"):
        _apply(tmp_path, bytes(obj))


def test_records_past_the_page_count_are_refused() -> None:
    """A body holding more records than its header counts is corrupt."""
    pages = _pages(20)
    obj = _uncompressed(pages)
    header = _format.read_header(obj[:HEADER_SIZE])
    fewer = _format.ObjectHeader(**{**header.__dict__, "page_count": 19})
    with pytest.raises(sqlrepl.CorruptObjectError, match="after its last page"):
        list(_format.iter_pages(fewer, io.BytesIO(obj[HEADER_SIZE:])))
