"""Checks of the arguments given to the public entry points.

Every check raises :class:`ConfigError` naming the argument, the value it
got and what it expects, so that bad input never surfaces as a raw
``TypeError``/``ValueError``/``OverflowError`` from deep inside, or worse, is
silently accepted (``txid=2.5``, ``timestamp=True``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
from typing import Any

from ._errors import ConfigError

__all__ = [
    "check_database_path",
    "check_options",
    "check_timeout",
    "as_urls",
    "is_client",
    "count",
    "seconds",
    "timestamp_ms",
    "txid",
]


def _is_number(value: object) -> bool:
    # bool is an int to Python, never a number of seconds or a txid to a user.
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_timeout(name: str, value: object) -> float | None:
    """A timeout in seconds: ``None`` or ``inf`` (wait for ever), or a
    number >= 0. NaN, negative numbers, bools and strings are refused."""
    if value is None:
        return None
    if not _is_number(value) or math.isnan(value) or value < 0:  # type: ignore[arg-type,operator]
        raise ConfigError(
            f"{name} must be a number of seconds >= 0 (or None to wait for ever), got {value!r}"
        )
    return None if math.isinf(value) else float(value)  # type: ignore[arg-type]


def seconds(name: str, value: object, *, positive: bool = False) -> float:
    """A finite number of seconds, > 0 if ``positive``, else >= 0 (an
    interval, or a wait that must end). NaN, infinities, bools and strings
    are refused."""
    low = "> 0" if positive else ">= 0"
    if (
        not _is_number(value)
        or not math.isfinite(value)  # type: ignore[arg-type]
        or (value <= 0 if positive else value < 0)  # type: ignore[operator]
    ):
        raise ConfigError(f"{name} must be a finite number of seconds {low}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def count(name: str, value: object, *, minimum: int = 0) -> int:
    """A whole number >= ``minimum`` (not a bool, a float or a string)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def flag(name: str, value: object) -> bool:
    """True or False, nothing else: a string such as "no" would count as true."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


def txid(value: object) -> int:
    """A transaction id to restore to: a whole number >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(
            f"txid must be a whole number >= 0 (as listed by `sqlrepl segments`), got {value!r}"
        )
    return value


def timestamp_ms(value: object) -> int:
    """A point in time as Unix milliseconds, from a ``datetime`` (naive
    means local time), Unix seconds, or an ISO 8601 string."""
    what = "a datetime, Unix seconds or an ISO 8601 string (like 2026-11-25T20:54:00Z)"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"timestamp {value!r} is not ISO 8601 (like 2026-11-25T20:54:00Z)") from exc
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.astimezone()
        return int(value.timestamp() * 1000)
    if not _is_number(value):
        raise ConfigError(f"timestamp must be {what}, got {value!r}")
    seconds = float(value)  # type: ignore[arg-type]
    # Beyond what a datetime can hold, no replica has anything to match.
    if not math.isfinite(seconds) or abs(seconds) > 253402300799:
        raise ConfigError(f"timestamp must be a finite time between years 1 and 9999, got {value!r}")
    return int(seconds * 1000)


# How the callables among the options are called, for the messages.
_CALLED_AS = {"progress": "progress(done_bytes, total_bytes)", "clock": "clock() -> Unix seconds"}


def check_options(options: object) -> None:
    """Check every field of an :class:`sqlrepl.Options` against its declared
    type: numbers of seconds are finite and >= 0, sizes and frame counts are
    whole numbers >= 0, functions are callable; ``None`` only where the
    field allows it."""
    from ._options import Options  # (here: _options imports this module)

    if options is None:
        return
    if not isinstance(options, Options):
        raise ConfigError(f"options must be a sqlrepl.Options, got {type(options).__name__}")
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        declared = str(f.type)
        if value is None and "None" in declared:
            continue
        if declared.startswith("int"):
            bad = not isinstance(value, int) or isinstance(value, bool) or value < 0
            if bad:
                raise ConfigError(f"option {f.name} must be a whole number >= 0, got {value!r}")
        elif declared.startswith("float"):
            bad = not _is_number(value) or not math.isfinite(value) or value < 0
            if bad:
                also = " (or None)" if "None" in declared else ""
                raise ConfigError(
                    f"option {f.name} must be a finite number of seconds >= 0{also}, got {value!r}"
                )
        elif declared.startswith(("Callable", "ProgressCallback")) and not callable(value):
            also = " (or None)" if "None" in declared else ""
            raise ConfigError(
                f"option {f.name} must be a function called as {_CALLED_AS.get(f.name, f.name + '()')}{also},"
                f" got {value!r}"
            )


def check_database_path(path: str, *, role: str, folder_must_exist: bool) -> None:
    """A database path must name a file (which may not exist yet), not a
    directory, in a folder (which must exist if ``folder_must_exist``).
    ``role`` names what the path is for, in the message."""
    if os.path.isdir(path):
        raise ConfigError(f"{role} {path} is a directory; give the path of a database file")
    folder = os.path.dirname(path) or "."
    # The nearest existing ancestor must be a folder, or nothing can be made below it.
    ancestor = folder
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"{role} {path}: {ancestor} is a file, not a folder; give a path inside a folder")
    if folder_must_exist and ancestor != folder:
        raise ConfigError(f"{role} {path}: folder {folder} does not exist; create it first")


def is_client(obj: Any) -> bool:
    """Is ``obj`` a replica client (rather than a URL)? Also true of a
    wrapper that delegates through ``__getattr__``: from Python 3.12 on,
    ``isinstance()`` against a Protocol does not see such members."""
    from ._replica import ReplicaClient  # (here: no import cycle at start-up)

    if isinstance(obj, ReplicaClient):
        return True
    return not isinstance(obj, str) and all(
        callable(getattr(obj, m, None)) for m in ("list", "get", "aclose")
    )


def as_urls(replica: Any, *, what: str) -> tuple[Any, ...]:
    """One replica (a URL or a client) or a sequence of them, as a tuple."""
    if isinstance(replica, str) or is_client(replica):
        return (replica,)
    if isinstance(replica, list | tuple):
        return tuple(replica)
    raise ConfigError(f"{what} must be a URL or a list of URLs, got {type(replica).__name__} {replica!r}")
