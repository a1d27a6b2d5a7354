"""The ``sqlrepl`` command line, run as a real program."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, assert_same_database, fast_options, file_url, make_db, query, run_python

import sqlrepl


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlrepl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


@pytest.fixture
def replicated(tmp_path: Path) -> tuple[str, str]:
    """A database with two synced batches in a folder replica: (db, url)."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    conn = sqlrepl.connect(db, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.commit()
    for batch in range(2):
        for i in range(10):
            conn.execute("INSERT INTO t(v) VALUES (?)", (f"{batch}-{i}",))
            conn.commit()
        sqlrepl.sync(db)
    conn.close()
    sqlrepl.stop_all()
    return db, url


@pytest.mark.parametrize(
    "command", ["restore", "replicate", "generations", "snapshots", "segments", "verify", "demo"]
)
def test_every_subcommand_has_help(command: str) -> None:
    """``--help`` on each subcommand explains it and its arguments."""
    out = cli(command, "--help")
    assert out.returncode == 0
    assert "usage: sqlrepl " + command in out.stdout
    assert len(out.stdout.splitlines()) > 4


def test_listing_commands(replicated: tuple[str, str]) -> None:
    """generations, snapshots and segments list what the replica holds, also as JSON."""
    _db, url = replicated
    gens = json.loads(cli("generations", url, "--json").stdout)
    assert len(gens) == 1
    assert gens[0]["snapshots"] == 1
    assert gens[0]["segments"] >= 1
    snaps = json.loads(cli("snapshots", url, "--json").stdout)
    assert [s["generation"] for s in snaps] == [gens[0]["generation"]]
    segs = json.loads(cli("segments", url, "--json", "--generation", gens[0]["generation"]).stdout)
    assert segs[-1]["last_txid"] == gens[0]["last_txid"]
    assert segs[0]["first_txid"] == snaps[0]["txid"] + 1
    text = cli("segments", url).stdout
    assert text.splitlines()[0].split()[:3] == ["GENERATION", "FIRST_TXID", "LAST_TXID"]


def test_restore_and_verify(replicated: tuple[str, str], tmp_path: Path) -> None:
    """restore rebuilds the database; verify says it matches; a changed
    database makes verify fail with exit status 1."""
    db, url = replicated
    out = tmp_path / "restored.db"
    done = cli("restore", str(out), url)
    assert done.returncode == 0, done.stderr
    assert "restored" in done.stdout
    assert_same_database(db, out)
    again = cli("restore", str(out), url)
    assert "nothing restored: the database exists" in again.stdout
    ok = cli("verify", db, url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK")
    query(db, "INSERT INTO t(v) VALUES ('not replicated')")
    bad = cli("verify", db, url)
    assert bad.returncode == 1
    assert bad.stdout.startswith("DIFFERENT")


def test_restore_point_in_time(replicated: tuple[str, str], tmp_path: Path) -> None:
    """--txid restores an earlier state."""
    _db, url = replicated
    [generation] = json.loads(cli("generations", url, "--json").stdout)
    # The second batch is ten commits (ten txids) after a sync: the state
    # before it is a segment boundary, whenever the first snapshot was taken.
    first_batch_end = generation["last_txid"] - 10
    out = tmp_path / "old.db"
    done = cli("restore", str(out), url, "--txid", str(first_batch_end))
    assert done.returncode == 0, done.stderr
    assert query(out, "SELECT count(*) FROM t") == [(10,)]


def test_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    """Bad input: exit status 2 and the error's message, no traceback."""
    out = cli("restore", str(tmp_path / "x.db"), "ftp://nowhere/x")
    assert out.returncode == 2
    assert "unknown scheme ftp://" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("restore", str(tmp_path / "x.db"), file_url(tmp_path / "empty"), "--require-replica")
    assert out.returncode == 2
    assert "NoBackupError" in out.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("text", "cannot be read as a SQLite database"),
        ("missing", "does not exist; give the path of the live database"),
        ("directory", "is a directory; give the path of the live database"),
    ],
)
def test_verify_a_path_that_is_not_a_database(
    replicated: tuple[str, str], tmp_path: Path, make: str, message: str
) -> None:
    """verify on a text file, a missing file or a directory: one line saying what is wrong, exit 2."""
    _, url = replicated
    target = tmp_path / "target"
    if make == "text":
        target.write_text("some notes\n" * 50)
    elif make == "directory":
        target.mkdir()
    out = cli("verify", str(target), url)
    assert out.returncode == 2, out
    assert message in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replicate", "{notes}", "{url}"], "is not a SQLite database"),
        (["replicate", "{dir}", "{url}"], "is a directory"),
        (["restore", "{dir}", "{url}", "--overwrite"], "is a directory"),
        (["restore", "{notes}/app.db", "{url}"], "is a file, not a folder"),
        (["restore", "{dir}/x.db", "{url}", "--txid", "-3"], "txid must be a whole number >= 0"),
        (["restore", "{dir}/x.db", "{url}", "--parallelism", "0"], "parallelism must be a whole number"),
        (["restore", "{dir}/x.db", "{url}", "--timestamp", "nan"], "is not ISO 8601"),
    ],
)
def test_subcommands_given_bad_paths_or_values(
    replicated: tuple[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    """Subcommands given a text file, a directory or an impossible value: one line, exit 2, no traceback."""
    _, url = replicated
    notes = tmp_path / "notes.txt"
    notes.write_text("some notes\n" * 50)
    folder = tmp_path / "folder"
    folder.mkdir()
    out = cli(*(a.format(notes=notes, dir=folder, url=url) for a in args))
    assert out.returncode == 2, out
    assert message in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert notes.read_text() == "some notes\n" * 50


def test_demo_runs(tmp_path: Path) -> None:
    """The quick-start demo replicates, deletes, restores and shows the rows."""
    out = cli("demo", "--dir", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    assert "the third note" in out.stdout
    assert "integrity_check: ok" in out.stdout


def test_replicate_sidecar(tmp_path: Path) -> None:
    """``sqlrepl replicate`` replicates a database written by a program that
    never imported sqlrepl, and flushes on SIGTERM."""
    db = str(tmp_path / "app.db")
    url = file_url(tmp_path / "replica")
    make_db(db)
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sqlrepl", "replicate", db, url, "--sync-interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert sidecar.stdout is not None
        assert sidecar.stdout.readline().startswith("replicating")
        writer = run_python(
            """
            import sqlite3, sys
            conn = sqlite3.connect(sys.argv[1], timeout=30)
            for i in range(500):
                conn.execute("INSERT INTO t(v) VALUES (randomblob(700))")
                conn.commit()
            conn.close()
            """,
            db,
        )
        assert writer.returncode == 0, writer.stderr
        # (No wait: SIGTERM makes the sidecar capture and upload what is pending.)
    finally:
        sidecar.send_signal(signal.SIGTERM)
        out, err = sidecar.communicate(timeout=60)
    assert sidecar.returncode == 0, err
    assert "stopping" in out
    restored = tmp_path / "restored.db"
    assert sqlrepl.restore(str(restored), url) is not None
    assert_same_database(db, restored)


def test_replicate_prints_no_secret_of_the_url(tmp_path: Path) -> None:
    """``sqlrepl replicate`` names the replica without a password given in
    the endpoint's URL."""
    db = str(tmp_path / "app.db")
    make_db(db)
    url = "s3://bucket/app?endpoint=http://user:PwSecret42@127.0.0.1:9&max_attempts=1"
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sqlrepl", "replicate", db, url, "--exit-timeout", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert sidecar.stdout is not None
        line = sidecar.stdout.readline()
    finally:
        sidecar.send_signal(signal.SIGTERM)
        out, err = sidecar.communicate(timeout=60)
    assert line.startswith("replicating"), (line, err)
    assert "127.0.0.1:9" in line
    assert "PwSecret42" not in line + out
