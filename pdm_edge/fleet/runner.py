"""Running the fleet: the Flower SuperLink + scheduled runs (server side) and the SuperNode
(appliance side), as Flower's own processes.

- Server (``pdm-edge fleet server``): :class:`FleetServer` starts ``flower-superlink`` (its
  fleet and control APIs on one HTTP port, state in memory), then every ``every_s`` seconds
  submits the fleet app (:data:`APP_DIR`, :mod:`pdm_edge.fleet.server_app`) with ``flwr run``
  against it. Flower's files go to ``{out_dir}/flwr`` (``FLWR_HOME``), never to ``~/.flwr``.
  TLS: ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` are passed to the SuperLink;
  ``insecure`` (loopback tests) turns TLS off. SuperNode authentication: Flower's
  ``--enable-supernode-auth`` (the operator registers each appliance's public key with
  ``flwr supernode register``).
- Appliance (``pdm-edge fleet join``): :func:`supernode_command` is the ``flower-supernode``
  command line of an appliance's ``[fleet]`` section: ``--superlink`` address, TLS root
  certificates or ``--insecure``, authentication key pair, and the node configuration
  ``config='<the appliance's TOML>'`` through which the client app finds the appliance's state.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pdm_edge.config import parse_host_port
from pdm_edge.errors import FleetError

APP_DIR = Path(__file__).resolve().parent / "flwr_app"
"""The Flower App project (``pyproject.toml``) that ``flwr run`` packages and submits."""


def _bin(name: str) -> str:
    """A console script of this Python environment (``flower-superlink``, ``flwr``, ...)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of Flower processes: ``FLWR_HOME`` and this package importable."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # Flower starts its helpers by name
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def wait_port(host: str, port: int, timeout: float = 30.0) -> bool:
    """Whether something accepts TCP connections on ``host:port`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def stop_group(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """End a process started with ``start_new_session=True`` and everything in its process
    group (Flower's SuperLink and SuperNode start helper processes): SIGTERM, then SIGKILL."""
    import signal

    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        proc.wait()
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            # helpers may outlive the leader for a moment
            time.sleep(0.5)
            os.killpg(pgid, 0)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    proc.wait()


def supernode_command(cfg: Any, config_path: str, *, port: int = 9094) -> list[str]:
    """The ``flower-supernode`` command of an appliance (see the module docstring).

    Raises:
        FleetError: ``[fleet] enabled`` is false (opt-in), or neither ``insecure`` nor
            ``root_certificates`` is set.
    """
    fc = cfg.fleet
    if not fc.enabled:
        raise FleetError("[fleet] enabled is false: this appliance has not opted in to fleet learning")
    cmd = [_bin("flower-supernode"), "--superlink", fc.server, "--port", str(port),
           "--node-config", f"config={json.dumps(str(Path(config_path).resolve()))}"]
    if fc.insecure:
        cmd.append("--insecure")
    elif fc.root_certificates:
        cmd += ["--root-certificates", fc.root_certificates]
    else:
        raise FleetError("[fleet] needs root_certificates (TLS to the SuperLink) or insecure = true (loopback only)")
    if fc.auth_private_key:
        cmd += ["--auth-supernode-private-key", fc.auth_private_key, "--auth-supernode-public-key", fc.auth_private_key + ".pub"]
    return cmd


class FleetServer:
    """A Flower SuperLink and the submission of fleet runs to it (see the module docstring).

    Args:
        out_dir: the server's directory: priors, ``rounds.jsonl``, ``flwr/`` (Flower's home),
            ``superlink.log``.
        address: ``HOST:PORT`` the SuperLink listens on (fleet and control APIs).
        insecure: no TLS (loopback only); otherwise ``ssl`` must name the certificate files.
        ssl: ``(certfile, keyfile, ca_certfile)``.
    """

    def __init__(self, out_dir: str | os.PathLike[str], address: str = "127.0.0.1:8000", *, insecure: bool = False,
                 ssl: tuple[str, str, str] | None = None) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.host, self.port = parse_host_port(address, 8000)
        self.insecure, self.ssl = insecure, ssl
        if not insecure and ssl is None:
            raise FleetError("the fleet server needs --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile, or --insecure (loopback only)")
        self.home = self.out_dir / "flwr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FleetServer:
        """Start the SuperLink and wait until it accepts connections.

        Raises:
            FleetError: it exited or did not listen within 60 s (its log is named).
        """
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.insecure:
            cmd.append("--insecure")
        else:
            assert self.ssl is not None
            cmd += ["--ssl-certfile", self.ssl[0], "--ssl-keyfile", self.ssl[1], "--ssl-ca-certfile", self.ssl[2]]
        root = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        conn = {"address": f"{root}:{self.port}", **({"insecure": True} if self.insecure else {"root-certificates": self.ssl[2]})}  # type: ignore[index]
        lines = ["[superlink]", 'default = "fleet"', "", "[superlink.fleet]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in conn.items()]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")
        log = open(self.out_dir / "superlink.log", "ab")
        # its own process group: the SuperLink starts helpers (SuperExec, ServerApp) that stop() ends with it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=flower_env(self.home), start_new_session=True)
        log.close()
        if not wait_port(root, self.port, 60.0) or self.proc.poll() is not None:
            self.stop()
            raise FleetError(f"flower-superlink did not start; see {self.out_dir / 'superlink.log'}")
        return self

    def submit(self, *, num_rounds: int = 3, min_clients: int = 2, round_timeout_s: float = 600.0, machine_class: str = "",
               signing_key: str | None = None, dp_noise: float = 0.0, dp_clip: float = 1.0, dp_delta: float = 1e-3,
               wait_nodes_s: float = 60.0, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Run the fleet app once (``flwr run ... --stream``, blocking) and return the rounds it
        appended to ``rounds.jsonl``.

        Raises:
            FleetError: ``flwr run`` failed (its output is in the message).
        """
        rounds_path = self.out_dir / "rounds.jsonl"
        before = len(rounds_path.read_text().splitlines()) if rounds_path.exists() else 0
        rc = {"num-rounds": num_rounds, "min-clients": min_clients, "round-timeout": float(round_timeout_s),
              "machine-class": machine_class, "out-dir": str(self.out_dir),
              "signing-key": str(Path(signing_key).resolve()) if signing_key else "",
              "dp-noise": float(dp_noise), "dp-clip": float(dp_clip), "dp-delta": float(dp_delta), "wait-nodes": float(wait_nodes_s)}
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in rc.items())
        cmd = [_bin("flwr"), "run", str(APP_DIR), "fleet", "--run-config", overrides, "--stream"]
        log_path = self.out_dir / "last-run.log"  # the ServerApp's log, streamed as the run goes
        try:
            with open(log_path, "w") as fh:
                res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=flower_env(self.home), timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise FleetError(f"flwr run did not finish within {timeout_s} s; see {log_path}") from exc
        output = log_path.read_text()
        if res.returncode != 0 or "Traceback" in output:
            raise FleetError(f"flwr run failed ({shlex.join(cmd)}): {output[-2000:]}")
        lines = rounds_path.read_text().splitlines() if rounds_path.exists() else []
        return [json.loads(x) for x in lines[before:]]

    def stop(self) -> None:
        """Stop the SuperLink and the helpers it started (SIGTERM to its process group, then
        SIGKILL after 10 s)."""
        if self.proc is not None:
            stop_group(self.proc)
        self.proc = None

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_rounds(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rounds a fleet server (or an appliance, ``{state_dir}/fleet``) logged, oldest first."""
    p = Path(out_dir) / "rounds.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
