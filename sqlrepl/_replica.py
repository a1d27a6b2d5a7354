"""The storage boundary: one small async Protocol, one module per backend.

The replication engine and restore only ever talk to a :class:`ReplicaClient`.
Backends are chosen by URL scheme through :func:`open_replica`; the engine
never names a backend, and a backend's third-party library is imported by its
own module only (aiobotocore by ``_replica_s3``).

Keys are ``/``-separated paths relative to the replica's root (the URL's
folder or prefix). Clients make and close their network resources inside the
event loop that uses them: create a client, use it, ``await aclose()`` it, all
in one loop.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ._errors import ConfigError

__all__ = [
    "ObjectInfo",
    "ReplicaClient",
    "RequestStats",
    "open_replica",
    "redact_url",
    "request_kind",
]


@dataclass(frozen=True)
class ObjectInfo:
    """An object in a replica: its key (relative to the replica root) and size."""

    key: str
    size: int


@dataclass
class RequestStats:
    """Counts of requests made to a store, by kind, and bytes moved.

    Kinds are ``PUT`` (including each multipart part), ``GET``, ``LIST``,
    ``DELETE`` and ``HEAD``. ``errors`` counts failed attempts (retried or not),
    ``errors_by_kind`` the same by the kind of request that failed. Updated by
    the client in its event loop; read from any thread (a reader may see one
    counter a request ahead of another, never a torn value).
    """

    requests: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    errors: int = 0
    errors_by_kind: Counter[str] = field(default_factory=Counter)

    def failed(self, kind: str) -> None:
        """Count one failed attempt of a request of ``kind``."""
        self.errors += 1
        self.errors_by_kind[kind] += 1

    def bytes_by_kind(self) -> dict[str, int]:
        """Object bytes moved, by request kind: sent by ``PUT``, received by
        ``GET`` (requests of other kinds move no object bytes)."""
        return {"PUT": self.bytes_up, "GET": self.bytes_down}

    def as_dict(self) -> dict[str, int]:
        out = {k: int(v) for k, v in sorted(self.requests.items())}
        out["bytes_up"] = self.bytes_up
        out["bytes_down"] = self.bytes_down
        out["errors"] = self.errors
        return out


# What a client calls an action in its error messages -> the request kind.
_ACTION_KINDS = {"put": "PUT", "get": "GET", "list": "LIST", "delete": "DELETE", "abort upload": "DELETE"}


def request_kind(action: str) -> str:
    """The request kind (``PUT``, ``GET``...) of a client's ``action``;
    ``HEAD`` for checks and connecting."""
    return _ACTION_KINDS.get(action, "HEAD")


@runtime_checkable
class ReplicaClient(Protocol):
    """What sqlrepl needs from a store. Every backend implements exactly this.

    Errors: methods raise :class:`sqlrepl.ReplicaError` subclasses (never a
    backend's own exception types): ``ObjectNotFoundError`` for a missing key,
    ``ReplicaAuthError``/``ReplicaNotFoundError``/``ReplicaPermissionError``
    for configuration problems, ``ReplicaUnavailableError`` for transient
    failures that outlasted the client's own retries.

    Guarantees: ``put``/``put_file`` are atomic (an object is either absent or
    complete under its key; a reader never sees half of it). ``list`` may
    return a stale view on eventually-consistent stores. Nothing else is
    promised about ordering between keys.
    """

    @property
    def url(self) -> str:
        """The replica URL with any secret removed, for messages and logs."""
        ...

    @property
    def stats(self) -> RequestStats:
        """Requests made and bytes moved by this client so far."""
        ...

    async def check(self) -> None:
        """Verify the replica exists and is reachable with these credentials.

        Raises a clear ``ReplicaError`` subclass otherwise. Creates nothing in
        a store that cannot be created implicitly (an S3 bucket must exist; a
        folder is created).
        """
        ...

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there."""
        ...

    async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Store the file at ``path`` under ``key`` without reading it whole
        into memory (multipart on S3 for large files)."""
        ...

    async def get(self, key: str) -> bytes:
        """Return the whole object at ``key``."""
        ...

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return ``length`` bytes of the object at ``key`` from ``start``
        (fewer only at the end of the object)."""
        ...

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys``; keys already absent are not an error."""
        ...

    async def aclose(self) -> None:
        """Release network resources. The client is unusable afterwards."""
        ...


# scheme -> "module:factory"; factories take (SplitResult, options dict).
_SCHEMES: dict[str, str] = {
    "file": "sqlrepl._replica_file:from_url",
    "memory": "sqlrepl._replica_memory:from_url",
    "s3": "sqlrepl._replica_s3:from_url",
}


def redact_url(url: str) -> str:
    """``url`` without a password or secret-looking query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable replica URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}=***" if _is_secret_option(k) else f"{k}={_without_userinfo(v)}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _without_userinfo(value: str) -> str:
    # An option whose value is itself a URL (``endpoint=http://user:pw@host``)
    # may carry a password too.
    if "://" not in value or "@" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return "***"
    if "@" not in parts.netloc:
        return value
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _is_secret_option(name: str) -> bool:
    name = name.lower()
    return any(word in name for word in ("secret", "token", "password", "key"))


def open_replica(url: str) -> ReplicaClient:
    """Build the client for ``url``, chosen by its scheme.

    Raises :class:`ConfigError` for a URL that is malformed or whose scheme
    is unknown. Performs no I/O: call ``await client.check()`` for that.
    """
    if not isinstance(url, str) or not url:
        raise ConfigError(f"replica URL must be a non-empty string, got {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"replica URL {redact_url(url)!r} is malformed: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        given = f"{parts.scheme}://" if parts.scheme else "(none)"
        raise ConfigError(f"replica URL {redact_url(url)!r}: unknown scheme {given}; use one of {known}")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    module_name, _, func_name = _SCHEMES[scheme].partition(":")
    factory = getattr(importlib.import_module(module_name), func_name)
    client: ReplicaClient = factory(parts, options)
    return client
