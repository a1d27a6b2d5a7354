"""status() counters: lag, last upload, requests, bytes and errors by kind,
snapshots, compactions and generations."""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

import pytest
from helpers import fast_options, file_url, run_python, wait_for
from prometheus_client import CollectorRegistry

import sqlrepl
import sqlrepl.prometheus
from sqlrepl import _replica_memory


def _write(conn: sqlrepl.Connection, n: int = 1) -> None:
    for _ in range(n):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
        conn.commit()


def test_status_reports_requests_bytes_and_upload_time_by_kind(db_path: str, tmp_path: Path) -> None:
    """A file replica reports PUTs, their bytes, a last upload time and no lag once synced."""
    before = time.time()
    conn = sqlrepl.connect(db_path, file_url(tmp_path / "r"), options=fast_options())
    conn.execute("CREATE TABLE t(v)")
    _write(conn, 3)
    sqlrepl.sync(db_path)
    st = sqlrepl.status(db_path)
    rep = st.replicas[0]
    assert rep.requests["PUT"] >= 1
    assert rep.bytes_by_kind["PUT"] == rep.requests["bytes_up"] > 0
    assert rep.last_upload_time is not None
    assert rep.last_upload_time >= before
    assert rep.lag_seconds == 0.0
    assert rep.lag_bytes == 0
    assert rep.errors_by_kind == {}
    assert (st.generations, st.snapshots) == (1, 1)
    conn.close()


def test_lag_rises_while_the_store_fails_and_falls_after(db_path: str) -> None:
    """While every request fails, lag in seconds grows, lag in bytes is what is
    staged, errors count by kind; after recovery the lag is back to zero."""
    name = f"obs-{secrets.token_hex(4)}"
    conn = sqlrepl.connect(db_path, f"memory://{name}", options=fast_options())
    conn.execute("CREATE TABLE t(v)")
    _write(conn)
    sqlrepl.sync(db_path)
    uploaded_at = sqlrepl.status(db_path).replicas[0].last_upload_time
    _replica_memory.fail_next(name, 10**6)
    try:
        _write(conn, 5)
        first = wait_for(
            "a lag",
            lambda: (r := sqlrepl.status(db_path).replicas[0]).lag_seconds and r.errors_by_kind and r,
        )
        assert first.lag_bytes is not None
        assert first.lag_bytes > 0
        assert first.errors_by_kind.get("PUT", 0) >= 1
        assert first.last_upload_time == uploaded_at
        wait_for(
            "the lag to grow",
            lambda: (sqlrepl.status(db_path).replicas[0].lag_seconds or 0) > (first.lag_seconds or 0),
        )
    finally:
        with _replica_memory._lock:
            _replica_memory._failures.pop(name, None)
    sqlrepl.sync(db_path)
    st = sqlrepl.status(db_path)
    rep = st.replicas[0]
    assert (rep.lag_seconds, rep.lag_bytes) == (0.0, 0)
    assert rep.txid == st.txid
    assert rep.last_upload_time is not None
    assert uploaded_at is not None
    assert rep.last_upload_time > uploaded_at
    conn.close()


def test_compactions_and_snapshots_are_counted(db_path: str, tmp_path: Path) -> None:
    """Merging uploaded segments counts a compaction; a periodic snapshot counts a snapshot."""
    # Compaction by size, not age: a window of one segment would not merge.
    options = fast_options(compaction_interval=3600, compaction_max_bytes=64 << 10, snapshot_interval=0.2)
    conn = sqlrepl.connect(db_path, file_url(tmp_path / "r"), options=options)
    conn.execute("CREATE TABLE t(v)")
    for _ in range(12):
        _write(conn)
        sqlrepl.sync(db_path)
    wait_for("a compaction", lambda: sqlrepl.status(db_path).compactions >= 1)
    wait_for("a second snapshot", lambda: sqlrepl.status(db_path).snapshots >= 2)
    assert sqlrepl.status(db_path).generations == 1
    conn.close()


def test_periodic_verification_proves_a_healthy_replica(db_path: str, tmp_path: Path) -> None:
    """With verify_interval, status() reports that the replica restores to the
    database's checksum at its newest txid."""
    options = fast_options(verify_interval=0.1, compaction_interval=None)
    conn = sqlrepl.connect(db_path, file_url(tmp_path / "r"), options=options)
    conn.execute("CREATE TABLE t(v)")
    for _ in range(3):  # a snapshot, then segments
        _write(conn, 2)
        sqlrepl.sync(db_path)
    txid = sqlrepl.status(db_path).txid
    rep = wait_for(
        f"a verification at txid {txid}",
        lambda: (r := sqlrepl.status(db_path).replicas[0]).verification and r.verification.txid == txid and r,
    )
    assert rep.verification is not None
    assert rep.verification.ok is True, rep.verification
    assert rep.verification.objects >= 2
    assert rep.verified_time == rep.verification.time
    registry = CollectorRegistry()
    sqlrepl.prometheus.register(registry)
    labels = {"database": sqlrepl.status(db_path).database, "replica": rep.url}
    assert registry.get_sample_value("sqlrepl_replica_verify_failures_total", labels) == 0
    assert (registry.get_sample_value("sqlrepl_replica_verify_success_timestamp_seconds", labels) or 0) >= (
        rep.verified_time
    )
    conn.close()


def test_periodic_verification_reports_an_altered_segment(
    db_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment altered in the store makes the next verification fail, named,
    and logged as an error; the replica keeps replicating."""
    options = fast_options(verify_interval=0.1, compaction_interval=None)
    conn = sqlrepl.connect(db_path, file_url(tmp_path / "r"), options=options)
    conn.execute("CREATE TABLE t(v)")
    for _ in range(3):
        _write(conn, 2)
        sqlrepl.sync(db_path)
    wait_for("a first verification", lambda: sqlrepl.status(db_path).replicas[0].verified_time)
    victim = max((tmp_path / "r").glob("generations/*/segments/*.segment"))
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0x40  # in the body (compressed pages)
    victim.write_bytes(bytes(data))
    altered = time.time()
    failed = wait_for(
        "a failed verification",
        lambda: (
            (v := sqlrepl.status(db_path).replicas[0].verification)
            and v.time > altered
            and v.ok is False
            and v
        ),
    )
    assert victim.name in failed.message
    assert "damaged" in failed.message
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("VERIFICATION FAILED" in m and victim.name in m for m in errors), errors
    registry = CollectorRegistry()
    sqlrepl.prometheus.register(registry)
    rep = sqlrepl.status(db_path).replicas[0]
    labels = {"database": sqlrepl.status(db_path).database, "replica": rep.url}
    failures = registry.get_sample_value("sqlrepl_replica_verify_failures_total", labels)
    assert failures is not None
    assert failures >= 1
    assert failures == rep.verify_failures
    conn.close()


def test_the_library_logs_under_sqlrepl_only(tmp_path: Path) -> None:
    """Replicating (and failing) leaves the root logger untouched, and every
    logger sqlrepl's modules hold is named sqlrepl..."""
    result = run_python(
        """
        import json, logging, sys, sqlrepl, sqlrepl.prometheus
        from sqlrepl import _replica_memory
        db = sys.argv[1]
        conn = sqlrepl.connect(db, "memory://logs", options=sqlrepl.Options(sync_interval=0.05))
        conn.execute("CREATE TABLE t(v)")
        conn.commit()
        sqlrepl.sync(db)
        _replica_memory.fail_next("logs", 3)
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        sqlrepl.sync(db)
        names = sorted(
            {
                value.name
                for name, module in list(sys.modules.items())
                if name.startswith("sqlrepl")
                for value in vars(module).values()
                if isinstance(value, logging.Logger)
            }
        )
        root = logging.getLogger()
        print(json.dumps({"names": names, "handlers": len(root.handlers), "level": root.level}))
        """,
        str(tmp_path / "app.db"),
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert "sqlrepl" in got["names"]
    assert all(name.startswith("sqlrepl") for name in got["names"]), got
    assert (got["handlers"], got["level"]) == (0, logging.WARNING)
