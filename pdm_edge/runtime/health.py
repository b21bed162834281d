"""Health of the running appliance: the ``/healthz`` document and the ``/metrics`` snapshot.

- **Health** (:func:`health_document`): ``ok``; ``degraded`` with the reasons (broker
  unreachable, store unreachable or failing, spool backing up for more than
  :data:`SPOOL_LAG_DEGRADED_S`, a stream whose calibration failed, a supervised stage that
  failed in the last 5 minutes, records the store refused for good in the last 5 minutes (they
  are in the spool's dead-letter table), records that could not be written to the spool, a
  state directory with less than ``service.min_free_bytes`` free); ``down`` when the scoring
  worker is not running (HTTP 503). At most :data:`HEALTH_MAX_STREAMS` streams are listed (the
  rest are counted), so the document stays small whatever publishers do.
- **Probe** (:class:`Probe`): the store's reachability and the free space of every state
  directory, every few seconds, in the ``health-probe`` thread.

The functions read a :class:`~pdm_edge.runtime.service.Service` (its stages, worker, record
sink, probe and stream table); they never change it, except the time the overload losses last
grew.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from typing import Any

from pdm_edge import __version__
from pdm_edge.errors import StoreError
from pdm_edge.runtime.logging import log_event
from pdm_edge.supervision import RECENT_S

__all__ = ["HEALTH_MAX_STREAMS", "SPOOL_LAG_DEGRADED_S", "Probe", "dropped_snapshot", "health_document",
           "metrics_snapshot", "state_dirs", "store_ok"]

log = logging.getLogger(__name__)

SPOOL_LAG_DEGRADED_S = 60.0
"""A spool whose oldest record waits longer than this (seconds) makes the service degraded."""
HEALTH_MAX_STREAMS = 200
"""Streams listed in ``/healthz`` at most (the rest are counted)."""
_STAGES = {"ingest-window": 0, "score-worker": 0, "spool-writer": 0}


def state_dirs(cfg: Any) -> list[str]:
    """The directories the appliance writes its state to (spool, SQLite store, registry,
    label book), absolute, without duplicates."""
    dirs = [os.path.dirname(os.path.abspath(cfg.spool.path)), os.path.abspath(cfg.registry.dir),
            os.path.abspath(cfg.feedback.state_dir)]
    if cfg.store.backend == "sqlite":
        dirs.append(os.path.dirname(os.path.abspath(cfg.store.sqlite_path)))
    return sorted(set(dirs))


class Probe:
    """The ``health-probe`` thread's findings: whether the store answers
    (``store.server_info()``) and the free bytes of every state directory, every
    :attr:`INTERVAL_S` seconds; a change is logged (``store_reachable`` /
    ``store_unreachable``, ``disk_low`` / ``disk_ok``).

    Args:
        config: the appliance configuration.
        store: the results store.
    """

    INTERVAL_S = 5.0

    def __init__(self, config: Any, store: Any) -> None:
        self.config, self.store = config, store
        self.store_reachable: bool | None = None
        self.store_error: str | None = None
        self.probe_at: float | None = None
        self.disk: dict[str, int] = {}  # state directory -> free bytes
        self.losses: tuple[int, float] = (0, 0.0)  # overload losses seen by health_document, when they last grew

    def run(self, closed: threading.Event) -> None:
        """Probe until ``closed`` is set."""
        while True:
            try:
                self.store.server_info()
                ok, err = True, None
            except StoreError as exc:
                ok, err = False, str(exc)
            except Exception as exc:  # a store bug must not kill the probe
                ok, err = False, repr(exc)
            if ok != self.store_reachable:
                log_event(log, logging.INFO if ok else logging.WARNING, "store_reachable" if ok else "store_unreachable",
                          backend=self.config.store.backend, error=err)
            self.store_reachable, self.store_error, self.probe_at = ok, err, time.monotonic()
            self.check_disk()
            if closed.wait(self.INTERVAL_S):
                return

    def check_disk(self) -> None:
        """Free bytes of every state directory (for /healthz and /metrics); logs a change of state."""
        threshold = self.config.service.min_free_bytes
        free: dict[str, int] = {}
        devices: set[int] = set()
        for d in state_dirs(self.config):  # one line per filesystem (the first directory on it)
            try:
                dev = os.stat(d).st_dev
                if dev in devices:
                    continue
                devices.add(dev)
                free[d] = int(shutil.disk_usage(d).free)
            except OSError:
                continue
        was_low = {d for d, n in self.disk.items() if n < threshold}
        now_low = {d for d, n in free.items() if n < threshold}
        for d in sorted(now_low - was_low):
            log_event(log, logging.ERROR, "disk_low", directory=d, free_bytes=free[d], min_free_bytes=threshold)
        for d in sorted(was_low - now_low):
            log_event(log, logging.INFO, "disk_ok", directory=d, free_bytes=free.get(d))
        self.disk = free


def health_document(svc: Any) -> dict[str, Any]:
    """The ``/healthz`` document: ``status`` (``ok`` / ``degraded`` / ``down``),
    ``reasons``, broker and store reachability, spool, queues, worker liveness and every
    stream's state, model version and counts; times in seconds."""
    now = time.monotonic()
    ing = svc.ingestor.stats()
    sp = svc.writer.stats()
    res = svc.results.stats()
    lab = svc.labels.stats()
    reasons: list[str] = []
    if not ing.connected:
        reasons.append(f"MQTT broker {svc.config.mqtt.broker} unreachable")
    reachable = store_ok(svc, sp)
    if svc.probe.store_reachable is False:
        reasons.append(f"store unreachable: {svc.probe.store_error}")
    elif sp.connected is False:
        reasons.append(f"store writes failing: {sp.last_error}")
    if sp.oldest_age_s is not None and sp.oldest_age_s > SPOOL_LAG_DEGRADED_S:
        reasons.append(f"spool backing up: {sp.depth} records, oldest {sp.oldest_age_s:.0f} s")
    if sp.last_rejected_age_s is not None and sp.last_rejected_age_s <= RECENT_S:
        reasons.append(f"store refused records for good ({sp.rejected} in all, {sp.deadletter_depth} in the spool's "
                       f"dead-letter table); last {sp.last_rejected_age_s:.0f} s ago: {(sp.last_rejected or '')[:200]}")
    threshold = svc.config.service.min_free_bytes
    for d, free in sorted(svc.probe.disk.items()):
        if free < threshold:
            reasons.append(f"disk almost full: {d} has {free / 2**20:.1f} MiB free "
                           f"(< service.min_free_bytes {threshold / 2**20:.0f} MiB); new results may be dropped")
    last_drop = svc.sink.last_drop
    dropped = {f"{k}:{r}": n for (k, r), n in sorted(dropped_snapshot(svc).items())}
    held = svc.sink.held()
    if last_drop is not None and now - last_drop[0] <= RECENT_S:
        reasons.append(f"records dropped ({', '.join(f'{k} {n}' for k, n in dropped.items())}); "
                       f"last {now - last_drop[0]:.0f} s ago ({last_drop[1]})")
    if held:
        reasons.append(f"{held} alert/label/model-event record(s) held in memory: the spool cannot be written")
    icfg = svc.config.ingest
    for name, depth, cap, nbytes, cap_bytes in (
            ("chunk", ing.chunk_queue_depth, icfg.queue_size, ing.chunk_queue_bytes, icfg.chunk_queue_max_bytes),
            ("window", ing.window_queue_depth, icfg.window_queue_size, ing.window_queue_bytes, icfg.window_queue_max_bytes)):
        if depth >= 0.9 * cap or nbytes >= 0.9 * cap_bytes:
            reasons.append(f"overloaded: {name} queue {depth}/{cap} items, {nbytes / 2**20:.0f}/{cap_bytes / 2**20:.0f} MiB "
                           "(the scorer is not keeping up)")
    lost = ing.deadletters.get("queue_full", 0) + (svc.streams.dropped_backlog if svc.streams else 0)
    if lost != svc.probe.losses[0]:
        svc.probe.losses = (lost, now)
    if lost and now - svc.probe.losses[1] <= RECENT_S:
        reasons.append(f"overload losses: {ing.deadletters.get('queue_full', 0)} chunk(s) dead-lettered as queue_full, "
                       f"{svc.streams.dropped_backlog if svc.streams else 0} calibration-backlog window(s) dropped")
    cluster = svc.cluster.status() if getattr(svc, "cluster", None) is not None else None
    if cluster is not None and not cluster["connected"]:
        reasons.append(f"cluster membership connection to {svc.config.mqtt.broker} down (group {cluster['group']})")
    elif cluster is not None and not cluster["settled"]:
        reasons.append(f"cluster group {cluster['group']} not joined yet: no stream owned")
    for stage_errors in (svc.ingestor.errors, svc.writer.errors, svc.errors):
        reasons.extend(stage_errors.reasons())
    streams: dict[str, Any] = {}
    scored = svc.worker.scored()
    all_streams = svc.stream_names()
    states = svc.streams.states()
    for name in all_streams:
        if states.get(name) == "failed":
            reasons.append(f"{name}: calibration failed")
    for name in all_streams[:HEALTH_MAX_STREAMS]:
        state = states.get(name, "unknown")
        s = ing.streams.get(name)
        streams[name] = {
            "state": state,
            "version": svc.scoring.version(name),
            "windows": s.windows if s else 0,
            "scored": scored.get(name, 0),
            "last_sample_ns": s.last_chunk_ns if s else None,
        }
        if cluster is not None:
            streams[name]["owned"] = name in cluster["owned"]
    alive = svc.worker_alive()
    if not alive:
        status = "down"
        reasons.insert(0, "scoring worker not running")
    else:
        status = "degraded" if reasons else "ok"
    return {
        "status": status,
        "reasons": reasons,
        "appliance_id": svc.config.appliance_id,
        "version": __version__,
        "uptime_s": round(now - (svc.started_mono or now), 3),
        "broker": {"address": svc.config.mqtt.broker, "connected": ing.connected, "results_connected": res.connected,
                   "labels_connected": lab.connected},
        "store": {"backend": svc.config.store.backend, "reachable": reachable, "error": svc.probe.store_error,
                  "probe_age_s": None if svc.probe.probe_at is None else round(now - svc.probe.probe_at, 3),
                  "writer": sp.state, "last_error": sp.last_error},
        "spool": {"depth": sp.depth, "oldest_age_s": sp.oldest_age_s, "drained": sp.drained, "dropped": sp.dropped,
                  "rejected": sp.rejected, "deadletter_depth": sp.deadletter_depth,
                  "last_rejected": sp.last_rejected},
        "dropped": dropped,
        "held_records": held,
        "disk": {"min_free_bytes": threshold, "free_bytes": dict(svc.probe.disk)},
        "stages": {"errors": {**svc.ingestor.errors.errors(), **svc.writer.errors.errors(), **svc.errors.errors()},
                   "restarts": {**svc.ingestor.errors.restarts(), **svc.writer.errors.restarts(),
                                **svc.errors.restarts()}},
        "queues": {"chunks": ing.chunk_queue_depth, "windows": ing.window_queue_depth,
                   "chunk_capacity": svc.config.ingest.queue_size, "window_capacity": svc.config.ingest.window_queue_size},
        "worker": {"alive": alive, "heartbeat_age_s": round(now - svc.worker.heartbeat, 3)},
        "memory": memory_snapshot(svc),
        "ingest": {"received": ing.received, "accepted": ing.accepted, "windows": ing.windows,
                   "deadlettered": ing.deadlettered, "deadletters": dict(ing.deadletters),
                   "windows_dropped": dict(ing.windows_dropped), "events": dict(ing.events),
                   "not_owned": ing.not_owned, "handed_over": ing.handed_over},
        "alerts": {"raised": res.alerts_raised, "cleared": res.alerts_cleared,
                   "open": res.alerts_raised - res.alerts_cleared},
        "cluster": cluster,
        "streams": streams,
        "streams_not_listed": max(0, len(all_streams) - HEALTH_MAX_STREAMS),
        "training": svc.learning.status() if svc.learning is not None else None,
    }

def store_ok(svc: Any, sp: Any) -> bool | None:
    """The store is reachable when the last probe answered and the last write (if any)
    succeeded; ``None`` before the first probe."""
    if sp.connected is False or svc.probe.store_reachable is False:
        return False
    return svc.probe.store_reachable

def memory_snapshot(svc: Any) -> dict[str, Any]:
    """The service's resident memory (bytes, psutil) and what its largest bounded holder, the
    feedback ring of recent windows (:class:`~pdm_edge.feedback.windows.RecentWindows`), holds:
    ``{"rss_bytes", "recent_windows": {"streams", "windows", "bytes"}}``."""
    import psutil

    recent = getattr(svc.feedback, "recent", None)
    return {"rss_bytes": psutil.Process().memory_info().rss, "recent_windows": recent.stats() if recent is not None else None}


def metrics_snapshot(svc: Any) -> Mapping[str, Any]:
    if svc.started_mono is None or svc.ingestor is None or svc.writer is None:
        return {"version": __version__}
    return {
        "version": __version__,
        "uptime_s": time.monotonic() - svc.started_mono,
        "mqtt_connected": {"ingest": svc.ingestor.stats().connected, "results": svc.results.stats().connected,
                           "labels": svc.labels.stats().connected},
        "ingest": svc.ingestor.stats(),
        "queue_capacity": {"chunks": svc.config.ingest.queue_size, "windows": svc.config.ingest.window_queue_size},
        "spool": svc.writer.stats(),
        "store_reachable": store_ok(svc, svc.writer.stats()),
        "results": svc.results.stats(),
        "labels": svc.labels.stats(),
        "streams": {s: {"state": svc.streams.state(s)} for s in svc.stream_names()},
        "worker_heartbeat_age_s": time.monotonic() - svc.worker.heartbeat,
        "stage_errors": {**_STAGES, **svc.ingestor.errors.errors(), **svc.writer.errors.errors(), **svc.errors.errors()},
        "stage_restarts": {**_STAGES, **svc.ingestor.errors.restarts(), **svc.writer.errors.restarts(),
                           **svc.errors.restarts()},
        "records_dropped": dropped_snapshot(svc),
        "disk_free_bytes": dict(svc.probe.disk),
    }

def dropped_snapshot(svc: Any) -> dict[tuple[str, str], int]:
    out = svc.sink.dropped()
    for reason, n in svc.ingestor.stats().windows_dropped.items():
        out[("window", reason)] = out.get(("window", reason), 0) + n
    if svc.streams is not None and svc.streams.dropped_backlog:
        out[("window", "calibration_backlog")] = svc.streams.dropped_backlog
    return out
