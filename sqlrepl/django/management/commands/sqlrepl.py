"""``manage.py sqlrepl restore|status|verify`` for a database that uses the
``sqlrepl.django`` backend.

- ``restore``: rebuild the database from its replica, in place (only when
  the file is missing, unless ``--overwrite``) or into ``-o PATH``; the
  newest state, or the one at ``--txid`` / ``--timestamp``.
- ``status``: the replicator's state as seen from this process (``standby``
  when another process -- the running app -- replicates) and the
  generations each replica holds.
- ``verify``: wait until the replicas hold everything committed, restore
  each into a temporary file, and check it passes ``integrity_check`` and
  holds what the live database holds (same ``iterdump``); the same check
  as ``sqlrepl verify`` (:func:`sqlrepl._integration.verify`).

``status`` and ``verify`` open the database with :func:`sqlrepl.connect`: if
no other process replicates it, this one does until it exits.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from typing import Any, ClassVar

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

import sqlrepl

from ...._integration import describe_restore, restore_log_silenced, verify
from ...._replica import redact_url
from ...._restore import list_generations
from ...base import DatabaseWrapper, ReplicationSettings

__all__ = ["Command"]


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type information
    help = "Restore, inspect and verify the sqlrepl replicas of a database."
    # Restoring is disaster recovery: it must work even when the project's
    # own checks fail.
    requires_system_checks: ClassVar[list[str]] = []

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="{restore,status,verify}")
        actions.required = True
        restore = actions.add_parser("restore", help="rebuild the database from a replica")
        status = actions.add_parser("status", help="the replicator and the replicas' generations")
        verify = actions.add_parser(
            "verify", help="restore to a temporary file and compare with the database"
        )
        for sub in (restore, status, verify):
            sub.add_argument(
                "--database", default=DEFAULT_DB_ALIAS, help="the database alias (default: default)"
            )
        restore.add_argument(
            "-o",
            "--output",
            help="restore into this path instead of the database's own (which is restored only when missing)",
        )
        restore.add_argument("--replica", help="restore from this URL instead of the configured replica(s)")
        target = restore.add_mutually_exclusive_group()
        target.add_argument("--txid", type=int, help="the newest state at or before this transaction id")
        target.add_argument(
            "--timestamp",
            help="the newest state at or before this time (ISO 8601: 2026-11-25T20:54:00Z)",
        )
        restore.add_argument("--generation", help="restore from this generation")
        restore.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an existing file (stop every process using it first)",
        )
        status.add_argument("--json", action="store_true", help="print JSON")
        verify.add_argument("--replica", help="verify only this configured replica URL")
        verify.add_argument(
            "--timeout", type=float, default=60.0, help="seconds to wait for the replicas (default 60)"
        )
        verify.add_argument("--attempts", type=int, default=5, help="tries while the database keeps changing")
        verify.add_argument("--tmpdir", help="folder for the temporary restore (default: the system's)")

    def handle(self, *args: Any, **options: Any) -> None:
        config = _config(options["database"])
        try:
            getattr(self, f"_{options['action']}")(config, options)
        except sqlrepl.SqlreplError as exc:
            raise CommandError(f"{type(exc).__name__}: {exc}") from exc

    # -- restore -------------------------------------------------------------

    def _restore(self, config: ReplicationSettings, options: dict[str, Any]) -> None:
        assert config.database is not None
        replicas = (options["replica"],) if options["replica"] else config.replicas
        output = options["output"]
        target = os.path.abspath(output) if output else config.database
        overwrite = bool(options["overwrite"])
        if os.path.exists(target) and not overwrite:
            hint = "" if output else " (restore a copy with -o PATH)"
            raise CommandError(f"{target} exists; pass --overwrite to replace it{hint}")
        kwargs: dict[str, Any] = {
            "if_db_not_exists": False,
            "if_replica_exists": False,
            "overwrite": overwrite,
            "txid": options["txid"],
            "timestamp": options["timestamp"],
            "generation": options["generation"],
        }
        # The command prints the result; the library's log line would say it twice.
        with restore_log_silenced():
            result = sqlrepl.restore(target, list(replicas), **kwargs)
        assert result is not None  # if_replica_exists=False raises instead
        self.stdout.write(describe_restore(result))

    # -- status --------------------------------------------------------------

    def _status(self, config: ReplicationSettings, options: dict[str, Any]) -> None:
        assert config.database is not None
        report: dict[str, Any] = {"database": config.database, "exists": os.path.exists(config.database)}
        if report["exists"]:
            report["size"] = os.path.getsize(config.database)
            status = _settled_status(config)
            report["replicator"] = {
                "role": status.role,
                "generation": status.generation,
                "txid": status.txid,
                "staged_objects": status.staged_objects,
                "staged_bytes": status.staged_bytes,
                "error": status.error,
                "replicas": [
                    {
                        "url": redact_url(r.url),
                        "generation": r.generation,
                        "txid": r.txid,
                        "last_error": r.last_error,
                        "requests": r.requests,
                    }
                    for r in status.replicas
                ],
            }
        report["replicas"] = [
            {"url": redact_url(url), "generations": asyncio.run(_generations(url))} for url in config.replicas
        ]
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
            return
        self._print_status(report)

    def _print_status(self, report: dict[str, Any]) -> None:
        out = self.stdout.write
        if report["exists"]:
            out(f"database {report['database']}: {report['size']} bytes")
            rep = report["replicator"]
            note = " (another process replicates it)" if rep["role"] == "standby" else ""
            out(f"replicator: {rep['role']}{note}, generation {rep['generation']}, txid {rep['txid']}")
            if rep["error"]:
                out(f"  error: {rep['error']}")
            for r in rep["replicas"]:
                error = f", last error: {r['last_error']}" if r["last_error"] else ""
                out(f"  {r['url']}: generation {r['generation']}, txid {r['txid']}{error}")
        else:
            out(f"database {report['database']}: missing")
        for replica in report["replicas"]:
            gens = replica["generations"]
            out(f"replica {replica['url']}: {len(gens)} generation(s)")
            for g in gens:
                out(
                    f"  {g['id']}: {g['snapshots']} snapshot(s), {g['segments']} segment(s),"
                    f" txid up to {g['last_txid']}, {g['first_time']} .. {g['last_time']}"
                )

    # -- verify --------------------------------------------------------------

    def _verify(self, config: ReplicationSettings, options: dict[str, Any]) -> None:
        database = config.database
        assert database is not None
        if not os.path.exists(database):
            raise CommandError(f"{database} does not exist; nothing to verify")
        replicas = config.replicas
        if options["replica"]:
            if options["replica"] not in replicas:
                raise CommandError(f"{options['replica']} is not a replica of database {config.alias!r}")
            replicas = (options["replica"],)
        for url in replicas:
            found = verify(
                database,
                url,
                sync_replicas=config.replicas,
                options=config.options,
                timeout=options["timeout"],
                attempts=options["attempts"],
                tmpdir=options["tmpdir"],
            )
            if not found.ok:
                raise CommandError(found.message)
            self.stdout.write(found.message)


def _config(alias: str) -> ReplicationSettings:
    if alias not in connections:
        raise CommandError(f"no database {alias!r} in settings.DATABASES")
    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper):
        raise CommandError(f"database {alias!r} does not use the sqlrepl.django backend")
    if not wrapper.sqlrepl.replicas:
        raise CommandError(f"database {alias!r} has no replica (OPTIONS['replica'])")
    return wrapper.sqlrepl


def _settled_status(config: ReplicationSettings, timeout: float = 5.0) -> sqlrepl.Status:
    """Open the database and return the replicator's status once it has
    found its role (and, standing by, read the replicating process's)."""
    assert config.database is not None
    conn = sqlrepl.connect(config.database, config.replicas, options=config.options)
    try:
        deadline = time.monotonic() + timeout
        while True:
            status = sqlrepl.status(config.database)
            settled = status.role not in ("starting", "standby") or any(r.generation for r in status.replicas)
            if status.role == "replicating":
                settled = status.generation is not None
            if settled or time.monotonic() > deadline:
                return status
            time.sleep(0.05)
    finally:
        conn.close()


async def _generations(url: str) -> list[dict[str, Any]]:
    client = sqlrepl.open_replica(url)
    try:
        generations = await list_generations(client)
    finally:
        await client.aclose()
    return [
        {
            "id": g.id,
            "snapshots": len(g.snapshots),
            "segments": len(g.segments),
            "last_txid": g.last_txid,
            "first_time": _when(g.first_timestamp_ms),
            "last_time": _when(g.last_timestamp_ms),
        }
        for g in generations
    ]


def _when(timestamp_ms: int) -> str:
    return dt.datetime.fromtimestamp(timestamp_ms / 1000, dt.UTC).isoformat(timespec="seconds")
