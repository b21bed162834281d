"""The running appliance (`pdm-edge run`, pdm_edge/runtime/, pdm_edge/metrics.py).

The end-to-end test runs the real command against a real Mosquitto and a real InfluxDB, feeds it
the simulator's signal (healthy, then a growing outer-race fault) and checks the scores in
InfluxDB, the alert on MQTT, /healthz, /metrics, systemd notifications (over a real AF_UNIX
datagram socket bound by the test, standing in for systemd) and a clean SIGTERM. The other
tests exercise the helpers directly; nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from pathlib import Path

import pytest
import requests

from pdm_edge.config import config_from_dict, load_config
from pdm_edge.errors import ConfigError
from pdm_edge.metrics import METRIC_NAMES, HttpServer, Metrics, parse_listen_address
from pdm_edge.config import config_toml, dump_toml
from pdm_edge.runtime.logging import JsonFormatter, LogfmtFormatter, log_event
from pdm_edge.runtime.systemd import sd_notify, watchdog_interval_s
from pdm_edge.store.spool import spool_depth
from tests.conftest import (
    REPO,
    SERVICE_SENSOR,
    Collector,
    expected_windows,
    publish_vibration,
    service_config_toml,
    wait_until,
)


# -- helpers, no broker -----------------------------------------------------------------------
def test_config_toml_round_trips_the_example_config(tmp_path: Path) -> None:
    cfg = load_config(REPO / "deploy" / "pdm-edge.toml", environ={})
    path = tmp_path / "again.toml"
    path.write_text(config_toml(cfg))
    assert load_config(path, environ={}) == cfg


def test_dump_toml_quotes_keys_and_writes_every_scalar() -> None:
    text = dump_toml({"a": 1, "b": 2.0, "c": True, "d": "x\"y", "e": ["p", "q"], "skip": None,
                      "t": {"a/b/c": {"k": 0.5, "inner": {"z": 1}}}})
    import tomllib

    assert tomllib.loads(text) == {"a": 1, "b": 2.0, "c": True, "d": "x\"y", "e": ["p", "q"],
                                   "t": {"a/b/c": {"k": 0.5, "inner": {"z": 1}}}}


@pytest.mark.parametrize("value, expected", [("127.0.0.1:0", ("127.0.0.1", 0)), ("0.0.0.0:9108", ("0.0.0.0", 9108)),
                                             ("[::1]:9108", ("::1", 9108))])
def test_parse_listen_address(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(value) == expected


@pytest.mark.parametrize("value", ["9108", ":9108", "host:", "host:70000", "host:x"])
def test_parse_listen_address_refuses(value: str) -> None:
    with pytest.raises(ConfigError, match="service.http"):
        parse_listen_address(value)


def _bound_datagram_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    return s


def test_sd_notify_sends_over_a_unix_datagram_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _bound_datagram_socket(path) as s:
        assert sd_notify("READY=1\nSTATUS=x", environ={"NOTIFY_SOCKET": path})
        assert s.recv(4096) == b"READY=1\nSTATUS=x"
    abstract = f"@pdm-edge-test-{time.time_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + abstract[1:])
        s.settimeout(5)
        assert sd_notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": abstract})
        assert s.recv(4096) == b"WATCHDOG=1"
    assert not sd_notify("READY=1", environ={})
    assert not sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})


def test_watchdog_interval_is_half_the_systemd_period() -> None:
    import os

    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


def test_structured_log_lines() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("pdm_edge.test_structured")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    log_event(logger, logging.INFO, "calibrated", stream="a/b/c", detail="19 windows, threshold 3.5", ok=True, n=None)
    logger.warning("plain %s", "message")
    line = LogfmtFormatter().format(records[0])
    assert re.match(r'ts=\S+Z level=info logger=pdm_edge.test_structured event=calibrated stream=a/b/c '
                    r'detail="19 windows, threshold 3.5" ok=true n=null$', line), line
    assert LogfmtFormatter().format(records[1]).endswith('level=warning logger=pdm_edge.test_structured msg="plain message"')
    doc = json.loads(JsonFormatter().format(records[0]))
    assert doc["event"] == "calibrated" and doc["stream"] == "a/b/c" and doc["level"] == "info"
    assert records[0].getMessage().startswith("event=calibrated stream=a/b/c")


def test_http_server_serves_metrics_and_health_on_a_free_port() -> None:
    state = {"status": "ok"}
    m = Metrics(lambda: {"version": "9.9", "uptime_s": 1.5, "store_reachable": None})
    m.windows_in.inc(3)
    m.set_active_model("s", "m", "x", "v1")
    m.set_active_model("s", "m", "x", "v2")
    srv = HttpServer("127.0.0.1:0", m, lambda: dict(state)).start()
    try:
        assert srv.port > 0 and srv.url == f"http://127.0.0.1:{srv.port}"
        r = requests.get(srv.url + "/metrics", timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.text
        assert "pdm_edge_windows_in_total 3.0" in text
        assert 'pdm_edge_build_info{version="9.9"} 1.0' in text
        assert 'pdm_edge_active_model{machine="m",sensor="x",site="s",version="v2"} 1.0' in text
        assert 'version="v1"' not in text  # the replaced version's series is gone
        assert "pdm_edge_store_reachable -1.0" in text
        assert requests.get(srv.url + "/healthz", timeout=5).json() == {"status": "ok"}
        state["status"] = "down"
        assert requests.get(srv.url + "/healthz", timeout=5).status_code == 503
        assert requests.get(srv.url + "/nope", timeout=5).status_code == 404
    finally:
        srv.stop()
    # each Metrics has its own registry: a second one does not collide
    assert "pdm_edge_windows_in_total 0.0" in Metrics().render().decode()


def test_run_without_config_is_a_configuration_error(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    r = run_cli("run", cwd=tmp_path, env={"PDM_EDGE_CONFIG": ""})
    assert r.returncode == 2 and "configuration error" in r.stderr


def test_run_refuses_a_taken_http_port(tmp_path: Path, mosquitto) -> None:
    from tests.conftest import run_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = service_config_toml(tmp_path, mosquitto.address).replace('http = "127.0.0.1:0"', f'http = "127.0.0.1:{port}"')
        (tmp_path / "c.toml").write_text(text)
        r = run_cli("--config", str(tmp_path / "c.toml"), "run", cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"cannot serve /healthz and /metrics on 127.0.0.1:{port}" in r.stderr


# -- the appliance end to end -----------------------------------------------------------------
def _recv_all(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_end_to_end(mosquitto, influxd_session, service_process, tmp_path: Path) -> None:
    db = "svc_e2e"
    notify_path = str(tmp_path / "notify.sock")
    notify = _bound_datagram_socket(notify_path)
    status = Collector(mosquitto.address, "pdm/v1/_appliance/edge-test/status")
    alerts = Collector(mosquitto.address, "pdm/v1/lab/m1/alert")
    cfg_text = service_config_toml(tmp_path, mosquitto.address, influx_url=influxd_session.url, database=db)
    config_from_dict(__import__("tomllib").loads(cfg_text), environ={})  # the test's config is valid
    svc = service_process(cfg_text, env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"})
    try:
        assert notify.recv(4096).decode().startswith("READY=1")
        assert wait_until(lambda: svc.health()["status"] == "ok", 30), svc.health()
        h = svc.health()
        assert h["broker"]["connected"] and h["store"]["reachable"] is True
        assert h["streams"][SERVICE_SENSOR]["state"] == "unknown"  # configured, nothing received yet
        assert wait_until(lambda: any(p == b"online" for _, p, _ in status.messages), 10)

        # 15 s healthy, then an outer-race fault growing over 3 s; 30 s of signal at full speed
        t0 = time.time_ns() - 30 * 1_000_000_000
        n_chunks, _ = publish_vibration(mosquitto.address, 30.0, t0_ns=t0, fault_onset_s=15.0)
        assert n_chunks == 300
        total = expected_windows(30.0)
        assert wait_until(lambda: svc.metric("pdm_edge_windows_in_total") == total
                          and svc.health()["streams"][SERVICE_SENSOR]["state"] == "scoring", 150), svc.log_text()[-3000:]
        m = re.search(r'event=calibrated stream=lab/m1/accel version=(\S+) detail="(\d+) windows', svc.log_text())
        assert m, svc.log_text()[-3000:]
        version, n_cal = m.group(1), int(m.group(2))
        # the first 10 s of windows (1 s windows, 0.5 s hop), or more until 20 of them are left
        # for training after the gate's fifth is held back
        assert 21 <= n_cal <= 26
        scored = total - n_cal
        assert wait_until(lambda: svc.metric("pdm_edge_windows_scored_total", sensor="accel") == scored
                          and svc.health()["spool"]["depth"] == 0, 120), svc.health()

        # every score is in InfluxDB, with its model version; the fault raised an alert
        assert influxd_session.values("SELECT count(score) FROM anomaly_score WHERE machine = 'm1'", db)[0][1] == scored
        versions = influxd_session.query("SHOW TAG VALUES FROM anomaly_score WITH KEY = model_version", db)
        assert [v[1] for s in versions["series"] for v in s["values"]] == [version]
        assert wait_until(lambda: any(json.loads(p)["state"] == "raised" for _, p, _ in alerts.messages), 20)
        raised = [json.loads(p) for _, p, _ in alerts.messages if json.loads(p)["state"] == "raised"]
        assert raised[0]["sensor"] == "accel" and raised[0]["start_ns"] >= t0 + 14 * 1_000_000_000
        assert raised[0]["peak_score"] > raised[0]["threshold"]
        stored = influxd_session.values("SELECT state, alert_id FROM alert", db)
        assert raised[0]["id"] in [r[2] for r in stored]
        events = influxd_session.values("SELECT event, version FROM model_event", db)
        assert [(e[1], e[2]) for e in events] == [("training_queued", ""), ("calibrated", version)]

        # /healthz
        h = svc.health()
        assert h["status"] == "ok", h
        assert h["uptime_s"] > 0 and h["worker"]["alive"] and h["worker"]["heartbeat_age_s"] < 5
        assert h["spool"]["depth"] == 0 and h["spool"]["drained"] >= scored
        st = h["streams"][SERVICE_SENSOR]
        assert st == {"state": "scoring", "version": version, "windows": total, "scored": scored,
                      "last_sample_ns": st["last_sample_ns"]}
        assert h["alerts"]["raised"] >= 1 and h["ingest"]["deadlettered"] == 0
        assert h["queues"]["windows"] == 0 and h["queues"]["window_capacity"] == 2000
        ring = h["memory"]["recent_windows"]
        assert h["memory"]["rss_bytes"] > 50 * 2**20 and ring["streams"] == 1 and ring["windows"] > 0 and ring["bytes"] > 0

        # /metrics
        samples = svc.metrics()
        names = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum").removesuffix("_created") for n, _, _ in samples}
        missing = {n for n in METRIC_NAMES if n not in names and n.removesuffix("_total") not in names}
        # series without samples yet: no promotion, no dead letter
        assert missing <= {"pdm_edge_model_changes_total", "pdm_edge_deadletters_total", "pdm_edge_records_dropped_total"}, missing
        assert svc.metric("pdm_edge_mqtt_messages_received_total") == 300
        assert svc.metric("pdm_edge_ingest_windows_total") == total
        assert svc.metric("pdm_edge_alerts_total", state="raised") >= 1
        assert svc.metric("pdm_edge_training_runs_total", result="promoted") == 1
        assert svc.metric("pdm_edge_active_model", sensor="accel", version=version) == 1
        assert svc.metric("pdm_edge_stream_state", sensor="accel", state="scoring") == 1
        assert svc.metric("pdm_edge_scoring_latency_seconds_count") > 0
        assert svc.metric("pdm_edge_scoring_latency_seconds_sum") > 0
        assert svc.metric("pdm_edge_deadletters_total") == 0
        assert svc.metric("pdm_edge_spool_depth") == 0 and svc.metric("pdm_edge_store_reachable") == 1
        assert svc.metric("pdm_edge_mqtt_connected", client="ingest") == 1
        assert svc.metric("pdm_edge_queue_capacity", queue="windows") == 2000
        assert svc.metric("pdm_edge_worker_errors_total") == 0
        assert any(m.startswith("WATCHDOG=1") for m in _recv_all(notify))

        # SIGTERM: a clean stop, exit 0, spool empty, "offline" retained
        rc = svc.terminate()
        log_text = svc.log_text()
        assert rc == 0, log_text[-3000:]
        assert re.search(r"event=stopped clean=true windows_unscored=0", log_text), log_text[-3000:]
        assert "Traceback" not in log_text
        assert spool_depth(tmp_path / "spool.sqlite")[0] == 0
        assert any(m.startswith("STOPPING=1") for m in _recv_all(notify))
        assert wait_until(lambda: status.messages and status.messages[-1][1] == b"offline", 10)
        late = Collector(mosquitto.address, "pdm/v1/_appliance/edge-test/status")
        try:
            assert late.wait_for(1, 10)[0][1:] == (b"offline", True)  # retained
        finally:
            late.close()
    finally:
        status.close()
        alerts.close()
        notify.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_during_calibration_scores_the_backlog_before_exiting(mosquitto, service_process, tmp_path: Path) -> None:
    """SIGTERM while the first calibration trains: the service waits for it (within the stop
    budget), scores the windows that queued up meanwhile, flushes them to the (SQLite) store,
    and exits 0."""
    from pdm_edge.store.sqlite import SQLiteStore

    svc = service_process(service_config_toml(tmp_path, mosquitto.address))  # SQLite store
    assert wait_until(lambda: svc.health()["broker"]["connected"], 30)
    t0 = time.time_ns() - 30 * 1_000_000_000
    publish_vibration(mosquitto.address, 16.0, t0_ns=t0)
    total = expected_windows(16.0)
    assert wait_until(lambda: svc.health()["ingest"]["windows"] == total, 60)
    assert svc.terminate() == 0
    log_text = svc.log_text()
    # the scenario: the stop began before the calibration ended (training takes seconds)
    assert log_text.index("event=stopping") < log_text.index("event=calibrated"), log_text[-3000:]
    m = re.search(r'event=calibrated stream=lab/m1/accel version=\S+ detail="(\d+) windows', log_text)
    assert m, log_text[-3000:]
    scored = total - int(m.group(1))
    assert re.search(r"event=stopped clean=true windows_unscored=0 calibrations_unfinished=null spool_depth=0", log_text)
    store = SQLiteStore(tmp_path / "store.sqlite")
    try:
        assert len(store.query_scores("lab", "m1", 0, 2**62)) == scored > 0
        assert [e.event for e in store.query_model_events("lab", "m1", 0, 2**62)] == ["training_queued", "calibrated"]
    finally:
        store.close()


def test_registry_promotion_and_rollback_become_model_events(mosquitto, tmp_path: Path, one_torch_thread) -> None:
    """In-process Service (HTTP on port 0): a promotion and a rollback in its registry are stored
    as model events and move pdm_edge_active_model. Like tests/test_registry.py, a randomly
    initialised encoder with a made-up sha256 and 12 kHz windows keep the training short."""
    import hashlib
    import tomllib

    import torch

    from pdm_edge.model.encoder import Encoder, EncoderConfig
    from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
    from pdm_edge.runtime.service import Service
    from pdm_edge.types import Window
    from sensors.simulator import VibrationSimulator

    torch.manual_seed(0)
    enc, sha = Encoder(EncoderConfig()), hashlib.sha256(b"pdm-edge tests: service, random encoder").hexdigest()
    sim = VibrationSimulator(sample_rate_hz=12_000.0, seed=3)
    windows = [Window("lab", "m1", "accel", "vibration", i * 250_000_000, 12_000.0, "g", sim.generate(3000), i) for i in range(24)]

    def scorer(seed: int) -> Scorer:
        s = Scorer(enc, sha, ScorerConfig(kind="vibration", sample_rate_hz=12_000.0, hop_s=0.25,
                                          train=TrainConfig(max_epochs=1, max_seconds=10.0, seed=seed), min_windows=10))
        s.learn_many(windows)
        s.calibrate()
        return s

    cfg = config_from_dict(tomllib.loads(service_config_toml(tmp_path, mosquitto.address)), environ={})
    svc = Service(cfg, encoder=enc, encoder_sha256=sha).start()
    try:
        assert svc.http.port != 0 and svc.http_url == f"http://127.0.0.1:{svc.http.port}"
        assert requests.get(svc.http_url + "/healthz", timeout=5).json()["worker"]["alive"]
        from threadpoolctl import threadpool_info  # numpy's / scipy's BLAS pools follow [service] torch_threads

        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {cfg.service.torch_threads}
        summary = {"normal_windows": 24, "adapter_epochs": 1, "train_seconds": 0.5, "threshold": 3.0}
        v1 = svc.registry.add_candidate(scorer(0), site="lab", machine="m1", sensor="accel", trigger="initial",
                                        training_summary=summary)
        svc.registry.promote(v1.id, "first version")
        v2 = svc.registry.add_candidate(scorer(1), site="lab", machine="m1", sensor="accel", parent=v1.id, trigger="labels")
        svc.registry.promote(v2.id, "gate passed")
        svc.registry.rollback("lab", "m1", "accel")
        assert wait_until(lambda: svc.spool.depth() == 0, 20)
        events = svc.store.query_model_events("lab", "m1", 0, 2**63 - 1)
        assert [(e.event, e.version) for e in events] == [("calibrated", v1.id), ("promoted", v2.id), ("rolled_back", v1.id)]
        assert events[0].detail == "24 windows (0 held back for the gate), adapter 1 epochs in 0.5 s, threshold 3.00"
        text = svc.metrics.render().decode()
        assert f'pdm_edge_active_model{{machine="m1",sensor="accel",site="lab",version="{v1.id}"}} 1.0' in text
        assert f'version="{v2.id}"' not in text.split("pdm_edge_active_model", 1)[1].split("# HELP", 1)[0]
        assert 'pdm_edge_model_changes_total{event="rolled_back",machine="m1",sensor="accel",site="lab"} 1.0' in text
    finally:
        report = svc.stop(10)
    assert report.clean and report.spool_depth == 0
    assert svc.stop(10) is report  # idempotent
