"""Several processes on one database: one replicates, the others stand by,
and when the replicating one dies another takes over with no gap."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, assert_same_database, fast_options, file_url, integrity, query, run_python

import sqlrepl

WRITER = r"""
import logging, os, random, signal, sys, sqlrepl
# The test stops writers with SIGINT, which a shell ignores in the jobs it
# runs in the background (and children inherit): take it back.
signal.signal(signal.SIGINT, signal.default_int_handler)
logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {os.getpid()} %(threadName)s %(message)s")
sys.path.insert(0, sys.argv[5])
from helpers import fast_options
db, url, wid, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
opts = fast_options(checkpoint_frames=300, wal_restart_frames=600)
conn = sqlrepl.connect(db, url, options=opts, timeout=60)
conn.execute("CREATE TABLE IF NOT EXISTS log(writer INT, seq INT, pad BLOB, PRIMARY KEY (writer, seq))")
conn.commit()
seq = conn.execute("SELECT coalesce(max(seq), 0) FROM log WHERE writer = ?", (wid,)).fetchone()[0]
print("start", seq, flush=True)
try:
    while True:
        for _ in range(rnd.choice([1, 1, 5])):
            seq += 1
            conn.execute("INSERT INTO log VALUES (?, ?, ?)", (wid, seq, os.urandom(rnd.randint(10, 400))))
        conn.commit()
        if rnd.random() < 0.03:
            sqlrepl.sync(db, timeout=60)
            print("acked", seq, flush=True)
except KeyboardInterrupt:
    pass
"""


class Writer:
    """One writer process and what it acknowledged."""

    def __init__(self, db: str, url: str, wid: int, seed: int) -> None:
        self.wid = wid
        self.acked = 0
        self.started = threading.Event()
        self.log = Path(db).parent / f"writer-{wid}-{seed}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WRITER, db, url, str(wid), str(seed), str(Path(__file__).parent)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                word, _, value = line.partition(" ")
                if word == "start":
                    self.started.set()
                elif word == "acked":
                    self.acked = max(self.acked, int(value))


def lock_holder(lockfile: str, timeout: float = 30) -> int:
    """The pid holding the flock on ``lockfile`` (from /proc/locks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ino = os.stat(lockfile).st_ino
        except FileNotFoundError:
            time.sleep(0.05)
            continue
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and "->" not in parts and int(parts[5].split(":")[2]) == ino:
                    return int(parts[4])
        time.sleep(0.05)
    raise AssertionError(f"nobody holds {lockfile}")


def _check_restore(url: str, out: Path, acked: dict[int, int]) -> None:
    result = sqlrepl.restore(str(out), url)
    assert result is not None
    assert integrity(out) == [("ok",)]
    conn = sqlite3.connect(out)
    try:
        for wid, need in acked.items():
            seqs = [r[0] for r in conn.execute("SELECT seq FROM log WHERE writer = ? ORDER BY seq", (wid,))]
            assert seqs == list(range(1, len(seqs) + 1)), f"writer {wid}: not a prefix"
            assert len(seqs) >= need, f"writer {wid}: acknowledged {need}, restored {len(seqs)}"
    finally:
        conn.close()
    out.unlink()


@pytest.mark.slow
def test_four_writers_replicator_killed_repeatedly(tmp_path: Path) -> None:
    """Four processes write at once; the replicating one is SIGKILLed eight
    times (and restarted). Every restore is a per-writer prefix holding all
    that sync() acknowledged, and the generation never changes."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    lockfile = db + "-sqlrepl/lock"
    rnd = random.Random(7)
    writers = {wid: Writer(db, url, wid, rnd.randrange(1 << 30)) for wid in range(4)}
    try:
        for w in writers.values():
            assert w.started.wait(60), w.log.read_text()
        for round_ in range(8):
            # Kill a replicator only once it has shown it works (a sync it
            # served acknowledged more rows), at a random point after that.
            before = sum(w.acked for w in writers.values())
            deadline = time.monotonic() + 120
            while sum(w.acked for w in writers.values()) <= before:
                assert time.monotonic() < deadline, f"round {round_}: no sync acknowledged anything"
                time.sleep(0.02)
            time.sleep(rnd.uniform(0.0, 0.5))  # where the kill falls, not a synchronisation
            holder = lock_holder(lockfile)
            victim = next(w for w in writers.values() if w.proc.pid == holder)
            os.kill(holder, signal.SIGKILL)
            victim.proc.wait(30)
            acked = {wid: w.acked for wid, w in writers.items()}
            writers[victim.wid] = replacement = Writer(db, url, victim.wid, rnd.randrange(1 << 30))
            replacement.acked = victim.acked
            assert replacement.started.wait(60)
            # A new replicator took over (not necessarily the replacement).
            assert lock_holder(lockfile) != holder
            _check_restore(url, tmp_path / f"round-{round_}.db", acked)
        assert all(w.acked > 0 for w in writers.values()), "some writer never got an acknowledgement"
    finally:
        for w in writers.values():
            w.proc.send_signal(signal.SIGINT)
        for w in writers.values():
            w.proc.wait(60)
    final = tmp_path / "final.db"
    assert sqlrepl.restore(str(final), url) is not None
    local = query(db, "SELECT writer, max(seq) FROM log GROUP BY writer ORDER BY writer")
    replica = query(final, "SELECT writer, max(seq) FROM log GROUP BY writer ORDER BY writer")
    assert local == replica, (local, replica, "".join(p.read_text() for p in tmp_path.glob("writer-*.log")))
    assert_same_database(db, final)
    generations = [p.name for p in (tmp_path / "replica" / "generations").iterdir()]
    logs = "".join(p.read_text() for p in tmp_path.glob("writer-*.log"))
    assert len(generations) == 1, (generations, logs)


def test_sync_from_a_standby_process(tmp_path: Path) -> None:
    """A process that does not replicate (another one holds the lock) still
    gets a working sync(): it returns once its commit is in the replica."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    # An hour's interval: the replicator uploads the standby's commit within
    # the test only if the standby's sync() asks it to.
    conn = sqlrepl.connect(db, url, options=fast_options(sync_interval=3600))
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    sqlrepl.sync(db)
    out = run_python(
        """
        import sys, time, sqlrepl
        sys.path.insert(0, sys.argv[3])
        from helpers import fast_options
        conn = sqlrepl.connect(sys.argv[1], sys.argv[2], options=fast_options(sync_interval=3600))
        deadline = time.monotonic() + 60
        while sqlrepl.status(sys.argv[1]).role == "starting" and time.monotonic() < deadline:
            time.sleep(0.01)
        print(sqlrepl.status(sys.argv[1]).role)
        conn.execute("INSERT INTO t VALUES ('from the standby')")
        conn.commit()
        sqlrepl.sync(sys.argv[1], timeout=60)
        print("synced")
        """,
        db,
        url,
        str(Path(__file__).parent),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["standby", "synced"]
    restored = tmp_path / "restored.db"
    assert sqlrepl.restore(str(restored), url) is not None
    assert query(restored, "SELECT x FROM t") == [("from the standby",)]
    conn.close()


def test_fork_after_connect(tmp_path: Path) -> None:
    """A child forked after the parent connected (gunicorn --preload) gets
    its own working replicator, and the parent's keeps working."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    out = run_python(
        """
        import os, sys, sqlrepl
        sys.path.insert(0, sys.argv[3])
        from helpers import fast_options
        db, url = sys.argv[1], sys.argv[2]
        conn = sqlrepl.connect(db, url, options=fast_options())
        conn.execute("CREATE TABLE t(who TEXT)")
        conn.commit()
        sqlrepl.sync(db)
        conn.close()
        pid = os.fork()
        who = "child" if pid == 0 else "parent"
        c = sqlrepl.connect(db, url, options=fast_options(), timeout=30)
        for i in range(50):
            c.execute("INSERT INTO t VALUES (?)", (who,))
            c.commit()
        sqlrepl.sync(db, timeout=30)
        c.close()
        if pid == 0:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child exit", status)
        """,
        db,
        url,
        str(Path(__file__).parent),
    )
    assert out.returncode == 0, out.stderr
    assert "child exit 0" in out.stdout
    restored = tmp_path / "restored.db"
    assert sqlrepl.restore(str(restored), url) is not None
    rows = query(restored, "SELECT who, count(*) FROM t GROUP BY who ORDER BY who")
    assert rows == [("child", 50), ("parent", 50)]


def test_standby_takes_over_when_the_replicator_exits(tmp_path: Path) -> None:
    """When the replicating process closes, a standby one becomes the
    replicator and continues the same generation."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, sqlrepl\n"
            "sys.path.insert(0, sys.argv[3])\n"
            "from helpers import fast_options\n"
            "c = sqlrepl.connect(sys.argv[1], sys.argv[2], options=fast_options())\n"
            "c.execute('CREATE TABLE t(x)'); c.commit(); sqlrepl.sync(sys.argv[1])\n"
            "print('ready', flush=True); sys.stdin.readline()\n",
            db,
            url,
            str(Path(__file__).parent),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert first.stdout is not None
    assert first.stdin is not None
    assert first.stdout.readline().strip() == "ready"
    conn = sqlrepl.connect(db, url, options=fast_options())
    deadline = time.monotonic() + 60
    while sqlrepl.status(db).role != "standby":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.communicate("\n", timeout=60)
    deadline = time.monotonic() + 60
    while sqlrepl.status(db).role != "replicating":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    sqlrepl.sync(db)
    conn.close()
    generations = list((tmp_path / "replica" / "generations").iterdir())
    assert len(generations) == 1
    restored = tmp_path / "restored.db"
    assert sqlrepl.restore(str(restored), url) is not None
    assert_same_database(db, restored)


def test_a_nudge_socket_path_too_long_leaks_no_descriptor(tmp_path: Path) -> None:
    """A staging folder too deep for an AF_UNIX path: no socket, and no descriptor left open for it."""
    from sqlrepl._replicator import Replicator

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    replicator = Replicator(str(deep / "app.db"), [file_url(tmp_path / "r")])
    leader = replicator._leader
    assert len(leader.nudge_path.encode()) > 108
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        leader.open_nudge_socket()
    assert leader.nudge_sock is None
    assert len(os.listdir("/proc/self/fd")) == before
