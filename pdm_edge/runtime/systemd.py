"""systemd integration: ``sd_notify`` (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``) over
``$NOTIFY_SOCKET`` and the watchdog period from ``$WATCHDOG_USEC``, without a dependency."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["sd_notify", "watchdog_interval_s"]

log = logging.getLogger(__name__)

def sd_notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's ``$NOTIFY_SOCKET`` (an AF_UNIX datagram
    socket; ``@name`` is the abstract namespace). Returns False when there is no socket or the
    send failed (never raises: notification is best effort)."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as exc:
        log.debug("sd_notify %s failed: %s", state, exc)
        return False


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of systemd's ``$WATCHDOG_USEC`` in seconds (how often to send ``WATCHDOG=1``), or
    ``None`` when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6
