"""Writers killed with SIGKILL at random moments lose nothing acknowledged.

A writer process appends rows with consecutive sequence numbers (one or
several per transaction, sometimes large, with churn on another table and an
occasional VACUUM), calls ``sqlrepl.sync()`` now and then and prints what it
acknowledged. It is killed at a random moment, restarted on the same
database, killed again, many times. After every kill, a restore into a fresh
file must pass ``integrity_check`` and hold exactly the rows 1..k for some k:
at least everything acknowledged, at most what the local database holds.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, integrity, query

import sqlrepl

WRITER = r"""
import os, random, sys, sqlrepl
sys.path.insert(0, sys.argv[4])
from helpers import fast_options
db, url, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(seed)
opts = fast_options(checkpoint_frames=300, wal_restart_frames=600)
conn = sqlrepl.connect(db, url, options=opts, timeout=30)
conn.execute("CREATE TABLE IF NOT EXISTS log(seq INTEGER PRIMARY KEY, pad BLOB)")
conn.execute("CREATE TABLE IF NOT EXISTS churn(k INTEGER PRIMARY KEY, v BLOB)")
conn.commit()
seq = conn.execute("SELECT coalesce(max(seq), 0) FROM log").fetchone()[0]
print("start", seq, flush=True)
while True:
    rows = rnd.choice([1, 1, 1, 3, 20, 200])
    big = rnd.random() < 0.03
    for _ in range(rows):
        seq += 1
        pad = os.urandom(rnd.randint(10, 30000 if big else 300))
        conn.execute("INSERT INTO log VALUES (?, ?)", (seq, pad))
    churn = (rnd.randint(1, 500), os.urandom(rnd.randint(10, 2000)))
    conn.execute("INSERT OR REPLACE INTO churn VALUES (?, ?)", churn)
    if rnd.random() < 0.05:
        conn.execute("DELETE FROM churn WHERE k % 5 = ?", (rnd.randint(0, 4),))
    conn.commit()
    print("committed", seq, flush=True)
    r = rnd.random()
    if r < 0.04:
        sqlrepl.sync(db, timeout=60)
        print("acked", seq, flush=True)
    elif r < 0.045:
        conn.execute("VACUUM")
"""


def _run_writer(db: str, url: str, seed: int, delay: float, *, after_ack: bool) -> tuple[int, int]:
    """Run the writer until it has committed its first transaction (or, with
    ``after_ack``, until a sync acknowledged rows), then SIGKILL it at a
    random moment ``delay`` seconds later (the start-up, which takes seconds
    on a busy machine, is never part of the delay); return (start seq, last
    acked seq)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, db, url, str(seed), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: queue.Queue[str | None] = queue.Queue()
    out: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while True:
        line = lines.get(timeout=120)
        if line is None:
            proc.wait(timeout=60)
            reader.join(timeout=60)
            assert proc.stderr is not None
            assert proc.stdout is not None
            err = proc.stderr.read()
            proc.stderr.close()
            proc.stdout.close()
            pytest.fail(f"the writer exited before its first commit: {err}")
        if line.startswith("acked" if after_ack else "committed"):
            break
    time.sleep(delay)  # where the kill falls: anywhere after start-up, not a synchronisation
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # stdout is the reader thread's alone (communicate() would read it too,
    # and close it under the reader): it ends at the pipe's end of file.
    reader.join(timeout=60)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, err
    start, acked = -1, 0
    for line in out:
        word, _, value = line.strip().partition(" ")
        if word == "start":
            start = int(value)
        elif word == "acked":
            acked = int(value)
    assert "Traceback" not in err, err
    return start, acked


def _local_max(db: str) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM log").fetchone()[0])
    finally:
        conn.close()


def _crash_loop(url: str, tmp_path: Path, rounds: int, seed: int) -> None:
    rnd = random.Random(seed)
    db = str(tmp_path / "app.db")
    acked_ever = 0
    kept_going = 0
    for i in range(rounds):
        # Every other round is killed only after a sync acknowledged rows: so
        # at least half the rounds are known to have made progress, however
        # slow the machine; the others are killed anywhere after start-up.
        after_ack = i % 2 == 0
        start, acked = _run_writer(
            db, url, rnd.randrange(1 << 30), rnd.uniform(0.0, 1.6), after_ack=after_ack
        )
        assert not after_ack or acked > start
        assert start >= 0, "writer was killed before it opened the database"
        acked_ever = max(acked_ever, acked)
        local = _local_max(db)
        restored = tmp_path / f"restored-{i}.db"
        result = sqlrepl.restore(str(restored), url)
        if result is None:  # killed before its first upload: fine if nothing was acknowledged
            assert acked_ever == 0, f"round {i}: the replica is empty but rows were acknowledged"
            continue
        assert integrity(restored) == [("ok",)]
        conn = sqlite3.connect(restored)
        try:
            seqs = [r[0] for r in conn.execute("SELECT seq FROM log ORDER BY seq")]
        finally:
            conn.close()
        k = len(seqs)
        assert seqs == list(range(1, k + 1)), f"round {i}: restored rows are not a prefix"
        assert k >= acked_ever, f"round {i}: lost acknowledged rows ({k} < {acked_ever})"
        assert k <= local, f"round {i}: restored more than was committed ({k} > {local})"
        kept_going += k > start
        restored.unlink()
    assert acked_ever > 0, "no round acknowledged anything: the test proved nothing"
    assert kept_going >= (rounds + 1) // 2


@pytest.mark.slow
def test_sigkill_many_times_file_replica(tmp_path: Path) -> None:
    """25 kills of a writer replicating to a folder."""
    _crash_loop("file://" + str(tmp_path / "replica"), tmp_path, rounds=25, seed=1)


@pytest.mark.slow
@pytest.mark.s3
def test_sigkill_many_times_s3_replica(tmp_path: Path, s3_url: str) -> None:
    """12 kills of a writer replicating to the real S3 server."""
    _crash_loop(s3_url, tmp_path, rounds=12, seed=2)


def test_exit_flushes_pending_data(tmp_path: Path) -> None:
    """A process that commits and exits at once (no sync) has its commits
    uploaded by the exit flush."""
    url = "file://" + str(tmp_path / "replica")
    db = str(tmp_path / "app.db")
    code = r"""
import sys, sqlrepl
# An interval longer than the test: only the exit flush can upload the rows.
conn = sqlrepl.connect(sys.argv[1], sys.argv[2], options=sqlrepl.Options(sync_interval=3600, retention=None))
conn.execute("CREATE TABLE t(x)")
conn.commit()
for i in range(100):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.commit()
"""
    out = subprocess.run(
        [sys.executable, "-c", code, db, url],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    restored = tmp_path / "restored.db"
    assert sqlrepl.restore(str(restored), url) is not None
    assert query(restored, "SELECT count(*) FROM t") == [(100,)]
