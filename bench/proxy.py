"""A counting HTTP proxy on loopback, in front of the S3 server.

Both replicators under test (Litestream and sqlrepl) talk to the store through
this one proxy, so their request counts, bytes and object-visibility times are
measured by the same code at the same place, independent of what either tool
says about itself.

Each client connection is relayed to the upstream server by two independent
pumps (client->server and server->client) that parse just enough HTTP/1.1 to
find message boundaries (``Content-Length``, ``chunked``, or close-delimited
responses; ``1xx`` interim answers such as ``100 Continue`` are passed
through), so pipelined, keep-alive and ``Expect: 100-continue`` requests are
all relayed byte for byte. Every completed exchange is recorded as an
:class:`Exchange` with the monotonic time at which the full response had
arrived from the server: for a successful ``PutObject`` or
``CompleteMultipartUpload`` that is the moment the object became readable.

Not handled: HTTP/2, TLS, ``Upgrade``. A malformed message closes the
connection (the client retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["CountingProxy", "Exchange", "classify", "summarize"]

_CHUNK = 1 << 20
_HEAD_LIMIT = 1 << 20


@dataclass
class Exchange:
    """One request and its final response, as relayed."""

    method: str
    target: str
    started: float  # monotonic, request head received
    done: float = 0.0  # monotonic, full response received from the server
    status: int = 0
    bytes_up: int = 0  # request body bytes (as sent on the wire)
    bytes_down: int = 0  # response body bytes

    @property
    def kind(self) -> str:
        return classify(self.method, self.target)

    @property
    def bucket_key(self) -> tuple[str, str]:
        """``(bucket, key)`` of a path-style target; key is "" for bucket-level requests."""
        path = unquote(urlsplit(self.target).path).lstrip("/")
        bucket, _, key = path.partition("/")
        return bucket, key

    @property
    def made_visible(self) -> str | None:
        """The key this exchange made readable (a successful single PUT or a
        completed multipart upload), else ``None``."""
        if not 200 <= self.status < 300:
            return None
        query = parse_qs(urlsplit(self.target).query, keep_blank_values=True)
        if self.method == "PUT" and "partNumber" not in query and "uploadId" not in query:
            return self.bucket_key[1] or None
        if self.method == "POST" and "uploadId" in query:
            return self.bucket_key[1] or None
        return None


def classify(method: str, target: str) -> str:
    """The S3 pricing class of a request: PUT, GET, LIST, DELETE, HEAD or OTHER.

    Multipart create/part/complete are PUT-class (as S3 bills them, and as
    sqlrepl's own counters count them), DeleteObjects and AbortMultipartUpload
    are DELETE.
    """
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    path = unquote(parts.path).lstrip("/")
    bucket_level = "/" not in path or (path.endswith("/") and path.count("/") == 1)
    if method == "PUT":
        return "PUT"
    if method == "POST":
        if "delete" in query:
            return "DELETE"
        if "uploads" in query or "uploadId" in query:
            return "PUT"
        return "OTHER"
    if method == "GET":
        if bucket_level:
            if "list-type" in query or "prefix" in query or not query:
                return "LIST"
            return "OTHER"
        return "GET"
    if method == "HEAD":
        return "HEAD"
    if method == "DELETE":
        return "DELETE"
    return "OTHER"


def summarize(exchanges: Iterable[Exchange]) -> dict[str, int]:
    """Counts by kind plus ``bytes_up``, ``bytes_down`` and ``errors`` (status >= 400)."""
    counts: Counter[str] = Counter()
    up = down = errors = 0
    for ex in exchanges:
        counts[ex.kind] += 1
        up += ex.bytes_up
        down += ex.bytes_down
        errors += ex.status >= 400 or ex.status == 0
    out = {k: counts.get(k, 0) for k in ("PUT", "GET", "LIST", "DELETE", "HEAD", "OTHER")}
    out.update(bytes_up=up, bytes_down=down, errors=errors)
    return out


class _Malformed(Exception):
    pass


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _Malformed(line)
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _relay_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    headers: dict[str, str],
    *,
    until_eof: bool,
) -> int:
    """Relay one message body; return its length (payload bytes only for chunked)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            writer.write(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = await reader.readuntil(b"\r\n")
                    writer.write(trailer)
                    if trailer == b"\r\n":
                        return total
            total += size
            await _relay_exact(reader, writer, size + 2)
    if "content-length" in headers:
        size = int(headers["content-length"])
        await _relay_exact(reader, writer, size)
        return size
    if not until_eof:
        return 0
    total = 0
    while True:
        data = await reader.read(_CHUNK)
        if not data:
            return total
        total += len(data)
        writer.write(data)
        await writer.drain()


async def _relay_exact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    left = size
    while left:
        data = await reader.read(min(left, _CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(data)
        writer.write(data)
        if writer.transport.get_write_buffer_size() > 4 * _CHUNK:
            await writer.drain()
    await writer.drain()


class CountingProxy:
    """Relay ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` and record
    every exchange. Runs its own event loop in a daemon thread.

    ``exchanges_between(t0, t1)`` returns the exchanges whose response
    completed in ``[t0, t1]`` (monotonic seconds).
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._lock = threading.Lock()
        self._log: list[Exchange] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exchanges_between(self, t0: float, t1: float) -> list[Exchange]:
        with self._lock:
            return [ex for ex in self._log if t0 <= ex.done <= t1]

    def clear(self) -> None:
        with self._lock:
            self._log.clear()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="bench-proxy", daemon=True)
        self._thread.start()
        started.wait(10)
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def _run(self, started: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=_HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> CountingProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- relaying ---------------------------------------------------------------

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream, limit=_HEAD_LIMIT)
            pending: deque[Exchange] = deque()
            up = asyncio.ensure_future(self._requests(client_r, server_w, pending))
            down = asyncio.ensure_future(self._responses(server_r, client_w, pending))
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up in done and up.exception() is None and pending:
                # The client finished sending; let the last responses through.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(down), 120)
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        except OSError:
            pass
        finally:
            self._tasks.discard(task)
            for w in (client_w, server_w):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: deque[Exchange]
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            line, headers = _parse_head(head)
            method, target, _version = line.split(" ", 2)
            ex = Exchange(method=method, target=target, started=time.monotonic())
            pending.append(ex)
            writer.write(head)
            ex.bytes_up = await _relay_body(reader, writer, headers, until_eof=False)
            await writer.drain()

    async def _responses(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: deque[Exchange]
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            line, headers = _parse_head(head)
            status = int(line.split(" ", 2)[1])
            writer.write(head)
            if 100 <= status < 200:
                await writer.drain()
                continue
            if not pending:
                raise _Malformed("response without a request")
            ex = pending.popleft()
            ex.status = status
            if ex.method == "HEAD" or status in (204, 304):
                ex.bytes_down = 0
            else:
                ex.bytes_down = await _relay_body(reader, writer, headers, until_eof=True)
            await writer.drain()
            ex.done = time.monotonic()
            with self._lock:
                self._log.append(ex)
