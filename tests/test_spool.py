"""The durable spool against a real influxd: outages, a killed appliance, the bound; and
``pdm-edge store check`` against real servers."""

from __future__ import annotations

import dataclasses
import json

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pdm_edge.broker import free_port
from pdm_edge.condition import Condition
from pdm_edge.config import SpoolConfig
from pdm_edge.errors import StoreError
from pdm_edge.store import ModelEvent
from pdm_edge.store.influx import InfluxStore
from pdm_edge.store.records import from_json, to_json
from pdm_edge.store.spool import Spool, SpoolWriter, spool_depth
from pdm_edge.store.sqlite import SQLiteStore
from pdm_edge.types import Alert, FaultMatch, Label, Score

from .conftest import REPO, run_cli

S = 1_000_000_000
T0 = 1_795_000_000 * S
FAST = SpoolConfig(batch_size=250, backoff_min_s=0.05, backoff_max_s=0.4)


def scores(start: int, n: int, machine: str = "pump-07") -> list[Score]:
    return [Score("plant1", machine, "de", T0 + i * S, float(i % 97), 50.0, (i % 97) > 50.0, "v1")
            for i in range(start, start + n)]


class RecordingStore:
    """Wraps a store and records the window starts of every *successful* score write."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.kind = inner.kind  # type: ignore[attr-defined]
        self.written: list[int] = []

    def write_scores(self, records: list[Score]) -> None:
        self.inner.write_scores(records)  # type: ignore[attr-defined]
        self.written.extend(r.start_ns for r in records)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_records_json_round_trip() -> None:
    recs = {
        "score": Score("p", "Pumpe Süd 7 — Ø", "de", T0, 1.5, None, False, None),
        "alert": Alert("a1", "p", "m", "s", "raised", T0, None, 9.0, 3.0, "v1"),
        "label": Label("l1", "p", "m", T0, T0 + S, "fault", "al", T0, sensor="s", fault_type="imbalance", note='"x"\n'),
        "model_event": ModelEvent("p", "m", T0, "promoted", "v2", "gate ok"),
        "condition": Condition("p", "m", "de", T0, "g", 0.5, 1.5, 3.0, 4.2, 0.1, 0.2, 0.05, 2.9, "C"),
    }
    match = FaultMatch("l1", "imbalance", T0 - S, 0.75)
    recs["alert_with_match"] = dataclasses.replace(recs["alert"], fault_match=match)
    recs["score_with_match"] = dataclasses.replace(recs["score"], fault_match=match)
    for key, rec in recs.items():
        kind = key.split("_with_")[0]
        assert from_json(kind, to_json(kind, rec)) == rec
    with pytest.raises(ValueError):
        to_json("score", Score("p", "m", "s", T0, float("nan"), None, False, None))
    with pytest.raises(ValueError, match="similarity"):
        to_json("alert", dataclasses.replace(recs["alert"], fault_match=FaultMatch("l1", None, T0, float("nan"))))
    with pytest.raises(TypeError, match="fault_match"):
        to_json("alert", dataclasses.replace(recs["alert"], fault_match={"label_id": "l1"}))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        to_json("alert", recs["score"])


def test_outage_2000_scores_stored_exactly_once_in_order(influxd, tmp_path: Path) -> None:
    store = RecordingStore(InfluxStore(influxd.url, "spooltest", timeout_s=2))
    spool = Spool(tmp_path / "spool.sqlite")
    writer = SpoolWriter(spool, store, FAST).start()
    put = 0

    def put_some(n: int) -> None:
        nonlocal put
        for i in range(put, put + n, 100):
            spool.put("score", scores(i, 100))
        put += n

    put_some(500)  # while the database is up
    assert writer.wait_empty(20)
    influxd.stop()
    put_some(1000)  # the database is down: everything waits on disk
    deadline = time.monotonic() + 10
    while writer.stats().state != "backoff" and time.monotonic() < deadline:
        time.sleep(0.02)
    st = writer.stats()
    assert st.state == "backoff" and st.connected is False and st.depth == 1000
    assert "cannot reach InfluxDB" in (st.last_error or "")
    influxd.start()
    put_some(500)
    assert writer.wait_empty(30), writer.stats()
    assert writer.stop(5)
    st = writer.stats()
    assert st.connected is True and st.drained == 2000 and st.dropped == 0 and st.rejected == 0

    # exactly 2000 points, the right timestamps, none duplicated
    assert influxd.values("SELECT count(score) FROM anomaly_score", "spooltest")[0][1] == 2000
    times = [row[0] for row in influxd.values("SELECT score FROM anomaly_score", "spooltest")]
    assert times == [T0 + i * S for i in range(2000)]
    got = store.inner.query_scores("plant1", "pump-07", T0, T0 + 2000 * S)
    assert got == scores(0, 2000)
    # drained in order: each accepted write continues where the previous one stopped
    assert store.written == [T0 + i * S for i in range(2000)]
    spool.close()


def test_killed_appliance_resumes_draining(influxd, tmp_path: Path) -> None:
    spool_path = tmp_path / "spool.sqlite"
    app = [sys.executable, str(REPO / "tests" / "spool_app.py"), str(spool_path), influxd.url, "killtest"]
    influxd.stop()  # points pile up in the spool
    proc = subprocess.Popen([*app, "1500"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("PUT 1500"), line
        time.sleep(0.3)  # the writer is failing and backing off
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert spool_depth(spool_path)[0] == 1500
    influxd.start()
    done = subprocess.run([*app, "0", "--exit-when-empty"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "DRAINED 1500" in done.stdout
    assert spool_depth(spool_path)[0] == 0
    assert influxd.values("SELECT count(score) FROM anomaly_score", "killtest")[0][1] == 1500


def test_killed_while_draining_no_duplicates(influxd, tmp_path: Path) -> None:
    """SIGKILL in the middle of a drain: the replayed batch overwrites, nothing doubles."""
    spool_path = tmp_path / "spool.sqlite"
    app = [sys.executable, str(REPO / "tests" / "spool_app.py"), str(spool_path), influxd.url, "midtest"]
    proc = subprocess.Popen([*app, "6000"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout and proc.stdout.readline().startswith("PUT 6000")
        deadline = time.monotonic() + 20
        while spool_depth(spool_path)[0] > 4000 and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = spool_depth(spool_path)[0]
    assert 0 < left < 6000
    done = subprocess.run([*app, "0", "--exit-when-empty"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    times = [row[0] for row in influxd.values("SELECT score FROM anomaly_score", "midtest")]
    assert times == [T0 + i * S for i in range(6000)]


def test_bound_drops_oldest_scores_first_and_keeps_alerts(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, max_records=100)
    alerts = [Alert(f"a{i}", "plant1", "pump-07", "de", "raised", T0 + i * S, None, 9.0, 3.0, "v1") for i in range(5)]
    spool.put("alert", alerts[:2])
    assert spool.put("score", scores(0, 60)) == 0
    spool.put("alert", alerts[2:])
    assert spool.put("score", scores(60, 90)) == 55  # 155 rows for a bound of 100
    assert spool.depth() == 100 and spool.dropped == 55
    assert spool.count_by_kind() == {"alert": 5, "score": 95}
    # the oldest scores went; the newest 95 stay, in order
    rows = spool.peek(1000)
    kept = [from_json(r.kind, r.payload).start_ns for r in rows if r.kind == "score"]
    assert kept == [T0 + i * S for i in range(55, 150)]
    # non-score records are never dropped: the spool grows past its bound instead
    more = [Alert(f"b{i}", "plant1", "pump-07", "de", "raised", T0 + i * S, None, 9.0, 3.0, "v1") for i in range(100)]
    assert spool.put("alert", more) == 95
    assert spool.count_by_kind() == {"alert": 105} and spool.dropped == 150
    spool.close()
    # the counter persists; the rows drain as usual
    spool = Spool(path, max_records=100)
    assert spool.dropped == 150 and spool.depth() == 105
    store = SQLiteStore(tmp_path / "store.sqlite")
    writer = SpoolWriter(spool, store, FAST).start()
    assert writer.wait_empty(10)
    assert writer.stop(5)
    assert writer.stats().dropped == 150
    assert len(store.query_alerts("plant1", "pump-07", T0, T0 + 1000 * S)) == 105
    assert store.query_scores("plant1", "pump-07", T0, T0 + 1000 * S) == []
    store.close()
    spool.close()


def test_bad_records_never_enter_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite")
    with pytest.raises(ValueError):
        spool.put("score", [*scores(0, 3), Score("p", "ends in \\", "s", T0, 1.0, None, False, None)])
    with pytest.raises(ValueError):
        spool.put("gauge", [])
    assert spool.depth() == 0
    spool.close()


def test_rejected_records_are_isolated_and_counted(influxd, tmp_path: Path) -> None:
    """A point the server refuses for good (a field whose type changed by hand) must not block
    the spool: it is dropped and counted, everything else is written."""
    influxd.query('CREATE DATABASE "rej"', method="POST")
    import requests

    # someone wrote "score" as a string for machine pump-07 sensor de at T0 + 7 s's shard
    requests.post(influxd.url + "/write", params={"db": "rej", "precision": "ns"},
                  data=f'anomaly_score,site=plant1,machine=pump-07,sensor=de score="oops" {T0 - S}'.encode()).raise_for_status()
    spool = Spool(tmp_path / "spool.sqlite")
    spool.put("score", scores(0, 40))
    writer = SpoolWriter(spool, InfluxStore(influxd.url, "rej"), FAST).start()
    assert writer.wait_empty(20)
    writer.stop(5)
    st = writer.stats()
    # 1.x rejects float "score" in the shard where it is a string: every point of that shard
    assert st.rejected == 40 and st.depth == 0
    assert "field type conflict" in (st.last_rejected or "")
    # issue 15 row 7: nothing is dropped silently; every refused record is in the dead-letter table
    dead = spool.deadletters(100)
    assert st.deadletter_depth == 40 and len(dead) == 40
    assert all(k == "score" and "field type conflict" in r for k, _, r, _ in dead)
    assert sorted(json.loads(p)["start_ns"] for _, p, _, _ in dead) == [s.start_ns for s in scores(0, 40)]
    spool.close()


def test_stop_during_outage_keeps_records(tmp_path: Path) -> None:
    store = InfluxStore(f"http://127.0.0.1:{free_port()}", "x", timeout_s=1)
    spool = Spool(tmp_path / "spool.sqlite")
    spool.put("score", scores(0, 10))
    writer = SpoolWriter(spool, store, SpoolConfig(batch_size=5, backoff_min_s=0.05, backoff_max_s=30)).start()
    time.sleep(0.3)
    t = time.monotonic()
    assert writer.stop(0.5) is False
    assert time.monotonic() - t < 3
    assert spool.depth() == 10 and writer.stats().state == "stopped"
    spool.close()


def test_spool_put_never_waits_for_the_store(tmp_path: Path) -> None:
    class Hanging:
        kind = "hanging"

        def __init__(self) -> None:
            self.release = threading.Event()

        def write_scores(self, records: list[Score]) -> None:
            self.release.wait(10)
            raise StoreError("still hanging")

    store = Hanging()
    spool = Spool(tmp_path / "spool.sqlite")
    writer = SpoolWriter(spool, store, FAST).start()
    spool.put("score", scores(0, 10))
    time.sleep(0.1)  # the writer is now stuck in the store
    t = time.monotonic()
    for i in range(10, 1010, 100):
        spool.put("score", scores(i, 100))
    assert time.monotonic() - t < 2
    assert spool.depth() == 1010
    store.release.set()
    writer.stop(0.5)
    spool.close()


# -- pdm-edge store check ----------------------------------------------------------------------
def test_store_check_ok(influxd_session, tmp_path: Path) -> None:
    influxd_session.query('CREATE DATABASE "checkdb"', method="POST")
    spool = Spool(tmp_path / "var" / "spool.sqlite")
    spool.put("score", scores(0, 7))
    spool.close()
    r = run_cli("store", "check", "--influx-url", influxd_session.url, "--database", "checkdb", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "influxdb 1.6.7" in r.stdout
    assert "round trip" in r.stdout and " ms" in r.stdout
    assert "spool: 7 records waiting" in r.stdout
    assert influxd_session.values("SELECT count(event) FROM model_event WHERE machine = '_check'", "checkdb")[0][1] == 1


def test_store_check_sqlite_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "pdm-edge.toml"
    cfg.write_text(f'[mqtt]\nbroker = "127.0.0.1:1883"\n[store]\nsqlite_path = "{tmp_path}/s.sqlite"\n'
                   f'[spool]\npath = "{tmp_path}/none.sqlite"\n')
    r = run_cli("--config", str(cfg), "store", "check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("store: sqlite 3.") and "spool: none at" in r.stdout


def test_store_check_wrong_credentials(influxd_auth, tmp_path: Path) -> None:
    ok = run_cli("store", "check", "--influx-url", influxd_auth.url, "--database", "authdb", "--username",
                 influxd_auth.ADMIN_USER, cwd=tmp_path, env={"PDM_EDGE__STORE__PASSWORD": influxd_auth.ADMIN_PASSWORD})
    # the database does not exist and a check creates nothing
    assert ok.returncode == 1 and "database 'authdb' not found" in ok.stderr, ok.stderr
    influxd_auth.query('CREATE DATABASE "authdb"', method="POST")
    ok = run_cli("store", "check", "--influx-url", influxd_auth.url, "--database", "authdb", "--username",
                 influxd_auth.ADMIN_USER, cwd=tmp_path, env={"PDM_EDGE__STORE__PASSWORD": influxd_auth.ADMIN_PASSWORD})
    assert ok.returncode == 0, ok.stderr
    for args in (["--username", influxd_auth.ADMIN_USER, "--password", "wrong"], ["--username", "nobody", "--password", "x"], []):
        r = run_cli("store", "check", "--influx-url", influxd_auth.url, "--database", "authdb", *args, cwd=tmp_path)
        assert r.returncode == 1
        assert r.stderr.startswith("error: authentication failed at InfluxDB"), r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_store_check_unreachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    r = run_cli("store", "check", "--influx-url", url, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: cannot reach InfluxDB at {url}: connection refused"
    assert r.stdout == ""
