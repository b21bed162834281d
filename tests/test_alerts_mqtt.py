"""Alerts, machine status and scores over MQTT (pdm_edge.alerts.publisher), against a real Mosquitto.

The first tests exercise the pure :class:`AlertTracker`; the rest run :class:`ResultPublisher`
against the ``mosquitto`` fixture and observe the wire with plain paho subscribers.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pdm_edge.alerts import AlertTracker, ResultPublisher, alert_id
from pdm_edge.config import AlertsConfig, MqttConfig
from pdm_edge.errors import ConfigError
from pdm_edge.alerts.publisher import alert_payload
from pdm_edge.types import FaultMatch, Score
from tests.conftest import Collector, wait_until

T0 = 1_795_248_000_000_000_000  # 2026-11-21T08:00:00Z
SEC = 1_000_000_000
THR = 1.0
LO = 0.2
SITE, MACHINE, SENSOR = "plant1", "pump-07", "de-accel"

# window i covers [T0 + i s, T0 + (i + 1) s). With k=3, n=5: windows 0-4 below; 5, 7, 8 above
# (6 below) -> raised at window 8, span starting at window 5; 9-11 above (no second raise);
# 12-16 below -> cleared at window 16, span ending with window 11; peak 5.0 (window 9).
SERIES = [LO] * 5 + [3.0, LO, 3.5, 4.0] + [5.0, 4.5, 3.2] + [LO] * 5
RAISE_AT, CLEAR_AT, START_W, END_W = 8, 16, 5, 11
# the machine's state after each window of SERIES
STATES = ["normal"] * 5 + ["warning", "normal", "warning"] + ["alarm"] * 8 + ["normal"]


def _score(i: int, value: float, *, site: str = SITE, machine: str = MACHINE, sensor: str = SENSOR,
           threshold: float | None = THR, version: str | None = "v1") -> Score:
    return Score(site, machine, sensor, T0 + i * SEC, value, threshold,
                 threshold is not None and value > threshold, version)


def _end(i: int) -> int:
    return T0 + (i + 1) * SEC


def _mqtt_cfg(address: str, protocol: str = "5") -> MqttConfig:
    return MqttConfig(broker=address, protocol=protocol, reconnect_min_s=1.0, reconnect_max_s=2.0)


class Sub:
    """A plain paho subscriber that records topic, JSON payload, QoS and retain flag.

    With ``client_id`` it keeps a persistent session (MQTT 5: clean start off and a session
    expiry; 3.1.1: clean session off): the broker then queues QoS 1 messages for it while it is
    disconnected, across a broker restart too (the fixture runs Mosquitto with persistence).
    paho's network thread (``loop_start``) reconnects by itself; ``on_connect`` subscribes again.
    """

    def __init__(self, address: str, topic: str, *, protocol: str = "5", client_id: str = "") -> None:
        host, port = address.rsplit(":", 1)
        v5 = protocol == "5"
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        persistent = bool(client_id)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                  clean_session=None if v5 else not persistent)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        kwargs: dict[str, Any] = {}
        if v5 and persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect(host, int(port), **kwargs)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscriber could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append({"topic": msg.topic, "data": json.loads(msg.payload), "qos": msg.qos, "retain": bool(msg.retain)})

    def on(self, suffix: str) -> list[dict[str, Any]]:
        """The messages whose topic ends with ``suffix``, in arrival order."""
        with self._lock:
            return [m for m in self.messages if m["topic"].endswith(suffix)]

    def wait_on(self, suffix: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.on(suffix)) >= n, timeout)
        return self.on(suffix)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _dedup(states: list[str]) -> list[str]:
    return [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]


# -- AlertTracker (pure) -----------------------------------------------------------------------
def test_tracker_raise_clear_sequence_ids_and_statuses():
    tr = AlertTracker(k=3, n=5, stale_after_s=60)
    events, states = [], []
    for i, v in enumerate(SERIES):
        for a in tr.update(_score(i, v), _end(i)):
            events.append((i, a))
        states.append(tr.machine_status(SITE, MACHINE, _end(i))["state"])
    assert [(i, a.state) for i, a in events] == [(RAISE_AT, "raised"), (CLEAR_AT, "cleared")]
    raised, cleared = events[0][1], events[1][1]
    expected_id = alert_id(SITE, MACHINE, SENSOR, T0 + START_W * SEC)
    assert raised.id == cleared.id == expected_id
    assert (raised.start_ns, raised.end_ns, raised.peak_score) == (T0 + START_W * SEC, None, 4.0)
    assert (cleared.start_ns, cleared.end_ns, cleared.peak_score) == (T0 + START_W * SEC, _end(END_W), 5.0)
    assert (raised.threshold, raised.model_version, raised.site, raised.machine, raised.sensor) == (THR, "v1", SITE, MACHINE, SENSOR)
    assert states == STATES
    # replaying the same scores into a fresh tracker gives the same ids (idempotent re-publish)
    tr2 = AlertTracker(3, 5)
    again = [a for i, v in enumerate(SERIES) for a in tr2.update(_score(i, v), _end(i))]
    assert [a.id for a in again] == [expected_id, expected_id]
    # a different stream or start gives a different id
    assert alert_id(SITE, MACHINE, "other", T0 + START_W * SEC) != expected_id
    assert alert_id(SITE, MACHINE, SENSOR, T0 + START_W * SEC + 1) != expected_id


def test_tracker_uncalibrated_never_alerts_and_states():
    tr = AlertTracker(k=1, n=1)
    assert tr.machine_status(SITE, MACHINE, T0)["state"] == "uncalibrated"  # never scored
    assert tr.machine_status(SITE, MACHINE, T0)["stale"] is True
    for i in range(20):
        assert tr.update(_score(i, 100.0, threshold=None, version=None), _end(i)) == []
    st = tr.machine_status(SITE, MACHINE, _end(19))
    assert st["state"] == "uncalibrated" and st["model_versions"] == [] and st["open_alerts"] == []
    assert st["last_score_ns"] == T0 + 19 * SEC and st["last_score"] == "2026-11-21T08:00:19.000000Z"
    # a second, calibrated sensor: one unmonitored sensor keeps the machine "uncalibrated" ...
    tr.update(_score(20, LO, sensor="nde"), _end(20))
    st = tr.machine_status(SITE, MACHINE, _end(20))
    assert st["state"] == "uncalibrated" and st["sensors"]["nde"]["state"] == "normal"
    # ... but a warning or an alarm on the calibrated one wins (k = n = 1: the first window raises)
    alerts = tr.update(_score(21, 9.0, sensor="nde", version="v2"), _end(21))
    assert [a.state for a in alerts] == ["raised"]
    st = tr.machine_status(SITE, MACHINE, _end(21))
    assert st["state"] == "alarm" and st["open_alerts"] == [alerts[0].id]
    assert st["model_version"] == "v2" and st["model_versions"] == ["v2"]
    # uncalibrated scores neither raise nor clear, nor count towards n
    assert tr.update(_score(22, LO, sensor="nde", threshold=None), _end(22)) == []
    assert tr.machine_status(SITE, MACHINE, _end(22))["state"] == "alarm"
    assert [a.state for a in tr.update(_score(23, LO, sensor="nde"), _end(23))] == ["cleared"]


def test_tracker_stale_duplicates_and_bad_config():
    tr = AlertTracker(k=2, n=3, stale_after_s=5)
    tr.update(_score(0, LO), _end(0))
    assert tr.machine_status(SITE, MACHINE, _end(0) + 5 * SEC)["stale"] is False
    st = tr.machine_status(SITE, MACHINE, _end(0) + 5 * SEC + 1)
    assert st["stale"] is True and st["state"] == "normal" and st["sensors"][SENSOR]["stale"] is True
    # "received" time overrides the window end (the publisher passes its wall clock)
    tr.update(_score(1, LO), _end(1), received_ns=10**20)
    assert tr.machine_status(SITE, MACHINE, 10**20 + SEC)["stale"] is False
    # a re-delivered window (same start) is ignored: two copies of one spike do not raise
    assert tr.update(_score(2, 9.0), _end(2)) == []
    assert tr.update(_score(2, 9.0), _end(2)) == []
    assert tr.duplicates == 1
    assert tr.machine_status(SITE, MACHINE, _end(2))["state"] == "warning"
    with pytest.raises(ValueError):
        tr.update(_score(3, LO), T0 + 3 * SEC)  # empty window
    with pytest.raises(ConfigError, match="alerts.k"):
        AlertTracker(k=6, n=5, stale_after_s=5)
    with pytest.raises(ValueError, match="must not exceed"):  # pydantic's ValidationError is a ValueError
        AlertsConfig(k=6, n=5)


# -- ResultPublisher against Mosquitto -----------------------------------------------------------
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_raise_clear_sequence_topics_payloads_qos_and_retain(mosquitto, protocol):
    """Raised exactly once, no duplicate while it stays high, cleared exactly once; scores on
    QoS 0, alerts on QoS 1 not retained, status on QoS 1 retained and only on change."""
    sub = Sub(mosquitto.address, "pdm/v1/#", protocol=protocol)
    pub = ResultPublisher(_mqtt_cfg(mosquitto.address, protocol), AlertsConfig(k=3, n=5), "edge1", status_interval_s=3600).start()
    try:
        assert pub.wait_connected(10)
        returned = []
        for i, v in enumerate(SERIES):
            returned += pub.handle(_score(i, v), _end(i))
        assert pub.flush(10)
        alerts = sub.wait_on("/alert", 2)
        scores = sub.wait_on("/score", len(SERIES))
        statuses = sub.wait_on("/status", len(_dedup(STATES)))
        time.sleep(0.3)  # nothing more may arrive
        st = pub.stats()
    finally:
        pub.stop()
        sub.close()

    assert [a.state for a in returned] == ["raised", "cleared"]
    aid = alert_id(SITE, MACHINE, SENSOR, T0 + START_W * SEC)
    assert len(sub.on("/alert")) == 2
    assert [m["topic"] for m in alerts] == [f"pdm/v1/{SITE}/{MACHINE}/alert"] * 2
    assert [(m["qos"], m["retain"]) for m in alerts] == [(1, False)] * 2
    assert alerts[0]["data"] == {
        "id": aid, "state": "raised", "site": SITE, "machine": MACHINE, "sensor": SENSOR,
        "start": "2026-11-21T08:00:05.000000Z", "end": None, "start_ns": T0 + 5 * SEC, "end_ns": None,
        "peak_score": 4.0, "threshold": THR, "model_version": "v1", "fault_match": None,
    }
    assert alerts[1]["data"] == {
        **alerts[0]["data"], "state": "cleared", "end": "2026-11-21T08:00:12.000000Z",
        "end_ns": _end(END_W), "peak_score": 5.0,
    }

    assert len(sub.on("/score")) == len(SERIES)
    assert {m["topic"] for m in scores} == {f"pdm/v1/{SITE}/{MACHINE}/{SENSOR}/score"}
    assert {(m["qos"], m["retain"]) for m in scores} == {(0, False)}
    assert scores[7]["data"] == {"ts": "2026-11-21T08:00:07.000000Z", "ts_ns": T0 + 7 * SEC, "score": 3.5,
                                 "threshold": THR, "is_anomaly": True, "model_version": "v1"}
    assert [m["data"]["score"] for m in scores] == SERIES

    # status: once per change (status_interval_s is long), QoS 1
    assert len(sub.on("/status")) == len(_dedup(STATES))
    assert [m["data"]["state"] for m in statuses] == _dedup(STATES)
    assert {m["qos"] for m in statuses} == {1}
    last = statuses[-1]["data"]
    assert last["site"] == SITE and last["machine"] == MACHINE and last["stale"] is False
    assert last["model_version"] == "v1" and last["model_versions"] == ["v1"] and last["open_alerts"] == []
    assert last["last_score_ns"] == T0 + CLEAR_AT * SEC and last["last_score"] == "2026-11-21T08:00:16.000000Z"
    assert statuses[-2]["data"]["open_alerts"] == [aid]

    # retained: a subscriber that arrives later gets the current status (retain flag set) ...
    late = Collector(mosquitto.address, f"pdm/v1/{SITE}/{MACHINE}/status")
    got = late.wait_for(1)
    late.close()
    assert len(got) == 1 and got[0][2] is True and json.loads(got[0][1])["state"] == "normal"
    # ... but no alert (not retained)
    late = Collector(mosquitto.address, f"pdm/v1/{SITE}/{MACHINE}/alert")
    time.sleep(0.5)
    late.close()
    assert late.messages == []

    assert (st.alerts_raised, st.alerts_cleared, st.alerts_published) == (1, 1, 2)
    assert (st.scores_published, st.scores_skipped, st.scores_dropped) == (len(SERIES), 0, 0)
    assert st.status_published == len(_dedup(STATES)) and st.unacked == 0 and st.qos1_dropped == 0
    assert st.connected and st.connects == 1


def test_scores_disabled_per_site_and_globally(mosquitto):
    sub = Sub(mosquitto.address, "pdm/v1/#")
    cfg = _mqtt_cfg(mosquitto.address)
    with ResultPublisher(cfg, AlertsConfig(k=3, n=5, no_score_sites=["quiet"]), "edge1") as pub:
        assert pub.wait_connected(10)
        for i, v in enumerate(SERIES):
            pub.handle(_score(i, v, site="quiet"), _end(i))
            pub.handle(_score(i, LO, site="loud"), _end(i))
        assert pub.flush(10)
        sub.wait_on("/alert", 2)
        st = pub.stats()
    sub.wait_on("loud/pump-07/de-accel/score", len(SERIES))
    assert not [m for m in sub.on("/score") if "/quiet/" in m["topic"]]
    assert len(sub.on("loud/pump-07/de-accel/score")) == len(SERIES)
    assert [m["data"]["state"] for m in sub.on("/alert")] == ["raised", "cleared"]  # alerts still go out
    assert {m["data"]["site"] for m in sub.on("/alert")} == {"quiet"}
    assert sub.on("quiet/pump-07/status") and sub.on("loud/pump-07/status")  # and status
    assert (st.scores_published, st.scores_skipped) == (len(SERIES), len(SERIES))

    sub.messages.clear()
    with ResultPublisher(cfg, AlertsConfig(publish_scores=False), "edge2") as pub:
        assert pub.wait_connected(10)
        for i in range(5):
            pub.handle(_score(i, LO, site="loud"), _end(i))
        assert pub.flush(10)
        assert pub.stats().scores_skipped == 5
    sub.wait_on("/status", 1)
    time.sleep(0.2)
    sub.close()
    assert sub.on("/score") == []


def test_uncalibrated_scores_never_alert_and_status_says_so(mosquitto):
    sub = Sub(mosquitto.address, "pdm/v1/#")
    with ResultPublisher(_mqtt_cfg(mosquitto.address), AlertsConfig(k=1, n=1), "edge1", status_interval_s=3600) as pub:
        assert pub.wait_connected(10)
        for i in range(10):
            assert pub.handle(_score(i, 50.0, threshold=None, version=None), _end(i)) == []
        assert pub.flush(10)
        statuses = sub.wait_on("/status", 1)
        scores = sub.wait_on("/score", 10)
        # calibration arrives: model v2 with a threshold; the status follows
        pub.handle(_score(10, LO, version="v2"), _end(10))
        assert pub.flush(10)
        statuses = sub.wait_on("/status", 2)
    time.sleep(0.2)
    sub.close()
    assert sub.on("/alert") == []
    assert [m["data"]["state"] for m in statuses] == ["uncalibrated", "normal"]
    assert statuses[0]["data"]["model_version"] is None and statuses[0]["data"]["model_versions"] == []
    assert statuses[1]["data"]["model_version"] == "v2"
    assert scores[0]["data"]["threshold"] is None and scores[0]["data"]["is_anomaly"] is False
    assert scores[0]["data"]["model_version"] is None and scores[0]["data"]["score"] == 50.0


def test_status_goes_stale_without_new_scores_and_recovers(mosquitto):
    """The ticker republishes the status with ``stale: true`` once no score has arrived for
    ``stale_after_s`` (wall clock), without any further call; a new score makes it fresh again."""
    sub = Sub(mosquitto.address, f"pdm/v1/{SITE}/{MACHINE}/status")
    with ResultPublisher(_mqtt_cfg(mosquitto.address), AlertsConfig(stale_after_s=0.5), "edge1", status_interval_s=3600) as pub:
        assert pub.wait_connected(10)
        t = time.monotonic()
        pub.handle(_score(0, LO), _end(0))
        first = sub.wait_on("/status", 1)[0]["data"]
        assert first["stale"] is False and first["state"] == "normal"
        stale = sub.wait_on("/status", 2, timeout=5)[-1]["data"]
        assert time.monotonic() - t >= 0.5
        assert stale["stale"] is True and stale["state"] == "normal" and stale["sensors"][SENSOR]["stale"] is True
        assert stale["last_score_ns"] == T0
        time.sleep(0.6)
        assert len(sub.on("/status")) == 2  # published on the change only, not on every tick
        pub.handle(_score(1, LO), _end(1))
        fresh = sub.wait_on("/status", 3)[-1]["data"]
    sub.close()
    assert fresh["stale"] is False and fresh["last_score_ns"] == T0 + SEC


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_restart_between_raise_and_clear_still_delivers_the_clear(mosquitto, protocol):
    """Mosquitto is stopped (SIGTERM) after the raise; the clear is produced while it is down
    and must arrive once it is back.

    How the receiving side is made robust: conftest's ``Collector`` does reconnect by itself
    (paho's ``loop_start`` thread retries, and its ``on_connect`` subscribes again), but with a
    clean session, so a message that the publisher re-sends between the broker's return and the
    Collector's re-subscription would be lost to it: a race, not a property of the code under
    test. The subscriber here keeps a *persistent* session (fixed client id, clean start off),
    subscribed before the restart; Mosquitto (persistence on) keeps the session and queues the
    QoS 1 clear for it whichever of the two clients reconnects first. The retained status is
    checked with a fresh subscriber after the restart as well.
    """
    cfg = _mqtt_cfg(mosquitto.address, protocol)
    sink = Sub(mosquitto.address, f"pdm/v1/{SITE}/{MACHINE}/alert", protocol=protocol, client_id=f"alert-sink-{protocol}")
    pub = ResultPublisher(cfg, AlertsConfig(k=3, n=5), "edge1", status_interval_s=3600).start()
    try:
        assert pub.wait_connected(10)
        for i in range(CLEAR_AT):  # up to the last window before the clear
            pub.handle(_score(i, SERIES[i]), _end(i))
        assert [m["data"]["state"] for m in sink.wait_on("/alert", 1)] == ["raised"]
        assert pub.flush(10)

        mosquitto.stop(signal.SIGTERM)
        assert wait_until(lambda: not pub.stats().connected, 10)
        t = time.monotonic()
        cleared = pub.handle(_score(CLEAR_AT, SERIES[CLEAR_AT]), _end(CLEAR_AT))
        assert time.monotonic() - t < 0.5, "handle() must not wait for the broker"
        assert [a.state for a in cleared] == ["cleared"]
        st = pub.stats()
        assert st.unacked >= 2 and st.scores_dropped == 1  # the clear and the status wait; QoS 0 score dropped

        mosquitto.start()
        got = sink.wait_on("/alert", 2, timeout=20)
        assert pub.flush(10)
        st = pub.stats()
    finally:
        pub.stop()
        sink.close()
    assert [m["data"]["state"] for m in got] == ["raised", "cleared"]
    assert got[1]["data"]["id"] == got[0]["data"]["id"] == cleared[0].id
    assert got[1]["data"]["end_ns"] == _end(END_W) and got[1]["qos"] == 1
    assert st.unacked == 0 and st.disconnects >= 1 and st.connects >= 2
    late = Collector(mosquitto.address, f"pdm/v1/{SITE}/{MACHINE}/status")
    status = late.wait_for(1)
    late.close()
    assert status and status[-1][2] is True and json.loads(status[-1][1])["state"] == "normal"


def test_alert_carries_the_confirmed_fault_its_windows_look_like_most():
    """The raised alert names the best match of its first n windows; the cleared record the best
    match over the whole span; the MQTT payload says it in words."""
    early = FaultMatch("lbl-1", "bearing_outer_race", T0 - 86400 * SEC, 0.62)
    better = FaultMatch("lbl-2", "bearing_inner_race", T0 - 2 * 86400 * SEC, 0.9)
    tr = AlertTracker(k=3, n=5)
    out = []
    for i, v in enumerate(SERIES):
        m = early if i == 7 else better if i == 10 else None
        sc = dataclasses.replace(_score(i, v), fault_match=m)
        out += tr.update(sc, _end(i))
    raised, cleared = out
    assert raised.fault_match == early and cleared.fault_match == better
    payload = alert_payload(cleared)["fault_match"]
    assert payload["label_id"] == "lbl-2" and payload["similarity"] == 0.9 and payload["start_ns"] == better.start_ns
    assert payload["text"].startswith("looks like the bearing inner race fault confirmed on ")
    # a stream with no confirmed fault raises alerts without a match
    tr_plain = AlertTracker(3, 5)
    plain = [a for i, v in enumerate(SERIES) for a in tr_plain.update(_score(i, v), _end(i))]
    assert [a.fault_match for a in plain] == [None, None]
