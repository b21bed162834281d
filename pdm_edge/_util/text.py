"""One-line, human-readable renderings shared by the command line and the demo's console."""

from __future__ import annotations

from typing import Any

import numpy as np

from pdm_edge._util.time import iso_utc
from pdm_edge.types import Window

__all__ = ["fmt_ns", "ingest_summary_lines", "window_line"]


def fmt_ns(ns: int) -> str:
    """``ns`` since the epoch as ISO-8601 UTC with milliseconds (``2026-11-21T08:00:00.123Z``),
    for people; exact values travel as integers."""
    return iso_utc(ns)[:-4] + "Z"


def window_line(w: Window) -> str:
    """One line per window: time, stream, index, level and impulsiveness.

    RMS and peak are in the window's unit; crest factor = peak / RMS and kurtosis (Pearson,
    3 for Gaussian noise) rise with the impacts of a bearing fault.
    """
    from scipy.stats import kurtosis

    x = w.samples.astype(np.float64)
    rms = float(np.sqrt(np.mean(x * x)))
    peak = float(np.max(np.abs(x)))
    kurt = float(kurtosis(x, fisher=False))
    crest = peak / rms if rms > 0 else float("nan")
    return (f"{fmt_ns(w.start_ns)}  {w.stream:<28} #{w.index:<5d} {w.duration_s:.3f} s @ {w.sample_rate_hz:g} Hz  "
            f"RMS {rms:8.4f} {w.unit:<4} peak {peak:8.4f} {w.unit:<4} crest {crest:5.2f}  kurtosis {kurt:6.2f}")


def ingest_summary_lines(stats: Any, published: int | None = None) -> list[str]:
    """The ingestion summary (an :class:`~pdm_edge.ingest.IngestStats`), a blank line first;
    ``published``: chunks the caller published, when it did."""
    lines = ["", "summary"]
    if published is not None:
        lines.append(f"  chunks published       {published}")
    lines.append(f"  chunks received        {stats.received}")
    lines.append(f"  chunks windowed        {stats.windowed}")
    lines.append(f"  windows                {stats.windows}")
    dl = ", ".join(f"{k} {v}" for k, v in sorted(stats.deadletters.items())) or "none"
    lines.append(f"  dead-lettered          {stats.deadlettered} ({dl})")
    ev = ", ".join(f"{k} {v}" for k, v in stats.events.items() if v) or "none"
    lines.append(f"  stream events          {ev}")
    lines.append(f"  chunk queue high water {stats.chunk_queue_high_water}")
    return lines
