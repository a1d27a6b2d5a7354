"""A/B restore timing: two revisions of sqlrepl against a raw GET of the same bytes.

``python -m bench.restore_ab [--mb 128] [--rounds 5] [--old REV]`` starts a
SeaweedFS, bulk-loads a database of ``--mb`` MB from nothing (1 KiB rows in
10,000-row transactions, as the ``bulk`` workload) replicating to S3 and to a
``file://`` folder, then runs ``--rounds`` rounds. Each round times, in a
fresh process and in an order rotated from round to round:

- ``raw``: the objects the restore reads, fetched from the same store into
  memory with the restore's piecing (8 MiB ranged parts, 8 at a time) and
  dropped: no decompression, no checksums, no disk writes. Timed from the
  first GET (the client's creation and the LIST, which the restore also
  pays, are reported apart as ``setup``);
- ``old``: ``sqlrepl.restore`` from the ``--old`` git revision (by
  default the commit this branch started from on ``main``), extracted to a
  temporary folder;
- ``new``: ``sqlrepl.restore`` from this checkout.

Only the call is timed (not interpreter start-up; the S3 client's module
is imported before the clock starts, as in a running app). Each restored file is
compared byte for byte with the first one. Also reported: the CPU time of
each restore process (all its threads), steadier than wall time on a busy
machine. Prints every trial and the
medians, and writes them as JSON to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def build(db: str, urls: list[str], target: int) -> dict[str, Any]:
    """Bulk-load ``db`` to ``target`` bytes while replicating to ``urls``."""
    import random

    import sqlrepl

    rng = random.Random(11)
    conn = sqlrepl.connect(db, urls)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER, v TEXT)")
    conn.execute("CREATE INDEX t_k ON t (k)")
    conn.commit()
    pool = [(rng.randrange(1 << 40), rng.randbytes(500).hex()) for _ in range(4096)]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    while conn.execute("PRAGMA page_count").fetchone()[0] * page_size < target:
        off = rng.randrange(4096)
        conn.executemany(
            "INSERT INTO t (k, v) VALUES (?, ?)", [pool[(off + i * 7) & 4095] for i in range(10_000)]
        )
        conn.commit()
    sqlrepl.sync(db, timeout=600)
    conn.close()
    return {"db_bytes": os.path.getsize(db)}


def trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed trial, in this process."""
    out = _trial(spec)
    import sqlrepl

    out["module"] = sqlrepl.__file__
    return out


def _trial(spec: dict[str, Any]) -> dict[str, Any]:
    import anyio

    import sqlrepl
    import sqlrepl._replica_s3  # imported before the clock starts, as in a running app
    from sqlrepl import _restore
    from sqlrepl._replica import open_replica

    if spec["mode"] == "raw":

        async def raw() -> dict[str, Any]:
            t_open = time.perf_counter()
            client = open_replica(spec["url"])
            try:
                plan = _restore.plan_restore(await _restore.list_generations(client))
                t0 = time.perf_counter()
                setup = t0 - t_open
                got = 0
                limiter = anyio.CapacityLimiter(8)
                part = 8 << 20

                async def one(key: str, start: int, length: int) -> None:
                    nonlocal got
                    async with limiter:
                        data = await (client.get(key) if length < 0 else client.get_range(key, start, length))
                    got += len(data)

                async with anyio.create_task_group() as tg:
                    for key, size in plan.keys:
                        if size <= part:
                            tg.start_soon(one, key, 0, -1)
                        else:
                            for start in range(0, size, part):
                                tg.start_soon(one, key, start, min(part, size - start))
                seconds = time.perf_counter() - t0
                return {"seconds": seconds, "setup": setup, "bytes": got, "objects": len(plan.keys)}
            finally:
                await client.aclose()

        return anyio.run(raw)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = sqlrepl.restore(spec["out"], spec["url"], **spec.get("kwargs", {}))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert result is not None
    return {"seconds": seconds, "cpu": cpu, "bytes": result.bytes, "objects": result.objects}


def _run(spec: dict[str, Any], side: str, env: dict[str, str]) -> dict[str, Any]:
    """Run one trial with the ``sqlrepl`` found in ``side``: ``-c`` puts the
    working directory first on the path (``-m`` would put this checkout's
    first, whatever PYTHONPATH says), and this checkout after it, for
    ``bench``."""
    out = subprocess.run(
        [sys.executable, "-c", "from bench.restore_ab import main; main()", "--trial", json.dumps(spec)],
        cwd=side,
        env={**env, "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
        text=True,
    )
    got = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    assert got["module"].startswith(os.path.join(side, "sqlrepl")), (got["module"], side)
    return got


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress while it runs
    ap = argparse.ArgumentParser(prog="python -m bench.restore_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--old", help="git revision for the A side (default: where this branch left main)")
    ap.add_argument("--stores", default="s3,file")
    ap.add_argument("--json")
    ap.add_argument("--trial", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trial:
        print(json.dumps(trial(json.loads(args.trial))))
        return 0
    if args.build:
        spec = json.loads(args.build)
        print(json.dumps(build(spec["db"], spec["urls"], spec["target"])))
        return 0

    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import SeaweedS3

    work = Path(tempfile.mkdtemp(prefix="sqlrepl-restore-ab-"))
    old = work / "old"
    old.mkdir()
    if args.old is None:
        base = subprocess.run(
            ["git", "merge-base", "main", "HEAD"], cwd=ROOT, check=True, capture_output=True
        )
        args.old = base.stdout.decode().strip()
    print(f"old: {args.old}")
    archive = subprocess.run(
        ["git", "archive", args.old, "sqlrepl"], cwd=ROOT, check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    s3 = SeaweedS3(work / "weed")
    try:
        s3.start()
        s3.create_bucket("bench")
        env = {**os.environ, **s3.env()}
        urls = {
            "s3": f"s3://bench/ab?endpoint={s3.endpoint}&region=us-east-1",
            "file": (work / "replica").as_uri(),
        }
        stores = args.stores.split(",")
        db = str(work / "app.db")
        t0 = time.monotonic()
        built = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.restore_ab",
                    "--build",
                    json.dumps({"db": db, "urls": [urls[s] for s in stores], "target": args.mb << 20}),
                ],
                cwd=ROOT,
                env={**env, "PYTHONPATH": str(ROOT)},
                check=True,
                capture_output=True,
                text=True,
            ).stdout.splitlines()[-1]
        )
        print(f"built {built['db_bytes'] / 1e6:.0f} MB in {time.monotonic() - t0:.0f} s", flush=True)
        sides = {"raw": str(ROOT), "old": str(old), "new": str(ROOT)}
        columns = [*sides, "setup", "old_cpu", "new_cpu"]
        results: dict[str, dict[str, list[float]]] = {s: {k: [] for k in columns} for s in stores}
        reference: str | None = None
        for r in range(args.rounds):
            for store in stores:
                order = list(sides)[r % 3 :] + list(sides)[: r % 3]
                for side in order:
                    out = str(work / f"restored-{store}-{side}.db")
                    spec = {"mode": "raw" if side == "raw" else "restore", "url": urls[store], "out": out}
                    got = _run(spec, sides[side], env)
                    results[store][side].append(got["seconds"])
                    if "setup" in got:
                        results[store]["setup"].append(got["setup"])
                    if "cpu" in got:
                        results[store][f"{side}_cpu"].append(got["cpu"])
                    cpu = f" ({got['cpu']:.3f} s of CPU)" if "cpu" in got else ""
                    line = f"round {r} {store:4} {side}: {got['seconds']:.3f} s{cpu}"
                    print(f"{line}, {got['bytes'] / 1e6:.0f} MB")
                    if side != "raw":
                        if reference is None:
                            reference = out + ".ref"
                            os.replace(out, reference)
                        else:
                            assert filecmp.cmp(reference, out, shallow=False), f"{out} differs"
                            os.unlink(out)
                        shutil.rmtree(out + "-sqlrepl", ignore_errors=True)
        summary: dict[str, Any] = {"db_bytes": built["db_bytes"], "stores": {}}
        for store in stores:
            med = {side: statistics.median(v) for side, v in results[store].items()}
            summary["stores"][store] = {"median_s": med, "trials_s": results[store]}
            print(
                f"{store}: raw {med['raw']:.3f} s (client and LIST before it {med['setup']:.3f} s),"
                f" old {med['old']:.3f} s ({med['old'] / med['raw']:.2f}x),"
                f" new {med['new']:.3f} s ({med['new'] / med['raw']:.2f}x);"
                f" restore CPU old {med['old_cpu']:.3f} s, new {med['new_cpu']:.3f} s"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        s3.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
