"""The benchmark's lag arithmetic (bench/lag.py), on made-up timelines."""

from __future__ import annotations

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT))
from bench.lag import marker_lags


def test_each_marker_waits_only_for_its_own_position() -> None:
    """Marker 2's commit returned late (it waited for the write lock) while
    3 and 4 committed on time: their lags must not inherit its wait."""
    # Positions readable at t=1.0 (markers up to 1), 2.0 (max id 4: 3 and 4,
    # not 2, which returns at 2.4), 3.0 (up to 5, 2 included).
    visible = [(1.0, 10), (2.0, 20), (3.0, 30), (3.5, None)]
    holds = {10: 1, 20: 4, 30: 5}
    markers = [(1, 0.5), (2, 2.4), (3, 1.1), (4, 1.2), (5, 2.5)]
    asked: list[int] = []

    def max_marker_at(position: int) -> int:
        asked.append(position)
        return holds[position]

    out = marker_lags(markers, visible, max_marker_at)
    assert out["lags"] == [0.5, 3.0 - 2.4, 2.0 - 1.1, 2.0 - 1.2, 3.0 - 2.5]
    assert out["commits_after_a_later_marker"] == 1
    assert len(asked) == len(set(asked)) == out["restores"]


def test_a_position_readable_before_the_commit_does_not_count() -> None:
    visible = [(1.0, 1), (2.0, 2)]
    out = marker_lags([(1, 1.5)], visible, lambda position: 1)
    assert out["lags"] == [0.5]


def test_a_marker_never_restorable_has_no_lag() -> None:
    out = marker_lags([(1, 0.1), (2, 0.2)], [(1.0, 1)], lambda position: 1)
    assert out["lags"] == [0.9, None]
