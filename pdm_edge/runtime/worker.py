"""The scoring worker of ``pdm-edge run`` and the record sink it writes through.

:class:`ScoringWorker` loops in the ``score-worker`` thread; one batch (up to
``service.score_batch`` windows of the window queue) goes through named steps, each with every
side effect once per batch:

1. :meth:`~ScoringWorker.take_batch`: the windows queued now (waits at most ``IDLE_POLL_S``
   for the first; when idle, the backlog of every stream no longer calibrating is scored:
   :meth:`~ScoringWorker.drain_backlog`).
2. :meth:`~ScoringWorker.observe`: the feedback ring (:meth:`Feedback.observe_many`).
3. :meth:`~ScoringWorker.score`: the scoring stage (:mod:`pdm_edge.pipeline.scoring`; its
   replay candidates go to the learning loop from the stage's sink).
4. :meth:`~ScoringWorker.emit`: scores and condition indicators to the spool, metrics, alerts
   and MQTT (:meth:`ResultPublisher.handle_many`), alert records to the spool and their windows
   held for a later label.

:class:`RecordSink` puts records in the durable spool: what cannot go there is counted as
dropped with a reason (``invalid``: into the spool's dead-letter table; ``spool_write_failed``);
alerts, labels and model events that hit a write failure are held in memory (up to
:attr:`RecordSink.MAX_HELD_RECORDS`) and put again with the next record; scores are shed first.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from pdm_edge.errors import StoreError
from pdm_edge.runtime.logging import log_event
from pdm_edge.supervision import StageErrors
from pdm_edge.types import Score, Window

__all__ = ["RecordSink", "ScoringWorker"]

log = logging.getLogger(__name__)


class RecordSink:
    """Records into the spool, nothing lost silently (see the module docstring). Thread-safe.

    Args:
        spool: the durable spool (:class:`~pdm_edge.store.spool.Spool`).
        metrics: the service's metrics (``spool_errors``).
        errors: stage errors (``spool-put``).
    """

    MAX_HELD_RECORDS = 10_000

    def __init__(self, spool: Any, metrics: Any, errors: StageErrors) -> None:
        self.spool, self.metrics, self.errors = spool, metrics, errors
        self._lock = threading.RLock()
        self._held: list[tuple[str, list[Any]]] = []
        self._dropped: collections.Counter[tuple[str, str]] = collections.Counter()
        self.last_drop: tuple[float, str] | None = None
        """``(monotonic time, "kind: reason")`` of the last drop, or ``None``."""

    def count_dropped(self, kind: str, reason: str, n: int) -> None:
        """Count ``n`` records of ``kind`` dropped for ``reason``."""
        with self._lock:
            self._dropped[(kind, reason)] += n
            self.last_drop = (time.monotonic(), f"{kind}: {reason}")

    def dropped(self) -> dict[tuple[str, str], int]:
        """``{(kind, reason): records}`` dropped so far."""
        with self._lock:
            return dict(self._dropped)

    def held(self) -> int:
        """Records held in memory because the spool could not be written."""
        with self._lock:
            return sum(len(r) for _, r in self._held)

    def put(self, kind: str, records: list[Any]) -> None:
        """Put records of ``kind`` (``score``, ``alert``, ``condition``, ``label``,
        ``model_event``) in the spool, held records first."""
        with self._lock:
            if self._held:
                held, self._held = self._held, []
                for i, (hk, hrecs) in enumerate(held):
                    if not self._put_once(hk, hrecs):  # it is held again; so is the rest
                        self._held.extend(held[i + 1:])
                        break
            self._put_once(kind, records)

    def _put_once(self, kind: str, records: list[Any]) -> bool:
        try:
            self.spool.put(kind, records)
            return True
        except (ValueError, TypeError, OverflowError) as exc:
            self.metrics.spool_errors.inc(len(records))
            self.count_dropped(kind, "invalid", len(records))
            log_event(log, logging.ERROR, "spool_put_refused", kind=kind, records=len(records), error=str(exc)[:300])
            for r in records:
                try:
                    self.spool.deadletter(kind, repr(r), f"refused by the spool: {exc}")
                except StoreError:
                    pass
            return True  # nothing to retry: they can never be stored
        except StoreError as exc:
            self.metrics.spool_errors.inc(len(records))
            if kind != "score" and self.held() + len(records) <= self.MAX_HELD_RECORDS:
                self._held.append((kind, list(records)))
                reason = "spool_write_failed_held"
            else:
                self.count_dropped(kind, "spool_write_failed", len(records))
                reason = "spool_write_failed"
            self.errors.record("spool-put", exc, None)
            log_event(log, logging.ERROR, "spool_put_failed", kind=kind, records=len(records), outcome=reason,
                      error=str(exc)[:300])
            return False


def call_hook(fn: Callable[..., None] | None, *args: Any) -> None:
    """Call an embedding program's hook; an exception is logged and ignored."""
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.exception("service hook %r failed", fn)


class ScoringWorker:
    """The ``score-worker`` loop (see the module docstring).

    Args:
        windows: the window queue (the ingestor's).
        config: the appliance configuration (``service.score_batch``, sensors' severity zones).
        scoring, streams: the scoring stage and the stream table.
        feedback, results: the feedback stage and the results publisher.
        metrics, sink, hooks: the service's metrics, record sink and hooks.
        errors: stage errors (``score-worker``).
    """

    IDLE_POLL_S = 0.2

    def __init__(self, windows: queue.Queue[Window], config: Any, *, scoring: Any, streams: Any, feedback: Any,
                 results: Any, metrics: Any, sink: RecordSink, hooks: Any, errors: StageErrors) -> None:
        self.windows, self.config = windows, config
        self.scoring, self.streams, self.feedback, self.results = scoring, streams, feedback, results
        self.metrics, self.sink, self.hooks, self.errors = metrics, sink, hooks, errors
        self.heartbeat = time.monotonic()
        """Monotonic time of the loop's last turn (the systemd watchdog and /healthz read it)."""
        self.stop_requested = threading.Event()
        """Set: return once the window queue is empty."""
        self.abandon = threading.Event()
        """Set: drop what is queued (counted, reason ``stop``) and return after the current batch."""
        self._lock = threading.Lock()
        self._processed = 0
        self._draining = False
        self._scored: collections.Counter[str] = collections.Counter()

    # -- observation -------------------------------------------------------------------------
    @property
    def processed(self) -> int:
        """Windows the worker has finished with (scored, collected or backlogged)."""
        with self._lock:
            return self._processed

    @property
    def draining(self) -> bool:
        """Scoring a backlog now (taken from the stream table, not yet spooled)."""
        with self._lock:
            return self._draining

    def scored(self) -> dict[str, int]:
        """Windows scored per stream."""
        with self._lock:
            return dict(self._scored)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Loop until :attr:`stop_requested` with an empty queue, or :attr:`abandon`."""
        while True:
            self.heartbeat = time.monotonic()
            if self.abandon.is_set():
                self._drop_queued()
                return
            batch = self.take_batch()
            if batch is None:
                if self.stop_requested.is_set():
                    return
                continue
            try:
                self.observe(batch)
                self.emit(self.score(batch))
            except Exception as exc:  # never let the worker die: count, log, go on
                self.error(exc, batch[0].stream)
            with self._lock:
                self._processed += len(batch)

    def take_batch(self) -> list[Window] | None:
        """Up to ``service.score_batch`` queued windows; ``None`` after ``IDLE_POLL_S`` with
        none (the idle turn scores the backlogs that can be scored)."""
        try:
            first = self.windows.get(timeout=self.IDLE_POLL_S)
        except queue.Empty:
            if not self.stop_requested.is_set() and any(s != "calibrating" for s in self.streams.backlogged().values()):
                self.drain_backlog()
            return None
        batch = [first]
        batch_max = self.config.service.score_batch
        while len(batch) < batch_max:
            try:
                batch.append(self.windows.get_nowait())
            except queue.Empty:
                break
        self.metrics.windows_in.inc(len(batch))
        return batch

    def observe(self, batch: list[Window]) -> None:
        """The feedback stage's ring and running labels."""
        try:
            self.feedback.observe_many(batch)
        except Exception as exc:
            self.error(exc, batch[0].stream)

    def score(self, batch: list[Window]) -> list[tuple[Window, Score]]:
        """The scoring stage on the batch (one window at a time after a failure, so one bad
        window costs only itself, counted as dropped ``scoring_failed``)."""
        t0 = time.perf_counter()
        try:
            pairs = self.scoring.handle_many(batch)
        except Exception as exc:
            self.error(exc, batch[0].stream)
            pairs = []
            for w in batch:
                try:
                    pairs += self.scoring.handle_many([w])
                except Exception as exc1:
                    self.error(exc1, w.stream)
                    self.sink.count_dropped("window", "scoring_failed", 1)
        self.metrics.scoring_latency.observe(time.perf_counter() - t0)
        self.metrics.score_batch.observe(len(batch))
        if self.hooks.on_window is not None:
            for w in batch:
                call_hook(self.hooks.on_window, w, self.streams.state(w.stream))
        return pairs

    def emit(self, pairs: list[tuple[Window, Score]]) -> None:
        """A scored batch's side effects, one call each: scores and condition indicators to
        the spool, metrics, alerts and MQTT, alert records to the spool and their windows held."""
        if not pairs:
            return
        self.sink.put("score", [sc for _, sc in pairs])
        self._spool_conditions([w for w, _ in pairs])
        per_stream = collections.Counter(w.stream for w, _ in pairs)
        with self._lock:
            self._scored.update(per_stream)
        for stream, n in per_stream.items():
            self.metrics.windows_scored.labels(*stream.split("/")).inc(n)
        if self.hooks.on_score is not None:
            for win, sc in pairs:
                call_hook(self.hooks.on_score, win, sc)
        alerts = self.results.handle_many([(sc, w.end_ns) for w, sc in pairs])
        if not alerts:
            return
        self.sink.put("alert", [a for _, a in alerts])
        for i, a in alerts:
            win = pairs[i][0]
            self.metrics.alerts.labels(a.site, a.machine, a.sensor, a.state).inc()
            log_event(log, logging.INFO, f"alert_{a.state}", alert_id=a.id, stream=win.stream,
                      start_ns=a.start_ns, end_ns=a.end_ns, peak_score=a.peak_score, threshold=a.threshold,
                      model_version=a.model_version)
            end = a.end_ns if a.end_ns is not None else win.end_ns
            try:
                self.feedback.hold_span(a.site, a.machine, a.sensor, a.start_ns, end)
            except Exception:
                log.exception("holding the windows of alert %s failed", a.id)
            call_hook(self.hooks.on_alert, a, win)

    def _spool_conditions(self, windows: list[Window]) -> None:
        """Spool the condition indicators (ISO 20816-3 velocity and zone, RMS, peak, crest factor,
        kurtosis, band energies: :mod:`pdm_edge.condition`) of the scored windows. A failure
        here is logged and counted; it never costs a score."""
        from pdm_edge import condition

        def zones(w: Window) -> Any:
            sc = self.config.sensor(w.site, w.machine, w.sensor)
            return sc.severity_zones_mm_s if sc is not None else condition.GROUP2_RIGID_MM_S

        try:
            self.sink.put("condition", condition.for_windows(windows, zones))
        except Exception:
            self.metrics.worker_errors.inc()
            log.exception("condition indicators of %d windows failed", len(windows))

    def drain_backlog(self) -> None:
        """Score (or collect) every backlog of a stream that is no longer calibrating."""
        with self._lock:
            self._draining = True
        try:
            self.emit(self.scoring.drain(timeout=0.0))
        except Exception as exc:
            self.error(exc, None)
        finally:
            with self._lock:  # after the scores are spooled, so that wait_idle cannot pass in between
                self._draining = False

    def error(self, exc: BaseException, stream: str | None) -> None:
        """An exception in the scoring worker: counted (``pdm_edge_worker_errors_total`` and the
        stage errors), logged rate-limited with the stream, and shown in /healthz."""
        self.metrics.worker_errors.inc()
        self.errors.record("score-worker", exc, stream)

    def _drop_queued(self) -> None:
        n = 0
        while True:
            try:
                self.windows.get_nowait()
            except queue.Empty:
                break
            n += 1
        if n:
            self.sink.count_dropped("window", "stop", n)
