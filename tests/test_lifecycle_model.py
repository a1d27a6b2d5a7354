"""A model-based test of the replica's lifecycle.

Hypothesis drives a real :class:`Replicator` (folder replica, a wall clock
the test moves) through random sequences of commits, the clock moving,
snapshots and compactions (due by that clock), retention passes, and
crashes (a stop without flush, then a new replicator); the options are
drawn per sequence. After steps it restores "latest" and points (txids)
inside the retention window and compares them with the recorded history:
"latest" must be every acknowledged commit, and a point the newest state
at or before it, exact while its merged segment is younger than
``segment_retention``.

CI runs 3 sequences of 30 steps. A long run: ``SQLREPL_MODEL_EXAMPLES=2000
SQLREPL_MODEL_STEPS=60`` and pytest's ``--timeout 0`` (the whole run is one
test), with ``SQLREPL_MODEL_REPORT=path`` to write the figures (sequences,
steps, restores checked) as JSON after each sequence.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass

import pytest
from helpers import FakeClock, fast_options, file_url, make_db
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import sqlrepl
from sqlrepl._replicator import Replicator

EXAMPLES = int(os.environ.get("SQLREPL_MODEL_EXAMPLES", "3"))
STEPS = int(os.environ.get("SQLREPL_MODEL_STEPS", "30"))
REPORT = os.environ.get("SQLREPL_MODEL_REPORT")
_figures = {"sequences": 0, "steps": 0, "latest_restores": 0, "point_restores": 0, "crashes": 0}


@dataclass(frozen=True)
class _Ack:
    """A ``sync()`` that returned: every commit so far is in the replica."""

    txid: int
    rows: int


class LifecycleModel(RuleBasedStateMachine):
    """One database, one folder replica, one moved clock; see the module."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="sqlrepl-model-")
        self.db = os.path.join(self.dir, "app.db")
        self.url = file_url(os.path.join(self.dir, "replica"))
        self.clock = FakeClock()
        make_db(self.db)
        self.conn = sqlite3.connect(self.db)
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self.committed_at: list[float] = [0.0]  # row i was committed at committed_at[i]
        self.acks: list[_Ack] = []
        self.rep: Replicator | None = None
        self.restores = 0

    @initialize(
        # Seconds, against clock steps of 0.5-3 s: a sequence lives through
        # several intervals of each.
        compaction=st.sampled_from([5.0, 3.0, 9.0]),
        segment_retention=st.sampled_from([0.0, 2.0]),
        retention=st.sampled_from([4.0, 8.0]),
        snapshot_interval=st.sampled_from([6.0, 12.0]),
    )
    def start(
        self, compaction: float, segment_retention: float, retention: float, snapshot_interval: float
    ) -> None:
        self.retention, self.segment_retention = retention, segment_retention
        self.options = fast_options(
            clock=self.clock,
            compaction_interval=compaction,
            segment_retention=segment_retention,
            retention=retention,
            retention_check_interval=3600,  # passes run when the model says
            snapshot_interval=snapshot_interval,
        )
        self._open()
        self._ack()

    def _open(self) -> None:
        self.rep = Replicator(self.db, [self.url], self.options)
        self.rep.start()

    @property
    def rows(self) -> int:
        return len(self.committed_at) - 1

    def _ack(self) -> _Ack:
        """``sync()``, then wait until what was uploaded has left the queue
        (into the compaction window or away), so that what happens next by
        the clock does not depend on how fast the uploads were."""
        assert self.rep is not None
        self.rep.sync(timeout=120)
        deadline = time.monotonic() + 120
        while self.rep.status.staged_objects:
            assert time.monotonic() < deadline, self.rep.status
            time.sleep(0.005)
        ack = _Ack(self.rep.status.txid, self.rows)
        if self.acks:
            assert ack.txid >= self.acks[-1].txid, "txids went backwards"
        self.acks.append(ack)
        return ack

    def _insert(self, n: int) -> None:
        for _ in range(n):
            self.conn.execute("INSERT INTO t(id, v) VALUES (?, randomblob(200))", (self.rows + 1,))
            self.conn.commit()
            self.committed_at.append(self.clock())

    # -- what happens to the database ---------------------------------------------
    # Every step ends with the replica in sync, and the clock moves only
    # between steps (in small steps against the intervals, as a real one
    # does, so that snapshots and compactions fall at different moments):
    # hypothesis replays a sequence to shrink it, and the replica's history
    # should then depend little on thread timing. (A crash's uncaptured
    # commits still may: a shrink can then end in a "flaky" report, after
    # the failure it found.)

    @rule(n=st.integers(1, 4), dt=st.sampled_from([1.0, 0.5, 2.0, 0.0]), pick=st.integers(0, 255))
    def add_commits(self, n: int, dt: float, pick: int) -> None:
        """``n`` commits, acknowledged by ``sync()``; then the clock moves
        ``dt``, a snapshot or compaction runs if due, and a retention pass,
        after which the restores are checked."""
        assert self.rep is not None
        self._insert(n)
        self._ack()
        if dt:
            self.clock.advance(dt)
            self.rep._maintain_now(retention=True, timeout=120)
            self._ack()
            self._check(pick)
        _figures["steps"] += 1

    @rule(n=st.integers(0, 3), pick=st.integers(0, 255))
    def crash(self, n: int, pick: int) -> None:
        """``n`` commits, then the replicator stops at once (without
        flushing) and a new one takes over from the staging folder; then
        the restores are checked."""
        assert self.rep is not None
        self._insert(n)
        self.rep.stop(flush=False)
        self._open()
        self._ack()
        self._check(pick)
        _figures["steps"] += 1
        _figures["crashes"] += 1

    # -- what a restore must give --------------------------------------------------

    def _restore(self, **kwargs: object) -> tuple[sqlrepl.RestoreResult, int]:
        self.restores += 1
        out = os.path.join(self.dir, f"restored-{self.restores}.db")
        result = sqlrepl.restore(out, self.url, **kwargs)  # type: ignore[arg-type]
        assert result is not None
        conn = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
        try:
            count, top = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM t").fetchone()
        finally:
            conn.close()
        os.unlink(out)
        assert count == top, "the restored rows are not a prefix of the history"
        return result, int(count)

    def _in_window(self, ack: _Ack) -> bool:
        """The state ``ack`` recorded was live at or after the retention
        horizon (the next commit came after it)."""
        horizon = self.clock() - self.retention
        return ack.rows == self.rows or self.committed_at[ack.rows + 1] > horizon + 0.01

    def _check(self, pick: int) -> None:
        """Latest is exactly every acknowledged commit; a txid inside the
        retention window restores the newest state at or before it, and
        exactly it while its segments are young."""
        ack = self.acks[-1]
        result, rows = self._restore()
        assert (result.txid, rows) == (ack.txid, ack.rows)
        _figures["latest_restores"] += 1
        # (Drawn before looking at the history, whose txids depend on timing:
        # hypothesis replays a sequence by its draws.)
        window = [a for a in self.acks if self._in_window(a)]
        target = window[pick % len(window)]
        result, rows = self._restore(txid=target.txid)
        assert result.txid <= target.txid
        txids = [a.txid for a in self.acks]
        lo = self.acks[bisect.bisect_right(txids, result.txid) - 1]
        hi = self.acks[bisect.bisect_left(txids, result.txid)]
        assert lo.rows <= rows <= hi.rows, (result.txid, rows, lo, hi)
        recent = (
            target.rows >= 1 and self.committed_at[target.rows] > self.clock() - self.segment_retention + 0.01
        )
        if recent:
            assert (result.txid, rows) == (target.txid, target.rows)
        _figures["point_restores"] += 1

    def teardown(self) -> None:
        _figures["sequences"] += 1
        if self.rep is not None:
            self.rep.stop(flush=False)
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if REPORT:
            with open(REPORT, "w") as f:
                json.dump(_figures, f)


LifecycleModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.slow
class TestLifecycleModel(LifecycleModel.TestCase):
    """Random lifecycles of a real replicator keep every acknowledged commit
    and every point in the retention window restorable."""
