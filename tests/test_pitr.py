"""Point-in-time restore by txid and by timestamp."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from pathlib import Path

import pytest
from helpers import fast_options, restore_fresh

import sqlrepl


def _rows(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT batch FROM t ORDER BY id")]
    finally:
        conn.close()


@pytest.fixture
def history(replica_url: str, db_path: str) -> dict[str, tuple[int, float]]:
    """Three batches A, B, C of five commits, each synced and so (with an
    interval longer than the test) each exactly one segment; returns each
    batch's (txid, time)."""
    conn = sqlrepl.connect(db_path, replica_url, options=fast_options(sync_interval=3600))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, batch TEXT)")
    conn.commit()
    sqlrepl.sync(db_path, timeout=60)
    marks: dict[str, tuple[int, float]] = {}
    for batch in "ABC":
        for _ in range(5):
            conn.execute("INSERT INTO t(batch) VALUES (?)", (batch,))
            conn.commit()
        sqlrepl.sync(db_path, timeout=60)
        mark = time.time()
        marks[batch] = (sqlrepl.status(db_path).txid, mark)
        # The next batch's objects must carry a later millisecond than this mark.
        while time.time() < mark + 0.002:
            pass
    conn.close()
    return marks


def test_restore_to_txid(replica_url: str, history: dict[str, tuple[int, float]], tmp_path: Path) -> None:
    """A txid at a batch boundary gives exactly the batches up to it."""
    for batch, expect in (("A", "A"), ("B", "AB"), ("C", "ABC")):
        out = tmp_path / f"txid-{batch}.db"
        result = restore_fresh(replica_url, out, txid=history[batch][0])
        assert result.txid == history[batch][0]
        assert "".join(sorted(set(_rows(out)))) == expect
        assert len(_rows(out)) == 5 * len(expect)


def test_txid_inside_a_segment_rounds_down(
    replica_url: str, history: dict[str, tuple[int, float]], tmp_path: Path
) -> None:
    """A txid that falls inside a segment (batch B's) restores the boundary before it, never past it."""
    txid_a, txid_b = history["A"][0], history["B"][0]
    assert txid_b == txid_a + 5
    for inside in range(txid_a + 1, txid_b):
        out = tmp_path / f"mid-{inside}.db"
        result = restore_fresh(replica_url, out, txid=inside)
        assert result.txid == txid_a
        assert _rows(out) == ["A"] * 5


def test_restore_to_timestamp(
    replica_url: str, history: dict[str, tuple[int, float]], tmp_path: Path
) -> None:
    """A time between batches gives the batches synced before it, in any of
    the accepted forms (datetime, Unix seconds, ISO 8601)."""
    t_a, t_b = history["A"][1], history["B"][1]
    forms: list[object] = [
        t_a,
        dt.datetime.fromtimestamp(t_a, dt.UTC),
        dt.datetime.fromtimestamp(t_a, dt.UTC).isoformat(),
    ]
    for i, when in enumerate(forms):
        out = tmp_path / f"ts-{i}.db"
        restore_fresh(replica_url, out, timestamp=when)
        assert set(_rows(out)) == {"A"}
    out = tmp_path / "ts-b.db"
    restore_fresh(replica_url, out, timestamp=t_b)
    assert set(_rows(out)) == {"A", "B"}


def test_before_anything_is_an_error(
    replica_url: str, history: dict[str, tuple[int, float]], tmp_path: Path
) -> None:
    """A time before the first snapshot has nothing to restore: a clear error."""
    with pytest.raises(sqlrepl.PointInTimeError, match="nothing at or before"):
        sqlrepl.restore(str(tmp_path / "x.db"), replica_url, timestamp=history["A"][1] - 3600)
    assert not (tmp_path / "x.db").exists()


def test_txid_and_timestamp_together_are_refused(
    replica_url: str, history: dict[str, tuple[int, float]], tmp_path: Path
) -> None:
    """Asking for both a txid and a time is ambiguous and refused."""
    with pytest.raises(sqlrepl.ConfigError, match="not both"):
        sqlrepl.restore(str(tmp_path / "x.db"), replica_url, timestamp=time.time(), txid=1)
