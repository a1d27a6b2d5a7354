"""S3-specific behaviour of the S3 replica client: configuration, clear errors
for bad input, retries through injected faults, and a server that dies and
comes back. Behaviour shared with every backend is in
test_replica_conformance.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import pytest_asyncio
from faultproxy import FaultProxy
from s3fixtures import isolate_aws_env
from s3server import SeaweedS3, free_port_pair

import sqlrepl._replica_s3 as replica_s3
from sqlrepl._errors import (
    ConfigError,
    ObjectNotFoundError,
    ReplicaAuthError,
    ReplicaError,
    ReplicaNotFoundError,
    ReplicaUnavailableError,
)
from sqlrepl._replica import open_replica
from sqlrepl._replica_s3 import S3ReplicaClient, parse_url

MiB = 1 << 20


def settings_for(url: str, environ: dict[str, str] | None = None) -> replica_s3.S3Settings:
    parts = urlsplit(url)
    return parse_url(parts, dict(parse_qsl(parts.query, keep_blank_values=True)), environ or {})


def error_texts(exc: BaseException) -> str:
    """str and repr of ``exc`` and of every exception it was raised from."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(texts) < 40:
        texts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


def refused_endpoint() -> str:
    """An http endpoint on a free loopback port where nothing listens."""
    return f"http://127.0.0.1:{free_port_pair()}"


@pytest_asyncio.fixture
async def opened() -> AsyncIterator[list[S3ReplicaClient]]:
    """A list to append clients to; each is closed after the test."""
    clients: list[S3ReplicaClient] = []
    yield clients
    for client in clients:
        await client.aclose()


def s3_client(url: str, opened: list[S3ReplicaClient], **overrides: object) -> S3ReplicaClient:
    """Open ``url`` (with settings ``overrides``) and register it for closing."""
    client = open_replica(url)
    assert isinstance(client, S3ReplicaClient)
    if overrides:
        client = S3ReplicaClient(dataclasses.replace(client.settings, **overrides))  # type: ignore[arg-type]
    opened.append(client)
    return client


# -- configuration (no server) ------------------------------------------------


@pytest.mark.parametrize(
    ("bucket", "complaint"),
    [
        ("ab", "is 2 characters long; bucket names have 3 to 63 characters"),
        ("a" * 64, "is 64 characters long"),
        ("My-Bucket", "contains 'BM'"),
        ("my_bucket", "contains '_'"),
        ("-bucket", "must begin and end with a lowercase letter or a digit"),
        ("bucket.", "must begin and end"),
        ("my..bucket", "two adjacent periods"),
    ],
)
def test_bad_bucket_names_are_config_errors(bucket: str, complaint: str) -> None:
    """A malformed bucket name raises ConfigError saying what is wrong with it."""
    with pytest.raises(ConfigError, match="bucket name") as info:
        open_replica(f"s3://{bucket}/prefix")
    assert complaint in str(info.value)
    assert not str(info.value).endswith(("to 63", "have")), "the message ends mid-sentence"


def test_missing_bucket_in_url_is_config_error() -> None:
    """s3:///prefix (no bucket) raises ConfigError showing the expected form."""
    with pytest.raises(ConfigError, match=r"no bucket; write s3://bucket/prefix"):
        open_replica("s3:///prefix")


def test_unknown_option_lists_valid_options() -> None:
    """An unknown URL option raises ConfigError naming it and every valid option."""
    with pytest.raises(ConfigError) as info:
        open_replica("s3://bucket/p?endpoint=http://x:1&regoin=eu-west-1&zzz=1")
    message = str(info.value)
    assert "unknown option(s) regoin, zzz" in message
    for option in replica_s3.URL_OPTIONS:
        assert option in message


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("force_path_style=maybe", "force_path_style='maybe' must be true or false"),
        ("connect_timeout=-1", "connect_timeout='-1' must be a number of seconds"),
        ("read_timeout=soon", "read_timeout='soon' must be a number of seconds"),
        ("max_attempts=0", "max_attempts='0' must be an integer from 1 to 20"),
        ("part_size=1MiB", "part_size='1MiB' must be a size from 5 MiB to 5 GiB"),
        ("multipart_threshold=lots", "multipart_threshold='lots' must be a size"),
        ("sse=rot13", "sse='rot13' is not supported; use sse=AES256 or sse=aws:kms"),
        ("endpoint=ftp://host", "must be an http:// or https:// URL"),
        ("endpoint=localhost:9000", "must be an http:// or https:// URL"),
        ("region=us east", "is not a region name"),
    ],
)
def test_bad_option_values_are_config_errors(query: str, complaint: str) -> None:
    """A bad option value raises ConfigError quoting the value and the accepted form."""
    with pytest.raises(ConfigError) as info:
        open_replica(f"s3://bucket/p?{query}")
    assert complaint in str(info.value)


def test_options_parse_into_settings() -> None:
    """Valid options land in the settings, sizes with suffixes, prefix without slashes."""
    settings = settings_for(
        "s3://my.bucket-1/a/b/?endpoint=https://s3.example.com/&region=eu-west-3&force_path_style=false"
        "&sse=aes256&connect_timeout=2.5&read_timeout=9&max_attempts=5&multipart_threshold=64MiB"
        "&part_size=5242880"
    )
    assert (settings.bucket, settings.prefix) == ("my.bucket-1", "a/b")
    assert settings.endpoint == "https://s3.example.com"
    assert settings.region == "eu-west-3"
    assert settings.addressing_style == "virtual"
    assert settings.sse == "AES256"
    assert (settings.connect_timeout, settings.read_timeout, settings.max_attempts) == (2.5, 9.0, 5)
    assert (settings.multipart_threshold, settings.part_size) == (64 * MiB, 5 * MiB)


def test_environment_supplies_defaults_and_url_wins() -> None:
    """AWS_REGION and AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL fill in what the URL leaves out; the URL wins."""
    env = {
        "AWS_REGION": "ap-south-1",
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "http://s3-specific:2",
    }
    from_env = settings_for("s3://bucket/p", env)
    assert (from_env.region, from_env.endpoint) == ("ap-south-1", "http://s3-specific:2")
    assert from_env.addressing_style == "path"  # a custom endpoint implies path style

    generic = settings_for("s3://bucket/p", {"AWS_ENDPOINT_URL": "http://generic:1"})
    assert generic.endpoint == "http://generic:1"

    from_url = settings_for("s3://bucket/p?region=eu-north-1&endpoint=http://url:3", env)
    assert (from_url.region, from_url.endpoint) == ("eu-north-1", "http://url:3")

    ignored = settings_for("s3://bucket/p", {**env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"})
    assert ignored.endpoint is None

    aws = settings_for("s3://bucket/p", {})
    assert (aws.endpoint, aws.region, aws.addressing_style) == (None, None, "auto")


def test_url_property_hides_endpoint_credentials() -> None:
    """The client's url keeps its options but drops credentials embedded in the endpoint."""
    client = open_replica("s3://bucket/some/prefix?endpoint=http://user:hunter2@minio.local:9000&region=x")
    assert client.url == "s3://bucket/some/prefix?endpoint=http://minio.local:9000&region=x"
    assert "hunter2" not in repr(client)


@pytest.mark.s3
def test_client_belongs_to_the_loop_that_first_used_it(s3_url: str, s3_env: dict[str, str]) -> None:
    """Construction needs no loop; the first loop to use the client owns it, another loop is refused."""
    client = open_replica(s3_url)  # no running loop here: construction must not need one
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        first.run_until_complete(client.put("k", b"v"))
        with pytest.raises(RuntimeError, match="another event loop"):
            second.run_until_complete(client.get("k"))
        with pytest.raises(RuntimeError, match="must run in the event loop"):
            second.run_until_complete(client.aclose())
        assert first.run_until_complete(client.get("k")) == b"v"
        first.run_until_complete(client.aclose())
        with pytest.raises(RuntimeError, match="closed"):
            first.run_until_complete(client.get("k"))
    finally:
        first.close()
        second.close()


# -- bad credentials, buckets, endpoints (live) --------------------------------------


@pytest.mark.s3
@pytest.mark.asyncio
async def test_wrong_secret_is_auth_error_without_the_secret(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, opened: list[S3ReplicaClient]
) -> None:
    """A wrong secret key gives ReplicaAuthError naming SignatureDoesNotMatch, never the secret."""
    secret = "WRONG-secret-b7e1c0ffee"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    client = s3_client(s3_url, opened)
    with pytest.raises(ReplicaAuthError, match="SignatureDoesNotMatch") as checked:
        await client.check()
    with pytest.raises(ReplicaAuthError, match="AWS_SECRET_ACCESS_KEY") as put:
        await client.put("k", b"v")
    for info in (checked, put):
        assert secret not in error_texts(info.value)
        assert info.value.transient is False
        assert info.value.replica == client.url


@pytest.mark.s3
@pytest.mark.asyncio
async def test_unknown_access_key_is_auth_error(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, opened: list[S3ReplicaClient]
) -> None:
    """An access key id the store does not know gives ReplicaAuthError naming InvalidAccessKeyId."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTKNOWNHERE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-not-shown-42")
    client = s3_client(s3_url, opened)
    with pytest.raises(ReplicaAuthError, match="InvalidAccessKeyId") as info:
        await client.check()
    assert "secret-not-shown-42" not in error_texts(info.value)
    with pytest.raises(ReplicaAuthError):
        await client.list()


@pytest.mark.s3
@pytest.mark.asyncio
async def test_session_token_is_never_in_messages(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, opened: list[S3ReplicaClient]
) -> None:
    """With a session token set, a rejected request's error does not show the token or the secret."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-wrong-secret-99")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-value-must-not-leak-77")
    client = s3_client(s3_url, opened)
    with pytest.raises(ReplicaAuthError) as info:
        await client.put("k", b"v")
    text = error_texts(info.value)
    assert "token-value-must-not-leak-77" not in text
    assert "another-wrong-secret-99" not in text


@pytest.mark.s3
@pytest.mark.asyncio
async def test_no_credentials_is_auth_error(
    s3_server: SeaweedS3,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    opened: list[S3ReplicaClient],
) -> None:
    """Without any credentials the first call raises ReplicaAuthError saying which variables to set."""
    isolate_aws_env(monkeypatch, tmp_path)
    client = s3_client(f"s3://{s3_bucket}/p?endpoint={s3_server.endpoint}", opened)
    with pytest.raises(ReplicaAuthError, match=r"no usable AWS credentials.*AWS_ACCESS_KEY_ID"):
        await client.check()
    assert client.stats.errors == 1


@pytest.mark.s3
@pytest.mark.asyncio
async def test_missing_bucket_is_not_found(
    s3_server: SeaweedS3, s3_env: dict[str, str], opened: list[S3ReplicaClient]
) -> None:
    """A bucket that does not exist gives ReplicaNotFoundError naming it, the endpoint and the fix."""
    bucket = f"no-such-bucket-{os.urandom(4).hex()}"
    client = s3_client(f"s3://{bucket}/p?endpoint={s3_server.endpoint}", opened)
    with pytest.raises(ReplicaNotFoundError) as info:
        await client.check()
    message = str(info.value)
    assert f"bucket {bucket!r} does not exist" in message
    assert s3_server.endpoint in message
    assert "create it or fix the URL" in message
    assert info.value.transient is False
    with pytest.raises(ReplicaNotFoundError):
        await client.list()
    with pytest.raises(ReplicaNotFoundError):  # the bucket, not the key, is what is missing
        await client.get("k")
    # AWS answers NoSuchBucket here; SeaweedFS answers AccessDenied to a
    # non-admin user. Either way: a permanent error, not a retry forever.
    with pytest.raises(ReplicaError) as put:
        await client.put("k", b"v")
    assert put.value.transient is False


@pytest.mark.s3
@pytest.mark.asyncio
async def test_refused_endpoint_fails_fast(s3_env: dict[str, str], opened: list[S3ReplicaClient]) -> None:
    """A refused connection gives ReplicaUnavailableError well within 30 s, with default settings."""
    endpoint = refused_endpoint()
    client = s3_client(f"s3://bucket/p?endpoint={endpoint}", opened)
    started = time.monotonic()
    with pytest.raises(ReplicaUnavailableError, match="cannot reach") as info:
        await client.check()
    assert time.monotonic() - started < 30
    assert endpoint in str(info.value)
    assert "refused" in str(info.value).lower()
    assert info.value.transient is True
    assert client.stats.requests["HEAD"] == client.settings.max_attempts  # botocore retried
    assert client.stats.errors == client.settings.max_attempts


@pytest.mark.s3
@pytest.mark.asyncio
async def test_unresolvable_host_is_unavailable(
    s3_env: dict[str, str], opened: list[S3ReplicaClient]
) -> None:
    """An endpoint whose host does not resolve gives ReplicaUnavailableError in bounded time."""
    client = s3_client("s3://bucket/p?endpoint=http://no-such-host.invalid:9000&max_attempts=2", opened)
    started = time.monotonic()
    with pytest.raises(ReplicaUnavailableError, match=r"no-such-host\.invalid"):
        await client.put("k", b"v")
    assert time.monotonic() - started < 30


# -- configuration against the live server ----------------------------------------


@pytest.mark.s3
@pytest.mark.asyncio
async def test_endpoint_from_environment_only(
    s3_bucket: str, s3_env: dict[str, str], opened: list[S3ReplicaClient]
) -> None:
    """With no endpoint option, AWS_ENDPOINT_URL_S3 and the AWS_* credentials are enough."""
    client = s3_client(f"s3://{s3_bucket}/from-env", opened)
    assert client.settings.endpoint == s3_env["AWS_ENDPOINT_URL_S3"]
    await client.put("k", b"env works")
    assert await client.get("k") == b"env works"


@pytest.mark.s3
@pytest.mark.asyncio
async def test_url_endpoint_beats_environment(
    s3_server: SeaweedS3,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    s3_env: dict[str, str],
    opened: list[S3ReplicaClient],
) -> None:
    """The URL's endpoint option wins over AWS_ENDPOINT_URL_S3, in both directions."""
    dead = refused_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    good = s3_client(f"s3://{s3_bucket}/p?endpoint={s3_server.endpoint}", opened)
    await good.put("k", b"v")

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    bad = s3_client(f"s3://{s3_bucket}/p?endpoint={dead}&max_attempts=1", opened)
    with pytest.raises(ReplicaUnavailableError, match=dead):
        await bad.get("k")


@pytest.mark.s3
@pytest.mark.asyncio
async def test_region_resolution(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, opened: list[S3ReplicaClient]
) -> None:
    """Region: us-east-1 by default, else AWS_DEFAULT_REGION, AWS_REGION over it, the URL over all."""

    async def region_of(url: str) -> str:
        client = s3_client(url, opened)
        await client.check()
        region: str = client._s3.meta.region_name
        return region

    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert await region_of(s3_url) == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-2")
    assert await region_of(s3_url) == "eu-west-2"
    monkeypatch.setenv("AWS_REGION", "ca-central-1")
    assert await region_of(s3_url) == "ca-central-1"
    assert await region_of(s3_url + "&region=sa-east-1") == "sa-east-1"


# -- stats and S3 specifics (live) ----------------------------------------------------


@pytest.mark.s3
@pytest.mark.asyncio
async def test_multipart_upload_counts_every_request(
    s3_server: SeaweedS3, s3_bucket: str, s3_url: str, tmp_path: Path, opened: list[S3ReplicaClient]
) -> None:
    """A 3-part upload counts create, 3 parts and complete as 5 PUTs, and is multipart on the server."""
    client = s3_client(s3_url + "&multipart_threshold=5MiB&part_size=5MiB", opened)
    data = os.urandom(10 * MiB + 1)
    source = tmp_path / "big"
    source.write_bytes(data)
    await client.put_file("big", source)
    assert client.stats.requests["PUT"] == 5
    assert client.stats.bytes_up == len(data)
    assert client.stats.errors == 0
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="replica/big")
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(data)


@pytest.mark.s3
@pytest.mark.asyncio
async def test_below_threshold_put_file_is_one_put(
    s3_url: str, tmp_path: Path, opened: list[S3ReplicaClient]
) -> None:
    """A file at the multipart threshold goes up in a single PUT."""
    client = s3_client(s3_url + "&multipart_threshold=5MiB", opened)
    source = tmp_path / "edge"
    source.write_bytes(os.urandom(5 * MiB))
    await client.put_file("edge", source)
    assert client.stats.requests["PUT"] == 1


@pytest.mark.s3
@pytest.mark.asyncio
async def test_list_follows_pages(s3_url: str, opened: list[S3ReplicaClient]) -> None:
    """list follows continuation tokens: 25 keys in pages of 10 take 3 LIST requests and all come back."""
    client = s3_client(s3_url, opened, list_page_size=10)
    keys = [f"k/{i:02d}" for i in range(25)]
    await asyncio.gather(*(client.put(k, b"x") for k in keys))
    assert [o.key for o in await client.list("k/")] == keys
    assert client.stats.requests["LIST"] == 3


@pytest.mark.s3
@pytest.mark.asyncio
async def test_delete_goes_in_batches(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, opened: list[S3ReplicaClient]
) -> None:
    """delete splits keys into DeleteObjects batches (of 1,000; 10 here) and deletes them all."""
    monkeypatch.setattr(replica_s3, "_DELETE_BATCH", 10)
    client = s3_client(s3_url, opened)
    keys = [f"d/{i:02d}" for i in range(25)]
    await asyncio.gather(*(client.put(k, b"x") for k in keys))
    await client.delete(keys)
    assert client.stats.requests["DELETE"] == 3
    assert await client.list() == []


@pytest.mark.s3
@pytest.mark.asyncio
async def test_keys_live_under_the_url_prefix(
    s3_server: SeaweedS3, s3_bucket: str, s3_env: dict[str, str], opened: list[S3ReplicaClient]
) -> None:
    """Keys are stored as prefix/key, and a client with no prefix sees them with the prefix."""
    prefixed = s3_client(f"s3://{s3_bucket}/deep/er/?endpoint={s3_server.endpoint}", opened)
    root = s3_client(f"s3://{s3_bucket}?endpoint={s3_server.endpoint}", opened)
    await prefixed.put("gen/1", b"abc")
    await root.put("deep/erx", b"sibling")  # shares the string prefix but not the folder
    assert [o.key for o in await prefixed.list()] == ["gen/1"]
    assert [o.key for o in await root.list()] == ["deep/er/gen/1", "deep/erx"]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["deep/er/gen/1", "deep/erx"]


# -- injected faults ---------------------------------------------------------


@pytest.fixture
def proxy(s3_server: SeaweedS3) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's S3 server."""
    with FaultProxy("127.0.0.1", s3_server.s3_port) as p:
        yield p


def proxied_url(s3_bucket: str, proxy: FaultProxy, extra: str = "") -> str:
    return f"s3://{s3_bucket}/p?endpoint={proxy.endpoint}{extra}"


def multipart_through(
    s3_bucket: str, proxy: FaultProxy, tmp_path: Path, opened: list[S3ReplicaClient]
) -> tuple[S3ReplicaClient, Path, bytes]:
    """A client through ``proxy`` that sends files over 5 MiB in 5 MiB parts,
    and a 12 MiB file of random bytes to send: three parts."""
    client = s3_client(proxied_url(s3_bucket, proxy, "&multipart_threshold=5MiB&part_size=5MiB"), opened)
    data = os.urandom(12 * MiB)
    source = tmp_path / "big"
    source.write_bytes(data)
    return client, source, data


@pytest.mark.s3
@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["http500", "slowdown"])
async def test_server_errors_are_retried(
    fault: str, s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, opened: list[S3ReplicaClient]
) -> None:
    """Two 500s or 503 SlowDowns on a PUT are retried away; the data round-trips."""
    client = s3_client(proxied_url(s3_bucket, proxy), opened)
    proxy.inject(fault, times=2, method="PUT")
    data = os.urandom(100_000)
    await client.put("k", data)
    assert proxy.counts[fault] == 2
    assert client.stats.requests["PUT"] == 3
    assert client.stats.errors == 2
    assert await client.get("k") == data


@pytest.mark.s3
@pytest.mark.asyncio
async def test_persistent_server_errors_give_unavailable(
    s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, opened: list[S3ReplicaClient]
) -> None:
    """When every attempt gets 503 SlowDown, the call raises ReplicaUnavailableError after max_attempts."""
    client = s3_client(proxied_url(s3_bucket, proxy), opened)
    proxy.inject("slowdown", times=100, method="GET")
    started = time.monotonic()
    with pytest.raises(ReplicaUnavailableError, match="SlowDown") as info:
        await client.get("k")
    assert time.monotonic() - started < 30
    assert proxy.counts["slowdown"] == client.settings.max_attempts
    assert info.value.transient is True


@pytest.mark.s3
@pytest.mark.asyncio
async def test_stall_beyond_read_timeout_gives_unavailable(
    s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, opened: list[S3ReplicaClient]
) -> None:
    """A server that holds every request longer than the read timeout fails the call in bounded time."""
    client = s3_client(proxied_url(s3_bucket, proxy, "&read_timeout=1&max_attempts=2"), opened)
    await client.put("k", b"v")
    proxy.inject("stall", times=2, seconds=10, method="GET")
    started = time.monotonic()
    with pytest.raises(ReplicaUnavailableError, match="stopped answering"):
        await client.get("k")
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 8  # two 1 s read timeouts plus at most 1 s of backoff
    assert proxy.counts["stall"] == 2


@pytest.mark.s3
@pytest.mark.asyncio
async def test_store_that_stops_reading_an_upload_hits_the_deadline(
    s3_bucket: str,
    s3_env: dict[str, str],
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    opened: list[S3ReplicaClient],
) -> None:
    """A PUT whose body the store stops reading (no socket timeout covers that) fails at the deadline."""
    # The deadline allows body_bytes / _MIN_UPLOAD_RATE per attempt; raise the
    # rate so the test waits seconds, not minutes.
    monkeypatch.setattr(replica_s3, "_MIN_UPLOAD_RATE", 16 * MiB)
    client = s3_client(
        proxied_url(s3_bucket, proxy, "&read_timeout=1&connect_timeout=1&max_attempts=1"), opened
    )
    data = os.urandom(48 * MiB)  # far more than loopback socket buffers hold
    deadline = client.settings.call_deadline(len(data))
    assert deadline < 6
    proxy.inject("stall", times=1, seconds=60, method="PUT")
    started = time.monotonic()
    with pytest.raises(ReplicaUnavailableError, match="deadline"):
        await client.put("big", data)
    assert deadline - 0.5 < time.monotonic() - started < deadline + 5
    assert proxy.counts["stall"] == 1


@pytest.mark.s3
@pytest.mark.asyncio
async def test_short_stall_within_read_timeout_succeeds(
    s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, opened: list[S3ReplicaClient]
) -> None:
    """A stall shorter than the read timeout is only slow, not an error."""
    client = s3_client(proxied_url(s3_bucket, proxy, "&read_timeout=5"), opened)
    await client.put("k", b"v")
    proxy.inject("stall", times=1, seconds=1, method="GET")
    assert await client.get("k") == b"v"
    assert proxy.counts["stall"] == 1
    assert client.stats.errors == 0


@pytest.mark.s3
@pytest.mark.asyncio
async def test_connection_cut_mid_upload_is_retried(
    s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, opened: list[S3ReplicaClient]
) -> None:
    """Connection resets halfway through a PUT body are retried and the object is complete."""
    client = s3_client(proxied_url(s3_bucket, proxy), opened)
    data = os.urandom(2 * MiB)
    # Two cuts: aiohttp itself silently resends an idempotent request once
    # after a reset, so only the second reaches botocore's retries.
    proxy.inject("cut_request", times=2, method="PUT", after_bytes=MiB)
    await client.put("k", data)
    assert proxy.counts["cut_request"] == 2
    assert client.stats.errors >= 1
    assert client.stats.requests["PUT"] >= 2
    assert await client.get("k") == data


@pytest.mark.s3
@pytest.mark.asyncio
async def test_connection_cut_mid_download_is_retried(
    s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, opened: list[S3ReplicaClient]
) -> None:
    """A connection reset halfway through a GET body is fetched again; the caller gets every byte."""
    client = s3_client(proxied_url(s3_bucket, proxy), opened)
    data = os.urandom(2 * MiB)
    await client.put("k", data)
    proxy.inject("cut_response", times=1, method="GET", after_bytes=MiB)
    assert await client.get("k") == data
    assert proxy.counts["cut_response"] == 1
    assert client.stats.requests["GET"] == 2
    assert client.stats.errors == 1


@pytest.mark.s3
@pytest.mark.asyncio
async def test_multipart_part_failure_is_retried(
    s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, tmp_path: Path, opened: list[S3ReplicaClient]
) -> None:
    """A 500 on one part of a multipart upload is retried for that part only."""
    client, source, data = multipart_through(s3_bucket, proxy, tmp_path, opened)
    proxy.inject("http500", times=1, method="PUT", path_contains="partNumber=2")
    await client.put_file("big", source)
    assert proxy.counts["http500"] == 1
    assert client.stats.requests["PUT"] == 1 + 3 + 1 + 1  # create, 3 parts, 1 retry, complete
    assert await client.get("big") == data


@pytest.mark.s3
@pytest.mark.asyncio
async def test_failed_multipart_upload_is_aborted(
    s3_server: SeaweedS3,
    s3_bucket: str,
    s3_env: dict[str, str],
    proxy: FaultProxy,
    tmp_path: Path,
    opened: list[S3ReplicaClient],
) -> None:
    """When a part keeps failing, put_file raises ReplicaUnavailableError and aborts the upload."""
    client, source, _ = multipart_through(s3_bucket, proxy, tmp_path, opened)
    proxy.inject("http500", times=100, method="PUT", path_contains="partNumber=2")
    with pytest.raises(ReplicaUnavailableError, match="InternalError"):
        await client.put_file("big", source)
    assert proxy.counts["http500"] == client.settings.max_attempts
    assert client.stats.requests["DELETE"] == 1  # the abort
    admin = s3_server.client()
    assert not admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    with pytest.raises(ObjectNotFoundError):
        await client.get("big")


@pytest.mark.asyncio
async def test_parallel_parts_raise_the_first_failure_itself() -> None:
    """The parts' task group raises the failing part's own error (cause kept) and cancels the rest."""
    started = cancelled = 0
    all_started = asyncio.Event()

    async def part() -> None:
        nonlocal started, cancelled
        started += 1
        mine = started
        try:
            if mine == 3:
                all_started.set()
            await all_started.wait()
            if mine == 1:
                try:
                    raise ConnectionResetError("reset by peer")
                except ConnectionResetError as exc:
                    raise ReplicaUnavailableError("put s3://b/k: the connection failed") from exc
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise

    with pytest.raises(ReplicaUnavailableError, match="the connection failed") as info:
        await replica_s3._run_all(part, 3)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert (started, cancelled) == (3, 2)


@pytest.mark.s3
@pytest.mark.asyncio
async def test_lost_answer_to_a_completed_multipart_upload(
    s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, tmp_path: Path, opened: list[S3ReplicaClient]
) -> None:
    """The store completes the upload but the connection drops before its
    answer arrives, and the retried CompleteMultipartUpload finds no upload
    (NoSuchUpload, as a store that forgets completed uploads answers;
    SeaweedFS itself answers the retry with success, so the proxy plays that
    store). The object is there, whole: put_file succeeds and aborts nothing."""
    client, source, data = multipart_through(s3_bucket, proxy, tmp_path, opened)
    proxy.inject("cut_response", times=1, method="POST", path_contains="uploadId=", after_bytes=0)
    proxy.inject("no_such_upload", times=1, method="POST", path_contains="uploadId=")
    await client.put_file("big", source)
    assert (proxy.counts["cut_response"], proxy.counts["no_such_upload"]) == (1, 1)
    assert client.stats.requests["PUT"] == 1 + 3 + 2  # create, 3 parts, complete twice
    assert client.stats.requests["HEAD"] == 1  # the check that the object is there
    assert client.stats.requests["DELETE"] == 0  # nothing aborted
    assert await client.get("big") == data


@pytest.mark.s3
@pytest.mark.asyncio
async def test_no_such_upload_without_the_object_is_an_error(
    s3_bucket: str, s3_env: dict[str, str], proxy: FaultProxy, tmp_path: Path, opened: list[S3ReplicaClient]
) -> None:
    """NoSuchUpload when the upload never completed (a lifecycle rule
    aborted it under us): an error to retry later, never a false success."""
    client, source, _ = multipart_through(s3_bucket, proxy, tmp_path, opened)
    proxy.inject("no_such_upload", times=5, method="POST", path_contains="uploadId=")
    with pytest.raises(ReplicaUnavailableError, match="NoSuchUpload"):
        await client.put_file("big", source)
    with pytest.raises(ObjectNotFoundError):
        await client.get("big")


# -- a server that dies and comes back ----------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS of this test's own, free to be killed and restarted."""
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.asyncio
async def test_server_killed_and_restarted(
    own_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, opened: list[S3ReplicaClient]
) -> None:
    """While the server is down calls fail fast as unavailable; after a restart the same client works."""
    isolate_aws_env(monkeypatch, tmp_path)
    for name, value in own_server.env().items():
        monkeypatch.setenv(name, value)
    own_server.create_bucket("restart-test")
    client = s3_client(f"s3://restart-test/p?endpoint={own_server.endpoint}", opened)
    await client.put("before", b"1")

    own_server.stop(grace=0)  # a crash: SIGKILL
    calls = (lambda: client.put("during", b"2"), lambda: client.get("before"), client.list)
    for call in calls:
        started = time.monotonic()
        with pytest.raises(ReplicaUnavailableError) as info:
            await call()
        assert time.monotonic() - started < 15
        assert info.value.transient is True

    own_server.start()
    await client.put("after", b"3")
    assert await client.get("before") == b"1"
    assert [o.key for o in await client.list()] == ["after", "before"]


@pytest.mark.s3
@pytest.mark.asyncio
async def test_errors_are_replica_errors_only(s3_url: str, opened: list[S3ReplicaClient]) -> None:
    """A missing key on S3 raises ObjectNotFoundError (a ReplicaError), naming the full key."""
    client = s3_client(s3_url, opened)
    with pytest.raises(ReplicaError, match=r"s3://sqlrepl-test-[0-9a-f]+/replica/missing/key") as info:
        await client.get("missing/key")
    assert isinstance(info.value, ObjectNotFoundError)
