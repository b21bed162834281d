"""Supervised worker threads and rate-limited error logs (issue 15: a stage that fails is visible
and recovers; one malformed message is not a traceback per message).

Decisions:

- **A stage never dies of one item.** Each worker loop (``ingest-window``, ``score-worker``,
  ``spool-writer``) catches an exception around the item it was handling, records it in a
  :class:`StageErrors` (per stage: count, last error, its stream) and goes on with the next
  item; the item's fate is the stage's decision (a chunk is dead-lettered as ``internal_error``,
  a spool record goes to the dead-letter table). The queues are separate objects, so nothing
  that is queued is lost.
- **A loop that ends by an exception is restarted** by :func:`run_supervised` after a short,
  doubling pause (0.1 s .. 5 s), counted as a restart of the stage.
- **Health**: :meth:`StageErrors.reasons` gives one line per stage that failed within the last
  ``recent_s`` seconds (default 300); the service adds them to ``/healthz`` (status
  ``degraded``) and exports the counts as ``pdm_edge_stage_errors_total{stage}`` and
  ``pdm_edge_stage_restarts_total{stage}``.
- **Logs**: :class:`RateLimitedLog` writes the first occurrence of a key (a dead-letter reason, a
  stage) with its traceback, then at most one line per key every ``interval_s`` seconds that
  says how many were suppressed, so a flood of bad messages costs a few lines, not megabytes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RECENT_S = 300.0
"""How long (s) a stage error keeps ``/healthz`` degraded."""


class RateLimitedLog:
    """Log at most one record per key every ``interval_s`` seconds (the first one at once).

    Args:
        logger: where records go.
        interval_s: the smallest time between two records of one key, seconds.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self.logger = logger
        self.interval_s = float(interval_s)
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._seen: set[str] = set()

    def log(self, level: int, key: str, msg: str, *args: Any, exc_info: Any = None) -> bool:
        """Log ``msg % args`` under ``key`` unless one was logged less than ``interval_s`` ago.
        The traceback (``exc_info``) is only attached to the first record of a key. Returns
        whether a record was written."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] += 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
            first = key not in self._seen
            self._seen.add(key)
        if suppressed:
            msg = f"{msg} (and {suppressed} more like it in the last {self.interval_s:g} s)"
        self.logger.log(level, msg, *args, exc_info=exc_info if first else None)
        return True


@dataclasses.dataclass(frozen=True)
class StageError:
    """The last error of one stage: when (monotonic s), which stream (or None), what."""

    at: float
    stream: str | None
    message: str


class StageErrors:
    """Error and restart counts of supervised stages, and their last error (thread-safe)."""

    def __init__(self, logger: logging.Logger | None = None, log_interval_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._errors: collections.Counter[str] = collections.Counter()
        self._restarts: collections.Counter[str] = collections.Counter()
        self._last: dict[str, StageError] = {}
        self._log = RateLimitedLog(logger or log, log_interval_s)

    def record(self, stage: str, exc: BaseException, stream: str | None = None, *, restart: bool = False) -> None:
        """Count one error of ``stage`` (about ``stream``), remember it, log it (rate-limited;
        the first with its traceback)."""
        msg = f"{type(exc).__name__}: {exc}"[:300]
        with self._lock:
            self._errors[stage] += 1
            if restart:
                self._restarts[stage] += 1
            self._last[stage] = StageError(time.monotonic(), stream, msg)
            n = self._errors[stage]
        self._log.log(logging.ERROR, stage, "event=stage_error stage=%s stream=%s errors=%d restart=%s error=%r",
                      stage, stream, n, restart, msg, exc_info=exc)

    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._restarts)

    def last(self) -> dict[str, StageError]:
        with self._lock:
            return dict(self._last)

    def reasons(self, recent_s: float = RECENT_S) -> list[str]:
        """One line per stage whose last error is younger than ``recent_s`` seconds."""
        now = time.monotonic()
        out = []
        with self._lock:
            for stage, e in sorted(self._last.items()):
                if now - e.at <= recent_s:
                    where = f" on {e.stream}" if e.stream else ""
                    out.append(f"stage {stage} failed {self._errors[stage]} time(s), last {now - e.at:.0f} s ago{where}: "
                               f"{e.message[:160]}")
        return out


def run_supervised(stage: str, loop: Callable[[], None], errors: StageErrors, *,
                   stopped: Callable[[], bool] = lambda: False) -> None:
    """Run ``loop`` until it returns; when it raises, record the error, wait (0.1 s doubling
    to 5 s) and run it again, unless ``stopped()``. For the body of a worker thread."""
    delay = 0.1
    while True:
        try:
            loop()
            return
        except Exception as exc:
            errors.record(stage, exc, restart=True)
            if stopped():
                return
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
