"""Prometheus metrics for sqlrepl (``pip install sqlrepl[prometheus]``).

    import sqlrepl.prometheus
    sqlrepl.prometheus.register()          # into prometheus_client's default registry

:func:`register` adds a collector that, when scraped, reads
:attr:`sqlrepl.Replicator.status` of every replicator in this process and
turns it into metric families. Nothing is counted on the app's commit path:
the replicator keeps its counters in its own thread, and a scrape only reads
them. Series are labelled by ``database`` (the database file's absolute path)
and ``replica`` (the replica URL with secrets removed, as in ``status()``);
request series also by ``kind`` (``PUT``, ``GET``, ``LIST``, ``DELETE``,
``HEAD``). docs/observability.md lists every series, with example alerts.

This module is the only one that imports ``prometheus_client``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import REGISTRY, CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ._replicator import Status, all_replicators

__all__ = ["SqlreplCollector", "register"]

_KINDS = ("PUT", "GET", "LIST", "DELETE", "HEAD")
_BYTE_KINDS = ("PUT", "GET")
_DB = ("database",)
_REP = ("database", "replica")
_KIND = ("database", "replica", "kind")
_GAUGE, _COUNTER = GaugeMetricFamily, CounterMetricFamily
_Family = GaugeMetricFamily | CounterMetricFamily

# Every series served, by a key of this module's: its type, name, help text
# and labels. docs/observability.md lists the same, in the same order.
_SERIES: dict[str, tuple[type[_Family], str, str, tuple[str, ...]]] = {
    "replicating": (
        _GAUGE,
        "sqlrepl_replicating",
        "1 if this process replicates the database, else 0 (standby, starting, stopped)",
        _DB,
    ),
    "captured": (_GAUGE, "sqlrepl_captured_txid", "Newest transaction id captured from the WAL", _DB),
    "staged_bytes": (
        _GAUGE,
        "sqlrepl_staged_bytes",
        "Bytes of the objects in the local staging directory",
        _DB,
    ),
    "staged_objects": (_GAUGE, "sqlrepl_staged_objects", "Objects in the local staging directory", _DB),
    "snapshots": (_COUNTER, "sqlrepl_snapshots", "Snapshots started by this process", _DB),
    "compactions": (_COUNTER, "sqlrepl_compactions", "Compactions started by this process", _DB),
    "generations": (_COUNTER, "sqlrepl_generations", "Generations started by this process", _DB),
    "replica_txid": (_GAUGE, "sqlrepl_replica_txid", "Newest transaction id stored in the replica", _REP),
    "lag_seconds": (
        _GAUGE,
        "sqlrepl_replica_lag_seconds",
        "Seconds since the oldest change the replica lacks was captured (0 when up to date)",
        _REP,
    ),
    "lag_bytes": (_GAUGE, "sqlrepl_replica_lag_bytes", "Staged bytes the replica still has to upload", _REP),
    "failing": (
        _GAUGE,
        "sqlrepl_replica_failing",
        "1 while the replica's uploads fail (retrying), else 0",
        _REP,
    ),
    "last_upload": (
        _GAUGE,
        "sqlrepl_replica_last_upload_timestamp_seconds",
        "Unix time of the last object stored in the replica by this process",
        _REP,
    ),
    "requests": (_COUNTER, "sqlrepl_replica_requests", "Requests made to the replica, by kind", _KIND),
    "bytes": (
        _COUNTER,
        "sqlrepl_replica_bytes",
        "Object bytes sent (PUT) and received (GET), by kind",
        _KIND,
    ),
    "errors": (
        _COUNTER,
        "sqlrepl_replica_errors",
        "Failed requests to the replica (retried or not), by kind",
        _KIND,
    ),
    "verified": (
        _GAUGE,
        "sqlrepl_replica_verify_success_timestamp_seconds",
        "Unix time of the last periodic verification that proved the replica restores",
        _REP,
    ),
    "verify_ok": (
        _GAUGE,
        "sqlrepl_replica_verify_ok",
        "1 if the last periodic verification with a verdict proved the replica, 0 if it failed",
        _REP,
    ),
    "verified_txid": (
        _GAUGE,
        "sqlrepl_replica_verified_txid",
        "Transaction id at which the last periodic verification with a verdict checked the replica",
        _REP,
    ),
    "verify_failures": (
        _COUNTER,
        "sqlrepl_replica_verify_failures",
        "Periodic verifications that found the replica would not restore to the database",
        _REP,
    ),
}


class _Families:
    """One scrape's metric families, filled from each replicator's status."""

    def __init__(self) -> None:
        self._families = {
            key: family(name, text, labels=list(labels))
            for key, (family, name, text, labels) in _SERIES.items()
        }

    def _add(self, key: str, labels: list[str], value: float | None) -> None:
        # None: no value to report (a lag in standby, no upload yet), so no sample.
        if value is not None:
            self._families[key].add_metric(labels, value)

    def add(self, st: Status) -> None:
        db = [st.database]
        value: float | None
        for key, value in (
            ("replicating", 1.0 if st.role == "replicating" else 0.0),
            ("captured", st.txid),
            ("staged_bytes", st.staged_bytes),
            ("staged_objects", st.staged_objects),
            ("snapshots", st.snapshots),
            ("compactions", st.compactions),
            ("generations", st.generations),
        ):
            self._add(key, db, value)
        for r in st.replicas:
            rep = [st.database, r.url]
            # Only a verification that reached a verdict says ok or not, and at which txid.
            verdict = r.verification if r.verification is not None and r.verification.ok is not None else None
            for key, value in (
                ("replica_txid", r.txid),
                ("failing", 1.0 if r.last_error else 0.0),
                ("lag_seconds", r.lag_seconds),
                ("lag_bytes", r.lag_bytes),
                ("last_upload", r.last_upload_time),
                ("verify_failures", r.verify_failures),
                ("verified", r.verified_time),
                ("verify_ok", None if verdict is None else float(bool(verdict.ok))),
                ("verified_txid", None if verdict is None else verdict.txid),
            ):
                self._add(key, rep, value)
            for kind in _KINDS:
                self._add("requests", [*rep, kind], r.requests.get(kind, 0))
                self._add("errors", [*rep, kind], r.errors_by_kind.get(kind, 0))
            for kind in _BYTE_KINDS:
                self._add("bytes", [*rep, kind], r.bytes_by_kind.get(kind, 0))

    def __iter__(self) -> Iterator[_Family]:
        return iter(self._families.values())


class SqlreplCollector(Collector):
    """Reads every replicator's status when scraped. Made by :func:`register`."""

    def collect(self) -> Iterator[_Family]:
        families = _Families()
        for rep in all_replicators():
            families.add(rep.status)
        return iter(families)

    def describe(self) -> Iterator[_Family]:
        # (The names, so that a registry can refuse clashes without a scrape.)
        return iter(_Families())


_lock = threading.Lock()
_registered: dict[int, tuple[CollectorRegistry, SqlreplCollector]] = {}


def register(registry: CollectorRegistry | None = None) -> SqlreplCollector:
    """Add sqlrepl's collector to ``registry`` (default: prometheus_client's
    global ``REGISTRY``, which its ``start_http_server``, WSGI/ASGI apps and
    django-prometheus serve) and return it. Idempotent per registry."""
    target = REGISTRY if registry is None else registry
    with _lock:
        known = _registered.get(id(target))
        if known is not None and known[0] is target:
            return known[1]
        collector = SqlreplCollector()
        target.register(collector)
        _registered[id(target)] = (target, collector)
        return collector
