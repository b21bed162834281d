"""End to end on real recordings: `pdm-edge run` (subprocess) + real Mosquitto + real InfluxDB.

The recordings come from ``../shared/datasets`` (fixture ``datasets_dir``); without them these
tests are skipped with the reason.

- **FEMTO PRONOSTIA Bearing3_1** (run to failure, 515 snapshots of 0.1 s at 25.6 kHz, one every
  10 s): every snapshot is published as one chunk with its original spacing (timestamps moved
  so that the last snapshot is a minute ago, so no retention policy drops them), as fast as the
  broker and the service take them. Each 10 s jump between snapshots is a gap for ingestion
  (counted, expected). Sensor: ``window_s = hop_s = 0.1`` (one window per snapshot);
  ``[learning] calibration_s`` = the start of the last snapshot within the first 10 % of life,
  so the stream calibrates on exactly the snapshots ``pdm-edge eval`` uses (t <= 10 % of life).
- **DCASE 2023 task 2, valve** (16 kHz, 10 s clips): one contiguous stream of the 2 train
  normals and the test normals with clip index < 25 (the calibration period), then 4 test
  normals (index >= 25) and 4 test anomalies, interleaved. Sensor: acoustic, ``window_s = 1``,
  ``hop_s = 0.5``. ``calibration_s`` = calibration duration - ``window_s``: the window that
  reaches ``calibration_s`` is the last one taken into the calibration, so this way it is the
  last window lying wholly inside the calibration clips.

What is asserted are the pipeline facts: calibration on the intended windows (a ``calibrated``
model event), every later window scored and stored in InfluxDB with the model version, alerts
on MQTT ``pdm/v1/{site}/{machine}/alert`` and in InfluxDB, model events in InfluxDB.

The model's own targets are *not* asserted here (run ``pytest -s`` to see the figures):
FEMTO's target (no sustained alarm in the healthy first half of life, first alarm >= 5 min
before the end of life) is not met by the current model (``pdm-edge eval`` gives about 3 false
alerts in the healthy half); it is tracked in the closing note of the model work. Only "at least
one alert in the last 30 % of life" is asserted. For DCASE only the mean scores of anomaly and
normal clips are printed (detection quality is ``pdm-edge eval``'s business).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (
    Collector,
    influx_rows,
    publish_chunks,
    service_config_toml,
    wait_until,
)

NS = 1_000_000_000
MAX_TRAIN_S = 20.0


def _calibrated(svc, stream: str) -> tuple[str, int]:
    """(version, calibration windows) from the ``calibrated`` event of the service log."""
    m = re.search(rf'event=calibrated stream={re.escape(stream)} version=(\S+) detail="(\d+) windows', svc.log_text())
    assert m, svc.log_text()[-3000:]
    return m.group(1), int(m.group(2))


def _wait_all_scored(svc, stream: str, total: int, timeout: float = 150.0) -> tuple[str, int, int]:
    """Wait until ``total`` windows went through the worker, the stream is scoring, every
    window after the calibration is scored and the spool is empty; returns (version,
    calibration windows, scored)."""
    assert wait_until(lambda: svc.metric("pdm_edge_windows_in_total") == total
                      and svc.health()["streams"][stream]["state"] == "scoring", timeout), (
        svc.metric("pdm_edge_windows_in_total"), total, svc.log_text()[-3000:])
    version, n_cal = _calibrated(svc, stream)
    scored = total - n_cal
    site, machine, sensor = stream.split("/")
    assert wait_until(lambda: svc.metric("pdm_edge_windows_scored_total", machine=machine) == scored
                      and svc.health()["spool"]["depth"] == 0, timeout), (svc.metric("pdm_edge_windows_scored_total"), scored)
    return version, n_cal, scored


# -- FEMTO Bearing3_1 -------------------------------------------------------------------------------
FEMTO_STREAM = "lab/Bearing3_1/accel"
FEMTO_SENSOR = (f'[sensors."{FEMTO_STREAM}"]\nkind = "vibration"\nsample_rate_hz = 25600\nunit = "g"\n'
                "window_s = 0.1\nhop_s = 0.1\nshaft_hz = 25.0\n")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_femto_bearing3_1_run_to_failure_through_the_appliance(datasets_dir: Path, mosquitto, influxd_session,
                                                               service_process, tmp_path: Path) -> None:
    """Pipeline facts on FEMTO Bearing3_1 are asserted; the model's FEMTO target (no sustained
    alarm in the healthy half, alarm >= 5 min before end of life) is tracked in the closing
    note, not asserted: the false alarms in the healthy half and the lead time are printed."""
    from sample_data.loaders import load_femto

    folder = datasets_dir / "femto_pronostia" / "Learning_set" / "Bearing3_1"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    rec = load_femto(folder)
    segs = rec.segments
    t_s = np.array([(s.start_ns - segs[0].start_ns) / NS for s in segs])
    end_s = float(t_s[-1])  # end of life: the last snapshot (as pdm-edge eval counts it)
    n_cal_expected = int(np.sum(t_s <= 0.1 * end_s))
    calibration_s = float(t_s[n_cal_expected - 1])  # 10 % of life, on a snapshot's start
    offset_ns = time.time_ns() - 60 * NS - segs[-1].start_ns  # recent: the last snapshot a minute ago
    t0_ns = segs[0].start_ns + offset_ns

    db = "e2e_femto"
    cfg = service_config_toml(tmp_path, mosquitto.address, influx_url=influxd_session.url, database=db,
                              calibration_s=calibration_s, max_train_seconds=MAX_TRAIN_S, extra=FEMTO_SENSOR)
    svc = service_process(cfg)
    alerts = Collector(mosquitto.address, "pdm/v1/lab/Bearing3_1/alert")
    try:
        assert wait_until(lambda: svc.health()["broker"]["connected"], 30), svc.health()
        started = time.monotonic()
        n = publish_chunks(mosquitto.address, FEMTO_STREAM, ((s.start_ns + offset_ns, s.samples) for s in segs),
                           sample_rate_hz=rec.sample_rate_hz, unit="g")
        publish_s = time.monotonic() - started
        assert n == len(segs) == 515
        version, n_cal, scored = _wait_all_scored(svc, FEMTO_STREAM, len(segs))
        pipeline_s = time.monotonic() - started
        # calibrated on the first 10 % of life: the snapshots with t <= 10 % (52), nothing else
        assert n_cal == n_cal_expected, (n_cal, n_cal_expected)
        assert 50 <= n_cal <= 56
        assert scored == len(segs) - n_cal
        # every snapshot restarted the stream (10 s jumps) and gave exactly one window
        assert svc.metric("pdm_edge_stream_events_total", event="gap_time") == len(segs) - 1
        assert svc.metric("pdm_edge_deadletters_total") == 0

        # every later snapshot is scored in InfluxDB, with the calibrated version, at its own time
        rows = influx_rows(influxd_session, "SELECT score, threshold, is_anomaly, model_version FROM anomaly_score "
                                            "WHERE machine = 'Bearing3_1'", db)
        assert len(rows) == scored
        assert {r[4] for r in rows} == {version}
        expected_ts = sorted(s.start_ns + offset_ns for s in segs[n_cal:])
        assert sorted(int(r[0]) for r in rows) == expected_ts
        threshold = float(rows[0][2])

        # model events in InfluxDB
        events = influx_rows(influxd_session, "SELECT event, version, detail FROM model_event WHERE machine = 'Bearing3_1'", db)
        assert [(e[1], e[2]) for e in events] == [("training_queued", ""), ("calibrated", version)], events

        # alerts: on MQTT and in InfluxDB, the same ids
        stored = influx_rows(influxd_session, "SELECT state, alert_id, peak_score, end_ns FROM alert WHERE machine = 'Bearing3_1'", db)
        raised_ids = {r[2] for r in stored}
        assert wait_until(lambda: {json.loads(p)["id"] for _, p, _ in alerts.messages
                                   if json.loads(p)["state"] == "raised"} >= raised_ids, 20)
        mqtt_raised = [json.loads(p) for _, p, _ in alerts.messages if json.loads(p)["state"] == "raised"]
        assert {a["id"] for a in mqtt_raised} == raised_ids
        assert all(a["sensor"] == "accel" and a["model_version"] == version for a in mqtt_raised)
        raised_life_s = sorted((a["start_ns"] - t0_ns) / NS for a in mqtt_raised)
        assert raised_life_s, "no alert raised over the whole run to failure"
        assert all(t >= calibration_s for t in raised_life_s)
        # the bearing is in alarm at its failure: 3 of the last 5 stored scores above threshold
        last = sorted(rows, key=lambda r: int(r[0]))[-5:]
        assert sum(1 for r in last if r[3]) >= 3, last

        false_alarms = [t for t in raised_life_s if t <= 0.5 * end_s]
        after = [t for t in raised_life_s if t > 0.5 * end_s]
        first_after = after[0] if after else None
        above = sum(1 for r in rows if r[3])
        print(f"\nFEMTO Bearing3_1 through pdm-edge run: {n} snapshots published in {publish_s:.1f} s, all scored and "
              f"stored in {pipeline_s:.1f} s; calibration {n_cal} windows (first {calibration_s:.0f} s of "
              f"{end_s:.0f} s of life), version {version}, threshold {threshold:.2f}; {scored} scores in InfluxDB, "
              f"{above} above threshold")
        print(f"  alerts raised: {len(raised_life_s)} at life t = {[round(t) for t in raised_life_s]} s")
        print(f"  sustained alarms in the healthy half (t <= {0.5 * end_s:.0f} s): {len(false_alarms)} (target 0: "
              f"{'met' if not false_alarms else 'NOT met'})")
        if first_after is not None:
            lead = end_s - first_after
            print(f"  first alert after half-life at t = {first_after:.0f} s, lead before end of life {lead:.0f} s "
                  f"({lead / 60:.1f} min; target >= 5 min: {'met' if lead >= 300 else 'NOT met'})")
        assert svc.terminate() == 0
    finally:
        alerts.close()


# -- DCASE 2023 valve -----------------------------------------------------------------------------
DCASE_STREAM = "lab/valve/mic"
DCASE_SENSOR = (f'[sensors."{DCASE_STREAM}"]\nkind = "acoustic"\nsample_rate_hz = 16000\nunit = "FS"\n'
                "window_s = 1.0\nhop_s = 0.5\n")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dcase_valve_acoustic_path_through_the_appliance(datasets_dir: Path, mosquitto, influxd_session, service_process,
                                                         tmp_path: Path) -> None:
    """Calibration on the DCASE calibration clips, then test clips scored and stored; the mean
    scores of anomaly and normal clips are printed, detection quality is not asserted."""
    from sample_data.loaders import dcase_clips, load_wav
    from sensors.publisher import iter_chunks

    root = datasets_dir / "dcase2023_task2" / "valve"
    clips = dcase_clips(root)
    cal = [c for c in clips if c[1] == "train" or (c[2] == "normal" and c[3] < 25)]
    normals = [c for c in clips if c[1] == "test" and c[2] == "normal" and c[3] >= 25][:4]
    anomalies = [c for c in clips if c[1] == "test" and c[2] == "anomaly"][:4]
    if len(cal) < 20 or len(normals) < 4 or len(anomalies) < 4:
        pytest.skip(f"DCASE 2023 valve clips incomplete under {root}")
    test = [c for pair in zip(normals, anomalies) for c in pair]
    fs = 16000.0
    recs = [(c, load_wav(c[0])) for c in cal + test]
    assert {r.sample_rate_hz for _, r in recs} == {fs}
    audio = [(c, r.concatenated()) for c, r in recs]
    cal_s = sum(len(x) for c, x in audio[:len(cal)]) / fs
    total_s = sum(len(x) for _, x in audio) / fs
    t0_ns = time.time_ns() - int((total_s + 60) * NS)
    # one contiguous stream: clip after clip
    segments, spans, at = [], [], 0
    for c, x in audio:
        segments.append((t0_ns + round(at * NS / fs), x))
        spans.append((c, t0_ns + round(at * NS / fs), t0_ns + round((at + len(x)) * NS / fs)))
        at += len(x)
    n_windows = int((at - 16000) // 8000) + 1

    db = "e2e_dcase"
    cfg = service_config_toml(tmp_path, mosquitto.address, influx_url=influxd_session.url, database=db,
                              calibration_s=cal_s - 1.0, max_train_seconds=MAX_TRAIN_S, extra=DCASE_SENSOR)
    svc = service_process(cfg)
    assert wait_until(lambda: svc.health()["broker"]["connected"], 30), svc.health()
    started = time.monotonic()
    n = publish_chunks(mosquitto.address, DCASE_STREAM, iter_chunks(segments, fs, 0.5), sample_rate_hz=fs, unit="FS")
    version, n_cal, scored = _wait_all_scored(svc, DCASE_STREAM, n_windows)
    pipeline_s = time.monotonic() - started
    # the calibration took the windows lying wholly inside the calibration clips, and only them
    assert n_cal == int((cal_s - 1.0) / 0.5) + 1, (n_cal, cal_s)
    assert svc.metric("pdm_edge_stream_events_total", event="gap_time") == 0
    assert svc.metric("pdm_edge_deadletters_total") == 0

    rows = influx_rows(influxd_session, "SELECT score, model_version FROM anomaly_score WHERE machine = 'valve'", db)
    assert len(rows) == scored and {r[2] for r in rows} == {version}
    events = influx_rows(influxd_session, "SELECT event, version FROM model_event WHERE machine = 'valve'", db)
    assert [(e[1], e[2]) for e in events] == [("training_queued", ""), ("calibrated", version)], events

    # per test clip: the windows lying wholly inside it (19 per 10 s clip), all scored
    score_at = {int(r[0]): float(r[1]) for r in rows}
    per_clip: dict[str, list[float]] = {}
    for c, start, end in spans[len(cal):]:
        starts = [s for s in score_at if s >= start and s + NS <= end]
        assert len(starts) == 19, (c[0].name, len(starts))
        per_clip[c[0].name] = [score_at[s] for s in starts]
    means = {name: float(np.mean(v)) for name, v in per_clip.items()}
    mean_anomaly = float(np.mean([means[c[0].name] for c in anomalies]))
    mean_normal = float(np.mean([means[c[0].name] for c in normals]))
    threshold = float(influx_rows(influxd_session, "SELECT last(threshold) FROM anomaly_score WHERE machine = 'valve'", db)[0][1])
    print(f"\nDCASE 2023 valve through pdm-edge run: {n} chunks ({total_s:.0f} s of audio) in {pipeline_s:.1f} s; calibration "
          f"{len(cal)} clips ({cal_s:.0f} s) -> {n_cal} windows, version {version}, threshold {threshold:.2f}; "
          f"{scored} scores in InfluxDB")
    for name, v in means.items():
        print(f"  {name:<52} mean score {v:8.3f}")
    print(f"  mean clip score: anomalies {mean_anomaly:.3f}, normals {mean_normal:.3f} (not asserted)")
    assert svc.terminate() == 0
