"""Altair charts of the dashboard (Altair ships with Streamlit; Vega-Lite renders in the browser).

Every axis names its unit: time in UTC, anomaly score dimensionless (units of the machine's
normal spread), frequency in Hz, PSD in dB re 1 unit^2/Hz, envelope spectrum in unit^2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from dashboard.data import NS, Spectrum, fmt_time
from pdm_edge.store.base import ModelEvent, ScoreBucket
from pdm_edge.types import Alert, Label

LABEL_COLORS = {"fault": "#b2182b", "normal": "#1a9850", "ignore": "#7f7f7f"}
SCORE_COLOR = "#1f5fa8"
THRESHOLD_COLOR = "#d6604d"
ALERT_COLOR = "#e41a1c"
EVENT_COLOR = "#6a3d9a"


def _ms(ns: int) -> float:
    return ns / 1e6


def _ts(ns: int) -> pd.Timestamp:
    return pd.Timestamp(int(ns), unit="ns", tz="UTC")


EVENT_LABEL_PX = 14
"""Line height of the model-event names on the score chart (px)."""


def event_label_rows(times_ns: Sequence[int], start_ns: int, end_ns: int, width_px: float = 900.0,
                     label_px: float = 230.0) -> list[int]:
    """The y position (px from the top) of each model-event name (``times_ns`` sorted): a name
    goes on the first line where the previous name on that line ends at least ``label_px``
    pixels (at an assumed chart width of ``width_px``) before it starts, so that events close in
    time ("training_queued" and "calibrated" a second apart) are written on separate lines."""
    scale = width_px / max(1, end_ns - start_ns)
    line_end: list[float] = []
    rows = []
    for t in times_ns:
        x = (t - start_ns) * scale
        line = next((i for i, e in enumerate(line_end) if x >= e), len(line_end))
        if line == len(line_end):
            line_end.append(0.0)
        line_end[line] = x + label_px
        rows.append(16 + EVENT_LABEL_PX * line)
    return rows


def score_chart(buckets: Sequence[ScoreBucket], every_s: float, start_ns: int, end_ns: int, *,
                alerts: Sequence[Alert] = (), labels: Sequence[tuple[Label, str]] = (),
                events: Sequence[ModelEvent] = (), height: int = 340) -> alt.LayerChart:
    """Score over time: the maximum score per bucket (line), the threshold (dashed step line),
    buckets with an anomalous window (red dots), alert spans (shaded red; an open alert runs to
    the range's end), labels (coloured strip at the top: fault red, normal green, ignore grey)
    and model events (purple dashed rules, named at the bottom)."""
    x_scale = alt.Scale(domain=[_ms(start_ns), _ms(end_ns)], type="utc")
    span_ns = end_ns - start_ns
    fmt = "%H:%M:%S" if span_ns <= 3600 * NS else "%H:%M" if span_ns <= 2 * 86400 * NS else "%b %d"
    x_axis = alt.Axis(title="time (UTC)", format=fmt, labelOverlap=True)
    df = pd.DataFrame({
        "time": [_ts(b.start_ns) for b in buckets],
        "score": [b.max_score for b in buckets],
        "threshold": [b.threshold for b in buckets],
        "anomalous": [b.any_anomaly for b in buckets],
        "windows": [b.count for b in buckets],
        "when": [fmt_time(b.start_ns) for b in buckets],
    })
    layers: list[alt.Chart] = []
    if alerts:
        adf = pd.DataFrame({
            "start": [_ts(max(a.start_ns, start_ns)) for a in alerts],
            "end": [_ts(min(a.end_ns if a.end_ns is not None else end_ns, end_ns)) for a in alerts],
            "alert": [a.id[:8] for a in alerts],
            "state": [a.state for a in alerts],
            "sensor": [a.sensor for a in alerts],
            "peak score": [round(a.peak_score, 2) for a in alerts],
            "from": [fmt_time(a.start_ns) for a in alerts],
        })
        layers.append(alt.Chart(adf).mark_rect(color=ALERT_COLOR, opacity=0.16).encode(
            x=alt.X("start:T", scale=x_scale, axis=x_axis), x2="end:T",
            tooltip=["alert", "state", "sensor", "peak score", "from"]))
    y_title = "anomaly score (normal-spread units)"
    base = alt.Chart(df).encode(x=alt.X("time:T", scale=x_scale, axis=x_axis))
    layers.append(base.mark_line(color=SCORE_COLOR, strokeWidth=1.6, interpolate="step-after").encode(
        y=alt.Y("score:Q", title=y_title, scale=alt.Scale(zero=False, nice=True)),
        tooltip=[alt.Tooltip("when:N", title="bucket start"), alt.Tooltip("score:Q", format=".2f", title="max score"),
                 alt.Tooltip("threshold:Q", format=".2f"), alt.Tooltip("windows:Q")]))
    if df["threshold"].notna().any():
        layers.append(base.transform_filter("isValid(datum.threshold)").mark_line(
            color=THRESHOLD_COLOR, strokeDash=[6, 4], strokeWidth=1.4, interpolate="step-after").encode(
            y=alt.Y("threshold:Q", title=y_title), tooltip=[alt.Tooltip("threshold:Q", format=".2f")]))
    if df["anomalous"].any():
        layers.append(base.transform_filter("datum.anomalous").mark_circle(color=ALERT_COLOR, size=22, opacity=0.9).encode(
            y=alt.Y("score:Q", title=y_title)))
    if labels:
        ldf = pd.DataFrame({
            "start": [_ts(max(lb.start_ns, start_ns)) for lb, _ in labels],
            "end": [_ts(min(max(lb.end_ns, lb.start_ns + 1), end_ns)) for lb, _ in labels],
            "kind": [lb.kind for lb, _ in labels],
            "label": [lb.kind + (f" ({lb.fault_type})" if lb.fault_type else "") for lb, _ in labels],
            "author": [lb.author for lb, _ in labels],
            "note": [lb.note[:120] for lb, _ in labels],
            "source": [src for _, src in labels],
        })
        color = alt.Color("kind:N", scale=alt.Scale(domain=list(LABEL_COLORS), range=list(LABEL_COLORS.values())),
                          legend=alt.Legend(title="labels", orient="top", direction="horizontal", titleOrient="left",
                                            offset=2))
        layers.append(alt.Chart(ldf).mark_rect(opacity=0.85).encode(
            x=alt.X("start:T", scale=x_scale, axis=x_axis), x2="end:T", y=alt.value(0), y2=alt.value(12), color=color,
            tooltip=["label", "author", "note", "source"]))
        layers.append(alt.Chart(ldf).mark_rule(strokeWidth=2).encode(
            x=alt.X("start:T", scale=x_scale, axis=x_axis), color=color, tooltip=["label", "author", "note", "source"]))
    if events:
        shown = sorted((e for e in events if start_ns <= e.ts_ns < end_ns), key=lambda e: e.ts_ns)
        edf = pd.DataFrame({
            "time": [_ts(e.ts_ns) for e in shown],
            "event": [f"{e.event} {e.version}" for e in shown],
            "detail": [e.detail[:160] for e in shown],
            "y": event_label_rows([e.ts_ns for e in shown], start_ns, end_ns),
        })
        if len(edf):
            layers.append(alt.Chart(edf).mark_rule(color=EVENT_COLOR, strokeDash=[2, 3], strokeWidth=1.5).encode(
                x=alt.X("time:T", scale=x_scale, axis=x_axis), tooltip=["event", "detail"]))
            layers.append(alt.Chart(edf).mark_text(color=EVENT_COLOR, align="left", dx=3, fontSize=11, baseline="top").encode(
                x=alt.X("time:T", scale=x_scale, axis=x_axis), y=alt.Y("y:Q", scale=None), text="event:N"))
    return alt.layer(*layers).properties(height=height).resolve_scale(y="shared")


ZONE_COLORS = {"A": "#1a9850", "B": "#a6d96a", "C": "#fdae61", "D": "#d73027"}
TREND_FIELDS = {"rms": "RMS", "peak": "peak", "crest_factor": "crest factor", "kurtosis": "kurtosis",
                "band_10_1k": "band 10 Hz-1 kHz", "band_1k_5k": "band 1-5 kHz", "band_5k_up": "band 5 kHz-0.45 fs"}


def severity_chart(rows: Sequence[Any], start_ns: int, end_ns: int, zones_mm_s: Sequence[float],
                   height: int = 220) -> alt.LayerChart:
    """ISO 20816-3 velocity RMS (mm/s, 10-1000 Hz; maximum per bucket) over time on the zone
    bands A (green) / B / C / D (red) of the sensor's boundaries."""
    x_scale = alt.Scale(domain=[_ms(start_ns), _ms(end_ns)], type="utc")
    span_ns = end_ns - start_ns
    fmt = "%H:%M:%S" if span_ns <= 3600 * NS else "%H:%M" if span_ns <= 2 * 86400 * NS else "%b %d"
    x_axis = alt.Axis(title="time (UTC)", format=fmt, labelOverlap=True)
    df = pd.DataFrame({"time": [_ts(r.start_ns) for r in rows if r.velocity_rms_mm_s is not None],
                       "velocity": [r.velocity_rms_mm_s for r in rows if r.velocity_rms_mm_s is not None],
                       "zone": [r.zone for r in rows if r.velocity_rms_mm_s is not None],
                       "when": [fmt_time(r.start_ns) for r in rows if r.velocity_rms_mm_s is not None]})
    b = list(zones_mm_s)
    top = max([b[2] * 1.5] + [float(v) * 1.1 for v in df["velocity"]])
    bands = pd.DataFrame({"zone": list("ABCD"), "lo": [0.0, b[0], b[1], b[2]], "hi": [b[0], b[1], b[2], top],
                          "start": [_ts(start_ns)] * 4, "end": [_ts(end_ns)] * 4})
    y = alt.Y("lo:Q", title="velocity RMS 10-1000 Hz (mm/s)", scale=alt.Scale(domain=[0, top], nice=False))
    layers = [alt.Chart(bands).mark_rect(opacity=0.18).encode(
        x=alt.X("start:T", scale=x_scale, axis=x_axis), x2="end:T", y=y, y2="hi:Q", color=alt.Color("zone:N", scale=alt.Scale(domain=list(ZONE_COLORS), range=list(ZONE_COLORS.values())),
                                        legend=alt.Legend(title="ISO 20816-3 zone", orient="top", direction="horizontal")),
        tooltip=["zone", alt.Tooltip("lo:Q", title="from mm/s"), alt.Tooltip("hi:Q", title="to mm/s")])]
    if len(df):
        layers.append(alt.Chart(df).mark_line(color="#222", strokeWidth=1.5, interpolate="step-after", point=True).encode(
            x=alt.X("time:T", scale=x_scale, axis=x_axis), y=alt.Y("velocity:Q", scale=alt.Scale(domain=[0, top], nice=False)),
            tooltip=[alt.Tooltip("when:N", title="bucket start"), alt.Tooltip("velocity:Q", format=".2f", title="mm/s"), "zone"]))
    return alt.layer(*layers).properties(height=height)


def trend_charts(rows: Sequence[Any], start_ns: int, end_ns: int, unit: str, height: int = 150) -> list[alt.Chart]:
    """Condition trends (maximum per bucket), one small chart per value: RMS and peak (unit),
    crest factor and kurtosis (dimensionless), band energies (unit²)."""
    span_ns = end_ns - start_ns
    fmt = "%H:%M:%S" if span_ns <= 3600 * NS else "%H:%M" if span_ns <= 2 * 86400 * NS else "%b %d"
    df = pd.DataFrame({"time": [_ts(r.start_ns) for r in rows], "when": [fmt_time(r.start_ns) for r in rows]})
    titles = {"rms": f"RMS ({unit})", "peak": f"peak ({unit})", "crest_factor": "crest factor", "kurtosis": "kurtosis",
              "band_10_1k": f"band 10 Hz-1 kHz ({unit}²)", "band_1k_5k": f"band 1-5 kHz ({unit}²)",
              "band_5k_up": f"band 5 kHz-0.45 fs ({unit}²)"}
    # the range's ends as invisible points: a one-layer chart with an explicit temporal domain draws its
    # line at the left edge in Streamlit 1.67 (seen in the browser), a data-driven domain does not
    ends = pd.DataFrame({"time": [_ts(start_ns), _ts(end_ns)]})
    x = alt.X("time:T", axis=alt.Axis(title=None, format=fmt, labelOverlap=True, tickCount=4))
    panels = []
    for f, title in titles.items():
        d = df.assign(value=[float(getattr(r, f)) for r in rows])
        line = alt.Chart(d).mark_line(strokeWidth=1.4, interpolate="step-after", color=SCORE_COLOR).encode(
            x=x, y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False), axis=alt.Axis(format=".3~g")),
            tooltip=[alt.Tooltip("when:N", title="bucket start"), alt.Tooltip("value:Q", format=".4g", title=title)])
        edge = alt.Chart(ends).mark_point(opacity=0).encode(x=x)
        panels.append(alt.layer(edge, line, title=alt.TitleParams(title, fontSize=11, fontWeight="normal"))
                      .properties(height=height))
    return panels


def spectrum_chart(spectra: Sequence[Spectrum], *, title: str, markers: Mapping[str, float] | None = None,
                   height: int = 300, log_x: bool = False) -> alt.LayerChart:
    """Spectra as lines (one colour each, legend on top); ``markers`` (name -> Hz) are drawn as
    labelled vertical rules (bearing defect frequencies; 2nd and 3rd harmonics of BPFO and
    BPFI as fainter rules)."""
    rows: list[dict[str, Any]] = []
    for sp in spectra:
        f, v = np.asarray(sp.freqs_hz), np.asarray(sp.values)
        keep = f > 0 if log_x else np.ones_like(f, dtype=bool)
        for fi, vi in zip(f[keep], v[keep]):
            rows.append({"frequency": float(fi), "value": float(vi), "spectrum": sp.label})
    df = pd.DataFrame(rows, columns=["frequency", "value", "spectrum"])
    kind = spectra[0].kind if spectra else "psd"
    unit = spectra[0].unit if spectra else "g"
    y_title = f"PSD (dB re 1 {unit}²/Hz)" if kind == "psd" else f"squared envelope ({unit}²)"
    fmax = float(df["frequency"].max()) if len(df) else 1.0
    x = alt.X("frequency:Q", title="frequency (Hz)",
              scale=alt.Scale(type="log") if log_x else alt.Scale(domain=[0, fmax], nice=False))
    palette = ["#d6604d", "#1f5fa8", "#7f7f7f", "#1a9850"]  # the first spectrum (the selection) in red
    layers: list[alt.Chart] = [alt.Chart(df).mark_line(strokeWidth=1.3, clip=True).encode(
        x=x, y=alt.Y("value:Q", title=y_title, scale=alt.Scale(zero=kind != "psd")),
        color=alt.Color("spectrum:N", scale=alt.Scale(domain=[sp.label for sp in spectra], range=palette[:max(1, len(spectra))]),
                        legend=alt.Legend(orient="bottom", direction="vertical", title=None, labelLimit=0)),
        tooltip=[alt.Tooltip("spectrum:N"), alt.Tooltip("frequency:Q", format=".1f", title="Hz"),
                 alt.Tooltip("value:Q", format=".3g")])]
    if markers:
        mrows = []
        for name, hz in markers.items():
            mrows.append({"frequency": hz, "marker": f"{name} {hz:.1f} Hz", "name": name, "harmonic": 1})
            if name in ("BPFO", "BPFI"):
                for h in (2, 3):
                    if h * hz <= fmax:
                        mrows.append({"frequency": h * hz, "marker": f"{h}×{name} {h * hz:.1f} Hz", "name": f"{h}×{name}",
                                      "harmonic": h})
        mdf = pd.DataFrame([m for m in mrows if m["frequency"] <= fmax])
        if len(mdf):
            layers.append(alt.Chart(mdf).mark_rule(color="#444", strokeDash=[4, 3]).encode(
                x=alt.X("frequency:Q"), opacity=alt.condition("datum.harmonic == 1", alt.value(0.8), alt.value(0.3)),
                tooltip=["marker"]))
            first = mdf[mdf["harmonic"] == 1].sort_values("frequency").reset_index(drop=True)
            first["y"] = 8 + 13 * (first.index % 3)  # staggered, so that close frequencies stay readable
            layers.append(alt.Chart(first).mark_text(align="left", baseline="middle", dx=3, fontSize=11, color="#222").encode(
                x=alt.X("frequency:Q"), y=alt.Y("y:Q", scale=None), text="name:N"))
    return alt.layer(*layers).properties(height=height, title=title)
