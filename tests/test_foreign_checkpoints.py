"""Checkpoints that sqlrepl does not run (RESTART and TRUNCATE from another
process, or from the app's own connection) complete instead of waiting for
sqlrepl's pin, and replication goes on in the same generation."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from helpers import ROOT, assert_same_database, fast_options, file_url, make_db, query, restore_fresh

import sqlrepl
from sqlrepl import _wal
from sqlrepl._restore import list_generations

WRITER = r"""
import os, sys, sqlrepl
sys.path.insert(0, sys.argv[3])
from helpers import fast_options
db, url, stop = sys.argv[1], sys.argv[2], sys.argv[4]
# A long busy timeout: the writer waits out any checkpoint rather than fail.
conn = sqlrepl.connect(db, url, options=fast_options(), timeout=120)
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
conn.commit()
sqlrepl.sync(db, timeout=60)
print("start", sqlrepl.status(db).generation, flush=True)
while not os.path.exists(stop):
    conn.execute("INSERT INTO t(v) VALUES (randomblob(300))")
    conn.commit()
sqlrepl.sync(db, timeout=60)
print("done", sqlrepl.status(db).generation, flush=True)
conn.close()
"""

ROUNDS = 8
# Most, not all: on a loaded machine a checkpoint may still meet the app's
# own write transaction or our capture at a bad moment.
MUST_SUCCEED = 6


def _generations(url: str) -> list[str]:
    async def go() -> list[str]:
        client = sqlrepl.open_replica(url)
        try:
            return [g.id for g in await list_generations(client)]
        finally:
            await client.aclose()

    return anyio.run(go)


def _rows(db: str) -> int:
    return int(query(db, "SELECT count(*) FROM t")[0][0])  # type: ignore[call-overload]


def _wait_for_rows(db: str, more_than: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the writer died"
        n = _rows(db)
        if n > more_than:
            return n
        time.sleep(0.01)
    raise AssertionError(f"the writer made no commit past row {more_than} in 120 s")


@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_checkpoints_of_another_process_complete(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Another process's RESTART and TRUNCATE checkpoints (5 s busy timeout)
    succeed while the app commits, and the replica stays one exact generation."""
    url = file_url(tmp_path / "replica") if kind == "file" else str(request.getfixturevalue("s3_url"))
    db = str(tmp_path / "app.db")
    stop = tmp_path / "stop"
    log = tmp_path / "writer.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, db, url, str(Path(__file__).parent), str(stop)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    results: list[tuple[str, int, int, int]] = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first[:1] == ["start"], log.read_text()
        generation = first[1]
        ckpt = sqlite3.connect(db, timeout=5, isolation_level=None)
        try:
            rows = _rows(db)
            for i in range(ROUNDS):
                # Commits since the last checkpoint: frames sqlrepl may not
                # have copied yet, which its pin protects.
                rows = _wait_for_rows(db, rows + 20, proc)
                mode = ("TRUNCATE", "RESTART")[i % 2]
                busy, wal_frames, moved = ckpt.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                results.append((mode, busy, wal_frames, moved))
                if sum(1 for r in results if r[1]) > ROUNDS - MUST_SUCCEED:
                    break  # already failed; do not wait out more busy timeouts
        finally:
            ckpt.close()
        _wait_for_rows(db, rows + 20, proc)  # the writer goes on after them
    finally:
        stop.touch()
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log.read_text()
    succeeded = [r for r in results if r[1] == 0 and r[2] == r[3]]
    assert len(succeeded) >= MUST_SUCCEED, (results, log.read_text())
    assert out.split() == ["done", generation], log.read_text()
    assert _generations(url) == [generation]
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    assert_same_database(db, restored)


def test_checkpoints_by_the_apps_own_connection_complete(db_path: str, tmp_path: Path) -> None:
    """The app's own sqlrepl connection runs TRUNCATE and RESTART checkpoints
    (5 s busy timeout) between its commits: they succeed, in one generation."""
    url = file_url(tmp_path / "replica")
    conn = sqlrepl.connect(db_path, url, options=fast_options(), timeout=5)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    sqlrepl.sync(db_path, timeout=30)
    generation = sqlrepl.status(db_path).generation
    results = []
    for i in range(ROUNDS):
        for _ in range(30):
            conn.execute("INSERT INTO t(v) VALUES (randomblob(300))")
            conn.commit()
        mode = ("TRUNCATE", "RESTART")[i % 2]
        busy, wal_frames, moved = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        results.append((mode, busy, wal_frames, moved))
        if sum(1 for r in results if r[1]) > ROUNDS - MUST_SUCCEED:
            break
    conn.execute("INSERT INTO t(v) VALUES (randomblob(300))")
    conn.commit()
    sqlrepl.sync(db_path, timeout=30)
    assert sqlrepl.status(db_path).generation == generation
    conn.close()
    assert len([r for r in results if r[1] == 0 and r[2] == r[3]]) >= MUST_SUCCEED, results
    assert _generations(url) == [generation]
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    assert_same_database(db_path, restored)


def test_the_lock_probe_tells_a_waiting_checkpoint_from_a_writer(tmp_path: Path) -> None:
    """The -shm lock probe reports a TRUNCATE held back by a reader (run by
    this very process), and neither an idle database nor a plain writer."""
    db = str(tmp_path / "probe.db")
    make_db(db)
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO t(v) VALUES (1)")
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchall()
    fd = _wal.long_lived_fd(db + "-shm")
    assert fd is not None
    assert not _wal.checkpointer_waiting(fd)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t(v) VALUES (2)")
    assert not _wal.checkpointer_waiting(fd)
    writer.execute("COMMIT")
    result: list[tuple[int, int, int]] = []
    ckpt = sqlite3.connect(db, timeout=60, isolation_level=None, check_same_thread=False)
    thread = threading.Thread(
        target=lambda: result.append(ckpt.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    )
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not _wal.checkpointer_waiting(fd):
            assert time.monotonic() < deadline, "the probe never saw the waiting checkpoint"
            time.sleep(0.005)
        assert not result  # it is still waiting for the reader
    finally:
        reader.execute("ROLLBACK")
        thread.join(60)
    assert result == [(0, 0, 0)]
    assert not _wal.checkpointer_waiting(fd)
    for conn in (writer, reader, ckpt):
        conn.close()
