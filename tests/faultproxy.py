"""A loopback TCP proxy that injects HTTP faults in front of an S3 server.

It runs its own asyncio loop in a daemon thread, so synchronous and async
tests alike can use it::

    with FaultProxy("127.0.0.1", server.s3_port) as proxy:
        proxy.inject("slowdown", times=2, method="PUT")
        ...  # point the client at proxy.endpoint
        assert proxy.counts["slowdown"] == 2

Faults are queued; each applies to the next ``times`` requests matching its
``method`` and ``path_contains`` filters, then the proxy passes requests
through again. Kinds:

- ``"http500"``: answer ``500 InternalError`` (an S3 XML error) and close.
- ``"slowdown"``: answer ``503 SlowDown`` and close.
- ``"no_such_upload"``: answer ``404 NoSuchUpload`` and close (a store that
  forgets a multipart upload once it is complete).
- ``"stall"``: hold the request ``seconds``, then forward it (a server that is
  very slow to answer; a client with a shorter read timeout gives up first).
- ``"hold"``: hold the request until :meth:`FaultProxy.release`, then forward
  it (a server that stops answering for as long as the test needs, however
  slow the machine); ``held`` counts the requests waiting there.
- ``"cut_request"``: read ``after_bytes`` of the request body, then reset the
  connection (the server never sees the request).
- ``"cut_response"``: forward the request, pass ``after_bytes`` more response
  bytes, then reset the connection (the server did handle the request). If
  the response is shorter, the cut falls in a later response on the same
  connection.

``counts`` has one entry per kind applied (``cut_response`` when the cut
happens), plus ``"passed"`` for requests forwarded untouched and
``"requests"`` for all. The proxy understands
HTTP/1.1 requests framed by ``Content-Length`` (what botocore sends); a
chunked request body makes it pass the rest of that connection through raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

__all__ = ["FAULT_KINDS", "FaultProxy"]

FAULT_KINDS = ("http500", "slowdown", "no_such_upload", "stall", "hold", "cut_request", "cut_response")

_ERRORS = {
    "http500": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "no_such_upload": (404, "Not Found", "NoSuchUpload", "The specified multipart upload does not exist."),
}


@dataclass
class _Fault:
    kind: str
    times: int
    method: str | None
    path_contains: str | None
    seconds: float
    after_bytes: int

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_contains is None or self.path_contains in target
        )


class FaultProxy:
    """Proxy ``127.0.0.1:port`` to ``upstream_host:upstream_port``. See the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.counts: Counter[str] = Counter()
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._held = 0
        self._released: asyncio.Event | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control (any thread) -------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        times: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        seconds: float = 5.0,
        after_bytes: int = 512,
    ) -> None:
        """Queue ``kind`` for the next ``times`` matching requests."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(_Fault(kind, times, method, path_contains, seconds, after_bytes))

    def clear(self) -> None:
        """Drop every queued fault (counts are kept)."""
        with self._lock:
            self._faults.clear()

    def release(self) -> None:
        """Drop every queued ``hold`` and forward the requests held so far."""
        with self._lock:
            self._faults = [f for f in self._faults if f.kind != "hold"]
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._release_held(), self._loop).result(10)

    async def _release_held(self) -> None:
        # Held requests wait on this event; later holds on a new one.
        released, self._released = self._released, asyncio.Event()
        if released is not None:
            released.set()

    @property
    def held(self) -> int:
        """How many requests a ``hold`` is holding now."""
        with self._lock:
            return self._held

    @property
    def pending(self) -> int:
        """How many fault applications are still queued."""
        with self._lock:
            return sum(f.times for f in self._faults)

    def _take(self, method: str, target: str) -> _Fault | None:
        with self._lock:
            self.counts["requests"] += 1
            for fault in self._faults:
                if fault.matches(method, target):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    if fault.kind != "cut_response":  # counted by the pump when it cuts
                        self.counts[fault.kind] += 1
                    return fault
            self.counts["passed"] += 1
            return None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Listen on a free loopback port (in a new thread) and return."""
        if self._thread is not None:
            return
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(10)

    def _run(self, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        self._loop.run_forever()

    async def _listen(self) -> None:
        self._released = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listener and every connection, stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- proxying -------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(task)
            # A FIN after whatever was written, so an error response arrives whole.
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        pump: asyncio.Task[None] | None = None
        # The response pump cuts the connection after this many bytes when a
        # cut_response fault is armed; None means pass everything.
        budget: list[int | None] = [None]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, headers = _parse_head(head)
                fault = self._take(method, target)
                length = int(headers.get("content-length", "0") or 0)
                chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                expects = headers.get("expect", "").lower() == "100-continue"

                if fault is not None and fault.kind in _ERRORS:
                    await self._drain_body(reader, writer, length, expects)
                    writer.write(_error_response(*_ERRORS[fault.kind], target))
                    await writer.drain()
                    return
                if fault is not None and fault.kind == "cut_request":
                    if expects:
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await reader.readexactly(min(length, fault.after_bytes))
                    _abort(writer)
                    return
                if fault is not None and fault.kind == "stall":
                    await asyncio.sleep(fault.seconds)
                if fault is not None and fault.kind == "hold":
                    await self._hold()

                if upstream is None:
                    upstream = await asyncio.open_connection(*self.upstream)
                    pump = asyncio.create_task(self._pump(upstream[0], writer, budget))
                    self._conns.add(pump)
                    pump.add_done_callback(self._conns.discard)
                if fault is not None and fault.kind == "cut_response":
                    budget[0] = fault.after_bytes
                upstream[1].write(head)
                if chunked:
                    await _copy_until_eof(reader, upstream[1])
                    return
                await _copy_exact(reader, upstream[1], length)
                assert pump is not None
                if pump.done():
                    return
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
            if upstream is not None:
                _abort(upstream[1])

    async def _hold(self) -> None:
        released = self._released
        assert released is not None
        with self._lock:
            self._held += 1
        try:
            await released.wait()
        finally:
            with self._lock:
                self._held -= 1

    async def _drain_body(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int, expects: bool
    ) -> None:
        # Read the body before answering: closing a socket with unread data
        # sends a reset, and the client might never see the error response.
        if expects:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        remaining = length
        while remaining:
            remaining -= len(await reader.read(min(remaining, 1 << 16))) or remaining

    async def _pump(
        self, source: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: list[int | None]
    ) -> None:
        try:
            while data := await source.read(1 << 16):
                if budget[0] is not None:
                    if len(data) >= budget[0]:
                        writer.write(data[: budget[0]])
                        await writer.drain()
                        with self._lock:
                            self.counts["cut_response"] += 1
                        _abort(writer)
                        return
                    budget[0] -= len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            _abort(writer)
            return
        # The server closed its side: pass the close on after the data.
        if not writer.is_closing():
            writer.close()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _error_response(status: int, reason: str, code: str, message: str, target: str) -> bytes:
    resource = target.split("?", 1)[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


async def _copy_exact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int) -> None:
    while length > 0:
        data = await reader.read(min(length, 1 << 16))
        if not data:
            raise asyncio.IncompleteReadError(b"", length)
        writer.write(data)
        await writer.drain()
        length -= len(data)


async def _copy_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    # A reset (SO_LINGER 0) rather than a FIN: a "cut" connection must look
    # like a crash to the peer, not like an orderly end of the response.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
