"""Reading SQLite's write-ahead log and its wal-index, exactly by the rules.

File format (sqlite.org/fileformat2.html, "The Write-Ahead Log"): a 32-byte
header of big-endian u32s (magic, version, page size, checkpoint sequence,
salt-1, salt-2, checksum-1, checksum-2), then frames of a 24-byte header
(page number, db size after commit or 0, salt-1, salt-2, checksum-1,
checksum-2) and one page. A frame is valid only if its salts match the header
and its checksum matches the checksum chained over the header and every
earlier frame; the magic's low bit says whether the checksum reads the data
as big- or little-endian words. The valid WAL ends at the first invalid frame,
and only frames up to the last valid commit frame are committed.

The wal-index (the ``-shm`` file, sqlite.org/walformat.html) starts with two
copies of a 48-byte header in native byte order: it records ``mxFrame``, the
last committed frame, and the running checksum after it. Reading it costs one
small ``pread`` instead of a checksum pass over every new frame (which runs at
about 40 MB/s in Python; see docs/architecture.md). :func:`read_index_header`
only accepts a header whose two copies agree and whose own checksum is right.

Neither reader raises on a torn or stale tail: that is simply where the valid
WAL ends. They raise :class:`WalFormatError` only for a header that cannot be
a WAL at all when the caller asked for a strict parse.
"""

from __future__ import annotations

import array
import fcntl
import os
import struct
import sys
import threading
from dataclasses import dataclass

__all__ = [
    "DELETED",
    "FRAME_HEADER_SIZE",
    "WAL_HEADER_SIZE",
    "IndexHeader",
    "WalFormatError",
    "WalHeader",
    "WalScan",
    "checkpointer_waiting",
    "checksum",
    "file_replaced",
    "frame_offset",
    "lock_page",
    "long_lived_fd",
    "parse_frame_header",
    "parse_wal_header",
    "read_index_header",
    "scan_wal",
]

WAL_HEADER_SIZE = 32
DELETED = "was deleted"  # how :func:`file_replaced` ends when the path is empty
FRAME_HEADER_SIZE = 24
_MAGIC_LE = 0x377F0682
_MAGIC_BE = 0x377F0683
_VERSION = 3007000
_MASK = 0xFFFFFFFF
_INDEX_HEADER_SIZE = 48
# The wal-index's lock bytes (sqlite.org/walformat.html, "Locks"): the write
# lock at 120, the checkpointer lock at 121, then recovery and the readers'.
_WRITE_LOCK = 120
_CKPT_LOCK = 121
# F_OFD_GETLK (Linux) also reports POSIX locks held by this very process, so
# a checkpoint run by one of the app's own connections is seen; F_GETLK
# elsewhere reports only other processes' locks.
_GETLK = getattr(fcntl, "F_OFD_GETLK", fcntl.F_GETLK)
_FLOCK = "hhqqi4x" if sys.platform.startswith("linux") else "qqihh"
_NATIVE_BIG = sys.byteorder == "big"


class WalFormatError(ValueError):
    """A WAL header that is not a WAL header (bad magic, version or size)."""


@dataclass(frozen=True)
class WalHeader:
    """The 32-byte WAL header, decoded."""

    big_endian_checksum: bool
    page_size: int
    checkpoint_seq: int
    salt: bytes  # salt-1 and salt-2, the 8 raw bytes as stored
    checksum: tuple[int, int]

    @property
    def salt1(self) -> int:
        return int.from_bytes(self.salt[:4], "big")


@dataclass(frozen=True)
class WalScan:
    """What a checksum-verified pass over a WAL found.

    ``commit_frames`` lists, in order, the 1-based index of every valid commit
    frame; ``last_commit`` is the last of them (0 if none), and
    ``last_checksum`` the running checksum after it. Frames after
    ``last_commit`` (uncommitted or invalid) are not reported.
    """

    header: WalHeader | None
    commit_frames: list[int]
    last_commit: int
    last_checksum: tuple[int, int]


@dataclass(frozen=True)
class IndexHeader:
    """The wal-index header from ``-shm``, decoded (only if consistent)."""

    change: int
    page_size: int
    max_frame: int
    n_page: int
    frame_checksum: tuple[int, int]
    salt: bytes
    backfilled: int


def checksum(data: bytes | memoryview, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), chained
    from ``(s0, s1)``."""
    words = array.array("I")
    if words.itemsize != 4:  # pragma: no cover - every platform we run on
        raise RuntimeError("array('I') is not 32-bit here")
    words.frombytes(data)
    if big_endian != _NATIVE_BIG:
        words.byteswap()
    it = iter(words)
    for x, y in zip(it, it, strict=True):
        s0 = (s0 + x + s1) & _MASK
        s1 = (s1 + y + s0) & _MASK
    return s0, s1


def frame_offset(frame: int, page_size: int) -> int:
    """Byte offset of 1-based frame ``frame`` in a WAL of ``page_size`` pages."""
    return WAL_HEADER_SIZE + (frame - 1) * (FRAME_HEADER_SIZE + page_size)


def lock_page(page_size: int) -> int:
    """The page number holding byte 2**30 (the lock byte), which never holds data."""
    return (1 << 30) // page_size + 1


def parse_wal_header(data: bytes, *, strict: bool = False) -> WalHeader | None:
    """Decode a WAL header; ``None`` if it is short or fails its checksum.

    With ``strict``, a header that cannot be a WAL header at all (bad magic,
    version or page size) raises :class:`WalFormatError` instead.
    """
    if len(data) < WAL_HEADER_SIZE:
        return None
    magic, version, page_size, seq = struct.unpack_from(">IIII", data, 0)
    c0, c1 = struct.unpack_from(">II", data, 24)
    if magic not in (_MAGIC_LE, _MAGIC_BE) or version != _VERSION:
        if strict:
            raise WalFormatError(f"bad WAL magic 0x{magic:08x} or version {version}")
        return None
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        if strict:
            raise WalFormatError(f"bad WAL page size {page_size}")
        return None
    big = magic == _MAGIC_BE
    if checksum(data[:24], 0, 0, big) != (c0, c1):
        return None
    return WalHeader(big, page_size, seq, bytes(data[16:24]), (c0, c1))


def parse_frame_header(data: bytes | memoryview, offset: int = 0) -> tuple[int, int, bytes, int, int]:
    """``(page number, commit size, salt bytes, checksum-1, checksum-2)`` of
    the frame header at ``offset``."""
    pgno, commit, c0, c1 = struct.unpack_from(">II8xII", data, offset)
    return pgno, commit, bytes(data[offset + 8 : offset + 16]), c0, c1


def scan_wal(data: bytes | memoryview) -> WalScan:
    """Verify a whole WAL image frame by frame (header checksum, salts, chained
    frame checksums) and report its committed frames.

    Stops at the first invalid or incomplete frame without raising. Costs a
    checksum pass over every byte: for tests and the capture benchmark. The
    replicator never calls it: it reads the wal-index instead (and retries
    while that is unreadable), it does not fall back to a scan.
    """
    header = parse_wal_header(bytes(data[:WAL_HEADER_SIZE]))
    if header is None:
        return WalScan(None, [], 0, (0, 0))
    ps = header.page_size
    big = header.big_endian_checksum
    s0, s1 = header.checksum
    commits: list[int] = []
    last_commit, last_ck = 0, (0, 0)
    view = memoryview(data)
    frame = 0
    off = WAL_HEADER_SIZE
    while off + FRAME_HEADER_SIZE + ps <= len(view):
        pgno, commit, salt, c0, c1 = parse_frame_header(view, off)
        if salt != header.salt or pgno == 0:
            break
        s0, s1 = checksum(view[off : off + 8], s0, s1, big)
        s0, s1 = checksum(view[off + FRAME_HEADER_SIZE : off + FRAME_HEADER_SIZE + ps], s0, s1, big)
        if (s0, s1) != (c0, c1):
            break
        frame += 1
        if commit:
            commits.append(frame)
            last_commit, last_ck = frame, (s0, s1)
        off += FRAME_HEADER_SIZE + ps
    return WalScan(header, commits, last_commit, last_ck)


def _index_checksum(data: bytes) -> tuple[int, int]:
    # The wal-index header checksum is computed over native-order words.
    return checksum(data[:40], 0, 0, _NATIVE_BIG)


def read_index_header(fd: int) -> IndexHeader | None:
    """Read the wal-index header from an open ``-shm`` descriptor.

    Returns ``None`` when the index is absent, uninitialised or being
    rewritten at this instant (the two copies differ or the checksum is
    wrong): the caller retries. (The capture retries for a while, then
    reports :class:`~sqlrepl._livewal.CaptureRetry`; it has no fallback that
    scans the WAL.)
    """
    try:
        raw = os.pread(fd, 136, 0)
    except OSError:
        return None
    if len(raw) < 136:
        return None
    first, second = raw[:_INDEX_HEADER_SIZE], raw[_INDEX_HEADER_SIZE : 2 * _INDEX_HEADER_SIZE]
    if first != second:
        return None
    (version, _unused, change, is_init, _big, page_size, mx, n_page, fc0, fc1) = struct.unpack_from(
        "=IIIBBHIIII", first, 0
    )
    ck = struct.unpack_from("=II", first, 40)
    if not is_init or version != _VERSION or _index_checksum(first) != ck:
        return None
    (backfilled,) = struct.unpack_from("=I", raw, 96)
    return IndexHeader(
        change=change,
        page_size=65536 if page_size == 1 else page_size,
        max_frame=mx,
        n_page=n_page,
        frame_checksum=(fc0, fc1),
        salt=bytes(first[32:40]),
        backfilled=backfilled,
    )


def _locked(fd: int, byte: int) -> bool:
    """Would a write lock on ``byte`` conflict with someone's lock?"""
    linux = _FLOCK == "hhqqi4x"
    fields = (fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0) if linux else (byte, 1, 0, fcntl.F_WRLCK, os.SEEK_SET)
    out = struct.unpack(_FLOCK, fcntl.fcntl(fd, _GETLK, struct.pack(_FLOCK, *fields)))
    return int(out[0] if linux else out[3]) != fcntl.F_UNLCK


def checkpointer_waiting(fd: int) -> bool:
    """Does a connection hold both the write lock and the checkpointer lock
    of the wal-index open on ``fd`` (``-shm``)? That is a FULL, RESTART or
    TRUNCATE checkpoint under way: it takes the write lock first, then waits
    (in its busy handler, with every writer queued behind it) for readers
    that hold back its checkpoint or the WAL's restart.

    Only asks whether the locks could be taken; takes none, so it is safe on
    a long-lived descriptor. A writer committing while a PASSIVE checkpoint
    runs also holds both for a moment: the caller must tolerate that.
    False if the locks cannot be queried.
    """
    try:
        return _locked(fd, _WRITE_LOCK) and _locked(fd, _CKPT_LOCK)
    except OSError:
        return False


def file_replaced(path: str, fd: int) -> str | None:
    """How the file at ``path`` is no longer the one ``fd`` is open on
    (deleted, or another file put there), or ``None`` if it still is.

    Compares device and inode of the path (``stat``) with the descriptor's
    (``fstat``): no file is opened, so no lock is touched. While ``fd`` is
    open its inode cannot be reused, so a file deleted and created again
    always shows. Does not notice a file overwritten in place (same inode);
    the capture's continuity checks do.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} {DELETED}"
    held = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
        return f"{path} was replaced by another file (inode {held.st_ino}, now {st.st_ino})"
    return None


# Descriptors that must never be closed: closing any descriptor of a file
# drops every POSIX lock this process holds on it (sqlite.org/howtocorrupt.html
# section 2.2), and SQLite holds such locks on the database and -shm files.
_long_lived: dict[tuple[int, int], int] = {}
_long_lived_lock = threading.Lock()


def long_lived_fd(path: str) -> int | None:
    """A read-only descriptor on ``path`` that stays open for the life of the
    process, shared per file (device, inode); ``None`` if the file is absent.

    Safe to use beside SQLite's own connections in this process precisely
    because it is never closed. A file replaced under the same name gets a new
    descriptor; the old one stays open (a bounded leak, by design).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (st.st_dev, st.st_ino)
    with _long_lived_lock:
        fd = _long_lived.get(key)
        if fd is not None:
            return fd
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st2 = os.fstat(fd)
        key2 = (st2.st_dev, st2.st_ino)
        if key2 in _long_lived:  # replaced between stat and open; keep both open
            return _long_lived[key2]
        _long_lived[key2] = fd
        return fd
