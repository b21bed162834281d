"""The scoring stage: windows -> the stream's active model version -> scores; hot-swapped.

A stream's state (collecting, calibrating, scoring, failed) is owned by the
:class:`~pdm_edge.pipeline.streams.StreamTable`; this stage reads it and reports one change to
it, ``scoring``, when it swaps a model version in. It never reaches into the learning loop:
what learning needs leaves it as data, :class:`ReplayCandidates` records given to a sink
(``replay_sink``; :meth:`ScoringStage.following` wires it to
:meth:`pdm_edge.learning.loop.LearningLoop.take_replay`), one record per stream and batch.

Per state, a batch's windows of one stream:

- **collecting** / **failed**: their feature images become replay candidates with
  ``collecting=True`` (the machine's normal baseline); nothing is scored. The window that
  completes ``calibration_s`` seconds of collection (counted from the stream's first collected
  window) is the last one of its record (*calibration readiness*); the learning side answers
  through the stream table (a queued calibration makes the stream ``calibrating``), and the
  rest of the batch is handled in the state that follows: backlogged when calibrating,
  collected one by one otherwise (too few windows yet), so the calibration set is exact.
- **calibrating**: they wait in the stream's backlog (bounded by the table).
- **scoring**: the backlog, then the windows, are scored with the stream's version, together
  with the batch's other scoring streams: their feature images in one call per feature
  transform (:meth:`ScoringStage._features_many`), their embeddings in one batched pass of the
  shared encoder, each window through its own stream's adapter
  (:func:`~pdm_edge.model.scorer.score_and_name_many`; should a model fail, the worker scores
  the batch again one window at a time, so that the failure costs only its windows). One :class:`~pdm_edge.types.Score` each,
  with the threshold and the version id; an anomalous window of a version that knows
  confirmed faults also carries the one it looks like (from the same encoder pass), for its
  alert.
  Windows at or below the threshold while the stream is *quiet* by the alert rule (no window
  above among the last ``[alerts] n``, :attr:`pdm_edge.alerts.debounce.KOfN.quiet`) become
  replay candidates (``collecting=False``): the reservoir keeps a uniform sample of them.

A stream that is not calibrated produces no score (its machine reports "uncalibrated");
pdm-edge does not guess.

**Hot swap.** The stage follows the registry: a promotion or rollback in this process reaches
it through :meth:`~pdm_edge.registry.Registry.on_change`; one made by another process (the
command line, the dashboard) is seen by a check of the active version every ``refresh_s``
seconds. The new version is loaded first and then swapped in under the stage's lock between two
batches, so no window is dropped or scored twice; every score names the version that made it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pdm_edge.alerts.debounce import DEFAULT_K, DEFAULT_N, KOfN
from pdm_edge.errors import PdmEdgeError
from pdm_edge.model.scorer import Scorer, score_and_name_many
from pdm_edge.pipeline.streams import StreamTable
from pdm_edge.registry import RegisteredVersion, Registry
from pdm_edge.types import FaultMatch, Score, Window

__all__ = ["ReplayCandidates", "ScoringStage"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReplayCandidates:
    """Normal windows of one stream for the learning side's replay buffer.

    Attributes:
        stream: ``"site/machine/sensor"``.
        start_ns: the windows' starts (ns UTC), time order.
        features: their feature images, ``(B, 2, 64, 32)`` float32.
        collecting: the stream has no model version yet (its calibration set); the learning side
            queues the initial calibration once it holds ``calibration_s`` seconds of them.
    """

    stream: str
    start_ns: list[int]
    features: np.ndarray
    collecting: bool


@dataclasses.dataclass
class _Model:
    scorer: Scorer | None = None
    version: str | None = None
    checked: float = 0.0
    rule: KOfN | None = None


class ScoringStage:
    """Scores windows of many streams with their registry's active model versions.

    Args:
        registry: the model registry (active versions, hot swap).
        encoder, encoder_sha256: the frozen encoder the versions load onto.
        template: ``(stream, window) -> Scorer | None``: an uncalibrated scorer of the stream's
            configuration (feature images of collected windows); ``None``: the stream cannot
            be trained (its windows are ignored).
        streams: the stream table (state and backlog of each stream).
        calibration_s: seconds of collected windows that make a calibration set.
        collected_since: ``stream -> start ns of its first collected window`` (``None``: none
            yet), where collection is counted from.
        replay_sink: receives the replay candidates (``None``: they are dropped).
        alert_k, alert_n: the alert rule (``[alerts] k``/``n``), for the quiet-window test.
        refresh_s: how often the active version is checked for changes made by other
            processes, seconds.
        on_swap: called with ``(stream, version id)`` after a new version is swapped in.

    Only one thread may call :meth:`handle_many` / :meth:`drain` (the scoring worker).
    """

    def __init__(self, registry: Registry, encoder: Any, encoder_sha256: str,
                 template: Callable[[str, Window | None], Scorer | None], streams: StreamTable, *,
                 calibration_s: float, collected_since: Callable[[str], int | None] = lambda s: None,
                 replay_sink: Callable[[ReplayCandidates], Any] | None = None,
                 alert_k: int = DEFAULT_K, alert_n: int = DEFAULT_N, refresh_s: float = 2.0,
                 on_swap: Callable[[str, str], None] | None = None) -> None:
        KOfN(alert_k, alert_n)  # validates the pair
        self.registry = registry
        self.encoder, self.sha = encoder, encoder_sha256
        self.template = template
        self.streams = streams
        self.calibration_s = calibration_s
        self.collected_since = collected_since
        self.replay_sink = replay_sink
        self.alert_k, self.alert_n = alert_k, alert_n
        self.refresh_s = refresh_s
        self.on_swap = on_swap
        self._models: dict[str, _Model] = {}
        self._lock = threading.RLock()
        self._unsubscribe = self.registry.on_change(self._on_change)

    @classmethod
    def following(cls, loop: Any, streams: StreamTable | None = None, *, alert_k: int = DEFAULT_K,
                  alert_n: int = DEFAULT_N, **kwargs: Any) -> ScoringStage:
        """A stage (and, unless given, a stream table) wired to a learning loop: the table
        consumes the loop's events (:meth:`StreamTable.on_learning_event`) and is seeded once
        from its job table; the stage uses the loop's registry, encoder, templates and
        calibration span, and its replay candidates go to ``loop.take_replay``."""
        streams = streams if streams is not None else StreamTable()
        loop.subscribe(streams.on_learning_event)
        pending, failed, seen = [], [], set()
        for job in loop.jobs(limit=10_000):  # newest first: each stream's latest job decides
            if job.stream in seen:
                continue
            seen.add(job.stream)
            if loop.registry.active(*job.stream.split("/")) is not None:
                continue
            if job.status in ("queued", "running"):
                pending.append(job.stream)
            elif job.status == "failed" and job.trigger == "initial":
                failed.append((job.stream, job.detail))
        streams.seed(pending, failed)

        def since(stream: str) -> int | None:
            span = loop.replay.span(stream)
            return span[1] if span is not None else None

        return cls(loop.registry, loop.encoder, loop.sha, loop.template, streams, calibration_s=loop.calibration_s,
                   collected_since=since, replay_sink=lambda c: loop.take_replay([c]), alert_k=alert_k, alert_n=alert_n, **kwargs)

    # -- state -----------------------------------------------------------------------------------
    def state(self, stream: str) -> str:
        """The stream's state (:meth:`StreamTable.state`)."""
        return self.streams.state(stream)

    def error(self, stream: str) -> str | None:
        """Why the stream's initial calibration failed, or ``None``."""
        return self.streams.error(stream)

    def version(self, stream: str) -> str | None:
        """The id of the model version scoring the stream, or ``None``."""
        m = self._models.get(stream)
        return m.version if m is not None else None

    # -- swapping --------------------------------------------------------------------------------
    def _model(self, stream: str) -> _Model:
        m = self._models.get(stream)
        if m is None:
            with self._lock:
                m = self._models.setdefault(stream, _Model())
            self.streams.ensure(stream)
        return m

    def _load(self, stream: str, m: _Model, rec: RegisteredVersion | None) -> None:
        if rec is None or rec.id == m.version:
            return
        scorer = self.registry.load(rec.id, self.encoder, self.sha)  # loaded outside the swap
        with self._lock:
            m.scorer, m.version = scorer, rec.id
        self.streams.set_state(stream, "scoring", rec.id)
        log.info("%s: model version %s active", stream, rec.id)
        if self.on_swap is not None:
            self.on_swap(stream, rec.id)

    def _on_change(self, rec: RegisteredVersion) -> None:
        m = self._models.get(rec.stream)
        if m is not None:
            try:
                self._load(rec.stream, m, rec)
            except PdmEdgeError as exc:
                log.error("%s: could not load model version %s: %s", rec.stream, rec.id, exc)

    def _refresh(self, stream: str, m: _Model, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - m.checked < self.refresh_s:
            return
        m.checked = now
        try:
            self._load(stream, m, self.registry.active(*stream.split("/")))
        except PdmEdgeError as exc:
            log.error("%s: could not load the active model version: %s", stream, exc)

    # -- scoring -----------------------------------------------------------------------------------
    def handle_many(self, windows: list[Window]) -> list[tuple[Window, Score]]:
        """Feed windows (any streams, each stream in time order); returns the ``(window,
        score)`` pairs now ready, per stream in order: none while a stream collects or
        calibrates, its backlog too once its first version is active (see the module
        docstring). Replay candidates go to the sink.

        Raises:
            ModelError: a model failed on the batch (nothing of the failing stream is scored).
        """
        by_stream: dict[str, list[Window]] = {}
        for w in windows:
            by_stream.setdefault(w.stream, []).append(w)
        out: list[tuple[Window, Score]] = []
        scoring: list[tuple[str, _Model, Scorer, str | None, list[Window]]] = []
        for name, ws in by_stream.items():
            m = self._model(name)
            self._refresh(name, m)
            with self._lock:
                scorer, version = m.scorer, m.version
            if scorer is None:  # collecting, calibrating or failed (or a version swapped in just now)
                out += self._handle_stream(name, m, ws)
                continue
            ready = self.streams.take_backlog(name) + ws
            if ready:
                scoring.append((name, m, scorer, version, ready))
        feats = self._features_many([(scorer, ready) for _, _, scorer, _, ready in scoring])
        # every scoring stream's windows through the shared encoder in one batched pass
        scored = score_and_name_many([(job[2], f) for job, f in zip(scoring, feats)])
        for (name, m, scorer, version, ready), f, sc in zip(scoring, feats, scored):
            out += self._score(name, m, scorer, version, ready, f, sc)
        return out

    @staticmethod
    def _features_many(jobs: list[tuple[Scorer, list[Window]]]) -> list[np.ndarray]:
        """Feature images of each job's windows, computed in one call per feature transform
        (sample rate, kind, :class:`~pdm_edge.features.FeatureSpec`) over all the jobs that
        share it, not once per stream: the transform's fixed costs (filter design and initial
        conditions, windows, FFT plans) are paid once per batch. The images are those of
        :meth:`Scorer.features` one stream at a time (the transform is batch-invariant:
        ``tests/test_features.py::test_batch_equals_one_by_one``)."""
        groups: dict[tuple[float, str, Any], list[int]] = {}
        for i, (scorer, _) in enumerate(jobs):
            groups.setdefault((scorer.config.sample_rate_hz, scorer.config.kind, scorer.spec), []).append(i)
        out: list[np.ndarray] = [np.empty(0)] * len(jobs)
        for idx in groups.values():
            windows = [w for i in idx for w in jobs[i][1]]
            feats = jobs[idx[0]][0].features(windows)
            at = 0
            for i in idx:
                n = len(jobs[i][1])
                out[i] = feats[at:at + n]
                at += n
        return out

    def _handle_stream(self, name: str, m: _Model, ws: list[Window]) -> list[tuple[Window, Score]]:
        with self._lock:
            scorer, version = m.scorer, m.version
        if scorer is None and self.streams.state(name) == "calibrating":
            self.streams.hold(name, ws)
            return []
        ready = self.streams.take_backlog(name) + ws
        if not ready:
            return []
        if scorer is None:
            return self._collect(name, m, ready)
        return self._score(name, m, scorer, version, ready, scorer.features(ready))

    def _sink(self, c: ReplayCandidates) -> None:
        if self.replay_sink is not None and c.start_ns:
            self.replay_sink(c)

    def _collect(self, name: str, m: _Model, ws: list[Window]) -> list[tuple[Window, Score]]:
        tmpl = self.template(name, ws[0])
        if tmpl is None:
            return []
        first = self.collected_since(name)
        first = ws[0].start_ns if first is None else first
        cut = len(ws)
        for i, w in enumerate(ws):
            if (w.start_ns - first) / 1e9 >= self.calibration_s:
                cut = i + 1
                break
        taken = ws[:cut]
        self._sink(ReplayCandidates(name, [w.start_ns for w in taken], tmpl.features(taken), True))
        if cut < len(ws):  # the learning side has answered through the stream table
            return self._handle_stream(name, m, ws[cut:])
        return []

    def _score(self, name: str, m: _Model, scorer: Scorer, version: str | None, ready: list[Window],
               feats: np.ndarray, scored: tuple[np.ndarray, list[FaultMatch | None]] | None = None) -> list[tuple[Window, Score]]:
        # anomalous windows name the fault they look like; ``scored``: already scored with the batch's other streams
        scores, matches = scored if scored is not None else scorer.score_and_name_features(feats)
        thr = float(scorer.threshold)  # type: ignore[arg-type]
        if m.rule is None:
            m.rule = KOfN(self.alert_k, self.alert_n)
        normal = []
        for w, s in zip(ready, scores):
            m.rule.update(float(s), thr, w.start_ns, w.end_ns)
            normal.append(m.rule.quiet)
        idx = np.flatnonzero(normal)
        self._sink(ReplayCandidates(name, [ready[i].start_ns for i in idx], feats[idx], False))
        return [(w, Score(w.site, w.machine, w.sensor, w.start_ns, float(s), thr, bool(s > thr), version, match))
                for w, s, match in zip(ready, scores, matches)]

    def drain(self, timeout: float = 600.0) -> list[tuple[Window, Score]]:
        """Score every backlog that can be scored now or within ``timeout`` s: a scoring
        stream's at once, a calibrating stream's once its calibration ended (waiting up to
        ``timeout``); a collecting or failed stream's backlog is collected."""
        deadline = time.monotonic() + timeout
        out: list[tuple[Window, Score]] = []
        while True:
            busy = False
            for name in self.streams.backlogged():
                m = self._model(name)
                self._refresh(name, m, force=True)
                if self.streams.state(name) == "calibrating":
                    busy = True
                else:
                    out += self._handle_stream(name, m, [])
            if not busy or time.monotonic() > deadline:
                return out
            time.sleep(0.2)

    def close(self) -> None:
        """Stop following the registry."""
        self._unsubscribe()
