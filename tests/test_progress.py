"""Progress of restore and verify: the callback, and the CLI's bar on a terminal only."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, assert_same_database, fast_options, file_url, read_until_closed

import sqlrepl
from sqlrepl import _cli
from sqlrepl._progress import Progress


@pytest.fixture
def replicated(tmp_path: Path) -> tuple[str, str]:
    """A database with an object larger than a download part (so that it
    arrives in ranged parts), and small segments after it: (db, url)."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    conn = sqlrepl.connect(db, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)"
        " INSERT INTO t(v) SELECT randomblob(100000) FROM n"
    )
    conn.commit()
    sqlrepl.sync(db)
    for _ in range(5):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(5000))")
        conn.commit()
        sqlrepl.sync(db)
    conn.close()
    return db, url


def _assert_monotonic_to_total(calls: list[tuple[int, int]]) -> None:
    assert len(calls) >= 3, calls
    dones = [d for d, _ in calls]
    assert dones == sorted(dones), calls
    assert all(0 <= d <= t for d, t in calls), calls
    assert calls[-1][0] == calls[-1][1] > 0


def test_restore_progress_never_goes_back_and_reaches_total(
    replicated: tuple[str, str], tmp_path: Path
) -> None:
    """restore(progress=...) is called with growing done bytes, ending at the total read."""
    db, url = replicated
    calls: list[tuple[int, int]] = []
    result = sqlrepl.restore(str(tmp_path / "out.db"), url, progress=lambda d, t: calls.append((d, t)))
    assert result is not None
    _assert_monotonic_to_total(calls)
    assert calls[-1][1] == result.bytes
    assert len({d for d, _ in calls}) > result.objects  # the large snapshot reported part by part
    assert_same_database(db, tmp_path / "out.db")


def test_verify_reports_progress(replicated: tuple[str, str]) -> None:
    """verify(progress=...) reports its restore's progress up to the total."""
    db, url = replicated
    calls: list[tuple[int, int]] = []
    found = _cli.verify(db, url, progress=lambda d, t: calls.append((d, t)))
    assert found.ok, found.message
    _assert_monotonic_to_total(calls)


def test_phases_add_up_and_a_failing_callback_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """A second phase continues from what is done; a callback that raises is logged and not called again."""
    calls: list[tuple[int, int]] = []
    p = Progress(lambda d, t: calls.append((d, t)))
    p.phase(100)
    p.advance(60)
    p.phase(50)  # (a fallback to another replica)
    p.advance(70)
    p.finish()
    assert calls == [(0, 100), (60, 100), (60, 110), (110, 110), (110, 110)]

    def broken(done: int, total: int) -> None:
        raise ValueError("display gone")

    q = Progress(broken)
    q.phase(10)
    q.advance(10)
    assert q.done == 10
    assert [r.message for r in caplog.records].count(
        f"progress callback {broken!r} failed; no more progress is reported"
    ) == 1


def _cli_args(url: str, tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "sqlrepl", "restore", str(tmp_path / "out.db"), url]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}


def test_cli_bar_on_a_terminal(replicated: tuple[str, str], tmp_path: Path) -> None:
    """Under a pseudo-terminal, `sqlrepl restore` draws a progress bar that reaches 100%."""
    _db, url = replicated
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        _cli_args(url, tmp_path), stdin=follower, stdout=follower, stderr=follower, env=_env()
    )
    os.close(follower)
    out = read_until_closed(leader)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert "restored " in text
    assert "restore: 100%" in text, text
    assert "\r" in text.split("restored ")[0]  # redrawn in place


def test_cli_no_bar_in_a_pipe(replicated: tuple[str, str], tmp_path: Path) -> None:
    """With stdout and stderr piped, `sqlrepl restore` prints its result line and no bar."""
    _db, url = replicated
    proc = subprocess.run(_cli_args(url, tmp_path), capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("restored ")
    assert "%" not in proc.stdout + proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
