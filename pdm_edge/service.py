"""The running appliance (``pdm-edge run``): every stage of DESIGN.md section 1 in one process.

Threads and the bounded queues between them::

    paho "ingest" network thread      on_message: decode + validate only
        |  chunk queue  (ingest.queue_size, back-pressure to the broker when full)
    "ingest-window" thread           ring buffer per stream, windows cut with hop
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
  ``event=NAME key=value ...``; :func:`configure_logging` formats every record as logfmt or
  JSON (``pdm-edge run --log-format``).
- **Health** (``/healthz``): ``ok``; ``degraded`` with the reasons (broker unreachable, store
  unreachable or failing, spool backing up for more than a minute, a stream whose calibration
  failed, a supervised stage that failed in the last 5 minutes, records the store refused for
  good in the last 5 minutes (they are in the spool's dead-letter table), records that could
  not be written to the spool, a state directory with less than ``service.min_free_bytes``
  free); ``down`` when the scoring worker is not running (HTTP 503). At most
  :attr:`Service.HEALTH_MAX_STREAMS` streams are listed (the rest are counted), so the
  document stays small whatever publishers do.
- **Supervision** (:mod:`pdm_edge.supervision`): the scoring worker, the windowing worker and
  the spool writer record every exception with the stream (``pdm_edge_stage_errors_total``,
  ``/healthz``) and go on; a loop that ends by an exception is restarted.
- **Nothing dropped silently**: a record that cannot be put in the spool is counted in
  ``pdm_edge_records_dropped_total{kind, reason}`` with ``reason`` ``invalid`` (it could never
  be stored; it goes to the spool's dead-letter table) or ``spool_write_failed`` (disk full, I/O
  error). Alerts, labels and model events that fail that way are kept in memory (up to
  :attr:`Service.MAX_HELD_RECORDS`) and put again with the next record, so an alert survives a
  full disk; scores are shed first.
- **Free space**: the health probe checks the free space of every state directory (spool,
  SQLite store, registry, label book) every few seconds.
- **Stop within the budget**: when the scoring worker has not emptied the window queue when
  the budget is spent, it is told to abandon the rest (counted as dropped, reason ``stop``) and
  joined, so the process never exits with the worker inside torch.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pdm_edge import __version__
from pdm_edge.config import AppConfig
from pdm_edge.errors import PdmEdgeError, StoreError
from pdm_edge.metrics import HttpServer, Metrics
from pdm_edge.supervision import RECENT_S, StageErrors, run_supervised
from pdm_edge.types import Alert, Score, Window

log = logging.getLogger(__name__)

_NS = 1_000_000_000


# ---------------------------------------------------------------------------------------------
# structured logs

def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log one event as ``event=NAME key=value ...`` (values quoted when needed); the fields
    also travel as the record's ``pdm_fields`` for :class:`JsonFormatter`."""
    if not logger.isEnabledFor(level):
        return
    logger.log(level, "%s", _logfmt({"event": event, **fields}), extra={"pdm_fields": {"event": event, **fields}})


_BARE = re.compile(r"^[A-Za-z0-9_./:@+-]+$")


def _logfmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s if s and _BARE.match(s) else json.dumps(s, ensure_ascii=False)


def _logfmt(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


def _ts(record: logging.LogRecord) -> str:
    return _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=... event=... k=v`` for service events, ``msg="..."`` for
    every other record (exceptions appended as ``exc="..."``)."""

    def format(self, record: logging.LogRecord) -> str:
        head = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "pdm_fields", None)
        body = dict(fields) if fields else {"msg": record.getMessage()}
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return _logfmt({**head, **body})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``{ts, level, logger, event?, ..., msg?}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "pdm_fields", None)
        if fields:
            doc.update(fields)
        else:
            doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Send every record to stderr in ``fmt`` (``"logfmt"`` or ``"json"``) at ``level``,
    replacing the root logger's handlers. Third-party chatter (amqtt, transitions) is kept at
    WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("amqtt", "transitions", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# systemd notify

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


# ---------------------------------------------------------------------------------------------
# configuration as TOML (the demo writes its configuration for the dashboard)

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """A TOML document for a nested mapping of str/int/float/bool/lists (``None`` values are
    left out; nested mappings become tables). ``load_config`` reads it back unchanged.

    Raises:
        TypeError: a value of another type.
    """
    lines: list[str] = []

    def table(prefix: list[str], d: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in d.items() if v is not None and not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in d.items() if isinstance(v, Mapping)]
        if prefix and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables:
            table([*prefix, k], v)

    table([], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def config_toml(cfg: AppConfig) -> str:
    """``cfg`` as a TOML file that :func:`pdm_edge.config.load_config` reads back to ``cfg``."""
    return dump_toml(cfg.model_dump(mode="python", exclude_none=True))


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

    IDLE_POLL_S = 0.2
    PROBE_INTERVAL_S = 5.0
    SPOOL_LAG_DEGRADED_S = 60.0
    HEALTH_MAX_STREAMS = 200
    _STAGES = {"ingest-window": 0, "score-worker": 0, "spool-writer": 0}
    MAX_HELD_RECORDS = 10_000

    def __init__(self, config: AppConfig, *, encoder: Any = None, encoder_sha256: str | None = None,
                 hooks: ServiceHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or ServiceHooks()
        self._encoder, self._sha = encoder, encoder_sha256
        self.metrics = Metrics(self._metrics_snapshot)
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
        self.http: HttpServer | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._worker: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._started_mono: float | None = None
        self._heartbeat = time.monotonic()
        self._worker_stop = threading.Event()
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._processed = 0  # windows the worker has finished with (scored, collected or backlogged)
        self._scored: collections.Counter[str] = collections.Counter()
        self._store_reachable: bool | None = None
        self._store_error: str | None = None
        self._store_probe_at: float | None = None
        self._stop_report: StopReport | None = None
        self.errors = StageErrors(log)
        """Errors of the scoring worker (stage ``score-worker``)."""
        self._abandon = threading.Event()
        self._dropped: collections.Counter[tuple[str, str]] = collections.Counter()  # (kind, reason) -> records
        self._last_drop: tuple[float, str] | None = None
        self._held: list[tuple[str, list[Any]]] = []  # alerts/labels/model events the spool could not take yet
        self._held_lock = threading.RLock()
        self._disk: dict[str, int] = {}  # state directory -> free bytes (probe thread)
        self._losses: tuple[int, float] = (0, 0.0)  # overload losses seen by health(), when they last grew

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
        if self._started_mono is not None:
            raise RuntimeError("Service already started")
        import torch

        from pdm_edge.alerts.publisher import ResultPublisher
        from pdm_edge.feedback import Feedback, LabelListener
        from pdm_edge.ingest import Ingestor
        from pdm_edge.registry import Registry
        from pdm_edge.store import open_store
        from pdm_edge.store.spool import Spool, SpoolWriter

        cfg = self.config
        self._started_mono = time.monotonic()
        try:
            torch.set_num_threads(cfg.service.torch_threads)
            self.store = open_store(cfg.store)
            self.spool = Spool(cfg.spool.path, cfg.spool.max_records)
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
            self.ingestor = Ingestor(cfg)
            self.results = ResultPublisher(cfg.mqtt, cfg.alerts, cfg.appliance_id).start()
            self.labels = LabelListener(cfg.mqtt, cfg.appliance_id, self.feedback.submit,
                                        deadletter=cfg.ingest.deadletter,
                                        require_identity=cfg.feedback.mqtt_label_identity).start()
            self.http = HttpServer(cfg.service.http, self.metrics, self.health)
            try:
                self.http.start()
            except OSError as exc:
                raise PdmEdgeError(f"cannot serve /healthz and /metrics on {cfg.service.http}: {exc.strerror or exc}") from None
            self._heartbeat = time.monotonic()
            self._worker = threading.Thread(
                target=lambda: run_supervised("score-worker", self._work, self.errors, stopped=self._worker_stop.is_set),
                name="score-worker", daemon=True)
            self._worker.start()
            self.ingestor.start()  # last: windows start to flow
            self._spawn(self._probe_loop, "health-probe")
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

        self.labels.stop()
        self.feedback.stop()  # after one last sync: every label is in the spool before it drains
        self.ingestor.stop(timeout=left(reserve))  # retained "offline"; queued chunks windowed
        self._worker_stop.set()
        assert self._worker is not None
        self._worker.join(left(reserve))
        unscored, unfinished = 0, []
        if self._worker.is_alive():
            self._abandon.set()  # the worker ends after its current batch; the rest is counted dropped
            self._worker.join(max(30.0, left()))
            unscored = self._dropped.get(("window", "stop"), 0)
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
        self._drain_backlog()
        return []

    def _close_all(self) -> None:
        """Close whatever is open (after a failed start, or at the end of stop)."""
        self._closed.set()
        self._worker_stop.set()
        for name in ("labels", "ingestor"):
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

    # -- the scoring worker -------------------------------------------------------------------
    def _work(self) -> None:
        q = self.ingestor.windows
        batch_max = self.config.service.score_batch
        while True:
            self._heartbeat = time.monotonic()
            if self._abandon.is_set():
                self._drop_queued_windows(q)
                return
            try:
                first = q.get(timeout=self.IDLE_POLL_S)
            except queue.Empty:
                if self._worker_stop.is_set():
                    return
                if any(state != "calibrating" for state in self.streams.backlogged().values()):
                    self._drain_backlog()
                continue
            batch = [first]
            while len(batch) < batch_max:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            except Exception as exc:  # never let the worker die: count, log, go on
                self._worker_error(exc, batch[0].stream)
            with self._lock:
                self._processed += len(batch)

    def _process(self, batch: list[Window]) -> None:
        """One batch through the pipeline; every side effect once per batch."""
        self.metrics.windows_in.inc(len(batch))
        try:
            self.feedback.observe_many(batch)
        except Exception as exc:
            self._worker_error(exc, batch[0].stream)
        t0 = time.perf_counter()
        try:
            pairs = self.scoring.handle_many(batch)
        except Exception as exc:
            self._worker_error(exc, batch[0].stream)
            pairs = []
            for w in batch:
                try:
                    pairs += self.scoring.handle_many([w])
                except Exception as exc1:
                    self._worker_error(exc1, w.stream)
                    self._count_dropped("window", "scoring_failed", 1)
        self.metrics.scoring_latency.observe(time.perf_counter() - t0)
        self.metrics.score_batch.observe(len(batch))
        if self.hooks.on_window is not None:
            for w in batch:
                self._hook(self.hooks.on_window, w, self.streams.state(w.stream))
        self._emit(pairs)

    def _emit(self, pairs: list[tuple[Window, Score]]) -> None:
        """A scored batch's side effects, one call each: scores and condition indicators to
        the spool, metrics, alerts and MQTT
        (:meth:`~pdm_edge.alerts.publisher.ResultPublisher.handle_many`), alert records to the
        spool and their windows held. (Replay candidates went to the learning loop from the
        scoring stage's sink, one record per stream.)"""
        if not pairs:
            return
        self._spool_put("score", [sc for _, sc in pairs])
        self._spool_conditions([w for w, _ in pairs])
        per_stream = collections.Counter(w.stream for w, _ in pairs)
        with self._lock:
            self._scored.update(per_stream)
        for stream, n in per_stream.items():
            self.metrics.windows_scored.labels(*stream.split("/")).inc(n)
        if self.hooks.on_score is not None:
            for win, sc in pairs:
                self._hook(self.hooks.on_score, win, sc)
        alerts = self.results.handle_many([(sc, w.end_ns) for w, sc in pairs])
        if not alerts:
            return
        self._spool_put("alert", [a for _, a in alerts])
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
            if self.hooks.on_alert is not None:
                self._hook(self.hooks.on_alert, a, win)

    def _spool_conditions(self, windows: list[Window]) -> None:
        """Spool the condition indicators (ISO 20816-3 velocity and zone, RMS, peak, crest factor,
        kurtosis, band energies: :mod:`pdm_edge.condition`) of the scored windows. A failure
        here is logged and counted; it never costs a score."""
        from pdm_edge import condition

        def zones(w: Window) -> Any:
            sc = self.config.sensor(w.site, w.machine, w.sensor)
            return sc.severity_zones_mm_s if sc is not None else condition.GROUP2_RIGID_MM_S

        try:
            self._spool_put("condition", condition.for_windows(windows, zones))
        except Exception:
            self.metrics.worker_errors.inc()
            log.exception("condition indicators of %d windows failed", len(windows))

    def _drain_backlog(self) -> None:
        """Score (or collect) every backlog of a stream that is no longer calibrating."""
        try:
            self._emit(self.scoring.drain(timeout=0.0))
        except Exception as exc:
            self._worker_error(exc, None)

    def _worker_error(self, exc: BaseException, stream: str | None) -> None:
        """An exception in the scoring worker: counted (``pdm_edge_worker_errors_total`` and the
        stage errors), logged rate-limited with the stream, and shown in /healthz."""
        self.metrics.worker_errors.inc()
        self.errors.record("score-worker", exc, stream)

    def _count_dropped(self, kind: str, reason: str, n: int) -> None:
        with self._lock:
            self._dropped[(kind, reason)] += n
            self._last_drop = (time.monotonic(), f"{kind}: {reason}")

    def _drop_queued_windows(self, q: Any) -> None:
        n = 0
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break
            n += 1
        if n:
            self._count_dropped("window", "stop", n)

    def _spool_put(self, kind: str, records: list[Any]) -> None:
        """Put records in the spool; what cannot go there is counted as dropped with a reason
        (and, when it can never be stored, kept in the dead-letter table); alerts, labels and
        model events that hit a write failure are held and put again with the next record."""
        with self._held_lock:
            if self._held:
                held, self._held = self._held, []
                for i, (hk, hrecs) in enumerate(held):
                    if not self._spool_put_once(hk, hrecs):  # it is held again; so is the rest
                        self._held.extend(held[i + 1:])
                        break
            self._spool_put_once(kind, records)

    def _spool_put_once(self, kind: str, records: list[Any]) -> bool:
        try:
            self.spool.put(kind, records)
            return True
        except (ValueError, TypeError, OverflowError) as exc:
            self.metrics.spool_errors.inc(len(records))
            self._count_dropped(kind, "invalid", len(records))
            log_event(log, logging.ERROR, "spool_put_refused", kind=kind, records=len(records), error=str(exc)[:300])
            for r in records:
                try:
                    self.spool.deadletter(kind, repr(r), f"refused by the spool: {exc}")
                except StoreError:
                    pass
            return True  # nothing to retry: they can never be stored
        except StoreError as exc:
            self.metrics.spool_errors.inc(len(records))
            if kind != "score" and sum(len(r) for _, r in self._held) + len(records) <= self.MAX_HELD_RECORDS:
                self._held.append((kind, list(records)))
                reason = "spool_write_failed_held"
            else:
                self._count_dropped(kind, "spool_write_failed", len(records))
                reason = "spool_write_failed"
            self.errors.record("spool-put", exc, None)
            log_event(log, logging.ERROR, "spool_put_failed", kind=kind, records=len(records), outcome=reason,
                      error=str(exc)[:300])
            return False

    def _hook(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("service hook %r failed", fn)

    # -- events from the scoring stage and the registry ---------------------------------------
    _LEARNING_EVENTS = {"queued": "training_queued", "rejected": "rejected", "failed": "training_failed",
                        "interrupted": "training_interrupted", "awaiting_confirmation": "awaiting_confirmation"}
    _LEARNING_LOGS = {"training": "training_started", "promoted": "training_promoted"}

    def _on_learning_event(self, stream: str, event: str, version: str, detail: str) -> None:
        """Learning-loop listener (its thread): ``queued``, ``training``, ``promoted``,
        ``rejected``, ``failed``, ``interrupted``. Promotions reach the store through the
        registry listener (:meth:`_on_model_change`); the others are stored here as model events
        (``training_queued``, ``rejected``, ``training_failed``, ``training_interrupted``)."""
        from pdm_edge.store.base import ModelEvent

        site, machine, sensor = stream.split("/")
        if event in ("promoted", "rejected", "failed", "interrupted", "awaiting_confirmation"):
            self.metrics.training_runs.labels(site, machine, sensor, event).inc()
        name = self._LEARNING_EVENTS.get(event)
        level = logging.ERROR if event == "failed" else logging.INFO
        log_event(log, level, name or self._LEARNING_LOGS.get(event, f"training_{event}"), stream=stream, version=version or None, detail=detail)
        if name is not None:
            self._spool_put("model_event", [ModelEvent(site, machine, time.time_ns(), name, version, detail)])
            if self.hooks.on_model_event is not None:
                self._hook(self.hooks.on_model_event, stream, name, detail)

    def _on_model_change(self, rec: Any) -> None:
        """Registry listener: a promotion or rollback becomes a model event in the store.
        The first version of a stream (trigger ``initial``, nothing active before) is stored as
        ``calibrated`` with a summary of its training; later ones as ``promoted`` /
        ``rolled_back``."""
        from pdm_edge.store.base import ModelEvent

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
        if self.hooks.on_model_event is not None:
            self._hook(self.hooks.on_model_event, rec.stream, event, detail)

    # -- background helpers -------------------------------------------------------------------
    def _probe_loop(self) -> None:
        while True:
            try:
                self.store.server_info()
                ok, err = True, None
            except StoreError as exc:
                ok, err = False, str(exc)
            except Exception as exc:  # a store bug must not kill the probe
                ok, err = False, repr(exc)
            if ok != self._store_reachable:
                log_event(log, logging.INFO if ok else logging.WARNING, "store_reachable" if ok else "store_unreachable",
                          backend=self.config.store.backend, error=err)
            self._store_reachable, self._store_error, self._store_probe_at = ok, err, time.monotonic()
            self._check_disk()
            if self._closed.wait(self.PROBE_INTERVAL_S):
                return

    def state_dirs(self) -> list[str]:
        """The directories the appliance writes its state to (spool, SQLite store, registry,
        label book), absolute, without duplicates."""
        cfg = self.config
        dirs = [os.path.dirname(os.path.abspath(cfg.spool.path)), os.path.abspath(cfg.registry.dir),
                os.path.abspath(cfg.feedback.state_dir)]
        if cfg.store.backend == "sqlite":
            dirs.append(os.path.dirname(os.path.abspath(cfg.store.sqlite_path)))
        return sorted(set(dirs))

    def _check_disk(self) -> None:
        """Free bytes of every state directory (for /healthz and /metrics); logs a change of state."""
        threshold = self.config.service.min_free_bytes
        free: dict[str, int] = {}
        devices: set[int] = set()
        for d in self.state_dirs():  # one line per filesystem (the first directory on it)
            try:
                dev = os.stat(d).st_dev
                if dev in devices:
                    continue
                devices.add(dev)
                free[d] = int(shutil.disk_usage(d).free)
            except OSError:
                continue
        was_low = {d for d, n in self._disk.items() if n < threshold}
        now_low = {d for d, n in free.items() if n < threshold}
        for d in sorted(now_low - was_low):
            log_event(log, logging.ERROR, "disk_low", directory=d, free_bytes=free[d], min_free_bytes=threshold)
        for d in sorted(was_low - now_low):
            log_event(log, logging.INFO, "disk_ok", directory=d, free_bytes=free.get(d))
        self._disk = free

    def _watchdog_loop(self, interval_s: float) -> None:
        stalled = False
        while not self._closed.wait(interval_s):
            age = time.monotonic() - self._heartbeat
            alive = self._worker is not None and self._worker.is_alive()
            if self._stopping.is_set() or (alive and age < 2 * interval_s):
                sd_notify("WATCHDOG=1")
                stalled = False
            elif not stalled:
                stalled = True
                log_event(log, logging.ERROR, "watchdog_withheld", worker_alive=alive, heartbeat_age_s=age)

    # -- observation --------------------------------------------------------------------------
    def _streams(self) -> list[str]:
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
            with self._lock:
                processed = self._processed
            idle = (st.windowed >= st.accepted and st.chunk_queue_depth == 0 and st.window_queue_depth == 0
                    and processed >= st.windows and not self.streams.busy()
                    and (not spool or self.spool.depth() == 0) and now - quiet_since >= settle_s)
            if idle:
                return True
            time.sleep(0.05)
        return False

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` document: ``status`` (``ok`` / ``degraded`` / ``down``),
        ``reasons``, broker and store reachability, spool, queues, worker liveness and every
        stream's state, model version and counts; times in seconds."""
        now = time.monotonic()
        ing = self.ingestor.stats()
        sp = self.writer.stats()
        res = self.results.stats()
        lab = self.labels.stats()
        reasons: list[str] = []
        if not ing.connected:
            reasons.append(f"MQTT broker {self.config.mqtt.broker} unreachable")
        reachable = self._store_ok(sp)
        if self._store_reachable is False:
            reasons.append(f"store unreachable: {self._store_error}")
        elif sp.connected is False:
            reasons.append(f"store writes failing: {sp.last_error}")
        if sp.oldest_age_s is not None and sp.oldest_age_s > self.SPOOL_LAG_DEGRADED_S:
            reasons.append(f"spool backing up: {sp.depth} records, oldest {sp.oldest_age_s:.0f} s")
        if sp.last_rejected_age_s is not None and sp.last_rejected_age_s <= RECENT_S:
            reasons.append(f"store refused records for good ({sp.rejected} in all, {sp.deadletter_depth} in the spool's "
                           f"dead-letter table); last {sp.last_rejected_age_s:.0f} s ago: {(sp.last_rejected or '')[:200]}")
        threshold = self.config.service.min_free_bytes
        for d, free in sorted(self._disk.items()):
            if free < threshold:
                reasons.append(f"disk almost full: {d} has {free / 2**20:.1f} MiB free "
                               f"(< service.min_free_bytes {threshold / 2**20:.0f} MiB); new results may be dropped")
        with self._lock:
            last_drop = self._last_drop
        dropped = {f"{k}:{r}": n for (k, r), n in sorted(self._dropped_snapshot().items())}
        with self._held_lock:
            held = sum(len(r) for _, r in self._held)
        if last_drop is not None and now - last_drop[0] <= RECENT_S:
            reasons.append(f"records dropped ({', '.join(f'{k} {n}' for k, n in dropped.items())}); "
                           f"last {now - last_drop[0]:.0f} s ago ({last_drop[1]})")
        if held:
            reasons.append(f"{held} alert/label/model-event record(s) held in memory: the spool cannot be written")
        icfg = self.config.ingest
        for name, depth, cap, nbytes, cap_bytes in (
                ("chunk", ing.chunk_queue_depth, icfg.queue_size, ing.chunk_queue_bytes, icfg.chunk_queue_max_bytes),
                ("window", ing.window_queue_depth, icfg.window_queue_size, ing.window_queue_bytes, icfg.window_queue_max_bytes)):
            if depth >= 0.9 * cap or nbytes >= 0.9 * cap_bytes:
                reasons.append(f"overloaded: {name} queue {depth}/{cap} items, {nbytes / 2**20:.0f}/{cap_bytes / 2**20:.0f} MiB "
                               "(the scorer is not keeping up)")
        lost = ing.deadletters.get("queue_full", 0) + (self.streams.dropped_backlog if self.streams else 0)
        if lost != self._losses[0]:
            self._losses = (lost, now)
        if lost and now - self._losses[1] <= RECENT_S:
            reasons.append(f"overload losses: {ing.deadletters.get('queue_full', 0)} chunk(s) dead-lettered as queue_full, "
                           f"{self.streams.dropped_backlog if self.streams else 0} calibration-backlog window(s) dropped")
        for stage_errors in (self.ingestor.errors, self.writer.errors, self.errors):
            reasons.extend(stage_errors.reasons())
        streams: dict[str, Any] = {}
        with self._lock:
            scored = dict(self._scored)
        all_streams = self._streams()
        states = self.streams.states()
        for name in all_streams:
            if states.get(name) == "failed":
                reasons.append(f"{name}: calibration failed")
        for name in all_streams[:self.HEALTH_MAX_STREAMS]:
            state = states.get(name, "unknown")
            s = ing.streams.get(name)
            streams[name] = {
                "state": state,
                "version": self.scoring.version(name),
                "windows": s.windows if s else 0,
                "scored": scored.get(name, 0),
                "last_sample_ns": s.last_chunk_ns if s else None,
            }
        alive = self.worker_alive()
        if not alive:
            status = "down"
            reasons.insert(0, "scoring worker not running")
        else:
            status = "degraded" if reasons else "ok"
        return {
            "status": status,
            "reasons": reasons,
            "appliance_id": self.config.appliance_id,
            "version": __version__,
            "uptime_s": round(now - (self._started_mono or now), 3),
            "broker": {"address": self.config.mqtt.broker, "connected": ing.connected, "results_connected": res.connected,
                       "labels_connected": lab.connected},
            "store": {"backend": self.config.store.backend, "reachable": reachable, "error": self._store_error,
                      "probe_age_s": None if self._store_probe_at is None else round(now - self._store_probe_at, 3),
                      "writer": sp.state, "last_error": sp.last_error},
            "spool": {"depth": sp.depth, "oldest_age_s": sp.oldest_age_s, "drained": sp.drained, "dropped": sp.dropped,
                      "rejected": sp.rejected, "deadletter_depth": sp.deadletter_depth,
                      "last_rejected": sp.last_rejected},
            "dropped": dropped,
            "held_records": held,
            "disk": {"min_free_bytes": threshold, "free_bytes": dict(self._disk)},
            "stages": {"errors": {**self.ingestor.errors.errors(), **self.writer.errors.errors(), **self.errors.errors()},
                       "restarts": {**self.ingestor.errors.restarts(), **self.writer.errors.restarts(),
                                    **self.errors.restarts()}},
            "queues": {"chunks": ing.chunk_queue_depth, "windows": ing.window_queue_depth,
                       "chunk_capacity": self.config.ingest.queue_size, "window_capacity": self.config.ingest.window_queue_size},
            "worker": {"alive": alive, "heartbeat_age_s": round(now - self._heartbeat, 3)},
            "ingest": {"received": ing.received, "accepted": ing.accepted, "windows": ing.windows,
                       "deadlettered": ing.deadlettered, "deadletters": dict(ing.deadletters),
                       "windows_dropped": dict(ing.windows_dropped), "events": dict(ing.events)},
            "alerts": {"raised": res.alerts_raised, "cleared": res.alerts_cleared,
                       "open": res.alerts_raised - res.alerts_cleared},
            "streams": streams,
            "streams_not_listed": max(0, len(all_streams) - self.HEALTH_MAX_STREAMS),
            "training": self.learning.status() if self.learning is not None else None,
        }

    def _store_ok(self, sp: Any) -> bool | None:
        """The store is reachable when the last probe answered and the last write (if any)
        succeeded; ``None`` before the first probe."""
        if sp.connected is False or self._store_reachable is False:
            return False
        return self._store_reachable

    def _metrics_snapshot(self) -> Mapping[str, Any]:
        if self._started_mono is None or self.ingestor is None or self.writer is None:
            return {"version": __version__}
        return {
            "version": __version__,
            "uptime_s": time.monotonic() - self._started_mono,
            "mqtt_connected": {"ingest": self.ingestor.stats().connected, "results": self.results.stats().connected,
                               "labels": self.labels.stats().connected},
            "ingest": self.ingestor.stats(),
            "queue_capacity": {"chunks": self.config.ingest.queue_size, "windows": self.config.ingest.window_queue_size},
            "spool": self.writer.stats(),
            "store_reachable": self._store_ok(self.writer.stats()),
            "results": self.results.stats(),
            "labels": self.labels.stats(),
            "streams": {s: {"state": self.streams.state(s)} for s in self._streams()},
            "worker_heartbeat_age_s": time.monotonic() - self._heartbeat,
            "stage_errors": {**self._STAGES, **self.ingestor.errors.errors(), **self.writer.errors.errors(), **self.errors.errors()},
            "stage_restarts": {**self._STAGES, **self.ingestor.errors.restarts(), **self.writer.errors.restarts(),
                               **self.errors.restarts()},
            "records_dropped": self._dropped_snapshot(),
            "disk_free_bytes": dict(self._disk),
        }

    def _dropped_snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            out = dict(self._dropped)
        for reason, n in self.ingestor.stats().windows_dropped.items():
            out[("window", reason)] = out.get(("window", reason), 0) + n
        if self.streams is not None and self.streams.dropped_backlog:
            out[("window", "calibration_backlog")] = self.streams.dropped_backlog
        return out


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
