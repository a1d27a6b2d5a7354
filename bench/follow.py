"""Read replicas: how stale a follower's copy is, what it costs, and how long
a reader waits while a batch is applied.

    python -m bench.follow [--seconds 60] [--idle 30] [--rate 100] [--replica URL]

A writer thread commits ``--rate`` transactions per second through
``sqlrepl.connect`` (sync interval 1 s), each inserting a row stamped with
the wall-clock time just before its commit. A follower (poll 1 s) keeps a copy;
after each applied batch (its ``on_apply``) the copy is read and every newly
visible row gives one staleness sample: now - the row's commit time. A
reader process meanwhile times every read of the copy on a long-lived
connection (the longest is the longest wait). Requests are the follower's
own, counted by its client, busy (while writing) and idle (after), scaled to
an hour. One machine, one clock; the replica is a local folder unless
``--replica`` names another (an S3 URL, for example).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import sqlrepl

READER = r"""
import os, sqlite3, sys, time
db, stop = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db, timeout=60)
worst = n = 0
while not os.path.exists(stop):
    t0 = time.perf_counter()
    conn.execute("SELECT count(*), max(seq) FROM log").fetchone()
    worst = max(worst, time.perf_counter() - t0)
    n += 1
    time.sleep(0.002)
print(n, worst, flush=True)
"""


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="busy phase (default 60)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle phase (default 30)")
    parser.add_argument("--rate", type=float, default=100.0, help="commits per second (default 100)")
    parser.add_argument("--replica", help="replica URL (default: a folder in a temporary directory)")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="sqlrepl-bench-follow-")
    url = args.replica or "file://" + os.path.join(work, "replica")
    primary, copy, stop = (os.path.join(work, n) for n in ("primary.db", "copy.db", "stop"))
    conn = sqlrepl.connect(primary, url, options=sqlrepl.Options(sync_interval=1.0), check_same_thread=False)
    conn.execute("CREATE TABLE log(seq INTEGER PRIMARY KEY, t REAL, pad BLOB)")
    conn.commit()
    sqlrepl.sync(primary)

    samples: list[float] = []
    seen = [0]
    lock = threading.Lock()

    def on_apply(_status: sqlrepl.FollowStatus) -> None:
        now = time.time()
        reader = sqlite3.connect(copy)
        try:
            rows = reader.execute("SELECT seq, t FROM log WHERE seq > ?", (seen[0],)).fetchall()
        finally:
            reader.close()
        with lock:
            for seq, t in rows:
                samples.append(now - t)
                seen[0] = max(seen[0], seq)

    follower = sqlrepl.follow(copy, url, poll_interval=1.0, on_apply=on_apply)
    follower.wait(lambda s: s.state == "following", 120)
    reader = subprocess.Popen([sys.executable, "-c", READER, copy, stop], stdout=subprocess.PIPE, text=True)

    done = threading.Event()
    written = [0]

    def write() -> None:
        period = 1.0 / args.rate
        next_at = time.monotonic()
        while not done.is_set():
            conn.execute("INSERT INTO log(t, pad) VALUES (?, randomblob(200))", (time.time(),))
            conn.commit()
            written[0] += 1
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))

    start_req = follower.status().requests
    t0 = time.monotonic()
    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(args.seconds)
    done.set()
    writer.join()
    busy_s = time.monotonic() - t0
    sqlrepl.sync(primary)
    last = conn.execute("SELECT max(seq) FROM log").fetchone()[0]
    # The busy phase ends when the copy holds the last commit.
    while seen[0] < last:
        time.sleep(0.1)
    busy_req = follower.status().requests
    busy_s = time.monotonic() - t0
    time.sleep(args.idle)
    idle_req = follower.status().requests
    open(stop, "w").close()
    out, _ = reader.communicate(timeout=60)
    reads, worst = out.split()
    follower.stop()
    conn.close()
    sqlrepl.stop_all()

    def per_hour(a: dict[str, int], b: dict[str, int], seconds: float) -> dict[str, float]:
        return {k: round((b.get(k, 0) - a.get(k, 0)) * 3600 / seconds) for k in ("LIST", "GET")}

    result = {
        "commits": written[0],
        "commits_per_s": round(written[0] / args.seconds, 1),
        "staleness_p50_s": round(statistics.median(samples), 3),
        "staleness_p99_s": round(_pct(samples, 0.99), 3),
        "staleness_max_s": round(max(samples), 3),
        "batches": follower.status().batches,
        "requests_per_hour_busy": per_hour(start_req, busy_req, busy_s),
        "requests_per_hour_idle": per_hour(busy_req, idle_req, args.idle),
        "reader_reads": int(reads),
        "reader_longest_wait_ms": round(float(worst) * 1000, 1),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
