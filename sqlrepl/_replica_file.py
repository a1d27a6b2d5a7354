"""``file:///abs/path``: a replica in a local or mounted folder.

Each key is a file under the root folder. Writes are atomic and durable:
write a temporary file beside the target, fsync it, rename it over the
target, fsync the folder.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Sequence
from typing import Any
from urllib.parse import SplitResult, unquote

import anyio.to_thread

from ._errors import (
    ConfigError,
    ObjectNotFoundError,
    ReplicaError,
    ReplicaNotFoundError,
    ReplicaPermissionError,
    ReplicaUnavailableError,
)
from ._progress import upload_sent
from ._replica import ObjectInfo, RequestStats, request_kind
from ._staging import fsync_dir

__all__ = ["FileReplicaClient", "from_url"]

_TMP_PREFIX = ".sqlrepl-tmp-"
_COPY_CHUNK = 1 << 20


def from_url(parts: SplitResult, options: dict[str, str]) -> FileReplicaClient:
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(
            f"file replica URL file://{parts.netloc}{parts.path}: a host is not allowed;"
            " write file:///absolute/path (three slashes)"
        )
    path = unquote(parts.path)
    if not path or not os.path.isabs(path):
        raise ConfigError(
            f"file replica URL {parts.geturl()!r}: the path must be absolute, like file:///var/backups/app"
        )
    if options:
        raise ConfigError(
            f"file replica URL {parts.geturl()!r}: unknown option(s) {', '.join(sorted(options))}"
        )
    return FileReplicaClient(path)


class FileReplicaClient:
    """A replica stored as files under ``root``. See the module docstring."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = os.path.abspath(os.fspath(root))
        self._stats = RequestStats()

    @property
    def url(self) -> str:
        return "file://" + self._root

    @property
    def stats(self) -> RequestStats:
        return self._stats

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid replica key {key!r}")
        return os.path.join(self._root, *key.split("/"))

    def _error(self, action: str, key: str, exc: OSError) -> ReplicaError:
        self._stats.failed(request_kind(action))
        where = f"{self.url}/{key}" if key else self.url
        if isinstance(exc, FileNotFoundError):
            return ObjectNotFoundError(f"{action} {where}: no such object", replica=self.url)
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ReplicaPermissionError(
                f"{action} {where}: permission denied ({exc.strerror}); make the folder writable"
                " by this process or choose another replica folder",
                replica=self.url,
            )
        if exc.errno == errno.ENOSPC:
            return ReplicaUnavailableError(
                f"{action} {where}: no space left on the replica's device; free space there",
                replica=self.url,
            )
        return ReplicaUnavailableError(f"{action} {where}: {exc.strerror or exc}", replica=self.url)

    async def check(self) -> None:
        def run() -> None:
            os.makedirs(self._root, exist_ok=True)
            if not os.path.isdir(self._root):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", self._root)
            probe = os.path.join(self._root, _TMP_PREFIX + "check-" + secrets.token_hex(4))
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            os.unlink(probe)

        try:
            await anyio.to_thread.run_sync(run)
        except NotADirectoryError as exc:
            raise ReplicaNotFoundError(
                f"replica {self.url}: {exc.filename} exists and is not a folder", replica=self.url
            ) from exc
        except OSError as exc:
            raise self._error("check replica", "", exc) from exc

    def _write_atomic(self, key: str, write: Any) -> int:
        path = self._path(key)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, _TMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            size = write(fd)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        fsync_dir(folder)
        return int(size)

    async def put(self, key: str, data: bytes) -> None:
        def write(fd: int) -> int:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            return len(data)

        self._stats.requests["PUT"] += 1
        try:
            self._stats.bytes_up += await anyio.to_thread.run_sync(self._write_atomic, key, write)
        except OSError as exc:
            raise self._error("put", key, exc) from exc

    async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        def write(fd: int) -> int:
            total = 0
            with open(path, "rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    total += len(chunk)
                    upload_sent(len(chunk))  # progress hook: a chunk is written
            return total

        self._stats.requests["PUT"] += 1
        try:
            self._stats.bytes_up += await anyio.to_thread.run_sync(self._write_atomic, key, write)
        except OSError as exc:
            raise self._error("put", key, exc) from exc

    async def get(self, key: str) -> bytes:
        return await self._read(key, 0, None)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        return await self._read(key, start, length)

    async def _read(self, key: str, start: int, length: int | None) -> bytes:
        def read() -> bytes:
            with open(self._path(key), "rb") as f:
                return f.read() if length is None else os.pread(f.fileno(), length, start)

        self._stats.requests["GET"] += 1
        try:
            data = await anyio.to_thread.run_sync(read)
        except OSError as exc:
            raise self._error("get", key, exc) from exc
        self._stats.bytes_down += len(data)
        return data

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        def walk() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            # Walk only the deepest folder the prefix names completely.
            base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
            top = os.path.join(self._root, *base.split("/")) if base else self._root
            for folder, dirs, files in os.walk(top):
                dirs.sort()
                rel = os.path.relpath(folder, self._root)
                rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                for name in files:
                    key = rel + name
                    if name.startswith(_TMP_PREFIX) or not key.startswith(prefix):
                        continue
                    try:
                        size = os.stat(os.path.join(folder, name)).st_size
                    except FileNotFoundError:
                        continue
                    out.append(ObjectInfo(key, size))
            out.sort(key=lambda o: o.key)
            return out

        self._stats.requests["LIST"] += 1
        try:
            st = await anyio.to_thread.run_sync(os.stat, self._root)
        except FileNotFoundError:
            return []  # nothing replicated here yet
        except NotADirectoryError as exc:
            raise ReplicaNotFoundError(
                f"replica {self.url}: a part of the path is a file, not a folder", replica=self.url
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise ReplicaNotFoundError(f"replica {self.url} is a file, not a folder", replica=self.url)
        try:
            return await anyio.to_thread.run_sync(walk)
        except OSError as exc:
            raise self._error("list", prefix, exc) from exc

    async def delete(self, keys: Sequence[str]) -> None:
        def remove() -> None:
            folders = set()
            for key in keys:
                path = self._path(key)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                folders.add(os.path.dirname(path))
            for folder in folders:
                fsync_dir(folder)

        self._stats.requests["DELETE"] += len(keys)
        try:
            await anyio.to_thread.run_sync(remove)
        except OSError as exc:
            raise self._error("delete", keys[0] if keys else "", exc) from exc

    async def aclose(self) -> None:
        return None
