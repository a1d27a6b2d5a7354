"""Local faults under a running app: the staging disk fills up, the database
file is replaced, the -wal file is deleted. Replication must not wedge (nor
stop() hang), and must say what happened."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, assert_restores_equal, fast_options, file_url, wait_for

import sqlrepl
from sqlrepl import _livewal

# The start of each script run with its staging folder on a small tmpfs
# (argv: the database, the replica URL, this folder, and what the test adds).
PROLOGUE = r"""
import asyncio, errno, os, sqlite3, sys, threading, time, sqlrepl
sys.path.insert(0, sys.argv[3])
from helpers import fast_options, fill_disk, wait_for, wait_for_disk_full_error
db, url = sys.argv[1], sys.argv[2]
staging = db + "-sqlrepl"
"""

FULL_STAGING = (
    PROLOGUE
    + r"""
conn = sqlrepl.connect(db, url, options=fast_options())
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
conn.commit()
sqlrepl.sync(db, timeout=60)
filler = os.path.join(staging, "filler")
size = fill_disk(filler)  # to the last byte
for i in range(700):  # about 5.7 MB of incompressible pages: more than is freed below
    conn.execute("INSERT INTO t(v) VALUES (randomblob(8000))")
    conn.commit()
print("committed while full", flush=True)
print("error:", wait_for_disk_full_error(db).error, flush=True)
wal = os.path.getsize(db + "-wal")
os.truncate(filler, max(0, size - (3 << 20)))  # 3 MiB free: less than the backlog
st = os.statvfs(staging)
print(f"WAL {wal} bytes, staging free {st.f_bavail * st.f_frsize} bytes", flush=True)
sqlrepl.sync(db, timeout=120)
print("synced", flush=True)
print("error after:", sqlrepl.status(db).error, flush=True)
conn.close()
sqlrepl.stop_all(timeout=10)
print("stopped", flush=True)
left = [name for _, _, files in os.walk(staging) for name in files if name.startswith(".tmp-")]
print("temporaries left:", left, flush=True)
"""
)


def _in_private_tmpfs(folder: Path, size: str, script: str, *args: str, timeout: float) -> str:
    """Run ``script`` with a ``size`` tmpfs mounted on ``folder`` inside a
    private mount namespace (so nothing is left mounted); return its output.
    Skips the test when this machine does not let us mount."""
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or user namespaces): {probe.stderr.strip()}")
    out = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f'mount -t tmpfs -o size={size} tmpfs {folder} && exec "$0" "$@"',
            sys.executable,
            "-c",
            script,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def _on_small_staging(tmp_path: Path, size: str, script: str, *args: str) -> tuple[Path, str, str]:
    """Run ``script`` (see PROLOGUE) for ``tmp_path/app.db`` replicated to a
    folder, its staging folder on a ``size`` tmpfs; return the database, the
    replica URL and what the script printed."""
    db = tmp_path / "app.db"
    staging = Path(f"{db}-sqlrepl")
    staging.mkdir()
    url = file_url(tmp_path / "replica")
    here = str(Path(__file__).parent)
    return db, url, _in_private_tmpfs(staging, size, script, str(db), url, here, *args, timeout=400)


def test_full_staging_with_a_backlog_larger_than_the_free_space(tmp_path: Path) -> None:
    """Staging on a full 8 MiB filesystem while about 6 MB is committed; then
    3 MiB is freed, less than the backlog: the error is in status(), capture
    goes on in pieces that fit, sync() returns, no temporary file is left
    behind and the replica restores equal to the live database."""
    db, url, out = _on_small_staging(tmp_path, "8m", FULL_STAGING)
    assert "error: staging folder" in out
    assert "out of disk space ([Errno 28] No space left on device; 0.0 MiB free)" in out
    assert out.count("is out of disk space") == 2  # status(), and one log line
    assert "synced" in out
    assert "error after: None" in out
    assert "committed while full" in out
    assert "stopped" in out
    assert "did not stop" not in out
    # Each write that met the full disk removed its temporary (which holds
    # the room freed: a leak of them wedged replication for good).
    assert "temporaries left: []" in out, out
    assert_restores_equal(url, db, tmp_path / "restored.db")


RECREATE = r"""
import os, sqlite3, sys
db = sys.argv[1]
for suffix in ("", "-wal", "-shm"):  # rm app.db*, as a user at a shell would
    os.unlink(db + suffix)
if sys.argv[2:] == ["wait"]:  # until told that sqlrepl saw the path empty
    print("deleted", flush=True)
    sys.stdin.readline()
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE other(id INTEGER PRIMARY KEY, name TEXT)")
conn.executemany("INSERT INTO other(name) VALUES (?)", [(f"new-{i}",) for i in range(500)])
print("created", flush=True)
sys.stdin.readline()  # the new database stays open (and its WAL live) until told
conn.close()
"""

REPLACE = r"""
import os, sqlite3, sys
db = sys.argv[1]
new = db + ".new"
conn = sqlite3.connect(new, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE other(id INTEGER PRIMARY KEY, name TEXT)")
conn.executemany("INSERT INTO other(name) VALUES (?)", [(f"new-{i}",) for i in range(500)])
conn.close()
for suffix in ("-wal", "-shm"):  # the old database's, which would apply to the new one
    os.unlink(db + suffix)
os.replace(new, db)
print("created", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("how", ["recreate", "recreate-after-seen", "recreate-mid-check", "replace"])
@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_database_replaced_under_a_running_app(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, how: str, kind: str
) -> None:
    """Another process deletes the database and creates a new one at its
    path (or moves a new file onto it) while the app runs and goes on
    writing through its old connection: sqlrepl says so in status() and
    replicates the new file as a new generation, so sync() returns and a
    restore equals the new database."""
    url = file_url(tmp_path / "replica") if kind == "file" else str(request.getfixturevalue("s3_url"))
    db = str(tmp_path / "app.db")
    script = [sys.executable, "-c", REPLACE if how == "replace" else RECREATE, db]
    if how.startswith("recreate-"):
        script.append("wait")
    conn = sqlrepl.connect(db, url, options=fast_options())
    try:
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        for i in range(200):
            conn.execute("INSERT INTO t(v) VALUES (?)", (f"old-{i}",))
            conn.commit()
        sqlrepl.sync(db, timeout=60)
        old_generation = sqlrepl.status(db).generation
        assert sqlrepl.status(db).replaced is None
        with subprocess.Popen(script, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as other:
            assert other.stdout is not None
            assert other.stdin is not None
            try:
                if how == "recreate-after-seen":
                    assert other.stdout.readline() == "deleted\n"
                    # sqlrepl sees the path empty and waits for a database there.
                    wait_for("the path seen empty", lambda: "was deleted" in (sqlrepl.status(db).error or ""))
                    other.stdin.write("\n")
                    other.stdin.flush()
                if how == "recreate-mid-check":
                    # The new file appears between the check that sees the
                    # path empty and the reopen that follows it.
                    assert other.stdout.readline() == "deleted\n"
                    raced: list[str] = []
                    real = _livewal.file_replaced

                    def racing(path: str, fd: int) -> str | None:
                        reason = real(path, fd)
                        if reason is not None and reason.endswith(" was deleted") and not raced:
                            other.stdin.write("\n")
                            other.stdin.flush()
                            raced.append(other.stdout.readline())
                        return reason

                    monkeypatch.setattr(_livewal, "file_replaced", racing)
                    assert wait_for("the race forced", lambda: raced) == ["created\n"]
                else:
                    assert other.stdout.readline() == "created\n"
                # The app's connection goes on writing, into the deleted file.
                for i in range(20):
                    conn.execute("INSERT INTO t(v) VALUES (?)", (f"lost-{i}",))
                    conn.commit()
                sqlrepl.sync(db, timeout=60)
                status = sqlrepl.status(db)
                assert status.replaced is not None, status
                # The same words whether the check saw the path empty or the new file.
                assert f"{db} was replaced" in status.replaced, status
                assert status.generation != old_generation
                assert_restores_equal(url, db, tmp_path / "restored.db")
                other.stdin.write("\n")
                other.stdin.flush()
                assert other.wait(60) == 0
            finally:
                if other.poll() is None:
                    other.kill()
    finally:
        # The app reconnects (its old connection still writes to the deleted
        # file) and goes on writing to the new one, in the new generation.
        conn.close()
    with sqlrepl.connect(db, url, options=fast_options()) as again:
        again.execute("INSERT INTO other(name) VALUES ('after')")
    sqlrepl.sync(db, timeout=60)
    assert sqlrepl.status(db).generation == status.generation
    assert_restores_equal(url, db, tmp_path / "restored-after.db")


GIVE_WAY_ON_FULL_STAGING = (
    PROLOGUE
    + r"""
from sqlrepl import _wal
conn = sqlrepl.connect(db, url, options=fast_options())
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
conn.commit()
sqlrepl.sync(db, timeout=60)
filler = os.path.join(staging, "filler")
size = fill_disk(filler)
for i in range(700):  # about 5.7 MB of incompressible pages
    conn.execute("INSERT INTO t(v) VALUES (randomblob(8000))")
    conn.commit()
wait_for_disk_full_error(db)
# Another connection's TRUNCATE checkpoint waits for sqlrepl's pin, which
# holds the uncopied backlog...
result = []
ckpt = sqlite3.connect(db, timeout=90, isolation_level=None, check_same_thread=False)
truncate = lambda: result.append(ckpt.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
thread = threading.Thread(target=truncate)
thread.start()
shm = _wal.long_lived_fd(db + "-shm")
def waiting():
    assert not result, result  # (returned before it ever waited: nothing was tested)
    return _wal.checkpointer_waiting(shm)
wait_for("the checkpoint to wait for the pin", waiting, interval=0.005)
print("checkpoint waiting", flush=True)
# ...and then room comes back, less than the backlog.
os.truncate(filler, max(0, size - (3 << 20)))
thread.join(180)
print("checkpoint", result, flush=True)
sqlrepl.sync(db, timeout=120)
print("synced", sqlrepl.status(db).generation, flush=True)
ckpt.close()
conn.close()
sqlrepl.stop_all(timeout=10)
"""
)


def test_a_foreign_checkpoint_gets_through_a_backlog_larger_than_the_free_space(tmp_path: Path) -> None:
    """Another connection's TRUNCATE checkpoint waits while the staging disk
    is full and the uncopied backlog is larger than the room that comes back:
    sqlrepl copies it in pieces that fit, so the checkpoint completes within
    its busy timeout, in the same generation, and the replica restores equal."""
    db, url, out = _on_small_staging(tmp_path, "8m", GIVE_WAY_ON_FULL_STAGING)
    assert "checkpoint waiting" in out
    assert "checkpoint [(0, 0, 0)]" in out, out
    assert "synced" in out
    assert "did not stop" not in out
    assert_restores_equal(url, db, tmp_path / "restored.db")


# A new generation on a full staging disk: SETUP, then what makes the next
# capture start a new generation (whose snapshot meets the full disk), then ROOM.
NEW_GENERATION_SETUP = r"""
conn = sqlrepl.connect(db, url, options=fast_options())
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
conn.execute("INSERT INTO t(v) VALUES (randomblob(200000))")
conn.commit()
sqlrepl.sync(db, timeout=60)
first = sqlrepl.status(db).generation
filler = os.path.join(staging, "filler")
"""

NEW_GENERATION_CAUSES = {
    # Written while sqlrepl is not running: the next start needs a new generation.
    "changed_while_stopped": r"""
conn.close()
sqlrepl.stop_all(timeout=10)
plain = sqlite3.connect(db, isolation_level=None)
plain.execute("INSERT INTO t(v) VALUES (randomblob(200000))")
plain.close()
fill_disk(filler)
conn = sqlrepl.connect(db, url, options=fast_options())
""",
    # The next capture finds continuity lost (as after a WAL reset it cannot prove).
    "continuity_lost": r"""
from sqlrepl import _capture
fill_disk(filler)
real = _capture.Capture.capture
def lost(self, *args, **kwargs):
    _capture.Capture.capture = real
    raise _capture.ContinuityLost("injected by the test")
_capture.Capture.capture = lost
""",
}

NEW_GENERATION_ROOM = r"""
conn.execute("INSERT INTO t(v) VALUES (randomblob(1000))")
conn.commit()
wait_for_disk_full_error(db)
print("role", sqlrepl.status(db).role, flush=True)
os.unlink(filler)
sqlrepl.sync(db, timeout=120)
print("synced", sqlrepl.status(db).generation != first, flush=True)
conn.close()
sqlrepl.stop_all(timeout=10)
"""


@pytest.mark.parametrize("cause", sorted(NEW_GENERATION_CAUSES))
def test_a_new_generation_waits_for_room_on_a_full_staging_disk(tmp_path: Path, cause: str) -> None:
    """A new generation is due while the staging disk is full (the database
    changed while sqlrepl was not running, or continuity is lost), so its
    snapshot finds no room: the replicator reports it and keeps trying (it
    does not fail for good), and once room comes back sync() returns in the
    new generation and the replica restores equal to the live database."""
    script = PROLOGUE + NEW_GENERATION_SETUP + NEW_GENERATION_CAUSES[cause] + NEW_GENERATION_ROOM
    db, url, out = _on_small_staging(tmp_path, "8m", script)
    assert "role replicating" in out, out
    assert "synced True" in out, out
    assert "crashed" not in out
    assert_restores_equal(url, db, tmp_path / "restored.db")


STOP_WITHOUT_WAL = r"""
import logging, os, sys, threading, sqlrepl
sys.path.insert(0, sys.argv[3])
from helpers import fast_options
db, url, wait_for = sys.argv[1], sys.argv[2], sys.argv[4]
seen = threading.Event()
class Watch(logging.Handler):
    def emit(self, record):
        if wait_for and wait_for in record.getMessage():
            seen.set()
logging.getLogger("sqlrepl").addHandler(Watch())
conn = sqlrepl.connect(db, url, options=fast_options(exit_timeout=2.0))
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
conn.commit()
sqlrepl.sync(db, timeout=60)
rep = sqlrepl.get_replicator(db)
# The app's connection goes on writing into the deleted -wal (SQLite keeps
# it open); sqlrepl can no longer read what the wal-index says is there.
os.unlink(db + "-wal")
conn.execute("INSERT INTO t(v) VALUES ('unreadable')")
conn.commit()
if wait_for:
    assert seen.wait(600), "never logged: " + wait_for
    print("seen", flush=True)
rep.stop(timeout=2.0)  # waits 2 s, plus a 5 s grace period for the thread
print("role", rep.status.role, flush=True)
os._exit(0)  # (a replicator thread still running must not hold the process)
"""


def _stop_without_wal(tmp_path: Path, wait_for: str) -> str:
    db = str(tmp_path / "app.db")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            STOP_WITHOUT_WAL,
            db,
            file_url(tmp_path / "replica"),
            str(Path(__file__).parent),
            wait_for,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_stop_returns_while_captures_keep_failing(tmp_path: Path) -> None:
    """Every capture fails ("WAL header does not match the wal-index") once
    the -wal file is deleted: stop() still ends the replicator."""
    out = _stop_without_wal(tmp_path, "")
    assert "role stopped" in out, out
    assert "did not stop" not in out


def test_stop_returns_while_a_new_generation_keeps_failing(tmp_path: Path) -> None:
    """After two minutes of failed captures the replicator tries a new
    generation, whose snapshot fails the same way: stop() still ends it."""
    out = _stop_without_wal(tmp_path, "times; starting a new generation")
    assert "seen" in out
    assert "role stopped" in out, out
    assert "did not stop" not in out


FIRST_START_ON_FULL_STAGING = (
    PROLOGUE
    + r"""
# Full before sqlrepl ever ran here: not even its writer id fits (out of
# bytes), or not even its folders (out of inodes).
fillers = []
try:
    while True:
        fillers.append(os.path.join(staging, f"filler{len(fillers)}"))
        with open(fillers[-1], "wb", buffering=0) as f:
            while sys.argv[4] == "bytes":
                f.write(b"\0" * 4096)
except OSError as exc:
    assert exc.errno == errno.ENOSPC, exc
conn = sqlrepl.connect(db, url, options=fast_options())
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
conn.execute("INSERT INTO t(v) VALUES (randomblob(1000))")
conn.commit()
def full_and_not_failed():
    status = sqlrepl.status(db)
    assert status.role != "failed", status
    return "No space left on device" in (status.error or "")
wait_for("a full staging disk in status().error", full_and_not_failed)
print("error:", sqlrepl.status(db).error, flush=True)
print("role", sqlrepl.status(db).role, flush=True)
for filler in fillers:
    if os.path.exists(filler):
        os.unlink(filler)
sqlrepl.sync(db, timeout=120)
print("synced", flush=True)
print("error after:", sqlrepl.status(db).error, flush=True)
conn.close()
sqlrepl.stop_all(timeout=10)
"""
)


@pytest.mark.parametrize("full", ["bytes", "inodes"])
def test_first_start_on_a_full_staging_disk_waits_for_room(tmp_path: Path, full: str) -> None:
    """The staging disk is full (of bytes, or of inodes) before sqlrepl first
    runs, so not even its writer id (or its folders) can be stored: the
    replicator says so (status() and one log line) and keeps trying instead
    of crashing, and once room comes back sync() returns and the replica
    restores equal to the live database."""
    # (The size is a mount option: the inode limit goes with it.)
    size = "1m" if full == "bytes" else "1m,nr_inodes=64"
    db, url, out = _on_small_staging(tmp_path, size, FIRST_START_ON_FULL_STAGING, full)
    assert "error: staging folder" in out, out
    assert out.count("is out of disk space") == 2, out  # status(), and one log line
    assert "role starting" in out, out
    if full == "inodes":
        assert "MiB free, no free inodes)" in out, out
    assert "synced" in out, out
    assert "error after: None" in out, out
    assert "crashed" not in out, out
    assert_restores_equal(url, db, tmp_path / "restored.db")


RESEED_ON_FULL_STAGING = (
    PROLOGUE
    + r"""
from sqlrepl._replica import open_replica
conn = sqlrepl.connect(db, url, options=fast_options(replica_check_interval=0.2))
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
conn.execute("INSERT INTO t(v) VALUES (randomblob(100000))")
conn.commit()
sqlrepl.sync(db, timeout=60)
filler = os.path.join(staging, "filler")
fill_disk(filler, chunk=4096)
# Emptied behind sqlrepl's back (every object deleted, as an operator or a
# lifecycle rule would): the re-seed cannot record itself locally.
async def wipe():
    client = open_replica(url)
    try:
        # The writer record goes up just after the snapshot sync() waited
        # for: a listing taken before it would leave it, and the replica
        # would not look emptied.
        deadline = time.monotonic() + 120
        while not any(o.key.startswith("writers/") for o in await client.list()):
            assert time.monotonic() < deadline, "no writer record reached the replica"
            await asyncio.sleep(0.05)
        await client.delete([o.key for o in await client.list()])
    finally:
        await client.aclose()
asyncio.run(wipe())
def noticed():
    status = sqlrepl.status(db)
    return status.replicas[0].wipes and "No space left on device" in (status.error or "")
wait_for("the wipe noticed and the re-seed meeting the full disk", noticed)
print("noticed the wipe", flush=True)
os.unlink(filler)
conn.execute("INSERT INTO t(v) VALUES (randomblob(1000))")
conn.commit()
sqlrepl.sync(db, timeout=120)
print("synced", flush=True)
conn.close()
sqlrepl.stop_all(timeout=10)
"""
)


def test_a_reseed_on_a_full_staging_disk_is_not_the_replicas_failure(tmp_path: Path) -> None:
    """A replica is emptied while the staging disk is full, so its re-seed
    cannot record itself locally: that is reported as the full disk it is,
    not as a failing replica, and once room comes back sync() returns and
    the replica restores equal to the live database."""
    db, url, out = _on_small_staging(tmp_path, "1m", RESEED_ON_FULL_STAGING)
    assert "noticed the wipe" in out, out
    assert "synced" in out, out
    # (The wipe itself may fail a write of the replica's, which is its failure.)
    assert "failed ([Errno 28] No space left on device); retrying" not in out, out
    assert_restores_equal(url, db, tmp_path / "restored.db")


WAL_DELETED = r"""
import logging, os, sys, threading, sqlrepl
sys.path.insert(0, sys.argv[3])
from helpers import fast_options
db, url = sys.argv[1], sys.argv[2]
told, retries, deleted, retried = [], [], threading.Event(), threading.Event()
class Watch(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if "was deleted under the running app" in message:
            told.append(record.levelname)
        elif deleted.is_set() and "capture again" in message:
            retries.append(message)
            if len(retries) >= 5:  # (failed a few times since the deletion)
                retried.set()
logging.getLogger("sqlrepl").addHandler(Watch())
logging.getLogger("sqlrepl").setLevel(logging.DEBUG)
conn = sqlrepl.connect(db, url, options=fast_options(exit_timeout=2.0))
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
conn.execute("INSERT INTO t(v) VALUES ('replicated')")
conn.commit()
sqlrepl.sync(db, timeout=60)
rep = sqlrepl.get_replicator(db)
deleted.set()
os.unlink(db + "-wal")
conn.execute("INSERT INTO t(v) VALUES ('in the deleted WAL')")
conn.commit()
assert retried.wait(600), "captures never failed after the deletion"
print("error:", sqlrepl.status(db).error, flush=True)
print("told", told, flush=True)
sqlrepl.stop_all(timeout=2)  # (captures fail until then: it waits that long)
print("role", rep.status.role, flush=True)
conn.close()  # the last connection: SQLite writes the deleted WAL's commits into the database
"""


def test_wal_deleted_under_the_app_is_reported_with_what_to_do(tmp_path: Path) -> None:
    """The -wal file is deleted under the running app: status().error and
    one WARNING line (however many captures fail after it) say so and what
    to do; done (the app restarted), replication resumes as a new generation
    and the replica restores equal to the database, the commits made into
    the deleted WAL included."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    out = subprocess.run(
        [sys.executable, "-c", WAL_DELETED, db, url, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert f"error: the WAL file {db}-wal was deleted under the running app" in text, text
    assert "Restart the app" in text, text
    assert "told ['WARNING']" in text, text
    assert "role stopped" in text, text
    # The app restarted: a new generation holds what went into the deleted WAL.
    conn = sqlrepl.connect(db, url, options=fast_options())
    try:
        rows = conn.execute("SELECT v FROM t ORDER BY id").fetchall()
        assert rows == [("replicated",), ("in the deleted WAL",)]
        sqlrepl.sync(db, timeout=60)
        assert sqlrepl.status(db).error is None
    finally:
        conn.close()
        sqlrepl.stop_all(timeout=10)
    assert_restores_equal(url, db, tmp_path / "restored.db")
