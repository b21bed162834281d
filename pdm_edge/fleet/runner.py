"""Running the fleet: the Flower SuperLink + scheduled runs (server side) and the SuperNode
(appliance side), as Flower's own processes.

- Server (``pdm-edge fleet server``): :class:`FleetServer` starts ``flower-superlink`` (its
  fleet and control APIs on one HTTP port, state in memory), then every ``every_s`` seconds
  submits the fleet app (:data:`APP_DIR`, :mod:`pdm_edge.fleet.server_app`) with ``flwr run``
  against it. Flower's files go to ``{out_dir}/flwr`` (``FLWR_HOME``), never to ``~/.flwr``.
  TLS: ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` are passed to the SuperLink;
  ``insecure`` (loopback tests) turns TLS off. SuperNode authentication (needs TLS): Flower's
  ``--enable-supernode-auth``; only appliances whose public key the operator registered
  (:meth:`FleetServer.register_node`, which runs ``flwr supernode register``) may connect. An
  appliance's key pair is an EC P-384 key in OpenSSH format (:func:`generate_node_key`), named
  by ``[fleet] auth_private_key`` (the public key beside it, ``.pub``).
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
    if fc.auth_private_key:  # Flower derives the public key from it
        cmd += ["--auth-supernode-private-key", fc.auth_private_key]
    return cmd


def generate_node_key(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write an appliance's SuperNode authentication key pair: an EC P-384 private key in
    OpenSSH format at ``path`` (mode 0600) and its public key at ``path + ".pub"`` (the file
    the operator registers, :meth:`FleetServer.register_node`); returns both paths.

    Raises:
        FleetError: either file exists already (keys are never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv_path = Path(path)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise FleetError(f"key file {p} already exists; not overwriting it")
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    pub_path.write_bytes(pub + b"\n")
    return priv_path, pub_path


class FleetServer:
    """A Flower SuperLink and the submission of fleet runs to it (see the module docstring).

    Args:
        out_dir: the server's directory: priors, ``rounds.jsonl``, ``flwr/`` (Flower's home),
            ``superlink.log``.
        address: ``HOST:PORT`` the SuperLink listens on (fleet and control APIs).
        insecure: no TLS (loopback only); otherwise ``ssl`` must name the certificate files.
        ssl: ``(certfile, keyfile, ca_certfile)``.
        supernode_auth: only registered appliances may connect (:meth:`register_node`); needs TLS.

    Raises:
        FleetError: neither TLS nor ``insecure``, or ``supernode_auth`` without TLS.
    """

    def __init__(self, out_dir: str | os.PathLike[str], address: str = "127.0.0.1:8000", *, insecure: bool = False,
                 ssl: tuple[str, str, str] | None = None, supernode_auth: bool = False) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.host, self.port = parse_host_port(address, 8000)
        self.insecure, self.ssl, self.supernode_auth = insecure, ssl, supernode_auth
        if not insecure and ssl is None:
            raise FleetError("the fleet server needs --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile, or --insecure (loopback only)")
        if supernode_auth and insecure:
            raise FleetError("SuperNode authentication needs TLS (Flower refuses it on an insecure SuperLink)")
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
        if self.supernode_auth:
            cmd.append("--enable-supernode-auth")
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
               signing_key: str | None = None, proximal_mu: float = 0.0, dp_noise: float = 0.0, dp_clip: float = 1.0, dp_delta: float = 1e-3,
               wait_nodes_s: float = 60.0, timeout_s: float | None = None, secagg: bool = False,
               secagg_threshold: float = 0.67) -> list[dict[str, Any]]:
        """Run the fleet app once (``flwr run ... --stream``, blocking) and return the rounds it
        appended to ``rounds.jsonl``. ``secagg``: Flower's SecAgg+ (:mod:`pdm_edge.fleet.secagg`).

        Raises:
            FleetError: ``flwr run`` failed (its output is in the message); ``secagg`` with
                ``dp_noise`` > 0 or fewer than 3 ``min_clients``.
        """
        if secagg and dp_noise > 0:
            raise FleetError("secure aggregation (--secagg) and differential privacy (--dp-noise) are not offered together")
        if secagg and min_clients < 3:
            raise FleetError("secure aggregation needs --min-clients 3 or more (with two, each learns the other's update)")
        rounds_path = self.out_dir / "rounds.jsonl"
        before = len(rounds_path.read_text().splitlines()) if rounds_path.exists() else 0
        rc = {"num-rounds": num_rounds, "min-clients": min_clients, "round-timeout": float(round_timeout_s),
              "machine-class": machine_class, "out-dir": str(self.out_dir),
              "signing-key": str(Path(signing_key).resolve()) if signing_key else "",
              "proximal-mu": float(proximal_mu), "dp-noise": float(dp_noise), "dp-clip": float(dp_clip), "dp-delta": float(dp_delta), "wait-nodes": float(wait_nodes_s),
              "secagg": bool(secagg), "secagg-threshold": float(secagg_threshold)}
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

    def register_node(self, public_key: str | os.PathLike[str], name: str | None = None) -> None:
        """Allow the appliance with this public key (OpenSSH EC key, :func:`generate_node_key`)
        to connect (``flwr supernode register``, with SuperNode authentication on).

        Raises:
            FleetError: the registration failed (Flower's message is included).
        """
        cmd = [_bin("flwr"), "supernode", "register", str(Path(public_key).resolve()), "fleet"]
        if name:
            cmd += ["--name", name]
        res = subprocess.run(cmd, capture_output=True, text=True, env=flower_env(self.home), timeout=120)
        if res.returncode != 0:
            raise FleetError(f"flwr supernode register failed: {(res.stdout + res.stderr)[-1000:]}")

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
