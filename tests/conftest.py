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


def run_cli(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pdm-edge ARGS`` in a subprocess (the installed entry point's module)."""
    return subprocess.run(
        [sys.executable, "-m", "pdm_edge.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
    )
