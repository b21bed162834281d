"""An in-process MQTT broker for the embedded demo (no system service, no root).

It runs amqtt (a maintained asyncio MQTT 3.1.1 broker) on its own event loop in a daemon
thread, listening on loopback. Clients must use ``protocol = "3.1.1"``. Sessions and retained
messages live in memory only: this broker is for the demo and for trying pdm-edge out; a plant
runs Mosquitto (``deploy/mosquitto.conf``), which persists sessions across restarts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from pdm_edge.errors import BrokerError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """An amqtt broker in a background thread.

    Args:
        host: address to listen on (loopback by default).
        port: TCP port; a free one is chosen when 0.

    Raises:
        BrokerError: from :meth:`start` when the broker cannot listen (port taken).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def address(self) -> str:
        """``HOST:PORT``, as the ``[mqtt] broker`` key takes it."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        from amqtt.broker import Broker

        # amqtt logs every connection at INFO; keep the demo's console readable
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        ready = threading.Event()
        error: list[BaseException] = []
        loop = asyncio.new_event_loop()

        async def _start() -> None:
            broker = Broker(
                {
                    "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 256}},
                    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
                },
                loop=loop,
            )
            await broker.start()
            self._broker = broker

        def _run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(_start())
            except BaseException as exc:  # reported to start()
                error.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=_run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or error:
            raise BrokerError(f"embedded MQTT broker could not listen on {self.address}: {error[0] if error else 'timeout'}")
        log.info("embedded MQTT broker listening on %s", self.address)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(timeout)
        except Exception as exc:  # shutting down anyway
            log.debug("embedded broker shutdown: %r", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
