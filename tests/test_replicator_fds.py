"""A stopped replicator leaves none of its own descriptors open."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import file_url

import sqlrepl


def _pipes() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # (the listing's own descriptor, gone)
        if target.startswith("pipe:"):
            found.add(f"{fd} {target}")
    return found


def test_a_stopped_replicator_closes_its_wake_pipe(db_path: str, tmp_path: Path) -> None:
    """Each replicator's wake pipe is closed when its thread ends (a long test run ran out of descriptors)."""
    before = _pipes()
    for i in range(3):
        conn = sqlrepl.connect(db_path, file_url(tmp_path / f"replica{i}"))
        conn.execute(f"CREATE TABLE t{i}(x)")
        conn.commit()
        sqlrepl.sync(db_path, timeout=60)
        sqlrepl.stop_all(timeout=10)
        conn.close()
    assert _pipes() - before == set()
