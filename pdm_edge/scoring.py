"""The scoring stage: windows -> the stream's active model version -> scores; hot-swapped.

Each sensor stream is in one of these states:

1. **collecting**: the stream has no active model version yet. Its windows are the machine's
   normal baseline (the appliance is commissioned on a healthy machine): their feature images
   go to the learning loop's replay buffer and are not scored. Once ``[learning]
   calibration_s`` seconds are in, the loop queues the initial calibration.
2. **calibrating**: that job is queued or running (in the learning loop's low-priority thread,
   so ingestion never stalls). Windows that arrive meanwhile wait in a bounded backlog and are
   scored as soon as the first version is active.
3. **scoring**: every window gets a :class:`~pdm_edge.types.Score` with the threshold and the
   model version id of the stream's active version. Windows that score at or below threshold,
   with no window above it among the last ``alert_n``, are offered to the replay buffer as
   normal (the reservoir keeps a uniform sample of them).
4. **failed**: the initial calibration failed (the reason is in :meth:`ScoringStage.error`);
   ``pdm-edge models train`` retries it.

A stream that is not calibrated produces no score (its machine reports "uncalibrated");
pdm-edge does not guess.

**Hot swap.** The stage follows the registry: a promotion or rollback in this process reaches
it through :meth:`~pdm_edge.registry.Registry.on_change`; one made by another process (the
command line, the dashboard) is seen by a check of the active version every ``refresh_s``
seconds. The new version is loaded first and then swapped in under the stage's lock between two
batches, so no window is dropped or scored twice; every score names the version that made it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from pdm_edge.errors import PdmEdgeError, StoreError
from pdm_edge.learning.loop import LearningLoop
from pdm_edge.model.scorer import Scorer
from pdm_edge.registry import RegisteredVersion
from pdm_edge.supervision import RateLimitedLog
from pdm_edge.types import FaultMatch, Score, Window

log = logging.getLogger(__name__)
_replay_log = RateLimitedLog(log, 60.0)


@dataclasses.dataclass
class _Stream:
    name: str
    scorer: Scorer | None = None
    version: str | None = None
    checked: float = 0.0
    backlog: collections.deque[Window] = dataclasses.field(default_factory=collections.deque)
    recent_above: collections.deque[bool] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=5))
    dropped_backlog: int = 0


class ScoringStage:
    """Scores windows of many streams with their registry's active model versions.

    Args:
        loop: the learning loop (its registry, encoder and replay buffer).
        max_backlog: windows kept per stream while it calibrates (oldest dropped beyond it,
            counted in :attr:`dropped_backlog`).
        max_backlog_bytes: bytes of samples kept in the backlogs of all streams together
            (issue 15: 16 streams calibrating one after the other must not hold gigabytes);
            beyond it the oldest windows of the stream being added to are dropped (counted).
        refresh_s: how often the active version is checked for changes made by other
            processes, seconds.
        on_swap: called with ``(stream, version id)`` after a new version is swapped in.
    """

    def __init__(self, loop: LearningLoop, *, max_backlog: int = 10_000, refresh_s: float = 2.0,
                 on_swap: Callable[[str, str], None] | None = None, max_backlog_bytes: int = 32 * 1024 * 1024) -> None:
        self.loop = loop
        self.registry = loop.registry
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self._backlog_bytes = 0
        self.refresh_s = refresh_s
        self.on_swap = on_swap
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.RLock()
        self._unsubscribe = self.registry.on_change(self._on_change)

    # -- state ---------------------------------------------------------------------------------
    def state(self, stream: str) -> str:
        """``"collecting"``, ``"calibrating"``, ``"scoring"``, ``"failed"`` or ``"unknown"``."""
        with self._lock:
            st = self._streams.get(stream)
            if st is None:
                return "unknown"
            if st.scorer is not None:
                return "scoring"
        if self.loop.has_job(stream, ("queued", "running")):
            return "calibrating"
        if self.loop.has_job(stream, ("failed",), "initial"):
            return "failed"
        return "collecting"

    def error(self, stream: str) -> str | None:
        """Why the stream's last initial calibration failed, or ``None``."""
        failed = [j for j in self.loop.jobs(stream, 5) if j.status == "failed" and j.trigger == "initial"]
        return failed[0].detail if failed and self.state(stream) == "failed" else None

    def version(self, stream: str) -> str | None:
        """The id of the model version scoring the stream, or ``None``."""
        with self._lock:
            st = self._streams.get(stream)
            return st.version if st else None

    def streams(self) -> dict[str, str]:
        """``{stream: state}`` of every stream seen."""
        with self._lock:
            names = list(self._streams)
        return {s: self.state(s) for s in names}

    @property
    def backlog_bytes(self) -> int:
        """Bytes of samples held in the calibration backlogs now."""
        with self._lock:
            return self._backlog_bytes

    @property
    def dropped_backlog(self) -> int:
        with self._lock:
            return sum(st.dropped_backlog for st in self._streams.values())

    # -- swapping --------------------------------------------------------------------------------
    def _load(self, st: _Stream, rec: RegisteredVersion | None) -> None:
        if rec is None or rec.id == st.version:
            return
        scorer = self.registry.load(rec.id, self.loop.encoder, self.loop.sha)  # loaded outside the swap
        with self._lock:
            st.scorer, st.version = scorer, rec.id
        log.info("%s: model version %s active", st.name, rec.id)
        if self.on_swap is not None:
            self.on_swap(st.name, rec.id)

    def _on_change(self, rec: RegisteredVersion) -> None:
        with self._lock:
            st = self._streams.get(rec.stream)
        if st is not None:
            try:
                self._load(st, rec)
            except PdmEdgeError as exc:
                log.error("%s: could not load model version %s: %s", rec.stream, rec.id, exc)

    def _refresh(self, st: _Stream) -> None:
        now = time.monotonic()
        if now - st.checked < self.refresh_s:
            return
        st.checked = now
        try:
            self._load(st, self.registry.active(*st.name.split("/")))
        except PdmEdgeError as exc:
            log.error("%s: could not load the active model version: %s", st.name, exc)

    # -- scoring -----------------------------------------------------------------------------------
    def handle(self, window: Window) -> list[tuple[Window, Score]]:
        """:meth:`handle_many` of one window."""
        return self.handle_many([window])

    def handle_many(self, windows: list[Window]) -> list[tuple[Window, Score]]:
        """Feed windows (any streams, each stream in time order); returns the ``(window, score)``
        pairs now ready, per stream in order: none while a stream collects or calibrates, its
        backlog too once its first version is active.

        Raises:
            StoreError: the replay buffer refused a write (the windows were still scored).
        """
        by_stream: dict[str, list[Window]] = {}
        for w in windows:
            by_stream.setdefault(w.stream, []).append(w)
        out: list[tuple[Window, Score]] = []
        for name, ws in by_stream.items():
            with self._lock:
                st = self._streams.get(name)
                if st is None:
                    st = self._streams[name] = _Stream(name)
            self._refresh(st)
            out += self._handle_stream(st, ws)
        return out

    def _handle_stream(self, st: _Stream, ws: list[Window]) -> list[tuple[Window, Score]]:
        with self._lock:
            scorer, version = st.scorer, st.version
            if scorer is None:
                calibrating = self.loop.has_job(st.name, ("queued", "running"))
                if calibrating:
                    st.backlog.extend(ws)
                    self._backlog_bytes += sum(w.samples.nbytes for w in ws)
                    while st.backlog and (len(st.backlog) > self.max_backlog
                                          or self._backlog_bytes > self.max_backlog_bytes):
                        self._backlog_bytes -= st.backlog.popleft().samples.nbytes
                        st.dropped_backlog += 1
                    return []
            else:
                ready = list(st.backlog) + ws
                self._backlog_bytes -= sum(w.samples.nbytes for w in st.backlog)
                st.backlog.clear()
        if scorer is None:
            tmpl = self.loop.template(st.name, ws[0])
            if tmpl is None:
                return []
            # collect up to and including the first window at calibration_s after the stream's
            # first one (it triggers the calibration); later windows of the batch wait for it
            span = self.loop.replay.span(st.name)
            first = span[1] if span is not None else ws[0].start_ns
            cut = len(ws)
            for i, w in enumerate(ws):
                if (w.start_ns - first) / 1e9 >= self.loop.calibration_s:
                    cut = i + 1
                    break
            self.loop.offer(st.name, [w.start_ns for w in ws[:cut]], tmpl.features(ws[:cut]), collecting=True)
            if cut < len(ws):
                return self._handle_stream(st, ws[cut:])
            return []
        feats = scorer.features(ready)
        scores = scorer.score_features(feats)
        thr = float(scorer.threshold)  # type: ignore[arg-type]
        normal = []
        if st.recent_above.maxlen != scorer.config.alert_n:
            st.recent_above = collections.deque(st.recent_above, maxlen=scorer.config.alert_n)
        for s in scores:
            above = bool(s > thr)
            st.recent_above.append(above)
            normal.append(not any(st.recent_above))
        idx = np.flatnonzero(normal)
        if len(idx):
            try:  # the replay buffer is for later trainings: a full disk must not cost the scores
                self.loop.offer(st.name, [ready[i].start_ns for i in idx], feats[idx])
            except StoreError as exc:
                _replay_log.log(logging.WARNING, st.name, "event=replay_offer_failed stream=%s windows=%d error=%r",
                                st.name, len(idx), str(exc)[:200])
        matches: list[FaultMatch | None] = [None] * len(ready)
        above = np.flatnonzero(scores > thr)
        if len(above) and scorer.fault_events:  # name the confirmed fault an anomalous window looks like
            for i, m in zip(above, scorer.nearest_fault_features(feats[above])):
                matches[i] = m
        return [(w, Score(w.site, w.machine, w.sensor, w.start_ns, float(s), thr, bool(s > thr), version, m))
                for w, s, m in zip(ready, scores, matches)]

    def drain(self, timeout: float = 600.0) -> list[tuple[Window, Score]]:
        """Wait (up to ``timeout`` s) until no stream with a backlog is calibrating, then score
        every backlog (at the end of a replay)."""
        deadline = time.monotonic() + timeout
        out: list[tuple[Window, Score]] = []
        while True:
            with self._lock:
                waiting = [st for st in self._streams.values() if st.backlog]
            if not waiting:
                return out
            for st in waiting:
                st.checked = 0.0
                self._refresh(st)
                if st.scorer is not None:
                    out += self._handle_stream(st, [])
                elif not self.loop.has_job(st.name, ("queued", "running")):
                    with self._lock:
                        self._backlog_bytes -= sum(w.samples.nbytes for w in st.backlog)
                        st.dropped_backlog += len(st.backlog)
                        st.backlog.clear()  # calibration failed: nothing can score them (counted)
            if time.monotonic() > deadline:
                return out
            time.sleep(0.2)

    def close(self) -> None:
        self._unsubscribe()
