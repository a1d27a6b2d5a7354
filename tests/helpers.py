"""Helpers shared by the tests: databases, comparisons, subprocesses."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlrepl

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def fast_options(**overrides: object) -> sqlrepl.Options:
    """Options that make tests quick: short intervals, no retention pass."""
    base: dict[str, object] = {
        "sync_interval": 0.05,
        "poll_interval": 0.02,
        "retention": None,
        "exit_timeout": 10.0,
        "retry_max": 0.5,
    }
    base.update(overrides)
    return sqlrepl.Options(**base)  # type: ignore[arg-type]


def dump(path: str | os.PathLike[str]) -> list[str]:
    """The logical content of a database (schema and rows), read-only."""
    conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def integrity(path: str | os.PathLike[str]) -> list[tuple[str]]:
    conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def query(path: str | os.PathLike[str], sql: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement on ``path`` in a connection of its own, closed after."""
    conn = sqlite3.connect(os.fspath(path), timeout=30)
    try:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def assert_same_database(source: str | os.PathLike[str], restored: str | os.PathLike[str]) -> None:
    """``restored`` passes integrity_check and holds what ``source`` holds."""
    assert integrity(restored) == [("ok",)]
    assert dump(restored) == dump(source)


def restore_fresh(url: str, dest: str | os.PathLike[str], **kwargs: object) -> sqlrepl.RestoreResult:
    """Restore ``url`` into a path that must not exist yet; return the result."""
    result = sqlrepl.restore(os.fspath(dest), url, **kwargs)  # type: ignore[arg-type]
    assert result is not None
    return result


def assert_restores_equal(url: str, source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Restore ``url`` into ``dest`` (a path that must not exist yet); it
    passes integrity_check and holds what ``source`` holds."""
    restore_fresh(url, dest)
    assert_same_database(source, dest)


def file_url(path: str | os.PathLike[str]) -> str:
    return "file://" + os.path.abspath(os.fspath(path))


def run_python(
    code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (with this checkout importable)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )


def make_db(path: str | os.PathLike[str], *, page_size: int = 4096) -> None:
    """Create an empty WAL database with ``page_size`` and one table."""
    conn = sqlite3.connect(os.fspath(path))
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    conn.close()


class FakeClock:
    """A wall clock for ``Options(clock=...)`` that moves only when told."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120.0, interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy (an event: a status
    value, a file, a scraped sample) and return it; fail naming ``what``
    after ``timeout``, a deadline that only guards against a hang."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def wait_for_disk_full_error(db: str | os.PathLike[str]) -> sqlrepl.Status:
    """Wait until ``status(db).error`` reports the staging disk full; return that status."""

    def full() -> sqlrepl.Status | None:
        status = sqlrepl.status(os.fspath(db))
        return status if "No space left on device" in (status.error or "") else None

    return wait_for("a full staging disk in status().error", full)


def fill_disk(path: str | os.PathLike[str], *, chunk: int = 65536) -> int:
    """Write zeros to the new file ``path`` until its filesystem is full
    (ENOSPC); return the file's size."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return os.path.getsize(path)


def read_until_closed(fd: int) -> bytes:
    """Everything left on a pseudo-terminal's leader ``fd``, until the child
    closes the terminal (EIO on Linux, or an empty read)."""
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)
