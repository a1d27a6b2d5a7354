"""The ``sqlrepl`` command line: each subcommand parses its arguments, builds
library objects and calls them (the same calls an app makes)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import anyio

from ._connection import connect
from ._errors import ConfigError, SqlreplError
from ._replica import open_replica
from ._replicator import Options, get_replicator, stop_all
from ._restore import Generation, list_generations, restore

__all__ = ["main"]

log = logging.getLogger("sqlrepl")


def _ts(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _generations(url: str) -> list[Generation]:
    async def run() -> list[Generation]:
        client = open_replica(url)
        try:
            return await list_generations(client)
        finally:
            await client.aclose()

    return anyio.run(run, backend="asyncio")


def _print_table(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print("(none)")
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


# -- subcommands ----------------------------------------------------------------


def cmd_restore(args: argparse.Namespace) -> int:
    output = args.output or args.database
    result = restore(
        output,
        args.replica,
        if_db_not_exists=not args.if_db_not_exists_error,
        if_replica_exists=args.if_replica_exists,
        overwrite=args.overwrite,
        txid=args.txid,
        timestamp=args.timestamp,
        generation=args.generation,
        parallelism=args.parallelism,
    )
    if result is None:
        why = "the database exists" if os.path.exists(output) else "the replica is empty"
        print(f"nothing restored: {why}")
        return 0
    print(
        f"restored {result.path}: generation {result.generation}, txid {result.txid}"
        f" ({_ts(result.timestamp_ms)}), {result.objects} objects, {result.bytes} bytes"
        f" in {result.seconds:.2f}s"
    )
    return 0


def cmd_replicate(args: argparse.Namespace) -> int:
    options = Options(sync_interval=args.sync_interval)
    if not os.path.exists(args.database):
        raise SqlreplError(f"{args.database} does not exist; replicate watches an existing database")
    # Opening through connect() sets WAL mode once and checks the URLs.
    conn = connect(args.database, args.replica, options=options)
    conn.close()
    rep = get_replicator(args.database)
    assert rep is not None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"replicating {os.path.abspath(args.database)} to {', '.join(c for c in rep.urls)}; Ctrl-C to stop")
    while not stop.wait(1.0):
        status = rep.status
        if status.role == "failed":
            print(f"replication failed: {status.error}", file=sys.stderr)
            return 1
    print("stopping: uploading what is pending")
    stop_all(flush=True, timeout=args.exit_timeout)
    return 0


def cmd_generations(args: argparse.Namespace) -> int:
    rows = []
    for g in _generations(args.replica):
        rows.append(
            {
                "generation": g.id,
                "snapshots": len(g.snapshots),
                "segments": len(g.segments),
                "first_txid": min([k.txid for k, _ in g.snapshots], default=0),
                "last_txid": g.last_txid,
                "created": _ts(g.first_timestamp_ms) if g.snapshots else "-",
                "updated": _ts(g.last_timestamp_ms) if g.last_timestamp_ms else "-",
                "bytes": sum(s for _, s in g.snapshots) + sum(s for _, s in g.segments),
            }
        )
    _print_table(rows, args.json)
    return 0


def _pick(gens: list[Generation], wanted: str | None) -> list[Generation]:
    if wanted is None:
        return gens
    picked = [g for g in gens if g.id == wanted]
    if not picked:
        raise SqlreplError(f"no generation {wanted} in the replica")
    return picked


def cmd_snapshots(args: argparse.Namespace) -> int:
    rows = [
        {"generation": g.id, "txid": k.txid, "created": _ts(k.timestamp_ms), "bytes": size, "key": k.key}
        for g in _pick(_generations(args.replica), args.generation)
        for k, size in g.snapshots
    ]
    _print_table(rows, args.json)
    return 0


def cmd_segments(args: argparse.Namespace) -> int:
    rows = [
        {
            "generation": g.id,
            "first_txid": k.first_txid,
            "last_txid": k.last_txid,
            "created": _ts(k.timestamp_ms),
            "bytes": size,
        }
        for g in _pick(_generations(args.replica), args.generation)
        for k, size in g.segments
    ]
    _print_table(rows, args.json)
    return 0


def verify(database: str, replica: str) -> tuple[bool, str]:
    """Restore ``replica`` into a temporary file and compare it with the live
    ``database``. Returns (same?, a one-line explanation)."""
    live = _open_live(database)
    work = tempfile.mkdtemp(prefix="sqlrepl-verify-")
    try:
        target = os.path.join(work, "restored.db")
        result = restore(target, replica)
        if result is None:
            return False, f"replica {replica} is empty"
        restored = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
        try:
            check = restored.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                return False, f"restored database fails integrity_check: {check[:3]}"
            # One read transaction on the live side: a consistent view.
            live.execute("BEGIN")
            ours, theirs = list(restored.iterdump()), list(live.iterdump())
            live.execute("ROLLBACK")
        finally:
            restored.close()
        where = f"generation {result.generation}, txid {result.txid}, {_ts(result.timestamp_ms)}"
        if ours == theirs:
            return True, f"OK: the replica ({where}) matches {database}"
        diff = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            min(len(ours), len(theirs)),
        )
        return False, (
            f"DIFFERENT: the replica ({where}) and {database} differ from statement {diff} of the dump"
            f" ({len(ours)} vs {len(theirs)} statements). A database being written runs ahead of its"
            " replica by up to the sync interval: verify when it is quiet, or after sqlrepl.sync()."
        )
    finally:
        live.close()
        shutil.rmtree(work, ignore_errors=True)


def _open_live(database: str) -> sqlite3.Connection:
    """A read-only connection to the live database, checked to be one (before
    anything is downloaded)."""
    what = "give the path of the live database the replica was made from"
    if not os.path.exists(database):
        raise ConfigError(f"{database} does not exist; {what}")
    if os.path.isdir(database):
        raise ConfigError(f"{database} is a directory; {what}")
    try:
        live = sqlite3.connect(f"file:{os.path.abspath(database)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open {database} ({exc}); {what}") from exc
    try:
        live.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.Error as exc:
        live.close()
        raise ConfigError(f"{database} is not a readable SQLite database ({exc}); {what}") from exc
    return live


def cmd_verify(args: argparse.Namespace) -> int:
    same, message = verify(args.database, args.replica)
    print(message)
    return 0 if same else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run

    run(args.dir)
    return 0


# -- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqlrepl",
        description="Continuous replication of SQLite databases to S3 or a folder.",
        epilog="Replica URLs: s3://bucket/prefix[?endpoint=URL&region=R] (credentials from AWS_* variables),"
        " file:///absolute/path.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what sqlrepl does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "restore",
        help="rebuild a database from a replica",
        description="Rebuild DATABASE from REPLICA: the newest state, or the state at a txid or time."
        " Does nothing if DATABASE exists (unless --overwrite) or the replica is empty.",
    )
    p.add_argument("database", help="path of the database to create")
    p.add_argument("replica", help="replica URL")
    p.add_argument("-o", "--output", help="write here instead of DATABASE")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--txid", type=int, help="restore the newest state at or before this txid")
    when.add_argument("--timestamp", help="restore the newest state at or before this time (ISO 8601)")
    p.add_argument("--generation", help="restore from this generation (default: the newest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing database")
    p.add_argument(
        "--if-db-not-exists-error",
        action="store_true",
        help="fail (instead of doing nothing) when the database exists",
    )
    p.add_argument(
        "--require-replica",
        dest="if_replica_exists",
        action="store_false",
        help="fail (instead of doing nothing) when the replica is empty",
    )
    p.add_argument("--parallelism", type=int, default=8, help="parallel downloads (default 8)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser(
        "replicate",
        help="replicate a database written by other programs (sidecar mode)",
        description="Watch DATABASE and replicate every commit, whoever makes it, until interrupted."
        " Puts the database in WAL mode. On SIGINT/SIGTERM, uploads what is pending, then exits.",
    )
    p.add_argument("database")
    p.add_argument("replica", nargs="+", help="one or more replica URLs")
    p.add_argument("--sync-interval", type=float, default=1.0, help="seconds between uploads (default 1)")
    p.add_argument("--exit-timeout", type=float, default=30.0, help="seconds to upload at exit (default 30)")
    p.set_defaults(func=cmd_replicate)

    for name, func, text in (
        ("generations", cmd_generations, "list the generations in a replica"),
        ("snapshots", cmd_snapshots, "list the snapshots in a replica"),
        ("segments", cmd_segments, "list the segments in a replica"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + " (one LIST request).")
        p.add_argument("replica")
        if name != "generations":
            p.add_argument("--generation", help="only this generation")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "verify",
        help="restore to a temporary file and compare with the live database",
        description="Restore REPLICA into a temporary file, check it, and compare its content with"
        " DATABASE. Exit status 0 if they match, 1 if not.",
    )
    p.add_argument("database")
    p.add_argument("replica")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "demo",
        help="replicate, delete, restore and show a demo database",
        description="Write a few rows through sqlrepl.connect() with a file:// replica in a local folder,"
        " delete the database, restore it from the replica and show the rows back.",
    )
    p.add_argument("--dir", default="sqlrepl-demo", help="folder for the demo (default ./sqlrepl-demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
        return code
    except SqlreplError as exc:
        print(f"sqlrepl {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
