"""Shared fixtures: a real Mosquitto broker on a free loopback port, configs, helpers.

Mosquitto comes from the Debian package ``mosquitto`` (``.ci/run`` installs it). The fixture
starts it with persistence on in a temporary directory, so a restart keeps persistent sessions
and their queued QoS 1 messages, exactly as ``deploy/mosquitto.conf`` does on an appliance.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("PDM_EDGE_DATASETS", REPO.parent / "shared" / "datasets"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


class Mosquitto:
    """A mosquitto process owned by a test; ``stop()``/``start()`` simulate a broker restart."""

    def __init__(self, workdir: Path) -> None:
        exe = _find_mosquitto()
        if exe is None:
            pytest.fail("mosquitto not installed: run deploy/scripts/test.sh (apt package 'mosquitto')")
        self.exe = exe
        self.port = _free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            # run as the current user: started as root, mosquitto would otherwise switch to the
            # 'mosquitto' user and silently fail to write its log and persistence file here
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 20\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto on a free loopback port, stopped after the test."""
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
# A real influxd from the Debian package ``influxdb`` (1.6.7), with a temporary config: meta,
# data and WAL in the test's temp dir, HTTP and RPC bound to free loopback ports, no usage
# reporting, no _internal monitor database. ``auth=True`` turns on [http] auth-enabled and
# creates an admin user through /query (the first user may be created without credentials).

INFLUXD_CANDIDATES = ("/usr/bin/influxd", "/usr/local/bin/influxd")


def _find_influxd() -> str | None:
    return shutil.which("influxd") or next((p for p in INFLUXD_CANDIDATES if os.path.exists(p)), None)


class InfluxD:
    """An influxd process owned by a test; ``stop()``/``start()`` simulate an outage."""

    ADMIN_USER = "pdm_admin"
    ADMIN_PASSWORD = "s3cret pass'word"

    def __init__(self, workdir: Path, auth: bool = False) -> None:
        exe = _find_influxd()
        if exe is None:
            pytest.fail("influxd not installed: run deploy/scripts/test.sh (apt package 'influxdb')")
        self.exe = exe
        self.auth = auth
        self.workdir = workdir
        self.port = _free_port()
        self.rpc_port = _free_port()
        while self.rpc_port == self.port:
            self.rpc_port = _free_port()
        self.conf = workdir / "influxdb.conf"
        self.log = workdir / "influxd.log"
        self.conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{self.rpc_port}"\n'
            "[meta]\n"
            f'  dir = "{workdir}/meta"\n'
            "  logging-enabled = false\n"
            "[data]\n"
            f'  dir = "{workdir}/data"\n'
            f'  wal-dir = "{workdir}/wal"\n'
            '  index-version = "inmem"\n'
            "  query-log-enabled = false\n"
            "[monitor]\n"
            "  store-enabled = false\n"
            "[subscriber]\n"
            "  enabled = false\n"
            "[continuous_queries]\n"
            "  enabled = false\n"
            "[http]\n"
            f'  bind-address = "127.0.0.1:{self.port}"\n'
            f"  auth-enabled = {'true' if auth else 'false'}\n"
            "  log-enabled = false\n"
            "  pprof-enabled = false\n"
            "[logging]\n"
            '  level = "warn"\n'
            "  suppress-logo = true\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._users_created = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        import requests

        logf = self.log.open("ab")
        self.proc = subprocess.Popen([self.exe, "-config", str(self.conf)], stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/ping", timeout=0.5).status_code == 204:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"influxd did not answer /ping on {self.port} within {timeout} s")
        if self.auth and not self._users_created:
            self.query(f"CREATE USER {self.ADMIN_USER} WITH PASSWORD "
                       f"'{self.ADMIN_PASSWORD.replace(chr(39), chr(92) + chr(39))}' WITH ALL PRIVILEGES", method="POST",
                       auth=False)
            self._users_created = True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def query(self, q: str, db: str | None = None, method: str = "GET", auth: bool = True) -> dict[str, Any]:
        """Run InfluxQL directly (admin credentials when auth is on); returns results[0]."""
        import requests

        params: dict[str, str] = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        if self.auth and auth:
            params.update(u=self.ADMIN_USER, p=self.ADMIN_PASSWORD)
        resp = requests.request(method, self.url + "/query", params=params, timeout=10)
        resp.raise_for_status()
        result = resp.json()["results"][0]
        if "error" in result:
            raise RuntimeError(f"influxd query {q!r}: {result['error']}")
        return result

    def values(self, q: str, db: str) -> list[list[Any]]:
        """All rows of all series of a SELECT."""
        return [v for s in self.query(q, db).get("series", []) for v in s.get("values", [])]


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[InfluxD]:
    """A running influxd (no auth) of the test's own, on free loopback ports; stopped after."""
    (tmp_path / "influxd").mkdir()
    srv = InfluxD(tmp_path / "influxd")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def influxd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxD]:
    """One influxd (no auth) shared by the tests that only need a server (one database each)."""
    srv = InfluxD(tmp_path_factory.mktemp("influxd"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def influxd_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxD]:
    """An influxd with ``auth-enabled = true`` and the admin ``InfluxD.ADMIN_USER``."""
    srv = InfluxD(tmp_path_factory.mktemp("influxd-auth"), auth=True)
    srv.start()
    yield srv
    srv.stop()
