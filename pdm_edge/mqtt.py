"""The one way pdm-edge builds and connects a paho-mqtt 2.x client.

Every component that talks MQTT (ingestion, publishers in ``sensors/``, later alerts) gets its
client from :func:`make_client` and connects with :func:`connect`, so protocol version,
persistent session, authentication, TLS and reconnect back-off are configured in one place.

Persistent session: with ``persistent=True`` the client has a fixed id and never starts clean
(MQTT 5: ``clean_start=False`` with a session-expiry interval; MQTT 3.1.1:
``clean_session=False``). The broker then keeps the subscription and queues QoS 1 messages
while the client is away, so a broker or appliance restart loses no QoS 1 chunk (with broker
persistence on, see ``deploy/mosquitto.conf``). Reconnection is paho's own: exponential back-off
between ``reconnect_min_s`` and ``reconnect_max_s``, in the network thread started by
``loop_start``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pdm_edge.config import MqttConfig
from pdm_edge.errors import BrokerError

log = logging.getLogger(__name__)

APPLIANCE_STATUS_TOPIC = "pdm/v1/_appliance/{id}/status"


def make_client(cfg: MqttConfig, client_id: str, *, persistent: bool = True) -> mqtt.Client:
    """Build (not connect) a paho client for ``cfg``.

    Args:
        cfg: the ``[mqtt]`` configuration.
        client_id: fixed client id; the broker keys the persistent session on it.
        persistent: keep the session across reconnects and restarts (see module docstring).

    Raises:
        BrokerError: when the TLS CA file cannot be loaded.
    """
    v5 = cfg.protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        reconnect_on_failure=True,
    )
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.tls:
        try:
            client.tls_set(ca_certs=cfg.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot load TLS CA file {cfg.ca_file!r}: {exc}") from None
    client.reconnect_delay_set(min_delay=max(1, round(cfg.reconnect_min_s)), max_delay=max(1, round(cfg.reconnect_max_s)))
    paho_log = logging.getLogger(f"paho.{client_id}")
    paho_log.addFilter(_drop_idle_loop_noise)
    client.enable_logger(paho_log)
    return client


def _drop_idle_loop_noise(record: logging.LogRecord) -> bool:
    # paho 2.2 logs "Client is not connected" at ERROR level whenever its network loop runs
    # one more turn after a clean disconnect; it is not an error.
    return not str(record.msg).startswith("Client is not connected")


def connect(client: mqtt.Client, cfg: MqttConfig, *, persistent: bool = True) -> None:
    """Start connecting in the background and start paho's network thread.

    Args:
        client: from :func:`make_client`, with its callbacks (and will) already set.
        cfg: the ``[mqtt]`` configuration.
        persistent: as given to :func:`make_client`.

    Returns at once; paho retries (first connection included) with back-off until it
    succeeds. Use ``on_connect`` to learn when it did.
    """
    kwargs: dict = {}
    if cfg.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry_s if persistent else 0
        kwargs = {"clean_start": not persistent, "properties": props}
    client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s, **kwargs)
    client.loop_start()


class AckTracker:
    """QoS 1 messages published but not yet acknowledged by the broker (PUBACK).

    Feed it ``sent(mid)`` after each ``client.publish`` and ``acked(mid)`` from paho's
    ``on_publish``. paho may acknowledge a message before ``publish()`` has even returned its
    id, so an early acknowledgement is remembered. It never calls into paho, so the network
    thread can always take its lock. ``cond`` may also guard the owner's own connection state,
    so one wait covers "connected, and fewer than N unacknowledged".
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._pending: set[int] = set()
        self._early: set[int] = set()

    def sent(self, mid: int) -> None:
        with self.cond:
            if mid in self._early:
                self._early.discard(mid)
            else:
                self._pending.add(mid)
            self.cond.notify_all()

    def acked(self, mid: int) -> None:
        with self.cond:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._early.add(mid)
            self.cond.notify_all()

    @property
    def unacked(self) -> int:
        with self.cond:
            return len(self._pending)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait (s) until ``predicate()`` holds; it is evaluated with ``cond`` held."""
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def pending_count(self) -> int:
        """Unacknowledged messages; call with ``cond`` held (inside a ``wait_for`` predicate)."""
        return len(self._pending)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything sent so far is acknowledged; ``False`` on timeout."""
        return self.wait_for(lambda: not self._pending, timeout)
