"""sqlrepl.prometheus: the collector, scraped over HTTP by prometheus_client's own server."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, fast_options, file_url, wait_for
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from s3server import SeaweedS3

import sqlrepl
import sqlrepl.prometheus

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Short client timeouts so that a dead store surfaces in seconds.
FAST = "connect_timeout=1&read_timeout=2&max_attempts=2"


class Scraper:
    """prometheus_client's HTTP server on a free loopback port, serving one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        sqlrepl.prometheus.register(self.registry)
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)

    def scrape(self) -> Samples:
        url = f"http://127.0.0.1:{self.server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def scraper() -> Iterator[Scraper]:
    s = Scraper()
    try:
        yield s
    finally:
        s.close()


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name`` whose labels include ``labels``; None if absent."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def assert_between(low: float | None, got: float | None, high: float | None) -> None:
    """``got`` was scraped after a status() that said ``low`` and before one that said ``high``."""
    assert low is not None
    assert high is not None
    assert got is not None
    assert low <= got <= high


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _write(conn: sqlrepl.Connection, n: int) -> None:
    for _ in range(n):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(500))")
        conn.commit()


def test_series_match_status(scraper: Scraper, db_path: str, tmp_path: Path) -> None:
    """Every documented series is served, named sqlrepl_*, with the values of status()."""
    url = file_url(tmp_path / "r")
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(v)")
    _write(conn, 5)
    sqlrepl.sync(db_path)
    # The replicator may still store its writer record after sync(): the
    # counters and the upload time are checked between status() before and
    # after the scrape, the positions (no writes meanwhile) for equality.
    before = sqlrepl.status(db_path).replicas[0]
    samples = scraper.scrape()
    st = sqlrepl.status(db_path)
    db, rep = st.database, st.replicas[0]
    assert value(samples, "sqlrepl_captured_txid", database=db) == st.txid
    assert value(samples, "sqlrepl_replica_txid", database=db, replica=url) == rep.txid == st.txid
    assert value(samples, "sqlrepl_replica_lag_seconds", database=db, replica=url) == 0
    assert value(samples, "sqlrepl_replica_lag_bytes", database=db, replica=url) == 0
    assert value(samples, "sqlrepl_replicating", database=db) == 1
    assert value(samples, "sqlrepl_generations_total", database=db) == 1
    assert value(samples, "sqlrepl_snapshots_total", database=db) == 1
    assert value(samples, "sqlrepl_compactions_total", database=db) == 0
    requests = value(samples, "sqlrepl_replica_requests_total", replica=url, kind="PUT")
    assert_between(before.requests["PUT"], requests, rep.requests["PUT"])
    assert requests
    sent = value(samples, "sqlrepl_replica_bytes_total", replica=url, kind="PUT")
    assert_between(before.requests["bytes_up"], sent, rep.requests["bytes_up"])
    assert value(samples, "sqlrepl_replica_errors_total", replica=url, kind="PUT") == 0
    uploaded = value(samples, "sqlrepl_replica_last_upload_timestamp_seconds", replica=url)
    assert_between(before.last_upload_time, uploaded, rep.last_upload_time)
    for name in ("sqlrepl_staged_bytes", "sqlrepl_staged_objects", "sqlrepl_replica_failing"):
        assert value(samples, name, database=db) is not None, name
    assert all(name.startswith("sqlrepl_") for name, _ in samples)
    conn.close()


def test_served_series_are_the_documented_ones() -> None:
    """The series the collector serves (name, type, labels) are exactly those docs/observability.md lists."""
    table = (ROOT / "docs" / "observability.md").read_text()
    documented = {
        (name, kind, tuple(label.strip() for label in labels.split(",")))
        for name, kind, labels in re.findall(
            r"^\| `(sqlrepl_\w+)` \| (gauge|counter) \| ([\w, ]+) \|", table, re.M
        )
    }
    served = set()
    for family, name, _, labels in sqlrepl.prometheus._SERIES.values():
        kind = "counter" if family is CounterMetricFamily else "gauge"
        served.add((name + "_total" if kind == "counter" else name, kind, labels))
    assert [f.name for f in sqlrepl.prometheus.SqlreplCollector().describe()] == [
        name for _, name, _, _ in sqlrepl.prometheus._SERIES.values()
    ]
    assert served == documented


def test_register_is_idempotent_per_registry() -> None:
    """Registering twice into one registry returns the same collector (no duplicate series)."""
    registry = CollectorRegistry()
    assert sqlrepl.prometheus.register(registry) is sqlrepl.prometheus.register(registry)
    assert sqlrepl.prometheus.register(CollectorRegistry()) is not sqlrepl.prometheus.register(registry)


@pytest.mark.s3
@pytest.mark.slow
def test_scrape_while_the_store_dies_and_comes_back(
    scraper: Scraper, own_s3_server: SeaweedS3, db_path: str
) -> None:
    """Scraped over HTTP while the S3 store is killed and restarted: lag rises
    and falls back to zero, errors count up, txids match status()."""
    url = f"s3://own/app?endpoint={own_s3_server.endpoint}&{FAST}"
    conn = sqlrepl.connect(db_path, url, options=fast_options())
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    _write(conn, 20)
    sqlrepl.sync(db_path, timeout=60)
    st = sqlrepl.status(db_path)
    db, label = st.database, st.replicas[0].url
    assert "s3://own/app" in label

    def lag(samples: Samples) -> float:
        got = value(samples, "sqlrepl_replica_lag_seconds", database=db, replica=label)
        assert got is not None
        return got

    healthy = scraper.scrape()
    assert lag(healthy) == 0
    assert value(healthy, "sqlrepl_replica_txid", replica=label) == st.txid
    errors_before = total(healthy, "sqlrepl_replica_errors_total")

    own_s3_server.stop(grace=0)  # a crash
    _write(conn, 20)
    # (Each commit gets the next txid: the 20 are captured once it is st.txid + 20.)
    failing = wait_for(
        "errors and a lag while the store is down, the writes captured",
        lambda: (
            (s := scraper.scrape())
            and lag(s) > 0
            and value(s, "sqlrepl_captured_txid", database=db) == st.txid + 20
            and total(s, "sqlrepl_replica_errors_total") > errors_before
            and value(s, "sqlrepl_replica_failing", replica=label) == 1
            and s
        ),
    )
    assert (value(failing, "sqlrepl_replica_lag_bytes", replica=label) or 0) > 0
    assert value(failing, "sqlrepl_captured_txid", database=db) == sqlrepl.status(db_path).txid
    wait_for("the lag to rise", lambda: lag(scraper.scrape()) > lag(failing))
    assert value(scraper.scrape(), "sqlrepl_replica_txid", replica=label) == st.txid  # nothing new stored

    own_s3_server.start()
    recovered = wait_for(
        "the lag to fall back to zero", lambda: (s := scraper.scrape()) and lag(s) == 0 and s
    )
    now = sqlrepl.status(db_path)
    assert value(recovered, "sqlrepl_replica_txid", replica=label) == now.replicas[0].txid == now.txid
    assert value(recovered, "sqlrepl_captured_txid", database=db) == now.txid
    assert total(recovered, "sqlrepl_replica_errors_total") > errors_before
    conn.close()


def test_django_example_serves_the_series(tmp_path: Path) -> None:
    """The Django example's /metrics (prometheus_client's default registry) carries sqlrepl's series."""
    from test_django import database, run_django

    proc = run_django(
        database(tmp_path),
        """
        from django.test import Client
        call_command("migrate", verbosity=0)
        Item.objects.create(name="a")
        sqlrepl.sync(DB)
        response = Client(HTTP_HOST="localhost").get("/metrics")
        body = response.content.decode()
        out({"status": response.status_code, "body": body, "txid": sqlrepl.status(DB).txid})
        """,
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["status"] == 200
    samples = {
        (s.name, s.labels.get("database")): s.value
        for family in text_string_to_metric_families(got["body"])
        for s in family.samples
    }
    assert samples[("sqlrepl_captured_txid", str(tmp_path / "app.db"))] == got["txid"] > 0
