"""Issue 15, hostile input at the edge, against a real Mosquitto broker: implausible chunks are
dead-lettered with a reason, a failing stage is counted and recovers, sensor restarts and clocks
that jump are stream events (never duplicates, never overwrites), and a flood of malformed
messages costs a few log lines, not a traceback per message."""

from __future__ import annotations

import json
import logging
import queue
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from pdm_edge.config import config_from_dict
from pdm_edge.ingest import Ingestor
from pdm_edge.ingest.chunk import encode_chunk, waveform_topic
from tests.conftest import wait_until

FS = 1000.0
T0 = (time.time_ns() // 1_000_000_000 - 3600) * 1_000_000_000  # an hour ago, whole seconds
S = 1_000_000_000


def _config(address: str, **ingest):
    return config_from_dict({
        "appliance_id": "hard-edge",
        "mqtt": {"broker": address, "reconnect_min_s": 1, "reconnect_max_s": 2},
        "ingest": {**ingest},
        "sensors": {"p/m/acc": {"kind": "vibration", "sample_rate_hz": FS, "unit": "g", "window_s": 0.1, "hop_s": 0.1}},
    }, environ={})


def _client(address: str) -> mqtt.Client:
    host, port = address.split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(host, int(port))
    c.loop_start()
    return c


def _drain(ing: Ingestor, settle_s: float = 0.3) -> list:
    out = []
    assert ing.wait_idle(20)
    while True:
        try:
            out.append(ing.windows.get(timeout=settle_s))
        except queue.Empty:
            return out


def _send(pub: mqtt.Client, sensor: str, ts: int, seq: int, n: int = 100, fs: float = FS, value: float = 1.0) -> None:
    payload = encode_chunk(np.full(n, value, np.float32), ts_ns=ts, sample_rate_hz=fs, unit="g", seq=seq)
    pub.publish(waveform_topic("p", "m", sensor), payload, qos=1).wait_for_publish(5)


def test_fs_1e12_is_dead_lettered_and_every_later_chunk_is_windowed(mosquitto):
    """Row 3: a chunk with fs = 1e12 on a commissioning (unconfigured) stream used to kill the
    windowing thread with ArrayMemoryError; now it is refused at the edge and the rest flows."""
    cfg = _config(mosquitto.address, unknown_streams="accept", default_sensor={"window_s": 0.1, "hop_s": 0.1})
    pub = _client(mosquitto.address)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        _send(pub, "probe", T0, 0, fs=1e12)
        _send(pub, "probe", T0, 0, fs=0.001)  # row 17: fs = 0.001 in commissioning mode
        for i in range(10):
            _send(pub, "probe", T0 + i * 100_000_000, i)
            _send(pub, "acc", T0 + i * 100_000_000, i)
        assert wait_until(lambda: ing.stats().received == 22)
        wins = _drain(ing)
        st = ing.stats()
    pub.loop_stop()
    assert st.deadletters == {"implausible_sample_rate": 2}
    assert len(wins) == 20 and ing.errors.errors() == {}


def test_a_stage_that_raises_is_counted_with_its_stream_and_the_worker_goes_on(mosquitto, monkeypatch):
    """A bug in windowing cannot be produced by a payload any more, so a patched windower (a
    documented stand-in for such a bug) raises on one chunk: the error is recorded with the
    stream, the chunk is dead-lettered as internal_error, queued chunks are all windowed."""
    import pdm_edge.ingest.windowing as windowing

    real = windowing.StreamWindower.push

    def buggy(self, chunk):
        if chunk.seq == 3:
            raise MemoryError("simulated allocation failure")
        return real(self, chunk)

    monkeypatch.setattr(windowing.StreamWindower, "push", buggy)
    cfg = _config(mosquitto.address)
    pub = _client(mosquitto.address)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        for i in range(10):
            _send(pub, "acc", T0 + i * 100_000_000, i)
        assert wait_until(lambda: ing.stats().received == 10)
        wins = _drain(ing)
        st = ing.stats()
    pub.loop_stop()
    assert ing.errors.errors() == {"ingest-window": 1}
    assert ing.errors.last()["ingest-window"].stream == "p/m/acc"
    assert "simulated allocation failure" in ing.errors.reasons()[0]
    assert st.deadletters == {"internal_error": 1}
    assert len(wins) == 9 and st.windowed == st.accepted == 10


def test_sensor_reboot_seq_restart_is_a_restart_and_a_redelivery_is_dropped_once(mosquitto):
    """Row 4: the sensor reboots, its seq restarts at 0 and its clock jumps back by 0.5 s. The
    chunks after the reboot are a stream restart, not duplicates: the windows that would start
    at or before windows already emitted are counted as time_backwards, the later ones flow. A
    true QoS 1 redelivery (same seq, same content) is still dropped once."""
    cfg = _config(mosquitto.address)
    pub = _client(mosquitto.address)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        for i in range(10):  # 1 s: windows at 0.0 .. 0.9 s
            _send(pub, "acc", T0 + i * 100_000_000, i)
        _send(pub, "acc", T0 + 9 * 100_000_000, 9)  # redelivery of seq 9 (same payload)
        reboot = T0 + 500_000_000  # the clock went back half a second
        for i in range(20):  # 2 s from 0.5 s: windows at 0.5 .. 2.4 s; 0.5 .. 0.9 overlap
            _send(pub, "acc", reboot + i * 100_000_000, i, value=2.0)
        assert wait_until(lambda: ing.stats().received == 31)
        wins = _drain(ing)
        st = ing.stats()
    pub.loop_stop()
    starts = [w.start_ns for w in wins]
    assert starts == sorted(set(starts)), "window starts must only move forward"
    assert len(wins) == 10 + 15
    assert st.events["duplicate"] == 1 and st.events["restart"] == 1 and st.events["time_backwards"] == 5  # chunks
    assert st.windows_dropped == {"time_backwards": 5}


def test_timestamp_15_s_in_the_past_never_overwrites_earlier_windows(mosquitto):
    """Row 15: the next seq carries a timestamp 15 s in the past. It is a stream reset (gap_time)
    whose windows that start at or before the newest emitted one are not emitted (so no stored
    score is overwritten and no alert is raised for a past span), counted as time_backwards."""
    cfg = _config(mosquitto.address)
    pub = _client(mosquitto.address)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        for i in range(10):
            _send(pub, "acc", T0 + 20 * S + i * 100_000_000, i)
        for i in range(10):  # seq continues, the clock says 15 s earlier
            _send(pub, "acc", T0 + 6 * S + i * 100_000_000, 10 + i, value=50.0)
        assert wait_until(lambda: ing.stats().received == 20)
        wins = _drain(ing)
        st = ing.stats()
    pub.loop_stop()
    assert [w.start_ns for w in wins] == [T0 + 20 * S + i * 100_000_000 for i in range(10)]
    assert st.events["gap_time"] == 1 and st.windows_dropped == {"time_backwards": 10}


def test_a_flood_of_malformed_messages_costs_a_few_log_lines_and_no_traceback_per_message(mosquitto, caplog):
    """Row 17: 400-digit integers in values, fs and scale used to log a full traceback per
    message. Now each is dead-lettered with its reason, logged once per reason and then at most
    once a minute."""
    cfg = _config(mosquitto.address)
    pub = _client(mosquitto.address)
    huge = 10 ** 400
    good = json.loads(encode_chunk(np.ones(100, np.float32), ts_ns=T0, sample_rate_hz=FS, unit="g", seq=0))
    variants = [
        json.dumps({"ts": T0, "fs": FS, "unit": "g", "seq": 0, "values": [1.0, huge]}),
        json.dumps({**good, "fs": huge}),
        json.dumps({**good, "scale": huge}),
        json.dumps({**good, "seq": huge}),
    ]
    topic = waveform_topic("p", "m", "acc")
    caplog.set_level(logging.INFO)
    with Ingestor(cfg) as ing:
        assert ing.wait_ready(10)
        for i in range(200):
            pub.publish(topic, variants[i % 4].encode(), qos=1)
        _send(pub, "acc", T0, 0)
        assert wait_until(lambda: ing.stats().received == 201)
        st = ing.stats()
    pub.loop_stop()
    assert st.accepted == 1 and st.deadlettered == 200
    assert set(st.deadletters) <= {"bad_schema", "non_finite"}
    ours = [r for r in caplog.records if r.name.startswith("pdm_edge.ingest")]
    assert not any(r.exc_info for r in ours)
    assert len([r for r in ours if "dead-letter" in r.getMessage()]) <= len(st.deadletters)


def test_label_author_is_the_topic_user_and_the_old_topic_needs_an_identity():
    """Row 16 (decoding): on pdm/v1/{site}/{machine}/label/{user} the author is the user (checked
    by the broker ACL); a different payload author is refused; the old topic without a user is
    refused when an identity is required (the appliance's default)."""
    from pdm_edge.feedback import decode_label_payload, label_topic
    from pdm_edge.errors import LabelError

    body = json.dumps({"start_ns": T0, "end_ns": T0 + S, "kind": "normal"}).encode()
    assert decode_label_payload(label_topic("p", "m", "tech-anna"), body)["author"] == "tech-anna"
    with pytest.raises(LabelError) as err:
        decode_label_payload(label_topic("p", "m", "tech-anna"), json.dumps(
            {"start_ns": T0, "end_ns": T0 + S, "kind": "normal", "author": "boss"}).encode())
    assert err.value.field == "author"
    with pytest.raises(LabelError) as err:
        decode_label_payload(label_topic("p", "m"), body, require_identity=True)
    assert err.value.field == "topic"
