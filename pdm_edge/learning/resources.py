"""When the machine may train: CPU load, CPU temperature and battery, read through psutil.

Training an adapter takes a core for tens of seconds; on an appliance that also scores, on a
fanless box in a hot cabinet or on battery power that is not always welcome. A
:class:`ResourceGuard` answers two questions from :class:`ResourceLimits` (``[learning]``):

- :meth:`ResourceGuard.why_not_start`: may a queued job start now? (``None``: yes, else the
  reason);
- :meth:`ResourceGuard.why_pause`: must a running job pause? The training loop polls it before
  every batch; a job that pauses writes its checkpoint and is queued again, and resumes from it
  once :meth:`~ResourceGuard.why_not_start` says yes (:mod:`pdm_edge.learning.loop`).

Readings (:func:`read_resources`, psutil): the 1-minute load average per CPU
(``psutil.getloadavg``), the hottest current CPU/SoC temperature in deg C
(``psutil.sensors_temperatures``; Linux, BSD), and the battery's charge and whether it is
discharging (``psutil.sensors_battery``). A sensor the machine does not have reads ``None``;
``when_sensor_absent`` says whether its limit is then ignored (default) or blocks training.
The reader is a plain function so that a drill can stand in for the one reading a test cannot
produce (heat).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import psutil

__all__ = ["ResourceGuard", "ResourceLimits", "Resources", "read_resources"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Resources:
    """One reading; ``None`` where the machine has no such sensor."""

    load_per_cpu: float | None
    """1-minute load average divided by the logical CPU count."""
    cpu_temp_c: float | None
    """Hottest current temperature among the CPU/SoC sensors, deg C."""
    battery_percent: float | None
    on_battery: bool | None
    """True when running from the battery (not plugged in)."""


def read_resources() -> Resources:
    """Read load, CPU temperature and battery through psutil (see the module docstring)."""
    try:
        load: float | None = psutil.getloadavg()[0] / (psutil.cpu_count() or 1)
    except (OSError, AttributeError):
        load = None
    temp = None
    temps = getattr(psutil, "sensors_temperatures", lambda: {})() or {}
    currents = [t.current for entries in temps.values() for t in entries if t.current is not None]
    if currents:
        temp = float(max(currents))
    bat = getattr(psutil, "sensors_battery", lambda: None)()
    return Resources(load, temp, None if bat is None else float(bat.percent), None if bat is None else not bat.power_plugged)


@dataclasses.dataclass(frozen=True)
class ResourceLimits:
    """Limits of ``[learning]`` (0 turns a limit off).

    Attributes:
        max_load_start: a job starts only below this 1-minute load per CPU.
        max_load_pause: a running job pauses above it (the job's own thread adds up to
            ``1 / CPUs``, so keep it above ``max_load_start`` by at least that).
        max_cpu_temp_c: no start, and a pause, at or above this CPU temperature, deg C.
        min_battery_percent: on battery power, no start and a pause below this charge.
        train_on_battery: False: no training at all while on battery power.
        when_sensor_absent: ``"ignore"`` (a limit whose sensor is missing is not checked) or
            ``"block"`` (no training without it).
    """

    max_load_start: float = 0.0
    max_load_pause: float = 0.0
    max_cpu_temp_c: float = 85.0
    min_battery_percent: float = 20.0
    train_on_battery: bool = True
    when_sensor_absent: str = "ignore"

    def __post_init__(self) -> None:
        if self.when_sensor_absent not in ("ignore", "block"):
            raise ValueError(f"when_sensor_absent must be 'ignore' or 'block', got {self.when_sensor_absent!r}")


class ResourceGuard:
    """Start and pause decisions from :class:`ResourceLimits` and a reader.

    Args:
        limits: the limits.
        reader: returns a :class:`Resources` (default :func:`read_resources`).
        min_interval_s: a pause check reads at most this often (the last answer is reused in
            between), so polling before every batch costs nothing.
    """

    def __init__(self, limits: ResourceLimits, reader: Callable[[], Resources] = read_resources,
                 min_interval_s: float = 1.0) -> None:
        self.limits, self.reader, self.min_interval_s = limits, reader, min_interval_s
        self._last: tuple[float, str | None] | None = None
        self._absent_logged: set[str] = set()

    def why_not_start(self) -> str | None:
        """None when a job may start now, else the reason (one line)."""
        return self._check(self.reader(), self.limits.max_load_start)

    def why_pause(self) -> str | None:
        """None when a running job may go on, else the reason (one line)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.min_interval_s:
            return self._last[1]
        why = self._check(self.reader(), self.limits.max_load_pause)
        self._last = (now, why)
        return why

    def _absent(self, what: str) -> str | None:
        if self.limits.when_sensor_absent == "block":
            return f"no {what} reading and [learning] when_sensor_absent = \"block\""
        if what not in self._absent_logged:
            self._absent_logged.add(what)
            log.info("no %s reading on this machine: its training limit is not checked", what)
        return None

    def _check(self, r: Resources, max_load: float) -> str | None:
        lim = self.limits
        if max_load > 0:
            if r.load_per_cpu is None:
                if (why := self._absent("load")) is not None:
                    return why
            elif r.load_per_cpu >= max_load:
                return f"load {r.load_per_cpu:.2f} per CPU >= {max_load:g}"
        if lim.max_cpu_temp_c > 0:
            if r.cpu_temp_c is None:
                if (why := self._absent("CPU temperature")) is not None:
                    return why
            elif r.cpu_temp_c >= lim.max_cpu_temp_c:
                return f"CPU temperature {r.cpu_temp_c:.1f} C >= {lim.max_cpu_temp_c:g} C"
        if r.on_battery:
            if not lim.train_on_battery:
                return "on battery power"
            if lim.min_battery_percent > 0 and r.battery_percent is not None and r.battery_percent < lim.min_battery_percent:
                return f"battery {r.battery_percent:.0f} % < {lim.min_battery_percent:g} %"
        return None
