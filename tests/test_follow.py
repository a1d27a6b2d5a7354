"""Read replicas: a follower keeps a copy current that plain sqlite3 readers
read while it is updated, through crashes and generation changes."""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pytest
from helpers import ROOT, dump, fast_options, file_url, integrity

import sqlrepl
from sqlrepl import _format
from sqlrepl._compact import merge_segments
from sqlrepl._follow_feed import Step, next_step
from sqlrepl._format import SegmentKey
from sqlrepl._lifecycle import Generation, group_generations
from sqlrepl._replica import ObjectInfo, ReplicaClient, RequestStats

ACCOUNTS = 100
START_BALANCE = 1000

# A bank: transfers between 100 accounts keep the sum constant, and a
# counter in the same transaction says how far the history has gone.
WRITER = r"""
import os, random, sys, threading, time, sqlrepl
sys.path.insert(0, sys.argv[3])
from helpers import fast_options
db, url = sys.argv[1], sys.argv[2]
conn = sqlrepl.connect(db, url, options=fast_options(), timeout=60)
conn.execute("CREATE TABLE IF NOT EXISTS accounts(id INTEGER PRIMARY KEY, balance INTEGER, pad BLOB)")
conn.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, transfers INTEGER)")
if conn.execute("SELECT count(*) FROM accounts").fetchone()[0] == 0:
    rows = [(i, 1000, os.urandom(300)) for i in range(100)]
    conn.executemany("INSERT INTO accounts VALUES (?, ?, ?)", rows)
    conn.execute("INSERT INTO meta VALUES ('n', 0)")
conn.commit()
sqlrepl.sync(db, timeout=60)
print("ready", flush=True)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
rnd = random.Random(os.getpid())
while not done.is_set():
    for _ in range(rnd.choice([1, 3, 10])):
        a, b = rnd.sample(range(100), 2)
        amount = rnd.randint(1, 50)
        pad = os.urandom(rnd.randint(50, 900))
        conn.execute("UPDATE accounts SET balance = balance - ?, pad = ? WHERE id = ?", (amount, pad, a))
        conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, b))
        conn.execute("UPDATE meta SET transfers = transfers + 1")
        conn.commit()
    time.sleep(0.005)  # pacing only: leave the 2 cores some room
sqlrepl.sync(db, timeout=60)
n = conn.execute("SELECT transfers FROM meta").fetchone()[0]
status = sqlrepl.status(db)
print("final", n, status.txid, status.generation, flush=True)
"""

# The follower, printing each applied state. With TORN=1 it kills itself in
# the middle of its second apply: page 1 (new counter, new size) is written,
# the other pages are not, the journal is there and hot.
FOLLOWER = r"""
import os, signal, sys, sqlrepl
from sqlrepl._follow_copy import FollowedCopy
db, url, torn = sys.argv[1], sys.argv[2], sys.argv[3]
if torn in ("page1", "all"):
    original = FollowedCopy._write_pages
    applies = []
    def write_pages(self, batch, first):
        applies.append(batch)
        if len(applies) >= 2:
            if torn == "page1":
                os.pwrite(self._fd, first, 0)
            else:
                original(self, batch, first)
            print("dying", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, batch, first)
    FollowedCopy._write_pages = write_pages
def applied(s):
    print("applied", s.txid, s.generation, flush=True)
f = sqlrepl.follow(db, url, poll_interval=0.05, on_apply=applied)
signal.signal(signal.SIGTERM, lambda *_: f.stop())
f.wait(lambda s: False)
print("stopped", flush=True)
"""

# A plain sqlite3 reader: one statement (one read transaction) checks the
# sum and reads the counter; the counter never goes back. A long-lived
# connection (its cache must be invalidated) and fresh ones in turn.
READER = r"""
import os, sqlite3, sys
db, stop = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db, timeout=60)
last, reads, bad = -1, 0, 0
while True:
    stopping = os.path.exists(stop)
    c = conn if reads % 10 else sqlite3.connect(db, timeout=60)
    try:
        total, count, n = c.execute(
            "SELECT (SELECT sum(balance) FROM accounts), (SELECT count(*) FROM accounts),"
            " (SELECT transfers FROM meta)").fetchone()
        if total != 100 * 1000 or count != 100 or n < last:
            bad += 1
            print("BAD", total, count, n, last, flush=True)
        last = max(last, n)
        if reads % 200 == 0:
            check = c.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                bad += 1
                print("BAD check", check[:3], flush=True)
    except sqlite3.Error as exc:
        bad += 1
        print("BAD error", exc, flush=True)
    finally:
        if c is not conn:
            c.close()
    reads += 1
    if reads % 100 == 0:
        print("reads", reads, last, flush=True)
    if stopping:
        break
print("done", reads, last, bad, flush=True)
"""


class Proc:
    """A child process whose stdout lines arrive on a queue."""

    def __init__(self, code: str, *args: str, log: Path) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.log = log
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.strip())
        self.lines.put("<eof>")

    def expect(self, word: str, timeout: float = 120) -> list[str]:
        """Wait for the next line starting with ``word``; return its fields."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {word!r} line within {timeout}s; see {self.log}") from None
            if line == "<eof>":
                raise AssertionError(f"process ended before {word!r}; see {self.log}")
            if line.split()[0] == word:
                return line.split()[1:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self._reader.join(30)


def _bank(tmp_path: Path, url: str, kills: int, readers: int = 3) -> None:
    primary, copy, stop = tmp_path / "primary.db", tmp_path / "copy.db", tmp_path / "stop"
    here = str(Path(__file__).parent)
    writer = Proc(WRITER, str(primary), url, here, log=tmp_path / "writer.log")
    procs = [writer]
    try:
        writer.expect("ready")
        modes = ["page1", "all", "kill"]

        def torn(i: int) -> str:
            return modes[i % 3] if i < kills and modes[i % 3] != "kill" else ""

        follower = Proc(FOLLOWER, str(copy), url, torn(0), log=tmp_path / "follower.log")
        procs.append(follower)
        follower.expect("applied")
        reading = [
            Proc(READER, str(copy), str(stop), log=tmp_path / f"reader{i}.log") for i in range(readers)
        ]
        procs += reading
        for r in reading:
            r.expect("reads")
        rnd = random.Random(kills)
        for i in range(kills):
            mode = modes[i % 3]
            if mode == "kill":
                follower.expect("applied")
                # A random point of the next poll/apply cycle: it has not
                # necessarily begun, which is the point of not timing it.
                for _ in range(rnd.randint(0, 2)):
                    follower.expect("applied")
                follower.kill()
            else:
                follower.expect("dying")
                follower.proc.wait(60)
            follower = Proc(FOLLOWER, str(copy), url, torn(i + 1), log=tmp_path / "follower.log")
            procs.append(follower)
            follower.expect("applied")
        for r in reading:
            r.expect("reads")
        # The primary loses its staging and starts a new generation while the
        # readers read: the follower moves to it in one step.
        assert writer.proc.stdin is not None
        writer.proc.stdin.close()
        old_generation = writer.expect("final")[2]
        writer.proc.wait(60)
        shutil.rmtree(str(primary) + "-sqlrepl")
        writer = Proc(WRITER, str(primary), url, here, log=tmp_path / "writer.log")
        procs.append(writer)
        writer.expect("ready")
        while follower.expect("applied")[1] == old_generation:
            pass
        for r in reading:
            r.expect("reads")
        assert writer.proc.stdin is not None
        writer.proc.stdin.close()
        final, txid, generation = writer.expect("final")
        assert generation != old_generation
        while (applied := follower.expect("applied")) and (
            applied[1] != generation or int(applied[0]) < int(txid)
        ):
            pass
        stop.touch()
        results = [r.expect("done") for r in reading]
        total = sum(int(reads) for reads, _last, _bad in results)
        assert all(int(bad) == 0 for _reads, _last, bad in results), results
        assert all(int(last) == int(final) for _reads, last, _bad in results), (results, final)
        assert total >= 1000 * readers, results  # (a few hundred thousand here)
        follower.proc.send_signal(signal.SIGTERM)
        follower.expect("stopped")
        assert integrity(copy) == [("ok",)]
        assert dump(copy) == dump(primary)
        # Every restart proved the state the file held and resumed from it.
        assert "re-seeding" not in (tmp_path / "follower.log").read_text()
    finally:
        stop.touch()
        for p in procs:
            p.kill()


def test_bank_readers_never_see_a_torn_or_older_state(tmp_path: Path) -> None:
    """Plain sqlite3 readers of a followed copy see the bank's invariant and
    a counter that never goes back, while the follower is killed mid-apply
    (torn page 1, all pages written, or at a random point) and restarted.
    SQLREPL_FOLLOW_KILLS sets the number of kills (20 by default, ~25 s)."""
    _bank(tmp_path, file_url(tmp_path / "replica"), kills=int(os.environ.get("SQLREPL_FOLLOW_KILLS", "20")))


@pytest.mark.s3
def test_bank_follow_from_s3(tmp_path: Path, s3_url: str) -> None:
    """The same bank, replicated to SeaweedFS and followed from it."""
    _bank(tmp_path, s3_url, kills=3)


def _write(path: Path, url: str | None, rows: int, options: sqlrepl.Options | None = None) -> int:
    with sqlrepl.connect(path, url, options=options or fast_options()) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
        conn.executemany("INSERT INTO t(v) VALUES (?)", [(os.urandom(200),) for _ in range(rows)])
    sqlrepl.sync(path)
    return sqlrepl.status(path).txid


def _count(path: Path) -> tuple[int]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM t").fetchone()  # type: ignore[no-any-return]
    finally:
        conn.close()


def test_follow_restores_then_applies_each_segment(tmp_path: Path) -> None:
    """A follower restores a missing copy, then applies new segments; a reader
    with a long-lived connection sees each state; no GET for applied objects."""
    url = file_url(tmp_path / "replica")
    primary, copy = tmp_path / "p.db", tmp_path / "c.db"
    txid = _write(primary, url, 500)
    with sqlrepl.follow(copy, url, poll_interval=0.02) as f:
        seeded = f.wait(lambda s: s.txid >= txid, 60)
        assert seeded.txid == txid
        with open(copy, "rb") as raw:
            assert raw.read(20)[18:20] == b"\x01\x01"  # rollback-journal mode
        reader = sqlite3.connect(copy)
        for _ in range(5):
            txid = _write(primary, url, 300)
            f.wait(lambda s, t=txid: s.txid >= t, 60)
            assert reader.execute("SELECT count(*) FROM t").fetchone() == (_count(primary))
        gets = f.status().requests["GET"]
        assert gets == seeded.requests["GET"] + 5  # one segment per commit, nothing twice
        reader.close()
    assert integrity(copy) == [("ok",)]
    assert dump(copy) == dump(primary)
    assert f.status().state == "stopped"


def test_idle_follower_lists_once_per_poll_and_gets_nothing(tmp_path: Path) -> None:
    """With nothing new, each poll costs one LIST and no GET."""
    url = file_url(tmp_path / "replica")
    _write(tmp_path / "p.db", url, 10)
    with sqlrepl.follow(tmp_path / "c.db", url, poll_interval=0.01) as f:
        first = f.wait(lambda s: s.state == "following", 60)
        before, start = dict(first.requests), f._ticks
        pause = threading.Event()
        while f._ticks < start + 50:
            pause.wait(0.05)  # polling a counter, not timing an outcome
        after, ticks = f.status().requests, f._ticks - start
    assert after["GET"] == before["GET"]
    assert ticks <= after["LIST"] - before["LIST"] <= ticks + 2


def test_connect_on_a_followed_copy_is_refused(tmp_path: Path) -> None:
    """sqlrepl.connect on a copy a follower keeps raises a clear error; a
    second follower is refused too; once stopped, the copy opens."""
    url = file_url(tmp_path / "replica")
    _write(tmp_path / "p.db", url, 10)
    copy = tmp_path / "c.db"
    with sqlrepl.follow(copy, url, poll_interval=0.05) as f:
        f.wait(lambda s: s.state == "following", 60)
        with pytest.raises(sqlrepl.FollowedDatabaseError, match="read replica kept by a follower"):
            sqlrepl.connect(copy, file_url(tmp_path / "other"))
        with pytest.raises(sqlrepl.FollowedDatabaseError, match="already kept by another follower"):
            sqlrepl.follow(copy, url)
    sqlrepl.connect(copy).close()


def test_existing_database_is_not_overwritten(tmp_path: Path) -> None:
    """Following onto a database that is not a follower's copy is refused."""
    url = file_url(tmp_path / "replica")
    _write(tmp_path / "p.db", url, 10)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE x(y)")
    conn.close()
    with pytest.raises(sqlrepl.FollowedDatabaseError, match="not a copy kept by a follower"):
        sqlrepl.follow(other, url)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"poll_interval": 0}, "poll_interval must be a finite number of seconds > 0, got 0"),
        ({"poll_interval": float("nan")}, "poll_interval must be a finite number of seconds > 0, got nan"),
        ({"poll_interval": float("inf")}, "poll_interval must be a finite number of seconds > 0, got inf"),
        ({"poll_interval": "1"}, "poll_interval must be a finite number of seconds > 0, got '1'"),
        ({"poll_interval": True}, "poll_interval must be a finite number of seconds > 0, got True"),
        ({"lock_timeout": -1}, "lock_timeout must be a finite number of seconds >= 0, got -1"),
        ({"lock_timeout": float("inf")}, "lock_timeout must be a finite number of seconds >= 0, got inf"),
        ({"lock_timeout": None}, "lock_timeout must be a finite number of seconds >= 0, got None"),
        ({"generation_check_every": 0}, "generation_check_every must be a whole number >= 1, got 0"),
        ({"generation_check_every": 2.5}, "generation_check_every must be a whole number >= 1, got 2.5"),
        ({"generation_check_every": True}, "generation_check_every must be a whole number >= 1, got True"),
        ({"overwrite": "no"}, "overwrite must be True or False, got 'no'"),
        ({"on_apply": 5}, "on_apply must be a function taking a FollowStatus, or None, got 5"),
        ({"database": 5}, "database must be the path of the copy to keep, got 5"),
        ({"database": ""}, "database must be the path of the copy to keep, got ''"),
        ({"database": "DIR"}, "is a directory; give the path of a database file"),
        ({"replica": 5}, "replica must be one replica URL or a replica client, got 5"),
        ({"replica": None}, "replica must be one replica URL or a replica client, got None"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, arguments: dict[str, object], message: str) -> None:
    """Each nonsensical argument of follow() raises ConfigError naming it, before any file is made."""
    given: dict[str, object] = {"database": tmp_path / "c.db", "replica": file_url(tmp_path / "replica")}
    given.update(arguments)
    if given["database"] == "DIR":
        given["database"] = tmp_path
    with pytest.raises(sqlrepl.ConfigError) as info:
        sqlrepl.follow(**given)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_edge_arguments_are_accepted(tmp_path: Path) -> None:
    """The smallest sensible values (a tiny poll interval, no lock wait) are accepted."""
    follower = sqlrepl.Follower(
        tmp_path / "c.db",
        file_url(tmp_path / "replica"),
        poll_interval=0.001,
        lock_timeout=0,
        generation_check_every=1,
        overwrite=True,
        on_apply=print,
    )
    assert (follower.poll_interval, follower.lock_timeout, follower.generation_check_every) == (0.001, 0, 1)
    follower.stop()


def test_new_generation_is_followed_from_its_snapshot(tmp_path: Path) -> None:
    """When the primary starts a new generation (its staging deleted), the
    follower moves to it, and a reader sees the new state whole."""
    url = file_url(tmp_path / "replica")
    primary, copy = tmp_path / "p.db", tmp_path / "c.db"
    txid = _write(primary, url, 400)
    with sqlrepl.follow(copy, url, poll_interval=0.02, generation_check_every=3) as f:
        first = f.wait(lambda s: s.txid >= txid, 60)
        reader = sqlite3.connect(copy)
        sqlrepl.stop_all()
        shutil.rmtree(str(primary) + "-sqlrepl")
        with sqlrepl.connect(primary, url, options=fast_options()) as conn:
            conn.execute("DELETE FROM t WHERE id % 3 = 0")
        sqlrepl.sync(primary)
        new_gen, new_txid = sqlrepl.status(primary).generation, sqlrepl.status(primary).txid
        assert new_gen != first.generation
        moved = f.wait(lambda s: s.generation == new_gen and s.txid >= new_txid, 60)
        assert (moved.generation, moved.txid) == (new_gen, new_txid)
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (_count(primary))
        reader.close()
    assert dump(copy) == dump(primary)


class _Switchable:
    """A replica client that can be made to fail like an unreachable store."""

    def __init__(self, inner: ReplicaClient) -> None:
        self.inner = inner
        self.down = False

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def stats(self) -> RequestStats:
        return self.inner.stats

    def _check(self) -> None:
        if self.down:
            raise sqlrepl.ReplicaUnavailableError("connection refused (test)", replica=self.url)

    async def check(self) -> None:
        self._check()

    async def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        raise NotImplementedError

    async def get(self, key: str) -> bytes:
        self._check()
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        self._check()
        return await self.inner.get_range(key, start, length)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        self._check()
        return await self.inner.list(prefix)

    async def delete(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_unreachable_replica_keeps_serving_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the replica fails, the copy keeps its last state, status() and
    the log say so; when it is back, the follower catches up."""
    url = file_url(tmp_path / "replica")
    primary, copy = tmp_path / "p.db", tmp_path / "c.db"
    txid = _write(primary, url, 50)
    client = _Switchable(sqlrepl.open_replica(url))
    with sqlrepl.follow(copy, client, poll_interval=0.02) as f:  # type: ignore[arg-type]
        f.wait(lambda s: s.txid >= txid, 60)
        client.down = True
        down = f.wait(lambda s: not s.reachable, 60)
        assert "connection refused" in (down.error or "")
        assert down.txid == txid
        assert down.state == "following"
        assert _count(copy) == (50,)
        assert any("unreachable, serving txid" in r.getMessage() for r in caplog.records)
        txid = _write(primary, url, 50)
        client.down = False
        back = f.wait(lambda s: s.reachable and s.txid >= txid, 60)
        assert back.txid == txid
    assert _count(copy) == (100,)


def _read_until(stream: IO[str], prefix: str) -> None:
    while not (line := stream.readline()).startswith(prefix):
        assert line, f"the command ended before printing {prefix!r}"


def test_cli_follow_in_the_foreground(tmp_path: Path) -> None:
    """``sqlrepl follow`` restores, applies each new state (printing it with
    --progress) and stops cleanly on SIGTERM."""
    url = file_url(tmp_path / "replica")
    primary, copy = tmp_path / "p.db", tmp_path / "c.db"
    txid = _write(primary, url, 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlrepl", "follow", str(copy), url, "--poll-interval", "0.05", "--progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("following")
        _read_until(proc.stdout, f"at txid {txid} ")
        assert _count(copy) == (20,)
        txid = _write(primary, url, 30)
        _read_until(proc.stdout, f"at txid {txid} ")
        assert _count(copy) == (50,)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip().endswith("stopped")


def test_a_copy_written_by_someone_else_is_repaired(tmp_path: Path) -> None:
    """A write to the copy with plain sqlite3 is noticed (its change counter
    moved) at the next apply, and the copy is re-seeded to the primary's state."""
    url = file_url(tmp_path / "replica")
    primary, copy = tmp_path / "p.db", tmp_path / "c.db"
    txid = _write(primary, url, 100)
    with sqlrepl.follow(copy, url, poll_interval=0.02, generation_check_every=2) as f:
        f.wait(lambda s: s.txid >= txid, 60)
        rogue = sqlite3.connect(copy)
        rogue.execute("DELETE FROM t WHERE id > 10")
        rogue.commit()
        rogue.close()
        txid = _write(primary, url, 5)
        repaired = f.wait(lambda s: s.txid >= txid, 60)
        assert repaired.txid == txid
    assert _count(copy) == (105,)
    assert dump(copy) == dump(primary)


def test_a_long_read_puts_an_apply_off_and_sees_its_own_state(tmp_path: Path) -> None:
    """A read transaction that outlasts lock_timeout keeps its state whole; the
    apply is put off (status says so) and happens once the reader is done."""
    url = file_url(tmp_path / "replica")
    primary, copy = tmp_path / "p.db", tmp_path / "c.db"
    txid = _write(primary, url, 10)
    with sqlrepl.follow(copy, url, poll_interval=0.02, lock_timeout=0.1) as f:
        f.wait(lambda s: s.txid >= txid, 60)
        reader = sqlite3.connect(copy, isolation_level=None)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (10,)
        new_txid = _write(primary, url, 10)
        put_off = f.wait(lambda s: "apply put off" in (s.error or ""), 60)
        assert put_off.txid == txid
        gets = put_off.requests["GET"]
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (10,)
        reader.execute("COMMIT")
        done = f.wait(lambda s: s.txid >= new_txid, 60)
        assert done.txid == new_txid
        assert done.requests["GET"] == gets  # what was fetched is applied, not fetched again
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (20,)
        reader.close()


def test_a_merged_segment_that_covers_the_copy_is_applied(tmp_path: Path) -> None:
    """When the segments after the copy's txid were merged into one that
    starts before it (compaction, then retention of the small ones), the
    follower applies the merged one, checked by its "after" checksum."""
    root = tmp_path / "replica"
    url = file_url(root)
    primary, copy = tmp_path / "p.db", tmp_path / "c.db"
    _write(primary, url, 10)
    at = _write(primary, url, 10)
    with sqlrepl.follow(copy, url, poll_interval=0.02) as f:
        f.wait(lambda s: s.txid >= at, 60)
    _write(primary, url, 10)
    last = _write(primary, url, 10)
    segments = sorted(
        (key, path)
        for path in root.rglob("*.segment")
        if isinstance(key := _format.parse_key(path.relative_to(root).as_posix()), SegmentKey)
    )
    chain = [(k, p) for k, p in segments if k.last_txid >= at]
    assert chain[0][0].last_txid == at  # the merge starts before the copy's txid
    assert chain[-1][0].last_txid == last
    merged = tmp_path / "merged"
    with open(merged, "w+b") as out:
        header = merge_segments([str(p) for _k, p in chain], out)
    key = _format.segment_key(
        chain[0][0].generation, header.first_txid, header.last_txid, header.timestamp_ms
    )
    for _k, p in chain:
        p.unlink()
    os.replace(merged, root / key)
    with sqlrepl.follow(copy, url, poll_interval=0.02, generation_check_every=1) as f:
        done = f.wait(lambda s: s.txid >= last, 60)
    assert done.txid == last
    assert done.requests["GET"] == 1  # the merged segment alone: no re-seed
    assert dump(copy) == dump(primary)


def _listing(*keys: str) -> list[Generation]:
    return group_generations(ObjectInfo(k, 100) for k in keys)


def _decided(step: Step) -> tuple[str | None, bool, list[str]]:
    return (step.move_to.id if step.move_to else None, step.fresh, [k.key for k, _ in step.segments])


def test_next_step_decides_from_a_listing_alone() -> None:
    """next_step applies the segments that continue the copy, moves to a newer
    generation (or on a re-seed) fresh, and re-seeds when the chain is gone."""
    old, new = "20260101T000000000Z-aaaaaa", "20260102T000000000Z-bbbbbb"
    snap = _format.snapshot_key(old, 5, 1)
    seg = _format.segment_key(old, 6, 8, 2)
    merged = _format.segment_key(old, 3, 9, 3)
    assert _decided(next_step(_listing(seg), old, 5, reseed=False)) == (None, False, [])  # no snapshot
    assert _decided(next_step(_listing(snap, seg, merged), old, 5, reseed=False)) == (
        None,
        False,
        [merged, seg],
    )
    assert _decided(next_step(_listing(snap, seg), old, 8, reseed=False)) == (None, False, [])
    gap = _listing(snap, _format.segment_key(old, 7, 9, 2))
    assert _decided(next_step(gap, old, 5, reseed=False)) == (old, False, [])
    newer = _listing(snap, seg, _format.snapshot_key(new, 20, 4))
    assert _decided(next_step(newer, old, 8, reseed=False)) == (new, True, [])
    assert _decided(next_step(_listing(snap, seg), old, 8, reseed=True)) == (old, True, [])
