#!/usr/bin/env python3
"""Store throughput: sustained points/s into InfluxDB and SQLite, and the drain rate after an outage.

Starts a real influxd (``pdm_edge._util.procs.InfluxD``: Debian's ``influxdb``, temporary config, free
loopback ports, the same settings as the test suite) and a SQLite store in a temporary
directory, then measures:

1. **direct**: ``Store.write_scores`` with batches of 5000 scores (one machine, 4 sensors,
   1 s windows), back to back, for ``--points`` points per store: points/s over the whole run
   and the median / p99 time per batch (serialisation + HTTP + server for InfluxDB; an upsert
   transaction for SQLite);
2. **spool**: the same points through :class:`~pdm_edge.store.spool.Spool` +
   :class:`~pdm_edge.store.spool.SpoolWriter` (``batch_size`` 5000): a producer puts batches of
   5000 as fast as it can, the figure is points / (first put -> spool empty), and the producer's
   own put rate;
3. **outage**: influxd stopped, ``--outage-points`` (50,000) scores put into the spool, influxd
   started again; the drain rate is points / (influxd answering /ping -> spool empty). The
   writer's back-off is capped at 0.5 s for the run so that the figure measures draining, not
   waiting (the shipped default cap is 30 s: after a long outage the first retry comes up to
   30 s after the database is back).

Each phase checks that every point arrived (count query). Everything shares this machine (the
benchmark process, influxd and SQLite compete for its cores), so read the figures as this
machine's, not as a server's capacity.

Usage::

    .venv/bin/python benchmarks/store_throughput.py [--json] [--points N] [--outage-points N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pdm_edge.config import SpoolConfig  # noqa: E402
from pdm_edge._util.procs import InfluxD  # noqa: E402
from pdm_edge.store.influx import InfluxStore  # noqa: E402
from pdm_edge.store.spool import Spool, SpoolWriter  # noqa: E402
from pdm_edge.store.sqlite import SQLiteStore  # noqa: E402
from pdm_edge.types import Score  # noqa: E402

S = 1_000_000_000
BATCH = 5000
SENSORS = ("de", "nde", "axial", "mic")


def make_scores(offset: int, n: int, machine: str) -> list[Score]:
    """``n`` scores of one machine over 4 sensors, consecutive 1 s windows from ``offset``."""
    t0 = 1_795_000_000 * S
    out = []
    for i in range(offset, offset + n):
        sensor = SENSORS[i % len(SENSORS)]
        t = t0 + (i // len(SENSORS)) * S
        v = (i * 7919 % 1000) / 100.0
        out.append(Score("bench", machine, sensor, t, v, 8.0, v > 8.0, "v1"))
    return out


def count_points(store: Any, machine: str, n: int) -> int:
    t0 = 1_795_000_000 * S
    return len(store.query_scores("bench", machine, t0, t0 + (n // len(SENSORS) + 1) * S))


def bench_direct(store: Any, n: int, machine: str) -> dict[str, Any]:
    batches = [make_scores(i, min(BATCH, n - i), machine) for i in range(0, n, BATCH)]
    times = []
    t_start = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        store.write_scores(b)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t_start
    stored = count_points(store, machine, n)
    return {"points": n, "seconds": total, "points_per_s": n / total,
            "batch_median_ms": statistics.median(times) * 1e3,
            "batch_p99_ms": sorted(times)[max(0, round(0.99 * len(times)) - 1)] * 1e3, "stored": stored}


def bench_spool(store: Any, n: int, machine: str, workdir: Path) -> dict[str, Any]:
    spool = Spool(workdir / f"spool-{store.kind}.sqlite", max_records=10_000_000)
    writer = SpoolWriter(spool, store, SpoolConfig(batch_size=BATCH, backoff_min_s=0.05, backoff_max_s=0.5)).start()
    batches = [make_scores(i, min(BATCH, n - i), machine) for i in range(0, n, BATCH)]
    put_done = threading.Event()
    put_s = 0.0

    def produce() -> None:
        nonlocal put_s
        t = time.perf_counter()
        for b in batches:
            spool.put("score", b)
        put_s = time.perf_counter() - t
        put_done.set()

    t0 = time.perf_counter()
    th = threading.Thread(target=produce)
    th.start()
    th.join()
    ok = writer.wait_empty(600)
    total = time.perf_counter() - t0
    writer.stop(10)
    spool.close()
    stored = count_points(store, machine, n)
    return {"points": n, "seconds": total, "points_per_s": n / total, "put_points_per_s": n / put_s,
            "drained": ok, "stored": stored}


def bench_outage(srv: InfluxD, n: int, workdir: Path) -> dict[str, Any]:
    store = InfluxStore(srv.url, "bench_outage", timeout_s=5)
    spool = Spool(workdir / "spool-outage.sqlite", max_records=10_000_000)
    writer = SpoolWriter(spool, store, SpoolConfig(batch_size=BATCH, backoff_min_s=0.05, backoff_max_s=0.5)).start()
    srv.stop()
    t = time.perf_counter()
    for i in range(0, n, BATCH):
        spool.put("score", make_scores(i, min(BATCH, n - i), "outage"))
    put_s = time.perf_counter() - t
    time.sleep(1.0)
    before = writer.stats()
    srv.start()
    t0 = time.perf_counter()
    ok = writer.wait_empty(600)
    drain_s = time.perf_counter() - t0
    writer.stop(10)
    spool.close()
    stored = count_points(store, "outage", n)
    store.close()
    return {"points": n, "put_points_per_s": n / put_s, "depth_during_outage": before.depth,
            "state_during_outage": before.state, "drain_seconds": drain_s, "drain_points_per_s": n / drain_s,
            "drained": ok, "stored": stored}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=100_000, help="points per store and mode (default 100000)")
    ap.add_argument("--outage-points", type=int, default=50_000, help="points spooled during the outage (default 50000)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()

    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "platform": platform.platform()}}
    with tempfile.TemporaryDirectory(prefix="pdm-store-bench-") as tmp:
        work = Path(tmp)
        (work / "influxd").mkdir()
        srv = InfluxD(work / "influxd")
        srv.start()
        try:
            influx = InfluxStore(srv.url, "bench", timeout_s=30)
            sqlite = SQLiteStore(work / "store.sqlite")
            out["influxdb_version"] = influx.server_info()["version"]
            out["sqlite_version"] = sqlite.server_info()["version"]
            for name, store in (("influxdb", influx), ("sqlite", sqlite)):
                print(f"{name}: direct ...", file=sys.stderr)
                out[f"{name}_direct"] = bench_direct(store, args.points, "direct")
                print(f"{name}: spool + writer ...", file=sys.stderr)
                out[f"{name}_spool"] = bench_spool(store, args.points, "spool", work)
            sqlite.close()
            influx.close()
            print(f"influxdb: outage of {args.outage_points} points ...", file=sys.stderr)
            out["influxdb_outage"] = bench_outage(srv, args.outage_points, work)
        finally:
            srv.stop()

    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"InfluxDB {out['influxdb_version']}, SQLite {out['sqlite_version']}, {out['machine']['cpus']} CPUs, "
          f"batches of {BATCH} scores")
    print(f"{'':28} {'points':>8} {'points/s':>10} {'batch p50':>10} {'batch p99':>10} {'stored':>8}")
    for name in ("influxdb", "sqlite"):
        d = out[f"{name}_direct"]
        print(f"{name + ' direct':28} {d['points']:>8} {d['points_per_s']:>10.0f} {d['batch_median_ms']:>8.1f}ms "
              f"{d['batch_p99_ms']:>8.1f}ms {d['stored']:>8}")
        sp = out[f"{name}_spool"]
        print(f"{name + ' spool+writer':28} {sp['points']:>8} {sp['points_per_s']:>10.0f} {'':>10} {'':>10} {sp['stored']:>8}"
              f"   (put alone: {sp['put_points_per_s']:.0f}/s)")
    o = out["influxdb_outage"]
    print(f"outage: {o['points']} points spooled ({o['put_points_per_s']:.0f}/s, state {o['state_during_outage']}, "
          f"depth {o['depth_during_outage']}); after restart drained in {o['drain_seconds']:.2f} s = "
          f"{o['drain_points_per_s']:.0f} points/s; stored {o['stored']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
