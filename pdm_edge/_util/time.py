"""Times on the wire: integer ns since the epoch (UTC) and ISO-8601 strings with a UTC offset.

One implementation of each conversion for the whole package (MQTT chunks, labels, alert and
score payloads). ISO-8601 strings have microsecond resolution; exact values travel as ``*_ns``
integers next to them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, overload

__all__ = ["MAX_NS", "iso_utc", "parse_time"]

MAX_NS = 2**63 - 1
"""The largest time (int64 ns since the epoch) pdm-edge stores."""

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NS = 1_000_000_000


@overload
def iso_utc(ns: int) -> str: ...
@overload
def iso_utc(ns: None) -> None: ...
def iso_utc(ns: int | None) -> str | None:
    """``ns`` since the epoch as ISO-8601 UTC with microseconds (``2026-11-21T08:00:00.123456Z``),
    truncated towards the past; ``None`` stays ``None``."""
    if ns is None:
        return None
    sec, rem = divmod(int(ns), _NS)
    return datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{rem // 1000:06d}Z"


def parse_time(value: Any) -> int:
    """A time as ns since the epoch (UTC).

    Args:
        value: an ``int`` of ns since the epoch, or an ISO-8601 string with a UTC offset
            (``2026-11-21T08:00:00Z``, ``...T09:00:00.000001+01:00``).

    Returns:
        ns since the epoch, ``0 <= ns <= MAX_NS``; ISO strings give whole microseconds (exact
        integer arithmetic, no float rounding).

    Raises:
        ValueError: for booleans, floats (seconds or ns?), other types, unparsable strings,
            strings without an offset (a local time cannot be placed on the time axis), or
            values out of range. The message names the problem, not the field: callers turn it
            into their own error (:class:`~pdm_edge.errors.PayloadError`,
            :class:`~pdm_edge.errors.LabelError`).
    """
    if isinstance(value, bool):
        raise ValueError("must be epoch ns (int) or ISO-8601 with a UTC offset, got a boolean")
    if isinstance(value, int):
        if not 0 <= value <= MAX_NS:
            raise ValueError(f"epoch ns {value} out of range")
        return value
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not ISO-8601: {value[:64]!r}") from None
        if dt.tzinfo is None:
            raise ValueError(f"ISO-8601 time without a UTC offset (add Z or +HH:MM): {value[:64]!r}")
        delta = dt - _EPOCH
        ns = (delta.days * 86_400 + delta.seconds) * _NS + delta.microseconds * 1_000
        if not 0 <= ns <= MAX_NS:
            raise ValueError(f"time out of range: {value[:64]!r}")
        return ns
    raise ValueError(f"must be epoch ns (int) or ISO-8601 with a UTC offset, got {type(value).__name__}")
