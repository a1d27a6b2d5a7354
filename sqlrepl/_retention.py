"""The retention pass: now and then, list each healthy replica and delete
what ``_lifecycle.plan_retention`` says no restore inside the retention
window needs (older generations, snapshots, segments covered by merged
ones), with a retired generation's writer records. It reads the shared
state and touches nothing in it but its own request counters; the decisions
are ``_lifecycle``'s, the deletions the replica's.
"""

from __future__ import annotations

import functools
import logging
import time

import anyio

from . import _format
from ._errors import ReplicaError, SyncTimeoutError
from ._lifecycle import group_generations, plan_retention
from ._state import LoopState, Replica

__all__ = ["Retention"]

log = logging.getLogger("sqlrepl")


class Retention:
    """The periodic pass, and the pass a test asks for (:meth:`ask`)."""

    def __init__(self, st: LoopState) -> None:
        self.st = st
        self._asked = 0
        self._done = 0
        self._with_retention = True

    async def loop(self) -> None:
        """Apply retention now and then (never on the hot path)."""
        opts = self.st.options
        if opts.retention is None and opts.segment_retention is None:
            return
        await anyio.sleep(min(60.0, opts.retention_check_interval))
        while True:
            await self.run_pass()
            await anyio.sleep(opts.retention_check_interval)

    async def run_pass(self) -> None:
        st = self.st
        for r in st.replicas:
            if r.last_error is None and r.generation == st.generation:
                try:
                    await self._apply(r)
                except ReplicaError as exc:
                    log.info("retention on %s skipped: %s", r.url, exc)

    async def _apply(self, r: Replica) -> None:
        st = self.st
        opts = st.options
        gens = group_generations(await r.client.list(_format.GENERATIONS))
        plan = plan_retention(
            gens,
            current=st.generation,
            now_ms=int(opts.clock() * 1000),
            retention_ms=None if opts.retention is None else int(opts.retention * 1000),
            segment_retention_ms=None
            if opts.segment_retention is None
            else int(opts.segment_retention * 1000),
            may_retire=None
            if r.watch is None
            else functools.partial(r.watch.may_retire, current=st.generation),
        )
        if plan.problem is not None:
            log.error("replica %s: %s", r.url, plan.problem)
        delete = list(plan.delete)
        if r.watch is not None:  # a retired generation's writer records go with it
            gone = {g.id for g in gens if g.snapshots and all(k.key in plan.delete for k, _ in g.snapshots)}
            delete += [k for g in sorted(gone) for k in r.watch.record_keys(g)]
        for i in range(0, len(delete), 1000):
            await r.client.delete(delete[i : i + 1000])
        if delete:
            log.info("retention removed %d objects from %s", len(delete), r.url)
        if plan.spared:
            log.info(
                "retention on %s spares generation(s) %s: another writer wrote or may still write them",
                r.url,
                ", ".join(plan.spared),
            )

    async def if_asked(self) -> None:
        """Run the retention pass :meth:`ask` asked for (the loop has just
        snapshotted and compacted what was due)."""
        st = self.st
        with st.cond:
            asked, retention = self._asked, self._with_retention
        if asked == self._done:
            return
        if retention:
            await self.run_pass()
        with st.cond:
            self._done = asked
            st.cond.notify_all()

    def ask(self, *, retention: bool, timeout: float) -> None:
        """From another thread: have the loop capture, snapshot and compact
        what is due and (with ``retention``) run one pass; return once done
        (see ``Replicator._maintain_now``)."""
        st = self.st
        with st.cond:
            self._asked += 1
            self._with_retention = retention
            want = self._asked
            st.sync_requests += 1
        st.wake()
        deadline = time.monotonic() + timeout
        try:
            with st.cond:
                while self._done < want:
                    left = deadline - time.monotonic()
                    if left <= 0 or st.role in ("stopped", "failed"):
                        raise SyncTimeoutError(f"maintenance of {st.database} not done ({st.role})")
                    st.cond.wait(min(left, 0.2))
        finally:
            with st.cond:
                st.sync_requests -= 1
