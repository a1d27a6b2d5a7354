"""Django's own test suite on the ``sqlrepl.django`` backend (a short CI
subset of ``tests/django_suite.py``; run that script for the full set)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import django_suite
import pytest

# The apps (or parts of them) that exercise what sqlrepl changes: connection
# objects made in threads, live servers, async contexts and copies, the
# creation of test databases, transactions and the durability wait.
CI_LABELS = (
    "backends.base",
    "backends.sqlite",
    "select_for_update",
    "transaction_hooks",
    "test_utils",
    "servers",
    "async",
    "handlers",
)


@pytest.mark.slow
def test_django_suite_passes_as_on_the_stock_backend(capsys: pytest.CaptureFixture[str]) -> None:
    """No test of the CI subset fails only under sqlrepl, in any of the three
    variants, and no object reaches a production replica."""
    # A short folder: pytest's tmp_path makes the staging folder's socket
    # path longer than AF_UNIX allows (108 bytes).
    work = Path(tempfile.mkdtemp(prefix="djsuite-"))
    try:
        # One process: without tblib, a failure in a parallel run aborts the run
        # (and Django 6 on Python 3.13 shows an order-dependent one there).
        code = django_suite.main([*CI_LABELS, "--work", str(work), "--parallel", "1"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = capsys.readouterr().out
    assert code == 0, out[-5000:]
    for variant in django_suite.VARIANTS:
        assert f"| {variant} |" in out
