"""Where sqlrepl's time goes, by profiling one app process that replicates.

``python -m bench.profile [--seconds 20] [--workload small_1t|bulk]
[--restore] [--out docs/bench]`` starts a SeaweedFS, then runs one app
process that commits in a loop on its main thread through ``sqlrepl.connect``
(synchronous=FULL, 1 s sync interval): one-row transactions (``small_1t``,
the default) or 10,000-row transactions of ~1 KiB rows (``bulk``). It is
profiled two ways at once:

- pyinstrument on the app's main thread (what a commit costs, nudge
  included): ``profile-<workload>-app.txt`` and ``.html``;
- py-spy, attached to the same process for the same seconds, sampling every
  thread (the replicator's event loop and its worker threads included):
  ``profile-<workload>-threads.txt`` (samples per thread, and per thread the
  functions with the most samples, by own time and by total time) and the
  raw folded stacks ``profile-<workload>-pyspy.folded``.

With ``--restore``, a ``sqlrepl.restore`` of the database just replicated is
sampled by py-spy too: ``profile-<workload>-restore-threads.txt``.

py-spy needs ptrace rights (root, or CAP_SYS_PTRACE); without them only the
pyinstrument part is written. Samples of C code (SQLite, zstd, system calls)
are attributed to the Python line that called it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def target(spec: dict[str, Any]) -> None:
    """The profiled app (runs in its own process)."""
    from pyinstrument import Profiler

    import sqlrepl
    from bench.app import ROW_TEXT, open_connection, payload, prepare

    prepare(spec)
    conn = open_connection(spec)
    sqlrepl.sync(spec["db"], timeout=120)
    rng = random.Random(1)
    bulk = spec["workload"] == "bulk"
    row_text = 1000 if bulk else ROW_TEXT
    rows = [(rng.randrange(1 << 40), payload(row_text, rng)) for _ in range(4096 if bulk else 256)]
    seconds = float(spec["seconds"])
    spy = _spy(spec, spec["folded"], seconds) if spec.get("py_spy") else None
    profiler = Profiler(interval=0.0005)
    n = 0
    t_end = time.perf_counter() + seconds
    profiler.start()
    while time.perf_counter() < t_end:
        conn.execute("BEGIN IMMEDIATE")
        if bulk:  # 10,000 rows of ~1 KiB per transaction, as the bulk workload
            conn.executemany(
                "INSERT INTO t (k, v) VALUES (?, ?)", (rows[(n + i) & 4095] for i in range(10_000))
            )
        else:
            conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", rows[n & 255])
        conn.commit()
        n += 1
    profiler.stop()
    t0 = time.perf_counter()
    sqlrepl.sync(spec["db"], timeout=600)
    drain = time.perf_counter() - t0
    status = sqlrepl.status(spec["db"])
    if spy is not None:
        spy.wait(120)
    what = "10,000-row transactions" if bulk else "one-row transactions"
    Path(spec["app_txt"]).write_text(
        f"pyinstrument, main thread of the app: {n} {what} in {seconds:.0f} s"
        f" ({n / seconds:.1f}/s) with sqlrepl (synchronous={spec['synchronous']}, sync_interval="
        f"{spec['sync_interval']} s); sync() afterwards took {drain:.2f} s;"
        f" replica requests: {status.replicas[0].requests}\n\n"
        + profiler.output_text(unicode=True, color=False, show_all=False)
    )
    Path(spec["app_html"]).write_text(profiler.output_html())
    conn.close()
    sqlrepl.stop_all()
    if spec.get("restore_folded"):
        # Restore the database just replicated, sampled by py-spy (its work
        # happens in worker threads that pyinstrument would not see).
        out = spec["db"] + ".restored"
        spy = _spy(spec, spec["restore_folded"], 600) if spec.get("py_spy") else None
        t0 = time.perf_counter()
        result = sqlrepl.restore(out, spec["url"])
        seconds = time.perf_counter() - t0
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
            spy.wait(60)
        assert result is not None
        Path(spec["restore_folded"] + ".info").write_text(
            f"sqlrepl.restore of a {os.path.getsize(out) / 1e6:.0f} MB database: {seconds:.2f} s,"
            f" {result.objects} objects, {result.bytes / 1e6:.0f} MB downloaded\n"
        )


def _spy(spec: dict[str, Any], folded: str, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy attached to this process for ``seconds``, every thread, raw folded stacks."""
    spy = subprocess.Popen(
        [
            spec["py_spy"],
            "record",
            "--pid",
            str(os.getpid()),
            "--duration",
            str(int(seconds)),
            "--rate",
            "250",
            "--threads",
            "--nonblocking",
            "--format",
            "raw",
            "-o",
            folded,
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folded + ".log", "w"),  # noqa: SIM115 - closed with the process
    )
    time.sleep(0.5)  # let it attach
    return spy


def summarize_folded(folded: Path, top: int = 25) -> str:
    """Samples per thread and, per thread, the top functions by own and total samples."""
    per_thread: Counter[str] = Counter()
    self_time: dict[str, Counter[str]] = defaultdict(Counter)
    total_time: dict[str, Counter[str]] = defaultdict(Counter)
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # "thread (1234): AnyIO worker thread" -> "AnyIO worker thread": pool threads merge.
        thread = frames[0].partition(": ")[2] or frames[0]
        per_thread[thread] += n
        calls = frames[1:]
        if calls:
            self_time[thread][calls[-1]] += n
        for f in set(calls):
            total_time[thread][f] += n
    all_samples = sum(per_thread.values()) or 1
    out = [f"py-spy samples by thread (250 Hz, {all_samples} samples, idle threads not sampled):", ""]
    for thread, n in per_thread.most_common():
        out.append(f"  {100 * n / all_samples:5.1f}%  {n:7d}  {thread}")
    for thread, n in per_thread.most_common(6):
        out += ["", f"== {thread}: {n} samples", "", "  own time:"]
        for f, c in self_time[thread].most_common(top):
            out.append(f"    {100 * c / n:5.1f}%  {f}")
        out += ["", "  total time (function on the stack):"]
        for f, c in total_time[thread].most_common(top):
            out.append(f"    {100 * c / n:5.1f}%  {f}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workload", choices=("small_1t", "bulk"), default="small_1t")
    ap.add_argument("--restore", action="store_true", help="also profile a restore of the result")
    ap.add_argument("--synchronous", default="FULL")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    ap.add_argument("--target", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.target:
        target(json.loads(args.target))
        return 0

    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import SeaweedS3

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sqlrepl-profile-"))
    s3 = SeaweedS3(work / "weed")
    try:
        s3.start()
        s3.create_bucket("bench")
        spy = _py_spy()
        base = out / f"profile-{args.workload}"
        spec = {
            "workload": args.workload,
            "way": "sqlrepl",
            "db": str(work / "app.db"),
            "url": f"s3://bench/profile?endpoint={s3.endpoint}&region=us-east-1",
            "synchronous": args.synchronous.upper(),
            "sync_interval": 1.0,
            "params": {},
            "seconds": args.seconds,
            "py_spy": spy,
            "folded": str(base) + "-pyspy.folded",
            "app_txt": str(base) + "-app.txt",
            "app_html": str(base) + "-app.html",
            "restore_folded": str(base) + "-restore-pyspy.folded" if args.restore else None,
        }
        env = {**os.environ, **s3.env()}
        subprocess.run(
            [sys.executable, "-m", "bench.profile", "--target", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            check=True,
        )
        for folded_name, summary_name in (
            (spec["folded"], f"{base}-threads.txt"),
            (spec["restore_folded"], f"{base}-restore-threads.txt"),
        ):
            if not folded_name:
                continue
            folded = Path(folded_name)
            info = Path(folded_name + ".info")
            head = info.read_text() + "\n" if info.exists() else ""
            if folded.exists() and folded.stat().st_size:
                Path(summary_name).write_text(head + summarize_folded(folded))
                for extra in (folded_name + ".log", folded_name + ".info"):
                    with contextlib.suppress(OSError):
                        os.unlink(extra)
            else:
                print(f"py-spy wrote nothing (ptrace rights?): see {folded}.log", file=sys.stderr)
        print(f"wrote {base}-*", file=sys.stderr)
    finally:
        s3.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
