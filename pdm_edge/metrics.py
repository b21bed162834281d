"""Prometheus metrics and the health endpoint of the running appliance (``pdm-edge run``).

:class:`Metrics` owns its own :class:`prometheus_client.CollectorRegistry` (nothing is
registered globally, so two services in one process, or one per test, never collide). It holds
two kinds of metrics:

- **instruments** the scoring worker updates as it goes (:attr:`Metrics.windows_in`,
  :attr:`Metrics.windows_scored`, :attr:`Metrics.scoring_latency`, :attr:`Metrics.alerts`,
  :attr:`Metrics.training_runs`, :attr:`Metrics.active_model`, ...);
- **snapshot metrics** read at scrape time from the stages' own counters through a
  ``snapshot`` callable (:class:`SnapshotCollector`): ingestion (messages, dead letters by
  reason, queue depths), spool and store, MQTT connections, per-stream state. The stages
  already count these; copying them into separate counters would give two sources of truth.

Every metric name starts with ``pdm_edge_``; counters end in ``_total``, durations are in
seconds, depths in items. The full list is :data:`METRIC_NAMES`.

:class:`HttpServer` serves, on ``[service] http`` (``HOST:PORT``; port 0 picks a free one,
see :attr:`HttpServer.port`):

- ``GET /metrics``: the Prometheus text exposition format (version 0.0.4);
- ``GET /healthz``: a JSON document from the ``health`` callable; HTTP 200 when its ``status``
  is ``"ok"`` or ``"degraded"`` (the appliance works, something needs attention: broker or
  store unreachable, spool backing up), 503 when it is ``"down"`` (the scoring worker is not
  running) or the callable fails.

It is a :class:`http.server.ThreadingHTTPServer` in a daemon thread: a slow client cannot
block the pipeline, and the handlers only read snapshots.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdm_edge.errors import ConfigError

log = logging.getLogger(__name__)

STREAM_LABELS = ("site", "machine", "sensor")

METRIC_NAMES: tuple[str, ...] = (
    # instruments (updated by the service)
    "pdm_edge_windows_in_total",
    "pdm_edge_windows_scored_total",
    "pdm_edge_scoring_latency_seconds",
    "pdm_edge_score_batch_windows",
    "pdm_edge_alerts_total",
    "pdm_edge_training_runs_total",
    "pdm_edge_model_changes_total",
    "pdm_edge_active_model",
    "pdm_edge_worker_errors_total",
    "pdm_edge_spool_errors_total",
    # snapshots (read at scrape time)
    "pdm_edge_build_info",
    "pdm_edge_uptime_seconds",
    "pdm_edge_mqtt_connected",
    "pdm_edge_mqtt_messages_received_total",
    "pdm_edge_chunks_accepted_total",
    "pdm_edge_ingest_windows_total",
    "pdm_edge_deadletters_total",
    "pdm_edge_stream_events_total",
    "pdm_edge_queue_depth",
    "pdm_edge_queue_capacity",
    "pdm_edge_chunk_queue_high_water",
    "pdm_edge_spool_depth",
    "pdm_edge_spool_oldest_age_seconds",
    "pdm_edge_spool_drained_total",
    "pdm_edge_spool_dropped_total",
    "pdm_edge_spool_rejected_total",
    "pdm_edge_store_reachable",
    "pdm_edge_results_dropped_total",
    "pdm_edge_results_unacked",
    "pdm_edge_labels_received_total",
    "pdm_edge_stream_state",
    "pdm_edge_worker_heartbeat_age_seconds",
    "pdm_edge_stage_errors_total",
    "pdm_edge_stage_restarts_total",
    "pdm_edge_records_dropped_total",
    "pdm_edge_spool_deadletter_records",
    "pdm_edge_disk_free_bytes",
    "pdm_edge_queue_bytes",
)
"""Every metric the appliance exposes (names as they appear in ``/metrics``)."""


class SnapshotCollector(Collector):
    """A collector that turns ``snapshot()`` into metric families at every scrape.

    ``snapshot`` returns a mapping (every key optional; missing parts are left out)::

        {"version": str, "uptime_s": float,
         "mqtt_connected": {client: bool},
         "ingest": IngestStats-like object,              # pdm_edge.ingest.IngestStats
         "queue_capacity": {queue: int},
         "spool": SpoolStats-like object,                # pdm_edge.store.spool.SpoolStats
         "store_reachable": bool | None,
         "results": PublisherStats-like object,          # pdm_edge.alerts.publisher.PublisherStats
         "labels": ListenerStats-like object,            # pdm_edge.feedback.listener.ListenerStats
         "streams": {"site/machine/sensor": {"state": str}},
         "worker_heartbeat_age_s": float,
         "stage_errors": {stage: int}, "stage_restarts": {stage: int},
         "records_dropped": {(kind, reason): int},
         "disk_free_bytes": {directory: int}}

    A snapshot that raises is logged and yields nothing (a scrape never fails because a stage
    is half-started).
    """

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[Any]:
        return []  # names are only known at scrape time; nothing to check at registration

    def collect(self) -> Iterable[Any]:
        try:
            s = self.snapshot()
        except Exception:
            log.exception("metrics snapshot failed")
            return []
        return list(_families(s))


def _families(s: Mapping[str, Any]) -> Iterable[Any]:
    if "version" in s:
        g = GaugeMetricFamily("pdm_edge_build_info", "pdm-edge version (value 1).", labels=["version"])
        g.add_metric([str(s["version"])], 1.0)
        yield g
    if "uptime_s" in s:
        yield GaugeMetricFamily("pdm_edge_uptime_seconds", "Seconds since the service started.", value=float(s["uptime_s"]))
    if s.get("mqtt_connected"):
        g = GaugeMetricFamily("pdm_edge_mqtt_connected", "1 while the MQTT client is connected to the broker.", labels=["client"])
        for client, up in sorted(s["mqtt_connected"].items()):
            g.add_metric([client], 1.0 if up else 0.0)
        yield g
    ing = s.get("ingest")
    if ing is not None:
        yield CounterMetricFamily("pdm_edge_mqtt_messages_received", "MQTT messages received on the waveform topics.",
                                  value=ing.received)
        yield CounterMetricFamily("pdm_edge_chunks_accepted", "Waveform chunks that passed validation.", value=ing.accepted)
        yield CounterMetricFamily("pdm_edge_ingest_windows", "Windows cut by the ingestion stage.", value=ing.windows)
        ev = CounterMetricFamily("pdm_edge_stream_events", "Stream events: duplicate, gap_seq, gap_time, restart, rate_change.",
                                 labels=["event"])
        for name, n in sorted(ing.events.items()):
            ev.add_metric([name], n)
        yield ev
        yield GaugeMetricFamily("pdm_edge_chunk_queue_high_water", "Most chunks ever waiting in the chunk queue.",
                                value=ing.chunk_queue_high_water)
        depth = GaugeMetricFamily("pdm_edge_queue_depth", "Items waiting in a bounded queue.", labels=["queue"])
        depth.add_metric(["chunks"], ing.chunk_queue_depth)
        depth.add_metric(["windows"], ing.window_queue_depth)
        yield depth
    dl = CounterMetricFamily("pdm_edge_deadletters", "Rejected payloads by source (waveform, label) and reason.",
                             labels=["source", "reason"])
    for source, stats in (("waveform", ing), ("label", s.get("labels"))):
        if stats is not None:
            for reason, n in sorted(stats.deadletters.items()):
                dl.add_metric([source, reason], n)
    yield dl
    if s.get("queue_capacity"):
        cap = GaugeMetricFamily("pdm_edge_queue_capacity", "Bound of a queue (items).", labels=["queue"])
        for name, n in sorted(s["queue_capacity"].items()):
            cap.add_metric([name], n)
        yield cap
    sp = s.get("spool")
    if sp is not None:
        yield GaugeMetricFamily("pdm_edge_spool_depth", "Records waiting in the durable spool.", value=sp.depth)
        yield GaugeMetricFamily("pdm_edge_spool_oldest_age_seconds", "Age of the oldest waiting spool record (0 when empty).",
                                value=sp.oldest_age_s or 0.0)
        yield CounterMetricFamily("pdm_edge_spool_drained", "Records written from the spool to the store.", value=sp.drained)
        yield CounterMetricFamily("pdm_edge_spool_dropped", "Scores dropped by the spool bound (life of the spool file).",
                                  value=sp.dropped)
        yield CounterMetricFamily("pdm_edge_spool_rejected", "Records the store refused for good (life of the spool file).",
                                  value=sp.rejected)
    if "store_reachable" in s:
        val = s["store_reachable"]
        yield GaugeMetricFamily("pdm_edge_store_reachable", "1 when the store answered the last probe and write, 0 when not, "
                                "-1 before the first probe.", value=-1.0 if val is None else float(bool(val)))
    res = s.get("results")
    if res is not None:
        d = CounterMetricFamily("pdm_edge_results_dropped", "Results not sent over MQTT: scores while disconnected, "
                                "QoS 1 messages refused by a full queue.", labels=["kind"])
        d.add_metric(["score"], res.scores_dropped)
        d.add_metric(["qos1"], res.qos1_dropped)
        yield d
        yield GaugeMetricFamily("pdm_edge_results_unacked", "Alert/status messages not yet acknowledged by the broker.",
                                value=res.unacked)
    lab = s.get("labels")
    if lab is not None:
        yield CounterMetricFamily("pdm_edge_labels_received", "Label messages received over MQTT.", value=lab.received)
    if s.get("streams"):
        st = GaugeMetricFamily("pdm_edge_stream_state", "1 for the current scoring state of each stream "
                               "(collecting, calibrating, scoring, failed, unknown).", labels=[*STREAM_LABELS, "state"])
        for stream, info in sorted(s["streams"].items()):
            site, machine, sensor = stream.split("/")
            st.add_metric([site, machine, sensor, str(info.get("state"))], 1.0)
        yield st
    if "worker_heartbeat_age_s" in s:
        yield GaugeMetricFamily("pdm_edge_worker_heartbeat_age_seconds", "Seconds since the scoring worker last looped.",
                                value=float(s["worker_heartbeat_age_s"]))
    for key, name, text in (("stage_errors", "pdm_edge_stage_errors", "Exceptions caught in a supervised stage."),
                            ("stage_restarts", "pdm_edge_stage_restarts", "Restarts of a supervised stage's loop.")):
        if key in s:
            c = CounterMetricFamily(name, text, labels=["stage"])
            for stage, n in sorted(s[key].items()):
                c.add_metric([stage], n)
            yield c
    if "records_dropped" in s:
        c = CounterMetricFamily("pdm_edge_records_dropped", "Windows and records not handled durably, by kind and reason "
                                "(time_backwards, stop, scoring_failed, invalid, spool_write_failed).", labels=["kind", "reason"])
        for (kind, reason), n in sorted(s["records_dropped"].items()):
            c.add_metric([kind, reason], n)
        yield c
    if sp is not None and hasattr(sp, "deadletter_depth"):
        yield GaugeMetricFamily("pdm_edge_spool_deadletter_records", "Records in the spool's dead-letter table (refused "
                                "for good by the store, with their reason).", value=sp.deadletter_depth)
    if s.get("disk_free_bytes"):
        g = GaugeMetricFamily("pdm_edge_disk_free_bytes", "Free bytes in each state directory.", labels=["directory"])
        for d, n in sorted(s["disk_free_bytes"].items()):
            g.add_metric([d], n)
        yield g
    if ing is not None and hasattr(ing, "chunk_queue_bytes"):
        g = GaugeMetricFamily("pdm_edge_queue_bytes", "Bytes of samples waiting in a bounded queue.", labels=["queue"])
        g.add_metric(["chunks"], ing.chunk_queue_bytes)
        g.add_metric(["windows"], ing.window_queue_bytes)
        yield g


FLEET_METRIC_NAMES: tuple[str, ...] = (
    "pdm_edge_fleet_rounds_total",
    "pdm_edge_fleet_prior_round",
    "pdm_edge_fleet_last_round_participants",
    "pdm_edge_fleet_last_round_timestamp_seconds",
    "pdm_edge_fleet_last_train_cpu_seconds",
    "pdm_edge_fleet_last_round_bytes",
)
"""Metrics of fleet learning (:mod:`pdm_edge.fleet`), exposed when ``[fleet] enabled``."""


class FleetCollector(Collector):
    """Fleet-learning metrics read at scrape time from the appliance's fleet log
    (``{state_dir}/fleet/rounds.jsonl``, written by :mod:`pdm_edge.fleet.client_app`, which runs
    in the SuperNode's process, not in the service): rounds taken part in by event (``trained``:
    an update sent; ``prior``: a prior received and stored), and per machine class the round of
    the stored prior, its participants, when it arrived, the CPU seconds of the last local
    training and the bytes of the last round (``in``: global adapter + prior package, ``out``:
    the update)."""

    def __init__(self, state_dir: Any) -> None:
        from pathlib import Path

        self.path = Path(state_dir) / "fleet" / "rounds.jsonl"

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        events: list[dict[str, Any]] = []
        try:
            with open(self.path) as fh:
                for line in fh:
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("fleet log %s unreadable: %s", self.path, exc)
        counts: dict[tuple[str, str], int] = {}
        last: dict[str, dict[str, Any]] = {}
        for e in events:
            k = (str(e.get("machine_class")), str(e.get("event")))
            counts[k] = counts.get(k, 0) + 1
            last.setdefault(k[0], {})[k[1]] = e
        c = CounterMetricFamily("pdm_edge_fleet_rounds", "Fleet rounds this appliance took part in, by machine class and "
                                "event (trained: update sent; prior: prior stored).", labels=["machine_class", "event"])
        for (klass, ev), n in sorted(counts.items()):
            c.add_metric([klass, ev], n)
        yield c
        rnd = GaugeMetricFamily("pdm_edge_fleet_prior_round", "Round of the stored fleet prior.", labels=["machine_class"])
        part = GaugeMetricFamily("pdm_edge_fleet_last_round_participants", "Participants of the stored prior's round.",
                                 labels=["machine_class"])
        ts = GaugeMetricFamily("pdm_edge_fleet_last_round_timestamp_seconds", "When the last prior arrived (Unix time).",
                               labels=["machine_class"])
        cpu = GaugeMetricFamily("pdm_edge_fleet_last_train_cpu_seconds", "CPU seconds of the last local fleet training.",
                                labels=["machine_class"])
        nbytes = GaugeMetricFamily("pdm_edge_fleet_last_round_bytes", "Bytes of the last round's arrays and packages.",
                                   labels=["machine_class", "direction"])
        for klass, evs in sorted(last.items()):
            p, t = evs.get("prior"), evs.get("trained")
            if p is not None:
                rnd.add_metric([klass], float(p.get("round") or 0))
                part.add_metric([klass], float(len(p.get("participants") or [])))
                ts.add_metric([klass], float(p.get("ts_ns", 0)) / 1e9)
            if t is not None:
                cpu.add_metric([klass], float(t.get("cpu_s", 0.0)))
                nbytes.add_metric([klass, "in"], float(t.get("bytes_in", 0)) + float((p or {}).get("bytes", 0)))
                nbytes.add_metric([klass, "out"], float(t.get("bytes_out", 0)))
        yield from (rnd, part, ts, cpu, nbytes)


class Metrics:
    """The appliance's metrics on a registry of their own.

    Args:
        snapshot: see :class:`SnapshotCollector`; ``None`` for the instruments alone.
        registry: the registry to use; a fresh :class:`CollectorRegistry` when None.
    """

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]] | None = None, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.windows_in = Counter("pdm_edge_windows_in", "Windows taken from the window queue by the scoring worker.", registry=r)
        self.windows_scored = Counter("pdm_edge_windows_scored", "Windows scored (score stored and published).",
                                      STREAM_LABELS, registry=r)
        self.scoring_latency = Histogram("pdm_edge_scoring_latency_seconds", "Wall time of one scoring batch (features, "
                                         "encoder, score) in the scoring worker, seconds.", buckets=self.LATENCY_BUCKETS, registry=r)
        self.score_batch = Histogram("pdm_edge_score_batch_windows", "Windows per scoring batch.", buckets=self.BATCH_BUCKETS,
                                     registry=r)
        self.alerts = Counter("pdm_edge_alerts", "Alert records by state (raised, cleared).", [*STREAM_LABELS, "state"], registry=r)
        self.training_runs = Counter("pdm_edge_training_runs", "Adapter trainings (calibrations, retrains) by result.",
                                     [*STREAM_LABELS, "result"], registry=r)
        self.model_changes = Counter("pdm_edge_model_changes", "Registry promotions and rollbacks.", [*STREAM_LABELS, "event"],
                                     registry=r)
        self.active_model = Gauge("pdm_edge_active_model", "1 for the model version that scores each stream.",
                                  [*STREAM_LABELS, "version"], registry=r)
        self.worker_errors = Counter("pdm_edge_worker_errors", "Unexpected errors caught in the scoring worker.", registry=r)
        self.spool_errors = Counter("pdm_edge_spool_errors", "Records that could not be put in the spool (disk failure).",
                                    registry=r)
        self._active: dict[tuple[str, str, str], str] = {}
        self._active_lock = threading.Lock()
        if snapshot is not None:
            r.register(SnapshotCollector(snapshot))

    def set_active_model(self, site: str, machine: str, sensor: str, version: str) -> None:
        """Make ``version`` the stream's one ``pdm_edge_active_model`` series (the old one is removed)."""
        key = (site, machine, sensor)
        with self._active_lock:
            old = self._active.get(key)
            if old == version:
                return
            if old is not None:
                try:
                    self.active_model.remove(site, machine, sensor, old)
                except KeyError:
                    pass
            self.active_model.labels(site, machine, sensor, version).set(1.0)
            self._active[key] = version

    def add_fleet(self, state_dir: Any) -> None:
        """Expose the fleet metrics of the appliance with this state directory (:class:`FleetCollector`)."""
        self.registry.register(FleetCollector(state_dir))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def parse_listen_address(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[v6]:PORT"``) of ``[service] http`` into its parts; port 0 is allowed
    (the OS picks a free port).

    Raises:
        ConfigError: key ``service.http``, for a missing host or a port outside 0..65535.
    """
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = v.rpartition(":")
    if not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError("service.http", f"{value!r} is not HOST:PORT with a port in 0..65535")
    return host, int(port_s)


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        import socket

        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class HttpServer:
    """``/metrics`` and ``/healthz`` on one address, in a daemon thread.

    Args:
        address: ``HOST:PORT`` (port 0: a free port; read :attr:`port` after :meth:`start`).
        metrics: what ``/metrics`` renders.
        health: returns the ``/healthz`` document (a JSON-ready dict with ``"status"``).

    Raises:
        ConfigError: a malformed address (from the constructor).
        OSError: the address cannot be bound (from :meth:`start`).
    """

    def __init__(self, address: str, metrics: Metrics, health: Callable[[], Mapping[str, Any]]) -> None:
        self.host, self._port = parse_listen_address(address)
        self.metrics = metrics
        self.health = health
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._bound: int | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when the address asked for port 0)."""
        return self._bound if self._bound is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HttpServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pdm-edge"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body, code, ctype = outer.metrics.render(), 200, CONTENT_TYPE_LATEST
                    except Exception as exc:  # pragma: no cover - a collector bug
                        log.exception("rendering /metrics failed")
                        body, code, ctype = f"metrics failed: {exc}\n".encode(), 500, "text/plain; charset=utf-8"
                elif path in ("/healthz", "/health"):
                    try:
                        doc = dict(outer.health())
                        code = 503 if doc.get("status") == "down" else 200
                    except Exception as exc:
                        log.exception("health check failed")
                        doc, code = {"status": "down", "reasons": [f"health check failed: {exc}"]}, 503
                    body, ctype = (json.dumps(doc, default=str) + "\n").encode(), "application/json"
                elif path == "/":
                    body, code, ctype = b"pdm-edge: /healthz /metrics\n", 200, "text/plain; charset=utf-8"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain; charset=utf-8"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s " + format, self.address_string(), *args)

        server = _Server((self.host, self._port), Handler)
        self._server = server
        self._bound = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
