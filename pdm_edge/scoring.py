"""The scoring stage: windows -> per-stream scorer (calibrate on the machine's own data) -> scores.

Each sensor stream goes through three states:

1. **collecting**: the first ``calibration_s`` seconds of windows are the machine's baseline
   (the appliance is installed on a healthy machine); they are kept and not scored.
2. **calibrating**: the stream's :class:`~pdm_edge.model.scorer.Scorer` is calibrated in a
   background thread (adapter training takes seconds), so ingestion never stalls; windows that
   arrive meanwhile wait in a bounded backlog and are scored as soon as it is done.
3. **scoring**: every window gets a :class:`~pdm_edge.types.Score` with the threshold and
   model version of the stream's scorer.

A stream that is not calibrated yet produces no score (its machine reports "uncalibrated");
pdm-edge does not guess. The model version id is ``"{stream}@{calibration end ns}"`` until the
registry (on-device learning) names versions.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable

from pdm_edge.errors import PdmEdgeError
from pdm_edge.model.encoder import Encoder
from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
from pdm_edge.types import Score, Window

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Stream:
    scorer: Scorer
    state: str = "collecting"  # collecting | calibrating | scoring | failed
    first_ns: int | None = None
    version: str | None = None
    backlog: collections.deque[Window] = dataclasses.field(default_factory=collections.deque)
    error: str | None = None


class ScoringStage:
    """Scores windows of many streams, calibrating each stream on its first windows.

    Args:
        encoder, encoder_sha256: the frozen encoder (shared by all streams).
        calibration_s: seconds of each stream's windows used as its normal baseline.
        train: adapter training settings for calibration.
        hop_s: the hop (s) of a window's stream, for the threshold's false-alert rate per hour;
            half the window length when None.
        on_event: called with ``(stream, event, detail)`` for ``"calibrated"`` / ``"failed"``.
        max_backlog: windows kept per stream while it calibrates (oldest dropped beyond it).
    """

    def __init__(self, encoder: Encoder, encoder_sha256: str, *, calibration_s: float, train: TrainConfig | None = None,
                 hop_s: Callable[[Window], float] | None = None,
                 on_event: Callable[[str, str, str], None] | None = None, max_backlog: int = 10_000) -> None:
        self.encoder, self.sha = encoder, encoder_sha256
        self.hop_s = hop_s or (lambda w: w.duration_s / 2)
        self.calibration_s = calibration_s
        self.train = train or TrainConfig()
        self.on_event = on_event
        self.max_backlog = max_backlog
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def state(self, stream: str) -> str:
        """``"collecting"``, ``"calibrating"``, ``"scoring"``, ``"failed"`` or ``"unknown"``."""
        with self._lock:
            s = self._streams.get(stream)
            return s.state if s else "unknown"

    def version(self, stream: str) -> str | None:
        """The model version id of a stream once its calibration has started, else ``None``."""
        with self._lock:
            st = self._streams.get(stream)
            return st.version if st else None

    def handle(self, window: Window) -> list[tuple[Window, Score]]:
        """Feed one window; returns the (window, score) pairs now ready (none while the stream
        collects or calibrates; the backlog too once calibration has finished)."""
        with self._lock:
            st = self._streams.get(window.stream)
            if st is None:
                cfg = ScorerConfig(kind=window.kind, sample_rate_hz=window.sample_rate_hz, hop_s=self.hop_s(window),
                                   train=self.train, min_windows=10)
                st = self._streams[window.stream] = _Stream(Scorer(self.encoder, self.sha, cfg))
            if st.state == "collecting":
                st.scorer.learn_one(window)
                if st.first_ns is None:
                    st.first_ns = window.start_ns
                covered_s = (window.end_ns - st.first_ns) / 1e9
                if covered_s >= self.calibration_s and st.scorer.n_normal >= st.scorer.config.min_windows:
                    st.state = "calibrating"
                    st.version = f"{window.stream}@{window.end_ns}"
                    t = threading.Thread(target=self._calibrate, args=(window.stream, st), name=f"calibrate-{window.stream}", daemon=True)
                    self._threads.append(t)
                    t.start()
                return []
            if st.state in ("calibrating",):
                st.backlog.append(window)
                while len(st.backlog) > self.max_backlog:
                    st.backlog.popleft()
                return []
            if st.state == "failed":
                return []
            ready = list(st.backlog) + [window]
            st.backlog.clear()
        return self._score(st, ready)

    @staticmethod
    def _score(st: _Stream, windows: list[Window]) -> list[tuple[Window, Score]]:
        thr = st.scorer.threshold
        assert thr is not None
        return [(w, Score(w.site, w.machine, w.sensor, w.start_ns, float(s), thr, bool(s > thr), st.version))
                for w, s in zip(windows, st.scorer.score_many(windows))]

    def handle_many(self, windows: list[Window]) -> list[tuple[Window, Score]]:
        """:meth:`handle` for each window, in order."""
        return [pair for w in windows for pair in self.handle(w)]

    def _calibrate(self, stream: str, st: _Stream) -> None:
        try:
            info = st.scorer.calibrate()
        except PdmEdgeError as exc:
            log.error("%s: calibration failed: %s", stream, exc)
            with self._lock:
                st.state, st.error = "failed", str(exc)
            if self.on_event:
                self.on_event(stream, "failed", str(exc))
            return
        with self._lock:
            st.state = "scoring"
        detail = (f"{info['windows']} windows, adapter {info['adapter_epochs']} epochs in {info['train_seconds']:.1f} s, "
                  f"threshold {info['threshold']:.2f}")
        log.info("%s calibrated: %s", stream, detail)
        if self.on_event:
            self.on_event(stream, "calibrated", detail)

    def drain(self) -> list[tuple[Window, Score]]:
        """Wait for running calibrations and score every backlog (at the end of a replay)."""
        for t in list(self._threads):
            t.join()
        out: list[tuple[Window, Score]] = []
        with self._lock:
            pending = [(st, list(st.backlog)) for st in self._streams.values() if st.state == "scoring" and st.backlog]
            for st, _ in pending:
                st.backlog.clear()
        for st, ws in pending:
            out += self._score(st, ws)
        return out
