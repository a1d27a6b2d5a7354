"""pytest fixtures for S3 tests, loaded as a plugin by ``tests/conftest.py``.

``s3_server`` is one SeaweedFS per test session (started only when a test
asks for it); ``s3_bucket`` a fresh, uniquely named bucket per test, deleted
afterwards; ``s3_env`` the ``AWS_*`` variables pointing at the server, set for
the test with everything else AWS-related cleared; ``s3_url`` a replica URL in
that bucket. ``own_s3_server`` is a SeaweedFS of one test's own, which the
test may kill and restart, with its ``AWS_*`` variables set and one bucket,
``own``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import SeaweedS3

__all__ = ["isolate_aws_env", "own_s3_server", "s3_bucket", "s3_env", "s3_server", "s3_url"]

# Variables that could point a test at a real account or change botocore's
# behaviour. AWS_CA_BUNDLE stays: it is part of this machine's TLS set-up.
_AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Clear every AWS variable that could leak a real account into a test,
    and keep botocore away from ``~/.aws`` and the EC2 metadata service."""
    for name in _AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the whole session."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> Iterator[str]:
    """A new empty bucket with a unique name, deleted after the test."""
    name = f"sqlrepl-test-{secrets.token_hex(5)}"
    s3_server.create_bucket(name)
    try:
        yield name
    finally:
        s3_server.delete_bucket(name)


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Set (for this test) the AWS variables that point at the server."""
    isolate_aws_env(monkeypatch, tmp_path)
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_url(s3_server: SeaweedS3, s3_bucket: str, s3_env: dict[str, str]) -> str:
    """``s3://BUCKET/replica?endpoint=...`` for this test's bucket."""
    return f"s3://{s3_bucket}/replica?endpoint={s3_server.endpoint}"


@pytest.fixture
def own_s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """A SeaweedFS of this test's own (free to be killed and restarted), the
    AWS variables pointing at it, and an empty bucket ``own``."""
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    try:
        isolate_aws_env(monkeypatch, tmp_path)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        server.create_bucket("own")
        yield server
    finally:
        server.close()
