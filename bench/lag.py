"""Replication lag: from a commit to the moment it is restorable from the store.

The app commits a marker row ``markers(id=k)`` every 250 ms and records when
each ``commit()`` returned (:class:`bench.app.MarkerProbe`). The counting
proxy records when each object became readable in the store (the response to
its ``PutObject``/``CompleteMultipartUpload``). Each tool names its objects by
position (sqlrepl: generation and txid; Litestream: txid), so after the run we
know, for every moment, the newest position the store could restore to.

Which markers does a position hold? We ask the tool itself: restore to that
position (``sqlrepl.restore(txid=...)`` / ``litestream restore -txid``) and
read ``max(id)`` from ``markers``. Positions only grow, so one restore per
distinct position is enough, and only positions reached while markers were
being written are tried.

lag(k) = (first time a position holding marker k was readable) - (time the
commit of marker k returned).

Assumes each tool uploads a position only after the positions before it
(both do: sqlrepl uploads in order per replica, Litestream uploads L0 files
in order). Objects that arrive with a position below the newest one
(Litestream's compactions and snapshots, which cover older ranges) are
counted as ``stale_arrivals`` and otherwise ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

__all__ = ["marker_lags"]


def marker_lags(
    markers: Sequence[tuple[int, float]],
    visible: Sequence[tuple[float, Any]],
    max_marker_at: Callable[[Any], int],
) -> dict[str, Any]:
    """``markers``: (id, commit-returned time); ``visible``: (time, position)
    for every object that became readable (position ``None`` = not a data
    object); ``max_marker_at(position)`` restores and returns ``max(id)``.

    Returns per-marker lags (seconds, ``None`` if never restorable in the
    window), the number of restores made, and out-of-order arrivals.
    """
    steps: list[tuple[float, Hashable]] = []
    stale_arrivals = 0
    for t, pos in sorted((v for v in visible if v[1] is not None), key=lambda v: v[0]):
        if not steps or pos > steps[-1][1]:
            steps.append((t, pos))
        elif pos < steps[-1][1]:
            stale_arrivals += 1
    memo: dict[int, int] = {}

    def at(i: int) -> int:
        if i not in memo:
            memo[i] = max_marker_at(steps[i][1])
        return memo[i]

    lags: list[float | None] = []
    i = 0
    for k, t_commit in sorted(markers):
        # A position readable before the commit returned is not counted as
        # holding it (conservative; both sides of that race are milliseconds).
        while i < len(steps) and not (steps[i][0] >= t_commit and at(i) >= k):
            i += 1
        lags.append(steps[i][0] - t_commit if i < len(steps) else None)
    return {"lags": lags, "restores": len(memo), "positions": len(steps), "stale_arrivals": stale_arrivals}
