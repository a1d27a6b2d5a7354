"""How long the app's commits wait while another process checkpoints.

    python -m bench.checkpoint_stall [--seconds 20] [--busy-timeout 5] [--pause 0.2]

Two processes share one database for ``--seconds``: the app commits a small
row every millisecond or so (through ``sqlrepl.connect`` with a ``file://``
replica, or through plain ``sqlite3`` for the baseline), and a second
process, with a busy timeout of ``--busy-timeout`` seconds, runs
``PRAGMA wal_checkpoint(TRUNCATE)`` and ``(RESTART)`` in turn, pausing
``--pause`` seconds between them. Prints, for each of the two runs, the
app's commits, its slowest commit and its 99.9th percentile, and how many
of the checkpoints succeeded (busy = 0) and how long the slowest took.
With sqlrepl, it also restores the replica and compares it with the
database.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

APP = r"""
import json, os, sqlite3, sys, time
db, url, seconds, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
if url:
    import sqlrepl
    conn = sqlrepl.connect(db, url, timeout=60)
else:
    conn = sqlite3.connect(db, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
conn.commit()
if url:
    sqlrepl.sync(db, timeout=60)
open(go, "w").close()
lat = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    t0 = time.perf_counter()
    conn.execute("INSERT INTO t(v) VALUES (randomblob(200))")
    conn.commit()
    lat.append(time.perf_counter() - t0)
    time.sleep(0.001)
out = {"commits": len(lat), "max": max(lat), "p999": sorted(lat)[int(len(lat) * 0.999)]}
if url:
    sqlrepl.sync(db, timeout=60)
    out["generation"] = sqlrepl.status(db).generation
conn.close()
print(json.dumps(out), flush=True)
"""

CHECKPOINTER = r"""
import json, os, sqlite3, sys, time
db, busy, pause, go, stop = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
while not os.path.exists(go):
    time.sleep(0.01)
conn = sqlite3.connect(db, timeout=busy, isolation_level=None)
runs = []
modes = ["TRUNCATE", "RESTART"]
while not os.path.exists(stop):
    mode = modes[len(runs) % 2]
    t0 = time.perf_counter()
    try:
        busy_flag, log, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    except sqlite3.OperationalError:
        busy_flag, log, done = 1, -1, -1
    runs.append((mode, busy_flag, time.perf_counter() - t0))
    time.sleep(pause)
ok = sum(1 for r in runs if r[1] == 0)
print(json.dumps({"checkpoints": len(runs), "ok": ok, "slowest": max(r[2] for r in runs)}), flush=True)
"""


def one_run(with_sqlrepl: bool, seconds: float, busy: float, pause: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sqlrepl-ckpt-"))
    try:
        db = str(work / "app.db")
        url = "file://" + str(work / "replica") if with_sqlrepl else ""
        go, stop = str(work / "go"), str(work / "stop")
        env = {"PYTHONPATH": str(ROOT)}
        ckpt = subprocess.Popen(
            [sys.executable, "-c", CHECKPOINTER, db, str(busy), str(pause), go, stop],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        app = subprocess.run(
            [sys.executable, "-c", APP, db, url, str(seconds), go],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        open(stop, "w").close()
        out, _ = ckpt.communicate(timeout=busy * 3 + 60)
        result: dict[str, Any] = {**json.loads(app.stdout), **json.loads(out)}
        if with_sqlrepl:
            sys.path.insert(0, str(ROOT))
            import sqlrepl

            restored = str(work / "restored.db")
            sqlrepl.restore(restored, url)
            result["restore_equal"] = _dump(restored) == _dump(db)
            result["generations"] = len(list((work / "replica" / "generations").iterdir()))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _dump(path: str) -> list[str]:
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--busy-timeout", type=float, default=5.0)
    ap.add_argument("--pause", type=float, default=0.2)
    args = ap.parse_args(argv)
    print(
        f"{args.seconds:.0f} s of commits; checkpoints TRUNCATE/RESTART, busy timeout {args.busy_timeout} s"
    )
    head = f"{'app':8} {'commits':>8} {'slowest':>9} {'p99.9':>8} {'ckpt ok':>10} {'slowest ckpt':>13}"
    print(head + "  restore  generations")
    for with_sqlrepl in (False, True):
        r = one_run(with_sqlrepl, args.seconds, args.busy_timeout, args.pause)
        name = "sqlrepl" if with_sqlrepl else "sqlite3"
        restore = {True: "equal", False: "DIFFERS"}.get(r.get("restore_equal"), "-")
        print(
            f"{name:8} {r['commits']:>8} {r['max'] * 1000:>7.0f}ms {r['p999'] * 1000:>6.1f}ms"
            f" {r['ok']:>4}/{r['checkpoints']:<5} {r['slowest'] * 1000:>11.0f}ms"
            f"  {restore:7}  {r.get('generations', '-')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
