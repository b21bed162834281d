"""Shared fixtures: a real Mosquitto broker on a free loopback port, configs, helpers.

The processes (Mosquitto, influxd, ``pdm-edge run``) are :mod:`pdm_edge._util.procs`, the same
classes ``pdm-edge bench`` uses; the fixtures here start and stop them. Mosquitto comes from the
Debian package ``mosquitto`` (``.ci/run`` installs it) and runs with persistence on in a
temporary directory, so a restart keeps persistent sessions and their queued QoS 1 messages,
exactly as ``deploy/mosquitto.conf`` does on an appliance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from pdm_edge._util.procs import InfluxD, Mosquitto, ServiceProcess, find_influxd, find_mosquitto
from pdm_edge.errors import StoreError

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("PDM_EDGE_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto on a free loopback port, stopped after the test."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto not installed: run deploy/scripts/test.sh (apt package 'mosquitto')")
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the module (model tests: stable timing on a shared machine)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def datasets_dir() -> Path:
    """``../shared/datasets``; the test is skipped with the reason when it is absent."""
    if not DATASETS.is_dir():
        pytest.skip(f"../shared/datasets not found at {DATASETS} (set PDM_EDGE_DATASETS); real-recording test skipped")
    return DATASETS


class Collector:
    """A plain paho subscriber that records (topic, payload, retain) of everything it receives."""

    def __init__(self, address: str, topic: str, protocol: int = mqtt.MQTTv5) -> None:
        host, port = address.rsplit(":", 1)
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes, bool]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.02)
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(cond, timeout: float = 20.0) -> bool:
    """Poll ``cond()`` every 20 ms until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def run_cli(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pdm-edge ARGS`` in a subprocess (the installed entry point's module)."""
    return subprocess.run(
        [sys.executable, "-m", "pdm_edge.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
    )


# -- InfluxDB ----------------------------------------------------------------------------------
# A real influxd from the Debian package ``influxdb`` (1.6.7): pdm_edge._util.procs.InfluxD.

@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[InfluxD]:
    """A running influxd (no auth) of the test's own, on free loopback ports; stopped after."""
    if find_influxd() is None:
        pytest.fail("influxd not installed: run deploy/scripts/test.sh (apt package 'influxdb')")
    (tmp_path / "influxd").mkdir()
    srv = InfluxD(tmp_path / "influxd")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def influxd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxD]:
    """One influxd (no auth) shared by the tests that only need a server (one database each)."""
    if find_influxd() is None:
        pytest.fail("influxd not installed: run deploy/scripts/test.sh (apt package 'influxdb')")
    srv = InfluxD(tmp_path_factory.mktemp("influxd"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def influxd_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxD]:
    """An influxd with ``auth-enabled = true`` and the admin ``InfluxD.ADMIN_USER``."""
    if find_influxd() is None:
        pytest.fail("influxd not installed: run deploy/scripts/test.sh (apt package 'influxdb')")
    srv = InfluxD(tmp_path_factory.mktemp("influxd-auth"), auth=True)
    srv.start()
    yield srv
    srv.stop()


# -- `pdm-edge run` as a subprocess (tests/test_service*.py, tests/test_drills*.py) -------------
# The appliance under test is the real command (`python -m pdm_edge.cli --config CFG run`),
# with its log (logfmt) in a file; the HTTP port is 0 and read back from the `http_listening`
# event. Signals come from sensors/simulator.py through the real ChunkPublisher.

SERVICE_SENSOR = "lab/m1/accel"


def service_config_toml(workdir: Path, broker: str, *, influx_url: str | None = None, database: str = "pdm_test",
                        calibration_s: float = 10.0, max_train_seconds: float = 4.0, extra: str = "") -> str:
    """A `pdm-edge run` configuration: a 25.6 kHz vibration sensor `lab/m1/accel` (1 s windows,
    0.5 s hop), state in ``workdir``, InfluxDB store when ``influx_url`` is given (else SQLite),
    HTTP on a free port, short back-off. ``extra`` is appended (more tables, e.g. [ingest])."""
    store = (f'backend = "influxdb"\nurl = "{influx_url}"\ndatabase = "{database}"\ntimeout_s = 2.0\n' if influx_url
             else f'backend = "sqlite"\nsqlite_path = "{workdir}/store.sqlite"\n')
    return (
        'appliance_id = "edge-test"\nsite = "lab"\nlog_level = "INFO"\n'
        f'[mqtt]\nbroker = "{broker}"\nreconnect_min_s = 1.0\nreconnect_max_s = 2.0\n'
        f"[store]\n{store}"
        f'[spool]\npath = "{workdir}/spool.sqlite"\nbatch_size = 500\nbackoff_min_s = 0.2\nbackoff_max_s = 1.0\n'
        f'[feedback]\nstate_dir = "{workdir}/state"\n'
        f'[registry]\ndir = "{workdir}/registry"\n'
        f"[learning]\ncalibration_s = {calibration_s}\nmax_train_seconds = {max_train_seconds}\n"
        '[service]\nhttp = "127.0.0.1:0"\ntorch_threads = 1\nscore_batch = 16\n'
        '[alerts]\nk = 3\nn = 5\n'
        f'[sensors."{SERVICE_SENSOR}"]\nkind = "vibration"\nsample_rate_hz = 25600\nunit = "g"\nwindow_s = 1.0\nhop_s = 0.5\n'
        + extra
    )


def expected_windows(seconds: float, window_s: float = 1.0, hop_s: float = 0.5) -> int:
    """Windows cut from ``seconds`` of contiguous signal."""
    return int((seconds - window_s) // hop_s) + 1 if seconds >= window_s else 0


@pytest.fixture
def service_process(tmp_path: Path) -> Iterator[Any]:
    """A factory ``(config_text, env=None) -> started ServiceProcess``; killed after the test
    if it is still running (its log is printed on failure by pytest's captured output)."""
    made: list[ServiceProcess] = []

    def make(config_text: str, env: dict[str, str] | None = None) -> ServiceProcess:
        sp = ServiceProcess(tmp_path, config_text, env)
        made.append(sp)
        return sp.start()

    yield make
    for sp in made:
        if sp.proc is not None and sp.proc.poll() is None:
            print(sp.log_text()[-5000:])
        sp.kill()


def publish_vibration(address: str, seconds: float, *, start_s: float = 0.0, t0_ns: int, seed: int = 1,
                      fault_onset_s: float | None = None, fault_growth_s: float = 3.0, fault_severity: float = 1.0,
                      speed: float = float("inf"), first_seq: int = 0, sensor: str = SERVICE_SENSOR,
                      stop: threading.Event | None = None, simulator: Any = None) -> tuple[int, Any]:
    """Publish ``seconds`` of the simulator's 25.6 kHz bearing signal (0.1 s chunks, QoS 1) on
    ``pdm/v1/{sensor}/waveform``, the first sample at ``t0_ns + start_s``; an outer-race fault
    from ``fault_onset_s`` (signal time) when given. Pass the returned simulator back (with
    ``start_s`` and ``first_seq``) to continue the same stream. Returns ``(chunks, simulator)``."""
    from pdm_edge.config import MqttConfig
    from sensors.publisher import ChunkPublisher, publish_timed
    from sensors.simulator import FaultSpec, VibrationSimulator

    fs = 25600.0
    if simulator is None:
        spec = None if fault_onset_s is None else FaultSpec(kind="outer", onset_s=fault_onset_s, severity=fault_severity,
                                                           growth_s=fault_growth_s)
        simulator = VibrationSimulator(sample_rate_hz=fs, shaft_hz=25.0, fault=spec, seed=seed)
    site, machine, name = sensor.split("/")
    step = 2560
    n_chunks = round(seconds * fs) // step
    first = round(start_s * fs)

    def chunks():
        for i in range(n_chunks):
            yield t0_ns + round((first + i * step) * 1e9 / fs), simulator.generate(step)

    pub = ChunkPublisher(MqttConfig(broker=address), site, machine, name, sample_rate_hz=fs, unit="g", first_seq=first_seq).start()
    try:
        n = publish_timed(pub, chunks(), speed=speed, stop=stop)
    finally:
        pub.close(60)
    return n, simulator


# -- dashboard ---------------------------------------------------------------------------------
# A demo appliance state (store, registry, label book, labelled-window buffer, users, config) made
# by ``dashboard.demo.build_demo`` from real recordings (CWRU from ../shared/datasets when present,
# else the bundled synthetic sample), built once per session; each test gets its own copy.


@pytest.fixture(scope="session")
def dashboard_demo_session(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The session's demo state (:class:`dashboard.demo.DemoState`); do not write to it."""
    from dashboard.demo import build_demo

    root = tmp_path_factory.mktemp("dashboard-demo") / "state"
    return build_demo(root, datasets=DATASETS if DATASETS.is_dir() else None)


@pytest.fixture
def dashboard_demo(dashboard_demo_session: Any, tmp_path: Path) -> Any:
    """A private copy of the demo state in ``tmp_path / "demo"`` (tests may label and promote)."""
    import dataclasses

    src = dashboard_demo_session.root
    dst = tmp_path / "demo"
    shutil.copytree(src, dst)
    cfg = dst / "config.toml"
    cfg.write_text(cfg.read_text().replace(str(src), str(dst)))
    return dataclasses.replace(dashboard_demo_session, root=dst, config_path=cfg)


# -- real recordings through the broker (tests/test_e2e_real.py, benchmarks/e2e_latency.py) -----

def publish_chunks(address: str, sensor: str, chunks: Any, *, sample_rate_hz: float, unit: str,
                   timeout: float = 120.0) -> int:
    """Publish ``(ts_ns, samples)`` chunks of one stream (``site/machine/sensor``) on its
    waveform topic as fast as the broker takes them (QoS 1, consecutive ``seq`` from 0, the
    timestamps as given: a jump between chunks is a gap for the ingestion stage), then wait
    until the broker acknowledged all of them. Returns the number of chunks published."""
    from pdm_edge.config import MqttConfig
    from sensors.publisher import ChunkPublisher

    site, machine, name = sensor.split("/")
    pub = ChunkPublisher(MqttConfig(broker=address), site, machine, name, sample_rate_hz=sample_rate_hz, unit=unit).start()
    n = 0
    try:
        for ts_ns, x in chunks:
            pub.publish(x, int(ts_ns))
            n += 1
    finally:
        assert pub.close(timeout), f"{pub.unacked} chunk(s) of {sensor} not acknowledged by the broker"
    return n


def influx_rows(influx: Any, q: str, db: str) -> list[list[Any]]:
    """Every row of an InfluxQL SELECT (``[]`` when the measurement is empty or missing)."""
    try:
        return influx.values(q, db)
    except StoreError as exc:  # database not created yet
        if "database not found" in str(exc):
            return []
        raise
