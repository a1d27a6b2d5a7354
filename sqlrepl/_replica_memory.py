"""``memory://name``: a replica held in this process's memory.

For unit tests and demos. Every client opened with the same name shares one
store, so a test can replicate and restore through it. A store can be told to
fail, to test error paths: :func:`fail_next`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from urllib.parse import SplitResult

import anyio
import anyio.lowlevel

from ._errors import ConfigError, ObjectNotFoundError, ReplicaError, ReplicaUnavailableError
from ._replica import ObjectInfo, RequestStats

__all__ = ["MemoryReplicaClient", "fail_next", "from_url", "store"]

_lock = threading.Lock()
_stores: dict[str, dict[str, bytes]] = {}
_failures: dict[str, list[ReplicaError]] = {}


def store(name: str) -> dict[str, bytes]:
    """The objects of the memory store ``name`` (created empty if absent)."""
    with _lock:
        return _stores.setdefault(name, {})


def fail_next(name: str, count: int = 1, error: ReplicaError | None = None) -> None:
    """Make the next ``count`` operations on store ``name`` raise ``error``."""
    err = error or ReplicaUnavailableError(f"memory://{name}: injected failure", replica=f"memory://{name}")
    with _lock:
        _failures.setdefault(name, []).extend([err] * count)


def from_url(parts: SplitResult, options: dict[str, str]) -> MemoryReplicaClient:
    name = parts.netloc + parts.path
    if not name:
        raise ConfigError("memory replica URL needs a name, like memory://test")
    if options:
        raise ConfigError(f"memory replica URL: unknown option(s) {', '.join(sorted(options))}")
    return MemoryReplicaClient(name)


class MemoryReplicaClient:
    """A replica in process memory, shared by name. See the module docstring."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._objects = store(name)
        self._stats = RequestStats()

    @property
    def url(self) -> str:
        return f"memory://{self._name}"

    @property
    def stats(self) -> RequestStats:
        return self._stats

    async def _op(self, kind: str, count: int = 1) -> None:
        await anyio.lowlevel.checkpoint()
        self._stats.requests[kind] += count
        with _lock:
            pending = _failures.get(self._name)
            err = pending.pop(0) if pending else None
        if err is not None:
            self._stats.failed(kind)
            raise err

    async def check(self) -> None:
        await self._op("HEAD")

    async def put(self, key: str, data: bytes) -> None:
        await self._op("PUT")
        with _lock:
            self._objects[key] = bytes(data)
        self._stats.bytes_up += len(data)

    async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        data = await anyio.Path(path).read_bytes()
        await self.put(key, data)

    def _read(self, key: str) -> bytes:
        with _lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ObjectNotFoundError(f"get {self.url}/{key}: no such object", replica=self.url) from None

    async def get(self, key: str) -> bytes:
        await self._op("GET")
        data = self._read(key)
        self._stats.bytes_down += len(data)
        return data

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        await self._op("GET")
        data = self._read(key)[start : start + length]
        self._stats.bytes_down += len(data)
        return data

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        await self._op("LIST")
        with _lock:
            items = [ObjectInfo(k, len(v)) for k, v in self._objects.items() if k.startswith(prefix)]
        return sorted(items, key=lambda o: o.key)

    async def delete(self, keys: Sequence[str]) -> None:
        await self._op("DELETE", len(keys))
        with _lock:
            for key in keys:
                self._objects.pop(key, None)

    async def aclose(self) -> None:
        return None
