"""The per-process registry of replicators (one per database file), and the
process hooks around it: after ``fork()`` the child forgets the parent's
replicators without closing anything; at interpreter exit every replicator
flushes and stops."""

from __future__ import annotations

import asyncio  # noqa: F401 - imported early on purpose, see below
import importlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError
from ._options import Options
from ._replica import redact_url

if TYPE_CHECKING:
    from ._replicator import Replicator

__all__ = ["all_replicators", "get_replicator", "stop_all"]

# Imported here, in whatever thread imports sqlrepl, rather than lazily by
# anyio in the replicator thread: a fork() while that thread is half-way
# through an import would leave the child with half-initialised modules.
# (Before the exit hook below is registered: see there.)
importlib.import_module("anyio._backends._asyncio")

_registry: dict[str, Replicator] = {}
_registry_lock = threading.Lock()
_abandoned: list[Replicator] = []  # (a forked child's: kept, never closed)


def _key(database: str) -> str:
    return os.path.realpath(os.path.abspath(database))


def get_replicator(
    database: str, replicas: Sequence[str] | None = None, options: Options | None = None
) -> Replicator | None:
    """The replicator of ``database`` in this process, created (not started)
    on first use with ``replicas``. ``None`` if there is none and no replicas
    are given. Raises :class:`ConfigError` when ``replicas`` or ``options``
    differ from those of the existing replicator."""
    from ._replicator import Replicator  # (it re-exports this module)

    key = _key(database)
    with _registry_lock:
        rep = _registry.get(key)
        if rep is not None and rep.stopped and replicas:
            rep = None  # a stopped one is replaced by a fresh one
        if rep is None:
            if not replicas:
                return None
            rep = Replicator(key, replicas, options)
            _registry[key] = rep
            return rep
        if replicas and tuple(replicas) != rep.urls:
            raise ConfigError(
                f"{database} is already replicated to {', '.join(redact_url(u) for u in rep.urls)} in this"
                f" process; every connection must name the same replica(s)"
            )
        if options is not None and options != rep.options:
            raise ConfigError(f"{database} is already replicated with other options in this process")
        return rep


def all_replicators() -> list[Replicator]:
    """Every replicator of this process (for metrics: read their ``status``)."""
    with _registry_lock:
        return list(_registry.values())


def stop_all(*, flush: bool = True, timeout: float | None = None) -> None:
    """Stop every replicator of this process (flushing first, by default)."""
    with _registry_lock:
        reps = list(_registry.values())
        _registry.clear()
    # Ask all first, then wait for each: their flushes overlap, and no new
    # thread is needed (none can be started at interpreter shutdown).
    for rep in reps:
        rep.request_stop(flush=flush, timeout=timeout)
    for rep in reps:
        rep.join(timeout)


def _after_fork_in_child() -> None:
    with _registry_lock:
        for rep in _registry.values():
            rep._abandon_after_fork()
            _abandoned.append(rep)
        _registry.clear()


def _at_exit() -> None:
    stop_all(flush=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
# Run before concurrent.futures' exit hook (hooks run last-registered first):
# the flush may need executors (DNS lookups) that the hook shuts down.
_register: Callable[[Callable[[], None]], Any] = (
    getattr(threading, "_register_atexit", None) or __import__("atexit").register
)
_register(_at_exit)
