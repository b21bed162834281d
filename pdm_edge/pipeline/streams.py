"""Each stream's lifecycle and calibration backlog, in one owner, with one event stream.

A sensor stream (``"site/machine/sensor"``) is in one of :data:`STATES`:

1. ``collecting``: no active model version yet; its windows are the machine's normal baseline
   and go to the learning side as replay candidates (:class:`~pdm_edge.pipeline.scoring.ReplayCandidates`).
2. ``calibrating``: the learning side has queued or started a job for a stream without a
   version; windows that arrive meanwhile wait in the stream's backlog (bounded in windows
   and, over all streams, in bytes; the oldest are dropped beyond it and counted).
3. ``scoring``: a model version is loaded; the backlog is scored first.
4. ``failed``: the initial calibration failed (the reason in :meth:`StreamTable.error`); its
   windows are collected again, and a new job (``pdm-edge models train``) calibrates it.

Decisions:

- **One owner**: :class:`StreamTable` is the only place that knows a stream's state; the
  scoring stage, the worker, ``/healthz`` and ``wait_idle`` ask it (a dict look-up under a
  lock, no SQL). Nobody asks the learning loop's job table per window.
- **Transitions come as data**: the scoring stage reports ``scoring`` when it swaps a version
  in; the learning side's events (``queued``, ``training``, ``failed``, ``rejected``, ...) are
  consumed by :meth:`StreamTable.on_learning_event`; at start the table is seeded once from the
  job table (:meth:`StreamTable.seed`). A learning event never demotes a scoring stream (a
  retrain of a calibrated stream leaves it scoring).
- **One event stream**: every change of state is a :class:`StreamEvent`, given to the
  listeners (:meth:`StreamTable.subscribe`) in the thread that made the change.

Thread-safe.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable

from pdm_edge.types import Window

__all__ = ["STATES", "StreamEvent", "StreamTable"]

log = logging.getLogger(__name__)

STATES = ("collecting", "calibrating", "scoring", "failed")
"""Every state of a stream (``"unknown"`` is answered for a stream never seen)."""

# learning-loop event -> the state of a stream that is not scoring yet
_LEARNING_STATES = {"queued": "calibrating", "training": "calibrating", "failed": "failed",
                    "rejected": "collecting", "awaiting_confirmation": "collecting"}


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """A change of a stream's state.

    Attributes:
        stream: ``"site/machine/sensor"``.
        state: the new state (one of :data:`STATES`).
        previous: the state before (``None`` for a stream seen for the first time).
        detail: why (a failed calibration's reason, a model version id, ...).
    """

    stream: str
    state: str
    previous: str | None
    detail: str = ""


@dataclasses.dataclass
class _Entry:
    state: str = "collecting"
    detail: str = ""
    backlog: collections.deque[Window] = dataclasses.field(default_factory=collections.deque)
    dropped: int = 0


class StreamTable:
    """The state and backlog of every stream (see the module docstring).

    Args:
        max_backlog: windows kept per stream while it waits (oldest dropped beyond it).
        max_backlog_bytes: bytes of samples kept in all backlogs together; beyond it the oldest
            windows of the stream being added to are dropped (counted in :attr:`dropped_backlog`).
    """

    def __init__(self, *, max_backlog: int = 10_000, max_backlog_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self._entries: dict[str, _Entry] = {}
        self._backlog_bytes = 0
        self._lock = threading.RLock()
        self._listeners: list[Callable[[StreamEvent], None]] = []

    # -- events ------------------------------------------------------------------------------
    def subscribe(self, fn: Callable[[StreamEvent], None]) -> Callable[[], None]:
        """Call ``fn(event)`` on every change of state (in the changing thread; keep it quick,
        an exception is logged and ignored). Returns a function that unsubscribes."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _emit(self, ev: StreamEvent) -> None:
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception:
                log.exception("stream event listener failed on %s", ev)

    # -- state -------------------------------------------------------------------------------
    def state(self, stream: str) -> str:
        """The stream's state, or ``"unknown"`` for a stream never seen."""
        e = self._entries.get(stream)
        return e.state if e is not None else "unknown"

    def states(self) -> dict[str, str]:
        """``{stream: state}`` of every stream seen."""
        with self._lock:
            return {s: e.state for s, e in self._entries.items()}

    def error(self, stream: str) -> str | None:
        """Why the stream's calibration failed, while it is ``failed``; else ``None``."""
        e = self._entries.get(stream)
        return e.detail if e is not None and e.state == "failed" else None

    def ensure(self, stream: str) -> str:
        """Register ``stream`` (``collecting``) if it is new; returns its state."""
        with self._lock:
            if stream in self._entries:
                return self._entries[stream].state
            self._entries[stream] = _Entry()
        self._emit(StreamEvent(stream, "collecting", None))
        return "collecting"

    def set_state(self, stream: str, state: str, detail: str = "") -> bool:
        """Move ``stream`` to ``state`` (registering it if new); True when that changed it.

        Raises:
            ValueError: ``state`` is not one of :data:`STATES`.
        """
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        with self._lock:
            e = self._entries.get(stream)
            previous = e.state if e is not None else None
            if e is None:
                e = self._entries[stream] = _Entry(state)
            elif e.state == state:
                e.detail = detail or e.detail
                return False
            e.state, e.detail = state, detail
        self._emit(StreamEvent(stream, state, previous, detail))
        return True

    def on_learning_event(self, stream: str, event: str, version: str = "", detail: str = "") -> None:
        """Consume one event of the learning loop (``on_event(stream, event, version,
        detail)``): a job queued or started for a stream that is not scoring makes it
        ``calibrating``; a failed one ``failed``; a rejected one ``collecting`` again. Other
        events, and every event of a scoring stream, change nothing."""
        new = _LEARNING_STATES.get(event)
        if new is None or self.state(stream) == "scoring":
            return
        self.set_state(stream, new, detail)

    def seed(self, pending: Iterable[str], failed: Iterable[tuple[str, str]]) -> None:
        """Start from what the job table says once, at start: streams without a version whose
        job is queued or running (``calibrating``) and whose initial calibration failed
        (``(stream, reason)``, ``failed``)."""
        for stream, why in failed:
            self.set_state(stream, "failed", why)
        for stream in pending:
            self.set_state(stream, "calibrating")

    # -- backlog -----------------------------------------------------------------------------
    def hold(self, stream: str, windows: list[Window]) -> int:
        """Keep ``windows`` (time order) in the stream's backlog; returns how many of its oldest
        windows were dropped to stay within the bounds."""
        with self._lock:
            e = self._entries.setdefault(stream, _Entry())
            e.backlog.extend(windows)
            self._backlog_bytes += sum(w.samples.nbytes for w in windows)
            dropped = 0
            while e.backlog and (len(e.backlog) > self.max_backlog or self._backlog_bytes > self.max_backlog_bytes):
                self._backlog_bytes -= e.backlog.popleft().samples.nbytes
                dropped += 1
            e.dropped += dropped
            return dropped

    def take_backlog(self, stream: str) -> list[Window]:
        """Remove and return the stream's backlog (oldest first)."""
        with self._lock:
            e = self._entries.get(stream)
            if e is None or not e.backlog:
                return []
            out = list(e.backlog)
            e.backlog.clear()
            self._backlog_bytes -= sum(w.samples.nbytes for w in out)
            return out

    def drop_backlog(self, stream: str) -> int:
        """Drop the stream's backlog (nothing can score it); returns how many windows (counted)."""
        n = len(self.take_backlog(stream))
        if n:
            with self._lock:
                self._entries[stream].dropped += n
        return n

    def backlogged(self) -> dict[str, str]:
        """``{stream: state}`` of the streams that hold a backlog."""
        with self._lock:
            return {s: e.state for s, e in self._entries.items() if e.backlog}

    def busy(self) -> list[str]:
        """Streams that are calibrating or hold a backlog (``wait_idle`` waits for them)."""
        with self._lock:
            return sorted(s for s, e in self._entries.items() if e.backlog or e.state == "calibrating")

    def calibrating(self) -> list[str]:
        """Streams that are calibrating."""
        with self._lock:
            return sorted(s for s, e in self._entries.items() if e.state == "calibrating")

    @property
    def backlog_bytes(self) -> int:
        """Bytes of samples held in all backlogs now."""
        with self._lock:
            return self._backlog_bytes

    @property
    def dropped_backlog(self) -> int:
        """Backlog windows dropped so far (bounds, or a failed calibration), all streams."""
        with self._lock:
            return sum(e.dropped for e in self._entries.values())
