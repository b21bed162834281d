"""Reliability drills of the running appliance (`pdm-edge run` as a subprocess).

Real Mosquitto (persistence on) and real InfluxDB processes are stopped and restarted under
load; nothing is mocked. Every drill checks that no window and no score is lost:

- broker restart mid-stream (SIGTERM, restart on the same port): QoS 1 + persistent session ->
  every published chunk is windowed once and every window is scored and stored;
- InfluxDB down for a while, then back: scores wait in the durable spool, /healthz says
  degraded, and every score reaches InfluxDB once it is back;
- 10,000 fuzzed payloads mixed into a good stream: the service stays up with bounded memory,
  every bad payload is dead-lettered with its reason (metrics and the dead-letter topic agree
  with what was sent), every good window is scored.

The figures (windows published/scored, dead letters by reason, RSS) are printed (``pytest -s``).
The SIGKILL-mid-training drill belongs to the learning loop's tests.
"""

from __future__ import annotations

import base64
import collections
import json
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from pdm_edge.ingest.chunk import encode_chunk
from tests.conftest import (
    SERVICE_SENSOR,
    Collector,
    expected_windows,
    publish_vibration,
    service_config_toml,
    wait_until,
)

NS = 1_000_000_000


def _calibration_windows(svc) -> int:
    m = re.search(r'event=calibrated stream=lab/m1/accel version=\S+ detail="(\d+) windows', svc.log_text())
    assert m, svc.log_text()[-3000:]
    return int(m.group(1))


def _wait_scored(svc, total: int, timeout: float = 120.0) -> int:
    """Wait until ``total`` windows went through the worker and every post-calibration window is
    scored and spooled; returns how many were scored."""
    assert wait_until(lambda: svc.metric("pdm_edge_windows_in_total") == total
                      and svc.health()["streams"][SERVICE_SENSOR]["state"] == "scoring", timeout), svc.log_text()[-3000:]
    scored = total - _calibration_windows(svc)
    assert wait_until(lambda: svc.metric("pdm_edge_windows_scored_total") == scored, timeout), (
        svc.metric("pdm_edge_windows_scored_total"), scored)
    return scored


def _influx_scores(influx, db: str) -> int:
    rows = influx.values("SELECT count(score) FROM anomaly_score WHERE machine = 'm1'", db)
    return int(rows[0][1]) if rows else 0


# -- broker restart -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_drill_broker_restart_mid_stream_loses_no_window(mosquitto, influxd_session, service_process, tmp_path: Path) -> None:
    db = "drill_broker"
    svc = service_process(service_config_toml(tmp_path, mosquitto.address, influx_url=influxd_session.url, database=db))
    assert wait_until(lambda: svc.health()["broker"]["connected"], 30)
    t0 = time.time_ns() - 60 * NS
    n1, sim = publish_vibration(mosquitto.address, 15.0, t0_ns=t0)  # the calibration period
    result: dict[str, int] = {}

    def second_half() -> None:
        result["n"], _ = publish_vibration(mosquitto.address, 15.0, start_s=15.0, t0_ns=t0, simulator=sim, first_seq=n1,
                                           speed=6.0)

    pub = threading.Thread(target=second_half, daemon=True)
    pub.start()
    time.sleep(1.0)  # mid-stream: chunks are in flight between publisher, broker and appliance
    mosquitto.stop()  # SIGTERM: mosquitto writes its persistence file
    assert wait_until(lambda: not svc.health()["broker"]["connected"], 15)
    time.sleep(2.0)
    mosquitto.start()
    pub.join(120)
    assert not pub.is_alive()
    published = n1 + result["n"]
    assert published == 300
    total = expected_windows(30.0)
    scored = _wait_scored(svc, total)
    assert wait_until(lambda: _influx_scores(influxd_session, db) == scored, 60)
    assert svc.metric("pdm_edge_stream_events_total", event="gap_seq") == 0
    assert svc.metric("pdm_edge_stream_events_total", event="gap_time") == 0
    assert svc.metric("pdm_edge_chunks_accepted_total") >= published
    assert svc.log_text().count("connected to 127.0.0.1") >= 2  # it did reconnect
    h = svc.health()
    assert h["status"] == "ok" and h["streams"][SERVICE_SENSOR]["windows"] == total, h
    print(f"\nbroker restart drill: chunks published {published}, received {svc.metric('pdm_edge_mqtt_messages_received_total'):.0f}"
          f" (duplicates {svc.metric('pdm_edge_stream_events_total', event='duplicate'):.0f}), windows {total}, "
          f"scored {scored} (+{total - scored} calibration), in InfluxDB {_influx_scores(influxd_session, db)}")
    assert svc.terminate() == 0


# -- InfluxDB outage ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_drill_influxdb_outage_loses_no_score(mosquitto, influxd, service_process, tmp_path: Path) -> None:
    db = "drill_influx"
    svc = service_process(service_config_toml(tmp_path, mosquitto.address, influx_url=influxd.url, database=db))
    assert wait_until(lambda: svc.health()["status"] == "ok", 30), svc.health()
    t0 = time.time_ns() - 60 * NS
    n1, sim = publish_vibration(mosquitto.address, 15.0, t0_ns=t0)
    before = _wait_scored(svc, expected_windows(15.0))
    assert wait_until(lambda: svc.health()["spool"]["depth"] == 0 and _influx_scores(influxd, db) == before, 60)

    influxd.stop()
    n2, _ = publish_vibration(mosquitto.address, 15.0, start_s=15.0, t0_ns=t0, simulator=sim, first_seq=n1)
    total = expected_windows(30.0)
    scored = _wait_scored(svc, total)
    assert wait_until(lambda: svc.health()["status"] == "degraded", 20), svc.health()
    h = svc.health()
    assert h["store"]["reachable"] is False and any("store" in r for r in h["reasons"]), h
    assert h["spool"]["depth"] >= scored - before, h  # the new scores wait in the spool
    assert svc.metric("pdm_edge_store_reachable") == 0 and svc.metric("pdm_edge_spool_depth") >= scored - before
    waiting = h["spool"]["depth"]
    time.sleep(2.0)  # a few failed write attempts with back-off

    influxd.start()
    assert wait_until(lambda: svc.health()["spool"]["depth"] == 0, 60), svc.health()
    assert wait_until(lambda: _influx_scores(influxd, db) == scored, 30), (_influx_scores(influxd, db), scored)
    assert wait_until(lambda: svc.health()["status"] == "ok", 20), svc.health()
    print(f"\nInfluxDB outage drill: chunks published {n1 + n2}, windows {total}, scored {scored}, "
          f"spooled during the outage {waiting}, in InfluxDB afterwards {_influx_scores(influxd, db)}")
    assert svc.terminate() == 0


# -- fuzzed payloads ----------------------------------------------------------------------------
GOOD_TOPIC = f"pdm/v1/{SERVICE_SENSOR}/waveform"


def _fuzz(n: int, t0_ns: int, seed: int = 7) -> list[tuple[str, bytes, str]]:
    """``n`` bad payloads as ``(topic, payload, expected reason)``; none can pass validation."""
    rng = random.Random(seed)
    good = encode_chunk(np.zeros(256, np.float32), ts_ns=t0_ns, sample_rate_hz=25600, unit="g", seq=10**9)
    base = {"ts": t0_ns, "fs": 25600, "unit": "g", "seq": 10**9}

    def js(obj: object) -> bytes:
        return json.dumps(obj).encode()  # allow_nan: NaN and Infinity are written as such

    makers = [
        lambda: (GOOD_TOPIC, good[:rng.randrange(len(good))], "bad_json"),  # truncated JSON
        lambda: (GOOD_TOPIC, js({**base, "values": [0.1, float("nan"), 0.2]}), "non_finite"),
        lambda: (GOOD_TOPIC, js({**base, "dtype": "float32",
                                 "data": base64.b64encode(np.array([1.0, np.inf], "<f4").tobytes()).decode()}), "non_finite"),
        lambda: (GOOD_TOPIC, js({**base, "dtype": rng.choice(["float64", "int8", "complex64", 7]), "data": "AAAA"}), "bad_dtype"),
        lambda: (GOOD_TOPIC, encode_chunk(np.zeros(256), ts_ns=t0_ns, sample_rate_hz=rng.choice([12800, 48000, 25601]),
                                          unit="g", seq=10**9), "sample_rate_mismatch"),
        lambda: (GOOD_TOPIC, b"\xff\xfe" + good[:64], "bad_encoding"),
        lambda: (GOOD_TOPIC, js({**base, "dtype": "float32", "data": "@@not*base64@@"}), "bad_base64"),
        lambda: (GOOD_TOPIC, js({**base, "dtype": "float32", "data": base64.b64encode(b"abc").decode()}), "bad_length"),
        lambda: (GOOD_TOPIC, js({**base, "unit": "V", "values": [1.0]}), "bad_schema"),
        lambda: (GOOD_TOPIC, js({"fs": 25600, "unit": "g", "values": [1.0]}), "bad_schema"),
        lambda: (GOOD_TOPIC, js({**base, "ts": "yesterday", "values": [1.0]}), "bad_timestamp"),
        lambda: (GOOD_TOPIC, js([1, 2, 3]), "bad_json"),
        lambda: (GOOD_TOPIC, js({**base, "values": []}), "bad_length"),
        lambda: ("pdm/v1/lab/m1/unconfigured/waveform", good, "unknown_stream"),
        lambda: ("pdm/v1/lab/m 1/accel/waveform", good, "bad_topic"),
    ]
    out = []
    for i in range(20):  # oversize payloads (> max_payload_bytes = 1 MiB)
        out.append((GOOD_TOPIC, b'{"pad": "' + b"x" * (1_200_000 + i) + b'"}', "too_large"))
    for _ in range(20):  # huge values (> max_samples_per_chunk = 65536), the payload itself under 1 MiB
        out.append((GOOD_TOPIC, js({**base, "values": [0] * 70_000}), "too_large"))
    while len(out) < n:
        out.append(rng.choice(makers)())
    rng.shuffle(out)
    return out


def _publish_raw(address: str, messages: list[tuple[str, bytes, str]]) -> None:
    host, port = address.rsplit(":", 1)
    acked = threading.Semaphore(0)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzzer")
    client.max_inflight_messages_set(200)
    client.on_publish = lambda *a: acked.release()
    client.connect(host, int(port))
    client.loop_start()
    try:
        for topic, payload, _ in messages:
            client.publish(topic, payload, qos=1)
        for _ in messages:
            assert acked.acquire(timeout=60), "broker did not acknowledge the fuzzed payloads"
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_drill_fuzzed_payloads_are_dead_lettered_and_good_windows_scored(mosquitto, influxd_session, service_process,
                                                                       tmp_path: Path) -> None:
    db = "drill_fuzz"
    extra = "[ingest]\nmax_payload_bytes = 1048576\nmax_samples_per_chunk = 65536\n"
    svc = service_process(service_config_toml(tmp_path, mosquitto.address, influx_url=influxd_session.url, database=db,
                                              extra=extra))
    deadletters = Collector(mosquitto.address, "pdm/v1/_deadletter/#")
    try:
        assert wait_until(lambda: svc.health()["broker"]["connected"], 30)
        t0 = time.time_ns() - 60 * NS
        n1, sim = publish_vibration(mosquitto.address, 15.0, t0_ns=t0)
        _wait_scored(svc, expected_windows(15.0))
        rss_before = svc.rss_kib()

        fuzz = _fuzz(10_000, t0)
        expected = collections.Counter(reason for _, _, reason in fuzz)
        result: dict[str, int] = {}

        def good_stream() -> None:
            result["n"], _ = publish_vibration(mosquitto.address, 10.0, start_s=15.0, t0_ns=t0, simulator=sim, first_seq=n1,
                                               speed=3.0)

        good = threading.Thread(target=good_stream, daemon=True)
        good.start()
        started = time.monotonic()
        _publish_raw(mosquitto.address, fuzz)
        fuzz_s = time.monotonic() - started
        good.join(120)
        assert not good.is_alive()

        total = expected_windows(25.0)
        scored = _wait_scored(svc, total)
        assert wait_until(lambda: svc.metric("pdm_edge_deadletters_total", source="waveform") == len(fuzz), 60), \
            svc.metric("pdm_edge_deadletters_total")
        by_reason = {lab["reason"]: int(v) for n, lab, v in svc.metrics() if n == "pdm_edge_deadletters_total"}
        assert by_reason == dict(expected)
        assert wait_until(lambda: len(deadletters.messages) >= len(fuzz), 30)
        on_topic = collections.Counter(t.rsplit("/", 1)[1] for t, _, _ in deadletters.messages)
        assert on_topic == expected
        sample = json.loads(next(p for t, p, _ in deadletters.messages if t.endswith("/too_large")))
        assert sample["reason"] == "too_large" and sample["topic"] == GOOD_TOPIC

        assert svc.proc.poll() is None
        h = svc.health()
        assert h["status"] == "ok" and h["worker"]["alive"], h
        assert h["streams"][SERVICE_SENSOR]["windows"] == total and h["streams"][SERVICE_SENSOR]["scored"] == scored
        assert svc.metric("pdm_edge_stream_events_total", event="gap_seq") == 0
        assert wait_until(lambda: _influx_scores(influxd_session, db) == scored, 60)
        rss_after = svc.rss_kib()
        print(f"\nfuzz drill: {len(fuzz)} bad payloads in {fuzz_s:.1f} s, dead letters by reason {dict(sorted(expected.items()))}; "
              f"good chunks {n1 + result['n']}, windows {total}, scored {scored}; "
              f"RSS {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after")
        assert rss_after - rss_before < 150 * 1024, (rss_before, rss_after)
        assert svc.terminate() == 0
    finally:
        deadletters.close()
