"""``sqlrepl demo``: the main job end to end on a folder replica.

The same calls an app makes: ``restore`` at startup, ``connect`` to write,
``sync`` to wait for the replica. Then the database is deleted and restored.
"""

from __future__ import annotations

import os
import shutil
import sqlite3

from ._connection import connect, status, sync
from ._replicator import stop_all
from ._restore import restore

__all__ = ["run"]


def run(folder: str) -> None:
    folder = os.path.abspath(folder)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    database = os.path.join(folder, "app.db")
    replica = "file://" + os.path.join(folder, "replica")

    print(f"1. write: {database}, replicated to {replica}")
    with connect(database, replica) as conn:
        conn.execute(
            "CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT, at TEXT DEFAULT CURRENT_TIMESTAMP)"
        )
    for text in ("the first note", "the second note", "the third note"):
        with connect(database, replica) as conn:
            conn.execute("INSERT INTO notes(text) VALUES (?)", (text,))
    sync(database)
    st = status(database)
    print(f"   synced: generation {st.generation}, txid {st.txid}, requests {st.replicas[0].requests}")
    stop_all()

    print("2. delete the database (and its -wal, -shm and staging folder)")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(database + suffix):
            os.unlink(database + suffix)
    shutil.rmtree(database + "-sqlrepl", ignore_errors=True)

    print("3. restore it from the replica")
    result = restore(database, replica)
    assert result is not None
    print(
        f"   restored txid {result.txid} from {result.objects} objects ({result.bytes} bytes)"
        f" in {result.seconds:.3f}s"
    )

    print("4. the rows, read back from the restored file:")
    plain = sqlite3.connect(database)
    try:
        for row in plain.execute("SELECT id, text FROM notes ORDER BY id"):
            print(f"   {row[0]}  {row[1]}")
        print(f"   integrity_check: {plain.execute('PRAGMA integrity_check').fetchone()[0]}")
    finally:
        plain.close()
