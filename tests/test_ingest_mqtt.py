"""The ingestion stage against a real Mosquitto broker."""

from __future__ import annotations

import base64
import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from pdm_edge.config import config_from_dict
from pdm_edge.ingest import Ingestor
from pdm_edge.ingest.chunk import DEADLETTER_REASONS, encode_chunk, waveform_topic
from sensors.publisher import ChunkPublisher, iter_chunks, publish_timed
from tests.conftest import Collector, wait_until

FS = 25600.0
T0 = 1_795_248_000_000_000_000


def _config(address: str, protocol: str = "5", **ingest):
    return config_from_dict({
        "appliance_id": "test-edge",
        "mqtt": {"broker": address, "protocol": protocol, "reconnect_min_s": 1, "reconnect_max_s": 2},
        "ingest": {**ingest},
        "sensors": {
            "p/m/acc": {"kind": "vibration", "sample_rate_hz": FS, "unit": "g", "window_s": 0.1, "hop_s": 0.1},
            "p/m/mic": {"kind": "acoustic", "sample_rate_hz": 16000, "unit": "Pa", "window_s": 0.5, "hop_s": 0.25},
        },
    }, environ={})


def _drain(ing: Ingestor, n: int, timeout: float = 20.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(ing.windows.get(timeout=0.1))
        except queue.Empty:
            pass
    return out


def _raw_client(address: str) -> mqtt.Client:
    host, port = address.split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(host, int(port))
    c.loop_start()
    return c


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("encoding", ["float32", "int16", "values"])
def test_round_trip_through_broker(mosquitto, protocol, encoding):
    cfg = _config(mosquitto.address, protocol)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(int(FS)) * 0.5).astype(np.float32)  # 1 s -> 10 windows of 0.1 s
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        with ChunkPublisher(cfg.mqtt, "p", "m", "acc", sample_rate_hz=FS, unit="g", encoding=encoding) as pub:
            publish_timed(pub, iter_chunks([(T0, x)], FS, 0.037), speed=float("inf"))  # chunks straddle windows
        wins = _drain(ing, 10)
        assert ing.wait_idle(5)
        st = ing.stats()
    assert len(wins) == 10 and st.deadlettered == 0
    got = np.concatenate([w.samples for w in wins])
    tol = 0.0 if encoding != "int16" else float(np.max(np.abs(x))) / (0.9 * 32767)
    np.testing.assert_allclose(got, x, atol=tol, rtol=0)
    assert [w.start_ns for w in wins] == [T0 + i * 100_000_000 for i in range(10)]
    assert all(w.kind == "vibration" and w.unit == "g" and w.sample_rate_hz == FS for w in wins)


def test_iso_timestamp_and_unit_conversion(mosquitto):
    cfg = _config(mosquitto.address)
    pub = _raw_client(mosquitto.address)
    x = np.ones(2560, np.float32) * 9.80665
    payload = json.dumps({"ts": "2026-11-21T08:00:00Z", "fs": 25600, "unit": "m/s2", "seq": 0, "dtype": "float32",
                          "data": base64.b64encode(x.astype("<f4").tobytes()).decode()})
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        pub.publish(waveform_topic("p", "m", "acc"), payload, qos=1).wait_for_publish(5)
        (w,) = _drain(ing, 1)
    pub.loop_stop()
    assert w.start_ns == T0 and w.unit == "g"
    np.testing.assert_allclose(w.samples, 1.0, rtol=1e-6)


def _bad_payloads() -> dict[str, tuple[str, bytes]]:
    """One payload per rejection reason that can be produced on the wire."""
    def good(**over) -> bytes:
        d = {"ts": T0, "fs": FS, "unit": "g", "seq": 0, "dtype": "float32",
             "data": base64.b64encode(np.zeros(256, "<f4").tobytes()).decode()}
        d.update(over)
        return json.dumps(d).encode()

    acc = waveform_topic("p", "m", "acc")
    return {
        "bad_topic": ("pdm/v1/p/m/acc.x/waveform", good()),
        "too_large": (acc, b" " * 70_000),
        "bad_encoding": (acc, b'{"ts": "\xff\xfe"}'),
        "bad_json": (acc, b"{\"ts\": 1,"),
        "bad_schema": (acc, good(fs="fast")),
        "bad_timestamp": (acc, good(ts="2026-11-21 08:00")),
        "bad_dtype": (acc, good(dtype="float64")),
        "bad_base64": (acc, good(data="@@@@")),
        "bad_length": (acc, good(data=base64.b64encode(b"abc").decode())),
        "non_finite": (acc, good(data=base64.b64encode(np.array([np.nan], "<f4").tobytes()).decode())),
        "unit_mismatch": (acc, good(unit="Pa")),
        "sample_rate_mismatch": (acc, good(fs=12000)),
        "unknown_stream": (waveform_topic("p", "m", "nope"), good()),
        "name_too_long": (waveform_topic("p", "m" * 65_000, "acc"), good()),
        "implausible_sample_rate": (acc, good(fs=1e12)),
        "implausible_time": (acc, good(ts=7_258_118_400_000_000_000)),  # 2200-01-01
    }


def test_every_deadletter_reason_is_published_and_counted(mosquitto):
    cfg = _config(mosquitto.address, max_payload_bytes=65_536)
    bad = _bad_payloads()
    # reasons that need an overload or a bug to happen are tested elsewhere or cannot be sent
    # stream_limit, queue_full, internal_error: tested below; bad_label: tests/test_feedback.py
    assert set(DEADLETTER_REASONS) - set(bad) == {"stream_limit", "queue_full", "internal_error", "bad_label"}
    dl = Collector(mosquitto.address, "pdm/v1/_deadletter/#")
    pub = _raw_client(mosquitto.address)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        for topic, payload in bad.values():
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
        msgs = dl.wait_for(len(bad))
        st = ing.stats()
    pub.loop_stop()
    dl.close()
    assert dict(st.deadletters) == {r: 1 for r in bad}
    assert sorted(t.rsplit("/", 1)[1] for t, _, _ in msgs) == sorted(bad)
    for topic, payload, _ in msgs:
        d = json.loads(payload)
        assert topic == f"pdm/v1/_deadletter/{d['reason']}"
        assert d["topic"] == bad[d["reason"]][0][:512] and d["detail"]  # topics are cut at 512 characters
        assert base64.b64decode(d["head_b64"]) == bad[d["reason"]][1][:256]


def test_stream_limit_for_unconfigured_streams(mosquitto):
    cfg = _config(mosquitto.address, unknown_streams="accept", max_streams=1)
    pub = _raw_client(mosquitto.address)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        for name in ("new1", "new2", "new1"):
            payload = encode_chunk(np.zeros(1000, np.float32), ts_ns=T0, sample_rate_hz=1000, unit="g", seq=0)
            pub.publish(waveform_topic("p", "m", name), payload, qos=1).wait_for_publish(5)
        time.sleep(0.5)
        st = ing.stats()
    pub.loop_stop()
    assert st.deadletters.get("stream_limit") == 1
    assert "p/m/new1" in st.streams and "p/m/new2" not in st.streams


def test_burst_of_1000_malformed_mixed_with_good_loses_no_good_chunk(mosquitto):
    cfg = _config(mosquitto.address, max_payload_bytes=65_536)
    bad = list(_bad_payloads().values())
    rng = np.random.default_rng(3)
    x = rng.standard_normal(2560 * 200).astype(np.float32)  # 200 good chunks = 200 windows of 0.1 s
    raw = _raw_client(mosquitto.address)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        with ChunkPublisher(cfg.mqtt, "p", "m", "acc", sample_rate_hz=FS, unit="g") as pub:
            infos = []
            for i, (ts, chunk) in enumerate(iter_chunks([(T0, x)], FS, 0.1)):
                pub.publish(chunk, ts)
                for j in range(5):  # 5 bad payloads after every good one
                    topic, payload = bad[(i * 5 + j) % len(bad)]
                    infos.append(raw.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(10)
        wins = _drain(ing, 200, timeout=30)
        assert wait_until(lambda: ing.stats().received >= 1200), ing.stats()
        assert ing.wait_idle(10)
        st = ing.stats()
        assert st.connected  # still up and connected after the burst
    raw.loop_stop()
    assert len(wins) == 200
    np.testing.assert_array_equal(np.concatenate([w.samples for w in wins]), x)
    assert st.deadlettered == 1000 and st.accepted == 200


def test_full_queues_backpressure_then_queue_full_deadletter(mosquitto):
    cfg = _config(mosquitto.address, queue_size=1, window_queue_size=1)
    x = np.zeros(2560 * 20, np.float32)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        with ChunkPublisher(cfg.mqtt, "p", "m", "acc", sample_rate_hz=FS, unit="g") as pub:
            publish_timed(pub, iter_chunks([(T0, x)], FS, 0.1), speed=float("inf"))
        time.sleep(1.0)  # nobody reads windows: worker and chunk queue are stuck
        wins = _drain(ing, 20, timeout=5)
        assert wait_until(lambda: ing.stats().accepted + ing.stats().deadlettered == 20)
        assert ing.wait_idle(5)
        st = ing.stats()
    # every chunk is either windowed or dead-lettered as queue_full; nothing vanishes
    assert st.deadletters.get("queue_full", 0) > 0
    assert st.accepted + st.deadletters["queue_full"] == 20
    assert len(wins) == st.accepted


def test_gap_and_sample_rate_change_for_unconfigured_stream(mosquitto):
    cfg = _config(mosquitto.address, unknown_streams="accept", default_sensor={"window_s": 0.1, "hop_s": 0.1})
    pub = _raw_client(mosquitto.address)
    topic = waveform_topic("p", "m", "probe")

    def send(ts, fs, seq, n):
        pub.publish(topic, encode_chunk(np.ones(n, np.float32), ts_ns=ts, sample_rate_hz=fs, unit="g", seq=seq), qos=1).wait_for_publish(5)

    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        send(T0, 1000, 0, 150)                      # window 0
        send(T0 + 150_000_000, 1000, 1, 100)        # window 1, 50 samples left over
        send(T0 + 250_000_000, 1000, 5, 100)        # seq jump -> gap_seq, leftover dropped, window 0
        send(T0 + 9_000_000_000, 1000, 6, 100)      # time jump -> gap_time
        send(T0 + 9_100_000_000, 2000, 7, 200)      # new rate -> rate_change, 200 samples = 0.1 s
        send(T0 + 9_100_000_000, 2000, 7, 200)      # redelivery of the same chunk -> duplicate
        wins = _drain(ing, 5)
        assert wait_until(lambda: ing.stats().received == 6)
        assert ing.wait_idle(5)
        st = ing.stats()
    pub.loop_stop()
    assert [w.index for w in wins] == [0, 1, 0, 0, 0]
    assert wins[-1].sample_rate_hz == 2000 and wins[-1].n_samples == 200
    assert st.events == {"duplicate": 1, "gap_seq": 1, "gap_time": 1, "restart": 0, "rate_change": 1, "time_backwards": 0}
    assert st.streams["p/m/probe"].events == {"gap_seq": 1, "gap_time": 1, "rate_change": 1, "duplicate": 1}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_restart_mid_stream_every_chunk_windowed_exactly_once(mosquitto, protocol):
    """Mosquitto stopped and started while QoS 1 chunks flow: no chunk lost, none doubled."""
    cfg = _config(mosquitto.address, protocol)
    n_chunks = 300
    rng = np.random.default_rng(7)
    x = rng.standard_normal(2560 * n_chunks).astype(np.float32)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        pub = ChunkPublisher(cfg.mqtt, "p", "m", "acc", sample_rate_hz=FS, unit="g").start()
        chunks = list(iter_chunks([(T0, x)], FS, 0.1))
        wins = []
        restarter = threading.Timer(1.5, mosquitto.start)  # the broker comes back 1.5 s later
        for i, (ts, c) in enumerate(chunks):
            pub.publish(c, ts)  # blocks while the broker is away, then resumes in order
            if i == 100:
                mosquitto.stop(signal.SIGTERM)  # broker goes away mid-stream, chunks in flight
                restarter.start()
            time.sleep(0.002)
            while not ing.windows.empty():
                wins.append(ing.windows.get())
        restarter.join()
        assert pub.close(timeout=60), "publisher could not deliver every chunk"
        wins += _drain(ing, n_chunks - len(wins), timeout=60)
        assert ing.wait_idle(10)
        st = ing.stats()
    assert st.disconnects >= 1 and st.connects >= 2
    assert len(wins) == n_chunks
    assert [w.start_ns for w in wins] == [ts for ts, _ in chunks]
    np.testing.assert_array_equal(np.concatenate([w.samples for w in wins]), x)
    assert st.events["gap_seq"] == 0 and st.events["gap_time"] == 0


def test_chunks_published_while_appliance_is_down_are_delivered_on_return(mosquitto):
    """The persistent session: the broker queues QoS 1 chunks while the ingestor is stopped."""
    cfg = _config(mosquitto.address)
    x = np.arange(2560 * 30, dtype=np.float32)
    chunks = list(iter_chunks([(T0, x)], FS, 0.1))
    ing = Ingestor(cfg)
    ing.start()
    assert ing.wait_ready(10)
    ing.stop()  # session stays on the broker
    with ChunkPublisher(cfg.mqtt, "p", "m", "acc", sample_rate_hz=FS, unit="g") as pub:
        for ts, c in chunks:
            pub.publish(c, ts)
    mosquitto.stop()   # and survives a broker restart too (persistence on)
    mosquitto.start()
    ing = Ingestor(cfg)
    ing.start()
    wins = _drain(ing, 30, timeout=20)
    ing.stop()
    assert len(wins) == 30
    np.testing.assert_array_equal(np.concatenate([w.samples for w in wins]), x)


def test_appliance_status_online_offline_and_last_will(mosquitto, tmp_path):
    cfg = _config(mosquitto.address)
    status = Collector(mosquitto.address, "pdm/v1/_appliance/+/status")
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        assert status.wait_for(1)[-1][:2] == ("pdm/v1/_appliance/test-edge/status", b"online")
    assert status.wait_for(2)[-1][1] == b"offline"  # clean stop
    # retained: a late subscriber sees the last state
    late = Collector(mosquitto.address, "pdm/v1/_appliance/+/status")
    assert late.wait_for(1)[0][1:] == (b"offline", True)
    late.close()

    # a crash (SIGKILL, no clean disconnect): the broker publishes the last will
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from pdm_edge.config import config_from_dict
        from pdm_edge.ingest import Ingestor
        cfg = config_from_dict({{"appliance_id": "crashy", "mqtt": {{"broker": "{mosquitto.address}", "keepalive_s": 5}}}}, environ={{}})
        ing = Ingestor(cfg); ing.start(); assert ing.wait_ready(10)
        print("ready", flush=True)
        time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        n = len(status.wait_for(3))
        assert status.messages[n - 1][:2] == ("pdm/v1/_appliance/crashy/status", b"online")
        proc.kill()
        proc.wait()
        # the broker notices the dead TCP connection at once and sends the will
        msgs = status.wait_for(n + 1, timeout=15)
        assert msgs[-1][:2] == ("pdm/v1/_appliance/crashy/status", b"offline")
    finally:
        proc.kill()
        status.close()


def test_unexpected_decode_error_is_deadlettered_and_ingestion_continues(mosquitto, monkeypatch):
    """A bug in decoding cannot be produced by a payload, so a patched decoder (a mock, standing in
    for that bug) raises on one payload; the chunk is dead-lettered as internal_error and the
    stream goes on."""
    import pdm_edge.ingest.service as service

    real = service.decode_chunk

    def buggy(topic, payload, **kw):
        if b'"seq":1,' in payload:
            raise ZeroDivisionError("simulated bug")
        return real(topic, payload, **kw)

    monkeypatch.setattr(service, "decode_chunk", buggy)
    cfg = _config(mosquitto.address)
    x = np.arange(2560 * 3, dtype=np.float32)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        with ChunkPublisher(cfg.mqtt, "p", "m", "acc", sample_rate_hz=FS, unit="g") as pub:
            publish_timed(pub, iter_chunks([(T0, x)], FS, 0.1), speed=float("inf"))
        wins = _drain(ing, 2)
        assert wait_until(lambda: ing.stats().received == 3)
        st = ing.stats()
    assert st.deadletters == {"internal_error": 1}
    assert [w.index for w in wins] == [0, 0]  # seq 1 missing: a gap, the stream restarted at seq 2
    assert st.events["gap_seq"] == 1


def test_stop_does_not_hang_when_nobody_reads_windows(mosquitto):
    """Both queues full and no consumer: stop() gives up after its timeout instead of hanging."""
    cfg = _config(mosquitto.address, queue_size=2, window_queue_size=1)
    x = np.zeros(2560 * 10, np.float32)
    ing = Ingestor(cfg)
    ing.start()
    assert ing.wait_ready(10)
    with ChunkPublisher(cfg.mqtt, "p", "m", "acc", sample_rate_hz=FS, unit="g") as pub:
        publish_timed(pub, iter_chunks([(T0, x)], FS, 0.1), speed=float("inf"))
    # every chunk handed to the callback (queued or dead-lettered as queue_full: it never waits)
    # and the worker blocked on the full window queue; how many chunks wait depends on timing
    assert wait_until(lambda: ing.stats().received == 10 and ing.windows.qsize() == 1)
    t0 = time.monotonic()
    ing.stop(timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert ing.windows.qsize() == 1
