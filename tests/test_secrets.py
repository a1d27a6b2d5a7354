"""No secret reaches a log line, an error, status() or a metric."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, fast_options
from prometheus_client import CollectorRegistry, generate_latest
from s3server import SeaweedS3

import sqlrepl
import sqlrepl.prometheus

pytestmark = pytest.mark.s3

KEY = "AKIASQLREPLLEAKKEY7Q"
SECRET = "sqlrepl+Leak/Secret+9f3e1c7a2b"
TOKEN = "FwoGZXIvYXdzEBsqlreplLeakToken+7d41/e0c9=="
FAST = "connect_timeout=1&read_timeout=2&max_attempts=2"


def _leaks(text: str, secrets: tuple[str, ...]) -> list[str]:
    return [s for s in secrets if s in text]


@pytest.mark.parametrize("wrong", ["access key", "secret"])
def test_no_secret_in_logs_errors_status_or_metrics(
    s3_server: SeaweedS3,
    s3_bucket: str,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    db_path: str,
    tmp_path: Path,
    wrong: str,
) -> None:
    """Replicating and restoring with rejected credentials (a distinctive key,
    secret and session token): the secrets appear in no sqlrepl log line, no
    error, no status() (repr or JSON), no metric, no CLI output."""
    caplog.set_level(logging.DEBUG, logger="sqlrepl")
    secrets: tuple[str, ...] = (SECRET, TOKEN)
    if wrong == "access key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
        secrets = (KEY, SECRET, TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    registry = CollectorRegistry()
    sqlrepl.prometheus.register(registry)
    seen: list[str] = []

    url = f"s3://{s3_bucket}/app?endpoint={s3_server.endpoint}&{FAST}"
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(v)")
    for _ in range(20):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(100))")
        conn.commit()
    with pytest.raises(sqlrepl.SyncTimeoutError) as timeout:
        sqlrepl.sync(db_path, timeout=5)
    seen += [str(timeout.value), repr(timeout.value)]
    deadline = time.monotonic() + 60
    while not (st := sqlrepl.status(db_path)).replicas[0].errors_by_kind:
        assert time.monotonic() < deadline, "no error counted"
        time.sleep(0.05)
    assert st.replicas[0].last_error is not None
    seen += [repr(st), json.dumps(dataclasses.asdict(st)), generate_latest(registry).decode()]
    assert "sqlrepl_replica_errors_total" in seen[-1]

    with pytest.raises(sqlrepl.ReplicaError) as restore_error:
        sqlrepl.restore(str(tmp_path / "restored.db"), url)
    seen += [str(restore_error.value), repr(restore_error.value)]
    # A secret-looking URL option is refused without being repeated.
    with pytest.raises(sqlrepl.ConfigError) as config_error:
        sqlrepl.connect(str(tmp_path / "other.db"), f"s3://{s3_bucket}/x?secret_access_key={SECRET}")
    seen.append(str(config_error.value))
    conn.close()
    sqlrepl.stop_all(flush=False, timeout=5)

    cli = subprocess.run(
        [sys.executable, "-m", "sqlrepl", "-v", "restore", str(tmp_path / "cli.db"), url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert cli.returncode == 2, cli.stderr
    seen += [cli.stdout, cli.stderr]

    records = [r for r in caplog.records if r.name.startswith("sqlrepl")]
    assert any(r.levelno >= logging.WARNING for r in records)  # the failure was logged
    for record in records:
        seen.append(record.getMessage())
        if record.exc_info:
            seen.append(logging.Formatter().formatException(record.exc_info))
    for text in seen:
        assert not _leaks(text, secrets), text
