"""WAL capture throughput on a bulk load, and the cost of finding the last
committed frame two ways.

    python -m bench.capture [--mb 256] [--repeat 3]

For text-like and for incompressible rows, a fresh database receives one
bulk transaction of about ``--mb`` MiB; sqlrepl's capture engine then copies
the new WAL frames into a staged segment (read, dedupe, hash, compress,
fsync), timed on its own, without uploads. Separately, on the same WAL: the
time to read the last committed frame from the wal-index header (what the
replicator does) against a full checksum pass over the WAL in Python (what
a reader without the wal-index must do). Writes ``docs/bench/capture.json``;
``python -m bench.report`` puts it in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlrepl import _format, _wal
from sqlrepl._capture import Capture
from sqlrepl._staging import Staging

ROOT = Path(__file__).resolve().parent.parent
ROW = 3900
FILL = {
    "text": "printf('%.3900c', char(65 + (i % 26))) || hex(randomblob(20))",
    "incompressible": "randomblob(3900)",
}


def one_run(kind: str, megabytes: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sqlrepl-capture-"))
    try:
        db = str(work / "bulk.db")
        app = sqlite3.connect(db, isolation_level=None)
        app.execute("PRAGMA journal_mode=WAL")
        app.execute("PRAGMA wal_autocheckpoint=0")
        app.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        staging = Staging(db)
        staging.ensure()
        capture = Capture(db)
        capture.open()
        capture.start(None)
        generation = _format.new_generation_id()
        capture.new_generation(staging, generation)
        rows = megabytes * (1 << 20) // (ROW + 100)
        app.execute(
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})"
            f" INSERT INTO t(v) SELECT {FILL[kind]} FROM n"
        )
        wal_bytes = os.path.getsize(db + "-wal")
        t0 = time.perf_counter()
        staged = capture.capture(staging, generation)
        seconds = time.perf_counter() - t0
        assert staged is not None
        segment_bytes = os.path.getsize(staged.path)

        fd = _wal.long_lived_fd(db + "-shm")
        assert fd is not None
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            _wal.read_index_header(fd)
        index_us = (time.perf_counter() - t0) / n * 1e6
        data = Path(db + "-wal").read_bytes()
        sample = data[: 64 << 20]  # a checksum pass over 64 MiB is enough to time it
        t0 = time.perf_counter()
        _wal.scan_wal(sample)
        scan_mbps = len(sample) / (time.perf_counter() - t0) / 1e6
        capture.close()
        app.close()
        return {
            "kind": kind,
            "wal_bytes": wal_bytes,
            "segment_bytes": segment_bytes,
            "capture_seconds": seconds,
            "capture_MBps": wal_bytes / seconds / 1e6,
            "index_header_us": index_us,
            "checksum_scan_MBps": scan_mbps,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the bulk transaction (MiB)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "capture.json"))
    args = parser.parse_args()
    runs = [one_run(kind, args.mb) for _ in range(args.repeat) for kind in FILL]
    summary = {}
    for kind in FILL:
        mine = [r for r in runs if r["kind"] == kind]
        summary[kind] = {
            key: {
                "median": statistics.median(r[key] for r in mine),
                "min": min(r[key] for r in mine),
                "max": max(r[key] for r in mine),
            }
            for key in ("capture_MBps", "index_header_us", "checksum_scan_MBps", "wal_bytes", "segment_bytes")
        }
    out = {"megabytes": args.mb, "repeat": args.repeat, "runs": runs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for kind, s in summary.items():
        c = s["capture_MBps"]
        print(
            f"{kind:15} capture {c['median']:.0f} MB/s ({c['min']:.0f}-{c['max']:.0f});"
            f" wal-index header {s['index_header_us']['median']:.1f} us;"
            f" checksum pass {s['checksum_scan_MBps']['median']:.0f} MB/s"
        )


if __name__ == "__main__":
    main()
