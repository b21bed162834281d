"""Processes the benchmarks and the tests start: a real Mosquitto, a real influxd, ``pdm-edge run``.

One implementation for both: ``tests/conftest.py`` wraps these classes in fixtures and
``pdm-edge bench`` (``benchmarks/``) uses them directly, so the benchmarks run after the plain
install (no test extras). Mosquitto and influxd come from the Debian packages ``mosquitto`` and
``influxdb`` (``deploy/scripts/test.sh`` installs them); each process gets a private
configuration in its own directory, loopback addresses and free ports.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pdm_edge._util.repo import REPO
from pdm_edge.broker import free_port
from pdm_edge.errors import BrokerError, PdmEdgeError, StoreError

__all__ = ["InfluxD", "Mosquitto", "ServiceProcess", "find_influxd", "find_mosquitto", "free_port", "unit_malloc_env"]

SERVICE_UNIT = REPO / "deploy" / "systemd" / "pdm-edge.service"

INFLUXD_CANDIDATES = ("/usr/bin/influxd", "/usr/local/bin/influxd")
MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """The mosquitto executable (``PATH``, then the Debian locations), or None."""
    return shutil.which("mosquitto") or next((p for p in MOSQUITTO_CANDIDATES if os.path.exists(p)), None)


def find_influxd() -> str | None:
    """The influxd executable (``PATH``, then the Debian locations), or None."""
    return shutil.which("influxd") or next((p for p in INFLUXD_CANDIDATES if os.path.exists(p)), None)


class Mosquitto:
    """A mosquitto process with its own configuration in ``workdir``: loopback only, a free port,
    anonymous, persistence on (a restart keeps persistent sessions and their queued QoS 1
    messages, as ``deploy/mosquitto.conf`` does on an appliance). ``stop()``/``start()``
    simulate a broker restart.

    Raises:
        BrokerError: mosquitto is not installed; from :meth:`start`, it exited or did not listen.
    """

    def __init__(self, workdir: Path) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError("mosquitto is not installed (Debian package 'mosquitto'; deploy/scripts/test.sh installs it)")
        self.exe = exe
        self.port = free_port()
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
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise BrokerError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None



class InfluxD:
    """An influxd 1.x process (Debian's ``influxdb``) with a temporary configuration in
    ``workdir``: meta, data and WAL there, HTTP and RPC on free loopback ports, no usage
    reporting, no ``_internal`` monitor database. ``auth=True`` turns on ``[http]
    auth-enabled`` and creates the admin :attr:`ADMIN_USER` through /query (the first user may
    be created without credentials). ``stop()``/``start()`` simulate an outage.

    Raises:
        StoreError: influxd is not installed; from :meth:`start`, it exited or did not answer
            /ping; from :meth:`query`, an InfluxQL error.
    """

    ADMIN_USER = "pdm_admin"
    ADMIN_PASSWORD = "s3cret pass'word"

    def __init__(self, workdir: Path, auth: bool = False) -> None:
        exe = find_influxd()
        if exe is None:
            raise StoreError("influxd is not installed (Debian package 'influxdb'; deploy/scripts/test.sh installs it)")
        self.exe = exe
        self.auth = auth
        self.workdir = workdir
        self.port = free_port()
        self.rpc_port = free_port()
        while self.rpc_port == self.port:
            self.rpc_port = free_port()
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
                raise StoreError(f"influxd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/ping", timeout=0.5).status_code == 204:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.05)
        else:
            raise StoreError(f"influxd did not answer /ping on {self.port} within {timeout} s")
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
            raise StoreError(f"influxd query {q!r}: {result['error']}")
        return result

    def values(self, q: str, db: str) -> list[list[Any]]:
        """All rows of all series of a SELECT."""
        return [v for s in self.query(q, db).get("series", []) for v in s.get("values", [])]



def unit_malloc_env(unit: Path = SERVICE_UNIT) -> dict[str, str]:
    """The glibc malloc settings (``Environment=MALLOC_...=...`` lines) of the appliance's systemd
    unit, ``{}`` when the unit file is absent."""
    try:
        text = unit.read_text()
    except OSError:
        return {}
    return dict(m.groups() for m in re.finditer(r"^Environment=(MALLOC_\w+)=(\S+)\s*$", text, re.M))


class ServiceProcess:
    """``pdm-edge run`` (``python -m pdm_edge.cli --config {workdir}/pdm-edge.toml run``) in a
    subprocess, its log in ``{workdir}/service.log``, with helpers to read /healthz, /metrics,
    the log and its resident memory. The configuration must serve HTTP (``[service] http``,
    port 0 is read back from the ``http_listening`` log event). ``env`` is added to the
    environment (:func:`unit_malloc_env` gives the systemd unit's malloc settings).

    Raises:
        PdmEdgeError: from :meth:`start`, the service exited or did not serve HTTP in time.
    """

    def __init__(self, workdir: Path, config_text: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config = workdir / "pdm-edge.toml"
        self.config.write_text(config_text)
        self.log = workdir / "service.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    def start(self, timeout: float = 90.0) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update(self.env)
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "pdm_edge.cli", "--config", str(self.config), "run"],
                                         stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"event=http_listening address=(\S+)", self.log_text())
            if m:
                self.url = f"http://{m.group(1)}"
                return self
            if self.proc.poll() is not None:
                raise PdmEdgeError(f"pdm-edge run exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)
        raise PdmEdgeError(f"pdm-edge run did not serve HTTP within {timeout} s:\n{self.log_text()[-3000:]}")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise PdmEdgeError("the service has not been started")
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def get(self, path: str) -> tuple[int, bytes]:
        import requests

        r = requests.get(f"{self.url}{path}", timeout=10)
        return r.status_code, r.content

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/healthz")[1])

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of /metrics as ``(name, labels, value)``."""
        from prometheus_client.parser import text_string_to_metric_families

        code, body = self.get("/metrics")
        if code != 200:
            raise PdmEdgeError(f"GET /metrics answered {code}")
        return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(v for n, lab, v in self.metrics() if n == name and all(lab.get(k) == x for k, x in labels.items()))

    def rss_kib(self) -> int:
        """VmRSS of the process from /proc/PID/status, KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise PdmEdgeError(f"no VmRSS in /proc/{self.pid}/status")

    def terminate(self, timeout: float = 90.0) -> int:
        """SIGTERM, wait; returns the exit status."""
        if self.proc is None:
            raise PdmEdgeError("the service has not been started")
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
