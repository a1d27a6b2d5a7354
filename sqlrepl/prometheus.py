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
_DB = ["database"]
_REP = ["database", "replica"]
_KIND = ["database", "replica", "kind"]


class _Families:
    """One scrape's metric families, filled from each replicator's status."""

    def __init__(self) -> None:
        g, c = GaugeMetricFamily, CounterMetricFamily
        self.replicating = g(
            "sqlrepl_replicating",
            "1 if this process replicates the database, else 0 (standby, starting, stopped)",
            labels=_DB,
        )
        self.captured = g("sqlrepl_captured_txid", "Newest transaction id captured from the WAL", labels=_DB)
        self.staged_bytes = g(
            "sqlrepl_staged_bytes", "Bytes of the objects in the local staging directory", labels=_DB
        )
        self.staged_objects = g(
            "sqlrepl_staged_objects", "Objects in the local staging directory", labels=_DB
        )
        self.snapshots = c("sqlrepl_snapshots", "Snapshots started by this process", labels=_DB)
        self.compactions = c("sqlrepl_compactions", "Compactions started by this process", labels=_DB)
        self.generations = c("sqlrepl_generations", "Generations started by this process", labels=_DB)
        self.replica_txid = g(
            "sqlrepl_replica_txid", "Newest transaction id stored in the replica", labels=_REP
        )
        self.lag_seconds = g(
            "sqlrepl_replica_lag_seconds",
            "Seconds since the oldest change the replica lacks was captured (0 when up to date)",
            labels=_REP,
        )
        self.lag_bytes = g(
            "sqlrepl_replica_lag_bytes", "Staged bytes the replica still has to upload", labels=_REP
        )
        self.failing = g(
            "sqlrepl_replica_failing", "1 while the replica's uploads fail (retrying), else 0", labels=_REP
        )
        self.last_upload = g(
            "sqlrepl_replica_last_upload_timestamp_seconds",
            "Unix time of the last object stored in the replica by this process",
            labels=_REP,
        )
        self.requests = c("sqlrepl_replica_requests", "Requests made to the replica, by kind", labels=_KIND)
        self.bytes = c(
            "sqlrepl_replica_bytes", "Object bytes sent (PUT) and received (GET), by kind", labels=_KIND
        )
        self.errors = c(
            "sqlrepl_replica_errors", "Failed requests to the replica (retried or not), by kind", labels=_KIND
        )
        self.verified = g(
            "sqlrepl_replica_verify_success_timestamp_seconds",
            "Unix time of the last periodic verification that proved the replica restores",
            labels=_REP,
        )
        self.verified_txid = g(
            "sqlrepl_replica_verified_txid",
            "Transaction id at which the last periodic verification with a verdict checked the replica",
            labels=_REP,
        )
        self.verify_ok = g(
            "sqlrepl_replica_verify_ok",
            "1 if the last periodic verification with a verdict proved the replica, 0 if it failed",
            labels=_REP,
        )
        self.verify_failures = c(
            "sqlrepl_replica_verify_failures",
            "Periodic verifications that found the replica would not restore to the database",
            labels=_REP,
        )

    def add(self, st: Status) -> None:
        db = [st.database]
        self.replicating.add_metric(db, 1.0 if st.role == "replicating" else 0.0)
        self.captured.add_metric(db, st.txid)
        self.staged_bytes.add_metric(db, st.staged_bytes)
        self.staged_objects.add_metric(db, st.staged_objects)
        self.snapshots.add_metric(db, st.snapshots)
        self.compactions.add_metric(db, st.compactions)
        self.generations.add_metric(db, st.generations)
        for r in st.replicas:
            rep = [st.database, r.url]
            self.replica_txid.add_metric(rep, r.txid)
            self.failing.add_metric(rep, 1.0 if r.last_error else 0.0)
            if r.lag_seconds is not None:
                self.lag_seconds.add_metric(rep, r.lag_seconds)
            if r.lag_bytes is not None:
                self.lag_bytes.add_metric(rep, r.lag_bytes)
            if r.last_upload_time is not None:
                self.last_upload.add_metric(rep, r.last_upload_time)
            for kind in _KINDS:
                self.requests.add_metric([*rep, kind], r.requests.get(kind, 0))
                self.errors.add_metric([*rep, kind], r.errors_by_kind.get(kind, 0))
            for kind in _BYTE_KINDS:
                self.bytes.add_metric([*rep, kind], r.bytes_by_kind.get(kind, 0))
            self.verify_failures.add_metric(rep, r.verify_failures)
            if r.verified_time is not None:
                self.verified.add_metric(rep, r.verified_time)
            v = r.verification
            if v is not None and v.ok is not None:
                self.verify_ok.add_metric(rep, 1.0 if v.ok else 0.0)
                if v.txid is not None:
                    self.verified_txid.add_metric(rep, v.txid)

    def __iter__(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(v for v in vars(self).values() if isinstance(v, GaugeMetricFamily | CounterMetricFamily))


class SqlreplCollector(Collector):
    """Reads every replicator's status when scraped. Made by :func:`register`."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        families = _Families()
        for rep in all_replicators():
            families.add(rep.status)
        return iter(families)

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
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
