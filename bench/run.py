"""The benchmark harness: ``python -m bench`` (or ``python bench/run.py``).

Starts its own SeaweedFS (one fresh store per workload group, shared by the
three ways of that group), a counting proxy in front of it, and for each
workload runs the three ways one after another, never concurrently:

- ``none``: the app alone, no replication;
- ``litestream``: the app plus ``litestream replicate`` as a sidecar process;
- ``sqlrepl``: the app replicating itself with ``sqlrepl.connect``.

The order of the ways rotates with each repeat. Results go to
``docs/bench/results.json``; ``docs/benchmarks.md`` and the plots are made
from that file by :mod:`bench.report`. See docs/benchmarks.md for what each
figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.bandwidth import measure_get_bandwidth
from bench.lag import marker_lags
from bench.litestream import Litestream, find_litestream, ltx_position
from bench.proxy import CountingProxy, summarize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from s3server import SeaweedS3, find_weed  # noqa: E402

import sqlrepl  # noqa: E402
from sqlrepl import _format  # noqa: E402

BUCKET = "bench"
WAYS = ("none", "litestream", "sqlrepl")
WORKLOADS = ("small_1t", "small_8t", "large", "bulk", "mixed")

FULL: dict[str, Any] = {
    "params": {
        "small_1t": {"duration": 30},
        "small_8t": {"duration": 30},
        "large": {"sizes_mb": [1, 5, 10, 25, 50], "pause": 2.0},
        "bulk": {"target_bytes": 1 << 30, "rows_per_txn": 10_000},
        "mixed": {"duration": 30, "threads": 8, "seed_rows": 200_000, "write_share": 0.1},
    },
    "repeat": 3,
    "bandwidth_bytes": 512 << 20,
    "bandwidth_trials": 3,
}
QUICK: dict[str, Any] = {
    "params": {
        "small_1t": {"duration": 4},
        "small_8t": {"duration": 4},
        "large": {"sizes_mb": [1, 2, 5], "pause": 1.0},
        "bulk": {"target_bytes": 48 << 20, "rows_per_txn": 10_000},
        "mixed": {"duration": 4, "threads": 8, "seed_rows": 20_000, "write_share": 0.1},
    },
    "repeat": 1,
    "bandwidth_bytes": 128 << 20,
    "bandwidth_trials": 2,
}
MARKER_INTERVAL = 0.25
LAG_WORKLOADS = {"small_1t", "small_8t", "large", "mixed"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- measurement helpers --------------------------------------------------------------


def cpu_seconds(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    t = p.cpu_times()
    return float(t.user + t.system)


class RssSampler:
    """Samples the resident set size of some processes every 50 ms; keeps the peak."""

    def __init__(self, procs: dict[str, psutil.Process | None]) -> None:
        self.procs = {k: p for k, p in procs.items() if p is not None}
        self.peak = dict.fromkeys(self.procs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, p in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.peak[name] = max(self.peak[name], p.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fingerprint(db: str) -> dict[str, Any]:
    """Row counts, max ids and total payload lengths: equal databases give equal fingerprints."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out: dict[str, Any] = {}
        for table, col in (("t", "v"), ("blobs", "v"), ("markers", "t")):
            out[table] = list(
                conn.execute(f"SELECT count(*), max(id), total(length({col})) FROM {table}").fetchone()
            )
        return out
    finally:
        conn.close()


def max_marker(db: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM markers").fetchone()[0])
    finally:
        conn.close()


def remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def db_bytes(path: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(
            conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
        )
    finally:
        conn.close()


# -- one run ----------------------------------------------------------------------------


class App:
    """The app child process and its line protocol (see bench/app.py)."""

    def __init__(self, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.app", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            self.proc.kill()
            raise RuntimeError(f"app said {line!r}, expected {word!r} (exit status {self.proc.wait()})")

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.send("exit")
        try:
            rc = self.proc.wait(900)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        if rc != 0:
            raise RuntimeError(f"app exited with status {rc}")


class Store:
    """A fresh SeaweedFS with the bench bucket and a counting proxy in front."""

    def __init__(self, root: Path) -> None:
        self.s3 = SeaweedS3(root / "weed")
        self.s3.start()
        self.s3.create_bucket(BUCKET)
        self.proxy = CountingProxy("127.0.0.1", self.s3.s3_port)
        self.proxy.start()
        self.weed = psutil.Process(self.s3._proc.pid) if self.s3._proc else None

    def close(self) -> None:
        self.proxy.close()
        self.s3.close()
        shutil.rmtree(self.s3.dir, ignore_errors=True)


def run_one(
    store: Store, work: Path, workload: str, way: str, synchronous: str, rep: int, cfg: dict[str, Any]
) -> dict[str, Any]:
    run_id = f"{workload}-{synchronous}-{way}-r{rep}"
    d = work / run_id
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    db = str(d / "app.db")
    prefix = f"runs/{run_id}"
    s3 = store.s3
    proxy = store.proxy
    url_via_proxy = f"s3://{BUCKET}/{prefix}?endpoint={proxy.endpoint}&region=us-east-1"
    spec = {
        "workload": workload,
        "way": way,
        "db": db,
        "url": url_via_proxy,
        "synchronous": synchronous,
        "sync_interval": cfg["sync_interval"],
        "params": cfg["params"][workload],
        "marker_interval": MARKER_INTERVAL if workload in LAG_WORKLOADS else 0.0,
        "marker_mode": "thread" if workload == "large" else "piggyback",
        "settle": cfg["sync_interval"] + 2.0,
        "result_path": str(d / "result.json"),
    }
    env = {**os.environ, **s3.env()}
    env.pop("AWS_ENDPOINT_URL_S3", None)
    # Each run starts without the previous run's dirty pages: a 1 GiB bulk
    # load (and Litestream's copy of its WAL) leaves seconds of writeback,
    # which would otherwise slow whichever way happens to run next.
    t_flush = time.monotonic()
    os.sync()
    log(f"run {run_id} (writeback of earlier runs: {time.monotonic() - t_flush:.2f} s)")
    t_setup = time.monotonic()
    app = App(spec, env)
    sidecar: Litestream | None = None
    side_p: psutil.Process | None = None
    try:
        app.expect("prepared")
        if way == "litestream":
            sidecar = Litestream(
                db=db,
                bucket=BUCKET,
                path=prefix,
                access_key=s3.access_key,
                secret_key=s3.secret_key,
                sync_interval=cfg["sync_interval"],
                workdir=str(d),
            )
            side_p = psutil.Process(sidecar.start(proxy.endpoint))
        app.expect("ready")
        if sidecar is not None:
            sidecar.wait_socket()
            deadline = time.monotonic() + 120
            while not any(
                ex.made_visible and ex.bucket_key[1].startswith(prefix + "/")
                for ex in proxy.exchanges_between(t_setup, time.monotonic())
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"litestream uploaded nothing in 120 s\n{sidecar.log_tail()}")
                time.sleep(0.05)
            sidecar.sync_wait()
        setup_ex = proxy.exchanges_between(t_setup, time.monotonic())
        app_p = psutil.Process(app.proc.pid)
        procs = {"app": app_p, "sidecar": side_p, "store": store.weed}
        with RssSampler(procs) as rss:
            cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
            t_go = time.monotonic()
            app.send("go")
            app.expect("done")
            t_done = time.monotonic()
            sync_seconds = sidecar.sync_wait() if sidecar is not None else 0.0
            t_caught = time.monotonic()
            cpu1 = {k: cpu_seconds(p) for k, p in procs.items()}
        app.close()
    finally:
        if sidecar is not None:
            sidecar.stop()
        if app.proc.poll() is None:
            app.proc.kill()
    res = json.loads(Path(spec["result_path"]).read_text())
    window = proxy.exchanges_between(t_go, t_caught)
    out: dict[str, Any] = {
        "run_id": run_id,
        "workload": workload,
        "way": way,
        "synchronous": synchronous,
        "repeat": rep,
        "params": spec["params"],
        "marker_mode": spec["marker_mode"] if spec["marker_interval"] > 0 else None,
        "workload_result": res["workload"],
        "latency": res["latency"],
        "cpu_seconds": {k: cpu1[k] - cpu0[k] for k in cpu0},
        "window_seconds": t_caught - t_go,
        "peak_rss_bytes": rss.peak,
        "app_ru_maxrss_bytes": res["ru_maxrss_kib"] * 1024,
        "requests": summarize(window),
        "setup_requests": summarize(setup_ex),
        "sqlrepl_status": res["sqlrepl_status"],
        "prometheus_scrapes": res.get("prometheus_scrapes"),
        "final_sync_seconds": (
            sync_seconds
            if way == "litestream"
            else (res["sqlrepl_status"] or {}).get("sync_call_seconds", 0.0)
        ),
        "done_to_caught_up_seconds": t_caught - t_done,
    }
    if way == "none":
        out["db_bytes"] = db_bytes(db)
        remove_db(db)
        return out

    # -- what reached the store, and when ------------------------------------------------
    def position(key: str) -> Any:
        if not key.startswith(prefix + "/"):
            return None
        rel = key[len(prefix) + 1 :]
        if way == "litestream":
            return ltx_position(rel)
        parsed = _format.parse_key(rel)
        if isinstance(parsed, _format.SnapshotKey):
            return (parsed.generation, parsed.txid)
        if isinstance(parsed, _format.SegmentKey):
            return (parsed.generation, parsed.last_txid)
        return None

    # Every object made readable in the window: seconds after go, key, request-body bytes
    # (for a multipart upload the bytes are those of the completing request only).
    out["uploads"] = [
        [round(ex.done - t_go, 4), (ex.made_visible or "")[len(prefix) + 1 :], ex.bytes_up]
        for ex in window
        if ex.made_visible
    ]
    visible = [(ex.done, position(ex.made_visible)) for ex in window if ex.made_visible]
    data_visible = [(t, p) for t, p in visible if p is not None]
    out["objects_uploaded"] = len(data_visible)
    if data_visible:
        final = max(p for _, p in data_visible)
        t_final = min(t for t, p in data_visible if p == final)
        # When the last commit of the workload was readable in the store.
        out["last_commit_visible_after_end_seconds"] = t_final - res["end"]

    source = fingerprint(db)
    out["db_bytes"] = db_bytes(db)

    def restore(target: str, endpoint_url: str, txid: Any = None) -> float:
        remove_db(target)
        if way == "litestream":
            assert sidecar is not None
            return sidecar.restore(target, endpoint_url, None if txid is None else int(txid))
        kwargs: dict[str, Any] = {}
        if txid is not None:
            kwargs = {"generation": txid[0], "txid": txid[1]}
        t0 = time.monotonic()
        sqlrepl.restore(target, f"s3://{BUCKET}/{prefix}?endpoint={endpoint_url}&region=us-east-1", **kwargs)
        return time.monotonic() - t0

    # -- restore of the final database: timed (direct), then counted (via the proxy) ------
    os.environ.update({k: v for k, v in s3.env().items() if k != "AWS_ENDPOINT_URL_S3"})
    restored = str(d / "restored.db")
    seconds = restore(restored, s3.endpoint)
    ok = fingerprint(restored) == source
    remove_db(restored)
    t0 = time.monotonic()
    restore(restored, proxy.endpoint)
    counted = summarize(proxy.exchanges_between(t0, time.monotonic()))
    remove_db(restored)
    out["restore"] = {"seconds": seconds, "matches_source": ok, "requests": counted}
    if not ok:
        log(f"  RESTORE MISMATCH for {run_id}")

    # -- lag --------------------------------------------------------------------------
    if res["markers"]:
        probe = str(d / "probe.db")

        def max_marker_at(pos: Any) -> int:
            restore(probe, s3.endpoint, pos)
            try:
                return max_marker(probe)
            finally:
                remove_db(probe)

        t0 = time.monotonic()
        lag = marker_lags([tuple(m) for m in res["markers"]], visible, max_marker_at)
        lag["mapping_seconds"] = time.monotonic() - t0
        # (id, when its commit returned, s after go): the arithmetic can be checked later.
        lag["markers"] = [[k, round(t - t_go, 4)] for k, t in res["markers"]]
        lag["held"] = [[round(t - t_go, 4), k] for t, k in lag["held"]]
        out["lag"] = lag
    remove_db(db)
    shutil.rmtree(db + "-sqlrepl", ignore_errors=True)
    return out


# -- aggregation ------------------------------------------------------------------------


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def run_metrics(r: dict[str, Any]) -> dict[str, float | None]:
    """The per-run figures that the report tabulates (medians are taken over runs)."""
    w = r["workload_result"]
    txns = w["txns"]
    if r.get("marker_mode") == "thread":  # the probe's own marker transactions
        txns += len(r.get("lag", {}).get("lags", []))
    m: dict[str, float | None] = {
        "throughput_txn_s": w["txns"] / w["seconds"],
        "throughput_MB_s": w["bytes"] / w["seconds"] / 1e6,
        "commit_p50_ms": r["latency"]["commit"].get("p50", 0) * 1e3,
        "commit_p99_ms": r["latency"]["commit"].get("p99", 0) * 1e3,
        "txn_p50_ms": r["latency"]["txn"].get("p50", 0) * 1e3,
        "txn_p99_ms": r["latency"]["txn"].get("p99", 0) * 1e3,
        "app_cpu_s": r["cpu_seconds"]["app"],
        "sidecar_cpu_s": r["cpu_seconds"]["sidecar"] if r["way"] == "litestream" else None,
        "total_cpu_s": r["cpu_seconds"]["app"] + r["cpu_seconds"].get("sidecar", 0.0),
        "store_cpu_s": r["cpu_seconds"].get("store", 0.0),
        "app_peak_rss_MB": r["peak_rss_bytes"].get("app", 0) / 1e6,
        "sidecar_peak_rss_MB": r["peak_rss_bytes"]["sidecar"] / 1e6 if r["way"] == "litestream" else None,
        "db_MB": r["db_bytes"] / 1e6,
    }
    if "ops" in w:
        m["throughput_ops_s"] = w["ops"] / w["seconds"]
        m["read_p50_ms"] = r["latency"]["read"].get("p50", 0) * 1e3
        m["read_p99_ms"] = r["latency"]["read"].get("p99", 0) * 1e3
    if r["way"] != "none":
        req = r["requests"]
        per = 10_000 / max(1, txns)
        for kind in ("PUT", "GET", "LIST", "DELETE", "HEAD"):
            m[f"{kind}_per_10k"] = req[kind] * per
        m["requests_per_10k"] = sum(req[k] for k in ("PUT", "GET", "LIST", "DELETE", "HEAD", "OTHER")) * per
        m["MB_up_per_10k"] = req["bytes_up"] / 1e6 * per
        m["MB_up_total"] = req["bytes_up"] / 1e6
        # Bytes uploaded per byte of row payload committed (write amplification to the store).
        m["upload_amplification"] = req["bytes_up"] / max(1, w["bytes"])
        m["restore_s"] = r["restore"]["seconds"]
        m["restore_MB_s"] = r["db_bytes"] / r["restore"]["seconds"] / 1e6
        m["restore_GETs"] = r["restore"]["requests"]["GET"]
        m["restore_MB_down"] = r["restore"]["requests"]["bytes_down"] / 1e6
        m["catch_up_s"] = r.get("last_commit_visible_after_end_seconds")
        lags = [x for x in r.get("lag", {}).get("lags", []) if x is not None]
        if lags:
            m["lag_p50_s"] = _pct(lags, 0.50)
            m["lag_p99_s"] = _pct(lags, 0.99)
            m["lag_max_s"] = max(lags)
        if r.get("lag"):
            m["lag_never"] = sum(x is None for x in r["lag"]["lags"])
    return m


def summarize_runs(runs: list[dict[str, Any]], bandwidth: list[dict[str, Any]]) -> dict[str, Any]:
    """{workload: {synchronous: {way: {metric: {median, min, max, n}}}}} plus ratios."""
    groups: dict[tuple[str, str, str], list[dict[str, float | None]]] = {}
    for r in runs:
        groups.setdefault((r["workload"], r["synchronous"], r["way"]), []).append(run_metrics(r))
    par = [b["parallel_ranged_MBps"]["median"] for b in bandwidth]
    single = [b["single_stream_MBps"]["median"] for b in bandwidth]
    raw_parallel = statistics.median(par) if par else None
    raw_single = statistics.median(single) if single else None
    out: dict[str, Any] = {}
    for (wl, sync, way), ms in groups.items():
        keys = sorted({k for m in ms for k in m})
        stats: dict[str, Any] = {}
        for k in keys:
            vals = [m[k] for m in ms if m.get(k) is not None]
            if vals:
                stats[k] = {
                    "median": statistics.median(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "n": len(vals),
                }
        out.setdefault(wl, {}).setdefault(sync, {})[way] = stats
    # Ratios: of each way's median to the none way's median (per workload), and
    # restore speed against raw GET bandwidth.
    for by_sync in out.values():
        for by_way in by_sync.values():
            base = by_way.get("none", {})
            for stats in by_way.values():
                for k in ("throughput_txn_s", "throughput_ops_s", "throughput_MB_s"):
                    if k in stats and k in base and base[k]["median"]:
                        stats[k + "_ratio"] = stats[k]["median"] / base[k]["median"]
                        stats[k + "_ratio_range"] = [
                            stats[k]["min"] / base[k]["median"],
                            stats[k]["max"] / base[k]["median"],
                        ]
                if "restore_MB_s" in stats and raw_parallel:
                    stats["restore_vs_raw_parallel"] = stats["restore_MB_s"]["median"] / raw_parallel
                    stats["restore_vs_raw_single"] = stats["restore_MB_s"]["median"] / raw_single
    return {
        "by_workload": out,
        "raw_get_MBps": {"parallel_ranged": raw_parallel, "single_stream": raw_single},
    }


# -- machine ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(args: list[str]) -> str:
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=30)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        rev = "unknown"
    fs = "unknown"
    with contextlib.suppress(OSError, IndexError):
        fs = (
            subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True, timeout=10)
            .stdout.splitlines()[1]
            .split()[1]
        )
    load = os.getloadavg()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_GB": round(psutil.virtual_memory().total / 1e9, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "tmp_filesystem": fs,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "litestream": version([find_litestream(), "version"]),
        "seaweedfs": version([find_weed(), "version"]),
        "sqlrepl": f"{sqlrepl.__version__} (git {rev})",
        "loadavg_at_start": [round(x, 2) for x in load],
    }


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small, short settings: a smoke test")
    ap.add_argument("--repeat", type=int, help="runs of each (workload, way); default 3 (quick: 1)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--ways", default=",".join(WAYS), help="comma list of none, litestream, sqlrepl")
    ap.add_argument(
        "--synchronous", default="FULL", help="comma list of SQLite synchronous levels (FULL, NORMAL)"
    )
    ap.add_argument("--sync-interval", type=float, default=1.0, help="seconds, both tools (default 1)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="folder for results.json and plots")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown report to write")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--skip-bandwidth", action="store_true", help="do not measure raw GET bandwidth")
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="WORKLOAD.NAME=JSON",
        help="override a workload parameter, e.g. bulk.target_bytes=268435456 or large.sizes_mb=[1,5]",
    )
    args = ap.parse_args(argv)

    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    for item in args.param:
        name, _, value = item.partition("=")
        wl, _, key = name.partition(".")
        if wl not in cfg["params"] or not key or not value:
            ap.error(f"--param {item!r}: use WORKLOAD.NAME=JSON with a workload of {', '.join(WORKLOADS)}")
        cfg["params"][wl][key] = json.loads(value)
    cfg["sync_interval"] = args.sync_interval
    repeat = args.repeat or cfg["repeat"]
    workloads = [w for w in args.workloads.split(",") if w]
    ways = [w for w in args.ways.split(",") if w]
    syncs = [s.upper() for s in args.synchronous.split(",") if s]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w}")
    for w in ways:
        if w not in WAYS:
            ap.error(f"unknown way {w}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="sqlrepl-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": {
            **cfg,
            "repeat": repeat,
            "workloads": workloads,
            "ways": ways,
            "synchronous": syncs,
            "marker_interval": MARKER_INTERVAL,
        },
        "bandwidth": [],
        "runs": [],
    }
    results_path = out_dir / "results.json"

    def save() -> None:
        results["summary"] = summarize_runs(results["runs"], results["bandwidth"])
        results["elapsed_seconds"] = time.monotonic() - started
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_path)

    started = time.monotonic()
    log(f"work folder {work}; results to {results_path}")
    try:
        for rep in range(repeat):
            for wl in workloads:
                store = Store(work / f"store-{wl}-r{rep}")
                try:
                    if wl == "bulk" and not args.skip_bandwidth:
                        log("raw GET bandwidth")
                        bw = measure_get_bandwidth(
                            store.s3.endpoint,
                            store.s3.access_key,
                            store.s3.secret_key,
                            BUCKET,
                            cfg["bandwidth_bytes"],
                            trials=cfg["bandwidth_trials"],
                        )
                        log(
                            f"  single {bw['single_stream_MBps']['median']:.0f} MB/s,"
                            f" parallel {bw['parallel_ranged_MBps']['median']:.0f} MB/s"
                        )
                        results["bandwidth"].append(bw)
                    for sync in syncs:
                        order = ways[rep % len(ways) :] + ways[: rep % len(ways)]
                        for way in order:
                            r = run_one(store, work, wl, way, sync, rep, cfg)
                            results["runs"].append(r)
                            m = run_metrics(r)
                            log(
                                "  "
                                + ", ".join(
                                    f"{k}={v:.4g}"
                                    for k, v in m.items()
                                    if v is not None
                                    and k
                                    in (
                                        "throughput_txn_s",
                                        "commit_p99_ms",
                                        "lag_p99_s",
                                        "app_cpu_s",
                                        "sidecar_cpu_s",
                                        "requests_per_10k",
                                        "restore_s",
                                    )
                                )
                            )
                            save()
                finally:
                    store.close()
    finally:
        save()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    from bench.report import write_report

    write_report(results_path, Path(args.doc), out_dir)
    log(f"done in {time.monotonic() - started:.0f} s; wrote {args.doc} and {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
