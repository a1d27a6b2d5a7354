"""The examples' READMEs, followed command by command in a fresh copy of the
repository: a new virtualenv, ``pip install`` from the copy, the example's
commands, gunicorn, the ``curl`` calls, losing the disk and getting it back.

What the test changes in the README's ``sh`` blocks, and nothing else:
gunicorn runs in the background (and "stop gunicorn" stops it), port 8000
becomes a free port, blocks that need AWS credentials are left out, and
after the README's ``/api/status`` call the test asks ``/api/status`` again
until two workers have answered, to compare them. ``python3`` is the
interpreter running the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

WAIT_FOR_PORT = """
wait_for_port() {
    for _ in $(seq 1 1200); do
        if curl -s -o /dev/null "http://127.0.0.1:$1/api/status"; then return 0; fi
        if ! kill -0 "$GUNICORN" 2>/dev/null; then echo "gunicorn exited" >&2; return 1; fi
        sleep 0.1
    done
    echo "gunicorn did not answer on port $1" >&2
    return 1
}
COUNT_PIDS='import json, sys; print(len({json.loads(l)["pid"] for l in open(sys.argv[1]) if l.strip()}))'
ask_status_until_two_workers() {
    for _ in $(seq 1 300); do
        curl -s "localhost:$1/api/status" >> "$STATUSES"
        echo >> "$STATUSES"
        if [ "$(python3 -c "$COUNT_PIDS" "$STATUSES")" -ge 2 ]; then return 0; fi
    done
}
"""


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone has them (tracked, and new files not ignored)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def readme_script(readme: Path, port: int) -> str:
    """The README's ``sh`` blocks as one bash script (see the module docstring)."""
    lines = ["set -euo pipefail", WAIT_FOR_PORT]
    for block in re.findall(r"```sh\n(.*?)```", readme.read_text(), re.DOTALL):
        if "AWS_" in block:
            continue
        for line in block.splitlines():
            line = line.replace("8000", str(port))
            stripped = line.strip()
            if stripped.startswith("# stop gunicorn"):
                lines.append('kill -TERM "$GUNICORN"; wait "$GUNICORN" || true')
            elif stripped.startswith("gunicorn "):
                lines += [f"{line} >> gunicorn.log 2>&1 &", "GUNICORN=$!", f"wait_for_port {port}"]
            else:
                lines.append(line)
                if stripped.endswith("/api/status"):
                    lines += ["echo", f"ask_status_until_two_workers {port}"]
    lines.append('if [ -n "${GUNICORN:-}" ]; then kill -TERM "$GUNICORN" 2>/dev/null || true; fi')
    return "\n".join(lines) + "\n"


def follow(readme: Path, workdir: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, object]]]:
    """Run ``readme``'s commands from the root of ``workdir``; return the run
    and the ``/api/status`` answers collected."""
    bin_dir = workdir.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").symlink_to(sys.executable)
    statuses = workdir.parent / "statuses.jsonl"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "VIRTUAL_ENV", "DJANGO"))
    }
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STATUSES=str(statuses))
    script = readme_script(readme, free_port())
    proc = subprocess.run(
        ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    answers = (
        [json.loads(line) for line in statuses.read_text().splitlines() if line.strip()]
        if statuses.exists()
        else []
    )
    return proc, answers


def assert_workers_agree(answers: list[dict[str, object]]) -> None:
    """Every worker reports the same replication progress, from at least two workers."""
    assert len({a["pid"] for a in answers}) >= 2, answers
    seen = {(a["replication"]["generation"], a["replication"]["txid"]) for a in answers}  # type: ignore[index]
    assert len(seen) == 1, seen
    ((generation, txid),) = seen
    assert generation is not None
    assert isinstance(txid, int)
    assert txid > 0
    assert {a["role"] for a in answers} <= {"starting", "replicating", "standby"}  # each worker's own


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_django_example_readme(tmp_path: Path) -> None:
    """The Django example's README works as written from a fresh copy."""
    clone = fresh_copy(tmp_path / "clone")
    proc, answers = follow(clone / "examples" / "django" / "README.md", clone)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "holds no backup: a new database" in log
    assert '"name": "milk"' in log
    assert "is replicating it" in log  # sqlrepl status, while gunicorn runs
    assert_workers_agree(answers)
    assert "machine B reads ['milk']" in log  # the read replica, in another folder
    here = clone / "examples" / "django"
    assert re.search(r"restored \S+db\.sqlite3 from file://\S+replica: generation", log), log[-4000:]
    assert rows(here / "db.sqlite3", "SELECT name FROM items_item") == [("milk",)]
    assert "OK: the replica" in log  # manage.py sqlrepl verify
    assert rows(here / "copy.db", "SELECT name FROM items_item") == [("milk",)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flask_example_readme(tmp_path: Path) -> None:
    """The Flask example's README works as written from a fresh copy, and its
    restore at startup is logged."""
    clone = fresh_copy(tmp_path / "clone")
    proc, answers = follow(clone / "examples" / "flask" / "README.md", clone)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "holds no backup: a new database" in log
    assert '"name":"milk"' in log.replace(" ", "")
    assert "is replicating it" in log
    assert_workers_agree(answers)
    assert re.search(r"restored \S+app\.db from file://\S+replica: generation", log), log[-4000:]
    here = clone / "examples" / "flask"
    assert rows(here / "instance" / "app.db", "SELECT name FROM item") == [("milk",)]
    assert rows(here / "instance" / "app.db", "SELECT body FROM notes") == [("hello",)]
