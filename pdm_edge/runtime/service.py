"""The running appliance (``pdm-edge run``): every stage of DESIGN.md section 1 in one process.

This module is the wiring and the lifecycle (start, stop, model events); the scoring worker is
:mod:`pdm_edge.runtime.worker`, ``/healthz`` and the health probe :mod:`pdm_edge.runtime.health`,
logs :mod:`pdm_edge.runtime.logging`, systemd notification :mod:`pdm_edge.runtime.systemd`,
``/metrics`` :mod:`pdm_edge.metrics`.

Threads and the bounded queues between them::

    paho "ingest" network thread      on_message: decode and enqueue only (never waits)
        |  chunk queue  (ingest.queue_size; full: the chunk is dead-lettered as queue_full)
    "ingest-window" thread           validation, ring buffer per stream, windows cut with hop
        |  window queue (ingest.window_queue_size; the windowing thread waits when full)
    "score-worker" thread            up to service.score_batch windows per batch, every side
        |                              effect once per batch: Feedback.observe_many -> scoring
        |                              stage (replay candidates to the learning loop) -> spool
        |                              (scores, conditions) -> ResultPublisher.handle_many (k-of-n
        |                              alerts; scores/alerts/status handed to paho) -> spool (alerts)
        |  durable spool (SQLite WAL, spool.max_records; oldest scores dropped beyond it)
    "spool-writer" thread            batches into the store (InfluxDB / SQLite), back-off on outages

    "learning" thread                the training loop (nice +10): calibrations and retrains, one at a time
    paho "results" thread + "results-status" ticker    QoS 1 alerts/status (paho queue, bounded)
    paho "labels" thread             technician labels -> Feedback.submit (label book)
    "label-sync" thread              every 0.5 s: new labels in the book (any process) -> their
                                     windows captured, forwarded to the spool (one cursor)
    "http" thread                    /metrics and /healthz (:mod:`pdm_edge.metrics`)
    "health-probe" thread            pings the store every few seconds (for /healthz)
    "watchdog" thread                systemd WATCHDOG=1 while the scoring worker is alive

Decisions:

- **One place builds the scorer**: :meth:`Service._make_scoring`: the on-device learning loop
  (:mod:`pdm_edge.learning`: replay buffer, triggers, training in its own low-priority
  thread, gate, registry), the :class:`~pdm_edge.pipeline.streams.StreamTable` (each stream's
  state and backlog, the one owner: it consumes the loop's events) and the
  :class:`~pdm_edge.pipeline.scoring.ScoringStage`, which scores each stream with its
  registry's active version and hot-swaps a promoted or rolled-back one; its replay
  candidates go to the loop (``take_replay``) as data. The worker calls ``handle_many`` and
  ``drain`` (only from the worker thread); stream states come from the table, never from the
  job table.
- **Model events** in the store: ``training_queued`` / ``rejected`` / ``training_failed`` /
  ``training_interrupted`` from the learning loop; registry promotions and rollbacks (:meth:`~pdm_edge.registry.Registry.on_change`) as
  ``promoted`` / ``rolled_back`` (a stream's first version, trigger ``initial``, as
  ``calibrated``).
- **Scores go to the spool before MQTT**: the spool is the record (durable), MQTT is best
  effort for scores (QoS 0) and at-least-once for alerts and status (QoS 1).
- **Backlog at the end of a stream**: windows that arrived while a stream calibrated are scored
  with the next window of that stream; when the window queue runs dry the worker scores the
  backlog of every stream that is no longer calibrating itself (``ScoringStage.drain``).
- **Stop** (:meth:`Service.stop`, on SIGTERM/SIGINT in :func:`run_forever`), within one
  time budget: stop the label listener; stop ingestion (publishes the retained ``offline``
  appliance status, windows every chunk already received); the worker scores every window
  still queued; running calibrations get what is left of the budget (minus a reserve for the
  spool), after which their backlog is scored; the results publisher waits (bounded) for QoS 1
  acknowledgements; the spool writer drains to the store until empty or out of time (what is
  left stays in the spool file for the next start). A clean stop exits 0 even when the store
  is down: the records are durable in the spool.
- **systemd**: with ``NOTIFY_SOCKET`` set, ``READY=1`` is sent once every stage has started,
  ``STOPPING=1`` when stopping, and, with ``WATCHDOG_USEC`` set, ``WATCHDOG=1`` every half
  period *only while the scoring worker keeps looping* (it loops at least every 0.2 s when idle),
  so a wedged worker gets the process restarted (``Restart=on-failure``).
- **Logs**: stdlib :mod:`logging`; the service's own events are one line each,
  ``event=NAME key=value ...``; :func:`~pdm_edge.runtime.logging.configure_logging` formats
  every record as logfmt or JSON (``pdm-edge run --log-format``).
- **Health** (``/healthz``): see :mod:`pdm_edge.runtime.health`.
- **Supervision** (:mod:`pdm_edge.supervision`): the scoring worker, the windowing worker and
  the spool writer record every exception with the stream (``pdm_edge_stage_errors_total``,
  ``/healthz``) and go on; a loop that ends by an exception is restarted.
- **Nothing dropped silently**: a record that cannot be put in the spool is counted in
  ``pdm_edge_records_dropped_total{kind, reason}`` with ``reason`` ``invalid`` (it could never
  be stored; it goes to the spool's dead-letter table) or ``spool_write_failed`` (disk full, I/O
  error). Alerts, labels and model events that fail that way are kept in memory (up to
  :attr:`~pdm_edge.runtime.worker.RecordSink.MAX_HELD_RECORDS`) and put again with the next record, so an alert survives a
  full disk; scores are shed first.
- **Free space**: the health probe checks the free space of every state directory (spool,
  SQLite store, registry, label book) every few seconds.
- **Cluster** (``[cluster] enabled``, :mod:`pdm_edge.runtime.cluster`): the ingestion stage
  subscribes only to the streams this instance owns (the ``cluster`` thread assigns them), the
  label listener acts only on labels of machines whose streams it owns, and a stop begins by
  releasing every stream and leaving the group, so another instance takes them at once.
  ``/healthz`` has a ``cluster`` block; ``/metrics`` ``pdm_edge_cluster_owned_streams``,
  ``pdm_edge_cluster_members`` and ``pdm_edge_cluster_ownership_changes_total``.
- **Stop within the budget**: when the scoring worker has not emptied the window queue when
  the budget is spent, it is told to abandon the rest (counted as dropped, reason ``stop``) and
  joined, so the process never exits with the worker inside torch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from pdm_edge import __version__
from pdm_edge.config import AppConfig
from pdm_edge.errors import PdmEdgeError
from pdm_edge.metrics import HttpServer, Metrics
from pdm_edge.runtime.health import Probe, health_document, metrics_snapshot, state_dirs
from pdm_edge.runtime.logging import log_event
from pdm_edge.runtime.systemd import sd_notify, watchdog_interval_s
from pdm_edge.runtime.worker import RecordSink, ScoringWorker, call_hook
from pdm_edge.supervision import StageErrors, run_supervised
from pdm_edge.types import Alert, Score, Window

__all__ = ["Service", "ServiceHooks", "StopReport", "run_forever"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the service

@dataclasses.dataclass
class ServiceHooks:
    """Optional callbacks for an embedding program (the demo prints with them). They run in
    the scoring worker (``on_window``, ``on_score``, ``on_alert``) or in a calibration thread /
    the registry's caller (``on_model_event``); they must be quick, and an exception in one is
    logged and ignored.

    Attributes:
        on_window: ``(window, state)`` for every window after its batch went through the
            scoring stage; ``state`` is the stream's state after that batch.
        on_score: ``(window, score)`` for every score, after it was spooled.
        on_alert: ``(alert, window)`` for every alert record raised or cleared.
        on_model_event: ``(stream, event, detail)``: ``calibrated`` / ``failed`` from the
            scoring stage, ``promoted`` / ``rolled_back`` / ``calibrated`` from the registry.
    """

    on_window: Callable[[Window, str], None] | None = None
    on_score: Callable[[Window, Score], None] | None = None
    on_alert: Callable[[Alert, Window], None] | None = None
    on_model_event: Callable[[str, str, str], None] | None = None


@dataclasses.dataclass(frozen=True)
class StopReport:
    """What :meth:`Service.stop` achieved.

    Attributes:
        clean: every queued window was scored, QoS 1 messages acknowledged and the spool empty.
        windows_unscored: queued windows left unscored because the budget ran out.
        calibrations_unfinished: streams still calibrating when the budget ran out (their
            calibration windows and backlog, kept in memory, are lost; the stream calibrates
            again after the next start).
        spool_depth: records left in the spool file (they go out at the next start).
        unacked: alert/status messages the broker had not acknowledged.
        seconds: how long stopping took.
    """

    clean: bool
    windows_unscored: int
    calibrations_unfinished: tuple[str, ...]
    spool_depth: int
    unacked: int
    seconds: float


class Service:
    """The appliance: ingestion -> scoring -> alerts/MQTT -> spool -> store, with feedback,
    registry, metrics and health (see the module docstring).

    Usage::

        svc = Service(load_config("deploy/pdm-edge.toml")).start()
        ...
        report = svc.stop(timeout=60)

    Args:
        config: the validated configuration.
        encoder, encoder_sha256: the frozen encoder; ``models/encoder.pt`` is loaded at
            :meth:`start` when None.
        hooks: optional callbacks (:class:`ServiceHooks`).

    Raises (from :meth:`start`):
        StoreError: the spool or the SQLite store cannot be opened.
        ModelError: the encoder cannot be loaded.
        ConfigError: a malformed ``[service] http``.
        PdmEdgeError: the HTTP address cannot be bound.
    """

    def __init__(self, config: AppConfig, *, encoder: Any = None, encoder_sha256: str | None = None,
                 hooks: ServiceHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or ServiceHooks()
        self._encoder, self._sha = encoder, encoder_sha256
        self.metrics = Metrics(lambda: metrics_snapshot(self))
        if config.fleet.enabled:
            self.metrics.add_fleet(config.feedback.state_dir)
        self.ingestor: Any = None
        self.scoring: Any = None
        self.results: Any = None
        self.store: Any = None
        self.spool: Any = None
        self.writer: Any = None
        self.feedback: Any = None
        self.labels: Any = None
        self.registry: Any = None
        self.learning: Any = None
        self.streams: Any = None
        self.cluster: Any = None
        self.sink: RecordSink | None = None
        self.worker: ScoringWorker | None = None
        self.probe: Probe | None = None
        self.http: HttpServer | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._worker: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self.started_mono: float | None = None
        """Monotonic time :meth:`start` began, or ``None`` before."""
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self._stop_report: StopReport | None = None
        self.errors = StageErrors(log)
        """Errors of the scoring worker (stage ``score-worker``) and of spool writes (``spool-put``)."""

    # -- construction of the stages -----------------------------------------------------------
    def _make_scoring(self) -> Any:
        """Build the learning loop (:mod:`pdm_edge.learning`, its low-priority worker thread
        started) and the scoring stage that follows its registry: the one place that does."""
        from pdm_edge.learning import build_learning
        from pdm_edge.pipeline import ScoringStage, StreamTable

        cfg = self.config
        self.learning = build_learning(cfg, self.registry, self._encoder, self._sha, labels=self.feedback.book,
                                       label_windows=self.feedback.buffer, on_event=self._on_learning_event)
        self.streams = StreamTable(max_backlog_bytes=cfg.service.backlog_max_bytes)
        stage = ScoringStage.following(self.learning, self.streams, alert_k=cfg.alerts.k, alert_n=cfg.alerts.n)
        self.learning.start()
        return stage

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Service:
        """Open the store, spool, registry and label book, load the encoder, connect to the
        broker (in the background, with retries: a broker that is down makes the service
        degraded, not fail), serve HTTP, start the worker; then ``READY=1`` to systemd.
        On failure everything opened so far is closed again and the error raised."""
        if self.started_mono is not None:
            raise RuntimeError("Service already started")
        import torch

        from pdm_edge.alerts.publisher import ResultPublisher
        from pdm_edge.feedback import Feedback, LabelListener
        from pdm_edge.ingest import Ingestor
        from pdm_edge.registry import Registry
        from pdm_edge.store import open_store
        from pdm_edge.store.spool import Spool, SpoolWriter

        cfg = self.config
        self.started_mono = time.monotonic()
        try:
            torch.set_num_threads(cfg.service.torch_threads)
            cap_blas_threads(cfg.service.torch_threads)
            self.store = open_store(cfg.store)
            self.spool = Spool(cfg.spool.path, cfg.spool.max_records)
            self.sink = RecordSink(self.spool, self.metrics, self.errors)
            self.probe = Probe(cfg, self.store)
            self.writer = SpoolWriter(self.spool, self.store, cfg.spool).start()
            self.registry = Registry.from_config(cfg.registry)
            for v in self.registry.list():
                if v.status == "active":
                    self.metrics.set_active_model(v.site, v.machine, v.sensor, v.id)
            self._unsubscribe = self.registry.on_change(self._on_model_change)
            self.feedback = Feedback.from_config(cfg.feedback, spool=self.spool)
            if self._encoder is None:
                from pdm_edge.model import load_encoder

                self._encoder, self._sha = load_encoder()
            self.scoring = self._make_scoring()
            self.feedback.subscribe(self.learning.take_label)  # one cursor over the label book: the feedback stage's
            self.feedback.start()
            self.ingestor = Ingestor(cfg, clustered=cfg.cluster.enabled)
            if cfg.cluster.enabled:
                self.cluster = self._make_cluster()
            self.results = ResultPublisher(cfg.mqtt, cfg.alerts, cfg.appliance_id).start()
            self.labels = LabelListener(cfg.mqtt, cfg.appliance_id, self.feedback.submit,
                                        deadletter=cfg.ingest.deadletter,
                                        require_identity=cfg.feedback.mqtt_label_identity,
                                        accept=self.cluster.owns_label if self.cluster is not None else None).start()
            self.worker = ScoringWorker(self.ingestor.windows, cfg, scoring=self.scoring, streams=self.streams,
                                        feedback=self.feedback, results=self.results, metrics=self.metrics,
                                        sink=self.sink, hooks=self.hooks, errors=self.errors)
            self.http = HttpServer(cfg.service.http, self.metrics, self.health)
            try:
                self.http.start()
            except OSError as exc:
                raise PdmEdgeError(f"cannot serve /healthz and /metrics on {cfg.service.http}: {exc.strerror or exc}") from None
            worker = self.worker
            self._worker = threading.Thread(
                target=lambda: run_supervised("score-worker", worker.run, self.errors, stopped=worker.stop_requested.is_set),
                name="score-worker", daemon=True)
            self._worker.start()
            if self.cluster is not None:
                self.cluster.start()  # before ingestion: it hands the ingestor's (re)connects to the cluster thread
            self.ingestor.start()  # last: windows start to flow
            probe = self.probe
            self._spawn(lambda: probe.run(self._closed), "health-probe")
            wd = watchdog_interval_s()
            if wd is not None:
                self._spawn(lambda: self._watchdog_loop(wd), "watchdog")
        except BaseException:
            self._close_all()
            raise
        log_event(log, logging.INFO, "started", appliance=cfg.appliance_id, version=__version__, broker=cfg.mqtt.broker,
                  store=cfg.store.backend, http=self.http.url, streams=len(cfg.sensors),
                  calibration_s=cfg.learning.calibration_s, score_batch=cfg.service.score_batch,
                  torch_threads=cfg.service.torch_threads)
        host = f"[{self.http.host}]" if ":" in self.http.host else self.http.host
        log_event(log, logging.INFO, "http_listening", address=f"{host}:{self.http.port}")
        sd_notify(f"READY=1\nSTATUS=running, /healthz on {self.http.url}\nMAINPID={os.getpid()}")
        return self

    def _make_cluster(self) -> Any:
        """The cluster membership (not started) and its metrics on the service's registry."""
        from prometheus_client import Counter, Gauge

        from pdm_edge.runtime.cluster import Cluster

        changes = Counter("pdm_edge_cluster_ownership_changes", "Streams gained or lost by this cluster instance.",
                          ["change"], registry=self.metrics.registry)

        def on_change(owned: frozenset[str], gained: frozenset[str], lost: frozenset[str]) -> None:
            changes.labels("gained").inc(len(gained))
            changes.labels("lost").inc(len(lost))

        cluster = Cluster(self.config, self.ingestor, on_change=on_change, registry=self.registry, encoder_sha256=self._sha)
        Gauge("pdm_edge_cluster_owned_streams", "Streams this cluster instance owns (scores) now.",
              registry=self.metrics.registry).set_function(lambda: len(cluster.owned))
        Gauge("pdm_edge_cluster_members", "Live instances of this instance's cluster group.",
              registry=self.metrics.registry).set_function(lambda: len(cluster.status()["members"]))
        return cluster

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> StopReport:
        """Stop cleanly within about ``timeout`` seconds (see the module docstring); idempotent.

        Returns:
            a :class:`StopReport`; the same one on later calls.
        """
        if self._stop_report is not None:
            return self._stop_report
        if self._worker is None or self._closed.is_set():
            raise RuntimeError("Service not started (or its start failed)")
        t0 = time.monotonic()
        deadline = t0 + max(1.0, timeout)
        reserve = min(10.0, max(1.0, timeout) / 3)  # kept for the results flush and the spool drain
        self._stopping.set()
        sd_notify("STOPPING=1")
        log_event(log, logging.INFO, "stopping", budget_s=timeout)

        def left(reserve_s: float = 0.0) -> float:
            return max(0.5, deadline - reserve_s - time.monotonic())

        if self.cluster is not None:  # first: the other instances take this one's streams at once
            self.cluster.release(timeout=min(2.0, left(reserve)))
        self.labels.stop()
        self.feedback.stop()  # after one last sync: every label is in the spool before it drains
        self.ingestor.stop(timeout=left(reserve))  # retained "offline"; queued chunks windowed
        assert self._worker is not None and self.worker is not None and self.sink is not None
        self.worker.stop_requested.set()
        self._worker.join(left(reserve))
        unscored, unfinished = 0, []
        if self._worker.is_alive():
            self.worker.abandon.set()  # the worker ends after its current batch; the rest is counted dropped
            self._worker.join(max(30.0, left()))
            unscored = self.sink.dropped().get(("window", "stop"), 0)
            log_event(log, logging.ERROR, "worker_not_finished", windows_left=unscored,
                      worker_alive=self._worker.is_alive())
        else:
            unfinished = self._finish_backlog(deadline - reserve)
        if self.learning is not None:  # a training still running writes its checkpoint, resumes at the next start
            self.learning.stop(timeout=left())
        unacked_ok = self.results.stop(timeout=min(5.0, left()))
        unacked = self.results.stats().unacked
        spool_empty = self.writer.stop(timeout=left())
        depth = self.spool.depth()
        self._close_all()
        report = StopReport(clean=bool(unscored == 0 and not unfinished and unacked_ok and spool_empty),
                            windows_unscored=unscored, calibrations_unfinished=tuple(unfinished), spool_depth=depth,
                            unacked=unacked, seconds=time.monotonic() - t0)
        log_event(log, logging.INFO if report.clean else logging.WARNING, "stopped", clean=report.clean,
                  windows_unscored=unscored, calibrations_unfinished=",".join(unfinished) or None, spool_depth=depth,
                  unacked=unacked, seconds=round(report.seconds, 3))
        self._stop_report = report
        return report

    def _finish_backlog(self, until: float) -> list[str]:
        """After the worker ended: wait (until ``until``, monotonic) for running calibrations,
        then score their backlog. Returns the streams whose calibration was still running (their
        backlog windows, held in memory by the stage, are lost; the calibration itself is in the
        job table and the replay buffer and resumes from its checkpoint at the next start)."""
        while self.streams.calibrating() and time.monotonic() < until:
            time.sleep(0.05)
        busy = self.streams.calibrating()
        if busy:
            log_event(log, logging.WARNING, "calibration_unfinished_at_stop", streams=",".join(busy))
            return busy
        assert self.worker is not None
        self.worker.drain_backlog()
        return []

    def _close_all(self) -> None:
        """Close whatever is open (after a failed start, or at the end of stop)."""
        self._closed.set()
        if self.worker is not None:
            self.worker.stop_requested.set()
        for name in ("cluster", "labels", "ingestor"):
            comp = getattr(self, name)
            if comp is not None and not self._stopping.is_set():
                try:
                    comp.stop()
                except Exception:
                    log.exception("stopping %s failed", name)
        if self.results is not None and not self._stopping.is_set():
            try:
                self.results.stop(timeout=1.0)
            except Exception:
                log.exception("stopping the results publisher failed")
        if self.writer is not None and not self._stopping.is_set():
            self.writer.stop(timeout=2.0)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.scoring is not None:
            self.scoring.close()
        if self.learning is not None:
            try:
                self.learning.close()
            except Exception:
                log.exception("closing the learning loop failed")
        if self.http is not None:
            self.http.stop()
        for t in self._threads:
            t.join(2.0)
        for comp in (self.feedback, self.registry, self.spool, self.store):
            if comp is not None:
                try:
                    comp.close()
                except Exception:
                    log.exception("closing %r failed", comp)

    def _spool_put(self, kind: str, records: list[Any]) -> None:
        if self.sink is not None:
            self.sink.put(kind, records)

    # -- events from the scoring stage and the registry ---------------------------------------
    _LEARNING_EVENTS = {"queued": "training_queued", "rejected": "rejected", "failed": "training_failed",
                        "interrupted": "training_interrupted", "paused": "training_paused",
                        "awaiting_confirmation": "awaiting_confirmation"}
    _LEARNING_LOGS = {"training": "training_started", "promoted": "training_promoted"}

    def _on_learning_event(self, stream: str, event: str, version: str, detail: str) -> None:
        """Learning-loop listener (its thread): ``queued``, ``training``, ``promoted``,
        ``rejected``, ``failed``, ``interrupted``, ``paused`` (heat, load or battery). Promotions
        reach the store through the registry listener (:meth:`_on_model_change`); the others are
        stored here as model events (``training_queued``, ``rejected``, ``training_failed``,
        ``training_interrupted``, ``training_paused``)."""
        from pdm_edge.store.base import ModelEvent

        site, machine, sensor = stream.split("/")
        if event in ("promoted", "rejected", "failed", "interrupted", "paused", "awaiting_confirmation"):
            self.metrics.training_runs.labels(site, machine, sensor, event).inc()
        name = self._LEARNING_EVENTS.get(event)
        level = logging.ERROR if event == "failed" else logging.INFO
        log_event(log, level, name or self._LEARNING_LOGS.get(event, f"training_{event}"), stream=stream, version=version or None, detail=detail)
        if name is not None:
            self._spool_put("model_event", [ModelEvent(site, machine, time.time_ns(), name, version, detail)])
            call_hook(self.hooks.on_model_event, stream, name, detail)

    def _on_model_change(self, rec: Any) -> None:
        """Registry listener: a promotion or rollback becomes a model event in the store (not one
        made from the cluster group's package; an owned stream's is handed to the cluster).
        The first version of a stream (trigger ``initial``, nothing active before) is stored as
        ``calibrated`` with a summary of its training; later ones as ``promoted`` /
        ``rolled_back``."""
        from pdm_edge.runtime.cluster import CLUSTER_REASON
        from pdm_edge.store.base import ModelEvent

        if self.cluster is not None:
            self.cluster.model_changed(rec)  # hand-off: the owner publishes the package to the group
        if (rec.reason or "").startswith(CLUSTER_REASON):  # the group's version: the owner stored the event
            self.metrics.set_active_model(rec.site, rec.machine, rec.sensor, rec.id)
            log_event(log, logging.INFO, "cluster_model", stream=rec.stream, version=rec.id, detail=rec.reason)
            return
        if (rec.reason or "").startswith("rolled back"):
            event, detail = "rolled_back", rec.reason or ""
        elif rec.trigger == "initial" and rec.previous_active is None:
            ts = rec.training_summary or {}
            event = "calibrated"
            try:
                held = int(ts.get("gate_windows", 0))
                detail = (f"{ts['normal_windows'] + held} windows ({held} held back for the gate), "
                          f"adapter {ts['adapter_epochs']} epochs in "
                          f"{float(ts['train_seconds']):.1f} s, threshold {float(ts['threshold']):.2f}")
            except (KeyError, TypeError, ValueError):
                detail = rec.reason or ""
        else:
            event, detail = "promoted", rec.reason or ""
        self.metrics.model_changes.labels(rec.site, rec.machine, rec.sensor, event).inc()
        self.metrics.set_active_model(rec.site, rec.machine, rec.sensor, rec.id)
        self._spool_put("model_event", [ModelEvent(rec.site, rec.machine, time.time_ns(), event, rec.id, detail)])
        log_event(log, logging.INFO, event, stream=rec.stream, version=rec.id, detail=detail)
        call_hook(self.hooks.on_model_event, rec.stream, event, detail)

    # -- background helpers -------------------------------------------------------------------
    def _watchdog_loop(self, interval_s: float) -> None:
        stalled = False
        while not self._closed.wait(interval_s):
            age = time.monotonic() - (self.worker.heartbeat if self.worker is not None else 0.0)
            alive = self._worker is not None and self._worker.is_alive()
            if self._stopping.is_set() or (alive and age < 2 * interval_s):
                sd_notify("WATCHDOG=1")
                stalled = False
            elif not stalled:
                stalled = True
                log_event(log, logging.ERROR, "watchdog_withheld", worker_alive=alive, heartbeat_age_s=age)

    # -- observation --------------------------------------------------------------------------
    def stream_names(self) -> list[str]:
        """Every stream configured or seen by ingestion, sorted."""
        names = set(self.config.sensors)
        if self.ingestor is not None:
            names.update(self.ingestor.stats().streams)
        return sorted(names)

    def worker_alive(self) -> bool:
        """Whether the scoring worker thread is running."""
        return self._worker is not None and self._worker.is_alive()

    @property
    def http_url(self) -> str | None:
        """``http://HOST:PORT`` of /healthz and /metrics (the bound port), once started."""
        return self.http.url if self.http is not None else None

    def wait_idle(self, timeout: float, *, settle_s: float = 0.5, spool: bool = True) -> bool:
        """Block until nothing is in flight: no chunk or window queued, every window through
        the worker, no stream calibrating, no calibration backlog, (``spool``) the spool empty,
        and no new MQTT message for ``settle_s`` seconds. Returns False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last_received, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            st = self.ingestor.stats()
            now = time.monotonic()
            if st.received != last_received:
                last_received, quiet_since = st.received, now
            busy = self.streams.busy()  # before the worker's draining flag: it is set before a backlog is taken
            processed = self.worker.processed if self.worker is not None else 0
            draining = self.worker is not None and self.worker.draining
            idle = (st.windowed >= st.accepted and st.chunk_queue_depth == 0 and st.window_queue_depth == 0
                    and processed >= st.windows and not busy and not draining
                    and (not spool or self.spool.depth() == 0) and now - quiet_since >= settle_s)
            if idle:
                return True
            time.sleep(0.05)
        return False

    def state_dirs(self) -> list[str]:
        """The directories the appliance writes its state to (:func:`~pdm_edge.runtime.health.state_dirs`)."""
        return state_dirs(self.config)

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` document (:func:`~pdm_edge.runtime.health.health_document`): ``status``
        (``ok`` / ``degraded`` / ``down``), ``reasons``, broker and store reachability, spool,
        queues, worker liveness and every stream's state, model version and counts."""
        return health_document(self)


def cap_blas_threads(n: int) -> None:
    """Cap numpy's and scipy's native thread pools (OpenBLAS / MKL / OpenMP, through
    threadpoolctl) to ``n`` threads for the rest of the process, as ``torch.set_num_threads``
    does for torch. One BLAS thread per core is their default; on a 2-core appliance whose
    other threads (MQTT, windowing, spool writer) are busy too, those pools spin and wait on
    each other, and the feature step's matrix products become several times slower."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)


def run_forever(service: Service, *, stop_timeout: float = 60.0) -> int:
    """Start ``service`` and run it until SIGTERM or SIGINT (main thread only), then stop it
    within ``stop_timeout`` seconds. Returns the exit status: 0 after an orderly stop (even if
    records are left in the spool), 1 when the scoring worker died.

    Raises:
        PdmEdgeError (and subclasses): the service could not start.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            log_event(log, logging.WARNING, "signal_ignored", signal=signal.Signals(signum).name, reason="already stopping")
            return
        log_event(log, logging.INFO, "signal", signal=signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    rc = 0
    try:
        service.start()
        while not stop.wait(1.0):
            if not service.worker_alive():
                log_event(log, logging.ERROR, "worker_died")
                rc = 1
                break
        service.stop(stop_timeout)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return rc
