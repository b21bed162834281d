"""The ingestion stage: MQTT subscription -> decode/validate -> ring buffer per stream -> windows.

Threads and queues (DESIGN.md section 1)::

    paho network thread          windowing worker                                    next stage
    on_message: decode  --->  [chunk queue, bounded]  --->  validate -> StreamWindower.push
                 | rejected                                      | rejected            |
                 v                                               v                     v
    pdm/v1/_deadletter/{reason}  <-------------------------------+      [window queue, bounded]

- The paho callback only decodes (:func:`~pdm_edge.ingest.chunk.decode_chunk`, pure, with the
  limits bound once at construction) and enqueues without waiting (as the paho examples do:
  callbacks only hand off). A full chunk queue dead-letters the chunk as ``queue_full`` at
  once; it never blocks the network thread (keep-alives, acknowledgements and the other
  subscriptions go on). When the window queue is full the worker waits, which fills the chunk
  queue: the slowest stage sets the pace and nothing is dropped silently.
- Every rejected payload is counted per reason and, unless ``ingest.deadletter = false``,
  published to ``pdm/v1/_deadletter/{reason}`` (QoS 1) with the reason and its first bytes.
- The client keeps a persistent session (see :mod:`pdm_edge.mqtt`): subscriptions are
  renewed on every (re)connect and QoS 1 chunks queued by the broker while the appliance was
  away are delivered when it returns. Redelivered duplicates are dropped by sequence number,
  so each published chunk is windowed exactly once.
- ``pdm/v1/_appliance/{id}/status`` is ``online`` (retained) while connected; the broker
  publishes the retained last will ``offline`` when the appliance disappears, and a clean
  stop publishes it itself.
- **Both queues are bounded in items and in bytes of samples** (:class:`BytesBoundedQueue`,
  ``ingest.queue_size`` / ``chunk_queue_max_bytes`` and ``window_queue_size`` /
  ``window_queue_max_bytes``), so an overload costs bounded memory whatever the chunk size.
- **Validation needing the configuration or the clock** (:meth:`Ingestor._validate`, in the
  windowing worker, which dead-letters a chunk that fails it; unit conversions happen there): known
  stream, configured sample rate and unit, and a plausible timestamp (not before
  ``ingest.min_timestamp_ns``, not more than ``ingest.max_future_s`` ahead of the appliance
  clock: ``implausible_time``).
- **Time only moves forward per stream**: the newest window start emitted for each stream is
  kept (across stream restarts); a window that would start at or before it (a sensor clock
  that went backwards, a restarted sensor with a reset clock) is not emitted but counted as
  ``time_backwards`` with the stream and logged, so stored scores are never overwritten and no
  alert is raised for a span already scored. The stream's later windows flow once its clock
  has passed that point.
- **Cluster** (``clustered=True``, :mod:`pdm_edge.runtime.cluster`): no wildcard subscription;
  the owner of the subscription state (the ``cluster`` thread) gives the streams this instance
  owns with :meth:`Ingestor.assign` (one exact subscription per stream) and renews them after
  every (re)connect with :meth:`Ingestor.resubscribe`, which ``on_connect`` asks for through
  :attr:`Ingestor.on_connected` (a hand-off). A chunk of a stream not owned (in flight at a
  handover, or queued by the broker for an earlier session) is dropped and counted
  (``not_owned``), not dead-lettered: another instance scores it.
  **Handover without a gap**: a stream taken from an instance that is leaving cleanly is
  *held* (its chunks kept in arrival order, not windowed) until the leaver says where its
  windows ended (:meth:`Ingestor.handover`: its newest window start); then the held chunks
  before the next window start are skipped, the one across it is cut there, and the stream is
  windowed from exactly the leaver's next window on (``handed_over``). Without word within the
  hold time the held chunks are windowed as a fresh stream.
- **Supervised worker** (:mod:`pdm_edge.supervision`): an exception while windowing one chunk
  is recorded with the stream (:attr:`Ingestor.errors`, stage ``ingest-window``), the chunk is
  dead-lettered as ``internal_error``, the stream restarts, and the worker goes on; the loop
  itself is restarted if it ever ends by an exception. Dead-letter and decode-error logs are
  rate-limited per reason (the first with its traceback), never a traceback per message.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from pdm_edge import mqtt as mqtt_util
from pdm_edge.config import AppConfig
from pdm_edge.errors import PayloadError
from pdm_edge.ingest.chunk import (
    DEADLETTER_TOPIC,
    WAVEFORM_TOPIC_FILTER,
    Chunk,
    deadletter_payload,
    decode_chunk,
    waveform_topic,
)
from pdm_edge.ingest.windowing import EVENTS, StreamSettings, StreamWindower
from pdm_edge.supervision import RateLimitedLog, StageErrors, run_supervised
from pdm_edge.types import STANDARD_GRAVITY_M_S2, Window

log = logging.getLogger(__name__)

_STOP = object()
_UNIT_FACTORS = {("m/s2", "g"): 1.0 / STANDARD_GRAVITY_M_S2, ("g", "m/s2"): STANDARD_GRAVITY_M_S2}


class BytesBoundedQueue(queue.Queue):  # type: ignore[type-arg]
    """A FIFO bounded both in items (``maxsize``) and in bytes (``max_bytes``, the sum of each
    item's ``samples.nbytes``; other items count 0). An item larger than ``max_bytes`` still
    enters an empty queue, so a single oversized item cannot block forever.

    Same interface as :class:`queue.Queue` (``put`` with ``timeout`` raises :class:`queue.Full`)."""

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        super().__init__(maxsize)
        self.max_bytes = int(max_bytes)
        self.nbytes = 0

    @staticmethod
    def _size(item: Any) -> int:
        samples = getattr(item, "samples", None)
        return int(getattr(samples, "nbytes", 0))

    def _full_for(self, size: int) -> bool:
        n = self._qsize()
        return (0 < self.maxsize <= n) or (n > 0 and self.nbytes + size > self.max_bytes)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        size = self._size(item)
        with self.not_full:
            if not block:
                if self._full_for(size):
                    raise queue.Full
            elif timeout is None:
                while self._full_for(size):
                    self.not_full.wait()
            else:
                if timeout < 0:
                    raise ValueError("'timeout' must be a non-negative number")
                end = time.monotonic() + timeout
                while self._full_for(size):
                    remaining = end - time.monotonic()
                    if remaining <= 0.0:
                        raise queue.Full
                    self.not_full.wait(remaining)
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def _put(self, item: Any) -> None:
        self.nbytes += self._size(item)
        super()._put(item)

    def _get(self) -> Any:
        item = super()._get()
        self.nbytes -= self._size(item)
        return item


@dataclasses.dataclass(frozen=True)
class StreamStats:
    """Counters of one stream since the ingestor started."""

    chunks: int
    samples: int
    windows: int
    last_chunk_ns: int | None
    """Timestamp of the newest sample received (ns), ``None`` before the first chunk."""
    events: Mapping[str, int]
    """Counts of ``duplicate``, ``gap_seq``, ``gap_time``, ``restart``, ``rate_change``."""


@dataclasses.dataclass(frozen=True)
class IngestStats:
    """A consistent snapshot of the ingestion counters (for the CLI, health view, metrics)."""

    received: int
    """MQTT messages seen on the waveform topics."""
    accepted: int
    """Chunks decoded and put in the chunk queue, less those the worker's validation
    dead-lettered and those of streams not owned (``accepted + deadlettered + not_owned ==
    received`` once the queue is empty)."""
    windowed: int
    """Chunks the windowing worker has finished with (their windows are in the window queue)."""
    windows: int
    deadletters: Mapping[str, int]
    events: Mapping[str, int]
    streams: Mapping[str, StreamStats]
    chunk_queue_depth: int
    chunk_queue_high_water: int
    window_queue_depth: int
    connected: bool
    connects: int
    disconnects: int
    windows_dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Windows cut but not emitted, by reason (``time_backwards``)."""
    not_owned: int = 0
    """Chunks dropped because another cluster instance owns their stream (``clustered`` only)."""
    handed_over: int = 0
    """Streams taken from a leaving instance that continue exactly at its next window."""
    chunk_queue_bytes: int = 0
    window_queue_bytes: int = 0

    @property
    def deadlettered(self) -> int:
        return sum(self.deadletters.values())


@dataclasses.dataclass(frozen=True)
class _Received:
    """A decoded chunk in the chunk queue, with what a dead letter needs of its message (the
    topic and the payload's first bytes; the samples are not copied)."""

    chunk: Chunk
    topic: str
    head: bytes

    @property
    def samples(self) -> np.ndarray:  # for BytesBoundedQueue's byte bound
        return self.chunk.samples


def _infer_kind(unit: str) -> str:
    return "acoustic" if unit in ("Pa", "FS") else "vibration"


class Ingestor:
    """The ingestion stage as a running service.

    Usage::

        ing = Ingestor(config)
        ing.start()
        ing.wait_ready(10)          # subscribed
        window = ing.windows.get()  # pdm_edge.types.Window
        ing.stop()

    Args:
        config: the validated appliance configuration.
        windows: the output queue of :class:`~pdm_edge.types.Window`; a bounded queue of
            ``ingest.window_queue_size`` is created when None.
        client_id: MQTT client id; ``"{appliance_id}-ingest"`` by default. It must stay the same
            across restarts for the persistent session to survive them.
        clustered: subscribe only to the streams given to :meth:`assign` (none at first)
            instead of every waveform topic.
    """

    def __init__(self, config: AppConfig, windows: queue.Queue[Window] | None = None, client_id: str | None = None,
                 *, clustered: bool = False) -> None:
        self.config = config
        self.icfg = config.ingest
        self.windows: queue.Queue[Window] = windows if windows is not None else BytesBoundedQueue(
            self.icfg.window_queue_size, self.icfg.window_queue_max_bytes)
        self.client_id = client_id or f"{config.appliance_id}-ingest"
        self.status_topic = mqtt_util.APPLIANCE_STATUS_TOPIC.format(id=config.appliance_id)
        self._chunks: queue.Queue[Any] = BytesBoundedQueue(self.icfg.queue_size, self.icfg.chunk_queue_max_bytes)
        self.errors = StageErrors(log)
        """Errors of the windowing worker (stage ``ingest-window``), for /healthz and /metrics."""
        self._log_limited = RateLimitedLog(log, 60.0)
        self._newest_start: dict[str, int] = {}  # newest window start emitted per stream (worker thread)
        self._dropped: collections.Counter[str] = collections.Counter()
        self._windowers: dict[str, StreamWindower] = {}  # owned by the worker thread
        self._unconfigured: set[str] = set()  # owned by the worker thread
        icfg = self.icfg
        self._decode = functools.partial(decode_chunk, max_payload_bytes=icfg.max_payload_bytes,
                                         max_samples=icfg.max_samples_per_chunk,
                                         min_sample_rate_hz=icfg.min_sample_rate_hz,
                                         max_sample_rate_hz=icfg.max_sample_rate_hz)
        self._lock = threading.Lock()
        self._received = 0
        self._accepted = 0
        self._windowed = 0
        self._n_windows = 0
        self._deadletters: collections.Counter[str] = collections.Counter()
        self._events: collections.Counter[str] = collections.Counter()
        self._streams: dict[str, dict[str, Any]] = {}
        self._high_water = 0
        self._connects = 0
        self._disconnects = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._abort = threading.Event()
        self._worker: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._owned: frozenset[str] | None = frozenset() if clustered else None  # None: every stream
        self._subscribed_streams: frozenset[str] = frozenset()  # the assigning thread's view
        self._released: set[str] = set()  # streams whose windower the worker must drop
        self._not_owned = 0
        self._holds: dict[str, dict[str, Any]] = {}  # stream -> {"chunks", "until", "newest"?} (worker thread)
        self._hold_requests: dict[str, float] = {}  # stream -> hold until (monotonic), from assign()
        self._handovers: dict[str, int | None] = {}  # stream -> the leaver's newest window start, from handover()
        self._handed_over = 0
        self._unsub_acked = threading.Condition()
        self._unsub_mids: set[int] = set()
        self.on_connected: Callable[[], None] | None = None
        """Clustered: called (paho network thread; it must only hand off) after every connect,
        so that the owner of the subscriptions calls :meth:`resubscribe`."""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the windowing worker and begin connecting (in the background, with retries)."""
        if self._client is not None:
            raise RuntimeError("Ingestor already started")
        self._worker = threading.Thread(
            target=lambda: run_supervised("ingest-window", self._work, self.errors, stopped=self._abort.is_set),
            name="ingest-window", daemon=True)
        self._worker.start()
        client = mqtt_util.make_client(self.config.mqtt, self.client_id, persistent=True)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_unsubscribe = self._on_unsubscribe
        self._client = client
        mqtt_cfg = self.config.mqtt
        if self._owned is not None:  # a session outlives a reconnect within the takeover delay, no more
            mqtt_cfg = mqtt_cfg.model_copy(update={"session_expiry_s": self.config.cluster.takeover_delay_s})
        mqtt_util.connect(client, mqtt_cfg, persistent=True)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until connected and subscribed; ``False`` on timeout."""
        return self._subscribed.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly: publish ``offline``, disconnect, window every chunk already queued.

        Windows still go to :attr:`windows`; if nobody takes them within ``timeout`` seconds
        the rest are dropped (and logged) so that stopping cannot hang.
        """
        client, self._client = self._client, None
        if client is not None:
            if self._connected.is_set():
                info = client.publish(self.status_topic, "offline", qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout=2.0)
                except (RuntimeError, ValueError):
                    pass
            client.disconnect()
            client.loop_stop()
        if self._worker is not None:
            deadline = time.monotonic() + timeout
            while True:  # the chunk queue may be full while the worker waits on a full window queue
                try:
                    self._chunks.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    if time.monotonic() > deadline and not self._abort.is_set():
                        log.warning("window queue still full after %.1f s; dropping the remaining windows", timeout)
                        self._abort.set()
            self._worker.join(max(0.0, deadline - time.monotonic()))
            if self._worker.is_alive():
                log.warning("window queue still full after %.1f s; dropping the remaining windows", timeout)
                self._abort.set()
                self._worker.join(5.0)
            self._worker = None

    def __enter__(self) -> Ingestor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- MQTT callbacks (paho network thread: decode and enqueue only, never wait) ---------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.config.mqtt.broker, reason_code)
            return
        with self._lock:
            self._connects += 1
        self._connected.set()
        log.info("connected to %s (session present: %s)", self.config.mqtt.broker, getattr(flags, "session_present", None))
        if self._owned is None:
            client.subscribe(WAVEFORM_TOPIC_FILTER, qos=self.config.mqtt.qos)
        else:  # the cluster thread subscribes; ready as soon as connected
            self._subscribed.set()
            if self.on_connected is not None:
                self.on_connected()
        client.publish(self.status_topic, "online", qos=1, retain=True)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("waveform subscription refused: %s", reason_codes)
            return
        self._subscribed.set()

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._unsub_acked:
            if len(self._unsub_mids) > 1024:  # acknowledgements nobody waited for
                self._unsub_mids.clear()
            self._unsub_mids.add(mid)
            self._unsub_acked.notify_all()

    # -- cluster: the owned streams (called by the one thread that owns the subscriptions) ----
    def assign(self, streams: frozenset[str], *, wait_s: float = 0.0, hold: Collection[str] = (),
               hold_s: float = 0.0) -> None:
        """Own exactly ``streams`` (``site/machine/sensor``, configured ones): subscribe to the
        waveform topic of each new one (QoS ``mqtt.qos``), unsubscribe from each one lost; the
        windowing worker drops a lost stream's partial window and its later chunks
        (``not_owned``). Only for an ingestor built with ``clustered=True``; call it from one
        thread (the ``cluster`` thread), never from a paho callback. ``wait_s``: wait up to
        that long for the broker to acknowledge the unsubscription (a handover: the next owner
        subscribes only after). ``hold``: new streams whose chunks are held until
        :meth:`handover` tells where their windows continue (at most ``hold_s`` seconds).

        Raises:
            RuntimeError: the ingestor is not clustered.
        """
        if self._owned is None:
            raise RuntimeError("Ingestor.assign needs clustered=True")
        streams = frozenset(streams)
        with self._lock:
            old, self._owned = self._owned, streams
            self._released.update(old - streams)
            self._released.difference_update(streams)
            until = time.monotonic() + hold_s
            for stream in set(hold) & (streams - old):
                self._hold_requests[stream] = until
        client = self._client
        if client is None or not self._connected.is_set():
            return  # resubscribe() after the connection
        lost = sorted(self._subscribed_streams - streams)
        gained = sorted(streams - self._subscribed_streams)
        if lost:
            rc, mid = client.unsubscribe([waveform_topic(*s.split("/")) for s in lost])
            if wait_s > 0 and rc == mqtt.MQTT_ERR_SUCCESS:
                with self._unsub_acked:
                    self._unsub_acked.wait_for(lambda: mid in self._unsub_mids, wait_s)
                    self._unsub_mids.discard(mid)
        if gained:
            client.subscribe([(waveform_topic(*s.split("/")), self.config.mqtt.qos) for s in gained])
        self._subscribed_streams = streams

    def handover(self, stream: str, newest_start_ns: int | None) -> None:
        """The previous owner of ``stream`` emitted its last window at ``newest_start_ns``
        (``None``: none); the held chunks continue from its next window (see the module
        docstring). Same thread as :meth:`assign`."""
        with self._lock:
            self._handovers[stream] = newest_start_ns

    def newest_window_start(self, stream: str) -> int | None:
        """Start (ns) of the newest window emitted for ``stream``; ``None`` before the first.
        Stable once :meth:`wait_idle` returned after the stream's subscription ended."""
        return self._newest_start.get(stream)

    def resubscribe(self) -> None:
        """After a (re)connect: subscribe to every owned stream's topic and unsubscribe from
        every other configured stream's topic and the wildcard filter (a persistent session may
        still hold them from an earlier run). Same thread as :meth:`assign`."""
        if self._owned is None:
            raise RuntimeError("Ingestor.resubscribe needs clustered=True")
        client = self._client
        if client is None:
            return
        with self._lock:
            owned = self._owned
        stale = [waveform_topic(*s.split("/")) for s in sorted(set(self.config.sensors) - owned)]
        client.unsubscribe([WAVEFORM_TOPIC_FILTER, *stale])
        if owned:
            client.subscribe([(waveform_topic(*s.split("/")), self.config.mqtt.qos) for s in sorted(owned)])
        self._subscribed_streams = owned

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        with self._lock:
            self._disconnects += 1
        if self._client is not None:
            log.warning("disconnected from %s (%s); reconnecting with back-off", self.config.mqtt.broker, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._received += 1
        payload = msg.payload
        try:
            chunk = self._decode(msg.topic, payload)
        except PayloadError as err:
            self._deadletter(client, msg.topic, payload, err)
            return
        except Exception as exc:  # a bug must not stop ingestion: count it and keep going
            self._log_limited.log(logging.ERROR, "decode:internal_error", "unexpected error decoding a payload on %s: %r",
                                  msg.topic[:200], exc, exc_info=exc)
            self._deadletter(client, msg.topic, payload, PayloadError("internal_error", repr(exc)[:200]), logged=True)
            return
        try:
            self._chunks.put_nowait(_Received(chunk, msg.topic, payload[:256]))
        except queue.Full:
            self._deadletter(client, msg.topic, payload, PayloadError(
                "queue_full", f"chunk queue full ({self.icfg.queue_size} chunks / {self.icfg.chunk_queue_max_bytes} bytes)"))
            return
        with self._lock:
            self._accepted += 1
            depth = self._chunks.qsize()
            if depth > self._high_water:
                self._high_water = depth

    def _validate(self, chunk: Chunk) -> Chunk:
        """Checks that need the configuration or the clock: plausible time, known stream,
        sample rate, unit."""
        if chunk.ts_ns < self.icfg.min_timestamp_ns:
            raise PayloadError("implausible_time", f"ts {chunk.ts_ns} ns before ingest.min_timestamp_ns {self.icfg.min_timestamp_ns}")
        ahead_s = (chunk.ts_ns - time.time_ns()) / 1e9
        if ahead_s > self.icfg.max_future_s:
            raise PayloadError("implausible_time", f"ts {ahead_s:.0f} s ahead of the appliance clock "
                               f"(ingest.max_future_s = {self.icfg.max_future_s:g})")
        sc = self.config.sensor(chunk.site, chunk.machine, chunk.sensor)
        if sc is None:
            if self.icfg.unknown_streams == "reject":
                raise PayloadError("unknown_stream", f"no [sensors.\"{chunk.stream}\"] table in the configuration")
            if chunk.stream not in self._unconfigured:
                if len(self._unconfigured) >= self.icfg.max_streams:
                    raise PayloadError("stream_limit", f"already {len(self._unconfigured)} unconfigured streams (ingest.max_streams)")
                self._unconfigured.add(chunk.stream)
            return chunk
        if chunk.sample_rate_hz != sc.sample_rate_hz:
            raise PayloadError("sample_rate_mismatch", f"fs {chunk.sample_rate_hz:g} Hz, configured {sc.sample_rate_hz:g} Hz")
        if chunk.unit != sc.unit:
            factor = _UNIT_FACTORS.get((chunk.unit, sc.unit))
            if factor is None:
                raise PayloadError("unit_mismatch", f"unit {chunk.unit!r}, configured {sc.unit!r}")
            chunk = dataclasses.replace(chunk, unit=sc.unit, samples=(chunk.samples * np.float32(factor)).astype(np.float32))
        return chunk

    def _deadletter(self, client: mqtt.Client | None, topic: str, payload: bytes, err: PayloadError, *,
                    logged: bool = False, size: int | None = None) -> None:
        with self._lock:
            self._deadletters[err.reason] += 1
            n = self._deadletters[err.reason]
        if not logged:
            self._log_limited.log(logging.WARNING, f"deadletter:{err.reason}", "dead-letter #%d %s on %s: %s",
                                  n, err.reason, topic[:200], err.detail[:300])
        if self.icfg.deadletter and client is not None:
            client.publish(DEADLETTER_TOPIC.format(reason=err.reason), deadletter_payload(topic, payload, err, size=size), qos=1)

    # -- windowing worker ------------------------------------------------------------------
    def _settings_for(self, chunk: Chunk) -> StreamSettings:
        sc = self.config.sensor(chunk.site, chunk.machine, chunk.sensor)
        if sc is not None:
            return StreamSettings(sc.kind, sc.sample_rate_hz, sc.unit, sc.window_samples, sc.hop_samples, self.icfg.max_time_jitter_s)
        d = self.icfg.default_sensor
        return StreamSettings(
            _infer_kind(chunk.unit),  # type: ignore[arg-type]
            chunk.sample_rate_hz,
            chunk.unit,
            max(1, round(d.window_s * chunk.sample_rate_hz)),
            max(1, round(d.hop_s * chunk.sample_rate_hz)),
            self.icfg.max_time_jitter_s,
        )

    def _work(self) -> None:
        while True:
            try:
                item = self._chunks.get(timeout=0.2 if self._holds or self._hold_requests else None)
            except queue.Empty:
                self._release_holds()
                continue
            if item is _STOP:
                self._release_holds(force=True)
                return
            received: _Received = item
            chunk = received.chunk
            if self._owned is not None and not self._owns(chunk.stream):
                continue
            try:
                chunk = self._validate(chunk)
            except PayloadError as err:  # counted as dead-lettered, no longer as accepted
                with self._lock:
                    self._accepted -= 1
                self._deadletter(self._client, received.topic, received.head, err, size=chunk.payload_bytes)
                continue
            if self._owned is not None and (self._holds or self._hold_requests):
                self._release_holds()
                hold = self._holds.get(chunk.stream)
                if hold is not None:
                    hold["chunks"].append(chunk)
                    self._release_holds()
                    continue
            self._window_safely(chunk)

    def _release_holds(self, force: bool = False) -> None:
        """Worker thread: take the hold requests and handovers given by :meth:`assign` and
        :meth:`handover`; window each held stream whose handover is known, whose hold time is
        over, or all of them (``force``, at stop)."""
        with self._lock:
            requests, self._hold_requests = self._hold_requests, {}
            handovers, self._handovers = self._handovers, {}
        for stream, until in requests.items():
            self._holds.setdefault(stream, {"chunks": [], "until": until})
        for stream, newest in handovers.items():
            if stream in self._holds:
                self._holds[stream]["newest"] = newest
        now = time.monotonic()
        for stream in [s for s, h in self._holds.items() if force or "newest" in h or now >= h["until"]]:
            hold = self._holds.pop(stream)
            newest = hold.get("newest")
            chunks = hold["chunks"]
            if newest is not None and chunks:
                self._newest_start[stream] = max(newest, self._newest_start.get(stream, newest))
                chunks = self._continue_at(stream, chunks, newest)
            elif "newest" not in hold:
                self._log_limited.log(logging.WARNING, f"handover:{stream}", "no handover of %s within the hold time; "
                                      "windowing it as a new stream", stream)
            for chunk in chunks:
                self._window_safely(chunk)

    def _continue_at(self, stream: str, chunks: list[Chunk], newest: int) -> list[Chunk]:
        """The held chunks of ``stream`` from the previous owner's next window start (the one
        after ``newest``) on: earlier chunks are skipped (counted windowed), the chunk across
        that start is cut there (same seq: the windower anchors the stream at it)."""
        sc = self.config.sensors.get(stream)
        if sc is None:
            return chunks
        fs = chunks[0].sample_rate_hz
        nxt = newest + round(sc.hop_samples * 1e9 / fs)
        out: list[Chunk] = []
        skipped = 0
        for c in chunks:
            end = c.ts_ns + round(c.samples.size * 1e9 / fs)
            if out or c.ts_ns >= nxt:
                out.append(c)
            elif end > nxt:
                k = round((nxt - c.ts_ns) * fs / 1e9)
                out.append(dataclasses.replace(c, ts_ns=c.ts_ns + round(k * 1e9 / fs), samples=c.samples[k:]))
            else:
                skipped += 1
        with self._lock:
            self._windowed += skipped
            if out and out[0].ts_ns <= nxt + round(1e9 / fs):
                self._handed_over += 1
        return out

    def _window_safely(self, chunk: Chunk) -> None:
        try:
            self._window_one(chunk)
        except Exception as exc:  # never let one chunk or stream stop the others
            self.errors.record("ingest-window", exc, chunk.stream)
            self._windowers.pop(chunk.stream, None)
            with self._lock:
                self._windowed += 1
            self._deadletter(self._client, waveform_topic(chunk.site, chunk.machine, chunk.sensor), b"",
                             PayloadError("internal_error", f"windowing failed: {exc!r}"[:200]), logged=True)

    def _owns(self, stream: str) -> bool:
        """Clustered: whether ``stream`` is owned; a chunk that is not is counted and dropped,
        and the windower of every stream lost since the last call is dropped (worker thread)."""
        with self._lock:
            owned = stream in self._owned  # type: ignore[operator]
            released, self._released = self._released, set()
            if not owned:
                self._accepted -= 1
                self._not_owned += 1
        for s in released:
            self._windowers.pop(s, None)
            hold = self._holds.pop(s, None)
            if hold is not None:  # lost again before its handover: its held chunks are another's
                with self._lock:
                    self._accepted -= len(hold["chunks"])
                    self._not_owned += len(hold["chunks"])
        return owned

    def _window_one(self, chunk: Chunk) -> None:
        windower = self._windowers.get(chunk.stream)
        if windower is None:
            windower = StreamWindower(chunk.site, chunk.machine, chunk.sensor, self._settings_for(chunk))
            self._windowers[chunk.stream] = windower
        result = windower.push(chunk)
        windows = result.windows
        newest = self._newest_start.get(chunk.stream)
        if newest is not None and windows and windows[0].start_ns <= newest:
            kept = tuple(w for w in windows if w.start_ns > newest)
            dropped = len(windows) - len(kept)
            windows = kept
            with self._lock:
                self._dropped["time_backwards"] += dropped
                self._events["time_backwards"] += 1
                st = self._streams.get(chunk.stream)
                if st is not None:
                    st["events"]["time_backwards"] += 1
            self._log_limited.log(logging.WARNING, f"time_backwards:{chunk.stream}",
                                  "event=time_backwards stream=%s seq=%d windows_dropped=%d behind_s=%.3f",
                                  chunk.stream, chunk.seq, dropped, (newest - result.windows[0].start_ns) / 1e9)
        if windows:
            self._newest_start[chunk.stream] = windows[-1].start_ns
        with self._lock:
            st = self._streams.setdefault(chunk.stream, {"chunks": 0, "samples": 0, "windows": 0, "last": None, "events": collections.Counter()})
            if result.event is not None:
                self._events[result.event] += 1
                st["events"][result.event] += 1
            if result.event != "duplicate":
                st["chunks"] += 1
                st["samples"] += chunk.samples.size
                st["last"] = windower.end_ns
            st["windows"] += len(windows)
        if result.event is not None:
            self._log_limited.log(logging.INFO, f"event:{chunk.stream}:{result.event}", "%s: %s at seq %d",
                                  chunk.stream, result.event, chunk.seq)
        for w in windows:
            self._emit(w)
        with self._lock:
            self._windowed += 1

    def _emit(self, window: Window) -> None:
        while not self._abort.is_set():
            try:
                self.windows.put(window, timeout=0.5)
            except queue.Full:
                continue
            with self._lock:
                self._n_windows += 1
            return

    # -- observation -----------------------------------------------------------------------
    def stats(self) -> IngestStats:
        """A consistent snapshot of every counter."""
        with self._lock:
            return IngestStats(
                received=self._received,
                accepted=self._accepted,
                windowed=self._windowed,
                windows=self._n_windows,
                deadletters=dict(self._deadletters),
                events={e: self._events.get(e, 0) for e in EVENTS},
                streams={
                    k: StreamStats(v["chunks"], v["samples"], v["windows"], v["last"], dict(v["events"]))
                    for k, v in self._streams.items()
                },
                chunk_queue_depth=self._chunks.qsize(),
                chunk_queue_high_water=self._high_water,
                window_queue_depth=self.windows.qsize(),
                connected=self._connected.is_set(),
                connects=self._connects,
                disconnects=self._disconnects,
                windows_dropped=dict(self._dropped),
                not_owned=self._not_owned,
                handed_over=self._handed_over,
                chunk_queue_bytes=getattr(self._chunks, "nbytes", 0),
                window_queue_bytes=getattr(self.windows, "nbytes", 0),
            )

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every accepted chunk has been windowed and emitted (for tests, tools)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._windowed >= self._accepted and self._chunks.qsize() == 0:
                    return True
            time.sleep(0.01)
        return False
