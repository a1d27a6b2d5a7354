"""Replication to a real S3 server (SeaweedFS) that fails in every way it can."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from helpers import ROOT, assert_restores_equal, assert_same_database, fast_options, wait_for
from s3server import SeaweedS3

import sqlrepl

pytestmark = pytest.mark.s3

# Short client timeouts so that faults surface in seconds, not minutes.
FAST = "connect_timeout=1&read_timeout=2&max_attempts=2"
# Seconds after which a wait that should end by itself counts as hung: a
# guard against a hang, never a measure of speed.
HANG_GUARD = 120.0


def _write(conn: sqlrepl.Connection, n: int, size: int = 500) -> None:
    """Commit ``n`` small transactions."""
    for _ in range(n):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(?))", (size,))
        conn.commit()


@pytest.mark.slow
def test_server_killed_and_restarted(own_s3_server: SeaweedS3, db_path: str, tmp_path: Path) -> None:
    """The store dies mid-replication: commits go on while it stores none of
    them, sync times out, and after the restart everything reaches the store."""
    url = f"s3://own/app?endpoint={own_s3_server.endpoint}&{FAST}"
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    _write(conn, 100)
    sqlrepl.sync(db_path, timeout=30)
    stored = sqlrepl.status(db_path).replicas[0].txid
    own_s3_server.stop()
    _write(conn, 300)
    # All 300 committed, and captured, while the dead store took none of
    # them: no commit waited for it.
    wait_for("the commits captured", lambda: sqlrepl.status(db_path).txid >= stored + 300)
    assert sqlrepl.status(db_path).replicas[0].txid == stored
    with pytest.raises(sqlrepl.SyncTimeoutError, match="own/app"):
        sqlrepl.sync(db_path, timeout=3)
    assert sqlrepl.status(db_path).replicas[0].last_error is not None
    own_s3_server.start()
    _write(conn, 50)
    sqlrepl.sync(db_path, timeout=90)
    conn.close()
    assert_restores_equal(url, db_path, tmp_path / "restored.db")


@pytest.mark.slow
def test_commits_go_on_while_the_store_holds_an_upload(
    s3_server: SeaweedS3, s3_bucket: str, s3_env: dict[str, str], db_path: str, tmp_path: Path
) -> None:
    """A store that takes an upload and never answers (the client would wait
    600 s for it): 150 commits complete while it holds it, so none of them
    waited for the store; once it answers, everything is stored."""
    with FaultProxy("127.0.0.1", s3_server.s3_port) as proxy:
        url = f"s3://{s3_bucket}/app?endpoint={proxy.endpoint}&read_timeout=600"
        conn = sqlrepl.connect(db_path, url, options=fast_options(), check_same_thread=False)
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        conn.commit()
        sqlrepl.sync(db_path, timeout=30)
        proxy.inject("hold", times=10**6, method="PUT")
        stored = sqlrepl.status(db_path).replicas[0].txid
        holding = threading.Event()
        failed: list[BaseException] = []

        def commit() -> None:
            try:
                _write(conn, 1)  # its upload is the one the store holds
                assert holding.wait(HANG_GUARD), "no upload reached the store"
                _write(conn, 150)
            except BaseException as exc:  # (shown below, not lost with the thread)
                failed.append(exc)

        # The commits run in a thread of their own, so that one stuck behind
        # the held upload fails the test here rather than hanging it.
        writer = threading.Thread(target=commit, daemon=True)
        writer.start()
        try:
            wait_for("an upload held by the store", lambda: proxy.held or failed)
            holding.set()
            writer.join(HANG_GUARD)
            assert not writer.is_alive(), "a commit waited for the store"
            assert not failed, failed
            wait_for("the commits captured", lambda: sqlrepl.status(db_path).txid >= stored + 151)
            assert proxy.held >= 1
            assert sqlrepl.status(db_path).replicas[0].txid == stored  # the store answered nothing
        finally:
            proxy.release()
        sqlrepl.sync(db_path, timeout=90)
        conn.close()
        assert_restores_equal(url, db_path, tmp_path / "restored.db")


@pytest.mark.slow
def test_faults_through_a_proxy(
    s3_server: SeaweedS3, s3_bucket: str, s3_env: dict[str, str], db_path: str, tmp_path: Path
) -> None:
    """500s, 503 SlowDown, stalls longer than the read timeout and cut
    connections while the app commits: every fault is met and retried past,
    the commits go on, nothing is lost."""
    with FaultProxy("127.0.0.1", s3_server.s3_port) as proxy:
        url = f"s3://{s3_bucket}/app?endpoint={proxy.endpoint}&{FAST}"
        conn = sqlrepl.connect(db_path, url, options=fast_options(sync_interval=0.1))
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        conn.commit()
        sqlrepl.sync(db_path, timeout=30)
        for kind, extra in (
            ("http500", {}),
            ("slowdown", {}),
            ("stall", {"seconds": 6.0}),
            ("cut_request", {"after_bytes": 100}),
            ("cut_response", {"after_bytes": 10}),
        ):
            proxy.inject(kind, times=3, method="PUT", **extra)  # type: ignore[arg-type]
            _write(conn, 150)

            def met(kind: str = kind) -> bool:
                _write(conn, 5)  # new changes to upload, until the faults are used up
                return proxy.pending == 0 and proxy.counts[kind] >= 1

            wait_for(f"the {kind} faults to be met", met, interval=0.1)
        proxy.clear()
        sqlrepl.sync(db_path, timeout=90)
        conn.close()
        assert_restores_equal(url, db_path, tmp_path / "restored.db")


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("credentials", "credentials|denied|signature|access key"),
        ("bucket", "does not exist"),
        ("endpoint", "connect|unreachable|refused"),
    ],
)
def test_bad_store_configuration(
    s3_server: SeaweedS3,
    s3_bucket: str,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    db_path: str,
    what: str,
    message: str,
) -> None:
    """Wrong credentials, a missing bucket, a refused endpoint: the app keeps
    committing, and sync names the replica and the problem, never the secret."""
    url = f"s3://{s3_bucket}/app?endpoint={s3_server.endpoint}&{FAST}"
    if what == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0xdeadbeef")
    elif what == "bucket":
        url = f"s3://no-such-bucket-here/app?endpoint={s3_server.endpoint}&{FAST}"
    else:
        from s3server import free_port_pair

        url = f"s3://{s3_bucket}/app?endpoint=http://127.0.0.1:{free_port_pair()}&{FAST}"
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    _write(conn, 50)
    # Committed, and captured, while the store took none of it (nor could it).
    wait_for("the commits captured", lambda: sqlrepl.status(db_path).txid >= 1)
    assert sqlrepl.status(db_path).replicas[0].txid == 0
    with pytest.raises(sqlrepl.SyncTimeoutError) as info:
        sqlrepl.sync(db_path, timeout=8)
    text = str(info.value)
    assert url.split("?")[0] in text
    import re

    assert re.search(message, text, re.IGNORECASE), text
    assert "not-the-secret" not in text
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in text
    conn.close()


def test_corrupt_object_in_the_bucket(
    s3_server: SeaweedS3, s3_url: str, db_path: str, tmp_path: Path
) -> None:
    """An object damaged in the bucket is caught at restore, named, and no
    database is written."""
    conn = sqlrepl.connect(db_path, s3_url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(3):
        _write(conn, 20)
        sqlrepl.sync(db_path)
    conn.close()
    bucket = s3_url.split("/")[2]
    admin = s3_server.client()
    keys = [
        o["Key"] for o in admin.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"].endswith(".segment")
    ]
    victim = keys[-1]
    body = bytearray(admin.get_object(Bucket=bucket, Key=victim)["Body"].read())
    body[len(body) // 2] ^= 0x55
    admin.put_object(Bucket=bucket, Key=victim, Body=bytes(body))
    with pytest.raises(sqlrepl.CorruptObjectError, match=victim.rsplit("/", 1)[1][:16]):
        sqlrepl.restore(str(tmp_path / "restored.db"), s3_url)
    assert not (tmp_path / "restored.db").exists()
    admin.put_object(Bucket=bucket, Key=victim, Body=bytes(body[: len(body) // 3]))
    with pytest.raises(sqlrepl.CorruptObjectError, match="truncated"):
        sqlrepl.restore(str(tmp_path / "restored.db"), s3_url)


@pytest.mark.slow
def test_requests_stay_within_budget(s3_url: str, db_path: str) -> None:
    """400 steady commits at a 0.5 s interval: at most one PUT per interval
    that passed, however long they took (plus the first snapshot), no LIST on
    the way (one when the generation started, to continue the replica's txids)."""
    conn = sqlrepl.connect(db_path, s3_url, options=fast_options(sync_interval=0.5))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    sqlrepl.sync(db_path)
    before = dict(sqlrepl.status(db_path).replicas[0].requests)
    t0 = time.monotonic()
    for _ in range(80):
        _write(conn, 5, size=200)
        time.sleep(0.01)  # pacing: a steady app rather than one burst
    # The bound grows with the time taken: a slow machine only loosens it.
    elapsed = time.monotonic() - t0
    after = sqlrepl.status(db_path).replicas[0].requests
    conn.close()
    puts = after["PUT"] - before["PUT"]
    assert puts <= elapsed / 0.5 + 2, (puts, elapsed)
    assert after.get("LIST", 0) == before.get("LIST", 0) == 1
    assert after.get("GET", 0) == 0


# The peak is this process's own (VmHWM): ru_maxrss also counts the parent's
# resident pages at fork, and pytest's process passes 500 MB late in a run.
RESTORE = r"""
import sys, time, sqlrepl
t0 = time.monotonic()
result = sqlrepl.restore(sys.argv[1], sys.argv[2])
print("seconds", round(time.monotonic() - t0, 2), "bytes", result.bytes)
with open("/proc/self/status") as status:
    print("peak_rss_kb", next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""

_CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def _memory_cgroup(limit: int) -> Path | None:
    """A cgroup (v1 memory controller) capped at ``limit`` bytes, or None
    where this machine does not let us make one."""
    group = _CGROUP_ROOT / f"sqlrepl-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        # No swap to hide in (where the kernel accounts it).
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))
    except OSError:
        if group.exists():
            group.rmdir()
        return None
    return group


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_restore_larger_than_memory(s3_url: str, db_path: str, tmp_path: Path) -> None:
    """A 1.1 GiB database (past the lock page at byte 2**30) restored from S3
    by a process given 512 MiB of memory (a cgroup limit where the machine
    allows one; its peak RSS is held to the same bound either way)."""
    conn = sqlrepl.connect(db_path, s3_url, options=fast_options(sync_interval=1.0))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    for _ in range(11):  # 11 x 100 MiB of incompressible rows
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 25600)"
            " INSERT INTO t(v) SELECT randomblob(4000) FROM n"
        )
        conn.commit()
    conn.execute("UPDATE t SET v = randomblob(100) WHERE id % 1000 = 0")
    conn.commit()
    sqlrepl.sync(db_path, timeout=600)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    sqlrepl.stop_all()
    assert pages * 4096 > (1 << 30) + (64 << 20)
    limit = 512 << 20
    group = _memory_cgroup(limit)
    restored = tmp_path / "restored.db"

    def enter_group() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        out = subprocess.run(
            [sys.executable, "-c", RESTORE, str(restored), s3_url],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=enter_group,
            check=False,
        )
        peak_group = int((group / "memory.max_usage_in_bytes").read_text()) if group else 0
    finally:
        if group is not None:
            group.rmdir()
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    rss = int(out.stdout.split("peak_rss_kb")[1].split()[0]) * 1024
    print(out.stdout, f"cgroup: {'yes' if group else 'no'}, cgroup peak (with page cache): {peak_group}")
    assert rss < limit
    assert os.path.getsize(restored) == pages * 4096
    assert_same_database(db_path, restored)
