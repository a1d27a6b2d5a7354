"""``s3://bucket/prefix``: a replica in Amazon S3 or an S3-compatible store.

The only module of sqlrepl that imports aiobotocore/botocore/aiohttp. Every
exception of those libraries is translated here into a ``ReplicaError``
subclass (``raise ... from exc``), so the engine never sees a backend type.

Configuration, strongest first: the URL's query options, then the standard
AWS variables as botocore reads them. The region is the ``region`` option,
else ``AWS_REGION``, else ``AWS_DEFAULT_REGION`` or the profile's region, else
``us-east-1``. The endpoint is the ``endpoint`` option, else
``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else AWS itself. A custom
endpoint implies path-style addressing unless ``force_path_style=false``.
Credentials are botocore's chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, SSO, instance roles...); they never
appear in the URL.

Failure bounds: each request attempt has a connect timeout (default 5 s) and a
read timeout (no byte for 30 s); botocore retries throttling (``SlowDown``),
5xx, timeouts and dropped connections in its "standard" mode, 3 attempts in all
with jittered exponential backoff (at most 1 s, then 2 s). A call that outlasts
its attempts raises ``ReplicaUnavailableError``: the engine retries above this
client, so nothing here retries for minutes. An outer deadline per call (see
:meth:`S3Settings.call_deadline`) also bounds the one case the socket timeouts
miss, a peer that stops reading a request body.

Not guaranteed: a ``put_file`` whose final response is lost may have stored
the object and still raise; a process killed during a multipart upload leaves
its parts in the bucket until a lifecycle rule ("abort incomplete multipart
uploads after N days") removes them.

Clients belong to one event loop (asyncio): the aiobotocore client is created
on the first awaited call, in that call's loop, and closed by :meth:`aclose`,
which must run in the same loop. ``from_url`` and the constructor do no I/O.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

import aiobotocore.session
import aiohttp
import anyio
import botocore.exceptions
from aiobotocore.config import AioConfig

from ._errors import (
    ConfigError,
    ObjectNotFoundError,
    ReplicaAuthError,
    ReplicaError,
    ReplicaNotFoundError,
    ReplicaUnavailableError,
)
from ._progress import upload_sent
from ._replica import ObjectInfo, RequestStats, request_kind

log = logging.getLogger("sqlrepl")

__all__ = ["S3ReplicaClient", "S3Settings", "from_url"]

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

# S3's own limits: parts of 5 MiB to 5 GiB (the last may be smaller), at most
# 10,000 parts, single PUTs up to 5 GiB, DeleteObjects up to 1,000 keys.
_MIN_PART: Final = 5 * MiB
_MAX_PART: Final = 5 * GiB
_MAX_PARTS: Final = 10_000
_DELETE_BATCH: Final = 1000

# The outer deadline assumes a store accepts a request body at least this
# fast; slower than this the link is unusable for replication anyway.
_MIN_UPLOAD_RATE: Final = 64 * KiB

URL_OPTIONS: Final = (
    "endpoint",
    "region",
    "force_path_style",
    "sse",
    "connect_timeout",
    "read_timeout",
    "max_attempts",
    "multipart_threshold",
    "part_size",
)

_SSE_VALUES: Final = {"aes256": "AES256", "aws:kms": "aws:kms"}

# Request kinds for stats, by botocore operation name: CreateMultipartUpload,
# UploadPart and CompleteMultipartUpload are PUT-class requests in S3 pricing.
_KINDS: Final = {
    "PutObject": "PUT",
    "CreateMultipartUpload": "PUT",
    "UploadPart": "PUT",
    "CompleteMultipartUpload": "PUT",
    "GetObject": "GET",
    "ListObjectsV2": "LIST",
    "DeleteObjects": "DELETE",
    "AbortMultipartUpload": "DELETE",
    "HeadBucket": "HEAD",
    "HeadObject": "HEAD",
}

_AUTH_CODES: Final = {
    "InvalidAccessKeyId": "the access key id is not known to this store; check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": (
        "the secret access key does not match the access key id; check AWS_SECRET_ACCESS_KEY"
    ),
    "AccessDenied": (
        "access denied; the credentials need s3:ListBucket, s3:GetObject, s3:PutObject and"
        " s3:DeleteObject on this bucket and prefix"
    ),
    "AllAccessDisabled": "all access to this bucket has been disabled",
    "AccountProblem": "the store reports a problem with the account",
    "ExpiredToken": "the session token has expired; refresh the credentials",
    "TokenRefreshRequired": "the session token has expired; refresh the credentials",
    "InvalidToken": "the session token is malformed or invalid; check AWS_SESSION_TOKEN",
    "InvalidSecurity": "the store rejected the provided security credentials",
    "RequestTimeTooSkewed": "this machine's clock differs too much from the store's; fix the clock",
}

_UNAVAILABLE_CODES: Final = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "NoSuchUpload",  # a multipart upload vanished under us: the whole upload must restart
}

_CREDENTIAL_ERRORS: Final = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.ProfileNotFound,
    botocore.exceptions.UnauthorizedSSOTokenError,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.SSOTokenLoadError,
)

# Failures while streaming a response body: botocore does not retry these,
# since they happen after the response headers arrived.
_BODY_ERRORS: Final = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.IncompleteReadError,
    aiohttp.ClientError,
    TimeoutError,
    ConnectionError,
)

# What this module translates; anything else (a bug, a local OSError) propagates as is.
_STORE_ERRORS: Final = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    aiohttp.ClientError,
    TimeoutError,
    ConnectionError,
)

_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]*[a-z0-9]")


@dataclass(frozen=True)
class S3Settings:
    """Everything a client needs, resolved from the URL and the environment.

    ``endpoint`` is ``None`` for AWS itself; ``region`` is ``None`` when it is
    left to botocore's profile lookup (falling back to ``us-east-1``).
    ``list_page_size`` and ``upload_concurrency`` are not URL options: they
    exist for tests and tuning.
    """

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    sse: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 3
    multipart_threshold: int = 16 * MiB
    part_size: int = 8 * MiB
    upload_concurrency: int = 4
    list_page_size: int = 1000
    options: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def call_deadline(self, body_bytes: int = 0) -> float:
        """Seconds after which one call (all its attempts) is abandoned.

        Every attempt may use its connect and read timeouts plus the time to
        send the body at the slowest acceptable rate; between attempts botocore
        sleeps at most ``min(2**i, 20)`` s (plus up to 5 s when a store asks for
        a retry delay).
        """
        per_attempt = self.connect_timeout + self.read_timeout + body_bytes / _MIN_UPLOAD_RATE
        backoff = sum(min(2.0**i, 20.0) + 5.0 for i in range(self.max_attempts - 1))
        return self.max_attempts * per_attempt + backoff


def from_url(parts: SplitResult, options: dict[str, str]) -> S3ReplicaClient:
    """Build a client for ``s3://bucket/prefix?options``. Raises ``ConfigError``."""
    return S3ReplicaClient(parse_url(parts, options))


def parse_url(
    parts: SplitResult, options: dict[str, str], environ: dict[str, str] | None = None
) -> S3Settings:
    """Resolve ``parts`` and ``options`` (and ``environ``, default ``os.environ``)
    into settings, or raise ``ConfigError`` saying what is wrong."""
    env = dict(os.environ) if environ is None else environ
    shown = f"s3://{parts.netloc}{parts.path}"
    bucket = unquote(parts.netloc)
    _check_bucket(bucket, shown)
    prefix = unquote(parts.path).strip("/")
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
        raise ConfigError(f"replica URL {shown}: the prefix {prefix!r} has an empty, '.' or '..' segment")

    unknown = sorted(set(options) - set(URL_OPTIONS))
    if unknown:
        raise ConfigError(
            f"replica URL {shown}: unknown option(s) {', '.join(unknown)};"
            f" valid options are {', '.join(URL_OPTIONS)}"
        )

    endpoint = options.get("endpoint")
    if endpoint is None and env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None:
        endpoint = _check_endpoint(endpoint, shown)

    region = options.get("region") or env.get("AWS_REGION") or None
    if "region" in options and not re.fullmatch(r"[A-Za-z0-9._-]+", options["region"]):
        raise ConfigError(f"replica URL {shown}: region {options['region']!r} is not a region name")

    if "force_path_style" in options:
        style: Literal["auto", "path", "virtual"] = (
            "path" if _parse_bool(options["force_path_style"], "force_path_style", shown) else "virtual"
        )
    else:
        # Self-hosted stores (MinIO, SeaweedFS, Ceph) rarely have wildcard DNS
        # for bucket subdomains; AWS prefers virtual-hosted style.
        style = "path" if endpoint is not None else "auto"

    sse = None
    if "sse" in options:
        sse = _SSE_VALUES.get(options["sse"].lower())
        if sse is None:
            raise ConfigError(
                f"replica URL {shown}: sse={options['sse']!r} is not supported; use sse=AES256 or sse=aws:kms"
            )

    settings = S3Settings(
        bucket=bucket,
        prefix=prefix,
        endpoint=endpoint,
        region=region,
        addressing_style=style,
        sse=sse,
        options=tuple(sorted(options.items())),
    )
    changes: dict[str, Any] = {}
    if "connect_timeout" in options:
        changes["connect_timeout"] = _parse_seconds(options["connect_timeout"], "connect_timeout", shown)
    if "read_timeout" in options:
        changes["read_timeout"] = _parse_seconds(options["read_timeout"], "read_timeout", shown)
    if "max_attempts" in options:
        changes["max_attempts"] = _parse_int(options["max_attempts"], "max_attempts", shown, 1, 20)
    if "multipart_threshold" in options:
        changes["multipart_threshold"] = _parse_size(
            options["multipart_threshold"], "multipart_threshold", shown, _MIN_PART, _MAX_PART
        )
    if "part_size" in options:
        changes["part_size"] = _parse_size(options["part_size"], "part_size", shown, _MIN_PART, _MAX_PART)
    return replace(settings, **changes)


def _check_bucket(bucket: str, shown: str) -> None:
    if not bucket:
        raise ConfigError(f"replica URL {shown}: no bucket; write s3://bucket/prefix")
    what = None
    if not 3 <= len(bucket) <= 63:
        what = f"is {len(bucket)} characters long; bucket names have 3 to 63 characters"
    elif re.search(r"[^a-z0-9.-]", bucket):
        bad = "".join(sorted(set(re.findall(r"[^a-z0-9.-]", bucket))))
        what = f"contains {bad!r}; bucket names use only lowercase letters, digits, '.' and '-'"
    elif not _BUCKET_RE.fullmatch(bucket):
        what = "must begin and end with a lowercase letter or a digit"
    elif ".." in bucket:
        what = "has two adjacent periods"
    if what:
        raise ConfigError(f"replica URL {shown}: bucket name {bucket!r} {what}")


def _check_endpoint(endpoint: str, shown: str) -> str:
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError as exc:
        raise ConfigError(f"replica URL {shown}: endpoint is malformed: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"replica URL {shown}: endpoint {_redact_endpoint(endpoint)!r} must be an http:// or https:// URL"
            " with a host, like https://s3.example.com"
        )
    return endpoint.rstrip("/")


def _redact_endpoint(endpoint: str) -> str:
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return "<malformed endpoint>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _parse_bool(value: str, name: str, shown: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"replica URL {shown}: {name}={value!r} must be true or false")


def _parse_seconds(value: str, name: str, shown: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 3600:
        raise ConfigError(f"replica URL {shown}: {name}={value!r} must be a number of seconds in (0, 3600]")
    return seconds


def _parse_int(value: str, name: str, shown: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ConfigError(f"replica URL {shown}: {name}={value!r} must be an integer from {low} to {high}")
    return number


def _parse_size(value: str, name: str, shown: str, low: int, high: int) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*", value)
    size = int(match[1]) * {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}[match[2] or "B"] if match else -1
    if not low <= size <= high:
        raise ConfigError(
            f"replica URL {shown}: {name}={value!r} must be a size from {low // MiB} MiB to"
            f" {high // GiB} GiB, in bytes or with a KiB, MiB or GiB suffix"
        )
    return size


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class S3ReplicaClient:
    """A replica under ``settings.prefix`` in ``settings.bucket``. See the module docstring.

    ``stats`` counts every HTTP attempt, retries included, by kind:
    ``PUT`` = PutObject, CreateMultipartUpload, each UploadPart and
    CompleteMultipartUpload; ``GET`` = GetObject; ``LIST`` = each
    ListObjectsV2 page; ``DELETE`` = each DeleteObjects batch (up to 1,000
    keys) and AbortMultipartUpload; ``HEAD`` = HeadBucket. ``bytes_up`` is the
    object bytes of every PUT and part attempt; ``bytes_down`` the object bytes
    received. ``errors`` counts attempts that failed (no response, or a status
    of 300 or more, including a 404 for a missing key), plus one for a call
    that failed before any attempt (no credentials) or hit the outer deadline.
    Not seen, so not counted: aiohttp's own single resend of an idempotent
    request whose connection reset before any response.
    """

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        self._stats = RequestStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_lock: asyncio.Lock | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._s3: Any = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        path = quote(settings.prefix)
        query = "&".join(f"{k}={_redact_endpoint(v) if k == 'endpoint' else v}" for k, v in settings.options)
        self._url = urlunsplit(("s3", settings.bucket, "/" + path if path else "", query, ""))
        self._errors = _Translator(settings, self._url, self._stats)

    def __repr__(self) -> str:
        return f"S3ReplicaClient({self._url!r})"

    @property
    def url(self) -> str:
        return self._url

    @property
    def stats(self) -> RequestStats:
        return self._stats

    @property
    def settings(self) -> S3Settings:
        return self._settings

    # -- lifecycle ---------------------------------------------------------

    async def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError(f"{self._url}: the client is closed")
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                f"{self._url}: the client was first used in another event loop;"
                " aiobotocore clients belong to one loop, so open one client per loop"
            )
        if self._s3 is not None:
            return self._s3
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._s3 is None:
                errors_before = self._stats.errors
                try:
                    self._s3 = await self._open()
                except _STORE_ERRORS as exc:
                    raise self._errors.translate(exc, "connect", None, errors_before) from exc
        return self._s3

    async def _open(self) -> Any:
        s = self._settings
        session = aiobotocore.session.get_session()
        region = s.region or session.get_config_variable("region") or "us-east-1"
        config = AioConfig(
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            # total_max_attempts counts the first attempt; botocore's
            # "max_attempts" key would count retries only.
            retries={"mode": "standard", "total_max_attempts": s.max_attempts},
            s3={"addressing_style": s.addressing_style},
            max_pool_connections=max(10, 2 * s.upload_concurrency),
            # Many S3-compatible stores reject the CRC32 checksum headers that
            # botocore adds by default since 1.36; Content-MD5, which we set
            # on every upload, is understood everywhere.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="sqlrepl",
        )
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            session.create_client("s3", region_name=region, endpoint_url=s.endpoint, config=config)
        )
        self._exit_stack = stack
        if s.endpoint is None:
            self._errors.endpoint_label = f"AWS S3 ({client.meta.endpoint_url})"
        events = client.meta.events
        events.register("before-send.s3", self._on_before_send)
        events.register("response-received.s3", self._on_response)
        events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        return client

    async def aclose(self) -> None:
        """Close the aiobotocore client (in the loop that opened it).

        Waits up to a few seconds for best-effort multipart aborts still in
        flight. Idempotent.
        """
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(f"{self._url}: aclose() must run in the event loop that used the client")
        self._closed = True
        if self._background:
            await asyncio.wait(set(self._background), timeout=self._settings.connect_timeout)
            for task in self._background:
                task.cancel()
        stack, self._exit_stack, self._s3 = self._exit_stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- stats hooks (botocore events, once per HTTP attempt) -----------------

    def _on_before_send(self, request: Any, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        self._stats.requests[_KINDS.get(operation, operation)] += 1
        if operation in ("PutObject", "UploadPart"):
            self._stats.bytes_up += int(request.headers.get("Content-Length", 0))

    def _on_response(
        self, exception: Any = None, response_dict: Any = None, event_name: str = "", **_: Any
    ) -> None:
        if exception is not None or (response_dict and response_dict.get("status_code", 0) >= 300):
            operation = event_name.rsplit(".", 1)[-1]
            self._stats.failed(_KINDS.get(operation, operation))

    # -- the calls ---------------------------------------------------------

    def _full_key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid replica key {key!r}")
        return f"{self._settings.prefix}/{key}" if self._settings.prefix else key

    async def _call(
        self, operation: str, action: str, key: str | None, *, body_bytes: int = 0, **params: Any
    ) -> dict[str, Any]:
        client = await self._client()
        errors_before = self._stats.errors
        try:
            async with asyncio.timeout(self._settings.call_deadline(body_bytes)):
                response: dict[str, Any] = await getattr(client, operation)(
                    Bucket=self._settings.bucket, **params
                )
                return response
        except _STORE_ERRORS as exc:
            raise self._errors.translate(exc, action, key, errors_before) from exc

    async def check(self) -> None:
        """HeadBucket: raise ``ReplicaNotFoundError`` for a missing bucket,
        ``ReplicaAuthError`` for rejected credentials, ``ReplicaUnavailableError``
        when the endpoint cannot be reached."""
        try:
            await self._call("head_bucket", "check", None)
        except ReplicaAuthError as exc:
            if not isinstance(exc.__cause__, botocore.exceptions.ClientError):
                raise
            # A HEAD response has no body, so it cannot say *why* it was
            # refused; a one-key LIST names the cause (bad key id, bad secret,
            # expired token, no permission).
            await self._call("list_objects_v2", "check", None, Prefix=self._full_prefix(""), MaxKeys=1)
            raise

    async def put(self, key: str, data: bytes) -> None:
        """One PutObject with Content-MD5 (objects up to 5 GiB)."""
        full = self._full_key(key)
        data = bytes(data)
        md5 = await asyncio.to_thread(_md5_b64, data) if len(data) > MiB else _md5_b64(data)
        await self._call(
            "put_object",
            "put",
            key,
            body_bytes=len(data),
            Key=full,
            Body=data,
            ContentMD5=md5,
            **self._sse_params(),
        )

    async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Upload the file at ``path``: one PUT up to ``multipart_threshold``
        bytes, else a multipart upload of ``part_size`` parts sent
        ``upload_concurrency`` at a time (memory used: about that many parts).

        The file must not change while it is uploaded. Errors reading it are
        raised as the ``OSError`` they are; a failed multipart upload is
        aborted (best effort) before the error propagates.
        """
        full = self._full_key(key)
        size = (await asyncio.to_thread(os.stat, path)).st_size
        if size <= self._settings.multipart_threshold:
            await self.put(key, await asyncio.to_thread(_read_file, path))
            return
        await _MultipartUpload(self, key, full, path, size).run()

    def _sse_params(self) -> dict[str, Any]:
        return {"ServerSideEncryption": self._settings.sse} if self._settings.sse else {}

    async def get(self, key: str) -> bytes:
        """The whole object. A body cut off mid-way is fetched again, up to
        ``max_attempts`` times in all."""
        return await self._get(key, Key=self._full_key(key))

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (an HTTP Range GET); fewer at the end
        of the object, none when ``start`` is at or past the end."""
        if start < 0 or length < 0:
            raise ValueError(f"get_range of {key!r}: start and length must be >= 0, got {start}, {length}")
        full = self._full_key(key)
        if length == 0:
            # A zero-length range cannot be expressed; one byte still
            # verifies that the object exists.
            await self._get(key, Key=full, Range=f"bytes={start}-{start}")
            return b""
        return await self._get(key, Key=full, Range=f"bytes={start}-{start + length - 1}")

    async def _get(self, key: str, **params: Any) -> bytes:
        attempts = self._settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                response = await self._call("get_object", "get", key, **params)
            except ReplicaError as exc:
                if "Range" in params and _error_code(exc.__cause__) == "InvalidRange":
                    return b""
                raise
            chunks = []
            try:
                async with response["Body"] as body:
                    while chunk := await body.read(MiB):
                        chunks.append(chunk)
                        self._stats.bytes_down += len(chunk)
                return b"".join(chunks)
            except _BODY_ERRORS as exc:
                self._stats.failed("GET")
                if attempt == attempts:
                    raise self._errors.translate(exc, "get", key, errors_before=-1) from exc
                await asyncio.sleep(0.1 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _full_prefix(self, prefix: str) -> str:
        if prefix.startswith("/"):
            raise ValueError(f"invalid list prefix {prefix!r}")
        return f"{self._settings.prefix}/{prefix}" if self._settings.prefix else prefix

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """ListObjectsV2, every page. Keys are relative to the replica prefix;
        objects whose relative key would be empty (folder markers made by
        consoles) are left out."""
        full = self._full_prefix(prefix)
        strip = len(self._settings.prefix) + 1 if self._settings.prefix else 0
        out: list[ObjectInfo] = []
        params: dict[str, Any] = {"Prefix": full, "MaxKeys": self._settings.list_page_size}
        while True:
            page = await self._call("list_objects_v2", "list", prefix, **params)
            for item in page.get("Contents", ()):
                rel = item["Key"][strip:]
                if rel and not rel.endswith("/"):
                    out.append(ObjectInfo(rel, int(item["Size"])))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
            params["ContinuationToken"] = token
        out.sort(key=lambda o: o.key)
        return out

    async def delete(self, keys: Sequence[str]) -> None:
        """DeleteObjects in batches of 1,000. Absent keys are not an error; a
        key the store refuses to delete raises for the first such key."""
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), _DELETE_BATCH):
            batch = unique[i : i + _DELETE_BATCH]
            response = await self._call(
                "delete_objects",
                "delete",
                batch[0],
                Delete={"Objects": [{"Key": self._full_key(k)} for k in batch], "Quiet": True},
            )
            failed = response.get("Errors") or []
            if failed:
                first = failed[0]
                raise self._errors.from_code(
                    str(first.get("Code", "")),
                    0,
                    str(first.get("Message", "")),
                    f"delete {len(failed)} of {len(batch)} keys, first s3://{self._settings.bucket}/"
                    f"{first.get('Key', '')}",
                    "delete",
                )


class _MultipartUpload:
    """One multipart upload of the file at ``path`` (``size`` bytes) to
    ``key`` through ``client``: create, send the parts
    ``upload_concurrency`` at a time, complete. If anything fails the upload
    is aborted (best effort) before the error propagates."""

    def __init__(
        self, client: S3ReplicaClient, key: str, full: str, path: str | os.PathLike[str], size: int
    ) -> None:
        self._client = client
        self._key = key
        self._full = full
        self._path = path
        self._size = size
        part_size = client.settings.part_size
        if math.ceil(size / part_size) > _MAX_PARTS:
            part_size = math.ceil(size / _MAX_PARTS / MiB) * MiB
        self._part_size = part_size
        self._count = math.ceil(size / part_size)

    async def run(self) -> None:
        client, key, full = self._client, self._key, self._full
        created = await client._call("create_multipart_upload", "put", key, Key=full, **client._sse_params())
        upload_id: str = created["UploadId"]
        try:
            etags = await self._upload_parts(upload_id)
            parts = [{"ETag": e, "PartNumber": n + 1} for n, e in enumerate(etags)]
            try:
                await client._call(
                    "complete_multipart_upload",
                    "put",
                    key,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except ReplicaError as exc:
                # A retried complete whose first try did complete (its answer
                # lost on the way) finds no upload: the object is there.
                if _error_code(exc.__cause__) != "NoSuchUpload" or not await self._has_object():
                    raise
                log.info("%s: the upload had completed; its answer was lost", client._errors.where(key))
        except BaseException:
            abort = asyncio.ensure_future(self._abort(upload_id))
            client._background.add(abort)
            abort.add_done_callback(client._background.discard)
            # Shielded: if this task is cancelled (again), the abort goes on
            # in the background and aclose() waits for it.
            await asyncio.shield(abort)
            raise

    async def _upload_parts(self, upload_id: str) -> list[str]:
        size, part_size, count = self._size, self._part_size, self._count
        etags = [""] * count
        numbers = iter(range(count))

        async def worker() -> None:
            # Workers share one iterator, so each part is read and sent once
            # and at most `upload_concurrency` parts are in memory.
            for n in numbers:
                length = min(part_size, size - n * part_size)
                data, md5 = await asyncio.to_thread(_read_part, self._path, n * part_size, length)
                response = await self._client._call(
                    "upload_part",
                    "put",
                    self._key,
                    body_bytes=length,
                    Key=self._full,
                    UploadId=upload_id,
                    PartNumber=n + 1,
                    Body=data,
                    ContentMD5=md5,
                )
                etags[n] = response["ETag"]
                upload_sent(length)  # progress hook: a part is stored

        await _run_all(worker, min(self._client.settings.upload_concurrency, count))
        return etags

    async def _has_object(self) -> bool:
        """Whether the store holds the key at the file's size (HeadObject).
        Object keys are never reused for other contents, so that is the
        object this upload sent."""
        try:
            head = await self._client._call("head_object", "check", self._key, Key=self._full)
        except ReplicaError:
            return False
        return int(head.get("ContentLength", -1)) == self._size

    async def _abort(self, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._client._call(
                "abort_multipart_upload", "abort upload", None, Key=self._full, UploadId=upload_id
            )


class _Translator:
    """Turns what botocore and aiohttp raise into the ``ReplicaError`` that
    says what failed, on what and what to do; one per client, counting a
    call that failed before any attempt in its ``stats``."""

    def __init__(self, settings: S3Settings, url: str, stats: RequestStats) -> None:
        self.settings = settings
        self.url = url
        self.stats = stats
        # Named in messages; the client names AWS's own endpoint once it knows it.
        self.endpoint_label = _redact_endpoint(settings.endpoint) if settings.endpoint else "AWS S3"

    def where(self, key: str | None) -> str:
        s = self.settings
        path = "/".join(p for p in (s.prefix, key) if p)
        return f"s3://{s.bucket}/{path}".rstrip("/")

    def translate(self, exc: BaseException, action: str, key: str | None, errors_before: int) -> ReplicaError:
        """The ``ReplicaError`` for ``exc``, one of ``_STORE_ERRORS`` or a body
        streaming failure. ``errors_before`` (or -1) is ``stats.errors`` when
        the call began: a call that failed without a failed attempt counts one."""
        if errors_before >= 0 and self.stats.errors == errors_before:
            self.stats.failed(request_kind(action))
        where = f"{action} {self.where(key)}"
        if isinstance(exc, botocore.exceptions.ClientError):
            response = exc.response
            error = response.get("Error", {})
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            code, message = str(error.get("Code", "")), str(error.get("Message", ""))
            return self.from_code(code, status, message, where, action)
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return ReplicaAuthError(
                f"{where}: no usable AWS credentials ({type(exc).__name__}: {exc}); set AWS_ACCESS_KEY_ID"
                " and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
                replica=self.url,
            )
        if isinstance(exc, botocore.exceptions.SSLError):
            return ReplicaUnavailableError(
                f"{where}: TLS failed with {self.endpoint_label} ({exc}); if the store uses a private CA,"
                " point AWS_CA_BUNDLE at its certificate",
                replica=self.url,
            )
        if isinstance(exc, botocore.exceptions.EndpointConnectionError):
            # aiobotocore also reports a connection reset mid-request this way.
            return ReplicaUnavailableError(
                f"{where}: cannot reach {self.endpoint_label} ({_root_cause(exc)})", replica=self.url
            )
        if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
            return ReplicaUnavailableError(
                f"{where}: connecting to {self.endpoint_label} timed out after"
                f" {self.settings.connect_timeout:g} s",
                replica=self.url,
            )
        if isinstance(exc, botocore.exceptions.ReadTimeoutError):
            return ReplicaUnavailableError(
                f"{where}: {self.endpoint_label} stopped answering (no data for"
                f" {self.settings.read_timeout:g} s, {self.settings.max_attempts} attempts)",
                replica=self.url,
            )
        if isinstance(exc, TimeoutError):
            return ReplicaUnavailableError(
                f"{where}: {self.endpoint_label} did not complete the call within its deadline"
                " (a stalled connection)",
                replica=self.url,
            )
        if isinstance(
            exc,
            botocore.exceptions.HTTPClientError
            | botocore.exceptions.ResponseStreamingError
            | botocore.exceptions.IncompleteReadError
            | aiohttp.ClientError
            | ConnectionError,
        ):
            return ReplicaUnavailableError(
                f"{where}: the connection to {self.endpoint_label} failed ({_root_cause(exc)})",
                replica=self.url,
            )
        return ReplicaError(f"{where}: {type(exc).__name__}: {exc}", replica=self.url)

    def from_code(self, code: str, status: int, message: str, where: str, action: str) -> ReplicaError:
        detail = f"{code or status}: {message}" if message and message != code else (code or str(status))
        if code == "NoSuchBucket" or (status == 404 and action == "check"):
            return ReplicaNotFoundError(
                f"{where}: bucket {self.settings.bucket!r} does not exist at {self.endpoint_label};"
                " create it or fix the URL",
                replica=self.url,
            )
        if code == "NoSuchKey" or (status == 404 and action == "get"):
            return ObjectNotFoundError(f"{where}: no such object", replica=self.url)
        if code in _AUTH_CODES:
            return ReplicaAuthError(f"{where}: {code}: {_AUTH_CODES[code]}", replica=self.url)
        if status in (401, 403):
            return ReplicaAuthError(
                f"{where}: {detail}: the store refused the credentials (wrong access key or secret, expired"
                " token, or no permission on the bucket)",
                replica=self.url,
            )
        if code in _UNAVAILABLE_CODES or status >= 500 or status in (408, 429):
            return ReplicaUnavailableError(
                f"{where}: {self.endpoint_label} answered {detail}"
                f" (gave up after up to {self.settings.max_attempts} attempts)",
                replica=self.url,
            )
        err = ReplicaError(f"{where}: {self.endpoint_label} rejected the request: {detail}", replica=self.url)
        # The store understood and refused this request: repeating it unchanged cannot succeed.
        err.transient = False
        return err


def _error_code(exc: BaseException | None) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _root_cause(exc: BaseException) -> str:
    """The innermost OS-level reason ("Connection refused"), else ``exc``."""
    reason = str(exc)
    current: BaseException | None = exc
    for _ in range(10):  # chains are short; the bound guards against cycles
        if current is None:
            break
        if isinstance(current, socket.gaierror) and current.strerror:
            reason = current.strerror
        elif isinstance(current, OSError) and current.errno and current.errno > 0:
            # asyncio's strerror is "Connect call failed (addr)"; the errno says why.
            reason = os.strerror(current.errno)
        # botocore keeps the underlying exception in .kwargs["error"], not in __cause__.
        nested = getattr(current, "kwargs", None)
        inner = nested.get("error") if isinstance(nested, dict) else None
        current = inner if isinstance(inner, BaseException) else (current.__cause__ or current.__context__)
    return reason


def _add_content_md5(request: Any, **_: Any) -> None:
    # Some S3-compatible stores require Content-MD5 on DeleteObjects and do not
    # accept botocore's CRC32 header in its place.
    body = request.body
    if isinstance(body, bytes | bytearray) and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = _md5_b64(bytes(body))


def _read_file(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_part(path: str | os.PathLike[str], offset: int, length: int) -> tuple[bytes, str]:
    # One open per part: a cancelled part's thread may still be reading after
    # the upload gave up, so no descriptor is shared (and closed) under it.
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise OSError(f"{os.fspath(path)}: file shrank while being uploaded (offset {offset})")
    return data, _md5_b64(data)


async def _run_all(worker: Callable[[], Coroutine[Any, Any, None]], count: int) -> None:
    """Run ``count`` copies of ``worker`` in a task group: on the first
    failure the others are cancelled, and that failure is raised itself (not
    the exception group), as the caller's ``ReplicaError`` or ``OSError``."""
    first: BaseException | None = None
    try:
        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(worker)
    except BaseExceptionGroup as failures:
        first = _first_failure(failures)
    if first is not None:
        # Raised outside the handler, so that its own cause and context stay
        # what they were (the store's error), not the group.
        raise first


def _first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in ``group`` (nested groups flattened) that is
    not a cancellation, else the first one."""
    flat: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        else:
            flat.append(exc)
    cancelled = anyio.get_cancelled_exc_class()
    return next((e for e in flat if not isinstance(e, cancelled)), flat[0])
