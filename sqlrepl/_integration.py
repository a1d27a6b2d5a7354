"""What the framework integrations (the Django backend, the Flask extension)
and the command line share: reading a replica list and options from
settings, restoring once per process at startup, describing a restore, and
verifying a replica against the live database.

Imports no framework: each integration turns :class:`ConfigError` into its
own kind of error where it must (Django's ``ImproperlyConfigured``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import quote

from ._connection import connect, status, sync
from ._errors import ConfigError
from ._progress import ProgressCallback
from ._replica import open_replica, redact_url
from ._replicator import Options
from ._restore import RestoreResult, restore

__all__ = [
    "VerifyResult",
    "describe_restore",
    "options_from",
    "replica_list",
    "restore_once",
    "verify",
]

log = logging.getLogger("sqlrepl")


def replica_list(value: Any, where: str) -> tuple[str, ...]:
    """The replica URLs of a setting (one URL, a list, or nothing), each
    parsed (no I/O). Raises :class:`ConfigError` naming ``where``."""
    if value is None or value == "" or value == []:
        return ()
    urls = (value,) if isinstance(value, str) else value
    if not isinstance(urls, list | tuple) or not all(isinstance(u, str) and u for u in urls):
        raise ConfigError(f"{where} must be a URL or a list of URLs, got {value!r}")
    for url in urls:
        try:
            open_replica(url)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return tuple(urls)


def options_from(value: Any, where: str) -> Options | None:
    """:class:`Options` from a setting: ``None``, an ``Options``, or a dict of
    its fields. Raises :class:`ConfigError` naming ``where``."""
    if value is None or isinstance(value, Options):
        return value
    known = [f.name for f in fields(Options)]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a dict of sqlrepl.Options fields ({', '.join(known)})")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(
            f"{where} has unknown field(s) {', '.join(map(repr, unknown))};"
            f" sqlrepl.Options has {', '.join(known)}"
        )
    try:
        return Options(**value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# -- restore at startup ----------------------------------------------------------------

_restored: set[str] = set()
_restore_mutex = threading.Lock()


def restore_once(database: str, replicas: Sequence[str]) -> RestoreResult | None:
    """Restore ``database`` from the first of ``replicas`` that can, if the
    file is missing.

    Runs at most once per process and database (later calls return ``None``
    without I/O; a failed attempt is retried by the next call), under
    :func:`sqlrepl.restore`'s lock (shared by every process). Does nothing
    when the replicas are empty (a new app); raises when they cannot be read,
    so that an app never starts on an empty database while its backup is
    unreachable. What it did is logged (logger ``sqlrepl``, INFO).
    """
    path = os.path.abspath(database)
    with _restore_mutex:
        if path in _restored:
            return None
        result = None
        if os.path.exists(path):
            log.info("restore at startup: %s exists, nothing to restore", path)
        else:
            result = restore(path, list(replicas))
            if result is None:
                shown = ", ".join(redact_url(u) for u in replicas)
                log.info(
                    "restore at startup: %s is missing and %s holds no backup: a new database",
                    path,
                    shown,
                )
        _restored.add(path)
        return result


def describe_restore(result: RestoreResult) -> str:
    """One line saying what a restore did."""
    return (
        f"restored {result.path}: generation {result.generation}, txid {result.txid}"
        f" ({_when(result.timestamp_ms)}), {result.objects} objects, {result.bytes} bytes"
        f" in {result.seconds:.2f}s"
    )


@contextlib.contextmanager
def restore_log_silenced() -> Iterator[None]:
    """Drop the ``sqlrepl`` logger's INFO records about restores made by this
    thread meanwhile: for a command that prints the same result itself."""
    thread = threading.get_ident()

    def keep(record: logging.LogRecord) -> bool:
        about_restore = str(record.msg).startswith(("restored ", "restore skipped"))
        return not (record.thread == thread and record.levelno == logging.INFO and about_restore)

    logger = logging.getLogger("sqlrepl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


# -- verify ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found: ``ok`` and a one-line ``message`` whose
    first word says it: ``OK``, ``DIFFERENT``, ``CORRUPT``, ``EMPTY`` or
    ``CHANGING``."""

    ok: bool
    message: str
    generation: str | None = None
    txid: int | None = None


def verify(
    database: str,
    replica: str,
    *,
    sync_replicas: Sequence[str] | None = None,
    options: Options | None = None,
    timeout: float = 60.0,
    attempts: int = 5,
    tmpdir: str | None = None,
    progress: ProgressCallback | None = None,
) -> VerifyResult:
    """Restore ``replica`` into a temporary file, check it passes
    ``integrity_check``, and compare its logical content (``iterdump``) with
    the live ``database``, read in one transaction.

    With ``sync_replicas`` (all the database's replica URLs), first open the
    database with :func:`sqlrepl.connect` (this process then replicates it
    if no other does) and wait, up to ``timeout`` seconds, until the
    replicas hold everything committed. Without, a database being written
    may run ahead of its replica and differ. While the database keeps
    changing during an attempt, try again, ``attempts`` times. Never
    writes to ``database``. Raises :class:`ConfigError` when ``database``
    is missing or not a SQLite database. ``progress`` is called as each
    attempt's restore proceeds, as by :func:`sqlrepl.restore`.
    """
    path = os.path.abspath(database)
    shown = redact_url(replica)
    _check_live(path)
    conn = None
    if sync_replicas is not None:
        conn = connect(path, list(sync_replicas), options=options)
    try:
        if conn is not None:
            deadline = time.monotonic() + timeout
            while status(path).role == "starting" and time.monotonic() < deadline:
                time.sleep(0.002)
        base = [0, 0]  # what earlier attempts reported: a later one adds to it, never goes back

        def report(done: int, total: int) -> None:
            base[1] = total
            if progress is not None:
                progress(base[0] + done, base[0] + total)

        for attempt in range(1, max(1, attempts) + 1):
            base[0] += base[1]
            base[1] = 0
            before = _dump_digest(path)
            if conn is not None:
                sync(path, timeout=timeout)
            restored = _restore_checked(replica, tmpdir, report)
            if restored is None:
                return VerifyResult(False, f"EMPTY: the replica {shown} holds no backup to verify")
            found = _judge(*restored, before, path, shown, synced=conn is not None)
            if found is not None:
                return found
            log.info("verify %s: %s changed during attempt %d; again", shown, path, attempt)
        return VerifyResult(
            False,
            f"CHANGING: {path} kept changing during {attempts} attempts to verify {shown};"
            " verify when it is quieter",
        )
    finally:
        if conn is not None:
            conn.close()


def _check_live(path: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a readable SQLite database."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"verify: {path} {what}; give the path of the live database")
    try:
        _dump_digest(path)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"verify: {path} cannot be read as a SQLite database ({exc})") from exc


def _restore_checked(
    replica: str, tmpdir: str | None, progress: ProgressCallback
) -> tuple[RestoreResult, list[str], tuple[str, int]] | None:
    """Restore ``replica`` into a temporary file: what the restore did, what
    ``integrity_check`` says of the copy, and its dump's digest; ``None`` if
    the replica holds nothing."""
    with tempfile.TemporaryDirectory(prefix="sqlrepl-verify-", dir=tmpdir) as work:
        copy = os.path.join(work, "restored.db")
        result = restore(copy, replica, if_db_not_exists=False, progress=progress)
        if result is None:
            return None
        check = sqlite3.connect(copy)
        try:
            integrity = [row[0] for row in check.execute("PRAGMA integrity_check")]
        finally:
            check.close()
        return result, integrity, _dump_digest(copy)


def _judge(
    result: RestoreResult,
    integrity: list[str],
    restored: tuple[str, int],
    before: tuple[str, int],
    path: str,
    shown: str,
    *,
    synced: bool,
) -> VerifyResult | None:
    """The verdict on one attempt whose restored copy has digest
    ``restored`` while the live database had ``before``; ``None`` if the live
    database changed meanwhile (try again)."""
    where = f"generation {result.generation}, txid {result.txid}, {_when(result.timestamp_ms)}"
    if integrity != ["ok"]:
        return VerifyResult(
            False,
            f"CORRUPT: the replica {shown} ({where}) restores to a database that fails"
            f" integrity_check: {integrity[:5]}",
            result.generation,
            result.txid,
        )
    after = _dump_digest(path)
    if restored in (before, after):
        return VerifyResult(
            True,
            f"OK: the replica {shown} ({where}) passes integrity_check and holds what {path}"
            f" holds ({restored[1]} lines of dump)",
            result.generation,
            result.txid,
        )
    if before == after:
        hint = (
            ""
            if synced
            else " A database being written runs ahead of its replica by up to the sync interval:"
            " verify when it is quiet, or after sqlrepl.sync()."
        )
        return VerifyResult(
            False,
            f"DIFFERENT: the replica {shown} ({where}) does not hold what {path} holds"
            f" ({restored[1]} against {before[1]} lines of dump).{hint}",
            result.generation,
            result.txid,
        )
    return None


def _dump_digest(path: str) -> tuple[str, int]:
    """(sha256, lines) of the logical content of the database at ``path``,
    read in one read transaction on a read-only connection of its own."""
    digest = hashlib.sha256()
    lines = 0
    conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for line in conn.iterdump():
            digest.update(line.encode())
            digest.update(b"\n")
            lines += 1
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return digest.hexdigest(), lines


def _when(timestamp_ms: int) -> str:
    return dt.datetime.fromtimestamp(timestamp_ms / 1000, dt.UTC).isoformat(timespec="seconds")
