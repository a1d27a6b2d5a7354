"""The application process of one benchmark run: prepares the database, runs
one workload, measures commit latencies and writes the lag-probe markers.

Run by the harness as ``python -m bench.app SPEC_JSON`` and driven over
stdin/stdout, one word a line, so that the harness can take CPU and memory
readings of this process (and of a sidecar) at the exact phase boundaries::

    app -> "prepared"   database file created, schema and seed rows in place
    app -> "ready"      (sqlrepl) replicator started and first snapshot uploaded
    harness -> "go"     workload starts
    app -> "done"       workload over, idle settle period over, (sqlrepl) synced;
                        results are in spec["result_path"]
    harness -> "exit"   stop replication, close, exit

Every way ("none", "litestream", "sqlrepl") runs exactly this code; the only
difference is how connections are opened (:func:`open_connection`) and that
the sqlrepl way calls ``sqlrepl.sync`` at the end (the harness does the same
for Litestream with ``litestream sync -wait``).
"""

from __future__ import annotations

import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ROW_TEXT = 200  # characters of the small-transaction payload


def payload(n: int, rng: random.Random) -> str:
    """``n`` characters of hex text: half random, so it compresses about 2x
    with any compressor (neither best nor worst case for either tool)."""
    return rng.randbytes((n + 1) // 2).hex()[:n]


def open_connection(spec: dict[str, Any]) -> sqlite3.Connection:
    """A connection with the settings every way shares."""
    if spec["way"] == "sqlrepl":
        import sqlrepl

        conn: sqlite3.Connection = sqlrepl.connect(
            spec["db"],
            spec["url"],
            options=sqlrepl.Options(sync_interval=spec["sync_interval"]),
            isolation_level=None,
            check_same_thread=False,
            timeout=60,
        )
    else:
        conn = sqlite3.connect(spec["db"], isolation_level=None, check_same_thread=False, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={spec['synchronous']}")
    conn.execute("PRAGMA busy_timeout=60000")
    return conn


def prepare(spec: dict[str, Any]) -> None:
    """Create the database: schema, and the seed rows of the mixed workload."""
    conn = sqlite3.connect(spec["db"], isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v TEXT NOT NULL);
        CREATE INDEX IF NOT EXISTS t_k ON t (k);
        CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, v TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS markers (id INTEGER PRIMARY KEY, t REAL NOT NULL);
        """
    )
    seed = int(spec["params"].get("seed_rows", 0))
    rng = random.Random(1)
    batch = 10_000
    for start in range(0, seed, batch):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO t (k, v) VALUES (?, ?)",
            ((rng.randrange(1 << 40), payload(ROW_TEXT, rng)) for _ in range(min(batch, seed - start))),
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


class Recorder:
    """Per-thread latency lists, merged at the end (no lock on the hot path)."""

    def __init__(self) -> None:
        self._lists: list[dict[str, list[float]]] = []
        self._lock = threading.Lock()

    def new(self) -> dict[str, list[float]]:
        d: dict[str, list[float]] = {"commit": [], "txn": [], "read": []}
        with self._lock:
            self._lists.append(d)
        return d

    def merged(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"commit": [], "txn": [], "read": []}
        for d in self._lists:
            for k, v in d.items():
                out[k].extend(v)
        return out


def quantiles(values: list[float]) -> dict[str, Any]:
    """Count, mean, p50/p90/p99/p99.9/max and 101 percentiles (for plots), in seconds."""
    if not values:
        return {"count": 0}
    s = sorted(values)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, int(p * n))]

    return {
        "count": n,
        "mean": sum(s) / n,
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": s[-1],
        "percentiles": [q(i / 100) for i in range(101)],
    }


# -- workloads: each returns (units, counters) and fills the recorder ----------------


def small_txns(
    spec: dict[str, Any], rec: Recorder, probe: MarkerProbe | None, threads: int
) -> dict[str, Any]:
    """Each thread: BEGIN IMMEDIATE; insert one ~200-byte row; COMMIT; until the deadline."""
    duration = float(spec["params"]["duration"])
    conns = [open_connection(spec) for _ in range(threads)]
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def run(i: int) -> None:
        conn, lat, rng = conns[i], rec.new(), random.Random(100 + i)
        rows = [(rng.randrange(1 << 40), payload(ROW_TEXT, rng)) for _ in range(256)]
        barrier.wait()
        end, n, clock = deadline[0], 0, time.perf_counter
        while True:
            t0 = clock()
            if t0 >= end:
                break
            marker = probe.take() if probe is not None and probe.due else None
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", rows[n & 255])
            if marker is not None:
                conn.execute("INSERT INTO markers (id, t) VALUES (?, ?)", (marker, time.time()))
            t1 = clock()
            conn.commit()
            t2 = clock()
            if marker is not None:
                probe.committed(marker)  # type: ignore[union-attr]
            lat["commit"].append(t2 - t1)
            lat["txn"].append(t2 - t0)
            n += 1
        counts[i] = n

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    deadline[0] = time.perf_counter() + duration
    t_start = time.perf_counter()
    barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t_start
    for c in conns:
        c.close()
    return {"txns": sum(counts), "seconds": elapsed, "bytes": sum(counts) * ROW_TEXT}


def large_txns(spec: dict[str, Any], rec: Recorder, probe: MarkerProbe | None) -> dict[str, Any]:
    """A few transactions of 1 to 50 MB of rows (16 KiB of text each), with a pause between."""
    sizes = [float(mb) for mb in spec["params"]["sizes_mb"]]
    pause = float(spec["params"]["pause"])
    conn, lat, rng = open_connection(spec), rec.new(), random.Random(7)
    row = 16 << 10
    busy = 0.0
    total = 0
    per_txn = []
    t_start = time.perf_counter()
    for mb in sizes:
        n = max(1, int(mb * (1 << 20)) // row)
        data = [(payload(row, rng),) for _ in range(n)]
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO blobs (v) VALUES (?)", data)
        t1 = time.perf_counter()
        conn.commit()
        t2 = time.perf_counter()
        lat["commit"].append(t2 - t1)
        lat["txn"].append(t2 - t0)
        per_txn.append({"mb": mb, "seconds": t2 - t0, "commit_seconds": t2 - t1})
        busy += t2 - t0
        total += n * row
        time.sleep(pause)
    elapsed = time.perf_counter() - t_start
    conn.close()
    # Throughput over the time spent in transactions (the pauses are idle by design).
    return {"txns": len(sizes), "seconds": busy, "wall_seconds": elapsed, "bytes": total, "per_txn": per_txn}


def bulk_load(spec: dict[str, Any], rec: Recorder, probe: MarkerProbe | None) -> dict[str, Any]:
    """Insert ~1 KiB rows in 10,000-row transactions until the database reaches the target size."""
    target = int(spec["params"]["target_bytes"])
    rows_per_txn = int(spec["params"].get("rows_per_txn", 10_000))
    conn, lat, rng = open_connection(spec), rec.new(), random.Random(11)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pool = [(rng.randrange(1 << 40), payload(1000, rng)) for _ in range(4096)]
    txns = rows = 0
    t_start = time.perf_counter()
    while conn.execute("PRAGMA page_count").fetchone()[0] * page_size < target:
        off = rng.randrange(4096)
        batch = [pool[(off + i * 7) & 4095] for i in range(rows_per_txn)]
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t (k, v) VALUES (?, ?)", batch)
        t1 = time.perf_counter()
        conn.commit()
        t2 = time.perf_counter()
        lat["commit"].append(t2 - t1)
        lat["txn"].append(t2 - t0)
        txns += 1
        rows += rows_per_txn
    elapsed = time.perf_counter() - t_start
    conn.close()
    return {"txns": txns, "rows": rows, "seconds": elapsed, "bytes": rows * 1000}


def mixed(spec: dict[str, Any], rec: Recorder, probe: MarkerProbe | None) -> dict[str, Any]:
    """``threads`` threads; each operation is a point read (90%) or a
    one-row UPDATE in its own transaction (10%), as a web app's requests."""
    duration = float(spec["params"]["duration"])
    threads = int(spec["params"]["threads"])
    seed = int(spec["params"]["seed_rows"])
    write_share = float(spec["params"].get("write_share", 0.1))
    conns = [open_connection(spec) for _ in range(threads)]
    reads = [0] * threads
    writes = [0] * threads
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def run(i: int) -> None:
        conn, lat, rng = conns[i], rec.new(), random.Random(200 + i)
        texts = [payload(ROW_TEXT, rng) for _ in range(64)]
        barrier.wait()
        end, clock = deadline[0], time.perf_counter
        r = w = 0
        while True:
            t0 = clock()
            if t0 >= end:
                break
            key = rng.randrange(1, seed + 1)
            if rng.random() >= write_share:
                conn.execute("SELECT k, v FROM t WHERE id = ?", (key,)).fetchone()
                lat["read"].append(clock() - t0)
                r += 1
            else:
                marker = probe.take() if probe is not None and probe.due else None
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE t SET v = ?, k = k + 1 WHERE id = ?", (texts[w & 63], key))
                if marker is not None:
                    conn.execute("INSERT INTO markers (id, t) VALUES (?, ?)", (marker, time.time()))
                t1 = clock()
                conn.commit()
                t2 = clock()
                if marker is not None:
                    probe.committed(marker)  # type: ignore[union-attr]
                lat["commit"].append(t2 - t1)
                lat["txn"].append(t2 - t0)
                w += 1
        reads[i], writes[i] = r, w

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    deadline[0] = time.perf_counter() + duration
    t_start = time.perf_counter()
    barrier.wait()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - t_start
    for c in conns:
        c.close()
    return {
        "txns": sum(writes),
        "reads": sum(reads),
        "ops": sum(reads) + sum(writes),
        "seconds": elapsed,
        "bytes": sum(writes) * ROW_TEXT,
    }


WORKLOADS: dict[str, Callable[[dict[str, Any], Recorder, MarkerProbe | None], dict[str, Any]]] = {
    "small_1t": lambda spec, rec, probe: small_txns(spec, rec, probe, 1),
    "small_8t": lambda spec, rec, probe: small_txns(spec, rec, probe, 8),
    "large": large_txns,
    "bulk": bulk_load,
    "mixed": mixed,
}


class MarkerProbe:
    """Marker rows ``markers(id, t)`` for the lag measurement: one every
    ``interval`` seconds, with the monotonic time at which the ``commit()``
    that made it durable returned. The harness later finds when each marker
    became restorable from the store.

    Two ways to commit them:

    - ``piggyback`` (workloads that write continuously): a timer marks a
      marker as due; the next workload write transaction, in whichever thread,
      takes it and inserts it in the same transaction. No extra transaction,
      and no marker waits for the write lock longer than the workload's own
      transactions do. (A separate marker thread would: SQLite's busy handler
      sleeps and retries, and loses to writers committing in a loop.)
    - ``thread``: a thread commits each marker in its own transaction (the
      ``large`` workload, whose pauses leave the write lock free).
    """

    def __init__(self, spec: dict[str, Any], interval: float, mode: str) -> None:
        self.spec = spec
        self.interval = interval
        self.mode = mode
        self.times: list[tuple[int, float]] = []
        self.due = False
        self._k = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="marker-probe", daemon=True)

    def start(self) -> None:
        if self.mode == "thread":
            self._conn = open_connection(self.spec)
        self._thread.start()

    def take(self) -> int | None:
        """The id of the marker that is due, once (``None`` if another thread took it)."""
        with self._lock:
            if not self.due:
                return None
            self.due = False
            self._k += 1
            return self._k

    def committed(self, k: int) -> None:
        self.times.append((k, time.monotonic()))

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            if self.mode == "piggyback":
                self.due = True
            else:
                self.due = True
                k = self.take()
                assert k is not None
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("INSERT INTO markers (id, t) VALUES (?, ?)", (k, time.time()))
                self._conn.commit()
                self.committed(k)
            next_at = max(next_at + self.interval, time.monotonic() + self.interval / 2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.due = False
        if self.mode == "thread":
            self._conn.close()


def start_scraper() -> subprocess.Popen[str]:
    """Serve sqlrepl's Prometheus collector from this process, as an app
    would, and have a separate process scrape it once a second
    (``SQLREPL_BENCH_PROMETHEUS=1``: the overhead benchmark)."""
    import prometheus_client

    import sqlrepl.prometheus

    sqlrepl.prometheus.register()
    server, _thread = prometheus_client.start_http_server(0, addr="127.0.0.1")
    return subprocess.Popen(
        [sys.executable, "-m", "bench.scrape", str(server.server_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def main() -> None:
    spec = json.loads(sys.argv[1])
    say = sys.stdout
    prepare(spec)
    print("prepared", file=say, flush=True)
    # One connection held open for the whole run, in every way: the WAL file
    # must not be deleted by a last close between phases (sqlrepl's
    # documented rule), and apps usually keep a connection anyway.
    keeper = open_connection(spec)
    scraper = None
    if spec["way"] == "sqlrepl":
        import sqlrepl

        sqlrepl.sync(spec["db"], timeout=600)
        if os.environ.get("SQLREPL_BENCH_PROMETHEUS"):
            scraper = start_scraper()
    print("ready", file=say, flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("expected 'go'")
    go = time.monotonic()
    rec = Recorder()
    probe = None
    if spec["marker_interval"] > 0:
        probe = MarkerProbe(spec, spec["marker_interval"], spec["marker_mode"])
        probe.start()
    result = WORKLOADS[spec["workload"]](spec, rec, probe)
    end = time.monotonic()
    if probe:
        probe.stop()
    # Idle so that the last commits leave by the ordinary interval, not by
    # the final forced sync (which would flatter the lag of both tools).
    time.sleep(spec["settle"])
    status = None
    synced = end
    if spec["way"] == "sqlrepl":
        import sqlrepl

        t0 = time.monotonic()
        sqlrepl.sync(spec["db"], timeout=1800)
        synced = time.monotonic()
        st = sqlrepl.status(spec["db"])
        status = {
            "txid": st.txid,
            "generation": st.generation,
            "sync_call_seconds": synced - t0,
            "staged_objects": st.staged_objects,
            "staged_bytes": st.staged_bytes,
            "replicas": [{"url": r.url, "txid": r.txid, "requests": r.requests} for r in st.replicas],
        }
    scrapes = None
    if scraper is not None:
        out_text, _ = scraper.communicate(timeout=60)
        scrapes = int(out_text)
    lat = rec.merged()
    out = {
        "prometheus_scrapes": scrapes,
        "go": go,
        "end": end,
        "synced": synced,
        "workload": result,
        "latency": {k: quantiles(v) for k, v in lat.items()},
        "markers": probe.times if probe else [],
        "sqlrepl_status": status,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    with open(spec["result_path"], "w") as f:
        json.dump(out, f)
    print("done", file=say, flush=True)
    sys.stdin.readline()  # "exit"
    if spec["way"] == "sqlrepl":
        import sqlrepl

        sqlrepl.stop_all(flush=True, timeout=600)
    keeper.close()


if __name__ == "__main__":
    main()
