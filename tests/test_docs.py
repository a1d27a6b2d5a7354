"""The documentation says what the code does: every option in the README, with its default."""

from __future__ import annotations

import dataclasses
import re
import time

from helpers import ROOT

import sqlrepl

_UNITS = {"": 1, "min": 60, "h": 3600, "MiB": 1 << 20, "GiB": 1 << 30}


def _readme_options() -> dict[str, str]:
    """The README's table of ``Options`` fields: field name -> default as written."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Options.**") :].split("\n\n", 2)[
        1
    ]  # the table after the heading's paragraph
    return dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", section, re.M))


def _parse_default(written: str) -> object:
    if written == "`None`":
        return None
    if written == "`time.time`":
        return time.time
    number, _, unit = written.partition(" ")
    return float(number) * _UNITS[unit]


def test_readme_lists_every_option_with_its_default() -> None:
    """The README's options table names each field of sqlrepl.Options, and no other, with its real default."""
    documented = _readme_options()
    fields = {f.name: f.default for f in dataclasses.fields(sqlrepl.Options)}
    assert sorted(documented) == sorted(fields)
    wrong = {
        name: (written, fields[name])
        for name, written in documented.items()
        if _parse_default(written) != fields[name]
    }
    assert not wrong, wrong
