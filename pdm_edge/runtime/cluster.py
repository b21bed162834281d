"""Several ``pdm-edge run`` instances sharing one site's streams (``[cluster]``, issue 16).

Each configured stream (``[sensors."site/machine/sensor"]``, the same tables on every instance)
is **owned by exactly one live instance** of the group, which alone subscribes to its waveform
topic, windows, scores and stores it, raises its alerts and acts on its machine's labels.

- **Membership over the broker** (MQTT 5 only): every instance keeps a retained presence message
  on ``pdm/v1/_cluster/{group}/members/{instance}`` (JSON: instance, appliance id, a token of
  this process, start time) and subscribes to ``pdm/v1/_cluster/{group}/members/+``; the retained
  messages tell a new instance who is there. Its connection's Will is an *empty retained*
  message on the same topic (which deletes the retained presence), sent by the broker when the
  instance disappears (keep-alive ``heartbeat_s``: after 1.5 times that) and only after the
  **Will Delay Interval** ``takeover_delay_s`` (with a session expiry as long), so a brief
  reconnect moves no stream. A clean stop clears the presence itself, at once.
- **Ownership by rendezvous hashing** (highest random weight, :func:`owner`): the owner of a
  stream is the live member with the highest ``sha256(member NUL stream)`` weight. Every
  instance computes the same answer from the same member set; when a member joins, only the
  streams it now wins move to it (about 1/N of them), and when one leaves only its streams move,
  spread over the others.
- **Only exact subscriptions**: each instance subscribes to the waveform topic of each stream it
  owns (one subscription per stream) and unsubscribes when it loses one; Mosquitto's
  ``$share/...`` groups are not used, because Mosquitto 2 distributes a shared subscription's
  messages per *message* (``tests/test_fleet.py -k shared_subscription``), which splits one
  stream's chunks between instances.
- **Threads** (paho examples style): the membership client's callbacks and the ingestion
  client's ``on_connect`` only put events in a queue; the ``cluster`` thread alone computes
  ownership and changes the ingestion client's subscriptions
  (:meth:`pdm_edge.ingest.Ingestor.assign`).
- **Clean handover, no window lost** (SIGTERM): the leaver republishes its presence marked
  ``leaving``; the others take its streams at once (subscribe) but *hold* their chunks
  (:meth:`pdm_edge.ingest.Ingestor.assign` ``hold``) while the leaver goes on windowing for
  :attr:`Cluster.grace_s` (the longest configured window plus 0.5 s, so the new owner has the
  chunks of the leaver's next window); then the leaver unsubscribes (acknowledged), windows
  what it received, and publishes on ``pdm/v1/_cluster/{group}/handover/{stream}`` the start
  of its newest window; the new owner windows the held chunks from the next window start on
  (the chunk across it cut there), so every window is scored once, by one of the two. A
  leaver that dies during the handover: the held chunks are windowed as a new stream after
  :attr:`Cluster.hold_s`.
- **Start**: an instance takes no stream until it has seen its own presence message come back
  (the broker sends the retained presences of the others before it), so it never starts
  believing it is alone.
- **Unconfigured streams are not served** with the cluster on (the configuration refuses
  ``[ingest] unknown_streams = "accept"``): a stream without a table has no owner.

- **Models follow the owner's registry** (``[cluster] share_models``, on by default): the owner
  of a stream exports every version it makes active (calibrated, promoted or rolled back) as a
  model package (:meth:`pdm_edge.registry.Registry.export`, signed with ``[cluster]
  signing_key`` when set) and publishes it retained (QoS 1) on
  ``pdm/v1/_cluster/{group}/models/{site}/{machine}/{sensor}``. Every instance (also one
  started later: the message is retained) imports it through
  :meth:`~pdm_edge.registry.Registry.import_package` (sha256 of the version file, encoder,
  signature against ``[registry] verify_key`` when set) and makes it active (reason
  ``cluster: ...``; such changes are not published again and not stored as model events: the
  owner stored them). So a new owner scores a stream at once with the group's version; only a
  stream that never had one is calibrated (collecting -> calibrating) by its owner.

What does not move with a stream: the label book, labelled windows and replay buffer stay in the
old owner's state directory (the next owner learns from the labels it receives from then on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pdm_edge import mqtt as mqtt_util
from pdm_edge.config import AppConfig
from pdm_edge.runtime.logging import log_event

__all__ = ["CLUSTER_REASON", "HANDOVER_TOPIC", "MEMBERS_TOPIC", "MODELS_TOPIC", "Cluster", "assignment", "owner", "weight"]

log = logging.getLogger(__name__)

MEMBERS_TOPIC = "pdm/v1/_cluster/{group}/members/{instance}"
"""Retained presence of one instance (empty: the instance left)."""
MODELS_TOPIC = "pdm/v1/_cluster/{group}/models/{stream}"
"""Retained model package of a stream's active version in the group (``{stream}`` is
``site/machine/sensor``)."""
HANDOVER_TOPIC = "pdm/v1/_cluster/{group}/handover/{stream}"
"""Where a leaving instance says where each of its streams' windows ended (JSON
``{"newest_start_ns": int | null, "from": instance}``, QoS 1, not retained)."""
CLUSTER_REASON = "cluster: "
"""Prefix of the registry reason of a version made active from the group's package."""


def weight(member: str, key: str) -> int:
    """The rendezvous weight of ``key`` (a stream ``site/machine/sensor``, or a machine
    ``site/machine``) on ``member``: the first 8 bytes of ``sha256(member NUL key)`` as an
    unsigned integer. Stable across processes and Python versions (unlike :func:`hash`)."""
    return int.from_bytes(hashlib.sha256(f"{member}\0{key}".encode()).digest()[:8], "big")


def owner(key: str, members: Iterable[str]) -> str | None:
    """The member that owns ``key``: the highest :func:`weight` (ties, which need a 64-bit
    collision, by name); ``None`` when there is no member."""
    best: tuple[int, str] | None = None
    for m in members:
        cand = (weight(m, key), m)
        if best is None or cand > best:
            best = cand
    return None if best is None else best[1]


def assignment(keys: Iterable[str], members: Collection[str]) -> dict[str, frozenset[str]]:
    """Every member's owned keys (members that own nothing map to an empty set)."""
    out: dict[str, set[str]] = {m: set() for m in members}
    for k in keys:
        o = owner(k, members)
        if o is not None:
            out[o].add(k)
    return {m: frozenset(v) for m, v in out.items()}


_STOP = ("stop",)


class Cluster:
    """This instance's membership in its ``[cluster]`` group and the streams it owns.

    Usage (the service does this)::

        cluster = Cluster(config, ingestor)
        cluster.start()            # membership connection + the "cluster" thread
        cluster.owns_label("plant1", "pump-7", None)
        cluster.stop()             # release every stream, clear the presence

    Args:
        config: the appliance configuration (``[cluster] enabled``).
        ingestor: the ingestion stage built with ``clustered=True``; its :meth:`assign` and
            :meth:`resubscribe` are called from the ``cluster`` thread only.
        on_change: optional ``(owned: frozenset[str], gained, lost)`` called (cluster thread)
            after every ownership change once joined (metrics); the first assignment is not one.
        registry, encoder_sha256: this instance's model registry and encoder, for sharing
            models (``[cluster] share_models``); ``None``: models are not shared.
    """

    def __init__(self, config: AppConfig, ingestor: Any,
                 on_change: Callable[[frozenset[str], frozenset[str], frozenset[str]], None] | None = None, *,
                 registry: Any = None, encoder_sha256: str | None = None) -> None:
        if not config.cluster.enabled:
            raise ValueError("[cluster] is not enabled")
        self.config = config
        self.ccfg = config.cluster
        self.instance = config.cluster_instance
        self.streams = frozenset(config.sensors)
        self.ingestor = ingestor
        self.on_change = on_change
        self.presence_topic = MEMBERS_TOPIC.format(group=self.ccfg.group, instance=self.instance)
        self.members_filter = MEMBERS_TOPIC.format(group=self.ccfg.group, instance="+")
        self.handover_filter = HANDOVER_TOPIC.format(group=self.ccfg.group, stream="+/+/+")
        self.grace_s = max((sc.window_s for sc in config.sensors.values()), default=1.0) + 0.5
        """How long a leaving instance goes on windowing after announcing it leaves, s."""
        self.hold_s = self.grace_s + 5.0
        """How long a new owner holds a stream taken from a leaving instance for its handover, s."""
        self.registry = registry if config.cluster.share_models and encoder_sha256 is not None else None
        self.encoder_sha256 = encoder_sha256
        self.models_filter = MODELS_TOPIC.format(group=self.ccfg.group, stream="+/+/+")
        self._signing_key: Any = None
        if self.registry is not None and config.cluster.signing_key:
            from pdm_edge.registry import load_private_key

            self._signing_key = load_private_key(config.cluster.signing_key)
        self._models = {"published": 0, "imported": 0, "activated": 0, "failed": 0}
        self._group_models: set[str] = set()  # streams with a package in the group (cluster thread)
        self.token = uuid.uuid4().hex
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._lock = threading.Lock()
        self._members: dict[str, dict[str, Any]] = {}  # cluster thread
        self._owned: frozenset[str] = frozenset()
        self._settled = threading.Event()
        self._connected = threading.Event()
        self._changes = 0
        self._conflicts = 0
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        info = {"instance": self.instance, "appliance_id": config.appliance_id, "token": self.token,
                "pid": os.getpid(), "started_ns": time.time_ns()}
        self._presence = json.dumps(info).encode()
        self._leaving = json.dumps({**info, "leaving": True}).encode()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Cluster:
        """Connect the membership client (in the background, with retries) and start the
        ``cluster`` thread. Streams are taken once the member set is known."""
        self._thread = threading.Thread(target=self._run, name="cluster", daemon=True)
        self._thread.start()
        self.ingestor.on_connected = lambda: self._events.put(("ingest_connected",))
        client = mqtt_util.make_client(self.config.mqtt, f"{self.config.appliance_id}-cluster", persistent=True)
        will = Properties(PacketTypes.WILLMESSAGE)
        will.WillDelayInterval = self.ccfg.takeover_delay_s
        client.will_set(self.presence_topic, b"", qos=1, retain=True, properties=will)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.ccfg.takeover_delay_s  # the will waits at most this long
        client.connect_async(self.config.mqtt.host, self.config.mqtt.port, keepalive=self.ccfg.heartbeat_s,
                             clean_start=False, properties=props)
        client.loop_start()
        self._client = client
        return self

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Block until the member set is known and the first ownership applied."""
        return self._settled.wait(timeout)

    def release(self, timeout: float = 2.0) -> None:
        """Give up every stream and leave the group (the first step of a clean stop), handing
        each stream over without a gap (see the module docstring): announce ``leaving``, go on
        windowing for :attr:`grace_s`, unsubscribe every owned waveform topic (acknowledged),
        window what was received, publish each stream's newest window start, clear the retained
        presence. Idempotent."""
        client = self._client
        owned = self.owned
        handing = bool(client is not None and self._connected.is_set() and self._settled.is_set() and owned
                       and len(self._live()) > 1)  # alone: nobody to hand over to
        if handing:
            assert client is not None
            info = client.publish(self.presence_topic, self._leaving, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=timeout)
            except (RuntimeError, ValueError):
                handing = False
            if handing:
                time.sleep(self.grace_s)  # the others subscribe and hold; this instance still windows
        if self._thread is not None:
            self._events.put(_STOP)
            self._thread.join(timeout + 5.0)
            self._thread = None
        client, self._client = self._client, None
        if client is None:
            return
        if handing and self.ingestor.wait_idle(timeout):
            last = None
            for stream in sorted(owned):
                body = {"newest_start_ns": self.ingestor.newest_window_start(stream), "from": self.instance}
                last = client.publish(HANDOVER_TOPIC.format(group=self.ccfg.group, stream=stream), json.dumps(body), qos=1)
            try:
                if last is not None:
                    last.wait_for_publish(timeout=timeout)
            except (RuntimeError, ValueError):
                pass
            log_event(log, logging.INFO, "cluster_handover", instance=self.instance, streams=len(owned))
        cleared = False
        if self._connected.is_set():
            info = client.publish(self.presence_topic, b"", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=timeout)
                cleared = info.is_published()
            except (RuntimeError, ValueError):
                pass
        if cleared:
            client.disconnect()  # normal disconnection: the broker discards the will
        else:  # MQTT 5 "disconnect with will message": the broker clears the presence for us
            from paho.mqtt.reasoncodes import ReasonCode

            client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        client.loop_stop()
        log_event(log, logging.INFO, "cluster_left", group=self.ccfg.group, instance=self.instance)

    stop = release

    # -- MQTT callbacks (paho network thread: hand off only) ---------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the cluster connection: %s", self.config.mqtt.broker, reason_code)
            return
        self._connected.set()
        topics = [(self.members_filter, 1), (self.handover_filter, 1)]
        topics += [(self.models_filter, 1)] if self.registry is not None else []
        client.subscribe(topics)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("subscription to %s refused: %s", self.members_filter, reason_codes)
            return
        # after the subscription: our own presence comes back after every retained one
        client.publish(self.presence_topic, self._presence, qos=1, retain=True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) == 8 and parts[4] == "models":
            self._events.put(("model", "/".join(parts[5:]), bytes(msg.payload)))
            return
        if len(parts) == 8 and parts[4] == "handover":
            self._events.put(("handover", "/".join(parts[5:]), bytes(msg.payload)))
            return
        instance = parts[-1]
        info: dict[str, Any] | None = None
        if msg.payload:
            try:
                info = json.loads(msg.payload)
                if not isinstance(info, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                log.warning("ignoring a malformed presence message on %s", msg.topic[:200])
                return
        self._events.put(("member", instance, info))

    # -- the cluster thread: the one owner of the member set and the subscriptions -------------
    def _run(self) -> None:
        while True:
            ev = self._events.get()
            try:
                if ev is _STOP:
                    self._apply(frozenset(), wait_s=2.0)
                    return
                if ev[0] == "ingest_connected":
                    self.ingestor.resubscribe()
                    continue
                if ev[0] == "member":
                    self._member(ev[1], ev[2])
                elif ev[0] == "model":
                    self._receive_model(ev[1], ev[2])
                elif ev[0] == "activated":
                    self._publish_model(ev[1])
                elif ev[0] == "handover":
                    self._handover(ev[1], ev[2])
            except Exception:  # never let one event end the thread
                log.exception("cluster event %r failed", ev[:2])

    def _member(self, instance: str, info: dict[str, Any] | None) -> None:
        if instance == self.instance:
            if info is None or info.get("token") != self.token:
                if not self._settled.is_set():
                    return  # the presence of this instance's previous run; ours follows
                if info is not None:  # another live process with our instance id: report, do not fight
                    with self._lock:
                        self._conflicts += 1
                    log_event(log, logging.ERROR, "cluster_instance_conflict", instance=self.instance,
                              other_pid=info.get("pid"), detail="two processes use one [cluster] instance id")
                elif self._client is not None and self._connected.is_set():
                    # cleared (our Will after a disconnect longer than the takeover delay, or by hand)
                    self._client.publish(self.presence_topic, self._presence, qos=1, retain=True)
                return
            with self._lock:
                self._members[instance] = info
            first = not self._settled.is_set()
            self._reassign(first)
            return
        present = info is not None and not info.get("leaving")
        with self._lock:
            before = instance in self._members
            if present:
                self._members[instance] = info  # type: ignore[assignment]
            else:
                self._members.pop(instance, None)
        if before != present:
            log_event(log, logging.INFO, "cluster_member_joined" if present else
                      ("cluster_member_leaving" if info is not None else "cluster_member_left"),
                      group=self.ccfg.group, member=instance)
            if self._settled.is_set():
                # a clean leaver hands its streams over: hold them until it says where its windows end
                hold = (frozenset(s for s in self.streams if owner(s, self._live() | {instance}) == instance)
                        if info is not None else frozenset())
                self._reassign(False, hold)

    def _live(self) -> set[str]:
        with self._lock:
            return set(self._members) | {self.instance}

    def _reassign(self, first: bool, hold: frozenset[str] = frozenset()) -> None:
        members = self._live()
        owned = frozenset(s for s in self.streams if owner(s, members) == self.instance)
        self._apply(owned, hold=hold)
        if first:
            self._settled.set()
            log_event(log, logging.INFO, "cluster_joined", group=self.ccfg.group, instance=self.instance,
                      members=",".join(sorted(members)), owned=len(owned))

    def _handover(self, stream: str, data: bytes) -> None:
        if stream not in self.owned:
            return
        try:
            body = json.loads(data)
            newest = body["newest_start_ns"]
            if newest is not None and (isinstance(newest, bool) or not isinstance(newest, int)):
                raise ValueError(f"newest_start_ns {newest!r} is not an integer")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed handover of %s: %s", stream, exc)
            return
        self.ingestor.handover(stream, newest)

    def _apply(self, owned: frozenset[str], wait_s: float = 0.0, hold: frozenset[str] = frozenset()) -> None:
        with self._lock:
            old = self._owned
            if owned == old and self._settled.is_set():
                return
            self._owned = owned
            gained, lost = owned - old, old - owned
            joined = self._settled.is_set()  # the first assignment is not a change
            if joined:
                self._changes += len(gained) + len(lost)
        self.ingestor.assign(owned, wait_s=wait_s, hold=hold & gained, hold_s=self.hold_s)
        if self.registry is not None:
            self._offer_models(gained)
        if gained or lost:
            log_event(log, logging.INFO, "cluster_ownership", instance=self.instance, owned=len(owned),
                      gained=",".join(sorted(gained)) or None, lost=",".join(sorted(lost)) or None)
            if self.on_change is not None and joined:
                try:
                    self.on_change(owned, gained, lost)
                except Exception:
                    log.exception("cluster on_change hook failed")

    # -- models ------------------------------------------------------------------------------
    def model_changed(self, rec: Any) -> None:
        """Registry listener (any thread; hands off): ``rec`` (a
        :class:`~pdm_edge.registry.RegisteredVersion`) became its stream's active version. The
        ``cluster`` thread publishes its package when this instance owns the stream and the
        change did not come from the group."""
        if self.registry is not None and not (rec.reason or "").startswith(CLUSTER_REASON):
            self._events.put(("activated", rec))

    def _offer_models(self, gained: frozenset[str]) -> None:
        """Streams just taken (at the start too) that the group has no package of: publish this
        instance's active version of each, so that one instance commissioned with a stream's
        version gives it to the others. The group's packages are known by then: the retained
        ones arrive with the subscription, before this instance's own presence comes back."""
        for stream in sorted(gained - self._group_models):
            rec = self.registry.active(*stream.split("/"))
            if rec is not None:
                self._publish_model(rec)

    def _publish_model(self, rec: Any) -> None:
        if rec.stream not in self.owned or self._client is None:
            return
        try:
            data = self.registry.package(rec.id, self._signing_key)
        except Exception as exc:
            with self._lock:
                self._models["failed"] += 1
            log_event(log, logging.ERROR, "cluster_model_export_failed", stream=rec.stream, version=rec.id, error=repr(exc)[:300])
            return
        self._client.publish(MODELS_TOPIC.format(group=self.ccfg.group, stream=rec.stream), data, qos=1, retain=True)
        self._group_models.add(rec.stream)
        with self._lock:
            self._models["published"] += 1
        log_event(log, logging.INFO, "cluster_model_published", stream=rec.stream, version=rec.id, bytes=len(data))

    def _receive_model(self, stream: str, data: bytes) -> None:
        """Import the group's package of ``stream`` and make it active here (cluster thread)."""
        from pdm_edge.errors import PdmEdgeError

        if stream not in self.streams:
            log.warning("ignoring the model package of %s: not a configured stream", stream[:200])
            return
        if not data:  # the retained package was cleared
            self._group_models.discard(stream)
            return
        self._group_models.add(stream)
        site, machine, sensor = stream.split("/")
        try:
            known = {v.id for v in self.registry.list(site, machine, sensor)}
            rec = self.registry.import_package(data, name=f"cluster package of {stream}", encoder_sha256=self.encoder_sha256,
                                               stream=(site, machine, sensor))  # the same file again: the version we have
            if rec.status == "active":
                return  # ours, or already applied (a retained message is delivered at every start)
            if rec.id not in known:
                with self._lock:
                    self._models["imported"] += 1
            self.registry.promote(rec.id, f"{CLUSTER_REASON}the group's active version ({rec.id})", force=True)
        except (PdmEdgeError, ValueError, OSError) as exc:
            with self._lock:
                self._models["failed"] += 1
            log_event(log, logging.ERROR, "cluster_model_refused", stream=stream, error=str(exc)[:300])
            return
        with self._lock:
            self._models["activated"] += 1
        log_event(log, logging.INFO, "cluster_model_activated", stream=stream, version=rec.id)

    # -- questions -----------------------------------------------------------------------------
    @property
    def owned(self) -> frozenset[str]:
        """The streams this instance owns now."""
        with self._lock:
            return self._owned

    def owns_label(self, site: str, machine: str, sensor: str | None) -> bool:
        """Whether this instance acts on a label of ``site/machine`` (``sensor``: one sensor of
        it, ``None``: the whole machine): it owns that stream, or (whole machine) one of the
        machine's configured streams. A machine without a configured stream belongs to the
        rendezvous owner of ``site/machine``, so exactly one instance stores its labels."""
        owned = self.owned
        if sensor is not None and f"{site}/{machine}/{sensor}" in self.streams:
            return f"{site}/{machine}/{sensor}" in owned
        prefix = f"{site}/{machine}/"
        if any(s.startswith(prefix) for s in self.streams):
            return any(s.startswith(prefix) for s in owned)
        return owner(f"{site}/{machine}", self._live()) == self.instance

    def status(self) -> dict[str, Any]:
        """The ``/healthz`` ``cluster`` block: group, instance, connected, settled, members,
        owned streams, ownership changes, instance-id conflicts seen."""
        with self._lock:
            owned, changes, conflicts, models = sorted(self._owned), self._changes, self._conflicts, dict(self._models)
            members = sorted(set(self._members) | ({self.instance} if self._settled.is_set() else set()))
        return {"group": self.ccfg.group, "instance": self.instance, "connected": self._connected.is_set(),
                "settled": self._settled.is_set(), "members": members, "owned": owned, "owned_count": len(owned),
                "streams": len(self.streams), "ownership_changes": changes, "instance_conflicts": conflicts,
                "models": models if self.registry is not None else None}

