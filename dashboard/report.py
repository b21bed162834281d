"""The machine report: a printable HTML page a plant engineer can send, and CSV exports.

``pdm-edge --config CFG report SITE/MACHINE [--hours 24] [--out DIR]`` writes it, and the machine
page's "Report" buttons download the same files. One self-contained HTML file (figures embedded
as PNG, no external resources: it prints from any browser to PDF, and mails as one attachment)
built with Jinja2 (autoescaping on: every name, note, reason and id is text) and Matplotlib
(Agg backend):

- the machine, the period (UTC), when and from which store and registry it was made;
- per sensor: the anomaly score (maximum per bucket, as on the dashboard) with its threshold
  and the alert spans; the ISO 20816-3 velocity RMS on the zone bands; the newest zone;
- the period's alerts (the open ones with their peak so far) and the labels that answer them;
- every label of the period (kind, fault type, span, author, note);
- the spectra of the top alert (highest peak score): Welch PSD and the envelope spectrum with
  the bearing's defect frequencies, from the raw windows kept in the labelled-window buffer
  (or a line saying they are not kept);
- the model versions of the machine (registry: status, trigger, created, reason) and the
  period's model events.

CSV (:func:`scores_csv`, :func:`alerts_csv`): every score of the period (window start in UTC
ISO 8601 and ns, sensor, score, threshold, anomalous, model version) and every alert.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dashboard import data
from pdm_edge.config import AppConfig

NS = data.NS

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>pdm-edge report {{ site }}/{{ machine }}</title>
<style>
 body { font-family: "DejaVu Sans", Arial, sans-serif; font-size: 11pt; margin: 1.5cm; color: #222; }
 h1 { font-size: 18pt; margin-bottom: 0.2em; } h2 { font-size: 14pt; margin-top: 1.4em; border-bottom: 1px solid #aaa; }
 h3 { font-size: 12pt; } table { border-collapse: collapse; width: 100%; margin: 0.4em 0 1em; font-size: 9.5pt; }
 th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top; }
 th { background: #eee; } .meta { color: #555; } img { max-width: 100%; } .none { color: #777; font-style: italic; }
 .zone-A { background: #d9f0d3; } .zone-B { background: #f0f7d4; } .zone-C { background: #fee8c8; } .zone-D { background: #f8d0cb; }
 @media print { h2 { page-break-after: avoid; } figure, table { page-break-inside: avoid; } }
</style></head><body>
<h1>Machine report: {{ site }}/{{ machine }}</h1>
<p class="meta">Period {{ start }} to {{ end }} (UTC) · made {{ made }} by pdm-edge · store {{ store }} · registry {{ registry }}</p>
<h2>Summary</h2>
<table><tr><th>sensor</th><th>windows scored</th><th>highest score</th><th>threshold</th><th>ISO 20816-3 (newest)</th><th>alerts</th></tr>
{% for s in sensors %}<tr><td>{{ s.sensor }}</td><td>{{ s.windows }}</td><td>{{ s.max_score }}</td><td>{{ s.threshold }}</td>
<td class="zone-{{ s.zone or '' }}">{{ s.zone_text }}</td><td>{{ s.alerts }}</td></tr>
{% else %}<tr><td colspan="6" class="none">No scores in the period.</td></tr>{% endfor %}</table>
{% for s in sensors %}
<h2>{{ s.sensor }}: score and severity</h2>
<figure><img alt="anomaly score of {{ s.sensor }}" src="data:image/png;base64,{{ s.score_png }}"></figure>
{% if s.severity_png %}<figure><img alt="ISO 20816-3 velocity of {{ s.sensor }}" src="data:image/png;base64,{{ s.severity_png }}"></figure>{% endif %}
{% endfor %}
<h2>Alerts</h2>
<table><tr><th>state</th><th>sensor</th><th>start</th><th>end</th><th>peak score</th><th>threshold</th><th>model version</th><th>labels</th><th>alert id</th></tr>
{% for a in alerts %}<tr><td>{{ a.state }}</td><td>{{ a.sensor }}</td><td>{{ a.start }}</td><td>{{ a.end }}</td><td>{{ a.peak }}</td>
<td>{{ a.threshold }}</td><td>{{ a.model_version }}</td><td>{{ a.labels }}</td><td>{{ a.id }}</td></tr>
{% else %}<tr><td colspan="9" class="none">No alerts in the period.</td></tr>{% endfor %}</table>
<h2>Labels</h2>
<table><tr><th>kind</th><th>fault type</th><th>sensor</th><th>from</th><th>to</th><th>by</th><th>given</th><th>note</th></tr>
{% for l in labels %}<tr><td>{{ l.kind }}</td><td>{{ l.fault_type }}</td><td>{{ l.sensor }}</td><td>{{ l.start }}</td><td>{{ l.end }}</td>
<td>{{ l.author }}</td><td>{{ l.created }}</td><td>{{ l.note }}</td></tr>
{% else %}<tr><td colspan="8" class="none">No labels in the period.</td></tr>{% endfor %}</table>
<h2>Spectra of the top alert</h2>
{% if spectra_png %}<p>{{ spectra_title }}</p><figure><img alt="spectra of the top alert" src="data:image/png;base64,{{ spectra_png }}"></figure>
{% if defects %}<p>Defect frequencies: {{ defects }}</p>{% endif %}
{% else %}<p class="none">{{ spectra_title }}</p>{% endif %}
<h2>Model versions</h2>
<table><tr><th>version</th><th>sensor</th><th>status</th><th>trigger</th><th>created</th><th>reason</th></tr>
{% for v in versions %}<tr><td>{{ v.id }}</td><td>{{ v.sensor }}</td><td>{{ v.status }}</td><td>{{ v.trigger }}</td><td>{{ v.created }}</td><td>{{ v.reason }}</td></tr>
{% else %}<tr><td colspan="6" class="none">No model versions in the registry.</td></tr>{% endfor %}</table>
<h3>Model events in the period</h3>
<table><tr><th>time</th><th>event</th><th>version</th><th>detail</th></tr>
{% for e in events %}<tr><td>{{ e.time }}</td><td>{{ e.event }}</td><td>{{ e.version }}</td><td>{{ e.detail }}</td></tr>
{% else %}<tr><td colspan="4" class="none">None.</td></tr>{% endfor %}</table>
</body></html>
"""


@dataclasses.dataclass(frozen=True)
class Report:
    """A made report: the HTML text and the two CSV texts."""

    html: str
    scores_csv: str
    alerts_csv: str


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _dt(ns: int) -> Any:
    return data.ns_to_datetime(ns)


def _score_png(buckets: Sequence[Any], alerts: Sequence[Any], start_ns: int, end_ns: int, sensor: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3))
    t = [_dt(b.start_ns) for b in buckets]
    ax.step(t, [b.max_score for b in buckets], where="post", color="#1f5fa8", lw=1.2, label="score (max per bucket)")
    thr = [np.nan if b.threshold is None else b.threshold for b in buckets]
    ax.step(t, thr, where="post", color="#d6604d", lw=1.0, ls="--", label="threshold")
    for a in alerts:
        ax.axvspan(_dt(max(a.start_ns, start_ns)), _dt(min(a.end_ns or end_ns, end_ns)), color="#e41a1c", alpha=0.15)
    ax.set_xlim(_dt(start_ns), _dt(end_ns))
    ax.set_ylabel("anomaly score")
    ax.set_xlabel("time (UTC)")
    ax.set_title(f"{sensor}: anomaly score (shaded: alerts)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _png(fig)


def _severity_png(rows: Sequence[Any], zones: Sequence[float], start_ns: int, end_ns: int, sensor: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 2.6))
    v = [r.velocity_rms_mm_s for r in rows]
    top = max([zones[2] * 1.5] + [x * 1.1 for x in v])
    for (lo, hi), zone, col in zip(((0, zones[0]), (zones[0], zones[1]), (zones[1], zones[2]), (zones[2], top)), "ABCD",
                                   ("#1a9850", "#a6d96a", "#fdae61", "#d73027")):
        ax.axhspan(lo, hi, color=col, alpha=0.2)
        ax.text(1.005, (lo + hi) / 2, zone, transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.step([_dt(r.start_ns) for r in rows], v, where="post", color="#222", lw=1.2)
    ax.set_xlim(_dt(start_ns), _dt(end_ns))
    ax.set_ylim(0, top)
    ax.set_ylabel("velocity RMS (mm/s)")
    ax.set_title(f"{sensor}: ISO 20816-3 velocity RMS 10-1000 Hz on zones A-D "
                 f"({zones[0]:g} / {zones[1]:g} / {zones[2]:g} mm/s)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _png(fig)


def _spectra_png(psd: Sequence[Any], env: Sequence[Any], marks: dict[str, float]) -> str:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.2))
    for sp, col in zip(psd, ("#d6604d", "#1f5fa8")):
        a1.plot(sp.freqs_hz, sp.values, color=col, lw=0.9, label=sp.label)
    a1.set_xlabel("frequency (Hz)")
    a1.set_ylabel(f"PSD (dB re 1 {psd[0].unit}²/Hz)")
    a1.set_title("Power spectral density (Welch)", fontsize=10)
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    for sp, col in zip(env, ("#d6604d", "#1f5fa8")):
        a2.plot(sp.freqs_hz, sp.values, color=col, lw=0.9, label=sp.label)
    for name, hz in marks.items():
        a2.axvline(hz, color="#444", ls="--", lw=0.8, alpha=0.8)
        a2.text(hz, 1.0, f" {name}", transform=a2.get_xaxis_transform(), fontsize=7, rotation=90, va="top")
    if env:
        a2.set_xlabel("frequency (Hz)")
        a2.set_ylabel(f"squared envelope ({env[0].unit}²)")
        a2.set_title("Envelope spectrum", fontsize=10)
        a2.grid(alpha=0.3)
    else:
        a2.axis("off")
    fig.tight_layout()
    return _png(fig)


def _fmt(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def build_report(store: Any, cfg: AppConfig, site: str, machine: str, start_ns: int, end_ns: int, *,
                 registry: Any = None, book: Any = None, now_ns: int | None = None) -> Report:
    """The report of ``site/machine`` over ``[start_ns, end_ns)``.

    Args:
        store: the results store (:class:`pdm_edge.store.base.Store`).
        cfg: the configuration (sensors, zones, state directory).
        registry: the model registry, or ``None``.
        book: the label book, or ``None`` (labels then come from the store only).
        now_ns: "now", for open alerts (default: the wall clock).

    Raises:
        StoreError: the store cannot be read.
    """
    import jinja2
    import matplotlib

    matplotlib.use("Agg")
    now_ns = time.time_ns() if now_ns is None else now_ns
    versions = data.registry_versions(registry)
    sensors = data.sensors_of(store, cfg, site, machine, end_ns - 1, versions, lookback_s=(end_ns - start_ns) / NS)
    alerts = [a for a in store.query_alerts(site, machine, start_ns - 7 * 86400 * NS, end_ns)
              if a.end_ns is None or a.end_ns > start_ns]
    labels = [lb for lb, _ in data.machine_labels(store, book, site, machine, start_ns, end_ns)]
    every = data.bucket_seconds((end_ns - start_ns) / NS, 600)
    rows = []
    for sensor in sensors:
        buckets = store.query_score_buckets(site, machine, sensor, start_ns, end_ns, every)
        if not buckets:
            continue
        conds = store.query_condition_buckets(site, machine, sensor, start_ns, end_ns, every)
        scfg = cfg.sensor(site, machine, sensor)
        zones = list(scfg.severity_zones_mm_s) if scfg is not None else list(data.GROUP2_RIGID_MM_S)
        sev = [c for c in conds if c.velocity_rms_mm_s is not None]
        s_alerts = [a for a in alerts if a.sensor == sensor]
        rows.append({
            "sensor": sensor, "windows": sum(b.count for b in buckets), "max_score": _fmt(max(b.max_score for b in buckets)),
            "threshold": _fmt(next((b.threshold for b in reversed(buckets) if b.threshold is not None), None)),
            "zone": sev[-1].zone if sev else None,
            "zone_text": data.zone_text(sev[-1].zone, sev[-1].velocity_rms_mm_s) if sev else "—",
            "alerts": len(s_alerts), "score_png": _score_png(buckets, s_alerts, start_ns, end_ns, sensor),
            "severity_png": _severity_png(sev, zones, start_ns, end_ns, sensor) if sev else None,
        })
    peaks = {a.id: data.alert_peak(store, a, now_ns) for a in alerts}
    alert_rows = [{"state": "OPEN" if a.state == "raised" else "cleared", "sensor": a.sensor, "start": data.fmt_time(a.start_ns),
                   "end": data.fmt_time(a.end_ns) if a.end_ns else "ongoing", "peak": _fmt(peaks[a.id]),
                   "threshold": _fmt(a.threshold), "model_version": a.model_version, "id": a.id,
                   "labels": ", ".join(lb.kind + (f" ({lb.fault_type})" if lb.fault_type else "")
                                       for lb in data.labels_answering(a, labels)) or "—"} for a in alerts]
    label_rows = [{"kind": lb.kind, "fault_type": lb.fault_type or "", "sensor": lb.sensor or "all",
                   "start": data.fmt_time(lb.start_ns), "end": data.fmt_time(lb.end_ns), "author": lb.author,
                   "created": data.fmt_time(lb.created_ns), "note": lb.note or ""} for lb in labels]
    # spectra of the top alert
    spectra_png, spectra_title, defects = None, "No alert in the period.", ""
    if alerts:
        top = max(alerts, key=lambda a: peaks[a.id])
        s1 = top.end_ns if top.end_ns is not None else now_ns
        wins = data.buffer_windows(cfg.feedback.state_dir, site, machine, top.sensor, top.start_ns, s1)
        spectra_title = (f"Alert {top.id} on {top.sensor}, {data.fmt_time(top.start_ns)} to "
                         f"{'ongoing' if top.end_ns is None else data.fmt_time(top.end_ns)}, peak score {peaks[top.id]:.2f}")
        if not wins:
            spectra_title += ": its raw windows are not kept in the labelled-window buffer, so no spectrum can be shown."
        else:
            base = data.baseline_windows(cfg.feedback.state_dir, site, machine, top.sensor)
            psd = [x for x in (data.psd_spectrum(wins, f"alert: {len(wins)} window(s)"),
                               data.psd_spectrum(base, f"baseline: {len(base)} window(s) labelled normal")) if x is not None]
            env: list[Any] = []
            marks: dict[str, float] = {}
            if wins[0].kind == "vibration":
                marks = data.defect_frequencies(cfg.sensor(site, machine, top.sensor))
                fmax = data.envelope_fmax_hz(wins[0].sample_rate_hz, marks)
                env = [x for x in (data.envelope_spectrum(wins, f"alert: {len(wins)} window(s)", fmax),
                                   data.envelope_spectrum(base, "baseline", fmax)) if x is not None]
            spectra_png = _spectra_png(psd, env, marks)
            defects = ", ".join(f"{k} {v:.1f} Hz" for k, v in marks.items())
    version_rows = [{"id": v["id"], "sensor": v["sensor"], "status": v["status"], "trigger": v["trigger"],
                     "created": data.fmt_time(v["created_ns"]), "reason": v["reason"] or ""}
                    for v in versions if v["site"] == site and v["machine"] == machine]
    event_rows = [{"time": data.fmt_time(e.ts_ns), "event": e.event, "version": e.version, "detail": e.detail}
                  for e in store.query_model_events(site, machine, start_ns, end_ns)]
    env_ = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env_.from_string(_TEMPLATE).render(
        site=site, machine=machine, start=data.fmt_time(start_ns), end=data.fmt_time(end_ns), made=data.fmt_time(now_ns),
        store=cfg.store.backend, registry=cfg.registry.dir, sensors=rows, alerts=alert_rows, labels=label_rows,
        spectra_png=spectra_png, spectra_title=spectra_title, defects=defects, versions=version_rows, events=event_rows)
    return Report(html, scores_csv(store, site, machine, start_ns, end_ns), alerts_csv(alerts, peaks))


def data_period(store: Any, cfg: AppConfig, site: str, machine: str, max_s: float = 30 * 86400.0) -> tuple[int, int] | None:
    """The machine's data span (first to last score of any sensor within ``max_s`` of its newest,
    :func:`dashboard.data.score_span`) with 5 % room (at least 10 s) each side, as
    ``(start_ns, end_ns)``; ``None`` when it has no score."""
    newest = next((m.last_score_ns for m in store.machines() if (m.site, m.machine) == (site, machine)), None)
    if newest is None:
        return None
    spans = [sp for s in data.sensors_of(store, cfg, site, machine, newest)
             if (sp := data.score_span(store, site, machine, s, newest, max_s)) is not None]
    if not spans:
        return None
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    pad = max(10 * NS, (last - first) // 20)
    return first - pad, last + pad


def scores_csv(store: Any, site: str, machine: str, start_ns: int, end_ns: int) -> str:
    """Every score of the machine in ``[start_ns, end_ns)`` as CSV: ``time_utc`` (ISO 8601),
    ``start_ns``, ``sensor``, ``score``, ``threshold`` (empty: uncalibrated), ``is_anomaly``,
    ``model_version``."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["time_utc", "start_ns", "sensor", "score", "threshold", "is_anomaly", "model_version"])
    for s in store.query_scores(site, machine, start_ns, end_ns):
        w.writerow([data.ns_to_datetime(s.start_ns).isoformat(), s.start_ns, s.sensor, repr(s.score),
                    "" if s.threshold is None else repr(s.threshold), int(s.is_anomaly), s.model_version or ""])
    return out.getvalue()


def alerts_csv(alerts: Sequence[Any], peaks: dict[str, float] | None = None) -> str:
    """Alerts as CSV: ``alert_id, sensor, state, start_utc, end_utc`` (empty while open),
    ``start_ns, end_ns, peak_score`` (an open alert's peak so far when ``peaks`` has it),
    ``threshold, model_version``, and the nearest confirmed fault ``match_label_id,
    match_fault_type, match_similarity`` (empty when none)."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["alert_id", "sensor", "state", "start_utc", "end_utc", "start_ns", "end_ns", "peak_score", "threshold",
                "model_version", "match_label_id", "match_fault_type", "match_similarity"])
    for a in alerts:
        m = a.fault_match
        w.writerow([a.id, a.sensor, a.state, data.ns_to_datetime(a.start_ns).isoformat(),
                    "" if a.end_ns is None else data.ns_to_datetime(a.end_ns).isoformat(), a.start_ns,
                    "" if a.end_ns is None else a.end_ns, repr((peaks or {}).get(a.id, a.peak_score)), repr(a.threshold),
                    a.model_version, m.label_id if m else "", (m.fault_type or "") if m else "", repr(m.similarity) if m else ""])
    return out.getvalue()
