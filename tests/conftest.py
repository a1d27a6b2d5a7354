"""Shared fixtures. S3 fixtures (a real SeaweedFS server) live in s3fixtures.py."""

import logging
import os
import secrets
from collections.abc import Iterator

import pytest

import sqlrepl

pytest_plugins = ["s3fixtures"]


@pytest.fixture(autouse=True)
def _stop_replicators() -> Iterator[None]:
    """Every test ends with no replicator thread left running."""
    yield
    sqlrepl.stop_all(flush=False, timeout=5)


@pytest.fixture(autouse=True)
def _sqlrepl_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sqlrepl")


@pytest.fixture(params=["file", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def replica_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    """A fresh, empty replica of each kind: a folder, process memory, and a
    bucket on the real S3 server."""
    if request.param == "file":
        return "file://" + os.path.join(os.fspath(tmp_path), "replica")
    if request.param == "memory":
        return f"memory://test-{secrets.token_hex(6)}"
    return str(request.getfixturevalue("s3_url"))


@pytest.fixture
def db_path(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(os.fspath(tmp_path), "app.db")
