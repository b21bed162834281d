"""Labels over MQTT: ``pdm/v1/{site}/{machine}/label/{user}`` (QoS 1), decoded, validated, handed on.

Payload (JSON object, UTF-8, at most 64 KiB), the same fields the dashboard writes
(:func:`~pdm_edge.feedback.labels.label_payload` produces exactly this shape)::

    {"start": "2026-11-21T08:00:00Z",      # or "start_ns": 1795248000000000000 (or both, agreeing)
     "end": "2026-11-21T08:05:00+00:00",   # or "end_ns": ...
     "kind": "normal" | "fault" | "ignore",
     "fault_type": "bearing_outer_race",   # optional, only with kind "fault"
     "sensor": "de-accel",                 # optional: one sensor (default: the whole machine)
     "alert_id": "5b0c...",                # optional: the alert it answers
     "author": "j.doe",                    # required
     "note": "bearing replaced on 2026-11-20",   # optional
     "created": "..." | "created_ns": ...,        # optional: when it was given (default: now)
     "site": "plant1", "machine": "pump-07",      # optional: must agree with the topic
     "id": "..."}                                  # optional: must be the id derived from the content

Decisions:

- **The author is the authenticated identity** (issue 15 row 16): a label is published on
  ``pdm/v1/{site}/{machine}/label/{user}`` where ``{user}`` is the publisher's MQTT user name,
  and the broker's ACL (``deploy/mosquitto.acl``: ``topic write pdm/v1/+/+/label/<name>`` per
  technician; integrations may not write labels) lets each user publish only under its own
  name, so the last topic level is an identity the broker checked. It becomes the label's
  ``author``; a payload ``author`` that differs is refused (field ``author``). With
  ``require_identity`` (the appliance: ``[feedback] mqtt_label_identity = true``, the default)
  the old topic without a user level is refused (field ``topic``); without it (library use,
  tests) it is accepted with the payload's author as before.
- Site and machine come from the topic; a payload that names others is refused (a label must
  not be filed under a machine it does not talk about). ISO times need a UTC offset and have
  microsecond resolution; when both ``start`` and ``start_ns`` are given they must agree to the
  microsecond and ``start_ns`` is used. ``null`` is the same as an absent field. Unknown fields
  are refused (a typo such as ``"knd"`` must not pass silently).
- **One path**: the listener decodes the payload into the keyword arguments of
  :func:`~pdm_edge.feedback.labels.submit_label` and calls ``on_label(**fields)``, normally
  :meth:`pdm_edge.feedback.Feedback.submit` or ``functools.partial(submit_label, book)``; all
  validation of the values happens there, so MQTT, the CLI and the dashboard accept exactly the
  same labels.
- **In the callback, before the acknowledgement**: labels are rare (human-paced) and storing one
  is a single SQLite insert, so ``on_label`` runs in paho's network thread and the QoS 1 PUBACK
  goes out only after it returned: a label the broker considers delivered is in the book. With
  the persistent session (fixed client id ``{appliance_id}-labels``, clean start off) labels
  published while the appliance is down are delivered when it is back; a redelivery is the same
  label (idempotent), counted as a duplicate.
- **Dead letters**: an invalid label is published to ``pdm/v1/_deadletter/bad_label`` with the
  ingestion stage's dead-letter payload (topic, reason, detail naming the field, bytes,
  head_b64, received_ns) and counted per reason and per field; a valid label that could not be
  stored (the book's disk failed) or a bug goes to ``pdm/v1/_deadletter/internal_error`` with
  the error, logged. The listener keeps running either way.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt

from pdm_edge import mqtt as mqtt_util
from pdm_edge.config import NAME_RE, MqttConfig
from pdm_edge.errors import LabelError, PayloadError
from pdm_edge.feedback.labels import parse_time
from pdm_edge.ingest.chunk import DEADLETTER_TOPIC, deadletter_payload
from pdm_edge.supervision import RateLimitedLog
from pdm_edge.types import Label

log = logging.getLogger(__name__)

LABEL_TOPIC = "pdm/v1/{site}/{machine}/label"
LABEL_TOPIC_FILTER = "pdm/v1/+/+/label"
LABEL_USER_TOPIC = "pdm/v1/{site}/{machine}/label/{user}"
LABEL_USER_TOPIC_FILTER = "pdm/v1/+/+/label/+"
BAD_LABEL = "bad_label"
"""Dead-letter reason of an invalid label (``pdm/v1/_deadletter/bad_label``)."""
INTERNAL_ERROR = "internal_error"
"""Dead-letter reason of a label that could not be handled (storage failure, bug)."""
MAX_LABEL_PAYLOAD_BYTES = 64 * 1024

PAYLOAD_FIELDS = frozenset({"id", "site", "machine", "sensor", "alert_id", "start", "end", "start_ns", "end_ns", "kind",
                            "fault_type", "author", "note", "created", "created_ns"})
"""Every field a label payload may carry."""

OnLabel = Callable[..., tuple[Label, bool]]


def label_topic(site: str, machine: str, user: str | None = None) -> str:
    """``pdm/v1/{site}/{machine}/label/{user}`` (``pdm/v1/{site}/{machine}/label`` without a user)."""
    if user is None:
        return LABEL_TOPIC.format(site=site, machine=machine)
    return LABEL_USER_TOPIC.format(site=site, machine=machine, user=user)


_USER_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,128}$")
"""An MQTT user name in a label topic (the dashboard's user-name rule)."""


def parse_label_topic(topic: str) -> tuple[str, str]:
    """``(site, machine)`` of a label topic (with or without the user level).

    Raises:
        LabelError: field ``topic``, when it is not ``pdm/v1/{site}/{machine}/label[/{user}]``
            with names ``[A-Za-z0-9_-]+``.
    """
    return _parse_label_topic(topic)[:2]


def _parse_label_topic(topic: str) -> tuple[str, str, str | None]:
    parts = topic.split("/")
    if len(parts) not in (5, 6) or parts[:2] != ["pdm", "v1"] or parts[4] != "label":
        raise LabelError("topic", f"unexpected topic {topic[:200]!r}")
    for name in parts[2:4]:
        if not NAME_RE.match(name):
            raise LabelError("topic", f"topic level {name[:64]!r} is not [A-Za-z0-9_-]+")
    user = parts[5] if len(parts) == 6 else None
    if user is not None and not _USER_RE.match(user):
        raise LabelError("topic", f"user level {user[:64]!r} is not a user name")
    return parts[2], parts[3], user


def _time_pair(obj: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    iso, ns = obj.get(name), obj.get(f"{name}_ns")
    if ns is not None and (isinstance(ns, bool) or not isinstance(ns, int)):
        raise LabelError(f"{name}_ns", f"must be an integer of ns since the epoch, got {type(ns).__name__}")
    if iso is not None and not isinstance(iso, str):
        raise LabelError(name, f"must be an ISO-8601 string with a UTC offset, got {type(iso).__name__} (use {name}_ns for epoch ns)")
    if iso is None and ns is None:
        if required:
            raise LabelError(name, f"is required ({name} as ISO-8601 with a UTC offset, or {name}_ns as epoch ns)")
        return None
    ns_val = parse_time(ns, f"{name}_ns") if ns is not None else None
    iso_val = parse_time(iso, name) if iso is not None else None
    if ns_val is not None and iso_val is not None and not iso_val <= ns_val < iso_val + 1000:
        raise LabelError(name, f"{iso[:64]!r} and {name}_ns {ns_val} disagree")
    return ns_val if ns_val is not None else iso_val


def decode_label_payload(topic: str, payload: bytes, *, max_bytes: int = MAX_LABEL_PAYLOAD_BYTES,
                         require_identity: bool = False) -> dict[str, Any]:
    """Decode a label message into the keyword arguments of
    :func:`~pdm_edge.feedback.labels.submit_label` (values not yet validated, times as ns).
    On ``.../label/{user}`` the author is ``{user}`` (see the module docstring).

    Raises:
        LabelError: bad topic (or, with ``require_identity``, a topic without the user level),
            payload too large, not UTF-8, not a JSON object, an unknown field, a malformed or
            missing time, a site/machine that disagrees with the topic, or an author that is not
            the topic's user.
    """
    site, machine, user = _parse_label_topic(topic)
    if user is None and require_identity:
        raise LabelError("topic", f"labels are published on {LABEL_USER_TOPIC} with your MQTT user name as the last "
                         f"level (the label's author); got {topic[:200]!r}")
    if len(payload) > max_bytes:
        raise LabelError("payload", f"{len(payload)} bytes, more than {max_bytes}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LabelError("payload", f"not UTF-8 (byte {exc.start})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LabelError("payload", f"not JSON: {str(exc)[:160]}") from None
    if not isinstance(obj, dict):
        raise LabelError("payload", f"is a JSON {type(obj).__name__}, not an object")
    unknown = sorted(set(obj) - PAYLOAD_FIELDS)
    if unknown:
        raise LabelError(unknown[0], f"unknown field (known: {', '.join(sorted(PAYLOAD_FIELDS))})")
    for key, from_topic in (("site", site), ("machine", machine)):
        if obj.get(key) is not None and obj[key] != from_topic:
            raise LabelError(key, f"the payload says {str(obj[key])[:64]!r} but the topic says {from_topic!r}")
    fields: dict[str, Any] = {
        "site": site,
        "machine": machine,
        "start_ns": _time_pair(obj, "start", required=True),
        "end_ns": _time_pair(obj, "end", required=True),
        "kind": obj.get("kind"),
        "author": obj.get("author") if user is None else user,
        "fault_type": obj.get("fault_type"),
        "sensor": obj.get("sensor"),
        "alert_id": obj.get("alert_id"),
        "note": obj.get("note"),
        "created_ns": _time_pair(obj, "created", required=False),
    }
    if user is not None and obj.get("author") not in (None, user):
        raise LabelError("author", f"the payload says {str(obj['author'])[:64]!r} but the label was published by user "
                         f"{user!r} (the author is the authenticated publisher)")
    if obj.get("id") is not None:
        fields["expected_id"] = obj["id"]
    return fields


@dataclasses.dataclass(frozen=True)
class ListenerStats:
    """Counters of a :class:`LabelListener` since it started.

    Attributes:
        received: messages on the label topics.
        created: labels that were new.
        duplicates: labels that were already in the book (repeats, redeliveries).
        deadletters: dead-lettered messages per reason (``bad_label``, ``internal_error``).
        rejected_fields: invalid labels per offending field (``kind``, ``start``, ``payload``...).
        connected: whether the client is connected now.
        connects: successful connections (1 + reconnects).
    """

    received: int
    created: int
    duplicates: int
    deadletters: Mapping[str, int]
    rejected_fields: Mapping[str, int]
    connected: bool
    connects: int
    not_owned: int = 0
    """Valid labels left to another cluster instance (``accept`` said no)."""

    @property
    def deadlettered(self) -> int:
        return sum(self.deadletters.values())


class LabelListener:
    """Subscribes ``pdm/v1/+/+/label`` and hands every valid label to ``on_label``.

    Usage::

        feedback = Feedback(book, buffer, recent, spool=spool)
        with LabelListener(cfg.mqtt, cfg.appliance_id, feedback.submit) as listener:
            listener.wait_ready(10)
            ...

    Args:
        mqtt_cfg: the ``[mqtt]`` configuration.
        appliance_id: names the persistent session (client id ``{appliance_id}-labels``).
        on_label: called with the keyword arguments of
            :func:`~pdm_edge.feedback.labels.submit_label` (without ``book``); returns
            ``(label, created)`` and raises :class:`~pdm_edge.errors.LabelError` for an
            invalid label. Runs in the MQTT network thread: it must be quick.
        deadletter: publish rejected messages (they are counted either way).
        require_identity: refuse labels on the topic without the user level (see the module
            docstring); the appliance sets it from ``[feedback] mqtt_label_identity``.
        max_payload_bytes: larger messages are refused.
        client_id: overrides the client id (tests).
        accept: ``(site, machine, sensor or None) -> bool``; a valid label it refuses is
            acknowledged and left alone (counted ``not_owned``): in a cluster
            (:mod:`pdm_edge.runtime.cluster`) another instance owns that machine's streams.
    """

    def __init__(self, mqtt_cfg: MqttConfig, appliance_id: str, on_label: OnLabel, *, deadletter: bool = True,
                 max_payload_bytes: int = MAX_LABEL_PAYLOAD_BYTES, client_id: str | None = None,
                 require_identity: bool = False, accept: Callable[[str, str, str | None], bool] | None = None) -> None:
        self.mqtt_cfg = mqtt_cfg
        self.accept = accept
        self._not_owned = 0
        self.client_id = client_id or f"{appliance_id}-labels"
        self.on_label = on_label
        self.deadletter = deadletter
        self.max_payload_bytes = max_payload_bytes
        self.require_identity = require_identity
        self._log_limited = RateLimitedLog(log, 60.0)  # one line per reason a minute, not one per message
        self._lock = threading.Lock()
        self._received = 0
        self._created = 0
        self._duplicates = 0
        self._deadletters: collections.Counter[str] = collections.Counter()
        self._fields: collections.Counter[str] = collections.Counter()
        self._connects = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._client: mqtt.Client | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> LabelListener:
        """Begin connecting (in the background, with paho's retries); returns self."""
        if self._client is not None:
            raise RuntimeError("LabelListener already started")
        client = mqtt_util.make_client(self.mqtt_cfg, self.client_id, persistent=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        mqtt_util.connect(client, self.mqtt_cfg, persistent=True)
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until connected and subscribed; ``False`` on timeout."""
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        """Disconnect (the persistent session keeps queuing labels for the next start)."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._connected.clear()
        self._subscribed.clear()

    def __enter__(self) -> LabelListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paho callbacks (network thread) ---------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the label listener's connection: %s", self.mqtt_cfg.broker, reason_code)
            return
        with self._lock:
            self._connects += 1
        self._connected.set()
        client.subscribe([(LABEL_TOPIC_FILTER, 1), (LABEL_USER_TOPIC_FILTER, 1)])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("subscription to %s refused: %s", LABEL_TOPIC_FILTER, reason_codes)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if self._client is not None:
            log.warning("label listener disconnected from %s (%s); reconnecting with back-off", self.mqtt_cfg.broker, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._received += 1
        payload = msg.payload
        try:
            fields = decode_label_payload(msg.topic, payload, max_bytes=self.max_payload_bytes,
                                          require_identity=self.require_identity)
            if self.accept is not None and not self.accept(fields["site"], fields["machine"], fields.get("sensor")):
                with self._lock:
                    self._not_owned += 1
                return
            label, created = self.on_label(**fields)
        except LabelError as err:
            with self._lock:
                self._fields[err.field] += 1
            self._deadletter(client, msg.topic, payload, PayloadError(BAD_LABEL, str(err)))
            return
        except Exception as exc:  # storage failure or a bug: never let it stop the network loop
            self._log_limited.log(logging.ERROR, "internal_error", "could not handle a label on %s: %r", msg.topic[:200],
                                  exc, exc_info=exc)
            self._deadletter(client, msg.topic, payload, PayloadError(INTERNAL_ERROR, f"label not stored: {exc!r}"[:300]))
            return
        with self._lock:
            if created:
                self._created += 1
            else:
                self._duplicates += 1
        log.info("label %s %s on %s/%s (%s)", label.id, "stored" if created else "already stored", label.site,
                 label.machine, label.kind)

    def _deadletter(self, client: mqtt.Client, topic: str, payload: bytes, err: PayloadError) -> None:
        with self._lock:
            self._deadletters[err.reason] += 1
            n = self._deadletters[err.reason]
        self._log_limited.log(logging.WARNING, f"deadletter:{err.reason}", "label dead-letter #%d %s on %s: %s", n, err.reason,
                              topic[:200], err.detail[:300])
        if self.deadletter:
            client.publish(DEADLETTER_TOPIC.format(reason=err.reason), deadletter_payload(topic, payload, err), qos=1)

    # -- observation -----------------------------------------------------------------------------
    def stats(self) -> ListenerStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return ListenerStats(self._received, self._created, self._duplicates, dict(self._deadletters),
                                 dict(self._fields), self._connected.is_set(), self._connects, self._not_owned)
