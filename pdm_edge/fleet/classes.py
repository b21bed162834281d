"""Machine classes and the participation schedule.

A fleet prior is shared only between streams of one *machine class*: the same sensor kind, the
same sample-rate band and the same configured tag (``[fleet] machine_class``, e.g. ``pump-a``).
The band is the octave ``[2^k, 2^(k+1))`` kHz that holds the sample rate (25.6 kHz -> ``16-32k``),
because the feature images are computed on a grid in Hz up to the Nyquist frequency: two
streams whose rates differ by less than an octave see comparable spectra, two octaves apart do
not. The adapter configuration and the encoder must match as well; a delta package records
both and is refused where they differ (:mod:`pdm_edge.fleet.delta`).
"""

from __future__ import annotations

import datetime as dt
import math
import re

_SCHEDULE_RE = re.compile(r"^(\d\d):(\d\d)-(\d\d):(\d\d)$")


def rate_band(sample_rate_hz: float) -> str:
    """The octave band of a sample rate: ``"16-32k"`` for 25.6 kHz, ``"0.5-1k"`` for 600 Hz.

    Raises:
        ValueError: a rate that is not positive and finite.
    """
    if not (sample_rate_hz > 0 and math.isfinite(sample_rate_hz)):
        raise ValueError(f"sample rate must be positive and finite, got {sample_rate_hz}")
    k = math.floor(math.log2(sample_rate_hz / 1000.0))
    lo, hi = 2.0 ** k, 2.0 ** (k + 1)
    return f"{lo:g}-{hi:g}k"


def machine_class(kind: str, sample_rate_hz: float, tag: str) -> str:
    """``"{kind}-{band}-{tag}"``, e.g. ``"vibration-16-32k-pump-a"`` (characters ``[A-Za-z0-9_.-]``)."""
    return f"{kind}-{rate_band(sample_rate_hz)}-{tag}"


def parse_schedule(text: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` (UTC) -> (start, end) in minutes of the day; ``end`` may be 1440
    (``24:00``); a window with ``end <= start`` wraps midnight.

    Raises:
        ValueError: not of that form, or hours/minutes out of range.
    """
    m = _SCHEDULE_RE.match(text.strip())
    if not m:
        raise ValueError(f"schedule {text!r} must be HH:MM-HH:MM (UTC)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    a, b = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or b > 1440:
        raise ValueError(f"schedule {text!r}: hours 00..24, minutes 00..59")
    return a, b


def in_schedule(text: str, now: dt.datetime | None = None) -> bool:
    """Whether ``now`` (UTC; default the current time) is inside the schedule window."""
    a, b = parse_schedule(text)
    now = now or dt.datetime.now(dt.timezone.utc)
    t = now.hour * 60 + now.minute
    if a == b:
        return True if b in (0, 1440) else False
    return a <= t < b if a < b else (t >= a or t < b)
