"""Technician feedback (pdm_edge.feedback): validation, idempotency through the function, MQTT and
the CLI, the durable book, dead letters, the labelled-window buffer and the recent-window ring.

MQTT tests run against the real ``mosquitto`` fixture; CLI tests run ``pdm-edge`` in a subprocess.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import json
import threading
import weakref
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from pdm_edge.config import MqttConfig, config_from_dict
from pdm_edge.errors import PdmEdgeError, StoreError
from pdm_edge.feedback import (
    BAD_LABEL,
    Feedback,
    LabelBook,
    LabelError,
    LabelLimits,
    LabelListener,
    LabelledWindowBuffer,
    RecentWindows,
    covers,
    decode_label_payload,
    label_id,
    label_payload,
    label_topic,
    make_label,
    parse_time,
    submit_label,
)
from pdm_edge.store.spool import Spool
from pdm_edge.types import Label, Window
from tests.conftest import Collector, run_cli, wait_until

T0 = 1_795_248_000_000_000_000  # 2026-11-21T08:00:00Z
SEC = 1_000_000_000
SITE, MACHINE = "plant1", "pump-07"
FS = 1000.0


def _fields(**over: Any) -> dict[str, Any]:
    base = dict(site=SITE, machine=MACHINE, start_ns=T0, end_ns=T0 + 60 * SEC, kind="normal", author="j.doe")
    base.update(over)
    return base


def _window(start_s: float, *, sensor: str = "de-accel", machine: str = MACHINE, n: int = 1000, value: float | None = None,
            index: int = 0) -> Window:
    rng = np.random.default_rng(int(start_s * 1000) % 2**32)
    samples = np.full(n, value, dtype=np.float32) if value is not None else rng.standard_normal(n).astype(np.float32)
    return Window(SITE, machine, sensor, "vibration", T0 + round(start_s * SEC), FS, "g", samples, index)


def _mqtt_cfg(address: str) -> MqttConfig:
    return MqttConfig(broker=address, protocol="5", reconnect_min_s=1.0, reconnect_max_s=2.0)


class Publisher:
    """A plain paho client publishing QoS 1 and waiting for each PUBACK."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect(host, int(port))
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str | dict) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- validation ------------------------------------------------------------------------------
BAD_FIELDS = [
    ({"site": ""}, "site"),
    ({"site": "a/b"}, "site"),
    ({"site": 5}, "site"),
    ({"machine": "pump 07"}, "machine"),
    ({"machine": None}, "machine"),
    ({"sensor": "de accel"}, "sensor"),
    ({"alert_id": "a+b"}, "alert_id"),
    ({"alert_id": "x" * 129}, "alert_id"),
    ({"start_ns": 1.5e18}, "start_ns"),
    ({"start_ns": True}, "start_ns"),
    ({"start_ns": -1}, "start_ns"),
    ({"end_ns": "soon"}, "end_ns"),
    ({"end_ns": T0}, "end_ns"),
    ({"end_ns": T0 - SEC}, "end_ns"),
    ({"end_ns": T0 + 8 * 24 * 3600 * SEC}, "end_ns"),
    ({"kind": "Normal"}, "kind"),
    ({"kind": None}, "kind"),
    ({"kind": "fault", "fault_type": "bearing"}, "fault_type"),
    ({"kind": "normal", "fault_type": "imbalance"}, "fault_type"),
    ({"author": ""}, "author"),
    ({"author": "   "}, "author"),
    ({"author": None}, "author"),
    ({"author": "a" * 201}, "author"),
    ({"author": "j.doe\x00"}, "author"),
    ({"note": "x" * 2001}, "note"),
    ({"note": "beep \x07"}, "note"),
    ({"note": 5}, "note"),
    ({"created_ns": "now"}, "created_ns"),
    ({"expected_id": "not-the-id"}, "id"),
]


@pytest.mark.parametrize("over,field", BAD_FIELDS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_FIELDS)])
def test_every_field_is_validated(over, field, tmp_path):
    with pytest.raises(LabelError) as exc:
        make_label(**_fields(**over))
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, PdmEdgeError)
    with LabelBook(tmp_path / "labels.sqlite") as book:  # the one function refuses it and stores nothing
        with pytest.raises(LabelError):
            submit_label(book, **_fields(**over))
        assert book.count() == 0


def test_valid_labels_and_normalisation():
    lb = make_label(**_fields(kind="fault", author="  j.doe  ", note="line 1\nline 2\ttab", sensor="", alert_id="", fault_type=""))
    assert (lb.kind, lb.author, lb.sensor, lb.alert_id, lb.fault_type) == ("fault", "j.doe", None, None, None)
    assert lb.note == "line 1\nline 2\ttab" and lb.created_ns > 0
    for ft in ("bearing_outer_race", "cavitation", "other"):
        assert make_label(**_fields(kind="fault", fault_type=ft)).fault_type == ft
    for kind in ("normal", "ignore"):
        assert make_label(**_fields(kind=kind, sensor="de-accel", alert_id="5b0c-aa_1")).kind == kind
    # exactly at the span limit is fine, one ns more is not; the limit is configurable
    make_label(**_fields(end_ns=T0 + 7 * 24 * 3600 * SEC))
    with pytest.raises(LabelError, match="max_span_s"):
        make_label(**_fields(end_ns=T0 + 120 * SEC), limits=LabelLimits(max_span_s=60))
    with pytest.raises(LabelError) as exc:
        make_label(**_fields(note="abc"), limits=LabelLimits(max_note_chars=2))
    assert exc.value.field == "note"


def test_parse_time():
    assert parse_time("2026-11-21T08:00:00Z", "start") == T0
    assert parse_time("2026-11-21T09:00:00+01:00", "start") == T0
    assert parse_time("2026-11-21T08:00:00.000123Z", "start") == T0 + 123_000
    assert parse_time(T0, "start") == T0 and parse_time(str(T0), "start") == T0
    for bad in ("2026-11-21T08:00:00", "yesterday", 1.7e18, True, None, -5):
        with pytest.raises(LabelError) as exc:
            parse_time(bad, "start")
        assert exc.value.field == "start"


def test_label_id_is_content_only():
    a = make_label(**_fields(author="alice", note="x", created_ns=1))
    b = make_label(**_fields(author="bob", note="y", created_ns=2))
    assert a.id == b.id == label_id(SITE, MACHINE, None, None, T0, T0 + 60 * SEC, "normal", None)
    variants = [_fields(kind="ignore"), _fields(sensor="mic"), _fields(alert_id="a1"), _fields(end_ns=T0 + 61 * SEC),
                _fields(kind="fault"), _fields(kind="fault", fault_type="imbalance"), _fields(machine="pump-08")]
    ids = {make_label(**v).id for v in variants}
    assert len(ids) == len(variants) and a.id not in ids


# -- the book --------------------------------------------------------------------------------
def test_submit_is_idempotent_first_submission_wins(tmp_path):
    with LabelBook.in_dir(tmp_path) as book:
        first, created = submit_label(book, **_fields(author="alice", note="first", created_ns=T0 + 100 * SEC))
        assert created
        again, created2 = submit_label(book, **_fields(author="bob", note="second"))
        assert not created2 and again == first
        assert book.count() == 1 and book.get(first.id).author == "alice"
        with pytest.raises(LabelError):  # the book refuses an id that is not derived from the content
            book.add(Label(id="forged", site=SITE, machine=MACHINE, start_ns=T0, end_ns=T0 + SEC, kind="normal",
                           author="x", created_ns=1))


def test_book_is_durable_filters_and_outbox(tmp_path):
    path = tmp_path / "state" / "labels.sqlite"
    with LabelBook(path) as book:
        a, _ = submit_label(book, **_fields(kind="fault", fault_type="bearing_ball", sensor="de-accel", note="ünïcode ✓"))
        b, _ = submit_label(book, **_fields(start_ns=T0 + 3600 * SEC, end_ns=T0 + 3700 * SEC, kind="ignore"))
        c, _ = submit_label(book, **_fields(machine="fan-1"))
    with LabelBook(path) as book:  # reopened: everything is still there, field for field
        assert book.get(a.id) == a and book.get(b.id) == b and book.get("nope") is None
        assert book.list() == sorted([a, c], key=lambda x: x.id) + [b]  # by (start, id)
        assert {x.id for x in book.list(machine=MACHINE)} == {a.id, b.id}
        assert book.list(site=SITE, machine=MACHINE, kind="ignore") == [b]
        assert book.list(machine=MACHINE, start_ns=T0 + 3650 * SEC) == [b]  # overlap of [start, end)
        assert book.list(machine=MACHINE, end_ns=T0 + 3600 * SEC) == [a]
        assert [lb.id for _, lb in book.since(0)] == [a.id, b.id, c.id]
        seq_a = book.since(0)[0][0]
        assert [lb.id for _, lb in book.since(seq_a)] == [b.id, c.id]
        assert [lb.id for lb in book.unexported()] == [a.id, b.id, c.id]
        book.mark_exported([a.id, c.id])
    with LabelBook(path) as book:
        assert book.unexported() == [b]


def test_book_is_thread_safe(tmp_path):
    book = LabelBook.in_dir(tmp_path)
    results: list[bool] = []
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):  # every thread submits the same 20 labels plus 5 of its own
                results.append(submit_label(book, **_fields(start_ns=T0 + i * SEC, end_ns=T0 + (i + 1) * SEC))[1])
            for i in range(5):
                submit_label(book, **_fields(sensor=f"s{k}", start_ns=T0 + i * SEC, end_ns=T0 + (i + 1) * SEC))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(results) == 20 and len(results) == 160
    assert book.count() == 20 + 8 * 5
    book.close()


# -- MQTT payloads ---------------------------------------------------------------------------
def test_decode_label_payload():
    topic = label_topic(SITE, MACHINE)
    f = decode_label_payload(topic, json.dumps({"start": "2026-11-21T08:00:00Z", "end_ns": T0 + SEC, "kind": "normal",
                                                "author": "a", "site": SITE}).encode())
    assert (f["site"], f["machine"], f["start_ns"], f["end_ns"], f["created_ns"]) == (SITE, MACHINE, T0, T0 + SEC, None)
    # the canonical payload round-trips, id included
    lb = make_label(**_fields(kind="fault", fault_type="looseness", sensor="mic", alert_id="a-1", note="n",
                              start_ns=T0 + 123_456_789))
    back = make_label(**decode_label_payload(topic, json.dumps(label_payload(lb)).encode()))
    assert back == lb
    bad = [
        ("pdm/v1/plant1/label", {}, "topic"),
        ("pdm/v1/pl ant/m/label", {}, "topic"),
        (topic, b"\xff\xfe", "payload"),
        (topic, b"{not json", "payload"),
        (topic, b"[1, 2]", "payload"),
        (topic, b"x" * 70000, "payload"),
        (topic, {"start_ns": T0, "end_ns": T0 + SEC, "kind": "normal", "author": "a", "knd": 1}, "knd"),
        (topic, {"start_ns": T0, "end_ns": T0 + SEC, "kind": "normal", "author": "a", "machine": "other"}, "machine"),
        (topic, {"start_ns": T0, "end_ns": T0 + SEC, "kind": "normal", "author": "a", "site": "other"}, "site"),
        (topic, {"end_ns": T0 + SEC, "kind": "normal", "author": "a"}, "start"),
        (topic, {"start": T0, "end_ns": T0 + SEC, "kind": "normal", "author": "a"}, "start"),
        (topic, {"start_ns": "1", "end_ns": T0 + SEC, "kind": "normal", "author": "a"}, "start_ns"),
        (topic, {"start": "2026-11-21T08:00:01Z", "start_ns": T0, "end_ns": T0 + 2 * SEC, "kind": "normal", "author": "a"}, "start"),
    ]
    for t, payload, field in bad:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        with pytest.raises(LabelError) as exc:
            decode_label_payload(t, raw)
        assert exc.value.field == field, (payload, exc.value)


# -- windows ---------------------------------------------------------------------------------
def test_covers_rule():
    lb = make_label(**_fields(start_ns=T0 + 10 * SEC, end_ns=T0 + 20 * SEC))
    assert covers(lb, _window(10)) and covers(lb, _window(19))
    assert covers(lb, _window(9.5)) and covers(lb, _window(19.5))  # half inside counts
    assert not covers(lb, _window(9.4)) and not covers(lb, _window(19.6)) and not covers(lb, _window(20))
    assert not covers(lb, _window(12, machine="other"))
    only_mic = make_label(**_fields(sensor="mic", start_ns=T0 + 10 * SEC, end_ns=T0 + 20 * SEC))
    assert covers(only_mic, _window(12, sensor="mic")) and not covers(only_mic, _window(12))
    short = make_label(**_fields(start_ns=T0 + 10_200_000_000, end_ns=T0 + 10_300_000_000))  # 0.1 s inside one window
    assert covers(short, _window(10)) and covers(short, _window(9.5)) and not covers(short, _window(10.5))


def test_recent_windows_horizon_and_capture():
    ring = RecentWindows(max_seconds=10)
    for i in range(100):  # 1 s windows every 0.5 s: 0 .. 50.5 s
        ring.add(_window(i * 0.5, index=i))
        ring.add(_window(i * 0.5, sensor="mic", index=i))
    ring.add(_window(0, machine="fan-1"))
    st = ring.stats()
    assert st["streams"] == 3 and st["windows"] == 2 * 20 + 1  # windows ending after 50.5 + 1 - 10 s
    lb = make_label(**_fields(start_ns=T0 + 45 * SEC, end_ns=T0 + 48 * SEC))
    got = ring.capture(lb)
    assert [(w.sensor, w.start_ns) for w in got] == [(s, T0 + round(t * SEC)) for s in ("de-accel", "mic")
                                                     for t in (44.5, 45, 45.5, 46, 46.5, 47, 47.5)]
    assert all(covers(lb, w) for w in got)
    only_mic = make_label(**_fields(sensor="mic", start_ns=T0 + 45 * SEC, end_ns=T0 + 48 * SEC))
    assert {w.sensor for w in ring.capture(only_mic)} == {"mic"}
    too_old = make_label(**_fields(start_ns=T0 + 10 * SEC, end_ns=T0 + 20 * SEC))  # beyond the horizon
    assert ring.capture(too_old) == []
    # the byte bound keeps the newest windows; a clock going backwards starts a new ring
    small = RecentWindows(max_seconds=1000, max_bytes_per_stream=5 * 4000)
    for i in range(50):
        small.add(_window(i))
    assert small.stats() == {"streams": 1, "windows": 5, "bytes": 20000}
    assert small.capture(make_label(**_fields(start_ns=T0, end_ns=T0 + 50 * SEC)))[0].start_ns == T0 + 45 * SEC
    small.add(_window(0))
    assert small.stats()["windows"] == 1
    with pytest.raises(ValueError):
        RecentWindows(0)


def test_recent_windows_hold_each_sample_of_overlapping_windows_once():
    """Windows cut every half window from one signal: the ring holds about half their bytes,
    and every captured window equals the one added (samples included); a window whose samples
    are not its neighbours' (a glitch), and windows after a gap, keep their own copy."""
    signal = np.random.default_rng(5).standard_normal(60_000).astype(np.float32)
    n, hop = 1000, 500

    def cut(k: int, data: np.ndarray = signal) -> Window:
        return Window(SITE, MACHINE, "de-accel", "vibration", T0 + round(k * hop * SEC / FS), FS, "g", data[k * hop:k * hop + n], k)

    added = [cut(k) for k in range(40)]
    glitch = signal.copy()
    glitch[21 * hop + 10] += 1.0  # window 21 differs from its neighbours' samples
    added[21] = cut(21, glitch)
    added += [cut(k) for k in range(60, 70)]  # a gap of 20 hops, then windows again
    ring = RecentWindows(max_seconds=1000)
    fresh = [dataclasses.replace(w, samples=w.samples.copy()) for w in added]  # only the ring holds these
    alive = [weakref.ref(w.samples) for w in fresh]
    for w in fresh:
        ring.add(w)
    del fresh, w
    st = ring.stats()
    assert st["windows"] == 50
    shared = {k for k in range(1, 39, 2) if k != 21} | {k for k in range(61, 69, 2)}  # between two non-overlapping ones
    assert st["bytes"] == (50 - len(shared)) * n * 4, (st, len(shared))
    gc.collect()
    position = [*range(40), *range(60, 70)]  # window k at position i of `added`
    assert {position[i] for i, r in enumerate(alive) if r() is None} == shared  # the shared windows' own copies are freed
    got = ring.capture(make_label(**_fields(start_ns=T0, end_ns=T0 + 100 * SEC)))
    assert got == added and [w.index for w in got] == [w.index for w in added]
    assert all(np.array_equal(a.samples, b.samples) for a, b in zip(got, added))
    # the horizon evicts slices and their neighbours alike
    short = RecentWindows(max_seconds=2 * n / FS)
    for w in added[:40]:
        short.add(w)
    assert [w.start_ns for w in short.capture(make_label(**_fields(start_ns=T0, end_ns=T0 + 100 * SEC)))] == \
        [w.start_ns for w in added[36:40]]


def test_buffer_stores_windows_once_per_label_and_survives_reopen(tmp_path):
    path = tmp_path / "label_windows.sqlite"
    fault = make_label(**_fields(kind="fault", start_ns=T0, end_ns=T0 + 10 * SEC))
    ign = make_label(**_fields(kind="ignore", start_ns=T0 + 5 * SEC, end_ns=T0 + 20 * SEC))
    w5, w6, w15 = _window(5, index=3), _window(6), _window(15)
    with LabelledWindowBuffer(path) as buf:
        assert buf.add(fault, w5) and buf.add(fault, w5)  # twice: stored once
        assert buf.offer(w5, [fault, ign]) == 2
        assert buf.offer(w6, [fault, ign]) == 2
        assert buf.offer(w15, [fault, ign]) == 1
        assert buf.offer(_window(30), [fault, ign]) == 0
        with pytest.raises(ValueError):
            buf.add(fault, w15)
        st = buf.stats()
        assert (st.windows, st.bytes, st.labels) == (3, 3 * 4000, 2)
        assert st.by_class["fault"]["windows"] == 2 and st.by_class["ignore"]["windows"] == 1
    with LabelledWindowBuffer(path) as buf:
        got = buf.windows_for(fault.id)
        assert got == [w5, w6] and got[0].index == 3 and got[0].kind == "vibration" and got[0].unit == "g"
        assert got[0].sample_rate_hz == FS and got[0].samples.dtype == np.float32
        assert buf.windows_for(ign.id) == [w5, w6, w15]
        assert sorted(buf.label_ids()) == sorted([fault.id, ign.id])


def test_buffer_retention_order_under_the_byte_bound(tmp_path):
    labels = {k: make_label(**_fields(kind=k, start_ns=T0, end_ns=T0 + 1000 * SEC)) for k in ("fault", "normal", "ignore")}
    buf = LabelledWindowBuffer(tmp_path / "b.sqlite", max_bytes=10 * 4000)  # room for ten 1000-sample windows
    t = 0
    starts: dict[str, list[int]] = {}
    for kind in ("fault", "normal", "ignore", "fault", "normal", "ignore", "fault", "normal", "ignore"):
        buf.add(labels[kind], _window(t))
        starts.setdefault(kind, []).append(T0 + t * SEC)
        t += 1
    held = _window(t)
    assert buf.hold(held)
    assert buf.stats().windows == 10 and buf.stats().evicted == {"held": 0, "ignore": 0, "normal": 0, "fault": 0}

    def remaining(kind: str) -> list[int]:
        return [w.start_ns for w in buf.windows_for(labels[kind].id)]

    order = []
    for _ in range(7):  # each new fault window pushes one window out: held, then ignore, then normal, oldest first
        t += 1
        assert buf.add(labels["fault"], _window(t))
        st = buf.stats()
        assert st.windows == 10 and st.bytes <= buf.max_bytes
        order.append(dict(st.evicted))
    assert [sum(e.values()) for e in order] == list(range(1, 8))
    assert order[0] == {"held": 1, "ignore": 0, "normal": 0, "fault": 0}
    assert order[3] == {"held": 1, "ignore": 3, "normal": 0, "fault": 0}
    assert order[6] == {"held": 1, "ignore": 3, "normal": 3, "fault": 0}
    assert remaining("ignore") == [] and remaining("normal") == []
    assert remaining("fault")[:3] == starts["fault"]  # faults go last
    # a buffer full of faults refuses (evicts at once) a lower-class window, and evicts the oldest fault for a new one
    assert not buf.add(labels["ignore"], _window(100))
    assert buf.stats().evicted["ignore"] == 4
    assert buf.add(labels["fault"], _window(101))
    assert buf.stats().evicted["fault"] == 1 and remaining("fault")[0] == starts["fault"][1]
    buf.close()


def test_buffer_age_policy_and_adopt(tmp_path):
    now = [T0]
    buf = LabelledWindowBuffer(tmp_path / "b.sqlite", max_age_s=30 * 86400, hold_max_age_s=7 * 86400, clock_ns=lambda: now[0])
    labels = {k: make_label(**_fields(kind=k, start_ns=T0, end_ns=T0 + 100 * SEC)) for k in ("fault", "normal", "ignore")}
    for i, (kind, lb) in enumerate(labels.items()):
        buf.add(lb, _window(i))
    buf.hold(_window(10))
    buf.hold(_window(20))
    # a label given later adopts a held window: it is no longer "held" and ages like its label
    late = make_label(**_fields(kind="fault", start_ns=T0 + 20 * SEC, end_ns=T0 + 21 * SEC))
    assert buf.adopt(late) == 1 and buf.windows_for(late.id) == [_window(20)]
    now[0] = T0 + 8 * 86400 * SEC
    assert buf.expire() == 1  # the held window at 10 s
    st = buf.stats()
    assert st.by_class["held"]["windows"] == 0 and st.expired["held"] == 1
    now[0] = T0 + 31 * 86400 * SEC
    assert buf.expire() == 2  # normal and ignore
    st = buf.stats()
    assert st.windows == 2 and st.by_class["fault"]["windows"] == 2  # faults never age out
    assert st.expired == {"held": 1, "ignore": 1, "normal": 1, "fault": 0}
    assert buf.windows_for(labels["normal"].id) == []
    buf.close()


# -- the running stage -----------------------------------------------------------------------
def test_feedback_captures_observes_holds_and_forwards(tmp_path):
    cfg = config_from_dict({"mqtt": {"broker": "127.0.0.1:1883"}, "feedback": {"state_dir": str(tmp_path)}}, environ={})
    spool = Spool(tmp_path / "spool.sqlite")
    fb = Feedback.from_config(cfg.feedback, spool=spool)
    for i in range(40):  # 0 .. 20 s of one stream
        assert fb.observe_many([_window(i * 0.5, index=i)]) == 0
    # a label given after the fact captures the ring's windows
    lb, created = fb.submit(**_fields(start_ns=T0 + 5 * SEC, end_ns=T0 + 8 * SEC, kind="normal", alert_id="a-1"))
    assert created and len(fb.buffer.windows_for(lb.id)) == 7  # 4.5 .. 7.5 s (half-overlap counts)
    assert spool.count_by_kind() == {"label": 1}
    # a label over a running span (maintenance in progress) stores windows as they arrive
    ign, _ = fb.submit(**_fields(start_ns=T0 + 20 * SEC, end_ns=T0 + 25 * SEC, kind="ignore"))
    stored = sum(fb.observe_many([_window(20 + i * 0.5)]) for i in range(12))  # 20 .. 25.5 s
    assert stored == 10  # 20 .. 24.5 s as they arrive, and 19.5 s from the ring when it was given:
    assert len(fb.buffer.windows_for(ign.id)) == 11
    # a repeat is one label, not forwarded again
    assert fb.submit(**_fields(start_ns=T0 + 5 * SEC, end_ns=T0 + 8 * SEC, kind="normal", alert_id="a-1", author="x"))[1] is False
    assert spool.count_by_kind() == {"label": 2}
    # an alert's span held now, labelled later (after the ring forgot it)
    assert fb.hold_span(SITE, MACHINE, "de-accel", T0 + 24 * SEC, T0 + 26 * SEC) == 5  # 23.5 .. 25.5 s
    # a label written by another process (the CLI) is picked up by sync
    with LabelBook.in_dir(tmp_path) as other:
        cli_label, _ = submit_label(other, **_fields(start_ns=T0 + 25 * SEC, end_ns=T0 + 26 * SEC, kind="fault"))
    assert fb.sync() == 1
    assert len(fb.buffer.windows_for(cli_label.id)) == 3  # 24.5 .. 25.5 s
    assert spool.count_by_kind() == {"label": 3} and fb.book.unexported() == []
    assert fb.errors == 0
    fb.close()
    spool.close()


# -- MQTT ------------------------------------------------------------------------------------
def _payload(**over: Any) -> dict[str, Any]:
    p = {"start": "2026-11-21T08:00:00Z", "end": "2026-11-21T08:05:00Z", "kind": "fault", "fault_type": "imbalance",
         "sensor": "de-accel", "author": "j.doe", "note": "via MQTT"}
    p.update(over)
    return p


def test_mqtt_labels_dead_letters_and_idempotency_across_paths(mosquitto, tmp_path):
    state = tmp_path / "state"
    cfg = config_from_dict({"mqtt": {"broker": mosquitto.address}, "feedback": {"state_dir": str(state)}}, environ={})
    fb = Feedback.from_config(cfg.feedback)
    dead = Collector(mosquitto.address, "pdm/v1/_deadletter/#")
    pub = Publisher(mosquitto.address)
    listener = LabelListener(_mqtt_cfg(mosquitto.address), "fb-test", fb.submit).start()
    try:
        assert listener.wait_ready(10)
        topic = label_topic(SITE, MACHINE)
        # 1) the function first, then the same label over MQTT: one label
        direct, created = fb.submit(**_fields(start_ns=T0, end_ns=T0 + 300 * SEC, kind="fault", fault_type="imbalance",
                                              sensor="de-accel", author="dashboard:alice"))
        assert created
        pub.send(topic, _payload())
        assert wait_until(lambda: listener.stats().duplicates == 1, 10)
        # 2) a new label over MQTT, twice (a redelivery): one label
        second = _payload(start_ns=T0 + 3600 * SEC, end_ns=T0 + 3660 * SEC, kind="normal", fault_type=None, start=None, end=None)
        pub.send(topic, second)
        pub.send(topic, second)
        assert wait_until(lambda: listener.stats().created == 1 and listener.stats().duplicates == 2, 10)
        assert fb.book.count() == 2
        # 3) bad ones are dead-lettered with the reason and counted; the listener keeps running
        bads = [
            (topic, b"{oops", "payload"),
            (topic, json.dumps(_payload(kind="broken")).encode(), "kind"),
            (topic, json.dumps(_payload(site="elsewhere")).encode(), "site"),
            (topic, json.dumps(_payload(extra=1)).encode(), "extra"),
            (topic, json.dumps(_payload(start="2026-11-21T08:00:00")).encode(), "start"),
            (label_topic(SITE, "pump-08"), json.dumps(_payload(author="")).encode(), "author"),
        ]
        for t, raw, _ in bads:
            pub.send(t, raw)
        msgs = dead.wait_for(len(bads), 10)
        assert len(msgs) == len(bads)
        for (topic_dl, raw_dl, _), (t, raw, field) in zip(msgs, bads):
            assert topic_dl == f"pdm/v1/_deadletter/{BAD_LABEL}"
            dl = json.loads(raw_dl)
            assert dl["topic"] == t and dl["reason"] == BAD_LABEL and dl["detail"].startswith(f"{field}: ")
            assert dl["bytes"] == len(raw) and base64.b64decode(dl["head_b64"]) == raw[:256] and dl["received_ns"] > 0
        st = listener.stats()
        assert st.deadletters == {BAD_LABEL: len(bads)} and st.received == 3 + len(bads)
        assert st.rejected_fields == {"payload": 1, "kind": 1, "site": 1, "extra": 1, "start": 1, "author": 1}
        third = _payload(start_ns=T0 + 7200 * SEC, end_ns=T0 + 7260 * SEC, kind="ignore", fault_type=None, start=None, end=None)
        pub.send(topic, third)
        assert wait_until(lambda: listener.stats().created == 2, 10)
        assert fb.book.count() == 3 and st.connected
        # 4) the CLI with the same label as MQTT and the function: already stored, still one label
        args = ["label", "add", "--site", SITE, "--machine", MACHINE, "--sensor", "de-accel", "--start", "2026-11-21T08:00:00Z",
                "--end", "2026-11-21T08:05:00+00:00", "--kind", "fault", "--fault-type", "imbalance", "--author", "cli:bob",
                "--state-dir", str(state), "--json"]
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["new"] is False and out["id"] == direct.id and out["author"] == "dashboard:alice"
        # 5) a new label from the CLI, then the same over MQTT: one label, picked up by the appliance
        res = run_cli("label", "add", "--site", SITE, "--machine", MACHINE, "--start", str(T0 + 9000 * SEC),
                      "--end", str(T0 + 9060 * SEC), "--kind", "normal", "--author", "cli:bob", "--state-dir", str(state))
        assert res.returncode == 0 and res.stdout.startswith("stored label "), res
        pub.send(topic, {"start_ns": T0 + 9000 * SEC, "end_ns": T0 + 9060 * SEC, "kind": "normal", "author": "mqtt"})
        assert wait_until(lambda: listener.stats().duplicates == 3, 10)
        assert fb.book.count() == 4 and len(fb.book.list(machine=MACHINE)) == 4
        res = run_cli("label", "list", "--machine", MACHINE, "--state-dir", str(state), "--json")
        listed = [json.loads(line) for line in res.stdout.splitlines()]
        assert len(listed) == 4 and listed[0]["id"] == direct.id
    finally:
        listener.stop()
        pub.close()
        dead.close()
        fb.close()


def test_mqtt_listener_survives_handler_errors_and_keeps_its_session(mosquitto, tmp_path):
    book = LabelBook.in_dir(tmp_path)
    calls = {"n": 0}

    def on_label(**fields: Any):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk on fire")
        return submit_label(book, **fields)

    dead = Collector(mosquitto.address, "pdm/v1/_deadletter/#")
    pub = Publisher(mosquitto.address)
    cfg = _mqtt_cfg(mosquitto.address)
    listener = LabelListener(cfg, "fb-session", on_label).start()
    try:
        assert listener.wait_ready(10)
        topic = label_topic(SITE, MACHINE)
        pub.send(topic, _payload())
        msgs = dead.wait_for(1, 10)
        assert msgs and msgs[0][0] == "pdm/v1/_deadletter/internal_error" and "disk on fire" in json.loads(msgs[0][1])["detail"]
        pub.send(topic, _payload())
        assert wait_until(lambda: listener.stats().created == 1, 10)
        # labels published while the listener is away arrive when it is back (persistent session, QoS 1)
        listener.stop()
        pub.send(topic, _payload(start_ns=T0 + 100 * SEC, end_ns=T0 + 110 * SEC, start=None, end=None, kind="normal", fault_type=None))
        listener = LabelListener(cfg, "fb-session", on_label).start()
        assert wait_until(lambda: listener.stats().created == 1, 10)
        assert book.count() == 2 and listener.stats().deadletters == {}
    finally:
        listener.stop()
        pub.close()
        dead.close()
        book.close()


# -- CLI -------------------------------------------------------------------------------------
def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    base = ["label", "add", "--site", SITE, "--machine", MACHINE, "--author", "a", "--state-dir", str(tmp_path)]
    cases = [
        (["--start", "2026-11-21T08:00:00Z", "--end", "2026-11-21T08:01:00Z", "--kind", "broken"], "label error: kind: "),
        (["--start", "2026-11-21T08:00:00", "--end", "2026-11-21T08:01:00Z", "--kind", "normal"], "label error: start: "),
        (["--start", "2026-11-21T08:01:00Z", "--end", "2026-11-21T08:00:00Z", "--kind", "normal"], "label error: end_ns: "),
        (["--start", "2026-11-21T08:00:00Z", "--end", "2026-11-21T08:01:00Z", "--kind", "ignore", "--fault-type", "other"],
         "label error: fault_type: "),
    ]
    for extra, prefix in cases:
        res = run_cli(*base, *extra)
        assert res.returncode == 2, res
        assert res.stderr.startswith(prefix) and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "labels.sqlite").exists() or LabelBook.in_dir(tmp_path).count() == 0
    res = run_cli("label", "list", "--state-dir", str(tmp_path / "none"))
    assert res.returncode == 0 and "no labels" in res.stdout


def test_buffer_read_only_span_queries(tmp_path):
    """The dashboard's view of the buffer: read-only, by time span and normal-labelled windows."""
    with pytest.raises(StoreError):
        LabelledWindowBuffer(tmp_path / "none.sqlite", readonly=True)
    buf = LabelledWindowBuffer.in_dir(tmp_path)
    ws = [_window(float(i), sensor="acc") for i in range(10)]  # 1 s windows at 0..9 s
    normal = make_label(site=SITE, machine=MACHINE, start_ns=T0, end_ns=T0 + 5 * SEC, kind="normal", author="t")
    for w in ws[:5]:
        buf.add(normal, w)
    for w in ws[5:]:
        buf.hold(w)
    ro = LabelledWindowBuffer.in_dir(tmp_path, readonly=True)
    try:
        got = ro.windows_between(SITE, MACHINE, None, T0 + 2 * SEC, T0 + 7 * SEC)
        assert [(w.start_ns - T0) // SEC for w in got] == [2, 3, 4, 5, 6]
        assert len(ro.windows_between(SITE, MACHINE, "acc", T0, T0 + 100 * SEC, limit=3)) == 3
        assert [(w.start_ns - T0) // SEC for w in ro.normal_windows(SITE, MACHINE, "acc", limit=2)] == [4, 3]
        assert ro.stats().windows == 10
        with pytest.raises(StoreError):
            ro.hold(_window(11.0, sensor="acc"))
    finally:
        ro.close()
        buf.close()


def test_label_written_by_another_process_reaches_the_store_while_no_windows_flow(tmp_path):
    """The sync thread (one cursor over the book) takes in a label the CLI or the dashboard
    wrote to the book directly, captures its windows and forwards it through the spool to the
    store, without a single window being observed after it was written."""
    from pdm_edge.feedback.labels import LabelBook, submit_label
    from pdm_edge.store.spool import SpoolWriter
    from pdm_edge.store.sqlite import SQLiteStore

    cfg = config_from_dict({"mqtt": {"broker": "127.0.0.1:1883"}, "feedback": {"state_dir": str(tmp_path)}}, environ={})
    spool = Spool(tmp_path / "spool.sqlite")
    store = SQLiteStore(tmp_path / "results.sqlite")
    writer = SpoolWriter(spool, store).start()
    fb = Feedback.from_config(cfg.feedback, spool=spool)
    events: list[tuple[int, Label]] = []
    fb.subscribe(lambda seq, label: events.append((seq, label)))
    try:
        fb.observe_many([_window(i * 0.5, index=i) for i in range(20)])  # 0 .. 10 s in the ring, then silence
        fb.start()
        other = LabelBook.in_dir(tmp_path)  # another process's connection (``pdm-edge label add``)
        label, _ = submit_label(other, **_fields(start_ns=T0 + 2 * SEC, end_ns=T0 + 4 * SEC, kind="fault",
                                                 fault_type="bearing_outer_race"))
        other.close()
        assert wait_until(lambda: [lb.id for lb in store.query_labels(SITE, MACHINE, T0, T0 + 60 * SEC)] == [label.id],
                          timeout=5.0)
        assert [(lb.id, lb.kind) for _, lb in events] == [(label.id, "fault")]  # one event, in book order
        assert len(fb.buffer.windows_for(label.id)) == 5  # windows starting 1.5 .. 3.5 s, from the ring
        fb.sync()
        assert len(events) == 1  # the cursor moved on: no second event for the same label
    finally:
        fb.close()
        writer.stop(timeout=2.0)
        spool.close()
        store.close()
