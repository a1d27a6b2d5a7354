"""The Django example under gunicorn: four worker processes on one database,
an HTTP load on loopback, and the replicating worker killed mid-load; also
``--preload`` with a replicated connection opened in the master before the
fork. Every write acknowledged with a 2xx must be in a restore made
afterwards.

The load generator is plain threads and ``http.client``: nothing to install.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, file_url, integrity, restore_fresh

import sqlrepl

EXAMPLE = ROOT / "examples" / "django"
TESTS = Path(__file__).resolve().parent

# gunicorn needs fork(); the replicating worker is found in /proc/locks.
pytestmark = pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def example_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), str(EXAMPLE)]),
        "DJANGO_SETTINGS_MODULE": "exampleproject.settings",
        "SQLREPL_DB": str(tmp_path / "db.sqlite3"),
        "SQLREPL_REPLICA": file_url(tmp_path / "replica"),
        "SQLREPL_DURABILITY": "replicated",
        "SQLREPL_SYNC_INTERVAL": "0.2",
        **extra,
    }


def request(port: int, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload.startswith(b"{") else payload
    finally:
        conn.close()


class Gunicorn:
    """``gunicorn -w N`` serving the Django example on a free loopback port."""

    def __init__(self, tmp_path: Path, *args: str, wsgi: str = "exampleproject.wsgi", **env: str) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "gunicorn.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--chdir",
                str(EXAMPLE),
                "--graceful-timeout",
                "10",
                *args,
                wsgi,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=example_env(tmp_path, **env),
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(self.port, "GET", "/api/items", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"gunicorn did not start:\n{self.log()}")
            time.sleep(0.2)

    def workers(self) -> set[int]:
        """The pids of the master's live children."""
        children = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    children.add(int(entry))
        return children

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Migrate the example's database, then start gunicorn on demand; stops it at the end."""
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=EXAMPLE,
        env=example_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr
    started: list[Gunicorn] = []

    def start(*args: str, **kwargs: Any) -> Gunicorn:
        server = Gunicorn(tmp_path, *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        # (Captured: pytest shows it only when the test failed, e.g. a worker
        # that closed a connection without an answer.)
        print(f"--- gunicorn log {server.log_path}:\n{server.log()[-8000:]}")


class Load:
    """Threads POSTing new items, recording the names acknowledged with a 2xx."""

    def __init__(self, port: int, threads: int = 6) -> None:
        self.port = port
        self.acked: list[str] = []
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            name = f"t{worker}-{n}"
            # Every third item has tags: several statements in one atomic block.
            body = {"name": name, "tags": [f"tag{n % 4}"] if n % 3 == 0 else []}
            try:
                status, _ = request(self.port, "POST", "/api/items", body)
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
            else:
                outcome = str(status)
                if 200 <= status < 300:
                    with self._lock:
                        self.acked.append(name)
                    continue
            with self._lock:
                self.failures[outcome] += 1

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            assert time.monotonic() < deadline, f"only {self.count()} of {n} writes acked; {self.failures}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def lock_holder(database: Path) -> int | None:
    """The pid holding the replicator's flock on ``<db>-sqlrepl/lock`` (from /proc/locks)."""
    try:
        st = os.stat(f"{database}-sqlrepl/lock")
    except FileNotFoundError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4])
    return None


def wait_for_holder(database: Path, among: Callable[[], set[int]], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        pid = lock_holder(database)
        if pid is not None and pid in among():
            return pid
        assert time.monotonic() < deadline, f"no replicator among {among()} (holder {pid})"
        time.sleep(0.05)


def item_names(path: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM items_item")}
    finally:
        conn.close()


def check_acknowledged(tmp_path: Path, acked: list[str]) -> set[str]:
    """Restore the replica into a fresh file: it must hold every acknowledged
    write, pass integrity_check, and hold nothing the database does not."""
    restored = tmp_path / "restored.db"
    restore_fresh(file_url(tmp_path / "replica"), restored)
    assert integrity(restored) == [("ok",)]
    names = item_names(restored)
    missing = set(acked) - names
    assert not missing, f"{len(missing)} acknowledged writes are not in the replica: {sorted(missing)[:10]}"
    assert names <= item_names(tmp_path / "db.sqlite3")
    return names


@pytest.mark.slow
def test_killing_the_replicating_worker_loses_no_acknowledged_write(
    gunicorn: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    """Under load, SIGKILL the worker that replicates: another takes over,
    the load goes on, and every acknowledged write is in the replica."""
    server = gunicorn("--workers", "4")
    db = tmp_path / "db.sqlite3"
    load = Load(server.port)
    try:
        load.wait_for(60, timeout=60)
        holder = wait_for_holder(db, server.workers)
        os.kill(holder, signal.SIGKILL)
        killed_at = load.count()
        load.wait_for(killed_at + 100, timeout=90)
        successor = wait_for_holder(db, server.workers)
        assert successor != holder
    finally:
        load.stop()
    print(f"acked {load.count()} writes ({killed_at} before the kill); failures: {dict(load.failures)}")
    names = check_acknowledged(tmp_path, load.acked)
    assert len(names) >= load.count()
    log = server.log()
    assert "malformed" not in log
    assert "SyncTimeoutError" not in log


@pytest.mark.slow
def test_preload_with_a_connection_opened_before_fork(
    gunicorn: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    """gunicorn --preload, whose master queried the database at import: the
    workers do not reuse the master's connection or replicator state, every
    write succeeds, and every acknowledged write is in the replica."""
    server = gunicorn("--workers", "4", "--preload", wsgi="gunicorn_wsgi")
    db = tmp_path / "db.sqlite3"
    # The master opened the database first, so its replicator holds the lock.
    assert wait_for_holder(db, lambda: {server.proc.pid}) == server.proc.pid
    checked = {}
    for _ in range(20):  # before any Django request: nothing has reopened the connection yet
        status, body = request(server.port, "GET", "/fork-check")
        assert status == 200
        checked[body["pid"]] = body["inherited"]
    assert set(checked) <= server.workers()
    assert not any(checked.values()), checked  # no worker uses the master's SQLite connection
    load = Load(server.port, threads=4)
    try:
        load.wait_for(150, timeout=60)
    finally:
        load.stop()
    assert not load.failures, dict(load.failures)
    roles = {}
    for _ in range(40):
        status, body = request(server.port, "GET", "/api/status")
        assert status == 200
        roles[body["pid"]] = body["role"]
    assert set(roles) <= server.workers()
    assert set(roles.values()) == {"standby"}  # not "replicating": that state was the master's
    check_acknowledged(tmp_path, load.acked)
    assert "Traceback" not in server.log()


# -- regressions: engine issues found while testing the integrations ----------------------


@pytest.mark.slow
def test_sync_in_a_process_that_just_started_standing_by(tmp_path: Path) -> None:
    """A process that starts while another one replicates can sync() at once
    (a new gunicorn worker's first replicated write does)."""
    db = tmp_path / "app.db"
    url = file_url(tmp_path / "replica")
    holder_code = f"""
import sqlrepl, time
conn = sqlrepl.connect({str(db)!r}, {url!r})
conn.execute("CREATE TABLE t (x)")
conn.commit()
sqlrepl.sync({str(db)!r})
while sqlrepl.status({str(db)!r}).role != "replicating":
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(3600)  # until the test kills it
"""
    with subprocess.Popen(
        [sys.executable, "-c", holder_code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "ready"
            replicator = sqlrepl.get_replicator(str(db), [url])
            assert replicator is not None
            # Starts the replicator, which will stand by. (Before the fix this
            # sync was not passed on, and waited out its whole timeout.)
            replicator.sync(timeout=120)
        finally:
            holder.kill()


FORK_DURING_START = """
import os, sys, time, sqlrepl
db, url, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
conn = sqlrepl.connect(db, url)  # starts the replicator thread
time.sleep(delay)
pid = os.fork()
if pid == 0:
    c = sqlrepl.connect(db, url)
    c.execute("INSERT INTO t VALUES (1)")
    c.commit()
    deadline = time.monotonic() + 60
    while sqlrepl.status(db).role == "starting" and time.monotonic() < deadline:
        time.sleep(0.01)
    status = sqlrepl.status(db)
    print(status.role, status.error, flush=True)
    os._exit(0 if status.role in ("replicating", "standby") else 1)
_, code = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(code))
"""


def test_fork_while_the_replicator_starts(tmp_path: Path) -> None:
    """A process forked just after the parent opened a replicated connection
    (gunicorn --preload with a query at import) can replicate."""
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    outcomes = []
    for delay in ("0", "0.005", "0.01"):
        proc = subprocess.run(
            [sys.executable, "-c", FORK_DURING_START, str(db), file_url(tmp_path / "replica"), delay],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
        outcomes.append((delay, proc.returncode, proc.stdout.strip()))
    assert all(code == 0 for _, code, _ in outcomes), outcomes


def test_process_exit_flushes_pending_commits(tmp_path: Path) -> None:
    """A process (a gunicorn worker restarting, a management command) that
    commits and exits without sync() leaves its commits in the replica."""
    db = tmp_path / "app.db"
    url = file_url(tmp_path / "replica")
    code = f"""
import sqlrepl
conn = sqlrepl.connect({str(db)!r}, {url!r}, options=sqlrepl.Options(sync_interval=30))
conn.execute("CREATE TABLE t (x)")
conn.commit()
sqlrepl.sync({str(db)!r})
conn.execute("INSERT INTO t VALUES ('at exit')")
conn.commit()
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    restored = tmp_path / "restored.db"
    restore_fresh(url, restored)
    conn = sqlite3.connect(restored)
    try:
        assert conn.execute("SELECT x FROM t").fetchall() == [("at exit",)]
    finally:
        conn.close()
