"""Restore applies objects newest first and writes each page once: the
result, the checks that still reject damaged replicas, and the optional
``PRAGMA quick_check``."""

from __future__ import annotations

import collections
import io
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ROOT, assert_same_database, fast_options, file_url, restore_fresh

import sqlrepl
from sqlrepl import _format, _restore
from sqlrepl._format import KIND_SEGMENT, KIND_SNAPSHOT, ObjectWriter, page_hash

PS = 1024


def _page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PS)


class _Model:
    """The database state, built by applying objects oldest first, as the
    format describes (docs/format.md): the reference for the applier."""

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.size = 0

    @property
    def checksum(self) -> int:
        out = 0
        for pgno, page in self.pages.items():
            out ^= page_hash(pgno, page)
        return out

    def image(self) -> bytes:
        return b"".join(self.pages.get(p, bytes(PS)) for p in range(1, self.size + 1))

    def add(self, pages: dict[int, bytes], *, db_size: int, truncate: int | None = None) -> bytes:
        """Apply pages as a snapshot (``truncate`` None) or a segment; the object's bytes."""
        pre = self.checksum if truncate is not None else 0
        keep = 0 if truncate is None else truncate
        self.pages = {p: b for p, b in self.pages.items() if p <= keep}
        self.pages.update(pages)
        self.pages = {p: b for p, b in self.pages.items() if p <= db_size}
        self.size = db_size
        out = io.BytesIO()
        writer = ObjectWriter(out, PS)
        for pgno, page in pages.items():
            writer.add(pgno, page)
        writer.finish(
            kind=KIND_SNAPSHOT if truncate is None else KIND_SEGMENT,
            first_txid=1,
            last_txid=1,
            timestamp_ms=1,
            db_size=db_size,
            truncate_size=db_size if truncate is None else truncate,
            pre_checksum=pre,
            post_checksum=self.checksum,
        )
        return out.getvalue()


def _apply_newest_first(tmp_path: Path, objects: list[bytes]) -> bytes:
    path = tmp_path / "applied.db"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        applier = _restore._Applier(fd)
        for n, obj in reversed(list(enumerate(objects))):
            applier.apply(io.BytesIO(obj), f"object-{n}", len(obj))
        applier.finish()
    finally:
        os.close(fd)
    return path.read_bytes()


def _history() -> tuple[_Model, list[bytes]]:
    """A snapshot and segments that rewrite pages, shrink the database and
    grow it again, so that older copies must not show through."""
    m = _Model()
    objects = [m.add({p: _page(p) for p in range(1, 11)}, db_size=10)]
    objects.append(m.add({2: _page(102), 9: _page(109)}, db_size=10, truncate=10))
    # Shrink to 4 pages, then grow to 6 writing page 5 only: 6 is a hole
    # (zeros), not the snapshot's page 6; 7..10 are gone.
    objects.append(m.add({2: _page(202), 5: _page(205)}, db_size=6, truncate=4))
    # Grow to 9 writing page 8 only: 7 and 9 are holes.
    objects.append(m.add({8: _page(308), 3: _page(303)}, db_size=9, truncate=9))
    objects.append(m.add({3: _page(403), 1: _page(401)}, db_size=9, truncate=9))
    return m, objects


def _ends_below_its_truncate_size() -> tuple[_Model, list[bytes]]:
    """A segment that ends smaller than its truncate size: the pages above
    its end go too."""
    m = _Model()
    objects = [m.add({p: _page(p) for p in range(1, 11)}, db_size=10)]
    objects.append(m.add({4: _page(104)}, db_size=5, truncate=8))
    objects.append(m.add({8: _page(208), 1: _page(201)}, db_size=9, truncate=9))
    return m, objects


def _a_newer_snapshot() -> tuple[_Model, list[bytes]]:
    """A snapshot after another: nothing of the older one shows."""
    m = _Model()
    objects = [m.add({p: _page(p) for p in range(1, 5)}, db_size=4)]
    objects.append(m.add({1: _page(101), 2: _page(102)}, db_size=4))
    return m, objects


@pytest.mark.parametrize("history", [_history, _ends_below_its_truncate_size, _a_newer_snapshot])
def test_newest_first_is_the_state_built_in_order(
    tmp_path: Path, history: Callable[[], tuple[_Model, list[bytes]]]
) -> None:
    """Rewritten, dropped and regrown pages come out as applying every object in order gives."""
    model, objects = history()
    assert _apply_newest_first(tmp_path, objects) == model.image()


def test_each_page_is_hashed_and_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page present in several objects is hashed and written once, from its newest copy."""
    _model, objects = _history()
    hashed: collections.Counter[int] = collections.Counter()
    real_hash, real_pwrite, real_pwritev = _restore.page_hash, os.pwrite, os.pwritev
    written = [0]

    def counting_hash(pgno: int, page: bytes | memoryview) -> int:
        hashed[pgno] += 1
        return real_hash(pgno, page)

    def counting_pwrite(fd: int, data: bytes, offset: int) -> int:
        n = real_pwrite(fd, data, offset)
        written[0] += n
        return n

    def counting_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = real_pwritev(fd, buffers, offset)
        written[0] += n
        return n

    monkeypatch.setattr(_restore, "page_hash", counting_hash)
    monkeypatch.setattr(_restore.os, "pwrite", counting_pwrite)
    monkeypatch.setattr(_restore.os, "pwritev", counting_pwritev)
    _apply_newest_first(tmp_path, objects)
    # Pages 6, 7 and 9 of the final database are holes.
    assert hashed == {p: 1 for p in (1, 2, 3, 4, 5, 8)}
    assert written[0] == 6 * PS


def test_a_segment_that_does_not_continue_is_rejected(tmp_path: Path) -> None:
    """A segment whose "before" checksum is not the state under it is refused, naming it."""
    m = _Model()
    objects = [m.add({1: _page(1), 2: _page(2)}, db_size=2)]
    other = _Model()
    other.add({1: _page(1), 2: _page(99)}, db_size=2)
    objects.append(other.add({2: _page(3)}, db_size=2, truncate=2))  # continues another state
    with pytest.raises(sqlrepl.CorruptObjectError, match=r"does not continue.*object-1"):
        _apply_newest_first(tmp_path, objects)


def test_a_wrong_surviving_page_fails_the_database_checksum(tmp_path: Path) -> None:
    """A page changed before the object was sealed (its own checksums right) is caught at the end."""
    m = _Model()
    objects = [m.add({1: _page(1), 2: _page(2)}, db_size=2)]
    liar = _Model()
    liar.pages, liar.size = dict(m.pages), m.size
    good = m.add({2: _page(3)}, db_size=2, truncate=2)
    bad = liar.add({2: _page(4)}, db_size=2, truncate=2)
    # Same header checksums as the good one, other page bytes.
    header = _format.read_header(bad[: _format.HEADER_SIZE])
    fields = {f: getattr(header, f) for f in header.__dataclass_fields__}
    fields["post_checksum"] = _format.read_header(good[: _format.HEADER_SIZE]).post_checksum
    forged = _format.ObjectHeader(**fields).pack() + bad[_format.HEADER_SIZE :]
    with pytest.raises(sqlrepl.CorruptObjectError, match=r"database checksum.*object-1"):
        _apply_newest_first(tmp_path, [*objects, forged])


def test_a_damaged_object_whose_pages_are_all_superseded_is_rejected(tmp_path: Path) -> None:
    """An older segment with a flipped byte is refused even though no page of it would be written."""
    _model, objects = _history()
    damaged = bytearray(objects[1])  # pages 2 and 9: rewritten or dropped later
    damaged[-5] ^= 0x10
    objects[1] = bytes(damaged)
    with pytest.raises(sqlrepl.CorruptObjectError, match=r"object-1") as info:
        _apply_newest_first(tmp_path, objects)
    assert "checksum" in str(info.value) or "decompress" in str(info.value)


def test_a_page_outside_the_database_is_rejected_even_when_superseded(tmp_path: Path) -> None:
    """Page numbers are checked in every object, not only in pages that get written."""
    m = _Model()
    objects = [m.add({1: _page(1), 2: _page(2)}, db_size=2)]
    out = io.BytesIO()
    writer = ObjectWriter(out, PS)
    writer.add(7, _page(7))  # beyond its own database size
    writer.finish(
        kind=KIND_SEGMENT,
        first_txid=2,
        last_txid=2,
        timestamp_ms=1,
        db_size=2,
        truncate_size=2,
        pre_checksum=m.checksum,
        post_checksum=m.checksum,
    )
    objects.append(out.getvalue())
    objects.append(m.add({1: _page(11), 2: _page(12)}, db_size=2, truncate=2))
    with pytest.raises(sqlrepl.CorruptObjectError, match=r"page 7 outside the database \(object-1\)"):
        _apply_newest_first(tmp_path, objects)


def test_a_chain_that_does_not_start_at_a_snapshot_is_rejected(tmp_path: Path) -> None:
    """Segments alone are not a database: the oldest object must be a snapshot."""
    m = _Model()
    m.add({1: _page(1)}, db_size=1)
    objects = [m.add({1: _page(2)}, db_size=1, truncate=1)]
    with pytest.raises(sqlrepl.CorruptObjectError, match="does not start from a snapshot"):
        _apply_newest_first(tmp_path, objects)


def test_a_replica_rewriting_pages_restores_each_page_once(
    db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real replica whose segments rewrite the same pages restores byte for
    byte, each page hashed once."""
    url = file_url(tmp_path / "replica")
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t (v) VALUES (?)", [("x" * 300,) for _ in range(200)])
    conn.commit()
    sqlrepl.sync(db_path)
    for i in range(4):
        conn.execute("UPDATE t SET v = ? WHERE id % 3 = ?", (str(i) * 300, i % 3))
        conn.commit()
        sqlrepl.sync(db_path)
    conn.close()
    sqlrepl.stop_all()
    hashed: collections.Counter[int] = collections.Counter()
    real_hash = _restore.page_hash

    def counting_hash(pgno: int, page: bytes | memoryview) -> int:
        hashed[pgno] += 1
        return real_hash(pgno, page)

    monkeypatch.setattr(_restore, "page_hash", counting_hash)
    result = restore_fresh(url, tmp_path / "restored.db")
    assert result.objects >= 3
    assert hashed
    assert max(hashed.values()) == 1
    assert_same_database(db_path, tmp_path / "restored.db")
    with open(db_path, "rb") as a, open(tmp_path / "restored.db", "rb") as b:
        assert a.read() == b.read()


def _corrupt_inside_replica(tmp_path: Path) -> str:
    """A replica whose snapshot is a faithful copy of a database that is
    damaged inside (a table page with an impossible page type)."""
    src = tmp_path / "source.db"
    conn = sqlite3.connect(src)
    conn.execute(f"PRAGMA page_size = {PS}")
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.executemany("INSERT INTO t VALUES (?)", [("y" * 200,) for _ in range(100)])
    conn.commit()
    conn.close()
    data = bytearray(src.read_bytes())
    root = 2  # the first table's root page
    data[(root - 1) * PS] = 0x07  # not a b-tree page type
    pages = {p: bytes(data[(p - 1) * PS : p * PS]) for p in range(1, len(data) // PS + 1)}
    m = _Model()
    obj = m.add(pages, db_size=len(pages))
    key = _format.snapshot_key(_format.new_generation_id(), 1, 1)
    target = tmp_path / "replica" / key
    target.parent.mkdir(parents=True)
    target.write_bytes(obj)
    return file_url(tmp_path / "replica")


def test_quick_check_is_off_by_default_and_catches_a_damaged_source(tmp_path: Path) -> None:
    """By default a faithful copy of a damaged source is restored; with quick_check=True it is refused."""
    url = _corrupt_inside_replica(tmp_path)
    with pytest.raises(sqlrepl.RestoreError, match="restored database fails"):
        sqlrepl.restore(str(tmp_path / "checked.db"), url, quick_check=True)
    assert not (tmp_path / "checked.db").exists()
    restore_fresh(url, tmp_path / "copied.db")
    assert (tmp_path / "copied.db").stat().st_size > 0


def test_short_writes_are_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``pwritev`` that writes only part of a run (legal) is completed, not ignored."""
    m = _Model()
    objects = [m.add({p: _page(p) for p in range(1, 51)}, db_size=50)]
    real_pwritev = os.pwritev
    calls = [0]

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls[0] += 1
        return real_pwritev(fd, buffers[:1], offset) - 100

    monkeypatch.setattr(_restore.os, "pwritev", short_pwritev)
    assert _apply_newest_first(tmp_path, objects) == m.image()
    assert calls[0] >= 1


def _small_replica(db_path: str, tmp_path: Path) -> str:
    url = file_url(tmp_path / "replica")
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t (v) VALUES (?)", [("z" * 500,) for _ in range(400)])
    conn.commit()
    sqlrepl.sync(db_path)
    conn.close()
    sqlrepl.stop_all()
    return url


def test_written_pages_go_to_disk_during_the_restore(
    db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a small flush threshold the file is fdatasynced while pages are
    written, and the result is still the database byte for byte."""
    url = _small_replica(db_path, tmp_path)
    monkeypatch.setattr(_restore, "FLUSH_BYTES", 8 * 4096)
    real = os.fdatasync
    calls: list[int] = []

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(_restore.os, "fdatasync", counting)
    restore_fresh(url, tmp_path / "restored.db")
    assert calls
    with open(db_path, "rb") as a, open(tmp_path / "restored.db", "rb") as b:
        assert a.read() == b.read()


def test_a_failing_background_flush_fails_the_restore(
    db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error while sending pages to disk fails the restore with a RestoreError, no database."""
    url = _small_replica(db_path, tmp_path)
    monkeypatch.setattr(_restore, "FLUSH_BYTES", 8 * 4096)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_restore.os, "fdatasync", failing)
    target = tmp_path / "out" / "restored.db"
    with pytest.raises(sqlrepl.RestoreError, match=r"to disk failed.*Input/output error"):
        sqlrepl.restore(str(target), url)
    assert not target.exists()


def test_cli_quick_check_flag(tmp_path: Path) -> None:
    """``sqlrepl restore --quick-check`` refuses a damaged source; without it, the copy is restored."""
    url = _corrupt_inside_replica(tmp_path)
    checked = subprocess.run(
        [sys.executable, "-m", "sqlrepl", "restore", str(tmp_path / "checked.db"), url, "--quick-check"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert checked.returncode != 0
    assert "restored database fails" in checked.stderr
    assert not (tmp_path / "checked.db").exists()
    plain = subprocess.run(
        [sys.executable, "-m", "sqlrepl", "restore", str(tmp_path / "copied.db"), url],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "copied.db").stat().st_size > 0


def test_a_part_read_to_its_end_is_let_go() -> None:
    """Once the applier has read a part to its end, the part reader no longer
    holds it (it held the last part of every large object, 8 MiB each, until
    the restore ended)."""
    reader = _restore._PartReader(_restore._Window(1))
    part = bytes(1 << 20)
    held_before = sys.getrefcount(part)
    reader.put(part, 0)
    reader.end()
    assert len(reader.read(1 << 19)) == 1 << 19
    assert len(reader.read()) == 1 << 19
    assert len(reader.read()) == 0
    assert sys.getrefcount(part) == held_before
