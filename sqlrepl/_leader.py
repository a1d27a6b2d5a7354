"""Leadership: which process replicates a database, and how the loop is woken.

One process at a time holds the ``flock`` in the staging folder and
replicates; the others stand by, watch the lock, and answer ``sync()`` from
the ``progress.json`` the holder publishes. Commits wake the loop through a
pipe (this process) or a datagram on ``nudge.sock`` in the staging folder
(a standby's). This part owns the lock, the pipe, the socket and the
progress file, and touches the shared state only under its lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import anyio

from ._state import LoopState, Replica
from ._watch import WatchView

__all__ = ["Leadership"]

log = logging.getLogger("sqlrepl")


class Leadership:
    """The lock, standby, ``progress.json``, the peer socket, the wake pipe."""

    def __init__(self, st: LoopState) -> None:
        self.st = st
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # Held while writing to the pipe and while closing it: a write after
        # the close could go to whatever file reused the descriptor number.
        self._pipe_lock = threading.Lock()
        self.idle = False  # the loop sleeps: a nudge writes to the pipe
        self.woken = False
        self.nudge_sock: socket.socket | None = None
        self._peer_nudge_at = 0.0
        st.wake = self.wake
        st.publish = self.publish_progress

    @property
    def nudge_path(self) -> str:
        return os.path.join(self.st.staging.root, "nudge.sock")

    # -- any thread --------------------------------------------------------------

    def wake(self) -> None:
        with self._pipe_lock, contextlib.suppress(BlockingIOError, OSError):
            if self.wake_w >= 0:
                os.write(self.wake_w, b"\0")

    def close_pipe(self) -> None:
        """The thread has ended: close the wake pipe (wakes do nothing then)."""
        with self._pipe_lock:
            if self.wake_w >= 0:
                os.close(self.wake_r)
                os.close(self.wake_w)
                self.wake_r = self.wake_w = -1

    def nudge_idle(self) -> None:
        """A commit in this process: wake the loop if it sleeps."""
        if self.idle and not self.woken:
            self.woken = True
            self.wake()

    def nudge_peer(self, force: bool = False) -> None:
        """A commit (``force``: a ``sync()``) in a standby: tell the
        replicating process, at most every 50 ms unless forced."""
        now = time.monotonic()
        if not force and now - self._peer_nudge_at < 0.05:
            return
        self._peer_nudge_at = now
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.sendto(b"s" if force else b"n", self.nudge_path)
            finally:
                sock.close()
        except OSError:
            pass

    # -- the loop ----------------------------------------------------------------

    async def acquire_lock(self, until_room: Callable[..., Awaitable[object]]) -> bool:
        """Become the replicating process, or wait in standby until we can.
        ``until_room`` runs a file operation, waiting out a full disk."""
        st = self.st
        # (Both create files: the first start may meet a full staging disk.)
        await until_room(st.staging.ensure)
        while not st.stop.is_set():
            if await until_room(st.staging.try_lock):
                return True
            if st.stop.is_set():
                break
            if st.role != "standby":
                log.info("%s is replicated by another process; standing by", st.database)
                with st.cond:
                    st.role = "standby"
            await self.sleep(0.25)
            with st.cond:
                self.read_progress_locked()
                st.cond.notify_all()
        return False

    async def sleep(self, seconds: float) -> None:
        """Sleep until woken (pipe or peer socket) or ``seconds`` pass."""
        self.idle = True
        if not self.woken:
            with anyio.move_on_after(max(0.0, seconds)):
                await self.wait_wake()
        self.idle = False
        self.woken = False
        self.drain_wake()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (a retry's backoff); only stop ends it early."""
        with anyio.move_on_after(seconds):
            while not self.st.stop.is_set():
                await self.wait_wake()
                self.drain_wake()

    async def sleep_until(self, when: float) -> None:
        """Sleep until ``when``; only a sync, a snapshot request or stop
        (not a plain nudge) ends it early."""
        st = self.st
        with anyio.move_on_after(max(0.0, when - time.monotonic())):
            while True:
                await self.wait_wake()
                self.drain_wake()
                with st.cond:
                    if st.sync_requests or st.snapshot_wanted or st.peer_sync or st.stop.is_set():
                        return

    async def wait_wake(self) -> None:
        """Return when the wake pipe or the peers' nudge socket is readable."""
        sock = self.nudge_sock
        if sock is None:
            await anyio.wait_readable(self.wake_r)
            return
        async with anyio.create_task_group() as tg:

            async def wait(fd: int) -> None:
                await anyio.wait_readable(fd)
                tg.cancel_scope.cancel()

            tg.start_soon(wait, self.wake_r)
            tg.start_soon(wait, sock.fileno())

    def drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        sock = self.nudge_sock
        if sock is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            while True:
                if sock.recv(64) == b"s":
                    # A peer process's sync(): look now and record it.
                    self.st.peer_sync = True

    def open_nudge_socket(self) -> None:
        path = self.nudge_path
        with contextlib.suppress(OSError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            sock.setblocking(False)
        except OSError as exc:  # a path too long for AF_UNIX: peers fall back to polling
            sock.close()
            log.debug("no nudge socket at %s: %s", path, exc)
            return
        self.nudge_sock = sock

    def close(self) -> None:
        """Close the socket and release the lock (the loop is ending)."""
        if self.nudge_sock is not None:
            self.nudge_sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.nudge_path)
        self.st.staging.unlock()

    def publish_progress(self) -> None:
        """Write ``progress.json`` for standby processes' ``sync()``."""
        st = self.st
        checked_at, gen, txid = st.checked
        data = {
            "pid": os.getpid(),
            "checked_ns": checked_at,
            "generation": gen,
            "txid": txid,
            "replicas": [
                {
                    "url": r.url,
                    "generation": r.generation,
                    "txid": r.txid,
                    "error": r.last_error,
                    "checked_at": r.view.checked_at,
                    "wipes": r.view.wipes,
                    "foreign_writers": list(r.view.foreign_writers),
                }
                for r in st.replicas
            ],
        }
        path = os.path.join(st.staging.root, "progress.json")
        tmp = path + f".{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot publish progress: %s", exc)

    def read_progress_locked(self) -> None:
        """Standby: adopt the replicating process's published progress."""
        st = self.st
        try:
            with open(os.path.join(st.staging.root, "progress.json")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return
        st.checked = (int(data.get("checked_ns", 0)), data.get("generation"), int(data.get("txid", 0)))
        by_url = {r["url"]: r for r in data.get("replicas", [])}
        reps = []
        for client in st.clients:
            got = by_url.get(client.url, {})
            reps.append(
                Replica(
                    url=client.url,
                    client=client,
                    state_path="",
                    generation=got.get("generation"),
                    txid=int(got.get("txid", 0)),
                    last_error=got.get("error"),
                    seen=WatchView(
                        got.get("checked_at"), int(got.get("wipes", 0)), tuple(got.get("foreign_writers", ()))
                    ),
                )
            )
        st.replicas = reps
