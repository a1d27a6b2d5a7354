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

import bisect
import itertools
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
    window), the number of restores made, out-of-order arrivals, and how many
    markers' commits returned after the next marker's.
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

    # Each marker on its own: markers are numbered when they fall due, but a
    # commit can return after a later-numbered one (it waited longer for the
    # write lock), so commit times need not grow with the number. (A single
    # forward scan over both once made every marker after such a late one
    # wait for the position that held the late one: lags of 2 s that were
    # not there.) Positions only grow, so the first position holding marker
    # k is found by bisection among those readable after its commit.
    times = [t for t, _ in steps]
    ordered = sorted(markers)
    lags: list[float | None] = []
    for k, t_commit in ordered:
        # A position readable before the commit returned is not counted as
        # holding it (conservative; both sides of that race are milliseconds).
        lo, hi = bisect.bisect_left(times, t_commit), len(steps)
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid) >= k:
                hi = mid
            else:
                lo = mid + 1
        lags.append(steps[lo][0] - t_commit if lo < len(steps) else None)
    late = sum(1 for a, b in itertools.pairwise(ordered) if a[1] > b[1])
    return {
        "lags": lags,
        "restores": len(memo),
        "positions": len(steps),
        "stale_arrivals": stale_arrivals,
        "commits_after_a_later_marker": late,
        "held": [[steps[i][0], memo[i]] for i in sorted(memo)],  # (readable at, max marker id)
    }
