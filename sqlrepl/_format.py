"""The replica format: object keys, and the bytes of segments and snapshots.

Documented for second readers in docs/format.md; this module is its only
implementation. Version 1.

An object is a 96-byte header followed by a body. The header (big-endian)::

    0   6  magic b"SQLRPL"
    6   1  kind: b"S" snapshot, b"G" segment
    7   1  format version (1)
    8   4  flags: bit 0 = body is zstd (frames of ~1 MiB of records each)
    12  4  page size
    16  8  first txid (a snapshot: its txid)
    24  8  last txid (a snapshot: its txid)
    32  8  timestamp, ms since the Unix epoch, of the capture of the last txid
    40  4  database size in pages after the last txid
    44  4  truncate size: the smallest database size during the range; pages
           above it were dropped before the body's pages were written
    48  4  number of page records in the body
    52  4  reserved, zero
    56  8  body length in bytes, as stored
    64  8  XXH3-64 of the body as stored
    72  8  database checksum before applying (a snapshot: 0)
    80  8  database checksum after applying
    88  8  XXH3-64 of header bytes 0..87

The body, once decompressed, is ``page count`` records of a big-endian u32
page number followed by one page. Page numbers are unique in an object.

The database checksum is the XOR over every page ``p`` of the database (the
lock page at byte 2**30 excluded) of ``XXH3-64(page bytes, seed=p)``, an
all-zero page counting 0 (SQLite reads a page past the end of the file, or
in a hole, as zeros: the checksum must not tell them apart); it is
maintained incrementally by the replicator and recomputed by restore, so a
restore proves it rebuilt exactly the pages the replicator saw.
"""

from __future__ import annotations

import re
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Protocol, cast

import xxhash
import zstandard

from ._errors import CorruptObjectError

__all__ = [
    "HEADER_SIZE",
    "KIND_SEGMENT",
    "KIND_SNAPSHOT",
    "ObjectHeader",
    "ObjectWriter",
    "SegmentKey",
    "SnapshotKey",
    "WriterKey",
    "iter_pages",
    "iter_records",
    "new_generation_id",
    "page_hash",
    "parse_key",
    "parse_writer_key",
    "read_header",
    "segment_key",
    "snapshot_key",
    "writer_key",
]

MAGIC = b"SQLRPL"
VERSION = 1
HEADER_SIZE = 96
KIND_SNAPSHOT = b"S"
KIND_SEGMENT = b"G"
FLAG_ZSTD = 1
_HEADER = struct.Struct(">6scBIIQQQIIIIQQQQ")
assert _HEADER.size == 88
_REC = struct.Struct(">I")
_CHUNK = 1 << 20
_ZSTD_LEVEL = 1


_ZEROS: dict[int, bytes] = {}


def page_hash(pgno: int, page: bytes | memoryview) -> int:
    """This page's term in the database checksum (see the module docstring):
    0 for an all-zero page, which SQLite cannot tell from a page missing at
    the end of the file or in a hole (it reads both as zeros)."""
    zeros = _ZEROS.get(len(page))
    if zeros is None:
        zeros = _ZEROS.setdefault(len(page), bytes(len(page)))
    if page == zeros:
        return 0
    return xxhash.xxh3_64_intdigest(page, seed=pgno)


@dataclass(frozen=True)
class ObjectHeader:
    """A decoded object header. See the module docstring for each field."""

    kind: bytes
    page_size: int
    first_txid: int
    last_txid: int
    timestamp_ms: int
    db_size: int
    truncate_size: int
    page_count: int
    body_length: int
    body_checksum: int
    pre_checksum: int
    post_checksum: int
    flags: int = FLAG_ZSTD

    def pack(self) -> bytes:
        head = _HEADER.pack(
            MAGIC,
            self.kind,
            VERSION,
            self.flags,
            self.page_size,
            self.first_txid,
            self.last_txid,
            self.timestamp_ms,
            self.db_size,
            self.truncate_size,
            self.page_count,
            0,
            self.body_length,
            self.body_checksum,
            self.pre_checksum,
            self.post_checksum,
        )
        return head + struct.pack(">Q", xxhash.xxh3_64_intdigest(head))


def read_header(data: bytes | memoryview, *, key: str = "") -> ObjectHeader:
    """Decode and check an object header (the first :data:`HEADER_SIZE` bytes).

    Raises :class:`CorruptObjectError` naming ``key`` for a short header, a
    bad magic, an unknown version or a header checksum mismatch.
    """
    where = f" ({key})" if key else ""
    if len(data) < HEADER_SIZE:
        raise CorruptObjectError(f"object truncated: {len(data)} bytes, no complete header{where}", key=key)
    head = bytes(data[:88])
    (
        magic,
        kind,
        version,
        flags,
        page_size,
        first,
        last,
        ts,
        db_size,
        trunc,
        count,
        _r,
        blen,
        bck,
        pre,
        post,
    ) = _HEADER.unpack(head)
    if magic != MAGIC:
        raise CorruptObjectError(f"not a sqlrepl object: bad magic {magic!r}{where}", key=key)
    if version != VERSION:
        raise CorruptObjectError(
            f"object format version {version} is not supported by this sqlrepl (reads {VERSION});"
            f" upgrade sqlrepl{where}",
            key=key,
        )
    (hck,) = struct.unpack_from(">Q", data, 88)
    if xxhash.xxh3_64_intdigest(head) != hck:
        raise CorruptObjectError(f"object header checksum mismatch{where}", key=key)
    if kind not in (KIND_SNAPSHOT, KIND_SEGMENT) or page_size < 512 or page_size > 65536:
        raise CorruptObjectError(f"object header has impossible values{where}", key=key)
    return ObjectHeader(kind, page_size, first, last, ts, db_size, trunc, count, blen, bck, pre, post, flags)


class ObjectWriter:
    """Streams page records into an object file.

    ``add`` pages, then ``finish`` with the header fields: the body is written
    as it grows (bounded memory) and the header, known only at the end, is
    written last over a placeholder. The caller makes the file durable.
    """

    def __init__(self, out: IO[bytes], page_size: int) -> None:
        self._out = out
        self._page_size = page_size
        self._count = 0
        self._buf = bytearray()
        self._hash = xxhash.xxh3_64()
        self._length = 0
        self._zstd = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        out.write(b"\0" * HEADER_SIZE)

    @property
    def page_count(self) -> int:
        return self._count

    def add(self, pgno: int, page: bytes | memoryview) -> None:
        if len(page) != self._page_size:
            raise ValueError(f"page {pgno} is {len(page)} bytes, expected {self._page_size}")
        self._buf += _REC.pack(pgno)
        self._buf += page
        self._count += 1
        if len(self._buf) >= _CHUNK:
            self._frame()

    def _frame(self) -> None:
        # One zstd frame per chunk of whole records, its content size in its
        # header (docs/format.md): frames that can be read on their own.
        data = self._zstd.compress(self._buf)
        self._buf.clear()
        self._out.write(data)
        self._hash.update(data)
        self._length += len(data)

    def finish(
        self,
        *,
        kind: bytes,
        first_txid: int,
        last_txid: int,
        timestamp_ms: int,
        db_size: int,
        truncate_size: int,
        pre_checksum: int,
        post_checksum: int,
    ) -> ObjectHeader:
        if self._buf or not self._length:
            self._frame()  # (an empty body is one empty frame)
        header = ObjectHeader(
            kind=kind,
            page_size=self._page_size,
            first_txid=first_txid,
            last_txid=last_txid,
            timestamp_ms=timestamp_ms,
            db_size=db_size,
            truncate_size=truncate_size,
            page_count=self._count,
            body_length=self._length,
            body_checksum=self._hash.intdigest(),
            pre_checksum=pre_checksum,
            post_checksum=post_checksum,
        )
        end = self._out.tell()
        self._out.seek(0)
        self._out.write(header.pack())
        self._out.seek(end)
        return header


class Readable(Protocol):
    """Anything with a blocking ``read`` (a file, a stream of parts)."""

    def read(self, size: int = -1, /) -> bytes | memoryview: ...


class _HashingReader:
    """A read-only file wrapper that hashes and counts what passes through."""

    def __init__(self, raw: Readable, limit: int) -> None:
        self._raw = raw
        self._left = limit
        self.hash = xxhash.xxh3_64()
        self.count = 0

    def read(self, size: int = -1) -> bytes | memoryview:
        if size < 0 or size > self._left:
            size = self._left
        data = self._raw.read(size)
        self._left -= len(data)
        self.count += len(data)
        self.hash.update(data)
        return data

    def readable(self) -> bool:
        return True


def iter_pages(header: ObjectHeader, body: Readable, *, key: str = "") -> Iterator[tuple[int, bytes]]:
    """Yield ``(page number, page)`` from an object's body read from ``body``
    (positioned just after the header), in stored order, with bounded memory.

    The body's length and checksum are verified when the last record has been
    read, before the generator finishes: a consumer must treat pages as
    provisional until iteration ends without :class:`CorruptObjectError`
    (restore writes into a temporary file for exactly this reason).
    """
    rec = 4 + header.page_size
    for chunk in iter_records(header, body, key=key):
        view = memoryview(chunk)
        for off in range(0, len(chunk), rec):
            (pgno,) = _REC.unpack_from(view, off)
            yield pgno, bytes(view[off + 4 : off + rec])


def iter_records(header: ObjectHeader, body: Readable, *, key: str = "") -> Iterator[bytes | memoryview]:
    """Yield an object's page records (see :func:`iter_pages`) in chunks of
    about 1 MiB, each a whole number of records: ``4 + page size`` bytes
    apiece, a big-endian page number and then the page. For readers that
    handle many pages at once; the same checks, at the same point.
    """
    where = f" ({key})" if key else ""
    rec = 4 + header.page_size
    expected = header.page_count * rec
    reader = _HashingReader(body, header.body_length)
    produced = 0
    carry = b""  # the start of a record cut by the end of a piece
    try:
        if header.flags & FLAG_ZSTD:
            # _HashingReader has the read() that stream_reader uses, not all of IO.
            source = cast(IO[bytes], reader)
            stream: Readable = zstandard.ZstdDecompressor().stream_reader(
                source, read_size=_CHUNK, read_across_frames=True
            )
        else:
            stream = reader
        size = max(1, _CHUNK // rec) * rec  # whole records: no record is cut...
        while piece := stream.read(size):  # ...unless a read comes back short
            produced += len(piece)
            if produced > expected:
                raise CorruptObjectError(f"object body has data after its last page{where}", key=key)
            view = memoryview(piece)
            if carry:
                need = rec - len(carry)
                carry += bytes(view[:need])
                view = view[need:]
                if len(carry) < rec:
                    continue
                yield carry
                carry = b""
            whole = len(view) - len(view) % rec
            if whole:
                yield view[:whole]
            carry = bytes(view[whole:])
    except zstandard.ZstdError as exc:
        raise CorruptObjectError(f"object body does not decompress: {exc}{where}", key=key) from exc
    if produced < expected:
        raise CorruptObjectError(
            f"object truncated: body ends after {produced // rec} of {header.page_count} pages{where}",
            key=key,
        )
    while reader.read(_CHUNK):
        pass
    if reader.count != header.body_length:
        raise CorruptObjectError(
            f"object truncated: body is {reader.count} bytes, header says {header.body_length}{where}",
            key=key,
        )
    if reader.hash.intdigest() != header.body_checksum:
        raise CorruptObjectError(f"object body checksum mismatch{where}", key=key)


# ---- keys ---------------------------------------------------------------

GENERATIONS = "generations/"
_GEN_RE = r"\d{8}T\d{6}\d{3}Z-[0-9a-f]{6}"
_SNAPSHOT_RE = re.compile(
    rf"^generations/(?P<gen>{_GEN_RE})/snapshots/(?P<txid>[0-9a-f]{{16}})-(?P<ts>\d+)\.snapshot$"
)
_SEGMENT_RE = re.compile(
    rf"^generations/(?P<gen>{_GEN_RE})/segments/(?P<first>[0-9a-f]{{16}})-(?P<last>[0-9a-f]{{16}})-(?P<ts>\d+)\.segment$"
)


# Writer records (docs/format.md, "Writer records"), beside the
# generations: not part of any history; restoring never reads them.
WRITERS = "writers/"
_WRITER_RE = re.compile(
    rf"^writers/(?P<gen>{_GEN_RE})/(?P<writer>[0-9a-f]{{16}})-(?P<since>\d+)-(?P<written>\d+)\.json$"
)


@dataclass(frozen=True, order=True)
class SnapshotKey:
    generation: str
    txid: int
    timestamp_ms: int

    @property
    def key(self) -> str:
        return snapshot_key(self.generation, self.txid, self.timestamp_ms)


@dataclass(frozen=True, order=True)
class SegmentKey:
    generation: str
    first_txid: int
    last_txid: int
    timestamp_ms: int

    @property
    def key(self) -> str:
        return segment_key(self.generation, self.first_txid, self.last_txid, self.timestamp_ms)


def new_generation_id(now: float | None = None) -> str:
    """A new generation id: UTC time to the millisecond, then random bits.

    Ids sort in creation order (to the millisecond, on one clock).
    """
    now = time.time() if now is None else now
    ms = int(now * 1000) % 1000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{ms:03d}Z-" + secrets.token_hex(3)


def snapshot_key(generation: str, txid: int, timestamp_ms: int) -> str:
    return f"{GENERATIONS}{generation}/snapshots/{txid:016x}-{timestamp_ms}.snapshot"


def segment_key(generation: str, first_txid: int, last_txid: int, timestamp_ms: int) -> str:
    return f"{GENERATIONS}{generation}/segments/{first_txid:016x}-{last_txid:016x}-{timestamp_ms}.segment"


@dataclass(frozen=True, order=True)
class WriterKey:
    """A writer record: ``writer`` writes ``generation`` to this replica
    since ``since_ms``; the record was last written at ``written_ms``."""

    generation: str
    writer: str
    since_ms: int
    written_ms: int

    @property
    def key(self) -> str:
        return writer_key(self.generation, self.writer, self.since_ms, self.written_ms)


def writer_key(generation: str, writer: str, since_ms: int, written_ms: int) -> str:
    return f"{WRITERS}{generation}/{writer}-{since_ms}-{written_ms}.json"


def parse_writer_key(key: str) -> WriterKey | None:
    """The writer record a key names, or ``None`` for any other key."""
    if m := _WRITER_RE.match(key):
        return WriterKey(m["gen"], m["writer"], int(m["since"]), int(m["written"]))
    return None


def parse_key(key: str) -> SnapshotKey | SegmentKey | None:
    """The snapshot or segment a key names, or ``None`` for any other key."""
    if m := _SEGMENT_RE.match(key):
        return SegmentKey(m["gen"], int(m["first"], 16), int(m["last"], 16), int(m["ts"]))
    if m := _SNAPSHOT_RE.match(key):
        return SnapshotKey(m["gen"], int(m["txid"], 16), int(m["ts"]))
    return None
