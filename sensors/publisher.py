"""Publishing waveform chunks to MQTT: the common path of the simulator, file replay and drivers.

:class:`ChunkPublisher` publishes one stream (``pdm/v1/{site}/{machine}/{sensor}/waveform``) at
QoS 1 with consecutive sequence numbers, encoded by :func:`pdm_edge.ingest.chunk.encode_chunk`
(the one codec of the contract). paho keeps every unacknowledged QoS 1 message and sends it
again after a reconnect, so a broker restart loses nothing; the number of unacknowledged
messages is bounded (``max_unacked``) so a long outage blocks the publisher instead of growing
its memory without limit.

:func:`publish_recording` paces a :class:`~sample_data.loaders.Recording` (or any iterable
of timed segments) in real time, ``speed`` times faster, or as fast as the broker takes it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import paho.mqtt.client as mqtt

from pdm_edge import mqtt as mqtt_util
from pdm_edge.config import MqttConfig
from pdm_edge.errors import BrokerError
from pdm_edge.ingest.chunk import encode_chunk, waveform_topic

log = logging.getLogger(__name__)


class ChunkPublisher:
    """Publishes the waveform chunks of one sensor stream.

    Args:
        mqtt_cfg: broker settings (``[mqtt]`` of the configuration).
        site, machine, sensor: the stream's topic levels.
        sample_rate_hz: Hz, declared in every chunk.
        unit: ``"g"``, ``"m/s2"``, ``"Pa"`` or ``"FS"``.
        encoding: ``"float32"``, ``"int16"`` or ``"values"`` (see the chunk format).
        qos: 0 or 1.
        max_unacked: most QoS 1 chunks in flight before :meth:`publish` waits.
        first_seq: sequence number of the first chunk.
    """

    def __init__(
        self,
        mqtt_cfg: MqttConfig,
        site: str,
        machine: str,
        sensor: str,
        *,
        sample_rate_hz: float,
        unit: str,
        encoding: str = "float32",
        qos: int = 1,
        max_unacked: int = 1000,
        first_seq: int = 0,
        client_id: str | None = None,
    ) -> None:
        self.cfg = mqtt_cfg
        self.topic = waveform_topic(site, machine, sensor)
        self.sample_rate_hz = float(sample_rate_hz)
        self.unit = unit
        self.encoding = encoding
        self.qos = qos
        self.max_unacked = max_unacked
        self.seq = first_seq
        self.published = 0
        self.acks = mqtt_util.AckTracker()
        self._cond = self.acks.cond  # also guards the connection state below
        self._connected = False
        self._resending = False
        self.client = mqtt_util.make_client(mqtt_cfg, client_id or f"pub-{site}-{machine}-{sensor}", persistent=False)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object, properties: object) -> None:
        if getattr(reason_code, "is_failure", False):
            return
        with self._cond:
            self._connected = True
            # paho re-sends the unacknowledged chunks now; new ones wait until they are through,
            # or they could overtake them and arrive out of order
            self._resending = bool(self.acks.pending_count())
            self._cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object, properties: object) -> None:
        with self._cond:
            self._connected = False

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason_code: object, properties: object) -> None:
        with self._cond:
            self.acks.acked(mid)
            if not self.acks.pending_count():
                self._resending = False

    @property
    def unacked(self) -> int:
        """QoS 1 chunks published but not yet acknowledged by the broker."""
        return self.acks.unacked

    def start(self, timeout: float = 10.0) -> ChunkPublisher:
        """Connect; raises :class:`BrokerError` when the broker is not reachable within ``timeout`` s."""
        mqtt_util.connect(self.client, self.cfg, persistent=False)
        with self._cond:
            connected = self._cond.wait_for(lambda: self._connected, timeout)
        if not connected:
            self.client.loop_stop()
            raise BrokerError(f"cannot connect to MQTT broker {self.cfg.broker} within {timeout:g} s")
        return self

    def publish(self, samples: np.ndarray, ts_ns: int) -> int:
        """Publish one chunk starting at ``ts_ns`` (epoch ns); returns its sequence number.

        Blocks while the broker is unreachable, while chunks sent before a reconnect are being
        re-sent (so order is kept), and while ``max_unacked`` chunks are unacknowledged.
        """
        seq = self.seq
        payload = encode_chunk(samples, ts_ns=ts_ns, sample_rate_hz=self.sample_rate_hz, unit=self.unit, seq=seq, encoding=self.encoding)  # type: ignore[arg-type]
        if self.qos > 0:
            self.acks.wait_for(lambda: self._connected and not self._resending and self.acks.pending_count() < self.max_unacked)
        info = self.client.publish(self.topic, payload, qos=self.qos)
        if self.qos > 0:
            self.acks.sent(info.mid)
        self.seq += 1
        self.published += 1
        return seq

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every QoS 1 chunk is acknowledged by the broker; ``False`` on timeout."""
        return self.acks.flush(timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush, then disconnect. Returns whether everything was acknowledged."""
        ok = self.flush(timeout)
        if not ok:
            log.warning("%d chunk(s) on %s not acknowledged by the broker", self.unacked, self.topic)
        self.client.disconnect()
        self.client.loop_stop()
        return ok

    def __enter__(self) -> ChunkPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_chunks(segments: Iterable[tuple[int, np.ndarray]], sample_rate_hz: float, chunk_s: float) -> Iterator[tuple[int, np.ndarray]]:
    """Cut timed segments into chunks of ``chunk_s`` seconds.

    Args:
        segments: ``(start_ns, samples)`` pairs, samples of shape ``(n,)``.
        sample_rate_hz: Hz.
        chunk_s: chunk length in s (the last chunk of a segment may be shorter).

    Yields:
        ``(ts_ns, samples)`` of each chunk, ``ts_ns`` = time of its first sample.
    """
    step = max(1, round(chunk_s * sample_rate_hz))
    for start_ns, x in segments:
        for i in range(0, len(x), step):
            yield start_ns + round(i * 1e9 / sample_rate_hz), x[i:i + step]


def publish_timed(
    publisher: ChunkPublisher,
    chunks: Iterable[tuple[int, np.ndarray]],
    *,
    speed: float = 1.0,
    time_offset_ns: int = 0,
    stop: threading.Event | None = None,
    on_chunk: Callable[[int, int, np.ndarray], None] | None = None,
) -> int:
    """Publish timed chunks, paced by their timestamps.

    Args:
        publisher: a started :class:`ChunkPublisher`.
        chunks: ``(ts_ns, samples)`` in time order.
        speed: 1 = real time, 10 = ten times faster, ``math.inf`` = as fast as possible.
        time_offset_ns: added to every timestamp before publishing (e.g. to move a recording's
            clock to now); pacing uses the original spacing.
        stop: set it to end early.
        on_chunk: called after each publish with ``(seq, ts_ns, samples)``.

    Returns:
        the number of chunks published.
    """
    n = 0
    t0_wall = time.monotonic()
    t0_rec: int | None = None
    for ts_ns, x in chunks:
        if stop is not None and stop.is_set():
            break
        if t0_rec is None:
            t0_rec = ts_ns
        if math.isfinite(speed):
            due = t0_wall + (ts_ns - t0_rec) / 1e9 / speed
            delay = due - time.monotonic()
            if delay > 0:
                if stop is not None:
                    if stop.wait(delay):
                        break
                else:
                    time.sleep(delay)
        seq = publisher.publish(x, ts_ns + time_offset_ns)
        n += 1
        if on_chunk is not None:
            on_chunk(seq, ts_ns + time_offset_ns, x)
    return n
