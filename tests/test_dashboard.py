"""The dashboard: data access and status rules (no Streamlit), users and roles, and the pages
through ``streamlit.testing.v1.AppTest`` (fleet status, stale flag, read-only banner, sign-in,
role checks, the label form writing through ``submit_label``, promote with confirmation)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashboard import auth, data
from pdm_edge.config import config_from_dict, load_config
from pdm_edge.feedback import LabelBook, LabelledWindowBuffer, make_label, submit_label
from pdm_edge.store.base import ModelEvent
from pdm_edge.store.sqlite import SQLiteStore
from pdm_edge.types import Alert, FaultMatch, Score, Window

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "dashboard" / "app.py"
NS = 1_000_000_000
NOW = 1_800_000_000 * NS
THR = 3.0


# -- helpers -----------------------------------------------------------------------------------
def _cfg_dict(tmp: Path, **sections: dict) -> dict:
    d = {
        "mqtt": {"broker": "127.0.0.1:1"},
        "store": {"sqlite_path": str(tmp / "store.sqlite")},
        "spool": {"path": str(tmp / "spool.sqlite")},
        "feedback": {"state_dir": str(tmp / "state")},
        "registry": {"dir": str(tmp / "registry")},
        "service": {"http": "127.0.0.1:1"},
        "alerts": {"stale_after_s": 60.0},
        "dashboard": {"refresh_s": 30.0},
    }
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return d


def _write_toml(path: Path, d: dict) -> Path:
    lines = []
    for section, values in d.items():
        if section == "sensors":
            for key, sc in values.items():
                lines.append(f'[sensors."{key}"]')
                lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in sc.items()]
            continue
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _scores(machine: str, t_end: int, values: list[float], thr: float | None = THR, sensor: str = "acc",
            hop_s: float = 1.0, version: str | None = "v1") -> list[Score]:
    t0 = t_end - (len(values) - 1) * round(hop_s * NS)
    return [Score("s", machine, sensor, t0 + i * round(hop_s * NS), v, thr, thr is not None and v > thr,
                  version if thr is not None else None) for i, v in enumerate(values)]


def _alert(machine: str, start: int, state: str = "raised", end: int | None = None, sensor: str = "acc") -> Alert:
    return Alert(f"a-{machine}-{start}", "s", machine, sensor, state, start, end, 9.0, THR, "v1")


def fleet_store(tmp: Path) -> SQLiteStore:
    """Machines in every state, ``NOW`` being the reference time; stale after 60 s."""
    st = SQLiteStore(tmp / "store.sqlite")
    fresh = NOW - 5 * NS
    st.write_scores(_scores("m-alarm", fresh, [0.1, 9.0, 9.5, 8.0]))
    st.write_alerts([_alert("m-alarm", fresh - 2 * NS)])
    st.write_scores(_scores("m-alarm-stale", NOW - 3600 * NS, [9.0, 9.0, 9.0]))
    st.write_alerts([_alert("m-alarm-stale", NOW - 3602 * NS)])
    st.write_scores(_scores("m-warn", fresh, [0.1, 0.2, 4.5]))
    st.write_scores(_scores("m-stale", NOW - 600 * NS, [0.1, 0.2, 0.3]))
    st.write_scores(_scores("m-uncal", fresh, [0.1, 0.2], thr=None))
    st.write_scores(_scores("m-ok", fresh, [0.1, 0.2, 0.3]))
    st.write_scores(_scores("m-cleared", fresh, [0.1, 0.2, 0.3]))
    st.write_alerts([_alert("m-cleared", fresh - 100 * NS, "cleared", fresh - 90 * NS)])
    # two sensors: one normal, one above threshold -> warning
    st.write_scores(_scores("m-two", fresh, [0.1, 0.2]) + _scores("m-two", fresh - NS, [0.3, 5.0], sensor="bearing"))
    return st


FLEET_ORDER = ["m-alarm-stale", "m-alarm", "m-two", "m-warn", "m-stale", "m-configured", "m-registered", "m-uncal",
               "m-cleared", "m-ok"]
FLEET_STATUS = {"m-alarm": "alarm", "m-alarm-stale": "alarm", "m-warn": "warning", "m-two": "warning", "m-stale": "stale",
                "m-configured": "uncalibrated", "m-registered": "uncalibrated", "m-uncal": "uncalibrated",
                "m-cleared": "normal", "m-ok": "normal"}
SENSORS = {"s/m-configured/acc": {"kind": "vibration", "sample_rate_hz": 1000.0, "unit": "g"},
           "s/m-ok/acc": {"kind": "vibration", "sample_rate_hz": 1000.0, "unit": "g"},
           "s/m-ok/silent": {"kind": "vibration", "sample_rate_hz": 1000.0, "unit": "g"}}
REGISTRY = [{"id": "m-registered-acc-v1", "site": "s", "machine": "m-registered", "sensor": "acc", "status": "active",
             "created_ns": NOW - 10 * NS}]


# -- fleet status --------------------------------------------------------------------------------
def test_fleet_status_rules_and_urgency_order(tmp_path):
    cfg = config_from_dict(_cfg_dict(tmp_path, sensors=SENSORS), environ={})
    store = fleet_store(tmp_path)
    rows = data.fleet_status(store, cfg, NOW, REGISTRY)
    assert [r.machine for r in rows] == FLEET_ORDER  # status, then score/threshold, then name
    by = {r.machine: r for r in rows}
    assert {m: r.status for m, r in by.items()} == FLEET_STATUS
    # the score shown is the worst sensor's (m-two: the bearing sensor's 5.0, not the newer 0.2 of acc)
    assert by["m-two"].last_score == 5.0 and by["m-two"].ratio == pytest.approx(5.0 / THR)
    # stale: never shown as healthy; an alarm stays an alarm but is flagged
    assert by["m-stale"].stale and by["m-stale"].state == "normal" and by["m-stale"].status == "stale"
    assert by["m-alarm-stale"].stale and by["m-alarm-stale"].status == "alarm"
    assert not by["m-ok"].stale and math.isclose(by["m-ok"].age_s, 5.0)
    assert by["m-ok"].silent_sensors == ("silent",)
    assert by["m-alarm"].open_alerts == 1 and by["m-cleared"].open_alerts == 0
    assert by["m-configured"].last_score_ns is None and by["m-configured"].stale
    assert by["m-registered"].registry_active == ("acc: m-registered-acc-v1",)
    assert {s.sensor: s.state for s in by["m-two"].sensors} == {"acc": "normal", "bearing": "warning"}
    assert data.status_counts(rows) == {"alarm": 2, "warning": 2, "stale": 1, "uncalibrated": 3, "normal": 2}


def test_fleet_status_empty_store(tmp_path):
    cfg = config_from_dict(_cfg_dict(tmp_path), environ={})
    assert data.fleet_status(SQLiteStore(tmp_path / "store.sqlite"), cfg, NOW) == []


def test_stale_boundary(tmp_path):
    cfg = config_from_dict(_cfg_dict(tmp_path), environ={})
    st = SQLiteStore(tmp_path / "store.sqlite")
    st.write_scores(_scores("m", NOW - 60 * NS, [0.1]))
    assert data.fleet_status(st, cfg, NOW)[0].status == "normal"  # exactly stale_after_s old: not yet stale
    assert data.fleet_status(st, cfg, NOW + 1)[0].status == "stale"


def test_a_stale_alarm_stays_an_alarm_and_says_it_is_stale(tmp_path):
    cfg = config_from_dict(_cfg_dict(tmp_path), environ={})
    rows = {r.machine: r for r in data.fleet_status(fleet_store(tmp_path), cfg, NOW)}
    assert rows["m-alarm-stale"].status == "alarm" and data.status_text(rows["m-alarm-stale"]) == "ALARM · stale"
    assert data.status_text(rows["m-alarm"]) == "ALARM" and data.status_text(rows["m-stale"]) == "STALE"
    assert data.stale_alarm(rows["m-alarm-stale"]) and not data.stale_alarm(rows["m-alarm"])


# -- machine detail data -------------------------------------------------------------------------
def test_chart_range_defaults_to_the_data_span(tmp_path):
    """A minute of data fills the chart (not a line at the edge of an hour); fixed ranges end now."""
    st = SQLiteStore(tmp_path / "store.sqlite")
    first = NOW - 3 * 86400 * NS - 61 * NS  # a span crossing a day and a minute boundary
    st.write_scores(_scores("m", first + 60 * NS, [0.1] * 61))
    st.write_scores(_scores("m", first + 60 * NS, [0.2] * 3, sensor="other"))
    assert data.score_span(st, "s", "m", "acc", NOW) == (first, first + 60 * NS)
    assert data.score_span(st, "s", "m", "nope", NOW) is None
    t0, t1, note = data.chart_range((first, first + 60 * NS), NOW, None, first + 60 * NS)
    assert t0 == first - 10 * NS and t1 == first + 70 * NS and note == ""
    t0, t1, note = data.chart_range((first, first + 60 * NS), NOW, 3600, first + 60 * NS)
    assert t1 - t0 == 3600 * NS and t0 <= first + 60 * NS < t1 and "No score in the last 1 h" in note
    t0, t1, note = data.chart_range(None, NOW, 86400, NOW - 5 * NS)
    assert t1 >= NOW and t1 - t0 == 86400 * NS and note == ""


def test_model_event_names_close_in_time_are_on_separate_lines():
    from dashboard.charts import event_label_rows

    t = NOW
    rows = event_label_rows([t, t + NS, t + 3000 * NS], t - 3600 * NS, t + 3600 * NS)
    assert rows[0] != rows[1]  # "training_queued" and "calibrated" one second apart
    assert rows[2] == rows[0]  # 50 min later: room on the first line again
    assert event_label_rows([t, t + 30 * 60 * NS], t, t + 3600 * NS) == [16, 16]


def test_an_open_alerts_peak_follows_the_scores(tmp_path):
    st = SQLiteStore(tmp_path / "store.sqlite")
    st.write_scores(_scores("m", NOW, [0.1, 11.79, 40.0, 97.18]))
    raised = Alert("a1", "s", "m", "acc", "raised", NOW - 2 * NS, None, 11.79, THR, "v1")
    assert data.alert_peak(st, raised, NOW) == 97.18
    cleared = Alert("a1", "s", "m", "acc", "cleared", NOW - 2 * NS, NOW, 40.0, THR, "v1")
    assert data.alert_peak(st, cleared, NOW) == 40.0


def test_bucket_seconds_keeps_points_bounded():
    assert data.bucket_seconds(3600, 1500) == 5.0
    assert data.bucket_seconds(30 * 86400, 1500) == 1800.0
    assert data.bucket_seconds(10, 1500) == 1.0
    for span in (60, 3600, 86400, 7 * 86400, 30 * 86400, 400 * 86400):
        assert span / data.bucket_seconds(span, 1500) <= 1500


def test_score_buckets_keep_the_spike(tmp_path):
    st = SQLiteStore(tmp_path / "s.sqlite")
    vals = [0.1] * 7200
    vals[5000] = 42.0
    st.write_scores(_scores("m", NOW, vals, hop_s=0.5))
    buckets, every = data.score_buckets(st, "s", "m", "acc", NOW - 3600 * NS, NOW + NS, max_points=100)
    assert every == 60.0 and len(buckets) <= 100
    assert max(b.max_score for b in buckets) == 42.0
    assert sum(b.count for b in buckets) == 7200


def test_labels_merge_answer_queue_and_after():
    def lab(**kw):
        base = dict(site="s", machine="m", start_ns=NOW, end_ns=NOW + 10 * NS, kind="normal", author="t", created_ns=NOW + 20 * NS)
        base.update(kw)
        return make_label(**base)

    a_open = _alert("m", NOW + 100 * NS)
    a_named = _alert("m", NOW, "cleared", NOW + 10 * NS)
    a_overlap = _alert("m", NOW + 50 * NS, "cleared", NOW + 60 * NS)
    l_named = lab(alert_id=a_named.id, sensor="acc")
    l_span = lab(start_ns=NOW + 55 * NS, end_ns=NOW + 58 * NS, kind="ignore")
    l_other_sensor = lab(start_ns=NOW + 100 * NS, end_ns=NOW + 110 * NS, sensor="other")
    merged = data.merge_labels([l_named], [l_named, l_span])
    assert [(lb.id, src) for lb, src in merged] == [(l_named.id, "store"), (l_span.id, "label book")]
    assert data.labels_answering(a_named, [l_named, l_span]) == [l_named]
    assert data.labels_answering(a_overlap, [l_named, l_span]) == [l_span]
    assert data.labels_answering(a_open, [l_other_sensor]) == []  # another sensor's label
    q = data.label_queue([a_named, a_overlap, a_open], [l_named, l_span, l_other_sensor])
    assert [it.alert.id for it in q] == [a_open.id, a_overlap.id, a_named.id]
    assert [it.labelled for it in q] == [False, True, True]
    assert data.label_span_for_alert(a_open, NOW + 200 * NS) == (a_open.start_ns, NOW + 200 * NS)
    ev = [ModelEvent("s", "m", NOW, "calibrated", "v1"), ModelEvent("s", "m", NOW + 30 * NS, "rejected", "v2", "gate"),
          ModelEvent("s", "x", NOW + 30 * NS, "promoted", "v9")]
    vs = [{"id": "v1", "site": "s", "machine": "m", "sensor": "acc", "created_ns": NOW},
          {"id": "v2", "site": "s", "machine": "m", "sensor": "acc", "created_ns": NOW + 30 * NS},
          {"id": "w2", "site": "s", "machine": "m", "sensor": "other", "created_ns": NOW + 30 * NS}]
    events, versions = data.after_label(l_named, ev, vs)
    assert [e.version for e in events] == ["v2"] and [v["id"] for v in versions] == ["v2"]


def test_machine_labels_reads_book_before_the_store(tmp_path):
    st = SQLiteStore(tmp_path / "s.sqlite")
    book = LabelBook.in_dir(tmp_path / "state")
    forwarded, _ = submit_label(book, site="s", machine="m", start_ns=NOW, end_ns=NOW + NS, kind="normal", author="a")
    st.write_labels([forwarded])
    fresh, _ = submit_label(book, site="s", machine="m", start_ns=NOW + 5 * NS, end_ns=NOW + 6 * NS, kind="fault",
                            fault_type="looseness", author="b", note="only in the book")
    got = data.machine_labels(st, book, "s", "m", NOW - NS, NOW + 10 * NS)
    assert [(lb.id, src) for lb, src in got] == [(forwarded.id, "store"), (fresh.id, "label book")]
    assert data.machine_labels(st, None, "s", "m", NOW - NS, NOW + 10 * NS)[0][0].id == forwarded.id


# -- raw windows and spectra ---------------------------------------------------------------------
def _win(start_ns: int, x: np.ndarray, fs: float = 12000.0, sensor: str = "acc") -> Window:
    return Window("s", "m", sensor, "vibration", start_ns, fs, "g", x.astype(np.float32))


def test_buffer_windows_by_span_and_baseline(tmp_path):
    rng = np.random.default_rng(0)
    buf = LabelledWindowBuffer.in_dir(tmp_path / "state")
    ws = [_win(NOW + i * NS // 4, rng.normal(size=3000)) for i in range(12)]
    normal = make_label(site="s", machine="m", start_ns=NOW, end_ns=NOW + NS, kind="normal", author="a")
    for w in ws[:4]:
        buf.add(normal, w)
    for w in ws[8:]:
        buf.hold(w)
    buf.close()
    got = data.buffer_windows(tmp_path / "state", "s", "m", "acc", ws[8].start_ns, ws[-1].end_ns)
    assert [w.start_ns for w in got] == [w.start_ns for w in ws[8:]]
    assert np.array_equal(got[0].samples, ws[8].samples)
    assert len(data.buffer_windows(tmp_path / "state", "s", "m", None, NOW, NOW + 10 * NS, limit=3)) == 3
    assert data.buffer_windows(tmp_path / "state", "s", "m", "other", NOW, NOW + 10 * NS) == []
    assert data.buffer_windows(tmp_path / "nothing", "s", "m", "acc", NOW, NOW + 10 * NS) == []  # no buffer: no error
    base = data.baseline_windows(tmp_path / "state", "s", "m", "acc")
    assert sorted(w.start_ns for w in base) == [w.start_ns for w in ws[:4]]
    assert data.buffer_summary(tmp_path / "state")["by_class"] == {"held": 4, "ignore": 0, "normal": 4, "fault": 0}
    assert data.buffer_summary(tmp_path / "nothing") is None


def test_psd_and_envelope_spectra_show_the_right_frequencies():
    fs, n = 12000.0, 3000
    t = np.arange(n) / fs
    rng = np.random.default_rng(1)
    sine = [_win(i, 0.5 * np.sin(2 * np.pi * 1500.0 * t) + 0.01 * rng.normal(size=n)) for i in range(3)]
    psd = data.psd_spectrum(sine, "x")
    assert psd.n_windows == 3 and abs(psd.freqs_hz[np.argmax(psd.values)] - 1500.0) < 30
    # noise in the demodulation band, amplitude-modulated at 100 Hz -> envelope line at 100 Hz
    carrier = rng.normal(size=n)
    am = [_win(i, (1 + 0.8 * np.cos(2 * np.pi * 100.0 * t)) * carrier) for i in range(2)]
    env = data.envelope_spectrum(am, "am", fmax_hz=400.0)
    k = np.argmax(env.values[env.freqs_hz > 20]) + np.count_nonzero(env.freqs_hz <= 20)
    assert abs(env.freqs_hz[k] - 100.0) <= 4.0
    assert data.psd_spectrum([], "x") is None


def test_defect_frequencies_from_sensor_config(tmp_path):
    from pdm_edge.bearing import SKF_6205

    sensors = {"s/m/acc": {"kind": "vibration", "sample_rate_hz": 12000.0, "unit": "g", "shaft_hz": 29.95,
                           "bearing": {"n_elements": 9, "element_diameter_mm": 7.94, "pitch_diameter_mm": 39.04}},
               "s/m/mic": {"kind": "acoustic", "sample_rate_hz": 16000.0, "unit": "Pa"}}
    cfg = config_from_dict(_cfg_dict(tmp_path, sensors=sensors), environ={})
    d = data.defect_frequencies(cfg.sensor("s", "m", "acc"))
    ref = SKF_6205.defect_frequencies(29.95)
    assert math.isclose(d["BPFO"], ref.bpfo_hz) and math.isclose(d["BPFI"], ref.bpfi_hz)
    assert math.isclose(d["2×BSF"], 2 * ref.bsf_hz) and math.isclose(d["FTF"], ref.ftf_hz)
    assert data.defect_frequencies(cfg.sensor("s", "m", "mic")) == {}
    assert data.envelope_fmax_hz(12000.0, d) == 640.0  # 3 x BPFI fits in the feature's 640 Hz
    fast = {k: 2 * v for k, v in d.items()}
    assert data.envelope_fmax_hz(12000.0, fast) == pytest.approx(3.3 * 2 * ref.bpfi_hz)
    assert data.envelope_fmax_hz(2000.0, fast) == pytest.approx(900.0)  # below 0.45 fs


# -- system health -------------------------------------------------------------------------------
METRICS = r'''# HELP pdm_edge_ingest_windows_total Windows cut per stream.
# TYPE pdm_edge_ingest_windows_total counter
pdm_edge_ingest_windows_total{stream="s/m/acc"} 120
pdm_edge_ingest_windows_total{site="s",machine="m",sensor="mic"} 30
pdm_edge_ingest_deadletters_total{reason="bad_json"} 3
pdm_edge_ingest_deadletters_total{reason="unknown_stream"} 2.0
pdm_edge_ingest_deadletters_created{reason="bad_json"} 1.7e9
weird{a="x,y}",b="say \"hi\"\\n"} +Inf
pdm_edge_spool_depth 17
'''


def test_parse_prometheus_and_derived_figures():
    samples = data.parse_prometheus(METRICS)
    by = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    assert by[("weird", (("a", "x,y}"), ("b", 'say "hi"\\n')))] == math.inf
    assert data.parse_prometheus(METRICS + "this line is broken\n") == []  # unparsable text: no samples, no error
    assert data.find_metric(samples, "spool", "depth") == 17
    assert data.deadletters(samples) == {"bad_json": 3.0, "unknown_stream": 2.0}
    c1 = data.per_stream_counters(samples)
    assert c1["pdm_edge_ingest_windows_total"] == {"s/m/acc": 120.0, "s/m/mic": 30.0}
    c2 = {"pdm_edge_ingest_windows_total": {"s/m/acc": 140.0, "s/m/mic": 10.0}}
    assert data.rates(c1, 0, c2, 10 * NS) == {"pdm_edge_ingest_windows_total": {"s/m/acc": 2.0}}  # a reset is left out


def test_service_unreachable_is_reported(tmp_path):
    cfg = config_from_dict(_cfg_dict(tmp_path), environ={})
    sh = data.service_health(cfg, timeout_s=0.5)
    assert not sh.reachable and sh.healthz_error and sh.metrics == ()
    ok, detail = data.tcp_reachable("127.0.0.1:1", 1883, 0.5)
    assert not ok and "127.0.0.1:1" in detail
    assert data.spool_state(tmp_path / "none.sqlite")[2] is not None


# what `pdm-edge run` serves (pdm_edge.runtime.health.health_document, pdm_edge.metrics), abridged
HEALTHZ = {
    "status": "degraded", "reasons": ["store unreachable: connection refused"], "uptime_s": 120.5,
    "broker": {"address": "127.0.0.1:1883", "connected": True},
    "store": {"backend": "influxdb", "reachable": False}, "spool": {"depth": 42},
    "streams": {"s/m/acc": {"state": "scoring", "version": "m-acc-v2", "windows": 100, "scored": 90,
                            "last_sample_ns": None}},
    "training": {"running": {"job": 3, "stream": "s/m/acc", "trigger": "labels"}, "queued": [], "runs": {"promoted": 1}},
    "memory": {"rss_bytes": 452_300_000, "recent_windows": {"streams": 8, "windows": 480, "bytes": 12_100_000}},
}
SERVICE_METRICS = METRICS + 'pdm_edge_deadletters_total{source="label",reason="bad_label"} 4\n'


@pytest.fixture
def fake_service():
    """An HTTP server answering /healthz and /metrics like the running appliance."""
    import http.server
    import json
    import threading

    doc = {"healthz": dict(HEALTHZ)}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(doc["healthz"]).encode() if self.path == "/healthz" else SERVICE_METRICS.encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}", doc
    srv.shutdown()


def test_service_health_reads_healthz_and_metrics(tmp_path, fake_service):
    address, _ = fake_service
    cfg = config_from_dict(_cfg_dict(tmp_path, service={"http": address}), environ={})
    sh = data.service_health(cfg)
    assert sh.reachable and sh.healthz["status"] == "degraded"
    assert data.deadletters(sh.metrics) == {"bad_json": 3.0, "unknown_stream": 2.0, "label/bad_label": 4.0}
    later = {"streams": {"s/m/acc": dict(HEALTHZ["streams"]["s/m/acc"], windows=120, scored=100, last_sample_ns=NOW - 2 * NS)}}
    rows = data.stream_rows(later, HEALTHZ, NOW - 10 * NS, NOW)
    assert rows == [{"stream": "s/m/acc", "state": "scoring", "model version": "m-acc-v2", "windows": 120, "scored": 100,
                     "windows/s": 2.0, "scored/s": 1.0, "newest sample": "2 s ago"}]
    assert data.stream_rows(HEALTHZ, None, None, NOW)[0]["windows/s"] is None
    assert data.memory_text(sh.healthz) == "memory 452.3 MB, of it recent windows 12.1 MB (8 streams)"
    assert data.memory_text({"memory": {"rss_bytes": 2_000_000, "recent_windows": None}}) == "memory 2.0 MB"
    assert data.memory_text({"status": "ok"}) is None  # an older service without the block
    assert [data.fmt_duration(x) for x in (30, 300, 7200, 86400, 8130, 90, 3599.9, 97200)] == \
        ["30 s", "5 min", "2 h", "1 d", "2 h 16 min", "1 min 30 s", "1 h", "1 d 3 h"]
    assert data.cluster_text(sh.healthz) is None and "owned here" not in rows[0]  # not clustered
    clustered = {"cluster": {"group": "plant1", "instance": "edge-a", "connected": True, "settled": True,
                             "members": ["edge-a", "edge-b"], "owned": ["s/m/acc"], "owned_count": 1, "streams": 2},
                 "streams": {"s/m/acc": dict(HEALTHZ["streams"]["s/m/acc"], owned=True),
                             "s/m/mic": dict(HEALTHZ["streams"]["s/m/acc"], owned=False)}}
    assert data.cluster_text(clustered) == "cluster plant1: instance edge-a of 2 (edge-a, edge-b), owns 1 of 2 streams"
    assert [r["owned here"] for r in data.stream_rows(clustered, None, None, NOW)] == [True, False]
    clustered["cluster"]["connected"] = False
    assert data.cluster_text(clustered).endswith("membership connection DOWN")


# -- users and roles -----------------------------------------------------------------------------
def test_service_health_with_port_0_is_a_reason_not_an_error(tmp_path):
    """The demo's config had ``http = "127.0.0.1:0"``: the health page must say why it cannot ask."""
    cfg = config_from_dict(_cfg_dict(tmp_path, service={"http": "127.0.0.1:0"}), environ={})
    sh = data.service_health(cfg)
    assert not sh.reachable and "port 0" in sh.healthz_error


def test_login_lockout_is_per_account_not_per_session():
    clock = [0.0]
    th = auth.LoginThrottle(max_failures=3, lock_s=30.0, clock=lambda: clock[0])
    assert not th.failed("tina") and not th.failed("tina") and th.failed("tina")
    assert th.locked_for("tina") == 30.0 and th.locked_for("erik") == 0.0
    clock[0] = 29.0
    assert th.locked_for("tina") == 1.0
    clock[0] = 30.0
    assert th.locked_for("tina") == 0.0
    th.failed("tina")
    th.succeeded("tina")
    assert not th.failed("tina") and not th.failed("tina")  # the count restarted after the success


def test_markdown_escaping_of_free_text():
    from dashboard.common import md

    wj = "\u2060"
    assert md("a_b *c* :red[x] $x$ [l](http://e)") == r"a\_b \*c\* &#58;red\[x\] \$x\$ \[l\]\(http" + wj + r"&#58;//e\)"
    assert md("<img src=x onerror=alert(1)> &amp; see http://e www.e.org a@b.c") == \
        r"\<img src\=x onerror\=alert\(1\)\> \&amp; see http" + wj + "&#58;//e www" + wj + r"\.e\.org a@" + wj + r"b\.c"
    assert md("one\ntwo") == "one  \ntwo" and md(None) == ""


def test_roles():
    tech, eng = auth.User("t", "technician"), auth.User("e", "engineer")
    assert auth.can(tech, "label") and not auth.can(tech, "manage_models")
    assert auth.can(eng, "label") and auth.can(eng, "manage_models")
    assert not auth.can(None, "label") and not auth.can(None, "manage_models")


def test_users_file_roundtrip_and_errors(tmp_path):
    p = tmp_path / "users.toml"
    h = auth.hash_password("correct horse")
    assert h.startswith("$argon2id$") and "correct horse" not in h
    auth.write_users(p, {"alice": auth.UserRecord("alice", "technician", h), "b@x.org": auth.UserRecord("b@x.org", "engineer", None, "b@x.org")})
    assert os.stat(p).st_mode & 0o777 == 0o600
    users = auth.load_users(p)
    assert auth.verify_password(users["alice"], "correct horse")
    assert not auth.verify_password(users["alice"], "wrong")
    assert not auth.verify_password(None, "correct horse") and not auth.verify_password(users["b@x.org"], "")
    assert auth.oidc_role(users, None, "b@x.org") == "engineer" and auth.oidc_role(users, "eve", "eve@x.org") is None
    p.write_text('[users.bob]\nrole = "admin"\npassword_hash = "x"\n')
    with pytest.raises(auth.UsersError, match="role must be one of"):
        auth.load_users(p)
    p.write_text("[users.bob\n")
    with pytest.raises(auth.UsersError, match="not valid TOML"):
        auth.load_users(p)
    with pytest.raises(auth.UsersError, match="does not exist"):
        auth.load_users(tmp_path / "missing.toml")


def test_users_cli_add_list_remove(tmp_path):
    p = tmp_path / "u" / "users.toml"

    def cli(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "dashboard.users", "--file", str(p), *args], input=stdin,
                              capture_output=True, text=True, cwd=REPO, timeout=60)

    r = cli("add", "tina", "--role", "technician", "--password-stdin", stdin="tina-secret-1\n")
    assert r.returncode == 0, r.stderr
    assert "tina-secret-1" not in p.read_text()
    assert auth.verify_password(auth.load_users(p)["tina"], "tina-secret-1")
    assert cli("add", "tina", "--role", "engineer", "--password-stdin", stdin="another-pass\n").returncode != 0  # exists
    assert cli("add", "tina", "--role", "engineer", "--password-stdin", "--replace", stdin="another-pass\n").returncode == 0
    assert auth.load_users(p)["tina"].role == "engineer"
    assert cli("add", "x", "--role", "admin", "--password-stdin", stdin="whatever-pass\n").returncode == 2
    assert cli("add", "shorty", "--role", "technician", "--password-stdin", stdin="short\n").returncode != 0
    r = cli("list")
    assert r.returncode == 0 and "tina\tengineer" in r.stdout and "$argon2" not in r.stdout
    assert cli("remove", "tina").returncode == 0 and auth.load_users(p) == {}


# -- pages (AppTest) -----------------------------------------------------------------------------
def _app(monkeypatch, config: Path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PDM_EDGE_CONFIG", str(config))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _texts(at) -> str:
    parts = [m.value for m in at.markdown] + [e.value for e in at.info] + [e.value for e in at.warning]
    parts += [e.value for e in at.error] + [e.value for e in at.success] + [c.value for c in at.caption]
    text = "\n".join(str(p) for p in parts).replace("&#58;", ":").replace("\u2060", "")
    return re.sub(r"\\(.)", r"\1", text)  # as displayed: Markdown escapes removed


def _login(at, name: str, password: str):
    at.text_input(key="login_user").input(name)
    at.text_input(key="login_password").input(password)
    next(b for b in at.button if b.label == "Sign in").click()
    at.run()
    assert not at.exception, at.exception
    return at


PAGES = ["pages/fleet.py", "pages/machine.py", "pages/labels.py", "pages/models.py", "pages/health.py"]


def test_app_on_a_fresh_install(tmp_path, monkeypatch):
    """An empty store, no registry, no buffer, no users: every page renders, read-only, and says why."""
    cfg = _write_toml(tmp_path / "c.toml", _cfg_dict(tmp_path / "fresh"))
    at = _app(monkeypatch, cfg)
    assert any("Read-only dashboard" in w.value for w in at.warning)
    assert any("No machines yet" in i.value for i in at.info)
    assert [m.value for m in at.metric] == ["0"] * 5
    for page in PAGES[1:]:
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        assert any("Read-only dashboard" in w.value for w in at.warning), page
        assert "sign in" not in _texts(at).lower() and "signing in" not in _texts(at), page  # no sign-in that cannot happen
    assert "Service not reachable" in _texts(at)


def test_health_page_with_a_running_service(tmp_path, monkeypatch, fake_service):
    address, doc = fake_service
    cfg = _write_toml(tmp_path / "c.toml", _cfg_dict(tmp_path, service={"http": address}))
    at = _app(monkeypatch, cfg)
    at.switch_page("pages/health.py").run()
    assert not at.exception, at.exception
    text = _texts(at)
    assert "Service: degraded" in text and "store unreachable: connection refused" in text
    assert "memory 452.3 MB, of it recent windows 12.1 MB (8 streams)" in text
    assert "Service not reachable" not in text
    assert "s/m/acc" in text and "(labels)" in text  # the running training job
    tables = [df.value for df in at.dataframe]
    assert any(list(t.columns[:3]) == ["stream", "state", "model version"] and t["scored"].tolist() == [90] for t in tables)
    assert any("label/bad_label" in t.get("reason", pd.Series(dtype=str)).tolist() for t in tables)
    # a clustered instance says so, and which streams it scores
    doc["healthz"] = dict(HEALTHZ, cluster={"group": "plant1", "instance": "edge-a", "connected": True, "settled": True,
                                            "members": ["edge-a", "edge-b"], "owned": ["s/m/acc"], "owned_count": 1,
                                            "streams": 2},
                          streams={"s/m/acc": dict(HEALTHZ["streams"]["s/m/acc"], owned=True)})
    at.run()
    assert not at.exception, at.exception
    assert "instance edge-a of 2 (edge-a, edge-b), owns 1 of 2 streams" in _texts(at)
    assert any("owned here" in df.value.columns and df.value["owned here"].tolist() == [True] for df in at.dataframe)


def test_fleet_page_statuses_and_stale_flag(tmp_path, monkeypatch):
    now = time.time_ns()
    st = SQLiteStore(tmp_path / "store.sqlite")
    st.write_scores(_scores("pump", now - 2 * NS, [0.1, 9.0, 9.5]))
    st.write_alerts([_alert("pump", now - 4 * NS)])
    st.write_scores(_scores("fan", now - 2 * NS, [0.1, 0.3]))
    st.write_scores(_scores("quiet", now - 3 * 3600 * NS, [0.1, 0.3]))  # healthy scores, but 3 h old
    cfg = _write_toml(tmp_path / "c.toml", _cfg_dict(tmp_path, sensors={"s/press/acc": SENSORS["s/m-ok/acc"]}))
    at = _app(monkeypatch, cfg)
    assert {m.label.split("] ")[-1]: m.value for m in at.metric} == {
        "alarm": "1", "warning": "0", "stale": "1", "uncalibrated": "1", "normal": "1"}
    df = at.dataframe[0].value
    assert list(df["machine"]) == ["pump", "quiet", "press", "fan"]
    assert list(df["status"]) == ["ALARM", "STALE", "uncalibrated", "normal"]
    assert df.loc[df["machine"] == "quiet", "last data"].item() == "3.0 h ago"
    assert df.loc[df["machine"] == "pump", "open alerts"].item() == 1


def test_an_alert_that_looks_like_a_confirmed_fault_says_so(tmp_path, monkeypatch):
    """Issue 11: the labelling queue and the machine page name the confirmed fault an alert
    resembles ("looks like the ... fault confirmed on ...")."""
    now = time.time_ns()
    st = SQLiteStore(tmp_path / "store.sqlite")
    st.write_scores(_scores("pump", now - 2 * NS, [0.1, 9.0, 9.5]))
    match = FaultMatch("lbl-0042", "bearing_outer_race", 1_762_128_000 * NS, 0.87)
    st.write_alerts([dataclasses.replace(_alert("pump", now - 4 * NS), fault_match=match)])
    st.close()
    cfg = _write_toml(tmp_path / "c.toml", _cfg_dict(tmp_path))
    at = _app(monkeypatch, cfg)
    at.switch_page("pages/labels.py").run()
    assert not at.exception, at.exception
    assert "looks like the bearing outer race fault confirmed on 2025-11-03 (similarity 0.87)" in _texts(at)
    at.session_state["pdm_machine"] = "s/pump"
    at.switch_page("pages/machine.py").run()
    assert not at.exception, at.exception
    table = next(df.value for df in at.dataframe if "looks like" in df.value.columns)
    assert table["looks like"].tolist() == [match.describe()]


def test_read_only_banner_and_sign_in(dashboard_demo, monkeypatch):
    at = _app(monkeypatch, dashboard_demo.config_path)
    assert not any("Read-only" in w.value for w in at.warning)  # users are configured
    assert any("Sign in" in b.label for b in at.button)
    _login(at, "tina", "wrong password")
    assert any("wrong password" in e.value for e in at.error)
    _login(at, "tina", dashboard_demo.passwords["tina"])
    assert "Signed in as **tina** · technician" in _texts(at)


def test_severity_zone_on_the_fleet_and_machine_pages(dashboard_demo, monkeypatch):
    at = _app(monkeypatch, dashboard_demo.config_path)
    df = at.dataframe[0].value
    zones = dict(zip(df["machine"], df["ISO 20816-3"]))
    assert zones["press-4"] == "—"  # never scored
    assert re.fullmatch(r"[ABCD] · \d+\.\d\d mm/s", zones["pump-3"]), zones
    at.session_state["pdm_machine"] = "plant1/pump-3"
    at.switch_page("pages/machine.py").run()
    assert not at.exception, at.exception
    assert re.search(r"ISO 20816-3: \*\*zone [ABCD]\*\*, \d+\.\d\d mm/s", _texts(at))
    assert "Velocity RMS 10-1000 Hz" in _texts(at) and "crest factor = peak / RMS" in _texts(at)


def test_machine_report_html_and_csv(dashboard_demo, monkeypatch, tmp_path):
    """The report's content, hostile text escaped; and the dashboard button makes the same files."""
    from dashboard.report import build_report, data_period

    cfg = load_config(dashboard_demo.config_path)
    store = SQLiteStore(cfg.store.sqlite_path)
    span = data_period(store, cfg, "plant1", "pump-3")
    assert span is not None and span[0] < span[1]
    with LabelBook.in_dir(cfg.feedback.state_dir) as book:
        submit_label(book, site="plant1", machine="pump-3", sensor="de", start_ns=span[0] + NS, end_ns=span[0] + 2 * NS,
                     kind="normal", author="tina", note="<script>alert(1)</script> [x](http://e)")
        rep = build_report(store, cfg, "plant1", "pump-3", span[0], span[1], registry=data.open_registry(cfg.registry.dir),
                           book=book)
    html = rep.html
    assert "Machine report: plant1/pump-3" in html and "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; [x](http://e)" in html
    assert html.count("data:image/png;base64,") >= 3  # score, severity, spectra
    assert "Defect frequencies: BPFO" in html and "ISO 20816-3" in html and "pump-3-de-v1" in html
    assert "OPEN" in html and dashboard_demo.open_alert_id in html
    lines = rep.scores_csv.splitlines()
    assert lines[0] == "time_utc,start_ns,sensor,score,threshold,is_anomaly,model_version" and len(lines) > 100
    assert dashboard_demo.open_alert_id in rep.alerts_csv
    store.close()
    at = _app(monkeypatch, dashboard_demo.config_path)
    at.session_state["pdm_machine"] = "plant1/pump-3"
    at.switch_page("pages/machine.py").run()
    next(b for b in at.button if b.key == "make_report").click().run()
    assert not at.exception, at.exception
    assert "open the HTML in a browser and print it to PDF" in _texts(at)


def test_lockout_holds_across_browser_sessions(dashboard_demo, monkeypatch):
    """Five wrong passwords, then a new session (a page reload) with the right one: still locked."""
    from dashboard import common

    common.login_throttle.clear()
    at = _app(monkeypatch, dashboard_demo.config_path)
    for _ in range(common.LOGIN_MAX_FAILURES):
        _login(at, "tina", "wrong password")
    fresh = _app(monkeypatch, dashboard_demo.config_path)  # another browser session
    _login(fresh, "tina", dashboard_demo.passwords["tina"])
    assert any("Too many failed attempts for this account" in e.value for e in fresh.error)
    assert "Signed in as" not in _texts(fresh)
    _login(fresh, "erik", dashboard_demo.passwords["erik"])  # other accounts are not locked
    assert "Signed in as **erik**" in _texts(fresh)
    common.login_throttle.clear()


def test_label_form_writes_a_label_and_it_shows_at_once(dashboard_demo, monkeypatch):
    at = _app(monkeypatch, dashboard_demo.config_path)
    at.switch_page("pages/labels.py").run()
    aid = dashboard_demo.open_alert_id
    save = next(b for b in at.button if b.form_id == f"label-{aid}")
    assert save.disabled  # nobody signed in: read-only queue
    _login(at, "tina", dashboard_demo.passwords["tina"])
    at.switch_page("pages/labels.py").run()
    assert "Unlabelled alerts (2)" in _texts(at)
    cfg = load_config(dashboard_demo.config_path)
    with LabelBook.in_dir(cfg.feedback.state_dir) as book:
        n_before = book.count()
    next(b for b in at.button if b.form_id == f"label-{aid}").click()  # no judgement chosen
    at.run()
    assert any("choose a judgement" in e.value for e in at.error)
    with LabelBook.in_dir(cfg.feedback.state_dir) as book:
        assert book.count() == n_before
    at.radio(key=f"q-{aid}-kind").set_value("fault — confirmed fault")
    at.selectbox(key=f"q-{aid}-ft").set_value("bearing_inner_race")
    at.text_area(key=f"q-{aid}-note").input("inner race spall seen with the borescope")
    save = next(b for b in at.button if b.form_id == f"label-{aid}")
    assert not save.disabled
    save.click()
    at.run()
    assert not at.exception, at.exception
    assert any("Label saved" in s.value and "bearing_inner_race" in s.value for s in at.success)
    assert "Unlabelled alerts (1)" in _texts(at)
    with LabelBook.in_dir(cfg.feedback.state_dir) as book:
        labels = [lb for lb in book.list(machine="pump-3") if lb.alert_id == aid]
    assert len(labels) == 1
    lb = labels[0]
    assert (lb.kind, lb.fault_type, lb.author, lb.sensor) == ("fault", "bearing_inner_race", "tina", "de")
    # the machine page shows it at once (from the label book: the appliance has not forwarded it)
    at.session_state["pdm_machine"] = "plant1/pump-3"
    at.switch_page("pages/machine.py").run()
    assert not at.exception, at.exception
    text = _texts(at)
    assert "inner race spall seen with the borescope" in text and "not yet in the store" in text


def test_only_engineers_promote_and_only_after_confirming(dashboard_demo, monkeypatch):
    from pdm_edge.registry import Registry

    cfg = load_config(dashboard_demo.config_path)
    at = _app(monkeypatch, dashboard_demo.config_path)
    at.switch_page("pages/models.py").run()
    assert not any(b.label == "Promote…" for b in at.button)  # anonymous
    assert any("fan-1-de-v2" in df.value["version"].tolist() for df in at.dataframe)
    _login(at, "tina", dashboard_demo.passwords["tina"])
    at.switch_page("pages/models.py").run()
    assert not any(b.label == "Promote…" for b in at.button)  # technician
    # a technician cannot confirm an action planted in the session either
    at.session_state["pdm_pending_model_action"] = {"key": "plant1/fan-1/de", "action": "rollback",
                                                    "stream": ("plant1", "fan-1", "de")}
    at.run()
    assert not any(b.label == "Confirm" for b in at.button)
    next(b for b in at.button if b.label == "Sign out").click()
    at.run()
    _login(at, "erik", dashboard_demo.passwords["erik"])
    at.switch_page("pages/models.py").run()
    assert "Signed in as **erik** · engineer" in _texts(at), _texts(at)
    at.selectbox(key="models_machine").set_value("plant1/fan-1").run()
    at.selectbox(key="pick-plant1/fan-1/de").set_value("fan-1-de-v1 (retired)").run()
    promote = next(b for b in at.button if b.key == "promote-plant1/fan-1/de")
    assert not promote.disabled
    promote.click().run()
    with Registry(cfg.registry.dir, create=False) as reg:
        assert reg.active("plant1", "fan-1", "de").id == "fan-1-de-v3"  # nothing happens before the confirmation
    assert any("Promote **fan\\-1\\-de\\-v1**" in w.value for w in at.warning)
    next(b for b in at.button if b.label == "Confirm").click().run()
    assert not at.exception, at.exception
    assert any("fan\\-1\\-de\\-v1 is now the active version" in s.value for s in at.success)
    with Registry(cfg.registry.dir, create=False) as reg:
        assert reg.active("plant1", "fan-1", "de").id == "fan-1-de-v1"
        assert reg.get("fan-1-de-v3").status == "retired"
    # a rejected version needs the gate override
    at.selectbox(key="pick-plant1/fan-1/de").set_value("fan-1-de-v2 (rejected)").run()
    assert next(b for b in at.button if b.key == "promote-plant1/fan-1/de").disabled
