"""What the replicating process of a database has done, read from its
staging folder by any process: ``sqlrepl status`` and the examples'
``/api/status``.

The replicating process (whichever holds the lock in ``<db>-sqlrepl/``)
publishes its view in ``progress.json`` after each capture and upload; its
durable positions are in ``state.json`` and ``replicas/``. Reading them
needs no connection to the database and changes nothing, so every process
-- a standby gunicorn worker, a shell -- sees the same thing.

``StatusReport.as_json()`` is the stable ``--json`` form; its keys are
documented in docs/django.md ("sqlrepl status").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from ._replica import redact_url
from ._staging import staging_dir_for

__all__ = ["StatusReport", "ReplicaReport", "format_report", "read_status"]


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's position as published by the replicating process."""

    url: str  # redacted
    generation: str | None
    txid: int
    error: str | None

    def lag_txids(self, generation: str | None, txid: int) -> int | None:
        """Transactions captured but not yet in this replica; ``None`` when it
        is on another generation than the captured one."""
        if generation is None or self.generation != generation:
            return None
        return max(0, txid - self.txid)


@dataclass(frozen=True)
class StatusReport:
    """The replication of one database, as its staging folder shows it."""

    database: str
    exists: bool  # the database file
    replicating: bool  # some process holds the replicator lock now
    pid: int | None  # the process that published the progress
    generation: str | None
    txid: int  # the last captured transaction
    updated: float | None  # Unix time of the last published progress
    replicas: tuple[ReplicaReport, ...]
    staged_objects: int  # captured, not yet in every replica
    staged_bytes: int

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form (see the module docstring)."""
        return {
            "database": self.database,
            "exists": self.exists,
            "replicating": self.replicating,
            "pid": self.pid,
            "generation": self.generation,
            "txid": self.txid,
            "updated": _iso(self.updated),
            "age_seconds": None if self.updated is None else round(max(0.0, time.time() - self.updated), 3),
            "replicas": [
                {
                    "url": r.url,
                    "generation": r.generation,
                    "txid": r.txid,
                    "lag_txids": r.lag_txids(self.generation, self.txid),
                    "in_step": r.lag_txids(self.generation, self.txid) == 0,
                    "error": r.error,
                }
                for r in self.replicas
            ],
            "staged_objects": self.staged_objects,
            "staged_bytes": self.staged_bytes,
        }


def read_status(database: str | os.PathLike[str]) -> StatusReport:
    """Read what the replicating process of ``database`` has published.

    Never raises for missing or half-written files (a database that never
    replicated reads as no generation, txid 0, no replicas). Does not
    guarantee a consistent view across files written at different moments.
    """
    path = os.path.abspath(os.fspath(database))
    root = staging_dir_for(path)
    progress = _read_json(os.path.join(root, "progress.json"))
    updated = None
    if isinstance(progress, dict):
        with contextlib.suppress(OSError):
            updated = os.stat(os.path.join(root, "progress.json")).st_mtime
        generation = progress.get("generation")
        txid = int(progress.get("txid") or 0)
        pid = progress.get("pid")
        published = progress.get("replicas") or []
    else:
        # No published progress (a process from before it existed, or none
        # yet): the durable positions.
        state = _read_json(os.path.join(root, "state.json"))
        state = state if isinstance(state, dict) else {}
        generation = state.get("generation")
        txid = int(state.get("txid") or 0)
        pid = None
        published = []
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(os.path.join(root, "replicas"))):
                one = _read_json(os.path.join(root, "replicas", name))
                if isinstance(one, dict) and one.get("url"):
                    published.append({**one, "error": None})
    replicas = tuple(
        ReplicaReport(
            url=redact_url(str(r.get("url", ""))),
            generation=r.get("generation"),
            txid=int(r.get("txid") or 0),
            error=r.get("error"),
        )
        for r in published
        if isinstance(r, dict)
    )
    staged = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, "objects")) for f in files]
    staged += [os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, "compacted")) for f in files]
    sizes = []
    for one in staged:
        with contextlib.suppress(OSError):
            sizes.append(os.path.getsize(one))
    return StatusReport(
        database=path,
        exists=os.path.exists(path),
        replicating=_lock_held(os.path.join(root, "lock")),
        pid=int(pid) if isinstance(pid, int) else None,
        generation=generation if isinstance(generation, str) else None,
        txid=txid,
        updated=updated,
        replicas=replicas,
        staged_objects=len(sizes),
        staged_bytes=sum(sizes),
    )


def format_report(progress: StatusReport) -> str:
    """``progress`` for a person: a few lines, the state first."""
    p = progress
    lines = [f"database   {p.database}" + ("" if p.exists else " (missing)")]
    if p.replicating:
        who = f"pid {p.pid}" if p.pid is not None else "a process"
        lines.append(f"replicator {who} is replicating it")
    else:
        last = f" (the last one was pid {p.pid})" if p.pid is not None else ""
        lines.append(f"replicator none running{last}")
    if p.generation is None:
        lines.append("position   nothing replicated yet")
    else:
        age = ""
        if p.updated is not None:
            age = f", updated {_iso(p.updated)} ({_ago(time.time() - p.updated)})"
        lines.append(f"position   generation {p.generation}, txid {p.txid}{age}")
    for r in p.replicas:
        lag = r.lag_txids(p.generation, p.txid)
        if lag is None:
            where = f"txid {r.txid} of generation {r.generation}" if r.generation else "nothing uploaded yet"
            state = "behind: on another generation" if r.generation else "behind"
        else:
            where = f"txid {r.txid}"
            state = "in step" if lag == 0 else f"{lag} transaction(s) behind"
        error = f"; last error: {r.error}" if r.error else ""
        lines.append(f"replica    {r.url}: {where}, {state}{error}")
    if p.staged_objects:
        lines.append(
            f"staged     {p.staged_objects} object(s), {p.staged_bytes} bytes not yet in every replica"
        )
    return "\n".join(lines)


def _lock_held(path: str) -> bool:
    """Whether a process holds the replicator's ``flock`` on ``path``. Probes
    with a shared lock for an instant (a replicator taking the lock in that
    instant retries a moment later)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
