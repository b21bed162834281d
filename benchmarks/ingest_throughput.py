#!/usr/bin/env python3
"""Ingestion throughput: decode cost per chunk, and how many 25.6 kHz channels are sustained.

Part 1 (in-process, no broker) times :func:`pdm_edge.ingest.chunk.decode_chunk` on payloads made
by :func:`~pdm_edge.ingest.chunk.encode_chunk` (float32 0.1 s and 1 s, int16 and ``values``
0.1 s) and :meth:`StreamWindower.push <pdm_edge.ingest.windowing.StreamWindower.push>` per
0.1 s chunk (1 s window, 0.5 s hop), with ``time.perf_counter`` around every call.

Part 2 starts a real Mosquitto (``pdm_edge._util.procs.Mosquitto``: free loopback port, temporary
config, the same settings as the test suite) and, in this process, an
:class:`~pdm_edge.ingest.service.Ingestor` with N configured 25.6 kHz float32 streams (window
1 s, hop 0.5 s) and a consumer thread draining ``ingestor.windows``. The load comes from
separate publisher processes (so that they do not compete for this process's GIL): one
:class:`sensors.publisher.ChunkPublisher` (own paho client, QoS 1) per channel, driven by one
pacing thread per process that publishes every channel's 0.1 s chunk in real time (10
chunks/s per channel, channels staggered evenly over the 0.1 s, timestamps = wall clock at the
chunk's first sample). N is searched upward until the first trial that is not sustained, then
bisected once.

A trial is *sustained* when, over the run:

- the chunk queue depth (sampled every 0.5 s) does not grow: mean of the last third minus the
  mean of the first third <= max(2 chunks, 0.1 s of offered load);
- the backlog (chunks published minus chunks windowed, same samples) does not grow by the same
  rule (an overloaded MQTT thread leaves the chunk queue empty and the backlog in the broker);
- every published chunk is windowed within 2 s after publishing stopped;
- there is no dead letter (``queue_full`` in particular) and no gap/duplicate event;
- the publishers kept real time (otherwise the trial measured the load generator).

Usage::

    .venv/bin/python benchmarks/ingest_throughput.py [--json] [--duration S] [--max-channels N]
                                                    [--channels 4,8,16] [--quick] [--no-bisect]

Everything (publisher processes, ingestor, broker) is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import queue
import resource
import signal
import subprocess
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

from pdm_edge.config import IngestConfig, MqttConfig, config_from_dict  # noqa: E402
from pdm_edge.errors import PdmEdgeError  # noqa: E402
from pdm_edge.ingest.chunk import Chunk, decode_chunk, encode_chunk, waveform_topic  # noqa: E402
from pdm_edge.ingest.windowing import StreamSettings, StreamWindower  # noqa: E402

FS = 25600.0
CHUNK_S = 0.1
CHUNK_NS = 100_000_000
CHUNK_SAMPLES = 2560
WINDOW_S, HOP_S = 1.0, 0.5
SITE, SENSOR = "bench", "acc"
DEFAULT_STEPS = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
CHANNELS_PER_PUBLISHER_PROC = 64
MAX_PUBLISHER_PROCS = 4
DRAIN_LIMIT_S = 2.0
LATE_LIMIT_S = 0.05  # publisher p99 lateness beyond this: the load generator fell behind
CLK_TCK = os.sysconf("SC_CLK_TCK")
N_CPUS = os.cpu_count() or 1
OTHER_LOAD_WARN_PCT = 10.0  # other processes using more than this % of the machine distort a trial

log = logging.getLogger("ingest_throughput")


def _machine_name(i: int) -> str:
    return f"m{i:04d}"


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# Part 1: decode and windowing cost per chunk
# ---------------------------------------------------------------------------------------------
def _time_calls(fn: Any, *, min_reps: int, min_time_s: float, max_reps: int = 200_000) -> list[float]:
    """Call ``fn()`` repeatedly and return each call's duration in seconds."""
    for _ in range(min(20, min_reps)):  # warm-up
        fn()
    out: list[float] = []
    pc = time.perf_counter
    t_end = pc() + min_time_s
    while len(out) < max_reps and (len(out) < min_reps or pc() < t_end):
        t0 = pc()
        fn()
        out.append(pc() - t0)
    return out


def _summary(durations: list[float], nbytes: int) -> dict[str, Any]:
    med = _pct(durations, 50)
    mean = float(np.mean(durations))
    return {
        "reps": len(durations),
        "median_us": med * 1e6,
        "p99_us": _pct(durations, 99) * 1e6,
        "mean_us": mean * 1e6,
        "mb_per_s": nbytes / med / 1e6,
        "per_s": 1.0 / mean,
    }


def bench_decode(min_time_s: float) -> list[dict[str, Any]]:
    cfg = IngestConfig()
    rng = np.random.default_rng(1)
    topic = waveform_topic(SITE, _machine_name(0), SENSOR)
    ts0 = time.time_ns()
    cases = [("float32", 0.1), ("float32", 1.0), ("int16", 0.1), ("values", 0.1)]
    rows = []
    for encoding, dur in cases:
        n = round(dur * FS)
        t = np.arange(n) / FS
        x = (0.3 * rng.standard_normal(n) + 0.5 * np.sin(2 * np.pi * 157.0 * t)).astype(np.float32)
        payload = encode_chunk(x, ts_ns=ts0, sample_rate_hz=FS, unit="g", seq=7, encoding=encoding)  # type: ignore[arg-type]
        chunk = decode_chunk(topic, payload, max_payload_bytes=cfg.max_payload_bytes, max_samples=cfg.max_samples_per_chunk)
        assert chunk.samples.size == n

        def fn(payload: bytes = payload) -> None:
            decode_chunk(topic, payload, max_payload_bytes=cfg.max_payload_bytes, max_samples=cfg.max_samples_per_chunk)

        d = _time_calls(fn, min_reps=200, min_time_s=min_time_s)
        row = {"case": f"decode {encoding} {dur:g} s", "encoding": encoding, "chunk_s": dur, "samples": n, "payload_bytes": len(payload)}
        row.update(_summary(d, len(payload)))
        row["samples_mb_per_s"] = n * 4 / (row["median_us"] / 1e6) / 1e6  # float32 output rate
        rows.append(row)
    return rows


def bench_push(min_time_s: float) -> dict[str, Any]:
    settings = StreamSettings("vibration", FS, "g", round(WINDOW_S * FS), round(HOP_S * FS))
    w = StreamWindower(SITE, _machine_name(0), SENSOR, settings)
    x = np.random.default_rng(2).standard_normal(CHUNK_SAMPLES).astype(np.float32)
    ts0 = time.time_ns()
    pc = time.perf_counter
    durations: list[float] = []
    n_windows = 0
    k = 0
    t_end = pc() + min_time_s
    while k < 2000 or pc() < t_end:
        c = Chunk(SITE, _machine_name(0), SENSOR, ts0 + k * CHUNK_NS, FS, "g", k, x, 0)
        t0 = pc()
        r = w.push(c)
        durations.append(pc() - t0)
        assert r.event is None
        n_windows += len(r.windows)
        k += 1
    row = {"case": "StreamWindower.push 0.1 s (1 s win, 0.5 s hop)", "samples": CHUNK_SAMPLES, "payload_bytes": CHUNK_SAMPLES * 4, "windows": n_windows}
    row.update(_summary(durations, CHUNK_SAMPLES * 4))
    row["mb_per_s"] = CHUNK_SAMPLES * 4 / (row["mean_us"] / 1e6) / 1e6  # by the mean: a window every 5th chunk
    return row


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc
# ---------------------------------------------------------------------------------------------
def _stat_cpu_s(path: str) -> float | None:
    """utime + stime (s) from a /proc/.../stat file; None when it is gone."""
    try:
        with open(path) as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as fh:
        parts = [int(v) for v in fh.readline().split()[1:]]
    total = sum(parts[:8])  # user nice system idle iowait irq softirq steal
    idle = parts[3] + parts[4]
    return total - idle, total


class CpuProbe:
    """Snapshots of CPU time of this process, some of its threads, and other processes."""

    def __init__(self, threads: dict[str, int], pids: dict[str, list[int]]) -> None:
        self.threads = threads
        self.pids = pids

    def snap(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        snap: dict[str, Any] = {"t": time.monotonic(), "self": ru.ru_utime + ru.ru_stime, "machine": _machine_ticks()}
        for name, tid in self.threads.items():
            snap[f"thread:{name}"] = _stat_cpu_s(f"/proc/self/task/{tid}/stat")
        for name, pids in self.pids.items():
            vals = [_stat_cpu_s(f"/proc/{p}/stat") for p in pids]
            snap[f"proc:{name}"] = sum(v for v in vals if v is not None)
        return snap

    @staticmethod
    def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        """CPU use between two snapshots as % of one core (machine: % of all cores)."""
        wall = b["t"] - a["t"]
        out = {"wall_s": wall}
        for key in a:
            if key in ("t", "machine"):
                continue
            if a[key] is None or b.get(key) is None:
                out[key] = float("nan")
            else:
                out[key] = 100.0 * (b[key] - a[key]) / wall
        busy = b["machine"][0] - a["machine"][0]
        total = b["machine"][1] - a["machine"][1]
        out["machine"] = 100.0 * busy / total if total else float("nan")
        ours = out.get("self", 0.0) + sum(v for k, v in out.items() if k.startswith("proc:") and not math.isnan(v))
        out["other"] = max(0.0, out["machine"] - ours / N_CPUS)  # % of all cores used by anything else
        return out


# ---------------------------------------------------------------------------------------------
# Part 2: the load generator (runs in spawned processes)
# ---------------------------------------------------------------------------------------------
def _publisher_proc(
    broker: str,
    channels: list[int],
    n_total: int,
    chunks_per_channel: int,
    start_evt: Any,
    stop_evt: Any,
    t0_mono: Any,
    t0_wall_ns: Any,
    published: Any,
    ready: Any,
    results: Any,
) -> None:
    """Publish ``chunks_per_channel`` 0.1 s float32 chunks on each channel, paced in real time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through stop_evt
    logging.basicConfig(level=logging.WARNING, format="publisher %(process)d: %(levelname)s %(message)s")
    from sensors.publisher import ChunkPublisher

    cfg = MqttConfig(broker=broker)
    pubs: list[Any] = []
    try:
        for g in channels:
            p = ChunkPublisher(cfg, SITE, _machine_name(g), SENSOR, sample_rate_hz=FS, unit="g",
                               encoding="float32", client_id=f"bench-pub-{g}")
            pubs.append(p)
            p.start(timeout=30)
        rng = np.random.default_rng(os.getpid())
        t = np.arange(int(FS)) / FS
        block = (0.3 * rng.standard_normal(t.size) + 0.5 * np.sin(2 * np.pi * 157.0 * t)).astype(np.float32)
        pieces = [block[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES] for i in range(10)]
        ready.put(("ready", os.getpid(), len(pubs)))
        while not start_evt.wait(0.5):
            if stop_evt.is_set():
                return
        if stop_evt.is_set():
            return
        start, wall0 = t0_mono.value, t0_wall_ns.value
        offsets_s = [g / n_total * CHUNK_S for g in channels]
        offsets_ns = [round(o * 1e9) for o in offsets_s]
        late: list[float] = []
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t_first = t_last = time.monotonic()
        sent = 0
        mono = time.monotonic
        for k in range(chunks_per_channel):
            if stop_evt.is_set():
                break
            base = start + (k + 1) * CHUNK_S
            for i, p in enumerate(pubs):
                due = base + offsets_s[i]
                delay = due - mono()
                if delay > 0:
                    time.sleep(delay)
                now = mono()
                if sent == 0:
                    t_first = now
                late.append(now - due)
                p.publish(pieces[(k + channels[i]) % 10], wall0 + offsets_ns[i] + k * CHUNK_NS)
                sent += 1
                published.value = sent
        t_last = mono()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        acked = all(p.flush(timeout=10) for p in pubs)
        results.put({
            "pid": os.getpid(),
            "channels": len(pubs),
            "published": sent,
            "t_first": t_first,
            "t_last": t_last,
            "late_p50_ms": _pct(late, 50) * 1e3,
            "late_p99_ms": _pct(late, 99) * 1e3,
            "late_max_ms": (max(late) if late else float("nan")) * 1e3,
            "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "all_acked": acked,
        })
    except Exception as exc:  # report, so that the parent does not wait for nothing
        results.put({"pid": os.getpid(), "error": repr(exc)})
    finally:
        for p in pubs:
            try:
                p.client.disconnect()
                p.client.loop_stop()
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# Part 2: one trial
# ---------------------------------------------------------------------------------------------
def _import_mosquitto() -> Any:
    from pdm_edge._util.procs import Mosquitto, find_mosquitto

    if find_mosquitto() is None:
        raise SystemExit("mosquitto not installed (Debian package 'mosquitto'; deploy/scripts/test.sh installs it)")
    return Mosquitto


def _ingest_config(address: str, n: int) -> Any:
    sensors = {
        f"{SITE}/{_machine_name(i)}/{SENSOR}": {"kind": "vibration", "sample_rate_hz": FS, "unit": "g", "window_s": WINDOW_S, "hop_s": HOP_S}
        for i in range(n)
    }
    return config_from_dict({"appliance_id": "bench-edge", "mqtt": {"broker": address, "protocol": "5"}, "sensors": sensors}, environ={})


def _n_procs(n: int, override: int | None) -> int:
    if override:
        return max(1, min(override, n))
    return max(1, min(MAX_PUBLISHER_PROCS, math.ceil(n / CHANNELS_PER_PUBLISHER_PROC)))


def _thirds(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 3:
        return (float("nan"), float("nan"))
    k = len(samples) // 3
    return float(np.mean(samples[:k])), float(np.mean(samples[-k:]))


def _check_alive(broker: Any, procs: list[Any]) -> None:
    if broker.proc is None or broker.proc.poll() is not None:
        raise RuntimeError("mosquitto exited during the trial")
    dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
    if dead:
        raise RuntimeError(f"publisher process {dead[0].pid} exited with {dead[0].exitcode}")


def run_trial(n: int, duration_s: float, mosquitto_cls: Any, ctx: Any, procs_override: int | None) -> dict[str, Any]:
    from pdm_edge.ingest.service import Ingestor

    chunks_per_channel = max(1, round(duration_s / CHUNK_S))
    n_procs = _n_procs(n, procs_override)
    groups = [list(range(n))[i::n_procs] for i in range(n_procs)]
    offered_nominal = n / CHUNK_S
    res: dict[str, Any] = {"channels": n, "publisher_procs": n_procs, "duration_s": chunks_per_channel * CHUNK_S}
    latencies_ms: list[float] = []
    consumer_stop = threading.Event()
    windows_seen = [0]

    def consume(ing: Any) -> None:
        # the "next stage": take every window, note how long after its last sample it arrived
        while not consumer_stop.is_set():
            try:
                w = ing.windows.get(timeout=0.1)
            except queue.Empty:
                continue
            end_ns = w.start_ns + round(w.samples.size * 1e9 / w.sample_rate_hz)
            latencies_ms.append((time.time_ns() - end_ns) / 1e6)
            windows_seen[0] += 1

    with tempfile.TemporaryDirectory(prefix="pdm-edge-bench-") as tmp:
        broker = mosquitto_cls(Path(tmp))
        ing = None
        consumer = None
        procs: list[Any] = []
        start_evt, stop_evt = ctx.Event(), ctx.Event()
        try:
            broker.start()
            ing = Ingestor(_ingest_config(broker.address, n))
            consumer = threading.Thread(target=consume, args=(ing,), name="bench-consumer", daemon=True)
            consumer.start()
            ing.start()
            if not ing.wait_ready(15):
                raise RuntimeError("ingestor did not connect/subscribe within 15 s")
            ready_q, results_q = ctx.Queue(), ctx.Queue()
            t0_mono, t0_wall = ctx.RawValue("d", 0.0), ctx.RawValue("q", 0)
            counters = [ctx.RawValue("q", 0) for _ in groups]
            for g, cnt in zip(groups, counters):
                p = ctx.Process(target=_publisher_proc, name="bench-publisher", daemon=True, args=(
                    broker.address, g, n, chunks_per_channel, start_evt, stop_evt, t0_mono, t0_wall, cnt, ready_q, results_q))
                p.start()
                procs.append(p)
            deadline = time.monotonic() + 60 + n * 0.05
            n_ready = 0
            while n_ready < len(procs):
                try:
                    ready_q.get(timeout=0.5)
                    n_ready += 1
                except queue.Empty:
                    _check_alive(broker, procs)
                    if time.monotonic() > deadline:
                        raise RuntimeError("publisher processes did not connect in time") from None
            try:
                err = results_q.get_nowait()  # a publisher that failed before 'ready'
                raise RuntimeError(f"publisher failed: {err}")
            except queue.Empty:
                pass

            assert ing._client is not None and ing._worker is not None
            probe = CpuProbe(
                {"mqtt": ing._client._thread.native_id, "worker": ing._worker.native_id},  # type: ignore[union-attr]
                {"broker": [broker.proc.pid], "publishers": [p.pid for p in procs]},
            )
            lead = 0.5
            t0_wall.value = time.time_ns() + round(lead * 1e9)
            t0_mono.value = t_start = time.monotonic() + lead
            start_evt.set()
            time.sleep(max(0.0, t_start - time.monotonic()))
            cpu0 = probe.snap()
            ing_stats0 = ing.stats()
            t_end = t_start + chunks_per_channel * CHUNK_S + 0.05
            depth, backlog = [], []
            next_sample = time.monotonic()
            while True:
                now = time.monotonic()
                if now >= t_end:
                    break
                if now >= next_sample:
                    _check_alive(broker, procs)
                    st = ing.stats()
                    pub = sum(c.value for c in counters)
                    depth.append(st.chunk_queue_depth)
                    backlog.append(pub - st.windowed)
                    next_sample += 0.5
                time.sleep(max(0.0, min(next_sample, t_end) - time.monotonic()))
            cpu1 = probe.snap()
            st_end = ing.stats()

            results: list[dict[str, Any]] = []
            deadline = time.monotonic() + 30
            while len(results) < len(procs):
                try:
                    results.append(results_q.get(timeout=0.5))
                except queue.Empty:
                    _check_alive(broker, procs)
                    if time.monotonic() > deadline:
                        raise RuntimeError("a publisher process did not report") from None
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                raise RuntimeError(f"publisher failed: {errors[0]}")
            published = sum(r["published"] for r in results)
            t_first = min(r["t_first"] for r in results)
            t_stop = max(r["t_last"] for r in results)

            # drain: every published chunk windowed within DRAIN_LIMIT_S after publishing stopped
            def done() -> int:
                s = ing.stats()
                return sum(v.chunks for v in s.streams.values())

            drain_deadline = t_stop + DRAIN_LIMIT_S
            give_up = t_stop + DRAIN_LIMIT_S + 10.0  # keep waiting a bit to say how far behind it was
            drained_at = None
            windowed_total = done()
            while time.monotonic() < give_up:
                windowed_total = done()
                if windowed_total >= published:
                    drained_at = time.monotonic()
                    break
                time.sleep(0.01)
            st_final = ing.stats()

            cpu = CpuProbe.diff(cpu0, cpu1)
            wall = cpu["wall_s"]
            win_in_run = st_end.windowed - ing_stats0.windowed
            d_first, d_last = _thirds(depth)
            b_first, b_last = _thirds(backlog)
            tol = max(2.0, 0.1 * offered_nominal)
            late_p99 = max(r["late_p99_ms"] for r in results)
            reasons = []
            if d_last - d_first > tol:
                reasons.append(f"chunk queue grew {d_first:.1f}->{d_last:.1f}")
            if b_last - b_first > tol:
                reasons.append(f"backlog grew {b_first:.1f}->{b_last:.1f}")
            drain_s = None if drained_at is None else max(0.0, drained_at - t_stop)
            if drained_at is None or drained_at > drain_deadline:
                reasons.append("not drained in 2 s" if drained_at is None or drain_s is None else f"drain {drain_s:.2f} s > 2 s")
            if st_final.deadletters:
                reasons.append(f"dead letters {dict(st_final.deadletters)}")
            ev = {k: v for k, v in st_final.events.items() if v}
            if ev:
                reasons.append(f"stream events {ev}")
            if late_p99 > LATE_LIMIT_S * 1e3 or published < 0.99 * n * chunks_per_channel:
                reasons.append(f"load generator behind (p99 late {late_p99:.0f} ms)")
            res.update({
                "offered_nominal_per_s": offered_nominal,
                "published": published,
                "offered_per_s": (published - 1) / (t_stop - t_first) if published > 1 and t_stop > t_first else float("nan"),
                "windowed_per_s": win_in_run / wall,
                "windowed_total": windowed_total,
                "windows": st_final.windows,
                "windows_consumed": windows_seen[0],
                "queue_depth_first_third": d_first,
                "queue_depth_last_third": d_last,
                "queue_depth_max_sampled": max(depth) if depth else 0,
                "queue_high_water": st_final.chunk_queue_high_water,
                "backlog_first_third": b_first,
                "backlog_last_third": b_last,
                "drain_s": drain_s,
                "deadletters": dict(st_final.deadletters),
                "queue_full": st_final.deadletters.get("queue_full", 0),
                "events": ev,
                "latency_p50_ms": _pct(latencies_ms, 50),
                "latency_p99_ms": _pct(latencies_ms, 99),
                "latency_max_ms": max(latencies_ms) if latencies_ms else float("nan"),
                "cpu_ingest_process_pct": cpu["self"],
                "cpu_mqtt_thread_pct": cpu["thread:mqtt"],
                "cpu_worker_thread_pct": cpu["thread:worker"],
                "cpu_us_per_chunk": cpu["self"] / 100.0 * wall / max(1, win_in_run) * 1e6,
                "cpu_broker_pct": cpu["proc:broker"],
                "cpu_publishers_pct": cpu["proc:publishers"],
                "cpu_machine_pct": cpu["machine"],
                "cpu_other_pct": cpu["other"],
                "publisher_late_p99_ms": late_p99,
                "publisher_cpu_us_per_chunk": sum(r["cpu_s"] for r in results) / max(1, published) * 1e6,
                "sustained": not reasons,
                "reasons": reasons,
            })
        finally:
            stop_evt.set()
            start_evt.set()
            for p in procs:
                p.join(5)
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
            if ing is not None:
                ing.stop(timeout=5)
            consumer_stop.set()
            if consumer is not None:
                consumer.join(5)
            broker.stop()
    return res


def search(args: argparse.Namespace) -> dict[str, Any]:
    mosquitto_cls = _import_mosquitto()
    ctx = mp.get_context("spawn")
    steps = [int(s) for s in args.channels.split(",")] if args.channels else list(DEFAULT_STEPS)
    steps = [s for s in steps if s <= args.max_channels]
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None
    for n in steps:
        _progress(args, f"trial N={n} ({args.duration:g} s) ...")
        r = run_trial(n, args.duration, mosquitto_cls, ctx, args.publisher_procs)
        trials.append(r)
        _progress(args, "  " + _trial_line(r))
        if r["sustained"]:
            best = r
        else:
            failed = r
            break
        time.sleep(0.5)
    if failed is not None and best is not None and not args.no_bisect:
        mid = (best["channels"] + failed["channels"]) // 2
        mid -= mid % 2
        if best["channels"] < mid < failed["channels"]:
            _progress(args, f"bisect N={mid} ({args.duration:g} s) ...")
            r = run_trial(mid, args.duration, mosquitto_cls, ctx, args.publisher_procs)
            r["bisect"] = True
            trials.append(r)
            _progress(args, "  " + _trial_line(r))
            if r["sustained"]:
                best = r
    out: dict[str, Any] = {
        "trials": sorted(trials, key=lambda r: r["channels"]),
        "max_sustained_channels": best["channels"] if best else 0,
        "first_failure_channels": failed["channels"] if failed else None,
        "search_ended": "failure" if failed else "no failure up to the largest N tried",
    }
    if best is not None:
        share = best["cpu_ingest_process_pct"] / 100.0
        out["at_max"] = {
            "channels": best["channels"],
            "ingest_process_cpu_pct_of_one_core": best["cpu_ingest_process_pct"],
            "mqtt_thread_cpu_pct": best["cpu_mqtt_thread_pct"],
            "worker_thread_cpu_pct": best["cpu_worker_thread_pct"],
            "cpu_us_per_chunk": best["cpu_us_per_chunk"],
            "channels_per_core_extrapolated": best["channels"] / share if share > 0 else None,
            "machine_cpu_pct": best["cpu_machine_pct"],
            "other_load_pct": best["cpu_other_pct"],
        }
    out["trials_with_other_load"] = [r["channels"] for r in trials if (r.get("cpu_other_pct") or 0) > OTHER_LOAD_WARN_PCT]
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _progress(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def _f(v: Any, fmt: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def _trial_line(r: dict[str, Any]) -> str:
    return (f"N={r['channels']}: offered {_f(r['offered_per_s'], '.0f')}/s windowed {_f(r['windowed_per_s'], '.0f')}/s, "
            f"ingest CPU {_f(r['cpu_ingest_process_pct'])}%, machine {_f(r['cpu_machine_pct'])}%, "
            f"{'sustained' if r['sustained'] else 'NOT sustained: ' + '; '.join(r['reasons'])}")


def _environment() -> dict[str, Any]:
    import paho.mqtt

    try:
        mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
    except Exception:
        mosq = "?"
    model = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "paho_mqtt": paho.mqtt.__version__,
        "mosquitto": mosq,
    }


LOAD_NOTE = (
    "load: separate spawned publisher processes (up to {procs} per trial, one per {per} channels), "
    "one sensors.publisher.ChunkPublisher (own paho client, MQTT 5, QoS 1) per channel, one pacing "
    "thread per process; 0.1 s float32 chunks of 2560 samples at real time (10 chunks/s/channel), "
    "channels staggered over the 0.1 s. Publishers, Mosquitto and the ingestor share this machine's CPUs."
)


def print_report(doc: dict[str, Any]) -> None:
    env = doc["environment"]
    print(f"\npdm-edge ingestion benchmark  ({env['cpus']} CPUs, {env['cpu_model']}, Python {env['python']}, "
          f"numpy {env['numpy']}, paho-mqtt {env['paho_mqtt']}, {env['mosquitto']})")
    print("\n1. Cost per chunk (single thread, perf_counter per call)")
    print(f"   {'case':<46} {'bytes':>8} {'median µs':>10} {'p99 µs':>9} {'mean µs':>9} {'MB/s':>8} {'chunks/s':>9}")
    for r in doc["decode"] + [doc["push"]]:
        print(f"   {r['case']:<46} {r['payload_bytes']:>8} {r['median_us']:>10.1f} {r['p99_us']:>9.1f} "
              f"{r['mean_us']:>9.1f} {r['mb_per_s']:>8.1f} {r['per_s']:>9.0f}")
    print("   (MB/s: payload bytes per median decode; for push, float32 sample bytes per mean push - a 1 s window "
          "is copied every 5th chunk)")
    if doc["part1_other_load_pct"] > OTHER_LOAD_WARN_PCT:
        print(f"   WARNING: other programs used {doc['part1_other_load_pct']:.0f}% of the machine during part 1.")
    c = doc["ceiling"]
    print(f"   decode float32 0.1 s + push = {c['us_per_chunk']:.1f} µs per chunk -> at most "
          f"{c['channels_per_core']:.0f} channels per core before any MQTT cost")

    s = doc.get("sustained")
    if s is None:
        return
    print(f"\n2. Sustained 25.6 kHz float32 channels through Mosquitto (window 1 s, hop 0.5 s, {doc['args']['duration']:g} s per trial)")
    print("   " + doc["load_note"])
    hdr = (f"   {'N':>5} {'offered/s':>9} {'windowed/s':>10} {'qdepth 1st->last':>17} {'q hi':>5} "
           f"{'backlog 1st->last':>18} {'drain s':>7} {'lat p50/p99 ms':>15} {'ingest%':>7} {'mqtt%':>6} "
           f"{'worker%':>7} {'µs/chunk':>8} {'broker%':>7} {'pubs%':>6} {'machine%':>8} {'other%':>6}  result")
    print(hdr)
    for r in s["trials"]:
        res = "sustained" if r["sustained"] else "NO: " + "; ".join(r["reasons"])
        if r.get("bisect"):
            res += " (bisect)"
        print(f"   {r['channels']:>5} {_f(r['offered_per_s'], '.0f'):>9} {_f(r['windowed_per_s'], '.0f'):>10} "
              f"{_f(r['queue_depth_first_third']):>8}->{_f(r['queue_depth_last_third']):<8} {r['queue_high_water']:>5} "
              f"{_f(r['backlog_first_third']):>9}->{_f(r['backlog_last_third']):<8} {_f(r['drain_s'], '.2f'):>7} "
              f"{_f(r['latency_p50_ms']):>7}/{_f(r['latency_p99_ms']):<7} "
              f"{_f(r['cpu_ingest_process_pct']):>7} {_f(r['cpu_mqtt_thread_pct']):>6} "
              f"{_f(r['cpu_worker_thread_pct']):>7} {_f(r['cpu_us_per_chunk'], '.0f'):>8} "
              f"{_f(r['cpu_broker_pct']):>7} {_f(r['cpu_publishers_pct']):>6} {_f(r['cpu_machine_pct']):>8} {_f(r['cpu_other_pct']):>6}  {res}")
    print("   (CPU % = of one core over the publishing interval; machine% = of all cores, other% = the part of it\n    not used by ingestor, broker or publishers (other programs, kernel); latency = window end "
          "(last sample's acquisition time) to the consumer taking the window; backlog = published - windowed)")
    print(f"\n   Largest sustained N: {s['max_sustained_channels']} channels"
          + (f" (first failure at {s['first_failure_channels']})" if s["first_failure_channels"] else f" ({s['search_ended']})"))
    a = s.get("at_max")
    if a:
        print(f"   At N={a['channels']} the ingestion process used {a['ingest_process_cpu_pct_of_one_core']:.0f}% of one core "
              f"(MQTT/decode thread {a['mqtt_thread_cpu_pct']:.0f}%, windowing worker {a['worker_thread_cpu_pct']:.0f}%), "
              f"{a['cpu_us_per_chunk']:.0f} µs CPU per chunk -> ~{_f(a['channels_per_core_extrapolated'], '.0f')} channels "
              f"per core by extrapolation (machine {a['machine_cpu_pct']:.0f}% busy).")
    noisy = [r["channels"] for r in s["trials"] if (r.get("cpu_other_pct") or 0) > OTHER_LOAD_WARN_PCT]
    if noisy:
        print(f"   WARNING: other load above {OTHER_LOAD_WARN_PCT:.0f}% of the machine during N={', '.join(map(str, noisy))}; "
              "those trials competed with other programs for the CPUs.")


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table (progress on stderr)")
    ap.add_argument("--duration", type=float, default=None, help="publishing time per trial, s (default 15; --quick 3)")
    ap.add_argument("--max-channels", type=int, default=max(DEFAULT_STEPS), help="largest N to try")
    ap.add_argument("--channels", default=None, help="comma-separated N to try instead of the default steps")
    ap.add_argument("--quick", action="store_true", help="smoke test: short micro-benchmarks, N = 2, 4, 3 s trials")
    ap.add_argument("--no-bisect", action="store_true", help="do not bisect between the last success and the first failure")
    ap.add_argument("--publisher-procs", type=int, default=None, help="publisher processes per trial (default: 1 per 64 channels, at most 4)")
    ap.add_argument("--skip-sustained", action="store_true", help="only part 1 (no broker)")
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 15.0
    if args.quick and args.channels is None:
        args.channels = "2,4"
        args.no_bisect = True
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(levelname)s %(message)s")

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    t0 = time.monotonic()
    doc: dict[str, Any] = {"benchmark": "pdm-edge ingest throughput", "environment": _environment(),
                           "args": {k: v for k, v in vars(args).items()}}
    try:
        micro_s = 0.2 if args.quick else 1.5
        _progress(args, "part 1: decode / windowing cost per chunk ...")
        probe = CpuProbe({}, {})
        snap0 = probe.snap()
        doc["decode"] = bench_decode(micro_s)
        doc["push"] = bench_push(micro_s)
        doc["part1_other_load_pct"] = CpuProbe.diff(snap0, probe.snap())["other"]
        f32 = next(r for r in doc["decode"] if r["encoding"] == "float32" and r["chunk_s"] == 0.1)
        us = f32["mean_us"] + doc["push"]["mean_us"]
        doc["ceiling"] = {"us_per_chunk": us, "channels_per_core": 1e6 / us / (1 / CHUNK_S)}
        if not args.skip_sustained:
            doc["load_note"] = LOAD_NOTE.format(procs=args.publisher_procs or MAX_PUBLISHER_PROCS, per=CHANNELS_PER_PUBLISHER_PROC)
            doc["sustained"] = search(args)
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    except (RuntimeError, PdmEdgeError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    doc["elapsed_s"] = time.monotonic() - t0
    if args.json:
        print(json.dumps(_clean(doc), indent=2))
    else:
        print_report(doc)
        print(f"\n(total time {doc['elapsed_s']:.0f} s)")
    return 0


def _clean(v: Any) -> Any:
    """JSON-safe: NaN -> null, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(v, np.integer):
        return int(v)
    return v


if __name__ == "__main__":
    sys.exit(main())
