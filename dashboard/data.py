"""Data access of the dashboard: every read (and the two kinds of write) it does, without Streamlit.

Units and conventions: times are integer ns since the epoch, UTC (``*_ns``), as in
:mod:`pdm_edge.types`; durations are seconds (``*_s``); frequencies Hz; anomaly scores are
dimensionless (units of the machine's normal spread, higher = more anomalous); spectra are in
dB re 1 unit^2/Hz (PSD) or unit^2 (squared-envelope spectrum), the unit being the stream's
(g, m/s^2, Pa or FS).

Sources, and the decisions about them:

- **Results store** (:class:`pdm_edge.store.base.Store`): scores, alerts, labels, model events.
  Read only; the running appliance writes it through its spool.
- **Label book** (``[feedback] state_dir``/labels.sqlite, :class:`pdm_edge.feedback.LabelBook`):
  labels are *written* here, through :func:`pdm_edge.feedback.submit_label` (the one way a
  label enters pdm-edge), and *read* here as well as from the store: the appliance forwards new
  labels from the book to the store within seconds, but a label must show on the machine page
  at once, and when the appliance is down it is only in the book. The two are merged by label
  id (:func:`merge_labels`).
- **Registry** (``[registry] dir``, :class:`pdm_edge.registry.Registry`): model versions; the
  dashboard's other write is :meth:`Registry.promote` / :meth:`Registry.rollback` (engineers
  only; the running service notices registry changes itself). A registry that does not exist
  yet is not created: it reads as empty.
- **Labelled-window buffer** (``[feedback] state_dir``/label_windows.sqlite): the raw windows
  the appliance keeps for alerts and labels, the only raw data on the appliance, opened
  read-only (:class:`~pdm_edge.feedback.windows.LabelledWindowBuffer` with ``readonly=True``)
  and queried by time span (an alert that has no label yet) or for the normal-labelled
  reference windows. It never writes the file, which the appliance owns.
- **Service endpoints**: ``http://{[service] http}/healthz`` (JSON) and ``/metrics``
  (Prometheus text format, parsed by :func:`parse_prometheus`), read with a short timeout;
  when unreachable the health page says so.

Fleet status (:func:`fleet_status`) follows the rules of
:class:`pdm_edge.alerts.AlertTracker`: per sensor, ``alarm`` (the machine has an open alert),
``uncalibrated`` (the latest score has no threshold), ``warning`` (the latest score is above its
threshold), ``normal``; the machine takes its worst sensor. A machine is **stale** when its
newest score (window start) is older than ``[alerts] stale_after_s``; the dashboard then shows
it as ``stale`` instead of ``normal``/``warning`` (never as healthy); an ``alarm`` stays an
alarm. A machine known from ``[sensors]`` or the registry but never scored is
``uncalibrated``. The "latest score of each sensor" is the newest score of that sensor within
``stale_after_s`` before the machine's newest score (one short range query per machine); a
sensor silent for longer is listed as silent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pdm_edge import condition as _condition
from pdm_edge.config import AppConfig, SensorConfig, parse_host_port
from pdm_edge.store.base import MachineState, ModelEvent, ScoreBucket, Store
from pdm_edge.types import Alert, Label, Window

NS = 1_000_000_000
GROUP2_RIGID_MM_S = _condition.GROUP2_RIGID_MM_S
"""Default ISO 20816-3 zone boundaries (mm/s), for the pages."""
ZONE_MEANING = _condition.ZONE_MEANING

STATUSES: tuple[str, ...] = ("alarm", "warning", "stale", "uncalibrated", "normal")
"""What the fleet view shows per machine, most urgent first (the sort order)."""

STATUS_ICONS: Mapping[str, str] = {
    "alarm": ":red[:material/error:]", "warning": ":orange[:material/warning:]", "stale": ":violet[:material/schedule:]",
    "uncalibrated": ":gray[:material/help:]", "normal": ":green[:material/check_circle:]"}
"""Status icons as Streamlit Markdown (Material Symbols ship with Streamlit; emoji fonts are missing on many
control-room PCs)."""

DEFAULT_MAX_POINTS = 1500
"""Most points a score chart draws; longer ranges are downsampled to buckets (max per bucket)."""

_NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


# ---------------------------------------------------------------------------------------------
# formatting helpers (pure)


def ns_to_datetime(ns: int) -> datetime:
    """ns since the epoch -> aware ``datetime`` in UTC (microsecond resolution)."""
    return datetime.fromtimestamp(ns / NS, tz=timezone.utc)


def fmt_time(ns: int | None, *, seconds: bool = True) -> str:
    """``2026-11-21 08:00:05 UTC`` (or ``—`` for ``None``)."""
    if ns is None:
        return "—"
    return ns_to_datetime(ns).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") + " UTC"


def fmt_age(age_s: float | None) -> str:
    """A duration in seconds as ``"12 s ago"``, ``"5 min ago"``, ``"3.2 h ago"``, ``"4.0 d ago"``
    (``"never"`` for ``None``; ``"in the future"`` for a negative age: a clock problem)."""
    if age_s is None:
        return "never"
    if age_s < -1:
        return "in the future"
    age_s = max(age_s, 0.0)
    if age_s < 90:
        return f"{age_s:.0f} s ago"
    if age_s < 90 * 60:
        return f"{age_s / 60:.0f} min ago"
    if age_s < 48 * 3600:
        return f"{age_s / 3600:.1f} h ago"
    return f"{age_s / 86400:.1f} d ago"


def fmt_bytes(n: int | None) -> str:
    """Bytes as ``"812 B"``, ``"97.6 kB"``, ``"3.1 MB"`` (decimal units)."""
    if n is None:
        return "—"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


def fmt_duration(s: float) -> str:
    """Seconds as ``"30 s"``, ``"5 min"``, ``"2 h"``, ``"1 d"``; a duration that is not a whole
    number of its unit in two units, rounded to the smaller: ``"2 h 16 min"``, ``"3 d 4 h"``."""
    if s < 60:
        return f"{s:g} s"
    for big, name, small, small_name in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if s >= big:
            if s % big == 0:
                return f"{s / big:g} {name}"
            r = round(s / small) * small
            if r != s:  # rounded to the smaller unit, which may reach the next larger one
                return fmt_duration(r)
            n, rest = divmod(round(s / small), big // small)
            return f"{n} {name} {rest} {small_name}"
    raise AssertionError("unreachable")


def split_stream(key: str) -> tuple[str, str, str]:
    """``"site/machine/sensor"`` -> its three names."""
    site, machine, sensor = key.split("/")
    return site, machine, sensor


# ---------------------------------------------------------------------------------------------
# fleet


@dataclasses.dataclass(frozen=True)
class SensorState:
    """The latest score of one sensor of a machine (see the module docstring for the rules).

    Attributes:
        state: ``"alarm"``, ``"warning"``, ``"uncalibrated"`` or ``"normal"`` (alarm: the
            machine has an open alert raised by this sensor or any other).
        last_score_ns: window start of the sensor's newest score (ns, UTC).
        score: that score (dimensionless), threshold: its threshold (``None``: uncalibrated).
    """

    sensor: str
    state: str
    last_score_ns: int
    score: float
    threshold: float | None
    model_version: str | None


@dataclasses.dataclass(frozen=True)
class FleetRow:
    """One machine of the fleet view.

    Attributes:
        status: what the dashboard shows, one of :data:`STATUSES`.
        state: the health state without staleness (``alarm``/``warning``/``uncalibrated``/``normal``).
        stale: newest score older than ``stale_after_s`` (or never scored).
        last_score_ns: window start of the newest score (ns, UTC), ``None`` if never scored.
        last_score, last_threshold: the latest score and threshold of the sensor whose latest score is
            highest relative to its threshold (the newest score when no sensor is calibrated);
            dimensionless.
        age_s: seconds between the newest score's window start and ``now`` (``None``: never).
        open_alerts: alerts whose latest state is ``raised``.
        model_version: model version of the newest score (what scores the machine now).
        registry_active: active registry versions of the machine's sensors (``sensor: id``).
        sensors: sensor states (latest score each), sorted by sensor name.
        silent_sensors: sensors known from the config or registry with no score within
            ``stale_after_s`` of the machine's newest score.
    """

    site: str
    machine: str
    status: str
    state: str
    stale: bool
    last_score_ns: int | None
    last_score: float | None
    last_threshold: float | None
    age_s: float | None
    open_alerts: int
    model_version: str | None
    registry_active: tuple[str, ...] = ()
    sensors: tuple[SensorState, ...] = ()
    silent_sensors: tuple[str, ...] = ()
    zone: str | None = None
    """ISO 20816-3 zone (A-D) of the newest condition record, the worst over the machine's
    sensors; ``None`` without one (acoustic only, or never measured)."""
    velocity_rms_mm_s: float | None = None
    """The velocity RMS (mm/s, 10-1000 Hz) behind ``zone``."""

    @property
    def key(self) -> str:
        """``"site/machine"``."""
        return f"{self.site}/{self.machine}"

    @property
    def ratio(self) -> float | None:
        """Newest score divided by its threshold (> 1: above threshold), ``None`` without one."""
        if self.last_score is None or not self.last_threshold:
            return None
        return self.last_score / self.last_threshold


def _sensor_state(score: float, threshold: float | None) -> str:
    if threshold is None:
        return "uncalibrated"
    if math.isfinite(score) and score > threshold:
        return "warning"
    return "normal"


def machine_display_status(state: str, stale: bool, ever_scored: bool) -> str:
    """The fleet status shown for a machine: an alarm stays an alarm; a machine that stopped
    sending is ``stale`` (never ``normal``); one never scored is ``uncalibrated``."""
    if state == "alarm":
        return "alarm"
    if not ever_scored:
        return "uncalibrated"
    if stale:
        return "stale"
    return state


def urgency_key(row: FleetRow) -> tuple[Any, ...]:
    """Sort key of the fleet view: status (:data:`STATUSES` order), then more open alerts, then
    higher score/threshold, then name."""
    ratio = row.ratio
    return (STATUSES.index(row.status), -row.open_alerts, -(ratio if ratio is not None else -math.inf),
            row.site, row.machine)


def known_streams(cfg: AppConfig, registry_versions: Iterable[Mapping[str, Any]] = ()) -> set[tuple[str, str, str]]:
    """``(site, machine, sensor)`` of every stream in ``[sensors]`` and in the registry."""
    out = {split_stream(k) for k in cfg.sensors}
    for v in registry_versions:
        out.add((v["site"], v["machine"], v["sensor"]))
    return out


def fleet_status(store: Store, cfg: AppConfig, now_ns: int,
                 registry_versions: Sequence[Mapping[str, Any]] = ()) -> list[FleetRow]:
    """Every machine (scored, configured or registered) with its status, sorted by urgency.

    Args:
        store: the results store.
        cfg: the configuration (``[alerts] stale_after_s``, ``[sensors]``).
        now_ns: the current time (ns, UTC).
        registry_versions: the registry's versions as dicts (:meth:`RegisteredVersion.to_dict`),
            for machines not scored yet and for the active version of each sensor.

    Raises:
        StoreError: the store cannot be read.
    """
    stale_ns = round(cfg.alerts.stale_after_s * NS)
    streams = known_streams(cfg, registry_versions)
    active: dict[tuple[str, str], list[str]] = {}
    for v in registry_versions:
        if v["status"] == "active":
            active.setdefault((v["site"], v["machine"]), []).append(f"{v['sensor']}: {v['id']}")
    rows: list[FleetRow] = []
    seen: set[tuple[str, str]] = set()
    for ms in store.machines():
        seen.add((ms.site, ms.machine))
        rows.append(_scored_row(store, ms, now_ns, stale_ns, streams, active))
    for site, machine in sorted({(s, m) for s, m, _ in streams} - seen):
        rows.append(FleetRow(site=site, machine=machine, status="uncalibrated", state="uncalibrated", stale=True,
                             last_score_ns=None, last_score=None, last_threshold=None, age_s=None, open_alerts=0,
                             model_version=None, registry_active=tuple(sorted(active.get((site, machine), []))),
                             silent_sensors=tuple(sorted(se for s, m, se in streams if (s, m) == (site, machine)))))
    rows.sort(key=urgency_key)
    return rows


def _scored_row(store: Store, ms: MachineState, now_ns: int, stale_ns: int, streams: set[tuple[str, str, str]],
                active: Mapping[tuple[str, str], list[str]]) -> FleetRow:
    sensors: dict[str, SensorState] = {}
    if ms.last_score_ns is not None:
        for s in store.query_scores(ms.site, ms.machine, ms.last_score_ns - stale_ns, ms.last_score_ns + 1):
            sensors[s.sensor] = SensorState(s.sensor, _sensor_state(s.score, s.threshold), s.start_ns, s.score,
                                            s.threshold, s.model_version)  # sorted by time: the newest wins
    if ms.open_alerts > 0:
        sensors = {k: dataclasses.replace(v, state="alarm") for k, v in sensors.items()}
        state = "alarm"
    elif sensors:
        state = min((v.state for v in sensors.values()), key=STATUSES.index)
    elif ms.last_score_ns is not None:  # a store that answered machines() but not the range (should not happen)
        state = _sensor_state(ms.last_score if ms.last_score is not None else 0.0, ms.last_threshold)
    else:
        state = "uncalibrated"  # alerts but no scores
    last_score, last_thr = ms.last_score, ms.last_threshold
    calibrated = [v for v in sensors.values() if v.threshold]
    if calibrated:
        worst = max(calibrated, key=lambda v: v.score / v.threshold if math.isfinite(v.score) else -math.inf)
        last_score, last_thr = worst.score, worst.threshold
    ever = ms.last_score_ns is not None
    stale = not ever or now_ns - (ms.last_score_ns or 0) > stale_ns
    zone, vel = None, None
    if ms.last_score_ns is not None:
        newest: dict[str, Any] = {}
        for cnd in store.query_conditions(ms.site, ms.machine, ms.last_score_ns - stale_ns, ms.last_score_ns + 1):
            if cnd.zone is not None:
                newest[cnd.sensor] = cnd  # sorted by time: the newest wins
        if newest:
            worst = max(newest.values(), key=lambda x: (x.zone, x.velocity_rms_mm_s or 0.0))
            zone, vel = worst.zone, worst.velocity_rms_mm_s
    known = {se for s, m, se in streams if (s, m) == (ms.site, ms.machine)}
    return FleetRow(
        site=ms.site, machine=ms.machine, status=machine_display_status(state, stale, ever), state=state, stale=stale,
        last_score_ns=ms.last_score_ns, last_score=last_score, last_threshold=last_thr,
        age_s=None if ms.last_score_ns is None else (now_ns - ms.last_score_ns) / NS, open_alerts=ms.open_alerts,
        model_version=ms.model_version, registry_active=tuple(sorted(active.get((ms.site, ms.machine), []))),
        sensors=tuple(sensors[k] for k in sorted(sensors)), silent_sensors=tuple(sorted(known - set(sensors))),
        zone=zone, velocity_rms_mm_s=vel,
    )


def stale_alarm(row: FleetRow) -> bool:
    """An alarm whose newest score is older than ``stale_after_s``: shown and counted as an alarm,
    and marked stale."""
    return row.status == "alarm" and row.stale and row.last_score_ns is not None


def status_text(row: FleetRow) -> str:
    """The fleet table's status: urgent states in capitals; a stale alarm says so
    (``"ALARM · stale"``), so that the table agrees with the "stale" definition in its caption."""
    text = row.status.upper() if row.status in ("alarm", "warning", "stale") else row.status
    return text + " · stale" if stale_alarm(row) else text


def zone_text(zone: str | None, velocity_mm_s: float | None) -> str:
    """``"B · 2.26 mm/s"`` (ISO 20816-3 zone and velocity RMS), ``"—"`` without one."""
    if zone is None or velocity_mm_s is None:
        return "—"
    return f"{zone} · {velocity_mm_s:.2f} mm/s"


def status_counts(rows: Iterable[FleetRow]) -> dict[str, int]:
    """How many machines have each status (every status present, zeros included)."""
    out = {s: 0 for s in STATUSES}
    for r in rows:
        out[r.status] += 1
    return out


# ---------------------------------------------------------------------------------------------
# machine detail: scores, alerts, labels, model events


def bucket_seconds(span_s: float, max_points: int = DEFAULT_MAX_POINTS, min_s: float = 1.0) -> float:
    """The bucket length (s) that keeps a ``span_s`` range within ``max_points`` buckets,
    rounded up to a readable value (1 s, 2 s, 5 s, ..., 1 h, ..., 1 d, then whole days)."""
    need = max(min_s, span_s / max(1, max_points))
    for b in _NICE_BUCKETS_S:
        if b >= need:
            return float(b)
    return float(math.ceil(need / 86400) * 86400)


def score_buckets(store: Store, site: str, machine: str, sensor: str, start_ns: int, end_ns: int,
                  max_points: int = DEFAULT_MAX_POINTS) -> tuple[list[ScoreBucket], float]:
    """One sensor's scores in ``[start_ns, end_ns)`` downsampled with
    :meth:`Store.query_score_buckets` (maximum score per bucket, so a spike is never averaged
    away). Returns ``(buckets, bucket length in s)``."""
    every = bucket_seconds((end_ns - start_ns) / NS, max_points)
    return store.query_score_buckets(site, machine, sensor, start_ns, end_ns, every), every


def score_span(store: Store, site: str, machine: str, sensor: str, newest_ns: int,
               max_s: float = 30 * 86400.0) -> tuple[int, int] | None:
    """``(first, last)`` window start (ns) of one sensor's scores in the ``max_s`` seconds up to
    ``newest_ns`` (the machine's newest score), ``None`` when it has none there. Found with
    downsampled queries (:meth:`Store.query_score_buckets`: days, then minutes, then seconds),
    so it costs the same on a month of data as on a minute; exact to the second."""
    def narrow(lo: int, hi: int, first: bool) -> int | None:
        t = None
        for every in (86400.0, 60.0, 1.0):
            b = store.query_score_buckets(site, machine, sensor, lo, hi, every)
            if not b:
                return t
            t = b[0].start_ns if first else b[-1].start_ns
            lo, hi = max(lo, t), min(hi, t + round(every * NS))
        return t

    end = newest_ns + NS
    start = end - round(max_s * NS)
    first = narrow(start, end, True)
    last = narrow(start, end, False)
    if first is None or last is None:
        return None
    return first, max(first, last)


def chart_range(span: tuple[int, int] | None, now_ns: int, span_s: float | None,
                newest_ns: int | None) -> tuple[int, int, str]:
    """The score chart's ``(start_ns, end_ns, note)``.

    ``span_s`` ``None`` ("data span", the default): the sensor's scores ``span`` with 5 % room on
    each side (at least 10 s), so that a minute of data fills the chart instead of being a line
    at its edge. Otherwise the ``span_s`` seconds up to now (bucket-aligned), or up to the
    newest score when there is none in that range (with a note saying so)."""
    if span_s is None:
        if span is None:
            return now_ns - 3600 * NS, now_ns, ""
        first, last = span
        pad = max(10 * NS, (last - first) // 20)
        return first - pad, last + pad, ""
    every_ns = round(bucket_seconds(span_s) * NS)
    end_ns = math.ceil(now_ns / every_ns) * every_ns
    note = ""
    if newest_ns is not None and newest_ns < end_ns - round(span_s * NS):
        end_ns = (newest_ns // every_ns + 2) * every_ns
        note = f"No score in the last {fmt_duration(span_s)}: showing the {fmt_duration(span_s)} up to the newest score ({fmt_time(newest_ns)})."
    return end_ns - round(span_s * NS), end_ns, note


def alert_peak(store: Store, alert: Alert, now_ns: int) -> float:
    """An alert's peak score: the stored one for a cleared alert; for an open one, the highest
    score of its sensor from its start to ``now_ns`` (the stored record is the raise's, and the
    score may have grown a lot since)."""
    if alert.end_ns is not None or now_ns <= alert.start_ns:
        return alert.peak_score
    b = store.query_score_buckets(alert.site, alert.machine, alert.sensor, alert.start_ns, now_ns + 1,
                                  (now_ns - alert.start_ns) / NS + 1.0)
    return max([alert.peak_score] + [x.max_score for x in b])


def sensors_of(store: Store, cfg: AppConfig, site: str, machine: str, newest_ns: int | None,
               registry_versions: Sequence[Mapping[str, Any]] = (), lookback_s: float = 600.0) -> list[str]:
    """Sensor names of a machine: from ``[sensors]``, the registry, and the scores of the
    ``lookback_s`` seconds up to its newest score (``newest_ns``)."""
    names = {se for s, m, se in known_streams(cfg, registry_versions) if (s, m) == (site, machine)}
    if newest_ns is not None:
        names.update(s.sensor for s in store.query_scores(site, machine, newest_ns - round(lookback_s * NS), newest_ns + 1))
    return sorted(names)


def merge_labels(store_labels: Iterable[Label], book_labels: Iterable[Label]) -> list[tuple[Label, str]]:
    """Labels from the store and from the label book, one per id, sorted by (start, id), each
    with where it was found: ``"store"`` (forwarded by the appliance) or ``"label book"`` (not
    yet in the store). The store's copy wins on a tie (they are identical: first submission
    wins in the book, and the appliance forwards the book's record)."""
    out: dict[str, tuple[Label, str]] = {}
    for lb in book_labels:
        out[lb.id] = (lb, "label book")
    for lb in store_labels:
        out[lb.id] = (lb, "store")
    return sorted(out.values(), key=lambda t: (t[0].start_ns, t[0].id))


def machine_labels(store: Store, book: Any, site: str, machine: str, start_ns: int, end_ns: int) -> list[tuple[Label, str]]:
    """Labels of a machine overlapping ``[start_ns, end_ns)``, from the store and the book
    (:func:`merge_labels`). The store is asked for labels starting up to 7 days before the
    range (the longest span a label may have) so that a label running into the range shows."""
    from pdm_edge.feedback import LabelLimits

    pre = round(LabelLimits().max_span_s * NS)
    store_labels = [lb for lb in store.query_labels(site, machine, start_ns - pre, end_ns) if lb.end_ns > start_ns]
    book_labels = book.list(site=site, machine=machine, start_ns=start_ns, end_ns=end_ns) if book is not None else []
    return merge_labels(store_labels, book_labels)


def labels_answering(alert: Alert, labels: Iterable[Label]) -> list[Label]:
    """Labels that answer ``alert``: those naming its id, else those of the same machine (and
    sensor, or every sensor) whose span overlaps the alert's."""
    labels = list(labels)
    named = [lb for lb in labels if lb.alert_id == alert.id]
    if named:
        return named
    end = alert.end_ns if alert.end_ns is not None else alert.start_ns + 1
    return [lb for lb in labels if lb.alert_id is None and lb.site == alert.site and lb.machine == alert.machine
            and (lb.sensor is None or lb.sensor == alert.sensor) and lb.start_ns < max(end, alert.start_ns + 1)
            and lb.end_ns > alert.start_ns]


def model_version_changes(scores: Sequence[tuple[int, str | None]]) -> list[tuple[int, str | None]]:
    """From ``(time, model_version)`` pairs sorted by time, the points where the version changes
    (the first point included)."""
    out: list[tuple[int, str | None]] = []
    for t, v in scores:
        if not out or out[-1][1] != v:
            out.append((t, v))
    return out


# ---------------------------------------------------------------------------------------------
# labelling queue


@dataclasses.dataclass(frozen=True)
class QueueItem:
    """One alert of the labelling queue with the labels that answer it (empty: unlabelled)."""

    alert: Alert
    labels: tuple[Label, ...]

    @property
    def labelled(self) -> bool:
        return bool(self.labels)


def label_queue(alerts: Iterable[Alert], labels: Iterable[Label]) -> list[QueueItem]:
    """Alerts with their answering labels: unlabelled first (open ones first, then newest
    first), then labelled ones, newest first."""
    labels = list(labels)
    items = [QueueItem(a, tuple(labels_answering(a, labels))) for a in alerts]
    return sorted(items, key=lambda it: (it.labelled, it.alert.state != "raised", -it.alert.start_ns, it.alert.id))


def label_span_for_alert(alert: Alert, now_ns: int) -> tuple[int, int]:
    """The span a label answering ``alert`` covers: the alert's span; an open alert's runs to
    ``now_ns`` (the moment of labelling), at least 1 s."""
    end = alert.end_ns if alert.end_ns is not None else max(now_ns, alert.start_ns + NS)
    return alert.start_ns, max(end, alert.start_ns + 1)


def after_label(label: Label, model_events: Iterable[ModelEvent],
                registry_versions: Iterable[Mapping[str, Any]]) -> tuple[list[ModelEvent], list[Mapping[str, Any]]]:
    """What the model did after ``label`` was given: model events of its machine at or after
    ``label.created_ns``, and registry versions of its machine (and sensor, if the label names
    one) created at or after it (candidate / active / rejected, with trigger and reason)."""
    events = [e for e in model_events if e.site == label.site and e.machine == label.machine and e.ts_ns >= label.created_ns]
    versions = [v for v in registry_versions if v["site"] == label.site and v["machine"] == label.machine
                and (label.sensor is None or v["sensor"] == label.sensor) and v["created_ns"] >= label.created_ns]
    return sorted(events, key=lambda e: e.ts_ns), sorted(versions, key=lambda v: v["created_ns"])


# ---------------------------------------------------------------------------------------------
# registry


def open_registry(root: str | os.PathLike[str]) -> Any:
    """The :class:`pdm_edge.registry.Registry` at ``root``, or ``None`` when none exists there
    yet (it is not created: the appliance creates it at its first calibration)."""
    if not (Path(root) / "registry.sqlite").is_file():
        return None
    from pdm_edge.registry import Registry

    return Registry(root, create=False)


def registry_versions(registry: Any) -> list[dict[str, Any]]:
    """Every version of the registry as a plain dict (:meth:`RegisteredVersion.to_dict`), by
    stream then age; ``[]`` without a registry."""
    if registry is None:
        return []
    return [v.to_dict() for v in registry.list()]


# ---------------------------------------------------------------------------------------------
# raw windows (labelled-window buffer, read-only)

def _buffer(state_dir: str | os.PathLike[str]) -> Any:
    """The labelled-window buffer of ``state_dir`` opened read-only, or ``None`` when it does
    not exist (yet) or cannot be read."""
    from pdm_edge.errors import StoreError
    from pdm_edge.feedback.windows import LabelledWindowBuffer

    path = Path(state_dir) / LabelledWindowBuffer.FILENAME
    if not path.is_file():
        return None
    try:
        return LabelledWindowBuffer(path, readonly=True)
    except StoreError:
        return None


def _read_buffer(state_dir: str | os.PathLike[str], fn: Any, default: Any) -> Any:
    from pdm_edge.errors import StoreError

    buf = _buffer(state_dir)
    if buf is None:
        return default
    try:
        return fn(buf)
    except StoreError:  # locked beyond the timeout: show nothing rather than fail the page
        return default
    finally:
        buf.close()


def buffer_windows(state_dir: str | os.PathLike[str], site: str, machine: str, sensor: str | None,
                   start_ns: int, end_ns: int, limit: int = 64) -> list[Window]:
    """Raw windows kept in the labelled-window buffer that overlap ``[start_ns, end_ns)`` (of one
    sensor, or every sensor when ``None``), sorted by (sensor, start); at most ``limit``, evenly
    spread over the span when there are more
    (:meth:`~pdm_edge.feedback.windows.LabelledWindowBuffer.windows_between`). ``[]`` when the
    buffer does not exist."""
    return _read_buffer(state_dir, lambda b: b.windows_between(site, machine, sensor, start_ns, end_ns, limit), [])


def baseline_windows(state_dir: str | os.PathLike[str], site: str, machine: str, sensor: str, limit: int = 64,
                     before_ns: int | None = None) -> list[Window]:
    """The stream's reference windows for a baseline spectrum: windows in the buffer whose
    strongest label is ``normal``, newest first, at most ``limit`` (only those starting before
    ``before_ns`` when given)."""
    return _read_buffer(state_dir, lambda b: b.normal_windows(site, machine, sensor, limit, before_ns), [])


def buffer_summary(state_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``{"windows", "bytes", "by_class": {class: windows}}`` of the buffer, read-only; ``None``
    when it does not exist."""
    st = _read_buffer(state_dir, lambda b: b.stats(), None)
    if st is None:
        return None
    return {"windows": st.windows, "bytes": st.bytes, "by_class": {c: v["windows"] for c, v in st.by_class.items()}}


# ---------------------------------------------------------------------------------------------
# spectra


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """A spectrum for a chart.

    Attributes:
        freqs_hz: frequencies, Hz.
        values: ``10 log10`` of the mean PSD over the windows, dB re 1 unit^2/Hz (``kind ==
            "psd"``), or the mean squared-envelope spectrum, unit^2 (``kind == "envelope"``).
        n_windows: how many windows were averaged.
        unit: the stream's unit (g, m/s2, Pa, FS).
        label: what it is (legend text).
    """

    freqs_hz: np.ndarray
    values: np.ndarray
    n_windows: int
    unit: str
    kind: str
    label: str


def _same_rate(windows: Sequence[Window]) -> list[Window]:
    """The windows sharing the most common (sample rate, length): spectra average like with like."""
    if not windows:
        return []
    keys = [(w.sample_rate_hz, w.n_samples) for w in windows]
    best = max(set(keys), key=keys.count)
    return [w for w, k in zip(windows, keys) if k == best]


def psd_spectrum(windows: Sequence[Window], label: str, floor_db: float = -160.0) -> Spectrum | None:
    """Mean Welch PSD (:func:`pdm_edge.features.welch_psd`) of ``windows`` in dB re 1 unit^2/Hz
    (powers averaged, then the log); ``None`` for no windows."""
    from pdm_edge import features

    ws = _same_rate(windows)
    if not ws:
        return None
    x = np.stack([w.samples for w in ws])
    f, p = features.welch_psd(x, ws[0].sample_rate_hz)
    db = 10.0 * np.log10(p.mean(axis=0) + 10.0 ** (floor_db / 10.0))
    return Spectrum(f, db, len(ws), ws[0].unit, "psd", label)


def envelope_fmax_hz(fs: float, defect_hz: Mapping[str, float] | None) -> float:
    """Upper frequency of the envelope chart: 640 Hz (the feature default), or enough for
    three harmonics of the highest defect frequency, below ``0.45 * fs``."""
    fmax = 640.0
    if defect_hz:
        fmax = max(fmax, 3.3 * max(defect_hz.values()))
    return float(min(fmax, 0.45 * fs))


def envelope_spectrum(windows: Sequence[Window], label: str, fmax_hz: float | None = None) -> Spectrum | None:
    """Mean squared-envelope spectrum (:func:`pdm_edge.features.envelope_spectrum`, unit^2,
    demodulation band ``(0.1, 0.4) * min(fs, 25.6 kHz)`` as in the features) of ``windows``, on
    bins as fine as the window length allows (``fs / N`` Hz), up to ``fmax_hz``; ``None`` for no
    windows."""
    from pdm_edge import features

    ws = _same_rate(windows)
    if not ws:
        return None
    fs = ws[0].sample_rate_hz
    fs_c = features.canonical_rate("vibration", fs)
    band = (0.1 * fs_c, min(0.4 * fs_c, 0.49 * fs))
    fmax = float(fmax_hz if fmax_hz is not None else envelope_fmax_hz(fs, None))
    res = fs / ws[0].n_samples
    n_bins = int(max(16, min(4096, math.floor(fmax / res) + 1)))
    x = np.stack([w.samples for w in ws])
    f, ses = features.envelope_spectrum(x, fs, band, fmax_hz=fmax, n_bins=n_bins)
    return Spectrum(f, ses.mean(axis=0).astype(np.float64), len(ws), ws[0].unit, "envelope", label)


def defect_frequencies(sensor_cfg: SensorConfig | None) -> dict[str, float]:
    """BPFO, BPFI, BSF, 2×BSF and FTF in Hz from the sensor's ``bearing`` and ``shaft_hz``
    (:mod:`pdm_edge.bearing`); ``{}`` when either is missing."""
    if sensor_cfg is None or sensor_cfg.bearing is None or sensor_cfg.shaft_hz is None:
        return {}
    d = sensor_cfg.bearing.geometry().defect_frequencies(sensor_cfg.shaft_hz)
    return {"BPFO": d.bpfo_hz, "BPFI": d.bpfi_hz, "BSF": d.bsf_hz, "2×BSF": 2 * d.bsf_hz, "FTF": d.ftf_hz}


def calibration_baseline_psd(registry: Any, site: str, machine: str, sensor: str,
                             version_id: str | None = None) -> tuple[Spectrum, str] | None:
    """An approximate baseline PSD from a model version's calibration statistics: the mean band
    power of each of its 64 mel bands over the calibration windows (channel 0 of the
    standardisation, dB re 1 unit^2), divided by the band's equivalent bandwidth (half the
    distance between its neighbours' centres; neighbouring triangles sum to one) to give
    dB re 1 unit^2/Hz at the band centres. Bands at the feature floor (above ``0.45 fs``) are
    dropped. Approximate: a mean of dB values, not the dB of a mean power.

    Uses ``version_id`` when given and present, else the stream's active version. Returns
    ``(spectrum, version id)`` or ``None`` (no registry, no version, unreadable or tampered
    file: the file's sha256 must match the registry's record).
    """
    if registry is None:
        return None
    rec = None
    if version_id:
        try:
            rec = registry.get(version_id)
        except Exception:
            rec = None
    if rec is None or (rec.site, rec.machine, rec.sensor) != (site, machine, sensor):
        rec = registry.active(site, machine, sensor)
    if rec is None:
        return None
    try:
        data = registry.path(rec.id).read_bytes()
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            return None
        import torch

        state = torch.load(io.BytesIO(data), weights_only=True)["state"]
        mean = np.asarray(state["standardizer"]["mean"].numpy(), dtype=np.float64)[0, :, 0]
        feats = dict(state["config"]["features"])
    except Exception:  # a damaged file or an unknown layout: no baseline rather than an error page
        return None
    from pdm_edge import features

    n = mean.shape[0]
    pts = features.mel_to_hz(np.linspace(features.hz_to_mel(float(feats["fmin_hz"])),
                                         features.hz_to_mel(float(feats["fmax_hz"])), n + 2))
    centres, bw = pts[1:-1], (pts[2:] - pts[:-2]) / 2.0
    floor = float(feats.get("floor_db", features.DEFAULT_FLOOR_DB))
    keep = mean > floor + 1.0
    if not keep.any():
        return None
    unit = "g" if feats.get("kind") == "vibration" else "Pa"
    spec = Spectrum(centres[keep], mean[keep] - 10.0 * np.log10(bw[keep]), 0, unit, "psd",
                    f"calibration baseline of {rec.id} (64 mel bands, approx.)")
    return spec, rec.id


# ---------------------------------------------------------------------------------------------
# system health


@dataclasses.dataclass(frozen=True)
class Sample:
    """One Prometheus sample: metric name, labels, value."""

    name: str
    labels: Mapping[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """Samples of a Prometheus text-format exposition (version 0.0.4), parsed by
    ``prometheus_client.parser``; ``[]`` for text that does not parse. Values ``NaN``, ``+Inf``
    and ``-Inf`` are floats; counter samples keep their ``_total`` names."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return [Sample(s.name, dict(s.labels), float(s.value))
                for fam in text_string_to_metric_families(text) for s in fam.samples]
    except (ValueError, TypeError, IndexError):
        return []


def fetch(url: str, timeout_s: float = 1.5) -> tuple[str | None, str | None]:
    """GET ``url``: ``(body, None)`` or ``(None, why it failed)``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http only, from the config)
            return resp.read(4 * 1024 * 1024).decode("utf-8", "replace"), None
    except urllib.error.HTTPError as exc:
        return None, f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, str(reason)


@dataclasses.dataclass(frozen=True)
class ServiceHealth:
    """What the running appliance reports: ``healthz`` (JSON object, or ``None``), ``metrics``
    (samples), and the error of each endpoint (``None`` when it answered)."""

    base_url: str
    healthz: Mapping[str, Any] | None
    healthz_error: str | None
    metrics: tuple[Sample, ...]
    metrics_error: str | None
    fetched_ns: int

    @property
    def reachable(self) -> bool:
        return self.healthz_error is None or self.metrics_error is None


def service_health(cfg: AppConfig, timeout_s: float = 1.5) -> ServiceHealth:
    """Read ``/healthz`` and ``/metrics`` of the service at ``[service] http``.

    An address the dashboard cannot reach by construction (``"127.0.0.1:0"``: the service binds
    a free port that only it knows; or an invalid address) is reported as unreachable with the
    reason, never raised."""
    if cfg.service.http.strip().rsplit(":", 1)[-1] == "0":
        why = (f"[service] http = {cfg.service.http!r}: port 0 lets the service take any free port, which the dashboard "
               "cannot know; set a fixed port to see the service here")
        return ServiceHealth(f"http://{cfg.service.http}", None, why, (), "not asked", time.time_ns())
    try:
        host, port = parse_host_port(cfg.service.http, 9108)
    except ValueError as exc:
        return ServiceHealth(f"http://{cfg.service.http}", None, f"[service] http = {cfg.service.http!r}: {exc}", (),
                             "not asked", time.time_ns())
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    base = f"http://{host if ':' not in host else '[' + host + ']'}:{port}"
    hz_text, hz_err = fetch(base + "/healthz", timeout_s)
    healthz = None
    if hz_text is not None:
        try:
            obj = json.loads(hz_text)
            healthz = obj if isinstance(obj, dict) else {"value": obj}
        except ValueError:
            hz_err = "healthz did not return JSON"
    m_text, m_err = fetch(base + "/metrics", timeout_s)
    samples = tuple(parse_prometheus(m_text)) if m_text is not None else ()
    return ServiceHealth(base, healthz, hz_err, samples, m_err, time.time_ns())


def _stream_of(labels: Mapping[str, str]) -> str | None:
    if "stream" in labels:
        return labels["stream"]
    if all(k in labels for k in ("site", "machine", "sensor")):
        return f"{labels['site']}/{labels['machine']}/{labels['sensor']}"
    return None


def per_stream_counters(samples: Iterable[Sample]) -> dict[str, dict[str, float]]:
    """``{metric name: {stream: value}}`` of counters (names ending ``_total``) labelled by
    stream (a ``stream`` label, or ``site``/``machine``/``sensor``), summed over other labels."""
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        st = _stream_of(s.labels)
        if st is None or not s.name.endswith("_total") or not math.isfinite(s.value):
            continue
        d = out.setdefault(s.name, {})
        d[st] = d.get(st, 0.0) + s.value
    return out


def rates(prev: Mapping[str, Mapping[str, float]], prev_ns: int, cur: Mapping[str, Mapping[str, float]],
          cur_ns: int) -> dict[str, dict[str, float]]:
    """Per-second rates between two :func:`per_stream_counters` snapshots (counters that went
    down, i.e. a restart, are left out)."""
    dt = (cur_ns - prev_ns) / NS
    out: dict[str, dict[str, float]] = {}
    if dt <= 0:
        return out
    for name, streams in cur.items():
        for st, v in streams.items():
            p = prev.get(name, {}).get(st)
            if p is not None and v >= p:
                out.setdefault(name, {})[st] = (v - p) / dt
    return out


def deadletters(samples: Iterable[Sample]) -> dict[str, float]:
    """Dead-letter counts by reason: samples whose name mentions ``deadletter`` (or
    ``dead_letter``) and that carry a ``reason`` label (``source/reason`` when they also carry
    a ``source``: waveform or label), summed per key."""
    out: dict[str, float] = {}
    for s in samples:
        n = s.name.lower()
        if ("deadletter" in n or "dead_letter" in n) and "reason" in s.labels and not n.endswith("_created"):
            key = f"{s.labels['source']}/{s.labels['reason']}" if "source" in s.labels else s.labels["reason"]
            out[key] = out.get(key, 0.0) + s.value
    return out


def memory_text(healthz: Mapping[str, Any] | None) -> str | None:
    """The service's memory line from ``/healthz``'s ``memory`` block (resident set and the
    feedback ring of recent windows), e.g. ``"memory 452.3 MB, of it recent windows 12.1 MB
    (8 streams)"``; ``None`` when the service does not report it."""
    mem = (healthz or {}).get("memory")
    if not isinstance(mem, Mapping) or not isinstance(mem.get("rss_bytes"), (int, float)):
        return None
    text = f"memory {fmt_bytes(int(mem['rss_bytes']))}"
    ring = mem.get("recent_windows")
    if isinstance(ring, Mapping) and isinstance(ring.get("bytes"), (int, float)):
        text += f", of it recent windows {fmt_bytes(int(ring['bytes']))} ({ring.get('streams', 0)} streams)"
    return text


def stream_rows(healthz: Mapping[str, Any] | None, prev: Mapping[str, Any] | None, prev_ns: int | None,
                now_ns: int) -> list[dict[str, Any]]:
    """The ingest table from the service's ``/healthz`` ``streams`` object (``{stream: {state,
    version, windows, scored, last_sample_ns}}``): one row per stream with windows and scored
    counts, their rates per second since the previous document ``prev`` (read at ``prev_ns``),
    and the age of the newest sample (s). ``[]`` when the document has no streams."""
    streams = (healthz or {}).get("streams") or {}
    before = ((prev or {}).get("streams") or {}) if prev_ns is not None else {}
    dt = (now_ns - prev_ns) / NS if prev_ns is not None else 0.0
    rows = []
    for name, info in sorted(streams.items()):
        if not isinstance(info, Mapping):
            continue
        row: dict[str, Any] = {"stream": name, "state": info.get("state"), "model version": info.get("version"),
                               "windows": info.get("windows"), "scored": info.get("scored")}
        for key in ("windows", "scored"):
            p, c = (before.get(name) or {}).get(key), info.get(key)
            ok = dt > 0 and isinstance(p, (int, float)) and isinstance(c, (int, float)) and c >= p
            row[f"{key}/s"] = round((c - p) / dt, 2) if ok else None
        last = info.get("last_sample_ns")
        row["newest sample"] = fmt_age((now_ns - last) / NS) if isinstance(last, int) else "never"
        if "owned" in info:  # a cluster instance (pdm_edge.runtime.cluster): which streams it scores
            row["owned here"] = bool(info["owned"])
        rows.append(row)
    return rows


def cluster_text(healthz: Mapping[str, Any] | None) -> str | None:
    """The service's cluster line from ``/healthz``'s ``cluster`` block, e.g. ``"cluster plant1:
    instance edge-a of 2 (edge-a, edge-b), owns 3 of 6 streams"``; ``None`` when the service is
    not clustered."""
    c = (healthz or {}).get("cluster")
    if not isinstance(c, Mapping):
        return None
    members = [str(m) for m in c.get("members") or []]
    text = (f"cluster {c.get('group')}: instance {c.get('instance')} of {len(members)} ({', '.join(members)}), "
            f"owns {c.get('owned_count', len(c.get('owned') or []))} of {c.get('streams')} streams")
    if not c.get("connected", True):
        text += ", membership connection DOWN"
    elif not c.get("settled", True):
        text += ", not joined yet"
    return text


def find_metric(samples: Iterable[Sample], *words: str) -> float | None:
    """The sum of the samples whose name contains every one of ``words`` (``None`` if none)."""
    vals = [s.value for s in samples if all(w in s.name.lower() for w in words) and not s.name.endswith("_created")]
    return float(sum(vals)) if vals else None


def tcp_reachable(address: str, default_port: int, timeout_s: float = 1.0) -> tuple[bool, str]:
    """Whether a TCP connection to ``HOST:PORT`` opens: ``(ok, detail)``."""
    try:
        host, port = parse_host_port(address, default_port)
    except ValueError as exc:
        return False, str(exc)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True, f"{host}:{port} accepts connections"
    except OSError as exc:
        return False, f"{host}:{port}: {exc.strerror or exc}"


def store_info(store: Store | None) -> tuple[bool, str]:
    """``(ok, detail)`` of :meth:`Store.server_info` (InfluxDB: a ping)."""
    if store is None:
        return False, "the store could not be opened"
    try:
        info = store.server_info()
    except Exception as exc:  # StoreError and whatever a client library raises
        return False, str(exc)
    return True, ", ".join(f"{k} {v}" for k, v in info.items())


def spool_state(path: str | os.PathLike[str]) -> tuple[int | None, int | None, str | None]:
    """``(rows waiting, oldest enqueue ns, error)`` of the spool file (read-only)."""
    from pdm_edge.store.spool import spool_depth

    try:
        n, oldest = spool_depth(path)
    except Exception as exc:  # StoreError: missing file or not a spool
        return None, None, str(exc)
    return n, oldest, None
