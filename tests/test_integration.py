"""What the integrations and the command line share (``sqlrepl._integration``,
``sqlrepl status``), and the newcomer's rough edges of issue 12."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT, fast_options, file_url, query

import sqlrepl
from sqlrepl import _integration


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlrepl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


@pytest.fixture
def replicated(tmp_path: Path) -> tuple[str, str, list[int]]:
    """A database with three synced commits in a folder replica: (db, url, their txids)."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    conn = sqlrepl.connect(db, url, options=fast_options())
    txids = []
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.commit()
    for i in range(3):
        conn.execute("INSERT INTO t(v) VALUES (?)", (str(i),))
        conn.commit()
        sqlrepl.sync(db)
        txids.append(sqlrepl.status(db).txid)
    conn.close()
    sqlrepl.stop_all()
    return db, url, txids


# -- the shared helper ---------------------------------------------------------------------


def test_replica_list_and_options_name_the_setting() -> None:
    """Bad replica lists and options raise ConfigError naming the setting they came from."""
    assert _integration.replica_list(None, "X") == ()
    assert _integration.replica_list("file:///a", "X") == ("file:///a",)
    with pytest.raises(sqlrepl.ConfigError, match=r"^MY_REPLICA must be a URL or a list of URLs"):
        _integration.replica_list(["file:///a", 3], "MY_REPLICA")
    with pytest.raises(sqlrepl.ConfigError, match=r"^MY_REPLICA: replica URL 's4://x': unknown scheme"):
        _integration.replica_list("s4://x", "MY_REPLICA")
    assert _integration.options_from({"sync_interval": 2}, "O") == sqlrepl.Options(sync_interval=2)
    with pytest.raises(sqlrepl.ConfigError, match=r"^MY_OPTIONS has unknown field\(s\) 'sync_every'"):
        _integration.options_from({"sync_every": 1}, "MY_OPTIONS")


def test_restore_once_logs_what_it_did(
    replicated: tuple[str, str, list[int]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """restore_once restores a missing database once per process and logs it;
    a missing database with an empty replica is logged as a new database."""
    _db, url, _ = replicated
    target = str(tmp_path / "restored.db")
    with caplog.at_level(logging.INFO, logger="sqlrepl"):
        assert _integration.restore_once(target, [url]) is not None
        assert _integration.restore_once(target, [url]) is None
        assert _integration.restore_once(str(tmp_path / "new.db"), [file_url(tmp_path / "none")]) is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith(f"restored {target} from") for m in messages) == 1
    assert any("new.db is missing and" in m and "holds no backup: a new database" in m for m in messages)


def test_verify_finds_equal_different_and_empty(
    replicated: tuple[str, str, list[int]], tmp_path: Path
) -> None:
    """verify says OK for a replica holding the database, DIFFERENT after an
    unreplicated write, OK again once it waited for the replicas, EMPTY for an empty one."""
    db, url, _ = replicated
    assert _integration.verify(db, url).message.startswith("OK: the replica")
    query(db, "INSERT INTO t(v) VALUES ('not replicated yet')")
    different = _integration.verify(db, url, attempts=1)
    assert not different.ok
    assert different.message.startswith("DIFFERENT")
    waited = _integration.verify(db, url, sync_replicas=[url], options=fast_options())
    sqlrepl.stop_all()
    assert waited.ok, waited.message
    empty = _integration.verify(db, file_url(tmp_path / "empty"))
    assert (empty.ok, empty.message.split(":")[0]) == (False, "EMPTY")


def test_verify_refuses_a_missing_or_non_database_file(
    replicated: tuple[str, str, list[int]], tmp_path: Path
) -> None:
    """verify on a missing path, a folder or a file that is not a database
    raises ConfigError saying so (the CLI exits 2 with that message)."""
    _db, url, _ = replicated
    (tmp_path / "notes.txt").write_text("not a database, but long enough to have a header. " * 4)
    for path, said in (
        (tmp_path / "missing.db", "does not exist"),
        (tmp_path, "is a directory"),
        (tmp_path / "notes.txt", "cannot be read as a SQLite database"),
    ):
        with pytest.raises(sqlrepl.ConfigError, match=said):
            _integration.verify(str(path), url)
    done = cli("verify", str(tmp_path / "missing.db"), url)
    assert done.returncode == 2
    assert "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


# -- the command line ------------------------------------------------------------------


def test_restore_txid_beyond_the_newest_says_so(
    replicated: tuple[str, str, list[int]], tmp_path: Path
) -> None:
    """--txid beyond the newest restores the newest and prints a note saying
    which txid it is; an existing txid prints no note."""
    _db, url, txids = replicated
    beyond = cli("restore", str(tmp_path / "a.db"), url, "--txid", "999")
    assert beyond.returncode == 0, beyond.stderr
    assert f"note: txid {txids[-1]} is the newest state at or before --txid 999" in beyond.stdout
    exact = cli("restore", str(tmp_path / "b.db"), url, "--txid", str(txids[-1]))
    assert exact.returncode == 0, exact.stderr
    assert "note:" not in exact.stdout


def test_if_db_exists_error_reads_as_it_acts(replicated: tuple[str, str, list[int]]) -> None:
    """--if-db-exists-error fails on an existing database (the old, backwards
    spelling still works but is not shown in --help)."""
    db, url, _ = replicated
    for flag in ("--if-db-exists-error", "--if-db-not-exists-error"):
        done = cli("restore", db, url, flag)
        assert done.returncode == 2
        assert "DatabaseExistsError" in done.stderr
    shown = cli("restore", "--help").stdout
    assert "--if-db-exists-error" in shown
    assert "--if-db-not-exists-error" not in shown


def test_directory_as_target_is_named(replicated: tuple[str, str, list[int]], tmp_path: Path) -> None:
    """A directory given as the database is reported as a directory, not as an existing database."""
    _db, url, _ = replicated
    folder = tmp_path / "a-folder"
    folder.mkdir()
    done = cli("restore", str(folder), url)
    assert "is a directory" in done.stdout + done.stderr
    assert "the database exists" not in done.stdout + done.stderr


def test_missing_replica_folder_is_not_an_empty_replica(tmp_path: Path) -> None:
    """A file:// URL whose folder does not exist says so, instead of looking like an empty replica."""
    done = cli("restore", str(tmp_path / "x.db"), file_url(tmp_path / "wrong" / "path"))
    assert done.returncode == 0, done.stderr
    assert f"the replica's folder {tmp_path / 'wrong' / 'path'} does not exist" in done.stdout
    (tmp_path / "empty").mkdir()
    empty = cli("restore", str(tmp_path / "x.db"), file_url(tmp_path / "empty"))
    assert "nothing restored: the replica is empty" in empty.stdout


def test_demo_folder_is_ignored_by_git() -> None:
    """`sqlrepl demo` run in a clone leaves nothing for `git status` to show."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "sqlrepl-demo/replica/generations/x.snapshot"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert ignored.returncode == 0


# -- sqlrepl status ----------------------------------------------------------------------

HOLDER = """
import os, sys, time, sqlrepl
db, good, bad = sys.argv[1:4]
opts = sqlrepl.Options(sync_interval=0.05, poll_interval=0.02, retention=None, retry_max=0.2)
conn = sqlrepl.connect(db, [good, bad], options=opts)
conn.execute("CREATE TABLE t(v)")
conn.commit()
for i in range(5):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.commit()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    st = sqlrepl.status(db)
    good_one, bad_one = st.replicas
    if st.txid and good_one.txid >= st.txid and bad_one.last_error:
        break
    time.sleep(0.01)
print(st.txid, flush=True)
sys.stdin.read()
"""


def test_status_shows_the_replicating_process(tmp_path: Path) -> None:
    """`sqlrepl status` from another process shows the replicating process,
    its txid, a replica in step and a failing one with its error; once that
    process is gone, it says none runs."""
    db = str(tmp_path / "app.db")
    good = file_url(tmp_path / "replica")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    bad = file_url(blocker / "replica")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), db, good, bad],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None
        txid = int(holder.stdout.readline())
        report = json.loads(cli("status", db, "--json").stdout)
        assert set(report) == {
            "database",
            "exists",
            "replicating",
            "pid",
            "generation",
            "txid",
            "updated",
            "age_seconds",
            "replicas",
            "staged_objects",
            "staged_bytes",
        }
        assert (report["replicating"], report["pid"], report["txid"]) == (True, holder.pid, txid)
        in_step, failing = report["replicas"]
        assert (in_step["url"], in_step["txid"], in_step["lag_txids"], in_step["in_step"]) == (
            good,
            txid,
            0,
            True,
        )
        assert in_step["error"] is None
        assert failing["in_step"] is False
        assert failing["error"]
        assert report["staged_objects"] > 0
        text = cli("status", db).stdout
        assert f"pid {holder.pid} is replicating it" in text
        assert f"txid {txid}" in text
        assert "last error:" in text
    finally:
        holder.kill()
        holder.communicate(timeout=60)
    after = cli("status", db)
    assert f"none running (the last one was pid {holder.pid})" in after.stdout


def test_status_of_a_database_never_replicated(tmp_path: Path) -> None:
    """`sqlrepl status` on a database with no staging folder says nothing was replicated, rc 0."""
    done = cli("status", str(tmp_path / "app.db"))
    assert done.returncode == 0, done.stderr
    assert "(missing)" in done.stdout
    assert "nothing replicated yet" in done.stdout
    assert json.loads(cli("status", str(tmp_path / "app.db"), "--json").stdout)["replicas"] == []
