"""Bad input: each gets a clear sqlrepl error, and nothing is lost."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ROOT, assert_same_database, fast_options, file_url, query, restore_fresh

import sqlrepl
from sqlrepl import _replica_memory


def _replicate_some(db: str, url: str, rows: int = 50) -> None:
    conn = sqlrepl.connect(db, url, options=fast_options())
    conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(rows):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(500))")
        conn.commit()
    sqlrepl.sync(db, timeout=30)
    conn.close()


# -- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unknown scheme ftp://"),
        ("/var/backups/app", "unknown scheme \\(none\\)"),
        ("file://relative/path", "a host is not allowed"),
        ("file:///tmp/x?colour=blue", "unknown option"),
        ("memory://", "needs a name"),
        ("", "non-empty"),
    ],
)
def test_bad_replica_url_fails_at_connect(db_path: str, url: str, message: str) -> None:
    """A replica URL that cannot work is refused when connecting, with what to do."""
    with pytest.raises(sqlrepl.ConfigError, match=message):
        sqlrepl.connect(db_path, url)
    assert not os.path.exists(db_path)


def test_secrets_are_not_in_messages(db_path: str) -> None:
    """A password in a bad URL never reaches the error message."""
    with pytest.raises(sqlrepl.ConfigError) as info:
        sqlrepl.connect(db_path, "gopher://user:hunter2@host/x?secret_key=hunter3")
    assert "hunter2" not in str(info.value)
    assert "hunter3" not in str(info.value)


def test_in_memory_database_cannot_be_replicated(tmp_path: Path) -> None:
    """There is no WAL to read in an in-memory database: refused at connect."""
    for name in (":memory:", "file:x?mode=memory&cache=shared"):
        with pytest.raises(sqlrepl.ConfigError, match="in-memory"):
            sqlrepl.connect(name, file_url(tmp_path / "r"), uri=name.startswith("file:"))


def test_one_database_one_set_of_replicas(db_path: str, tmp_path: Path) -> None:
    """Two connections to one database naming different replicas are refused."""
    conn = sqlrepl.connect(db_path, file_url(tmp_path / "a"), options=fast_options())
    with pytest.raises(sqlrepl.ConfigError, match="already replicated"):
        sqlrepl.connect(db_path, file_url(tmp_path / "b"))
    conn.close()


def test_bad_options_are_refused() -> None:
    """Negative intervals and impossible thresholds are configuration errors."""
    with pytest.raises(sqlrepl.ConfigError, match="sync_interval"):
        sqlrepl.Options(sync_interval=-1)
    with pytest.raises(sqlrepl.ConfigError, match="checkpoint_frames"):
        sqlrepl.Options(checkpoint_frames=0)
    with pytest.raises(sqlrepl.ConfigError, match="wal_restart_frames"):
        sqlrepl.Options(checkpoint_frames=5000)  # above the default wal_restart_frames
    with pytest.raises(sqlrepl.ConfigError, match="segment_max_bytes"):
        sqlrepl.Options(segment_max_bytes=0)
    with pytest.raises(sqlrepl.ConfigError, match="durability"):
        sqlrepl.connect(":memory:", durability="eventually")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"timestamp": float("nan")}, "timestamp must be a finite time"),
        ({"timestamp": float("inf")}, "timestamp must be a finite time"),
        ({"timestamp": 1e30}, "timestamp must be a finite time"),
        ({"timestamp": True}, "timestamp must be a datetime, Unix seconds or an ISO 8601 string"),
        ({"timestamp": [1]}, "timestamp must be a datetime"),
        ({"timestamp": "yesterday"}, "is not ISO 8601"),
        ({"txid": "3"}, "txid must be a whole number >= 0"),
        ({"txid": 2.5}, "txid must be a whole number >= 0"),
        ({"txid": True}, "txid must be a whole number >= 0"),
        ({"txid": -1}, "txid must be a whole number >= 0"),
        ({"txid": 1, "timestamp": 1}, "not both"),
        ({"parallelism": 0}, "parallelism must be a whole number >= 1"),
        ({"parallelism": "8"}, "parallelism must be a whole number >= 1"),
        ({"generation": 5}, "generation must be a generation id"),
        # A string would count as true: "no" would overwrite.
        ({"overwrite": "no"}, "overwrite must be True or False, got 'no'"),
        ({"fallback": "false"}, "fallback must be True or False"),
        ({"quick_check": 1}, "quick_check must be True or False"),
        ({"if_db_not_exists": None}, "if_db_not_exists must be True or False"),
        ({"if_replica_exists": "yes"}, "if_replica_exists must be True or False"),
    ],
)
def test_bad_restore_arguments_are_config_errors(
    tmp_path: Path, arguments: dict[str, object], message: str
) -> None:
    """Every malformed restore argument is a ConfigError naming it, before anything is downloaded."""
    replica = file_url(tmp_path / "r")
    _replicate_some(str(tmp_path / "src.db"), replica, rows=2)
    target = tmp_path / "out.db"
    with pytest.raises(sqlrepl.ConfigError, match=message):
        sqlrepl.restore(target, replica, **arguments)  # type: ignore[arg-type]
    assert not target.exists()


def test_restore_target_that_cannot_be_a_file(tmp_path: Path) -> None:
    """A restore target that is a directory, or lies below a file, is refused with what to do."""
    replica = file_url(tmp_path / "r")
    _replicate_some(str(tmp_path / "src.db"), replica, rows=2)
    with pytest.raises(sqlrepl.ConfigError, match="is a directory; give the path of a database file"):
        sqlrepl.restore(tmp_path, replica)
    with pytest.raises(sqlrepl.ConfigError, match="is a directory"):
        sqlrepl.restore(tmp_path, replica, overwrite=True)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(sqlrepl.ConfigError, match="is a file, not a folder"):
        sqlrepl.restore(tmp_path / "notes.txt" / "app.db", replica)
    with pytest.raises(sqlrepl.ConfigError, match="replica must be a URL or a list of URLs"):
        sqlrepl.restore(tmp_path / "x.db", 5)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [float("nan"), -1, "3", True])
def test_bad_sync_timeout_is_a_config_error(db_path: str, tmp_path: Path, timeout: object) -> None:
    """sync() refuses a timeout that is not a number of seconds >= 0 (NaN would wait for ever)."""
    conn = sqlrepl.connect(db_path, file_url(tmp_path / "r"), options=fast_options())
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    with pytest.raises(sqlrepl.ConfigError, match="timeout must be a number of seconds >= 0"):
        sqlrepl.sync(db_path, timeout=timeout)  # type: ignore[arg-type]
    sqlrepl.sync(db_path, timeout=float("inf"))  # for ever is a valid wait
    conn.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sync_interval": float("nan")}, "option sync_interval must be a finite number"),
        ({"sync_interval": float("inf")}, "option sync_interval must be a finite number"),
        ({"sync_interval": True}, "option sync_interval must be a finite number"),
        ({"snapshot_interval": -5}, "option snapshot_interval"),
        ({"retention": -1}, r"option retention must be .*\(or None\)"),
        ({"compaction_interval": float("nan")}, "option compaction_interval"),
        ({"checkpoint_frames": 2.5}, "option checkpoint_frames must be a whole number"),
        ({"checkpoint_frames": "3"}, "option checkpoint_frames must be a whole number"),
        ({"staging_hard_limit": -1}, "option staging_hard_limit must be a whole number"),
    ],
)
def test_bad_option_values_are_refused(fields: dict[str, object], message: str) -> None:
    """Options that are NaN, infinite, negative, a bool or the wrong kind: Options() raises ConfigError."""
    with pytest.raises(sqlrepl.ConfigError, match=message):
        sqlrepl.Options(**fields)  # type: ignore[arg-type]


def test_options_must_be_options(db_path: str, tmp_path: Path) -> None:
    """connect(options=...) given something other than an Options instance: ConfigError."""
    with pytest.raises(sqlrepl.ConfigError, match=r"options must be a sqlrepl\.Options, got dict"):
        sqlrepl.connect(db_path, file_url(tmp_path / "r"), options={"sync_interval": 1})  # type: ignore[arg-type]
    assert not os.path.exists(db_path)


def test_bad_connect_arguments(tmp_path: Path) -> None:
    """connect() refuses a non-URL replica, a bad replicated_timeout, a directory and a missing folder."""
    url = file_url(tmp_path / "r")
    db = str(tmp_path / "app.db")
    with pytest.raises(sqlrepl.ConfigError, match="replica must be a URL or a list of URLs, got int"):
        sqlrepl.connect(db, 5)  # type: ignore[arg-type]
    with pytest.raises(sqlrepl.ConfigError, match="replicated_timeout must be a number of seconds"):
        sqlrepl.connect(db, url, durability="replicated", replicated_timeout=float("nan"))
    with pytest.raises(sqlrepl.ConfigError, match="is a directory; give the path of a database file"):
        sqlrepl.connect(tmp_path, url)
    with pytest.raises(sqlrepl.ConfigError, match="does not exist; create it first"):
        sqlrepl.connect(tmp_path / "no" / "app.db", url)
    assert not os.path.exists(db)


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """connect() on a text file says it is not a SQLite database, and leaves it alone."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\n" * 100)
    with pytest.raises(sqlrepl.WalModeError, match="is not a SQLite database"):
        sqlrepl.connect(notes, file_url(tmp_path / "r"))
    assert notes.read_text() == "hello world\n" * 100


# -- WAL mode ---------------------------------------------------------------------


def test_database_that_cannot_switch_to_wal(db_path: str, tmp_path: Path) -> None:
    """Another connection holding a rollback-journal transaction keeps the
    database out of WAL mode: a clear WalModeError, the data untouched."""
    plain = sqlite3.connect(db_path)
    plain.execute("CREATE TABLE t(x)")
    plain.execute("INSERT INTO t VALUES (1)")
    plain.commit()
    plain.execute("BEGIN")
    plain.execute("SELECT * FROM t").fetchall()  # holds a shared lock
    with pytest.raises(sqlrepl.WalModeError, match="WAL mode"):
        sqlrepl.connect(db_path, file_url(tmp_path / "r"), timeout=0.1)
    plain.rollback()
    assert plain.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert plain.execute("SELECT * FROM t").fetchall() == [(1,)]
    plain.close()


def test_read_only_database_is_not_in_wal_mode(db_path: str, tmp_path: Path) -> None:
    """A database opened read-only cannot be put in WAL mode: WalModeError."""
    plain = sqlite3.connect(db_path)
    plain.execute("CREATE TABLE t(x)")
    plain.commit()
    plain.close()
    with pytest.raises(sqlrepl.WalModeError, match=r"cannot put the database in WAL mode.*readonly"):
        sqlrepl.connect(f"file:{db_path}?mode=ro", file_url(tmp_path / "r"), uri=True)


# -- restore ----------------------------------------------------------------------


def _objects(replica: Path, suffix: str) -> list[Path]:
    return sorted(replica.rglob(f"*{suffix}"))


def test_corrupt_segment_at_restore(db_path: str, tmp_path: Path) -> None:
    """A flipped byte in a segment: CorruptObjectError naming it, no database written."""
    url = file_url(tmp_path / "replica")
    _replicate_some(db_path, url)
    segment = _objects(tmp_path / "replica", ".segment")[-1]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    target = tmp_path / "out" / "restored.db"
    with pytest.raises(sqlrepl.CorruptObjectError, match=segment.name.split("-")[0]) as info:
        sqlrepl.restore(str(target), url)
    assert "checksum" in str(info.value) or "decompress" in str(info.value)
    assert not target.exists()
    # No temporary files left behind; only the staging folder with the
    # restore lock (kept: deleting a lock file races with its waiters).
    assert os.listdir(target.parent) == ["restored.db-sqlrepl"]
    assert os.listdir(target.parent / "restored.db-sqlrepl") == ["restore.lock"]


@pytest.mark.parametrize("cut", [10, 96, 200])
def test_truncated_object_at_restore(db_path: str, tmp_path: Path, cut: int) -> None:
    """A segment cut short (inside the header, at its end, in the body) is caught."""
    url = file_url(tmp_path / "replica")
    _replicate_some(db_path, url)
    segment = _objects(tmp_path / "replica", ".segment")[-1]
    segment.write_bytes(segment.read_bytes()[:cut])
    target = tmp_path / "restored.db"
    with pytest.raises(sqlrepl.CorruptObjectError, match="truncated"):
        sqlrepl.restore(str(target), url)
    assert not target.exists()


def test_corrupt_snapshot_header(db_path: str, tmp_path: Path) -> None:
    """A damaged snapshot header is reported as such, not as a crash."""
    url = file_url(tmp_path / "replica")
    _replicate_some(db_path, url)
    snap = _objects(tmp_path / "replica", ".snapshot")[0]
    data = bytearray(snap.read_bytes())
    data[20] ^= 1
    snap.write_bytes(bytes(data))
    with pytest.raises(sqlrepl.CorruptObjectError, match="header checksum"):
        sqlrepl.restore(str(tmp_path / "restored.db"), url)


def test_missing_segment_is_a_gap_not_silent_loss(db_path: str, tmp_path: Path) -> None:
    """With a segment gone, restoring the newest state refuses and says what
    it could restore instead; that older state is then restorable."""
    url = file_url(tmp_path / "replica")
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    for i in range(6):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
        conn.commit()
        sqlrepl.sync(db_path)
    conn.close()
    segments = _objects(tmp_path / "replica", ".segment")
    assert len(segments) >= 3
    # A gap at one txid: every segment that covers it goes (a replica may hold
    # overlapping segments, merged ones beside the ones they merge).
    gap = int(segments[1].name.split("-")[0], 16)
    for segment in segments:
        first, last = (int(part, 16) for part in segment.name.split("-")[:2])
        if first <= gap <= last:
            segment.unlink()
    with pytest.raises(sqlrepl.RestoreError, match=r"segments are missing after txid (\d+).*txid=") as info:
        sqlrepl.restore(str(tmp_path / "restored.db"), url)
    before_gap = int(str(info.value).split("txid=")[1].split()[0])
    result = restore_fresh(url, tmp_path / "older.db", txid=before_gap)
    assert result.txid == before_gap


def test_restore_never_overwrites_unless_asked(db_path: str, tmp_path: Path) -> None:
    """An existing database is left alone by default, refused when required,
    replaced only with overwrite=True."""
    url = file_url(tmp_path / "replica")
    _replicate_some(db_path, url)
    other = tmp_path / "other.db"
    other.write_bytes(b"precious")
    assert sqlrepl.restore(str(other), url) is None
    with pytest.raises(sqlrepl.DatabaseExistsError, match="overwrite=True"):
        sqlrepl.restore(str(other), url, if_db_not_exists=False)
    assert other.read_bytes() == b"precious"
    assert sqlrepl.restore(str(other), url, overwrite=True) is not None
    assert_same_database(db_path, other)


def test_empty_replica(tmp_path: Path) -> None:
    """An empty replica is a no-op by default (first boot), an error on request."""
    url = file_url(tmp_path / "nothing-here")
    assert sqlrepl.restore(str(tmp_path / "a.db"), url) is None
    with pytest.raises(sqlrepl.NoBackupError, match="no snapshot"):
        sqlrepl.restore(str(tmp_path / "a.db"), url, if_replica_exists=False)


def test_stale_wal_beside_target_is_moved_aside(db_path: str, tmp_path: Path) -> None:
    """A leftover -wal next to the restore target would be replayed onto the
    restored database by SQLite: it is renamed aside, not deleted."""
    url = file_url(tmp_path / "replica")
    _replicate_some(db_path, url)
    target = tmp_path / "restored.db"
    Path(str(target) + "-wal").write_bytes(b"stale wal from another life")
    restore_fresh(url, target)
    assert not Path(str(target) + "-wal").exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("restored.db-wal.stale-")]
    assert len(aside) == 1
    assert aside[0].read_bytes() == b"stale wal from another life"
    assert_same_database(db_path, target)


# -- stores that fail ------------------------------------------------------------


def test_failing_store_never_blocks_commits(db_path: str, tmp_path: Path) -> None:
    """A store that fails every request: commits go on at full speed, sync
    times out naming the replica and its error, and once the store is back
    everything reaches it."""
    name = f"flaky-{os.getpid()}-{time.monotonic_ns()}"
    url = f"memory://{name}"
    _replica_memory.fail_next(name, 10_000)
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    # The store fails every request throughout: a commit that waited for it
    # would never return (no clock needed to see that).
    for i in range(500):
        conn.execute("INSERT INTO t(v) VALUES (?)", (str(i),))
        conn.commit()
    assert _replica_memory._failures[name], "the store recovered during the commits: nothing was shown"
    with pytest.raises(sqlrepl.SyncTimeoutError, match=rf"memory://{name}.*injected failure") as info:
        sqlrepl.sync(db_path, timeout=1)
    assert "committed locally" in str(info.value)
    assert sqlrepl.status(db_path).replicas[0].last_error is not None
    _replica_memory._failures[name].clear()  # the store recovers
    sqlrepl.sync(db_path, timeout=30)
    conn.close()
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    assert_same_database(db_path, restored)


def test_one_failing_replica_does_not_hold_back_another(db_path: str, tmp_path: Path) -> None:
    """With a folder and a failing store, the folder keeps up on its own."""
    name = f"down-{os.getpid()}-{time.monotonic_ns()}"
    _replica_memory.fail_next(name, 10_000)
    good = file_url(tmp_path / "good")
    conn = sqlrepl.connect(db_path, [good, f"memory://{name}"], options=fast_options())
    conn.execute("CREATE TABLE t(x)")
    for i in range(100):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
        conn.commit()
    # No sync() here: it waits for every replica. Wait until the folder
    # holds the last commit (restored from it, all 100 rows there).
    deadline = time.monotonic() + 120
    for attempt in range(10**6):
        st = sqlrepl.status(db_path)
        if st.replicas[0].txid == st.txid:
            restored = tmp_path / f"restored-{attempt}.db"
            restore_fresh(good, restored)
            if query(restored, "SELECT count(*) FROM t") == [(100,)]:
                break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert st.replicas[1].txid < st.txid
    assert st.replicas[1].last_error is not None
    conn.close()
    assert_same_database(db_path, restored)


UNWRITABLE = r"""
import os, sys, time, sqlrepl
sys.path.insert(0, sys.argv[4])
from helpers import fast_options
# Import now what the replicator loads lazily, then stop being root (root
# ignores file permissions): only the effective ids change, so this works
# wherever the interpreter is installed.
import asyncio, anyio._backends._asyncio, concurrent.futures.thread, selectors, urllib.parse
import sqlrepl._replica_file
if os.geteuid() == 0:
    os.setegid(65534)
    os.seteuid(65534)
db, url, flag = sys.argv[1], sys.argv[2], sys.argv[3]
conn = sqlrepl.connect(db, url, options=fast_options())
conn.execute("CREATE TABLE t(x)")
for i in range(200):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.commit()
print("committed", flush=True)
try:
    sqlrepl.sync(db, timeout=2)
except sqlrepl.SyncTimeoutError as exc:
    print("timeout:", exc, flush=True)
    print("error:", sqlrepl.status(db).replicas[0].last_error, flush=True)
while not os.path.exists(flag):
    time.sleep(0.05)
sqlrepl.sync(db, timeout=30)
print("synced", flush=True)
"""


def test_replica_folder_that_cannot_be_written(tmp_path: Path) -> None:
    """A replica folder without write permission: commits work, the error
    says permission denied and what to do, and after the folder is fixed
    everything is replicated. Run as an unprivileged user (root ignores
    permissions)."""
    work = Path(tempfile.mkdtemp(prefix="sqlrepl-perm-"))
    try:
        os.chmod(work, 0o777)
        replica = work / "replica"
        replica.mkdir(mode=0o555)
        flag = work / "fixed"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                UNWRITABLE,
                str(work / "app.db"),
                file_url(replica),
                str(flag),
                str(Path(__file__).parent),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(work)},
        )
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("committed"), (lines, proc.stderr.read() if proc.stderr else "")
        assert lines[1].startswith("timeout:")
        assert "permission denied" in lines[2]
        assert "make the folder writable" in lines[2]
        os.chmod(replica, 0o777)
        flag.touch()
        out, err = proc.communicate(timeout=60)
        assert "synced" in out, err
        restored = work / "restored.db"
        restore_fresh(file_url(replica), restored)
        assert_same_database(work / "app.db", restored)
    finally:
        shutil.rmtree(work, ignore_errors=True)


FULL_DISK = r"""
import logging, os, subprocess, sys, threading, sqlrepl
sys.path.insert(0, sys.argv[3])
from helpers import fast_options
db, url = sys.argv[1], sys.argv[2]
staging = db + "-sqlrepl"
full = threading.Event()
class Seen(logging.Handler):
    def emit(self, record):
        if "No space left on device" in record.getMessage():
            full.set()
logging.getLogger("sqlrepl").addHandler(Seen())
conn = sqlrepl.connect(db, url, options=fast_options())
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
conn.commit()
sqlrepl.sync(db, timeout=30)
for i in range(300):
    conn.execute("INSERT INTO t(v) VALUES (randomblob(8000))")
    conn.commit()
# (Capture goes on in pieces that fit, so this disk may not stay full: the
# error is an event, not a state.)
assert full.wait(60), "no space error was never reported"
print("reported: No space left on device", flush=True)
subprocess.run(["mount", "-o", "remount,size=64m", staging], check=True)
sqlrepl.sync(db, timeout=30)
print("synced", flush=True)
conn.close()
"""


def test_full_disk_under_staging(tmp_path: Path) -> None:
    """The staging folder's disk fills up: commits go on (the WAL keeps the
    data, pinned), the error says no space, and the replica gets everything
    (once space is back at the latest). A real full filesystem: a 512 KiB tmpfs mounted
    on the staging folder inside a private mount namespace."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.fail("needs unshare and mount (util-linux) to make a real full disk")
    db = tmp_path / "app.db"
    staging = Path(str(db) + "-sqlrepl")
    staging.mkdir()
    url = file_url(tmp_path / "replica")
    script = (
        f"mount -t tmpfs -o size=512k tmpfs {staging} && "
        f"exec {sys.executable} -c '{FULL_DISK}' {db} {url} {Path(__file__).parent}"
    )
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "reported: No space left on device" in out.stdout
    assert "synced" in out.stdout
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    assert_same_database(db, restored)


def test_concurrent_restores_do_not_race(db_path: str, tmp_path: Path) -> None:
    """Four processes restore the same missing database at once (workers of
    one app starting together): exactly one restores, the others find it
    there, and the result is intact."""
    url = file_url(tmp_path / "replica")
    _replicate_some(db_path, url, rows=300)
    with sqlrepl.connect(db_path, url) as conn:  # big enough that restores would overlap
        conn.execute("INSERT INTO t(v) SELECT randomblob(20000) FROM t")
    sqlrepl.sync(db_path)
    target = tmp_path / "target" / "app.db"
    # A start barrier on events: each process imports sqlrepl, says ready,
    # and restores when told to; all are told once all are ready.
    code = """
        import sys, sqlrepl
        print("ready", flush=True)
        sys.stdin.readline()
        result = sqlrepl.restore(sys.argv[1], sys.argv[2])
        print("restored" if result else "skipped")
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(target), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(4)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outcomes.append(out.strip())
    assert sorted(outcomes) == ["restored", "skipped", "skipped", "skipped"]
    assert not [p for p in target.parent.iterdir() if ".stale-" in p.name]
    assert_same_database(db_path, target)


def test_restore_from_the_first_replica_that_can(db_path: str, tmp_path: Path) -> None:
    """Given several replicas, restore skips an unreachable one and an empty
    one and uses the next; if none can be read, the first error is raised
    (an unreachable replica never passes for an empty one)."""
    good = file_url(tmp_path / "replica")
    _replicate_some(db_path, good)
    name = f"down-{os.getpid()}-{time.monotonic_ns()}"
    _replica_memory.fail_next(name, 100)
    empty = file_url(tmp_path / "empty")
    result = sqlrepl.restore(str(tmp_path / "a.db"), [f"memory://{name}", empty, good])
    assert result is not None
    assert_same_database(db_path, tmp_path / "a.db")
    with pytest.raises(sqlrepl.ReplicaUnavailableError, match="injected failure"):
        sqlrepl.restore(str(tmp_path / "b.db"), [f"memory://{name}", empty])
    assert sqlrepl.restore(str(tmp_path / "c.db"), [empty, file_url(tmp_path / "empty2")]) is None


def test_file_replica_path_through_a_file(tmp_path: Path) -> None:
    """A folder replica whose path runs through a regular file is an error,
    not an empty replica."""
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(sqlrepl.ReplicaNotFoundError, match="not a folder"):
        sqlrepl.restore(str(tmp_path / "x.db"), file_url(tmp_path / "plain" / "replica"))
    with pytest.raises(sqlrepl.ReplicaNotFoundError, match="not a folder"):
        sqlrepl.restore(str(tmp_path / "x.db"), file_url(tmp_path / "plain"))


def _parted_replica(db: str, name: str) -> str:
    """A memory replica of a database whose snapshot (~1.6 MiB of random
    rows) and some of whose segments are larger than a 64 KiB restore part."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)"
        " INSERT INTO t(v) SELECT randomblob(4000) FROM n"
    )
    conn.commit()
    conn.close()
    url = f"memory://{name}"
    conn = sqlrepl.connect(db, url, options=fast_options())
    for i in range(6):
        conn.execute(f"INSERT INTO t(v) SELECT randomblob({200 if i % 2 else 4000}) FROM t LIMIT 40")
        conn.commit()
        sqlrepl.sync(db, timeout=30)
    conn.close()
    sqlrepl.stop_all()
    return url


def test_a_part_that_fails_mid_object_fails_the_restore(
    db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ranged GET failing in the middle of a large object, with later
    objects already downloading: the store's error, no database, no hang."""
    from sqlrepl import _restore

    url = _parted_replica(db_path, f"parts-{os.getpid()}-{time.monotonic_ns()}")
    monkeypatch.setattr(_restore, "PART_SIZE", 64 << 10)
    real = _replica_memory.MemoryReplicaClient.get_range

    async def flaky(self: _replica_memory.MemoryReplicaClient, key: str, start: int, length: int) -> bytes:
        if key.endswith(".snapshot") and start == 10 * (64 << 10):
            raise sqlrepl.ReplicaUnavailableError(f"{self.url}: injected failure", replica=self.url)
        return await real(self, key, start, length)

    monkeypatch.setattr(_replica_memory.MemoryReplicaClient, "get_range", flaky)
    target = tmp_path / "out" / "restored.db"
    with pytest.raises(sqlrepl.ReplicaUnavailableError, match="injected failure"):
        sqlrepl.restore(str(target), url)
    assert not target.exists()
    assert os.listdir(target.parent) == ["restored.db-sqlrepl"]


def test_a_corrupt_part_fails_the_restore(
    db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part whose bytes changed on the way: the object's checksum catches it."""
    from sqlrepl import _restore

    name = f"parts-{os.getpid()}-{time.monotonic_ns()}"
    url = _parted_replica(db_path, name)
    monkeypatch.setattr(_restore, "PART_SIZE", 64 << 10)
    objects = _replica_memory.store(name)
    snapshot = next(k for k in objects if k.endswith(".snapshot"))
    data = bytearray(objects[snapshot])
    data[5 * (64 << 10) + 17] ^= 0x40
    objects[snapshot] = bytes(data)
    with pytest.raises(sqlrepl.CorruptObjectError, match="snapshot"):
        sqlrepl.restore(str(tmp_path / "restored.db"), url)
    assert not (tmp_path / "restored.db").exists()


def test_objects_in_many_parts_restore_whole(
    db_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same replica restored in 64 KiB parts (dozens of ranged GETs in
    flight across objects, applied in order) is the database exactly."""
    from sqlrepl import _restore

    name = f"parts-{os.getpid()}-{time.monotonic_ns()}"
    url = _parted_replica(db_path, name)
    monkeypatch.setattr(_restore, "PART_SIZE", 64 << 10)
    result = restore_fresh(url, tmp_path / "restored.db")
    sizes = [len(v) for k, v in _replica_memory.store(name).items() if k.endswith((".snapshot", ".segment"))]
    assert sum(1 for s in sizes if s > (64 << 10)) >= 2, sizes  # several objects came in parts
    assert result.objects >= 2
    assert_same_database(db_path, tmp_path / "restored.db")
