"""Alerts, machine status and scores over MQTT (DESIGN.md section 2, issue 4).

Two layers:

- :class:`AlertTracker` (pure, no I/O, no clock of its own): one :class:`~pdm_edge.alerts.KOfN`
  debouncer per ``(site, machine, sensor)`` turns a series of
  :class:`~pdm_edge.types.Score` into :class:`~pdm_edge.types.Alert` records (raised / cleared)
  and keeps what is needed to state each machine's health.
- :class:`ResultPublisher`: its own paho client (``{appliance_id}-results``, built by
  :func:`pdm_edge.mqtt.make_client`) that publishes scores, alerts and retained machine status.

Topics and payloads (JSON, UTF-8; every time is given twice, ISO-8601 UTC with microseconds
``"2026-11-21T08:00:00.123456Z"`` and exact integer ns since the epoch as ``*_ns``):

=============================================== ===== ====== =========================================
topic                                           QoS   retain payload
=============================================== ===== ====== =========================================
``pdm/v1/{site}/{machine}/{sensor}/score``      0     no     ``{ts, ts_ns, score, threshold,
                                                             is_anomaly, model_version}``; ``ts`` is the
                                                             window start (the store's key too)
``pdm/v1/{site}/{machine}/alert``               1     no     ``{id, state, site, machine, sensor, start,
                                                             end, start_ns, end_ns, peak_score,
                                                             threshold, model_version, fault_match}``;
                                                             ``fault_match`` is ``null`` or ``{label_id,
                                                             fault_type, start, start_ns, similarity,
                                                             text}``: the confirmed fault the alert's
                                                             windows look like most
``pdm/v1/{site}/{machine}/status``              1     yes    see :meth:`AlertTracker.machine_status`
=============================================== ===== ====== =========================================

Decisions:

- **Alert ids** are ``uuid5(ALERT_ID_NAMESPACE, "{site}/{machine}/{sensor}/{start_ns}")``:
  stable (the raise and its clear share the id; replaying the same scores after a restart gives
  the same id, so a consumer or the store treats a re-sent alert as the same alert) and
  unambiguous (``/`` cannot occur in a name, whereas ``-`` can). A stream cannot raise two
  alerts with the same start.
- **Uncalibrated scores** (``threshold is None``) never raise or clear an alert and do not count
  towards the ``n`` windows: they are not fed to the debouncer at all. The machine reports
  ``"uncalibrated"`` instead of guessing.
- A score whose ``start_ns`` equals the previous one of its stream (a re-delivered window) is
  ignored by the debouncer and counted as a duplicate. A non-finite score counts as "not above"
  and is published as ``null``.
- An alert keeps the threshold and model version in force when it was **raised**; its
  ``"cleared"`` record repeats them (a model hot-swap in between does not rewrite history).
- **Machine state**, worst first: ``"alarm"`` (an alert of any sensor is open), ``"warning"`` (the
  latest window of some sensor is above its threshold, no alert yet), ``"uncalibrated"`` (the
  latest score of some sensor has no threshold: part of the machine is not monitored, so
  ``"normal"`` would be a guess), ``"normal"``. A machine never scored is ``"uncalibrated"`` and
  stale. ``"stale"`` is separate from the state: the newest score of the machine (any sensor)
  was *received* more than ``alerts.stale_after_s`` ago. "Received" is the appliance's own
  clock when :class:`ResultPublisher` feeds the tracker (so replayed recordings with their
  original timestamps, or a sensor with a skewed clock, are not stale while data flows); used
  alone, the tracker takes the window end unless ``received_ns`` is given.
- **Status publication**: on every change of the status' *signature* (state, stale, model
  versions, open alert ids, per-sensor states) at once; an unchanged status is re-published at
  most every ``status_interval_s`` (a heartbeat that refreshes the last score time). A
  background ticker re-evaluates every known machine so that "stale" is published even though
  no score arrives any more. Status is retained: a dashboard or SCADA that subscribes later
  gets the current health at once.
- **Delivery**: publishing never waits for the network. paho queues QoS 1 messages (alerts,
  status) in memory while the broker is unreachable and re-sends every unacknowledged one, in
  order, after it reconnects (clean session is enough for that: the outgoing queue is the
  client's own, see :mod:`pdm_edge.mqtt`). The queue is bounded (``max_queued`` messages);
  beyond it a message is dropped and counted, and the newest status wins anyway. Scores are
  QoS 0: while disconnected they are dropped and counted (the store keeps them durably).
  What is still unacknowledged when the process ends is lost from MQTT; the store (through its
  durable spool) is the record of alerts, and the retained status is re-published after a
  start with the first score of each machine.
- Alerts are not retained (a retained alert would re-fire in every new subscriber); integrations
  that must not miss one subscribe with QoS 1 and a persistent session, and the retained
  status names the open alerts for anyone who joins late.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt

from pdm_edge import mqtt as mqtt_util
from pdm_edge._util.time import iso_utc
from pdm_edge.alerts.debounce import KOfN
from pdm_edge.config import NAME_RE, AlertsConfig, MqttConfig
from pdm_edge.errors import ConfigError
from pdm_edge.types import Alert, FaultMatch, Score

log = logging.getLogger(__name__)

SCORE_TOPIC = "pdm/v1/{site}/{machine}/{sensor}/score"
ALERT_TOPIC = "pdm/v1/{site}/{machine}/alert"
STATUS_TOPIC = "pdm/v1/{site}/{machine}/status"

ALERT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pdm-edge:alert")
"""Namespace of :func:`alert_id`; fixed forever (changing it would change every alert id)."""

MACHINE_STATES: tuple[str, ...] = ("alarm", "warning", "uncalibrated", "normal")
"""Machine states, worst first."""

_NS = 1_000_000_000


# -- helpers ---------------------------------------------------------------------------------
def alert_id(site: str, machine: str, sensor: str, start_ns: int) -> str:
    """The stable id of the alert of stream ``site/machine/sensor`` whose span starts at
    ``start_ns`` (ns since the epoch, UTC): a UUID-5 string."""
    return str(uuid.uuid5(ALERT_ID_NAMESPACE, f"{site}/{machine}/{sensor}/{int(start_ns)}"))


def _num(x: float | None) -> float | None:
    """A float for JSON: ``None`` for missing or non-finite values (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _check_names(*names: str) -> None:
    for name in names:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a valid topic level name ([A-Za-z0-9_-]+)")


def score_topic(site: str, machine: str, sensor: str) -> str:
    """``pdm/v1/{site}/{machine}/{sensor}/score``."""
    return SCORE_TOPIC.format(site=site, machine=machine, sensor=sensor)


def alert_topic(site: str, machine: str) -> str:
    """``pdm/v1/{site}/{machine}/alert``."""
    return ALERT_TOPIC.format(site=site, machine=machine)


def status_topic(site: str, machine: str) -> str:
    """``pdm/v1/{site}/{machine}/status``."""
    return STATUS_TOPIC.format(site=site, machine=machine)


def score_payload(score: Score) -> dict[str, Any]:
    """The JSON object published for one score (see the module docstring)."""
    return {
        "ts": iso_utc(score.start_ns),
        "ts_ns": int(score.start_ns),
        "score": _num(score.score),
        "threshold": _num(score.threshold),
        "is_anomaly": bool(score.is_anomaly),
        "model_version": score.model_version,
    }


def alert_payload(alert: Alert) -> dict[str, Any]:
    """The JSON object published for one alert record (see the module docstring)."""
    return {
        "id": alert.id,
        "state": alert.state,
        "site": alert.site,
        "machine": alert.machine,
        "sensor": alert.sensor,
        "start": iso_utc(alert.start_ns),
        "end": iso_utc(alert.end_ns),
        "start_ns": int(alert.start_ns),
        "end_ns": None if alert.end_ns is None else int(alert.end_ns),
        "peak_score": _num(alert.peak_score),
        "threshold": _num(alert.threshold),
        "model_version": alert.model_version,
        "fault_match": None if alert.fault_match is None else {
            "label_id": alert.fault_match.label_id, "fault_type": alert.fault_match.fault_type,
            "start": iso_utc(alert.fault_match.start_ns), "start_ns": int(alert.fault_match.start_ns),
            "similarity": _num(alert.fault_match.similarity), "text": alert.fault_match.describe()},
    }


# -- the pure tracker ------------------------------------------------------------------------
@dataclasses.dataclass
class _Stream:
    debouncer: KOfN
    last_start_ns: int | None = None
    last_end_ns: int | None = None
    last_received_ns: int | None = None
    last_score: float | None = None
    last_threshold: float | None = None
    last_model_version: str | None = None
    open_alert: Alert | None = None
    recent_matches: collections.deque[FaultMatch | None] = dataclasses.field(default_factory=collections.deque)
    span_match: FaultMatch | None = None  # the best fault match of the open alert's windows


def _best(*matches: FaultMatch | None) -> FaultMatch | None:
    """The match with the highest similarity, or None."""
    return max((m for m in matches if m is not None), key=lambda m: m.similarity, default=None)


class AlertTracker:
    """k-of-n alert state of every stream, and the health of every machine. No I/O.

    Args:
        k, n: raise when ``k`` of the last ``n`` calibrated windows of a stream are above the
            threshold; clear when none of the last ``n`` is (:class:`KOfN`).
        stale_after_s: seconds (> 0) after which a machine whose newest score was received
            that long ago is reported stale.

    Raises:
        ConfigError: ``alerts.k`` outside ``1..n`` or a non-positive ``stale_after_s``.

    Not thread-safe: one caller at a time (:class:`ResultPublisher` holds a lock around it).
    """

    def __init__(self, k: int = 3, n: int = 5, stale_after_s: float = 60.0) -> None:
        if not 1 <= k <= n:
            raise ConfigError("alerts.k", f"need 1 <= k <= n, got k={k} n={n}")
        if not stale_after_s > 0:
            raise ConfigError("alerts.stale_after_s", f"must be > 0, got {stale_after_s}")
        self.k, self.n = int(k), int(n)
        self.stale_after_ns = round(stale_after_s * _NS)
        self._streams: dict[tuple[str, str, str], _Stream] = {}
        self._machines: dict[tuple[str, str], list[str]] = {}
        self.duplicates = 0
        """Scores ignored because their window start repeated the previous one of the stream."""

    @classmethod
    def from_config(cls, cfg: AlertsConfig) -> AlertTracker:
        """A tracker with ``k``, ``n`` and ``stale_after_s`` from ``[alerts]``."""
        return cls(cfg.k, cfg.n, cfg.stale_after_s)

    def machines(self) -> list[tuple[str, str]]:
        """Every ``(site, machine)`` seen so far, in order of first appearance."""
        return list(self._machines)

    def open_alerts(self) -> list[Alert]:
        """The alerts currently open (state ``"raised"``), of every stream."""
        return [s.open_alert for s in self._streams.values() if s.open_alert is not None]

    def update(self, score: Score, window_end_ns: int, received_ns: int | None = None) -> list[Alert]:
        """Feed one window's score; return the alert records it causes (usually none).

        Args:
            score: the window's score (its ``start_ns`` is the window start, ns UTC).
            window_end_ns: the window's end (ns UTC), ``> score.start_ns``.
            received_ns: when the score was produced, on the clock later given to
                :meth:`machine_status` as ``now_ns`` (ns); ``window_end_ns`` when omitted.

        Returns:
            ``[]``, or one :class:`~pdm_edge.types.Alert` with state ``"raised"`` (``end_ns``
            ``None``, peak so far) or ``"cleared"`` (``end_ns`` = end of the last window above
            the threshold, final peak). Both carry the same :func:`alert_id`.

        Raises:
            ValueError: ``window_end_ns <= score.start_ns``.
        """
        if window_end_ns <= score.start_ns:
            raise ValueError(f"window_end_ns ({window_end_ns}) must be after the score's start_ns ({score.start_ns})")
        key = (score.site, score.machine, score.sensor)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream(KOfN(self.k, self.n), recent_matches=collections.deque(maxlen=self.n))
            self._machines.setdefault((score.site, score.machine), []).append(score.sensor)
        if st.last_start_ns == score.start_ns:
            self.duplicates += 1
            return []
        st.last_start_ns = score.start_ns
        st.last_end_ns = window_end_ns
        st.last_received_ns = window_end_ns if received_ns is None else int(received_ns)
        st.last_score = score.score
        st.last_threshold = score.threshold
        st.last_model_version = score.model_version
        if score.threshold is None:
            return []
        value = score.score if math.isfinite(score.score) else float("-inf")
        event = st.debouncer.update(value, score.threshold, score.start_ns, window_end_ns)
        st.recent_matches.append(score.fault_match)
        if st.open_alert is not None:
            st.span_match = _best(st.span_match, score.fault_match)
        if event is None:
            return []
        if event.state == "raised":
            st.span_match = _best(*st.recent_matches)
            alert = Alert(
                id=alert_id(score.site, score.machine, score.sensor, event.start_ns),
                site=score.site, machine=score.machine, sensor=score.sensor,
                state="raised", start_ns=event.start_ns, end_ns=None, peak_score=event.peak_score,
                threshold=float(score.threshold), model_version=score.model_version or "unknown",
                fault_match=st.span_match,
            )
            st.open_alert = alert
            return [alert]
        raised = st.open_alert
        assert raised is not None  # KOfN clears only what it raised
        st.open_alert, match, st.span_match = None, st.span_match, None
        return [dataclasses.replace(raised, state="cleared", end_ns=event.end_ns, peak_score=event.peak_score,
                                    fault_match=match)]

    def machine_status(self, site: str, machine: str, now_ns: int) -> dict[str, Any]:
        """The health of one machine at ``now_ns`` (ns UTC), as published on ``.../status``.

        Returns:
            ``{site, machine, state, stale, model_version, model_versions, last_score,
            last_score_ns, open_alerts, sensors, ts, ts_ns}`` where ``state`` is one of
            :data:`MACHINE_STATES` (see the module docstring); ``stale`` is a bool;
            ``model_version`` is the version of the newest score (``None`` if none);
            ``model_versions`` the sorted distinct versions of every sensor's latest score;
            ``last_score``/``last_score_ns`` the start of the newest scored window (ISO / ns,
            ``None`` if never scored); ``open_alerts`` the ids of open alerts; ``sensors`` maps
            each sensor to ``{state, stale, score, threshold, model_version, last_score_ns}``;
            ``ts``/``ts_ns`` is ``now_ns``.
        """
        sensors: dict[str, dict[str, Any]] = {}
        newest: _Stream | None = None
        versions: set[str] = set()
        open_ids: list[str] = []
        for sensor in self._machines.get((site, machine), []):
            st = self._streams[(site, machine, sensor)]
            if st.open_alert is not None:
                state = "alarm"
                open_ids.append(st.open_alert.id)
            elif st.last_threshold is None:
                state = "uncalibrated"
            elif st.last_score is not None and st.last_score > st.last_threshold:
                state = "warning"
            else:
                state = "normal"
            if st.last_model_version is not None:
                versions.add(st.last_model_version)
            assert st.last_received_ns is not None
            if newest is None or st.last_received_ns > (newest.last_received_ns or 0):
                newest = st
            sensors[sensor] = {
                "state": state,
                "stale": now_ns - st.last_received_ns > self.stale_after_ns,
                "score": _num(st.last_score),
                "threshold": _num(st.last_threshold),
                "model_version": st.last_model_version,
                "last_score_ns": st.last_start_ns,
            }
        states = [s["state"] for s in sensors.values()]
        state = next((s for s in MACHINE_STATES if s in states), "uncalibrated")
        return {
            "site": site,
            "machine": machine,
            "state": state,
            "stale": newest is None or now_ns - (newest.last_received_ns or 0) > self.stale_after_ns,
            "model_version": None if newest is None else newest.last_model_version,
            "model_versions": sorted(versions),
            "last_score": None if newest is None else iso_utc(newest.last_start_ns),
            "last_score_ns": None if newest is None else newest.last_start_ns,
            "open_alerts": sorted(open_ids),
            "sensors": sensors,
            "ts": iso_utc(now_ns),
            "ts_ns": int(now_ns),
        }


def status_signature(status: Mapping[str, Any]) -> tuple:
    """What makes two statuses "the same" for publication: everything but the times and the
    latest score values (state, stale, model versions, open alerts, per-sensor state/stale)."""
    return (
        status["state"],
        status["stale"],
        status["model_version"],
        tuple(status["model_versions"]),
        tuple(status["open_alerts"]),
        tuple(sorted((k, v["state"], v["stale"], v["model_version"]) for k, v in status["sensors"].items())),
    )


# -- the publisher ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PublisherStats:
    """A snapshot of :class:`ResultPublisher`'s counters since it was created."""

    scores_published: int
    """Scores handed to the network (QoS 0)."""
    scores_skipped: int
    """Scores not published by configuration (``publish_scores = false`` or ``no_score_sites``)."""
    scores_dropped: int
    """Scores not sent because the broker was unreachable (QoS 0 is not queued)."""
    alerts_raised: int
    alerts_cleared: int
    alerts_published: int
    """Alert records queued for the broker (QoS 1; see ``unacked``)."""
    status_published: int
    qos1_dropped: int
    """QoS 1 messages (alerts, status) refused because the outgoing queue was full."""
    unacked: int
    """QoS 1 messages not yet acknowledged by the broker (queued while it is away)."""
    duplicates: int
    """Scores ignored by the tracker as re-delivered windows."""
    connected: bool
    connects: int
    disconnects: int


class ResultPublisher:
    """Publishes scores, alerts and machine status of the appliance over MQTT.

    Usage::

        pub = ResultPublisher(config.mqtt, config.alerts, config.appliance_id).start()
        alerts = pub.handle(score, window.end_ns)   # from the scoring worker
        pub.stop()                                  # waits (bounded) for QoS 1 acknowledgements

    Args:
        mqtt_cfg: the ``[mqtt]`` configuration.
        alerts_cfg: the ``[alerts]`` configuration (k, n, stale_after_s, score publishing).
        appliance_id: names the client id, ``"{appliance_id}-results"``.
        tracker: the :class:`AlertTracker` to use; one from ``alerts_cfg`` when None.
        status_interval_s: an unchanged status is re-published at most this often (s).
        max_queued: bound of paho's queue of unacknowledged QoS 1 messages.
        clock: wall clock in ns since the epoch (for "received" and "stale"); injectable.
        client_id: overrides the client id.

    Raises:
        ConfigError: invalid ``alerts`` settings (see :class:`AlertTracker`).
        BrokerError: the TLS CA file cannot be loaded.

    Every public method is thread-safe and returns without waiting for the network (the
    broker may be down); :meth:`flush` and :meth:`stop` are the only ones that wait.
    """

    def __init__(
        self,
        mqtt_cfg: MqttConfig,
        alerts_cfg: AlertsConfig,
        appliance_id: str,
        *,
        tracker: AlertTracker | None = None,
        status_interval_s: float = 60.0,
        max_queued: int = 10_000,
        clock: Callable[[], int] = time.time_ns,
        client_id: str | None = None,
    ) -> None:
        if not status_interval_s > 0:
            raise ValueError(f"status_interval_s must be > 0, got {status_interval_s}")
        self.mqtt_cfg = mqtt_cfg
        self.cfg = alerts_cfg
        self.tracker = tracker if tracker is not None else AlertTracker.from_config(alerts_cfg)
        self.status_interval_ns = round(status_interval_s * _NS)
        self.client_id = client_id or f"{appliance_id}-results"
        self._clock = clock
        self._no_score_sites = frozenset(alerts_cfg.no_score_sites)
        # Lock order: _lock may be held while calling into paho (statuses leave in order);
        # the paho callbacks (network thread) take only the AckTracker's lock and _conn_lock, which
        # are never held while calling into paho, so the network thread never waits for _lock.
        self._lock = threading.RLock()  # tracker, status bookkeeping and counters
        self.acks = mqtt_util.AckTracker()
        self._conn_lock = threading.Lock()
        self._connects = 0
        self._disconnects = 0
        self._last_status: dict[tuple[str, str], tuple[tuple, int]] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._started = False
        self.client = mqtt_util.make_client(mqtt_cfg, self.client_id, persistent=False)
        self.client.max_queued_messages_set(max_queued)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ResultPublisher:
        """Begin connecting (in the background, with retries) and start the status ticker.

        Messages published before the connection is up are queued (QoS 1) or dropped (QoS 0).
        """
        if self._started:
            raise RuntimeError("ResultPublisher already started")
        self._started = True
        mqtt_util.connect(self.client, self.mqtt_cfg, persistent=False)
        tick_s = min(max(min(self.cfg.stale_after_s, self.status_interval_ns / _NS) / 4, 0.05), 5.0)
        self._ticker = threading.Thread(target=self._tick_loop, args=(tick_s,), name="results-status", daemon=True)
        self._ticker.start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected to the broker; ``False`` on timeout."""
        return self._connected.wait(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every QoS 1 message published so far is acknowledged (s); ``False`` on
        timeout (e.g. the broker is still away)."""
        return self.acks.flush(timeout)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the ticker, wait up to ``timeout`` s for unacknowledged QoS 1 messages, then
        disconnect. Returns whether everything was acknowledged (what was not is lost and
        logged). With the broker away it can take up to about ``timeout`` plus one reconnect
        delay (paho's network thread finishes its back-off wait)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(5.0)
            self._ticker = None
        ok = self.flush(timeout) if self._started else True
        if not ok:
            log.warning("%d alert/status message(s) not acknowledged by %s before stopping", self.stats().unacked, self.mqtt_cfg.broker)
        if self._started:
            self.client.disconnect()
            self.client.loop_stop()
            self._started = False
        return ok

    def __enter__(self) -> ResultPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- publishing ------------------------------------------------------------------------
    def publish_score(self, score: Score) -> bool:
        """Publish one score (QoS 0, not retained) on ``pdm/v1/{site}/{machine}/{sensor}/score``.

        Returns ``True`` when it was handed to the network, ``False`` when it was skipped by
        configuration or dropped because the broker is unreachable (both counted).

        Raises:
            ValueError: a site, machine or sensor name outside ``[A-Za-z0-9_-]+``.
        """
        _check_names(score.site, score.machine, score.sensor)
        if not self.cfg.publish_scores or score.site in self._no_score_sites:
            self._count("scores_skipped")
            return False
        info = self.client.publish(score_topic(score.site, score.machine, score.sensor), _dumps(score_payload(score)), qos=0)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._count("scores_published")
            return True
        self._count("scores_dropped")
        return False

    def publish_alert(self, alert: Alert) -> bool:
        """Publish one alert record (QoS 1, not retained) on ``pdm/v1/{site}/{machine}/alert``.

        Returns ``False`` only when paho's outgoing queue is full (the record is dropped and
        counted); otherwise it is delivered once the broker is reachable.

        Raises:
            ValueError: a name outside ``[A-Za-z0-9_-]+``.
        """
        _check_names(alert.site, alert.machine, alert.sensor)
        ok = self._publish_qos1(alert_topic(alert.site, alert.machine), _dumps(alert_payload(alert)), retain=False)
        if ok:
            self._count("alerts_published")
        return ok

    def publish_status(self, site: str, machine: str, status: Mapping[str, Any]) -> bool:
        """Publish a machine status (QoS 1, retained) on ``pdm/v1/{site}/{machine}/status``.

        Returns ``False`` only when the outgoing queue is full (dropped, counted).

        Raises:
            ValueError: a name outside ``[A-Za-z0-9_-]+``; TypeError/ValueError when
                ``status`` is not JSON-serialisable (NaN included).
        """
        _check_names(site, machine)
        ok = self._publish_qos1(status_topic(site, machine), _dumps(dict(status)), retain=True)
        if ok:
            self._count("status_published")
        return ok

    def handle(self, score: Score, window_end_ns: int) -> list[Alert]:
        """Run the tracker on one score, then publish the score, any alert records and, when
        it changed or is due (``status_interval_s``), the machine's status.

        Args:
            score: the window's score.
            window_end_ns: the window's end (ns UTC).

        Returns:
            The alert records raised or cleared by this score (for the store).

        Raises:
            ValueError: bad names, or ``window_end_ns <= score.start_ns``.
        """
        _check_names(score.site, score.machine, score.sensor)
        now = self._clock()
        with self._lock:
            alerts = self.tracker.update(score, window_end_ns, received_ns=now)
            for a in alerts:
                self._counts["alerts_raised" if a.state == "raised" else "alerts_cleared"] += 1
        self.publish_score(score)
        for a in alerts:
            log.warning("alert %s %s on %s/%s/%s (peak %.3g, threshold %.3g)%s", a.id, a.state, a.site, a.machine, a.sensor,
                        a.peak_score, a.threshold, f"; {a.fault_match.describe()}" if a.fault_match else "")
            self.publish_alert(a)
        self._maybe_publish_status(score.site, score.machine, now, heartbeat=True)
        return alerts

    def handle_many(self, scored: list[tuple[Score, int]]) -> list[tuple[int, Alert]]:
        """:meth:`handle` for a batch: ``(score, window end ns)`` pairs (each stream in time
        order), the tracker updated under one lock, every score and alert published, and each
        machine's status considered once. Returns ``(index into scored, alert)`` of every alert
        record raised or cleared.

        Raises:
            ValueError: bad names, or a window end not after its start (nothing of the batch
                was fed to the tracker).
        """
        for sc, end_ns in scored:
            _check_names(sc.site, sc.machine, sc.sensor)
            if end_ns <= sc.start_ns:
                raise ValueError(f"window_end_ns ({end_ns}) must be after the score's start_ns ({sc.start_ns})")
        now = self._clock()
        out: list[tuple[int, Alert]] = []
        with self._lock:
            for i, (sc, end_ns) in enumerate(scored):
                for a in self.tracker.update(sc, end_ns, received_ns=now):
                    self._counts["alerts_raised" if a.state == "raised" else "alerts_cleared"] += 1
                    out.append((i, a))
        for sc, _ in scored:
            self.publish_score(sc)
        for _, a in out:
            log.warning("alert %s %s on %s/%s/%s (peak %.3g, threshold %.3g)", a.id, a.state, a.site, a.machine, a.sensor, a.peak_score, a.threshold)
            self.publish_alert(a)
        for site, machine in dict.fromkeys((sc.site, sc.machine) for sc, _ in scored):
            self._maybe_publish_status(site, machine, now, heartbeat=True)
        return out

    def refresh_status(self, now_ns: int | None = None) -> int:
        """Re-evaluate every known machine at ``now_ns`` (the clock when None) and publish the
        statuses whose signature changed (a machine became stale, say). Returns how many were
        published. The background ticker calls this; callers rarely need to."""
        now = self._clock() if now_ns is None else now_ns
        with self._lock:
            machines = self.tracker.machines()
        return sum(self._maybe_publish_status(site, machine, now, heartbeat=False) for site, machine in machines)

    def _maybe_publish_status(self, site: str, machine: str, now: int, *, heartbeat: bool) -> bool:
        with self._lock:
            status = self.tracker.machine_status(site, machine, now)
            sig = status_signature(status)
            last = self._last_status.get((site, machine))
            due = last is None or last[0] != sig or (heartbeat and now - last[1] >= self.status_interval_ns)
            if not due:
                return False
            self._last_status[(site, machine)] = (sig, now)
            # publish under the lock so that two threads cannot send statuses out of order;
            # paho's publish only queues, it does not wait for the network
            return self.publish_status(site, machine, status)

    def _publish_qos1(self, topic: str, payload: bytes, *, retain: bool) -> bool:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._count("qos1_dropped")
            log.warning("outgoing MQTT queue full: %s dropped", topic)
            return False
        # MQTT_ERR_NO_CONN: paho keeps a QoS 1 message and sends it after the reconnect
        self.acks.sent(info.mid)
        return True

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # -- background ------------------------------------------------------------------------
    def _tick_loop(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            try:
                self.refresh_status()
            except Exception:  # never let the ticker die silently
                log.exception("status refresh failed")

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the results connection: %s", self.mqtt_cfg.broker, reason_code)
            return
        self._connected.set()
        with self._conn_lock:
            self._connects += 1
        log.info("results publisher connected to %s", self.mqtt_cfg.broker)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        with self._conn_lock:
            self._disconnects += 1
        if not self._stop.is_set():
            log.warning("results publisher disconnected from %s (%s); QoS 1 messages are kept and re-sent", self.mqtt_cfg.broker, reason_code)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.acks.acked(mid)

    # -- observation -----------------------------------------------------------------------
    def stats(self) -> PublisherStats:
        """A snapshot of the counters."""
        unacked = self.acks.unacked
        with self._conn_lock:
            connects, disconnects = self._connects, self._disconnects
        with self._lock:
            c = self._counts
            return PublisherStats(
                scores_published=c["scores_published"],
                scores_skipped=c["scores_skipped"],
                scores_dropped=c["scores_dropped"],
                alerts_raised=c["alerts_raised"],
                alerts_cleared=c["alerts_cleared"],
                alerts_published=c["alerts_published"],
                status_published=c["status_published"],
                qos1_dropped=c["qos1_dropped"],
                unacked=unacked,
                duplicates=self.tracker.duplicates,
                connected=self._connected.is_set(),
                connects=connects,
                disconnects=disconnects,
            )
