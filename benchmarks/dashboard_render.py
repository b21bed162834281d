#!/usr/bin/env python3
"""Dashboard render time on a month of data: 20 machines x 1-minute scores x 30 days (864,000 points).

Builds a SQLite results store in a temporary directory (one sensor per machine, one score a
minute for 30 days ending now; a few anomalous stretches with alerts, one machine stale, one
configured but never scored; an empty model registry so that the registry code path, and its
torch import, is part of the cold figure), then measures:

1. **data layer**: :func:`dashboard.data.fleet_status` (``Store.machines`` plus one short range
   query per machine) and one machine's 30-day score series downsampled with
   ``Store.query_score_buckets`` (at most 1500 buckets of maximum score);
2. **AppTest**: ``streamlit.testing.v1.AppTest`` runs of ``dashboard/app.py``: the fleet page
   *cold* (a fresh process's first run: imports included), *warm, uncached* (Streamlit's query
   caches cleared: what a new refresh period costs) and *cached* (a second session in the same
   refresh period); the machine page with the 30-day range, uncached;
3. **browser** (``--browser``; needs Debian chromium + chromedriver and selenium):
   ``streamlit run`` as a subprocess and headless Chromium: the time from navigation to the
   fleet table being on screen, and to the machine page's 30-day chart.

The target is the fleet page in under 2 s. Figures are this machine's (2 shared cores here):
each is the median of ``--repeat`` runs (the cold run is measured once, in a subprocess).

Usage::

    .venv/bin/python benchmarks/dashboard_render.py [--json] [--browser] [--repeat 5] [--days 30] [--machines 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

NS = 1_000_000_000
MINUTE = 60 * NS


def build(root: Path, machines: int, days: int, now_ns: int) -> tuple[Path, int]:
    """The store, an empty registry and the config; returns (config path, points written)."""
    from pdm_edge.store.sqlite import SQLiteStore
    from pdm_edge.types import Alert, Score

    root.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(root / "store.sqlite")
    n = days * 24 * 60
    end = (now_ns // MINUTE) * MINUTE - MINUTE
    t = end - (n - 1) * MINUTE + np.arange(n, dtype=np.int64) * MINUTE
    rng = np.random.default_rng(0)
    total = 0
    thr = 3.0
    for m in range(machines):
        name = f"machine-{m:02d}"
        scores = rng.normal(0.0, 0.8, n)
        alerts = []
        if m % 4 == 0:  # an anomalous stretch, with its alert (open for machine-00)
            a0 = n - 2000 + 37 * m if m else n - 30
            a1 = min(n, a0 + 30)
            scores[a0:a1] += 8.0
            alerts.append(Alert(f"alert-{m}", "plant", name, "acc", "raised" if m == 0 else "cleared", int(t[a0]),
                                None if m == 0 else int(t[a1 - 1] + MINUTE), float(scores[a0:a1].max()), thr, "v1"))
        last = n if m != 3 else n - 600  # machine-03 stopped sending 10 h ago: stale
        batch = [Score("plant", name, "acc", int(t[i]), float(scores[i]), thr, bool(scores[i] > thr), f"{name}-acc-v1")
                 for i in range(last)]
        for i in range(0, len(batch), 50_000):
            store.write_scores(batch[i:i + 50_000])
        store.write_alerts(alerts)
        total += len(batch)
    store.close()
    from pdm_edge.registry import Registry

    Registry(root / "registry").close()  # empty: the registry code path runs, no version to list
    cfg = root / "config.toml"
    cfg.write_text(
        '[mqtt]\nbroker = "127.0.0.1:1883"\n'
        f'[store]\nsqlite_path = "{root / "store.sqlite"}"\n'
        f'[spool]\npath = "{root / "spool.sqlite"}"\n'
        f'[feedback]\nstate_dir = "{root / "state"}"\n'
        f'[registry]\ndir = "{root / "registry"}"\n'
        '[service]\nhttp = "127.0.0.1:1"\n'
        '[alerts]\nstale_after_s = 300.0\n'
        '[dashboard]\nrefresh_s = 5.0\n'
        '[sensors."plant/machine-20/acc"]\nkind = "vibration"\nsample_rate_hz = 25600.0\nunit = "g"\n'
    )
    return cfg, total


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_data(cfg_path: Path, repeat: int) -> dict[str, float]:
    from dashboard import data
    from pdm_edge.config import load_config
    from pdm_edge.store.factory import open_store

    cfg = load_config(cfg_path, environ={})
    store = open_store(cfg.store)
    out: dict[str, list[float]] = {"fleet_status_s": [], "buckets_30d_s": []}
    now = time.time_ns()
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows = data.fleet_status(store, cfg, now)
        out["fleet_status_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        buckets, every = data.score_buckets(store, "plant", "machine-01", "acc", now - 30 * 86400 * NS, now)
        out["buckets_30d_s"].append(time.perf_counter() - t0)
    assert rows[0].status == "alarm" and len(buckets) <= data.DEFAULT_MAX_POINTS, (rows[0], len(buckets))
    res = {k: round(_median(v), 4) for k, v in out.items()}
    res["machines_listed"] = len(rows)
    res["buckets"] = len(buckets)
    res["bucket_s"] = every
    return res


_COLD = r"""
import os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
os.environ["PDM_EDGE_CONFIG"] = {cfg!r}
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({app!r}, default_timeout=120)
at.run()
assert not at.exception, at.exception
assert at.dataframe and len(at.dataframe[0].value) == {n}, "fleet table missing"
print(time.perf_counter() - t0)
"""


def bench_apptest(cfg_path: Path, repeat: int, machines: int) -> dict[str, float]:
    os.environ["PDM_EDGE_CONFIG"] = str(cfg_path)
    app = str(REPO / "dashboard" / "app.py")
    cold = subprocess.run([sys.executable, "-c", _COLD.format(repo=str(REPO), cfg=str(cfg_path), app=app, n=machines + 1)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    if cold.returncode != 0:
        raise RuntimeError(cold.stderr[-3000:])
    import streamlit as st
    from streamlit import logger as st_logger
    from streamlit.testing.v1 import AppTest

    st_logger.set_log_level("error")  # AppTest's "no runtime" warnings

    def run_fleet() -> tuple[float, AppTest]:
        t0 = time.perf_counter()
        at = AppTest.from_file(app, default_timeout=120)
        at.run()
        dt = time.perf_counter() - t0
        assert not at.exception, at.exception
        assert len(at.dataframe[0].value) == machines + 1
        return dt, at

    run_fleet()  # imports
    uncached, cached, machine = [], [], []
    for _ in range(repeat):
        st.cache_data.clear()
        dt, at = run_fleet()
        uncached.append(dt)
        cached.append(run_fleet()[0])
        st.cache_data.clear()
        at.switch_page("pages/machine.py").run()
        at.segmented_control(key="range_select").set_value("30 d")
        st.cache_data.clear()
        t0 = time.perf_counter()
        at.run()
        machine.append(time.perf_counter() - t0)
        assert not at.exception, at.exception
    return {"fleet_cold_process_s": round(float(cold.stdout.strip().splitlines()[-1]), 3),
            "fleet_warm_uncached_s": round(_median(uncached), 3), "fleet_cached_s": round(_median(cached), 3),
            "machine_30d_uncached_s": round(_median(machine), 3)}


def bench_browser(cfg_path: Path, repeat: int) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from pdm_edge.broker import free_port

    port = free_port()
    log = open(cfg_path.parent / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats",
                             "false", "--server.fileWatcherType", "none"],
                            cwd=REPO, env={**os.environ, "PDM_EDGE_CONFIG": str(cfg_path)}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    d = None
    try:
        import urllib.request

        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1600, "height": 1000, "deviceScaleFactor": 1,
                                                                 "mobile": False})

        def wait(cond, timeout: float = 60.0) -> None:
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout:
                try:
                    if cond():
                        return
                except Exception:
                    pass
                time.sleep(0.05)
            raise TimeoutError("page did not render")

        def fleet_ready() -> bool:
            return bool(d.find_elements("css selector", '[data-testid="stDataFrame"] canvas')) and \
                "select a row to open the machine" in d.find_element("tag name", "body").text

        first, later, machine = None, [], []
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            d.get(f"http://127.0.0.1:{port}/")
            wait(fleet_ready)
            dt = time.perf_counter() - t0
            if i == 0:
                first = dt
            else:
                later.append(dt)
            t0 = time.perf_counter()
            d.get(f"http://127.0.0.1:{port}/machine")
            wait(lambda: "time (UTC)" in d.find_element("tag name", "body").text)
            btn = next(b for b in d.find_elements("css selector", "button") if b.text == "30 d")
            t0 = time.perf_counter()
            btn.click()
            wait(lambda: "maximum score per 30 min bucket" in d.find_element("tag name", "body").text)
            machine.append(time.perf_counter() - t0)
        return {"browser_fleet_first_s": round(first or 0.0, 3), "browser_fleet_s": round(_median(later), 3),
                "browser_machine_30d_s": round(_median(machine), 3)}
    finally:
        if d is not None:
            d.quit()
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(10)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=20)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--browser", action="store_true", help="also measure in headless Chromium")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdm-dash-bench-") as tmp:
        t0 = time.perf_counter()
        cfg, points = build(Path(tmp), args.machines, args.days, time.time_ns())
        res: dict[str, object] = {"machines": args.machines, "days": args.days, "points": points,
                                  "build_s": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count()}
        print(f"store built: {points} points in {res['build_s']} s", file=sys.stderr)
        res.update(bench_data(cfg, args.repeat))
        print("data layer done", file=sys.stderr)
        res.update(bench_apptest(cfg, args.repeat, args.machines))
        print("AppTest done", file=sys.stderr)
        if args.browser:
            res.update(bench_browser(cfg, args.repeat))
        res["target_fleet_s"] = 2.0
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        w = max(len(k) for k in res)
        for k, v in res.items():
            print(f"{k:<{w}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
