"""Progress of long work (restore, verify): ``callback(done_bytes, total_bytes)``.

:class:`Progress` turns the work's steps into calls that never go backward
and end with ``done == total``; :func:`terminal_bar` is the CLI's progress
bar (tqdm, from the ``cli`` extra), shown only on a terminal. tqdm is
imported by this module only.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Progress", "ProgressCallback", "terminal_bar"]

ProgressCallback = Callable[[int, int], None]

log = logging.getLogger("sqlrepl")


class Progress:
    """Reports bytes done out of a total to ``callback``, from the thread that
    calls :meth:`advance` (restore: its event loop's thread).

    Guarantees: ``done`` never decreases, never exceeds ``total``, and the
    last call of a finished job has ``done == total``. A job in several
    phases (a restore that falls back to another replica after a failure)
    calls :meth:`phase` for each: the totals then add up, so the bar goes on
    rather than back. A callback that raises is logged once and not called
    again: progress display never fails the work.
    """

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._base = 0  # done in earlier phases
        self._total = 0
        self.done = 0

    @property
    def total(self) -> int:
        return self._total

    def phase(self, total: int) -> None:
        """Start a phase of ``total`` more bytes (what is done so far stays done)."""
        self._base = self.done
        self._total = self.done + max(0, total)
        self._report()

    def advance(self, n: int) -> None:
        if n > 0:
            self.done = min(self._total, self.done + n)
            self._report()

    def finish(self) -> None:
        """The job is complete: report ``done == total``."""
        self.done = self._total
        self._report()

    def _report(self) -> None:
        if self._callback is None:
            return
        try:
            self._callback(self.done, self._total)
        except Exception:
            log.exception("progress callback %r failed; no more progress is reported", self._callback)
            self._callback = None


def _wants_bar() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def terminal_bar(description: str) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a bar on stderr, or ``None`` when stdout
    or stderr is not a terminal (a pipe, a file, a log collector) or tqdm is
    not installed (``pip install "sqlrepl[cli]"``)."""
    if not _wants_bar():
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:  # (made at the first report: no bar when nothing is done)
            bars.append(_make_bar(description, tqdm))
        bar = bars[0]
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def _make_bar(description: str, tqdm: Any) -> Any:
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    return tqdm(
        desc=description,
        total=0,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=True,
        # A terminal that reports no size (a fresh pseudo-terminal) would
        # get a bar cut to nothing.
        ncols=size.columns or 80,
        nrows=size.lines or 24,
    )
