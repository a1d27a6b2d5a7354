"""The ``sqlrepl`` command line: each subcommand parses its arguments, builds
library objects and calls them (the same calls an app makes)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio

from ._connection import connect
from ._errors import SqlreplError
from ._follow import FollowStatus, follow
from ._integration import verify
from ._progress import terminal_bar
from ._replica import open_replica, redact_url
from ._replicator import Options, get_replicator, stop_all
from ._report import format_report, read_status
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
    with terminal_bar("restore") as progress:
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
            progress=progress,
            fallback=args.fallback,
        )
    if result is None:
        why = "the database exists" if os.path.exists(output) else "the replica is empty"
        if os.path.isdir(output):
            why = f"{output} is a directory; give the path of the database file"
        elif not os.path.exists(output) and _missing_folder(args.replica):
            why = f"the replica's folder {_missing_folder(args.replica)} does not exist (a typo in the URL?)"
        print(f"nothing restored: {why}")
        return 0
    print(
        f"restored {result.path}: generation {result.generation}, txid {result.txid}"
        f" ({_ts(result.timestamp_ms)}), {result.objects} objects, {result.bytes} bytes"
        f" in {result.seconds:.2f}s"
    )
    if args.txid is not None and result.txid < args.txid:
        print(f"note: txid {result.txid} is the newest state at or before --txid {args.txid} in the replica")
    return 0


def _missing_folder(url: str) -> str | None:
    """The folder of a ``file://`` replica URL if it does not exist."""
    if not url.startswith("file:"):
        return None
    folder = unquote(urlsplit(url).path)
    return None if os.path.isdir(folder) else folder


def cmd_replicate(args: argparse.Namespace) -> int:
    if not os.path.exists(args.database):
        raise SqlreplError(f"{args.database} does not exist; replicate watches an existing database")
    # A bar on a terminal while a snapshot that the replicas lack (the first,
    # of a large database, say) is written and uploaded.
    with terminal_bar("snapshot") as progress:
        return _replicate(args, Options(sync_interval=args.sync_interval, progress=progress))


def _replicate(args: argparse.Namespace, options: Options) -> int:
    # Opening through connect() sets WAL mode once and checks the URLs.
    conn = connect(args.database, args.replica, options=options)
    conn.close()
    rep = get_replicator(args.database)
    assert rep is not None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    shown = ", ".join(redact_url(u) for u in rep.urls)
    print(f"replicating {os.path.abspath(args.database)} to {shown}; Ctrl-C to stop")
    while not stop.wait(1.0):
        status = rep.status
        if status.role == "failed":
            print(f"replication failed: {status.error}", file=sys.stderr)
            return 1
    print("stopping: uploading what is pending")
    stop_all(flush=True, timeout=args.exit_timeout)
    return 0


def cmd_follow(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def progress(status: FollowStatus) -> None:
        print(f"at txid {status.txid} (generation {status.generation})", flush=True)

    follower = follow(
        args.database,
        args.replica,
        poll_interval=args.poll_interval,
        overwrite=args.overwrite,
        on_apply=progress if args.progress else None,
    )
    print(f"following {follower.replica} into {follower.database}; Ctrl-C to stop", flush=True)
    try:
        while not stop.wait(0.5):
            status = follower.status()
            if status.state == "failed":
                print(f"follow failed: {status.error}", file=sys.stderr)
                return 1
    finally:
        follower.stop()
    print("stopped", flush=True)
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


def cmd_verify(args: argparse.Namespace) -> int:
    with terminal_bar("verify") as progress:
        found = verify(args.database, args.replica, progress=progress)
    print(found.message)
    return 0 if found.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    report = read_status(args.database)
    if args.json:
        print(json.dumps(report.as_json(), indent=1))
    else:
        print(format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run

    run(args.dir)
    return 0


# -- parser ----------------------------------------------------------------------


def _add_restore(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sqlrepl restore``: every way to choose what to restore."""
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
        "--fallback",
        action="store_true",
        help="when the newest generation cannot be restored (its snapshot is gone, a segment missing),"
        " restore the newest older state that can be, without the newer commits (default: fail)",
    )
    p.add_argument(
        "--if-db-exists-error",
        dest="if_db_not_exists_error",
        action="store_true",
        help="fail (instead of doing nothing) when the database already exists",
    )
    # The old spelling, which read backwards: still accepted, not shown.
    p.add_argument(
        "--if-db-not-exists-error", dest="if_db_not_exists_error", action="store_true", help=argparse.SUPPRESS
    )
    p.add_argument(
        "--require-replica",
        dest="if_replica_exists",
        action="store_false",
        help="fail (instead of doing nothing) when the replica is empty",
    )
    p.add_argument("--parallelism", type=int, default=8, help="parallel downloads (default 8)")
    p.set_defaults(func=cmd_restore)


def _add_replicate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sqlrepl replicate``: the sidecar for databases other programs write."""
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


def _add_follow(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sqlrepl follow``: a read replica in the foreground."""
    p = sub.add_parser(
        "follow",
        help="keep a read-only copy of a replicated database current (read replica)",
        description="Restore DATABASE from REPLICA if it is missing, then apply each new segment as it"
        " appears, until interrupted (SIGINT/SIGTERM). Any process may read DATABASE with plain sqlite3"
        " meanwhile; see docs/follow.md.",
    )
    p.add_argument("database")
    p.add_argument("replica")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file that is not a copy")
    p.add_argument("--progress", action="store_true", help="print a line after each applied batch")
    p.set_defaults(func=cmd_follow)


def _add_listings(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sqlrepl generations|snapshots|segments``: what a replica holds."""
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


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sqlrepl verify``: a replica against the live database."""
    p = sub.add_parser(
        "verify",
        help="restore to a temporary file and compare with the live database",
        description="Restore REPLICA into a temporary file, check it, and compare its content with"
        " DATABASE. Exit status 0 if they match, 1 if not.",
    )
    p.add_argument("database")
    p.add_argument("replica")
    p.set_defaults(func=cmd_verify)


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sqlrepl status``: what the replicating process published."""
    p = sub.add_parser(
        "status",
        help="what the replicating process of a database has done",
        description="Show what the process replicating DATABASE (whichever it is: this command reads"
        " what it publishes in DATABASE-sqlrepl/) has done: generation, txid, each replica's position"
        " and lag, the last error, what is staged. Opens no connection and changes nothing.",
    )
    p.add_argument("database")
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    p.set_defaults(func=cmd_status)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sqlrepl demo``: the whole round trip on a local folder."""
    p = sub.add_parser(
        "demo",
        help="replicate, delete, restore and show a demo database",
        description="Write a few rows through sqlrepl.connect() with a file:// replica in a local folder,"
        " delete the database, restore it from the replica and show the rows back.",
    )
    p.add_argument("--dir", default="sqlrepl-demo", help="folder for the demo (default ./sqlrepl-demo)")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqlrepl",
        description="Continuous replication of SQLite databases to S3 or a folder.",
        epilog="Replica URLs: s3://bucket/prefix[?endpoint=URL&region=R] (credentials from AWS_* variables),"
        " file:///absolute/path.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what sqlrepl does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_restore(sub)
    _add_replicate(sub)
    _add_follow(sub)
    _add_listings(sub)
    _add_verify(sub)
    _add_status(sub)
    _add_demo(sub)
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
