"""The replicator's bookkeeping (the staged list, the checksums, the
counters) belongs to its event loop: worker threads that copy the WAL only
hand back what they staged."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_same_database, fast_options, file_url, restore_fresh

import sqlrepl
from sqlrepl import _replicator, _state


def test_staged_list_and_checksums_change_only_on_the_loop_thread(
    db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Captures in pieces record their segments on the replicator's own
    thread, never in the worker thread that copied them (where a sort of the
    staged list raced the uploaders' replacing of it)."""
    threads: list[tuple[str, int]] = []
    add_staged = _state.LoopState.add_staged
    remember = _state.LoopState.remember_checksum

    def spy_add(self: _state.LoopState, *args: Any) -> Any:
        threads.append(("staged list", threading.get_ident()))
        return add_staged(self, *args)

    def spy_remember(self: _state.LoopState, *args: Any) -> Any:
        threads.append(("checksums", threading.get_ident()))
        return remember(self, *args)

    monkeypatch.setattr(_state.LoopState, "add_staged", spy_add)
    monkeypatch.setattr(_state.LoopState, "remember_checksum", spy_remember)
    url = file_url(tmp_path / "replica")
    # Small pieces: each transaction below is copied as several segments.
    conn = sqlrepl.connect(db_path, url, options=fast_options(segment_max_bytes=16384))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    sqlrepl.sync(db_path, timeout=60)
    for _ in range(5):
        for _ in range(4):  # (those made within one sync interval are copied in pieces)
            conn.execute("INSERT INTO t(v) VALUES (randomblob(12000))")
            conn.commit()
        sqlrepl.sync(db_path, timeout=60)
    replicator = _replicator.get_replicator(db_path)
    assert replicator is not None
    loop_thread = replicator._thread
    assert loop_thread is not None
    assert len([t for t in threads if t[0] == "staged list"]) >= 6  # the snapshot and every capture
    assert [t for t in threads if t[1] != loop_thread.ident] == []
    sqlrepl.stop_all(timeout=10)
    conn.close()
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    assert_same_database(db_path, restored)
