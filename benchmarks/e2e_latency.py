#!/usr/bin/env python3
"""Publish-to-stored latency through a real broker, and the running appliance's memory.

The whole appliance as it runs in the field: a real Mosquitto (``pdm_edge._util.procs.Mosquitto``:
free loopback port, temporary directory, persistence on) and ``pdm-edge run`` as a subprocess
(``pdm_edge._util.procs.ServiceProcess``) with the embedded SQLite store, the appliance's defaults
(``score_batch = 64``, ``torch_threads = 1``, 1 s windows with 0.5 s hop) and N configured
25.6 kHz vibration streams ``bench/mNN/accel``.

1. **Calibration** of one stream through the service's own path: ``calibration_s`` (+5 s) of
   the simulator's healthy bearing signal on ``bench/m00/accel``, published as fast as the
   broker takes it; the learning loop calibrates it and promotes ``m00-accel-v1``.
2. **Commissioning of the other N-1 streams** with that version: this process loads it from the
   registry and adds + promotes a copy for every other stream (as one would commission a fleet
   of identical machines); the running service picks each up from the registry with the
   stream's first window. So the measurement is not polluted by N-1 calibrations.
3. **Measurement**: N channels publish real-time 0.1 s float32 chunks (2560 samples) at QoS 1
   for ``--duration`` seconds, one :class:`sensors.publisher.ChunkPublisher` (own paho client)
   per channel, from one pacing thread in this process; channels are staggered evenly over
   the 0.1 s; timestamps are the wall clock. ``--phases aligned`` (default, the worst case: a
   multichannel DAQ sampling every channel at once): every stream's chunks start on the same
   0.1 s grid, so all N streams complete a window within the same 0.1 s, every 0.5 s, and the
   scorer gets them as a burst. ``--phases spread``: stream i is offset by i * 0.5 s / N
   (independent sensors), so window completions are spread evenly over the hop. The first ``--warmup`` seconds (default 3) are
   published the same way but their windows are left out of the statistics: each stream
   loads its model version from the registry with its first window, a one-off cost.

**Latency method.** A window ``[s, s + 1 s)`` is completed by the chunk that holds its last
sample (the chunk starting at ``s + 0.9 s``). The wall-clock time just *before* that chunk's
``publish()`` call is its publish time. A poller thread in this process reads the service's
SQLite store (read-only connection, WAL) every ``--poll-ms`` ms (default 10) and notes when each
``(machine, start_ns)`` row of ``anomaly_score`` first appears: that is the stored time (so
the figure includes up to one poll interval of quantisation). Latency = stored time - publish
time, per window; p50 / p99 / max over every window of the run. The same is reported for the
score reaching MQTT (``pdm/v1/bench/+/accel/score``, QoS 0, published by the service after the
score is in its durable spool and before the spool writer stores it) to separate scoring from
storing.

**Kept up** (no backlog): every window of the run is stored within ``DRAIN_LIMIT_S`` after the
last chunk was published, the backlog (windows completed by a published chunk but not stored
yet, sampled every 0.5 s from the recorded times) does not grow from the first to the last
third of the run by more than 0.5 s of windows, and the publishers kept real time (p99
lateness < 50 ms; otherwise the load generator, not the service, was the limit).

**Memory**: with ``--unit-env`` the service runs with the systemd unit's glibc malloc settings
(``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``: :func:`pdm_edge._util.procs.unit_malloc_env`),
otherwise with glibc's defaults. ``VmRSS`` of the service process sampled every second (max and
at the end) and its ``VmHWM`` (peak), and the most the feedback ring of recent windows held (``/healthz``
``memory``). CPU: the service process's user + system time over the measurement, as % of
one core.

**Search** (``--search 16,32,48,64``): one run per channel count, each in its own process with
its own broker and service, in ascending order until the first that does not keep up; reports
every trial and the largest channel count sustained (issue 13's target: 64, with p99 <= 100 ms
and service RSS <= 500 MB there).

Usage::

    .venv/bin/python benchmarks/e2e_latency.py [--json] [--channels 16] [--duration 150] [--phases aligned|spread]
                                              [--quick] [--workdir DIR]
    .venv/bin/python benchmarks/e2e_latency.py --search 16,32,48,64 [--duration 40] [--json]

The default 150 s of measurement outlast ``[feedback] recent_s`` (120 s): the feedback stage keeps
every stream's recent windows in memory for late labels, so the memory figure is only the
steady state once that ring is full. ``--quick``: 8 s of measurement and a shorter calibration
(same number of channels; its memory figure is *not* the steady state).
Everything it starts (Mosquitto, the service) is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pdm_edge._util.procs import unit_malloc_env  # noqa: E402

FS = 25600.0
CHUNK = 2560  # 0.1 s
CHUNK_NS = 100_000_000
WINDOW_CHUNKS, HOP_CHUNKS = 10, 5  # 1 s window, 0.5 s hop
SITE, SENSOR = "bench", "accel"
DRAIN_LIMIT_S = 5.0
LATE_LIMIT_S = 0.05
NS = 1_000_000_000


def _machine(i: int) -> str:
    return f"m{i:02d}"


def _progress(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def config_text(workdir: Path, broker: str, channels: int, calibration_s: float, max_train_s: float) -> str:
    sensors = "".join(f'[sensors."{SITE}/{_machine(i)}/{SENSOR}"]\nkind = "vibration"\nsample_rate_hz = 25600\nunit = "g"\n'
                      "window_s = 1.0\nhop_s = 0.5\n" for i in range(channels))
    return (
        f'appliance_id = "edge-bench"\nsite = "{SITE}"\nlog_level = "INFO"\n'
        f'[mqtt]\nbroker = "{broker}"\nreconnect_min_s = 1.0\nreconnect_max_s = 2.0\n'
        f'[store]\nbackend = "sqlite"\nsqlite_path = "{workdir}/store.sqlite"\n'
        f'[spool]\npath = "{workdir}/spool.sqlite"\n'
        f'[feedback]\nstate_dir = "{workdir}/state"\n'
        f'[registry]\ndir = "{workdir}/registry"\n'
        f"[learning]\ncalibration_s = {calibration_s}\nmax_train_seconds = {max_train_s}\n"
        '[service]\nhttp = "127.0.0.1:0"\ntorch_threads = 1\nscore_batch = 64\n'
        + sensors
    )


def _proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def _stats_ms(values_s: list[float]) -> dict[str, Any]:
    ms = [v * 1e3 for v in values_s]
    return {"n": len(ms), "p50_ms": _pct(ms, 50), "p90_ms": _pct(ms, 90), "p99_ms": _pct(ms, 99),
            "max_ms": max(ms) if ms else None, "mean_ms": float(np.mean(ms)) if ms else None}


def calibrate_first_stream(args: argparse.Namespace, svc: Any, broker: str) -> tuple[str, int]:
    """Publish ``calibration_s + 5`` s of m00 at full speed; wait for its first version. Returns
    (version id, chunks published)."""
    from pdm_edge.config import MqttConfig
    from sensors.publisher import ChunkPublisher
    from sensors.simulator import VibrationSimulator

    secs = args.calibration_s + 5.0
    n = int(round(secs * 10))
    t0 = time.time_ns() - (n + 10) * CHUNK_NS
    sim = VibrationSimulator(sample_rate_hz=FS, seed=100)
    pub = ChunkPublisher(MqttConfig(broker=broker), SITE, _machine(0), SENSOR, sample_rate_hz=FS, unit="g",
                         client_id="bench-cal").start()
    try:
        for k in range(n):
            pub.publish(sim.generate(CHUNK), t0 + k * CHUNK_NS)
    finally:
        pub.close(60)
    stream = f"{SITE}/{_machine(0)}/{SENSOR}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        st = svc.health()["streams"].get(stream, {})
        if st.get("state") == "scoring" and st.get("version"):
            return st["version"], n
        if st.get("state") == "failed":
            raise RuntimeError(f"calibration of {stream} failed:\n{svc.log_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"{stream} did not calibrate within 300 s:\n{svc.log_text()[-2000:]}")


def clone_version(registry_dir: Path, version_id: str, channels: int) -> None:
    """Add and promote a copy of ``version_id`` for every other stream."""
    from pdm_edge.model import load_encoder
    from pdm_edge.registry import Registry

    enc, sha = load_encoder()
    with Registry(registry_dir) as reg:
        scorer = reg.load(version_id, enc, sha)
        for i in range(1, channels):
            v = reg.add_candidate(scorer, site=SITE, machine=_machine(i), sensor=SENSOR, trigger="manual",
                                  training_summary={"cloned_from": version_id})
            reg.promote(v.id, f"commissioned with {version_id} (benchmark)")


class Poller(threading.Thread):
    """Notes when each (machine, start_ns) score row first appears in the SQLite store."""

    def __init__(self, path: Path, interval_s: float, since_ns: int, machines: list[str]) -> None:
        super().__init__(name="store-poller", daemon=True)
        self.path, self.interval_s, self.since_ns, self.machines = path, interval_s, since_ns, machines
        self.seen: dict[tuple[str, int], float] = {}
        self.stop = threading.Event()
        self.polls = 0

    def run(self) -> None:
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        try:
            # each stream's scores are stored in time order: only rows newer than the slowest
            # stream's newest one can be new
            last = {m: self.since_ns for m in self.machines}
            while not self.stop.is_set():
                lo = min(last.values())
                try:
                    rows = con.execute("SELECT machine, start_ns FROM anomaly_score WHERE site = ? AND start_ns > ?",
                                       (SITE, lo)).fetchall()
                except sqlite3.OperationalError:  # locked for a moment: poll again
                    rows = []
                now = time.time()
                for m, s in rows:
                    key = (m, int(s))
                    if key not in self.seen:
                        self.seen[key] = now
                        if m in last and int(s) > last[m]:
                            last[m] = int(s)
                self.polls += 1
                self.stop.wait(self.interval_s)
        finally:
            con.close()


class ScoreListener:
    """Notes when each score reaches MQTT (``pdm/v1/bench/+/accel/score``)."""

    def __init__(self, broker: str) -> None:
        import paho.mqtt.client as mqtt

        host, port = broker.rsplit(":", 1)
        self.seen: dict[tuple[str, int], float] = {}
        self._sub = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-scores")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"pdm/v1/{SITE}/+/{SENSOR}/score", qos=0)
        self.client.on_subscribe = lambda *a: self._sub.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        if not self._sub.wait(10):
            raise RuntimeError("score listener could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        try:
            ts = int(json.loads(msg.payload)["ts_ns"])
        except (ValueError, KeyError, TypeError):
            return
        self.seen.setdefault((msg.topic.split("/")[3], ts), now)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure(args: argparse.Namespace, svc: Any, broker: str, store_path: Path, first_seq0: int,
            broker_pid: int | None = None) -> dict[str, Any]:
    from benchmarks.ingest_throughput import CpuProbe
    from pdm_edge.config import MqttConfig
    from sensors.publisher import ChunkPublisher
    from sensors.simulator import VibrationSimulator

    n_ch = args.channels
    n_warm = int(round(args.warmup * 10))
    n_chunks = n_warm + int(round(args.duration * 10))
    loop_chunks = min(n_chunks, 100)  # 10 s of signal per channel, repeated
    signals = [VibrationSimulator(sample_rate_hz=FS, seed=200 + i).generate(loop_chunks * CHUNK).reshape(loop_chunks, CHUNK)
               for i in range(n_ch)]
    pubs = [ChunkPublisher(MqttConfig(broker=broker), SITE, _machine(i), SENSOR, sample_rate_hz=FS, unit="g",
                           first_seq=first_seq0 if i == 0 else 0, client_id=f"bench-pub-{i}").start() for i in range(n_ch)]
    scores = ScoreListener(broker)
    t0_ns = (time.time_ns() // CHUNK_NS + 1) * CHUNK_NS
    hop_s = HOP_CHUNKS * CHUNK_NS / NS
    offset_s = [(i * hop_s / n_ch if args.phases == "spread" else 0.0) for i in range(n_ch)]
    stagger_s = [(offset_s[i] if args.phases == "spread" else i * 0.1 / n_ch) for i in range(n_ch)]
    # every chunk as (due s after the start, channel, chunk index), in publishing order
    schedule = sorted((k * 0.1 + stagger_s[i], i, k) for k in range(n_chunks) for i in range(n_ch))
    poller = Poller(store_path, args.poll_ms / 1000.0, t0_ns - 1, [_machine(i) for i in range(n_ch)])
    poller.start()
    published: dict[tuple[str, int], float] = {}  # (machine, window start_ns) -> publish time of its last chunk
    warm: dict[tuple[str, int], float] = {}  # the same for the warm-up windows (not in the statistics)
    lateness: list[float] = []
    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(1.0):
            try:
                h = svc.health()
            except Exception:
                continue
            samples.append({"t": time.time(), "rss_kb": _proc_status(svc.pid, "VmRSS"), "windows_q": h["queues"]["windows"],
                            "chunks_q": h["queues"]["chunks"], "spool": h["spool"]["depth"],
                            "ring_bytes": ((h.get("memory") or {}).get("recent_windows") or {}).get("bytes", 0)})

    smp = threading.Thread(target=sampler, name="sampler", daemon=True)
    cpu0, wall0 = _proc_cpu_s(svc.pid), time.monotonic()
    probe = CpuProbe({}, {"service": [svc.pid], "broker": [broker_pid] if broker_pid else []})
    snap0 = probe.snap()
    smp.start()
    start_wall = t0_ns / 1e9 + 0.05
    while time.time() < start_wall:
        time.sleep(0.001)
    base = time.monotonic()
    for due_s, i, k in schedule:
        delay = base + due_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        lateness.append(max(0.0, -delay))
        ts = t0_ns + k * CHUNK_NS + round(offset_s[i] * NS)
        completes = k >= WINDOW_CHUNKS - 1 and (k - (WINDOW_CHUNKS - 1)) % HOP_CHUNKS == 0
        t_pub = time.time()
        pubs[i].publish(signals[i][k % loop_chunks], ts)
        if completes:
            key = (_machine(i), ts - (WINDOW_CHUNKS - 1) * CHUNK_NS)
            if k < n_warm:
                warm[key] = t_pub
            else:
                published[key] = t_pub
    end_pub = time.time()
    publish_wall_s = time.monotonic() - base
    for p in pubs:
        p.close(30)
    # drain: everything stored within DRAIN_LIMIT_S?
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and not all(k in poller.seen for k in (*published, *warm)):
        time.sleep(0.05)
    cpu_s = _proc_cpu_s(svc.pid) - cpu0
    cpu = CpuProbe.diff(snap0, probe.snap())
    wall_s = time.monotonic() - wall0
    done.set()
    smp.join(5)
    poller.stop.set()
    poller.join(5)
    scores.close()
    rss_end_kb = _proc_status(svc.pid, "VmRSS")
    hwm_kb = _proc_status(svc.pid, "VmHWM")

    keys = sorted(published, key=lambda k: published[k])
    lat = [poller.seen[k] - published[k] for k in keys if k in poller.seen]
    lat_mqtt = [scores.seen[k] - published[k] for k in keys if k in scores.seen]
    stored = sum(1 for k in keys if k in poller.seen)
    warm_stored = sum(1 for k in warm if k in poller.seen)
    last_stored = max((poller.seen[k] for k in keys if k in poller.seen), default=float("nan"))
    drain_s = last_stored - end_pub if stored else None
    # backlog over time, from the recorded times
    t_first, t_last = (published[keys[0]], end_pub) if keys else (0.0, 0.0)
    grid = np.arange(t_first, t_last, 0.5)
    pub_t = np.array([published[k] for k in keys])
    sto_t = np.array([poller.seen.get(k, math.inf) for k in keys])
    backlog = [int(np.sum((pub_t <= t) & (sto_t > t))) for t in grid]
    third = max(1, len(backlog) // 3)
    b_first, b_last = (float(np.mean(backlog[:third])), float(np.mean(backlog[-third:]))) if backlog else (0.0, 0.0)
    windows_per_s = n_ch / 0.5
    reasons = []
    if stored < len(published) or warm_stored < len(warm):
        missing = len(published) + len(warm) - stored - warm_stored
        reasons.append(f"{missing} of {len(published) + len(warm)} windows not stored 30 s after publishing stopped")
    elif drain_s is not None and drain_s > DRAIN_LIMIT_S:
        reasons.append(f"last window stored {drain_s:.1f} s after publishing stopped (limit {DRAIN_LIMIT_S:g} s)")
    if b_last - b_first > max(2.0, 0.5 * windows_per_s):
        reasons.append(f"backlog grew from {b_first:.1f} to {b_last:.1f} windows")
    late_p99 = _pct(lateness, 99) or 0.0
    if late_p99 > LATE_LIMIT_S:
        reasons.append(f"publishers fell behind real time (p99 lateness {late_p99 * 1e3:.0f} ms): the load generator was the limit")
    rss = [s["rss_kb"] for s in samples] or [rss_end_kb]
    return {
        "channels": n_ch, "phases": args.phases, "unit_malloc_env": unit_malloc_env() if args.unit_env else {},
        "duration_s": args.duration, "warmup_s": args.warmup, "chunks_published": n_chunks * n_ch,
        "publish_wall_s": round(publish_wall_s, 2), "windows_expected": len(published), "windows_stored": stored,
        "warmup_windows": len(warm), "warmup_windows_stored": warm_stored,
        "latency_publish_to_stored": _stats_ms(lat),
        "latency_publish_to_score_mqtt": _stats_ms(lat_mqtt),
        "poll_interval_ms": args.poll_ms, "polls": poller.polls,
        "drain_s": None if drain_s is None or math.isnan(drain_s) else round(drain_s, 3),
        "backlog_first_third": round(b_first, 2), "backlog_last_third": round(b_last, 2),
        "window_queue_max": max((s["windows_q"] for s in samples), default=None),
        "chunk_queue_max": max((s["chunks_q"] for s in samples), default=None),
        "spool_depth_max": max((s["spool"] for s in samples), default=None),
        "publisher_lateness_p99_ms": round(late_p99 * 1e3, 2),
        "kept_up": not reasons, "reasons": reasons,
        "service_rss_mb_series": [[round(x["t"] - samples[0]["t"]), round(x["rss_kb"] / 1024)] for x in samples[::10]],
        "service_rss_mb_max": round(max(rss) / 1024, 1), "service_rss_mb_end": round(rss_end_kb / 1024, 1),
        "service_vmhwm_mb": round(hwm_kb / 1024, 1),
        "feedback_ring_mb_max": round(max((x["ring_bytes"] for x in samples), default=0) / 2**20, 1),
        "service_cpu_pct_of_one_core": round(100 * cpu_s / wall_s, 1) if wall_s > 0 else None,
        "service_cpu_ms_per_window": round(1000 * cpu_s / (stored + warm_stored), 2) if stored + warm_stored else None,
        "cpu_pct_of_one_core": {"service": round(cpu["proc:service"], 1), "broker": round(cpu["proc:broker"], 1),
                                "load_generator_and_poller": round(cpu["self"], 1)},
        "machine_busy_pct": round(cpu["machine"], 1), "other_load_pct_of_machine": round(cpu["other"], 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }


def print_report(doc: dict[str, Any]) -> None:
    m = doc["measurement"]
    s, q = m["latency_publish_to_stored"], m["latency_publish_to_score_mqtt"]

    def f(v: Any, fmt: str = ".1f") -> str:
        return "-" if v is None else format(v, fmt)

    print(f"\npdm-edge end-to-end latency: {m['channels']} x 25.6 kHz channels ({m['phases']}), {m['duration_s']:g} s, "
          "QoS 1 0.1 s chunks "
          f"({m['cpus']} CPUs; broker, service and load generator share them)")
    print(f"  calibration of {doc['calibration']['stream']}: {doc['calibration']['seconds']:.1f} s -> "
          f"{doc['calibration']['version']}, copied to the other {m['channels'] - 1} streams")
    print(f"  windows: {m['windows_stored']} of {m['windows_expected']} stored (+{m['warmup_windows_stored']} of "
          f"{m['warmup_windows']} of the {m['warmup_s']:g} s warm-up, not in the statistics); backlog {m['backlog_first_third']} -> "
          f"{m['backlog_last_third']} (first -> last third), max queues: windows {m['window_queue_max']}, "
          f"chunks {m['chunk_queue_max']}, spool {m['spool_depth_max']}; drain {f(m['drain_s'], '.2f')} s")
    print(f"  {'latency (ms)':<34}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'n':>7}")
    print(f"  {'publish -> stored (SQLite)':<34}{f(s['p50_ms']):>8}{f(s['p90_ms']):>8}{f(s['p99_ms']):>8}{f(s['max_ms']):>8}{s['n']:>7}")
    print(f"  {'publish -> score on MQTT':<34}{f(q['p50_ms']):>8}{f(q['p90_ms']):>8}{f(q['p99_ms']):>8}{f(q['max_ms']):>8}{q['n']:>7}")
    print(f"  (stored time by polling the store every {m['poll_interval_ms']} ms; publisher lateness p99 "
          f"{m['publisher_lateness_p99_ms']} ms)")
    print(f"  service: RSS {doc['service_rss_mb_idle_calibrated']} MB idle after the calibration; under load (s, MB): "
          + ", ".join(f"{t}: {v}" for t, v in m["service_rss_mb_series"]))
    print(f"  service: RSS max {m['service_rss_mb_max']} MB, end {m['service_rss_mb_end']} MB, peak (VmHWM) "
          f"{m['service_vmhwm_mb']} MB (of it the feedback ring of recent windows, at most {m['feedback_ring_mb_max']} MB); CPU {f(m['service_cpu_pct_of_one_core'])} % of one core, "
          f"{f(m.get('service_cpu_ms_per_window'), '.2f')} ms per stored window (everything the service does; compare "
          "score_throughput.py's ms per window)")
    c = m["cpu_pct_of_one_core"]
    print(f"  CPU (% of one core): service {c['service']}, broker {c['broker']}, load generator + poller "
          f"{c['load_generator_and_poller']}; machine {m['machine_busy_pct']} % busy, other programs "
          f"{m['other_load_pct_of_machine']} % of the machine")
    if m["other_load_pct_of_machine"] > 10:
        print("  WARNING: other programs used more than 10 % of the machine during the run: the figures competed for the CPUs")
    print(f"  kept up: {'yes' if m['kept_up'] else 'NO: ' + '; '.join(m['reasons'])}")
    t = doc["targets"]
    print(f"  targets: >= 16 channels sustained: {t['channels_16_sustained']}; p99 < 250 ms: {t['p99_under_250ms']}; "
          f"service memory < 600 MB: {t['memory_under_600mb']}")


def search(args: argparse.Namespace) -> int:
    """``--search``: one run of this script per channel count (ascending), each with ``--json``
    in its own process, until the first that does not keep up; prints the trials and the
    largest channel count sustained."""
    import subprocess

    counts = sorted({int(c) for c in args.search.split(",") if c.strip()})
    trials: list[dict[str, Any]] = []
    for n in counts:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--json", "--channels", str(n), "--duration", str(args.duration),
               "--phases", args.phases, "--calibration-s", str(args.calibration_s), "--max-train-s", str(args.max_train_s),
               "--warmup", str(args.warmup)] + (["--unit-env"] if args.unit_env else [])
        _progress(args, f"search: {n} channels ...")
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if res.returncode != 0:
            trials.append({"channels": n, "kept_up": False, "error": f"exit {res.returncode}"})
            break
        doc = json.loads(res.stdout)
        m = doc["measurement"]
        s = m["latency_publish_to_stored"]
        trials.append({"channels": n, "kept_up": bool(m["kept_up"]), "reasons": m["reasons"], "p50_ms": s["p50_ms"],
                       "p99_ms": s["p99_ms"], "service_cpu_pct_of_one_core": m["service_cpu_pct_of_one_core"],
                       "service_cpu_ms_per_window": m.get("service_cpu_ms_per_window"),
                       "service_rss_mb_max": max(m["service_rss_mb_max"], m["service_vmhwm_mb"]),
                       "other_load_pct_of_machine": m["other_load_pct_of_machine"]})
        if not m["kept_up"]:
            break
    sustained = max((t["channels"] for t in trials if t["kept_up"]), default=0)
    out = {"benchmark": "pdm-edge e2e channel search", "args": vars(args).copy(), "trials": trials,
           "largest_sustained_channels": sustained}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'channels':>8} {'kept up':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU % core':>11} {'CPU ms/win':>11} {'RSS MB':>8} "
              f"{'other %':>8}")
        for t in trials:
            def num(v: Any) -> str:
                return "-" if v is None else f"{v:.0f}"

            print(f"{t['channels']:>8} {('yes' if t['kept_up'] else 'NO'):>8} {num(t.get('p50_ms')):>8} {num(t.get('p99_ms')):>8} "
                  f"{num(t.get('service_cpu_pct_of_one_core')):>11} "
                  f"{'-' if t.get('service_cpu_ms_per_window') is None else format(t['service_cpu_ms_per_window'], '.1f'):>11} "
                  f"{num(t.get('service_rss_mb_max')):>8} "
                  f"{t.get('other_load_pct_of_machine', '-'):>8}" + (f"  {'; '.join(t.get('reasons') or [t.get('error', '')])}"
                                                                     if not t["kept_up"] else ""))
        print(f"largest channel count sustained: {sustained}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout (progress on stderr)")
    ap.add_argument("--channels", type=int, default=16, help="25.6 kHz streams published at once (default 16)")
    ap.add_argument("--duration", type=float, default=None,
                    help="measurement, s (default 150: longer than [feedback] recent_s = 120 s, so the in-memory ring "
                         "of recent windows is full and the memory figure is the steady state; --quick 8)")
    ap.add_argument("--calibration-s", type=float, default=None, help="[learning] calibration_s (default 15; --quick 12)")
    ap.add_argument("--max-train-s", type=float, default=None, help="[learning] max_train_seconds (default 20; --quick 6)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds published first whose windows are not in the statistics (each stream loads its "
                         "model version with its first window; default 3, --quick 2)")
    ap.add_argument("--unit-env", action="store_true",
                    help="run the service with the systemd unit's malloc settings (deploy/systemd/pdm-edge.service)")
    ap.add_argument("--phases", choices=("aligned", "spread"), default="aligned",
                    help="aligned: every stream on the same 0.1 s grid (windows complete together; worst case); "
                         "spread: streams offset evenly over the 0.5 s hop (independent sensors)")
    ap.add_argument("--poll-ms", type=float, default=10.0, help="store polling interval, ms")
    ap.add_argument("--quick", action="store_true", help="short run (8 s) with a short calibration")
    ap.add_argument("--search", default=None, metavar="N,N,...",
                    help="run each channel count (ascending) until one does not keep up; report the largest sustained")
    ap.add_argument("--workdir", default=None, help="keep the run's files (service log, store, config) here instead of a "
                                                     "temporary directory")
    args = ap.parse_args(argv)
    args.duration = args.duration or (8.0 if args.quick else 150.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 3.0)
    args.calibration_s = args.calibration_s or (12.0 if args.quick else 15.0)
    args.max_train_s = args.max_train_s or (6.0 if args.quick else 20.0)
    if args.channels < 1 or args.duration < 2:
        ap.error("need --channels >= 1 and --duration >= 2")
    if args.search:
        return search(args)

    from pdm_edge._util.procs import Mosquitto, ServiceProcess
    from pdm_edge.errors import PdmEdgeError

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    t_start = time.monotonic()
    doc: dict[str, Any] = {"benchmark": "pdm-edge e2e latency", "args": vars(args).copy()}
    with tempfile.TemporaryDirectory(prefix="pdm-e2e-") as d:
        work = Path(args.workdir).resolve() if args.workdir else Path(d)
        if args.workdir and work.exists() and any(work.iterdir()):
            ap.error(f"--workdir {work} is not empty")
        (work / "mosquitto").mkdir(parents=True)
        broker = Mosquitto(work / "mosquitto")
        svc = None
        try:
            broker.start()
            _progress(args, f"mosquitto on {broker.address}; starting pdm-edge run with {args.channels} streams ...")
            svc = ServiceProcess(work, config_text(work, broker.address, args.channels, args.calibration_s, args.max_train_s),
                                 env=unit_malloc_env() if args.unit_env else None)
            svc.start()
            deadline = time.monotonic() + 30
            while not svc.health()["broker"]["connected"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("service did not connect to the broker")
                time.sleep(0.1)
            _progress(args, "calibrating bench/m00/accel through the service ...")
            t0 = time.monotonic()
            version, n_cal_chunks = calibrate_first_stream(args, svc, broker.address)
            doc["calibration"] = {"stream": f"{SITE}/m00/{SENSOR}", "version": version, "seconds": round(time.monotonic() - t0, 1)}
            clone_version(work / "registry", version, args.channels)
            time.sleep(1.0)
            doc["service_rss_mb_idle_calibrated"] = round(_proc_status(svc.pid, "VmRSS") / 1024, 1)
            _progress(args, f"publishing {args.channels} channels in real time for {args.duration:g} s ...")
            doc["measurement"] = m = measure(args, svc, broker.address, work / "store.sqlite", n_cal_chunks,
                                             broker.proc.pid if broker.proc else None)
            h = svc.health()
            doc["service_status_after"] = {"status": h["status"], "reasons": h["reasons"],
                                           "deadlettered": h["ingest"]["deadlettered"]}
            rc = svc.terminate(90)
            doc["service_exit_code"] = rc
        except KeyboardInterrupt:
            print("interrupted; everything stopped", file=sys.stderr)
            return 130
        except (RuntimeError, PdmEdgeError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        finally:
            if svc is not None:
                svc.kill()
            broker.stop()
    s = m["latency_publish_to_stored"]
    doc["targets"] = {
        "channels_16_sustained": bool(m["kept_up"] and m["channels"] >= 16),
        "p99_under_250ms": bool(s["p99_ms"] is not None and s["p99_ms"] < 250.0),
        "memory_under_600mb": bool(max(m["service_rss_mb_max"], m["service_vmhwm_mb"]) < 600.0),
    }
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_report(doc)
        print(f"\n(total time {doc['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
