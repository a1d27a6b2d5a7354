"""The soak command, in its short CI form: load, faults, restores compared."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(1800)
def test_two_minute_soak_loses_nothing() -> None:
    """`python -m bench.soak --minutes 2` exits 0 with every restore byte-identical and no row lost."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "2"],
        capture_output=True,
        text=True,
        timeout=1700,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert re.search(r"^\| rows lost +\| 0 \|$", out.stdout, re.M), report
    assert re.search(r"^\| mismatches +\| 0 \|$", out.stdout, re.M), report
    compared = re.search(r"^\| restores compared +\| (\d+) \((\d+) byte-identical\) \|$", out.stdout, re.M)
    assert compared is not None, report
    assert int(compared[1]) >= 2, report  # one a minute in, one at the end
    assert compared[1] == compared[2], report
    acked = re.search(r"^\| rows acknowledged +\| (\d+) \|$", out.stdout, re.M)
    assert acked is not None, report
    assert int(acked[1]) > 0, report
