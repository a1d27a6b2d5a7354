"""A followed copy's state in memory, and a batch of changes on top of it.

An :class:`Image` is what the follower knows of the committed state of its
copy: the primary's generation and txid it holds, and a hash per page whose
XOR is the database checksum of docs/format.md. A :class:`Batch` collects
new pages (from segments, or from a restored state) on top of an image and
keeps the checksum as they are added, so every segment is checked exactly
as a restore checks it before anything reaches the copy.

The checksum is kept over the *logical* pages: page 1 as the primary wrote
it, before the follower's header changes (see :func:`physical_page1`).
"""

from __future__ import annotations

import array
import io
import os
import struct
from dataclasses import dataclass
from typing import Any

from . import _format
from ._errors import CorruptObjectError
from ._format import HEADER_SIZE, page_hash, read_header
from ._wal import lock_page

__all__ = [
    "FROM_SOURCE",
    "RUN_PAGES",
    "Batch",
    "Image",
    "batch_towards",
    "logical_page1",
    "page1_fields",
    "physical_page1",
    "scan_hashes",
    "scan_image",
]

RUN_PAGES = 256  # pages read or written in one system call

FROM_SOURCE = b""  # a page to be read from the batch's source file


def page1_fields(page1: bytes | memoryview) -> bytes:
    """The header bytes of page 1 the follower rewrites on its copy (journal
    mode, change counter, in-header size, version-valid-for), as the primary
    wrote them."""
    return bytes(page1[18:20]) + bytes(page1[24:32]) + bytes(page1[92:96])


def logical_page1(page1: bytes | memoryview, fields: bytes) -> bytes:
    """Page 1 as the primary wrote it, from the follower's copy of it."""
    out = bytearray(page1)
    out[18:20] = fields[0:2]
    out[24:32] = fields[2:10]
    out[92:96] = fields[10:14]
    return bytes(out)


def physical_page1(page1: bytes | memoryview, counter: int, size: int) -> bytes:
    """Page 1 as the follower's copy holds it: rollback-journal mode, its
    own change counter (valid for the in-header size), the copy's size."""
    out = bytearray(page1)
    out[18] = out[19] = 1
    struct.pack_into(">II", out, 24, counter, size)
    struct.pack_into(">I", out, 92, counter)
    return bytes(out)


@dataclass
class Image:
    """The committed state of the copy, as the follower knows it."""

    generation: str
    txid: int
    timestamp_ms: int
    page_size: int
    size: int
    hashes: array.array[int]  # per page, page 1 over its logical content
    checksum: int
    fields: bytes
    counter: int

    def describe(self) -> dict[str, Any]:
        """The image as recorded in ``follow.json`` (without the hashes,
        which a restart recomputes from the file)."""
        return {
            "generation": self.generation,
            "txid": self.txid,
            "timestamp_ms": self.timestamp_ms,
            "page_size": self.page_size,
            "size": self.size,
            "checksum": self.checksum,
            "fields": self.fields.hex(),
        }


def scan_hashes(fd: int, page_size: int, size: int) -> array.array[int]:
    """The hash of each of the first ``size`` pages of the file open as
    ``fd`` (0 for the lock page), page 1 as it is in the file."""
    hashes = array.array("Q", bytes(8 * size))
    skip = lock_page(page_size)
    step = RUN_PAGES * page_size
    for start in range(0, size * page_size, step):
        data = os.pread(fd, step, start)
        view = memoryview(data)
        for i in range(0, len(data) // page_size):
            p = start // page_size + i + 1
            if p <= size and p != skip:
                hashes[p - 1] = page_hash(p, view[i * page_size : (i + 1) * page_size])
    return hashes


def scan_image(path: str, generation: str, txid: int, timestamp_ms: int) -> Image:
    """The image of a database file as the primary wrote it (a restored
    one), holding ``generation`` at ``txid``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        page1 = os.pread(fd, 100, 0)
        page_size = struct.unpack_from(">H", page1, 16)[0] or 65536
        size = os.fstat(fd).st_size // page_size
        hashes = scan_hashes(fd, page_size, size)
    finally:
        os.close(fd)
    checksum = 0
    for h in hashes:
        checksum ^= h
    return Image(generation, txid, timestamp_ms, page_size, size, hashes, checksum, page1_fields(page1), 0)


class Batch:
    """Changes on top of an :class:`Image`, held until committed: page
    number -> new content (``None``: zeros; ``FROM_SOURCE``: read it from
    ``source``), with the checksum kept as they are added."""

    def __init__(self, image: Image, source: int | None = None, page_size: int | None = None) -> None:
        self.image = image
        self.source = source
        self.page_size = page_size or image.page_size
        self.pages: dict[int, bytes | None] = {}
        self.hashes: dict[int, int] = {}
        self.size = image.size
        self.checksum = image.checksum
        self.fields = image.fields
        self.generation = image.generation
        self.txid = image.txid
        self.timestamp_ms = image.timestamp_ms
        self.held = 0
        self.objects = 0

    def hash_of(self, pgno: int) -> int:
        h = self.hashes.get(pgno)
        if h is not None:
            return h
        hashes = self.image.hashes
        return hashes[pgno - 1] if pgno <= len(hashes) else 0

    def set(self, pgno: int, page: bytes | None, h: int | None = None) -> None:
        if h is None:
            h = page_hash(pgno, page) if page is not None else 0
        self.checksum ^= self.hash_of(pgno) ^ h
        self.hashes[pgno] = h
        self.pages[pgno] = page
        if page:
            self.held += len(page)
            if pgno == 1:
                self.fields = page1_fields(page)

    def apply_segment(self, data: bytes, key: str) -> None:
        """Add one segment (the whole object ``data``). It may start before
        the current state (a merged segment that covers it): its pages are
        the state after its last txid either way, and the result is checked
        against its "after" checksum. Raises :class:`CorruptObjectError`."""
        header = read_header(data[:HEADER_SIZE], key=key)
        if len(data) != HEADER_SIZE + header.body_length:
            raise CorruptObjectError(f"object truncated or padded ({key})", key=key)
        if header.kind != _format.KIND_SEGMENT or header.page_size != self.page_size:
            raise CorruptObjectError(f"not a segment of this database's page size ({key})", key=key)
        if not header.first_txid - 1 <= self.txid < header.last_txid:
            raise CorruptObjectError(f"segment does not continue txid {self.txid} ({key})", key=key)
        if header.first_txid - 1 == self.txid and header.pre_checksum != self.checksum:
            raise CorruptObjectError(
                f"segment does not continue the copy (pre-checksum mismatch) ({key})", key=key
            )
        skip = lock_page(self.page_size)
        for p in range(header.truncate_size + 1, self.size + 1):
            if p != skip and (self.hash_of(p) or p in self.pages):
                self.set(p, None)
        for pgno, page in _format.iter_pages(header, io.BytesIO(data[HEADER_SIZE:]), key=key):
            if pgno < 1 or pgno > header.db_size or pgno == skip:
                raise CorruptObjectError(f"page {pgno} outside the database ({key})", key=key)
            self.set(pgno, page)
        for p in range(header.db_size + 1, self.size + 1):
            if self.hash_of(p) or p in self.pages:
                self.set(p, None)
        self.size = header.db_size
        if self.checksum != header.post_checksum:
            raise CorruptObjectError(f"copy does not match the segment's database checksum ({key})", key=key)
        self.txid, self.timestamp_ms = header.last_txid, header.timestamp_ms
        self.objects += 1

    def page(self, pgno: int) -> bytes:
        data = self.pages[pgno]
        if data is None:
            return bytes(self.page_size)
        if data is FROM_SOURCE:
            assert self.source is not None
            data = os.pread(self.source, self.page_size, (pgno - 1) * self.page_size)
            return data.ljust(self.page_size, b"\0")
        return data


def batch_towards(old: Image, target: Image, source: int) -> Batch:
    """The batch that turns the copy at ``old`` into ``target``, a restored
    state in the file open as ``source``: the pages whose hashes differ
    (every page if the page size changed, and page 1 always)."""
    batch = Batch(old, source=source, page_size=target.page_size)
    same_size_pages = target.page_size == old.page_size
    for p in range(1, target.size + 1):
        h = target.hashes[p - 1]
        if p == 1 or not same_size_pages or batch.hash_of(p) != h or p > old.size:
            batch.set(p, FROM_SOURCE if h else None, h)
    batch.fields = target.fields
    for p in range(target.size + 1, old.size + 1):
        batch.set(p, None, 0)
    batch.size = target.size
    batch.checksum = target.checksum
    batch.hashes = {p: target.hashes[p - 1] for p in range(1, target.size + 1)}
    batch.generation, batch.txid, batch.timestamp_ms = target.generation, target.txid, target.timestamp_ms
    return batch
