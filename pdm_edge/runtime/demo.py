"""The end-to-end demo (``pdm-edge demo``): embedded broker, replay, the appliance, the store.

:func:`run_demo` starts an in-process MQTT broker (:class:`~pdm_edge.broker.EmbeddedBroker`) and
the appliance itself (the :class:`~pdm_edge.runtime.service.Service` of ``pdm-edge run``, with a SQLite
store, spool, label book and registry in the state directory, and /healthz and /metrics on a
free port), replays a recording (by default the bundled simulator sample: healthy, then a growing
outer-race fault from 30 s) through the broker, calibrates the machine on its first
``calibration_s`` seconds with the shipped encoder and an adapter trained on the spot, scores
every later window, raises and clears alerts (3 of 5 windows), and writes scores and alerts
through the durable spool into the SQLite store. The demo's configuration is written to
``{state_dir}/pdm-edge.toml`` (the dashboard reads it). Every line it prints goes through the
caller's ``out`` (the CLI passes ``click.echo``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdm_edge._util.fs import atomic_write
from pdm_edge._util.repo import REPO, dashboard_importable
from pdm_edge._util.text import fmt_ns, ingest_summary_lines, window_line
from pdm_edge.config import config_from_dict
from pdm_edge.errors import PdmEdgeError
from pdm_edge.types import Window

__all__ = ["DEMO_USERS", "DemoOptions", "demo_sensor_config", "demo_users", "run_demo", "start_dashboard"]


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """What ``pdm-edge demo`` runs.

    Attributes:
        speed: replay speed (1 = real time; ``math.inf`` = as fast as possible).
        recording: the recording to replay (any format of :func:`sample_data.loaders.load_recording`);
            ``None``: the bundled sample.
        calibration_s: seconds of the recording used as the machine's normal baseline.
        state_dir: where the store, spool, label book, registry, users and configuration are
            written (its ``*.sqlite*`` files and ``registry/`` are removed first).
        quiet: print only calibration, alerts and the summary.
        dashboard: also start the Streamlit dashboard, and keep running after the replay until
            Ctrl-C (or the dashboard exits).
        dashboard_port: the dashboard's port (127.0.0.1 only).
    """

    speed: float = 4.0
    recording: str | None = None
    calibration_s: float = 20.0
    state_dir: Path = Path("var/demo")
    quiet: bool = False
    dashboard: bool = False
    dashboard_port: int = 8501


DEMO_USERS = (("tech", "technician"), ("eng", "engineer"))
"""The demo's dashboard accounts: a technician (labels) and an engineer (labels, promote, roll back)."""


def demo_users(path: Path) -> dict[str, str]:
    """Write the demo's users file (``path``, mode 0600) with :data:`DEMO_USERS`, each with a
    fresh random password; returns ``{name: password}``. Local demo accounts: the demo's
    dashboard listens on 127.0.0.1 only."""
    import secrets

    dashboard_importable()
    from dashboard.auth import UserRecord, hash_password, write_users

    passwords = {name: secrets.token_urlsafe(9) for name, _ in DEMO_USERS}
    write_users(path, {name: UserRecord(name, role, hash_password(passwords[name])) for name, role in DEMO_USERS})
    return passwords


def demo_sensor_config(rec: Any) -> dict[str, Any]:
    """The demo sensor's configuration from the recording: kind, rate, unit, 1 s windows with
    0.5 s hop, and, when the recording's metadata give them (the bundled simulator sample: an
    SKF 6205 at 25 Hz), the bearing geometry and shaft speed, so that the dashboard's envelope
    spectrum marks BPFO, BPFI, BSF and FTF."""
    out: dict[str, Any] = {"kind": rec.kind, "sample_rate_hz": rec.sample_rate_hz, "unit": rec.unit,
                           "window_s": 1.0, "hop_s": 0.5}
    meta = rec.metadata or {}
    bearing = meta.get("bearing")
    shaft = meta.get("shaft_hz")
    if rec.kind == "vibration" and isinstance(bearing, dict) and isinstance(shaft, (int, float)) and shaft > 0:
        keys = ("n_elements", "element_diameter_mm", "pitch_diameter_mm", "contact_angle_deg", "name")
        out["shaft_hz"] = float(shaft)
        out["bearing"] = {k: bearing[k] for k in keys if k in bearing}
    return out


def start_dashboard(cfg_path: Path, port: int, out: Callable[[str], None] = print) -> Any:
    """Start ``streamlit run dashboard/app.py`` on ``port`` with ``PDM_EDGE_CONFIG=cfg_path``;
    returns the process, or None (with the reason given to ``out``) when the dashboard is
    unavailable."""
    import importlib.util
    import subprocess

    app = next((p for p in (REPO / "dashboard" / "app.py", Path("dashboard") / "app.py") if p.is_file()), None)
    if app is None:
        out("dashboard unavailable: dashboard/app.py not found (the demo runs without it)")
        return None
    if importlib.util.find_spec("streamlit") is None:
        out("dashboard unavailable: streamlit is not installed in this environment")
        return None
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
                             "--server.address", "127.0.0.1",  # the demo's accounts are local only
                             "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                            cwd=app.parent.parent, env={**os.environ, "PDM_EDGE_CONFIG": str(cfg_path.resolve())})
    out(f"dashboard on http://localhost:{port} (streamlit, pid {proc.pid})")
    return proc



def run_demo(opts: DemoOptions, *, out: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> None:
    """Run the demo (see the module docstring); lines for people go to ``out``, warnings to
    ``warn`` (default: ``out``).

    Raises:
        PdmEdgeError: the ingestion cannot connect to the embedded broker, or any error of the
            service, store or recording (:class:`~pdm_edge.errors.RecordingError`).
    """
    from pdm_edge.broker import EmbeddedBroker
    from pdm_edge.model import load_encoder
    from pdm_edge.config import config_toml
    from pdm_edge.runtime.service import Service, ServiceHooks
    from sample_data.loaders import load_recording, load_sample
    from sensors.publisher import ChunkPublisher, iter_chunks, publish_timed

    warn = warn or out
    recording, calibration_s, quiet, rate = opts.recording, opts.calibration_s, opts.quiet, opts.speed
    rate_text = "max" if math.isinf(rate) else f"{rate:g}"
    rec = load_recording(recording) if recording else load_sample()
    site, machine, sensor = "demo", "pump-01", ("mic" if rec.kind == "acoustic" else "de-accel")
    encoder, sha = load_encoder()
    if logging.getLogger().level >= logging.WARNING:  # the demo prints every alert itself (*** ALERT)
        logging.getLogger("pdm_edge.alerts.publisher").setLevel(logging.ERROR)
    state = Path(opts.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    for f in state.glob("*.sqlite*"):
        f.unlink()
    shutil.rmtree(state / "registry", ignore_errors=True)
    events: list[str] = []
    alerts: list[Any] = []
    t0_ns: list[int] = []

    def on_model_event(stream: str, event: str, detail: str) -> None:
        events.append(f"{stream} {event}: {detail}")
        out(f"--- {stream} {event}: {detail}")

    statuses: dict[str, int] = {}
    arrival: dict[int, str] = {}  # window index -> the stream's state when it was handled
    scored: set[int] = set()
    why = {
        "collecting": f"(collecting): the first {calibration_s:g} s of windows are the machine's normal baseline; they "
                      "calibrate the model and get no score",
        "calibrating": "(calibrating): the adapter is being trained on the baseline (in the background, up to 30 s); "
                       "windows that arrive meanwhile wait in a backlog and are scored as soon as the model is ready",
    }

    def on_window(w: Window, status: str) -> None:
        if not t0_ns:
            t0_ns.append(w.start_ns)
        statuses[status] = statuses.get(status, 0) + 1
        arrival[w.index] = status
        if not quiet:
            if statuses[status] == 1 and status in why:
                out(why[status])
            out(window_line(w) + ("" if status == "scoring" else f"  ({status})"))

    def on_score(win: Window, sc: Any) -> None:
        scored.add(win.index)
        if not quiet:
            out(f"    score {sc.score:7.2f}  threshold {sc.threshold:5.2f}  window {fmt_ns(win.start_ns)}"
                       + ("  ABOVE" if sc.is_anomaly else ""))

    def on_alert(a: Any, win: Window) -> None:
        alerts.append(a)
        at = (a.start_ns - t0_ns[0]) / 1e9
        out(f"*** ALERT {a.state} {a.site}/{a.machine}/{a.sensor}: span from {at:.1f} s into the recording, "
                   f"peak score {a.peak_score:.2f} > threshold {a.threshold:.2f}"
                   + (f"; {a.fault_match.describe()}" if a.fault_match else ""))

    with EmbeddedBroker() as broker:
        absolute = state.resolve()
        cfg = config_from_dict({
            "appliance_id": "pdm-edge-demo",
            "site": site,
            "mqtt": {"broker": broker.address, "protocol": "3.1.1"},
            "store": {"backend": "sqlite", "sqlite_path": str(absolute / "store.sqlite")},
            "spool": {"path": str(absolute / "spool.sqlite")},
            "feedback": {"state_dir": str(absolute)},
            "registry": {"dir": str(absolute / "registry")},
            # one label retrains (a technician's label in the demo's dashboard gives the engineer a version to promote)
            "learning": {"calibration_s": calibration_s, "max_train_seconds": 30.0, "retrain_after_labels": 1},
            # one window per batch: every window's line is printed with its own score
            "service": {"http": "127.0.0.1:0", "torch_threads": max(1, (os.cpu_count() or 2) - 1), "score_batch": 1},
            "alerts": {"k": 3, "n": 5},
            "dashboard": {"users_file": str(absolute / "users.toml")},
            "sensors": {f"{site}/{machine}/{sensor}": demo_sensor_config(rec)},
        }, environ={})
        cfg_path = state / "pdm-edge.toml"
        atomic_write(cfg_path, config_toml(cfg))
        passwords = demo_users(absolute / "users.toml")
        svc = Service(cfg, encoder=encoder, encoder_sha256=sha,
                      hooks=ServiceHooks(on_window=on_window, on_score=on_score, on_alert=on_alert, on_model_event=on_model_event))
        out(f"embedded MQTT broker on {broker.address}; encoder {sha[:12]}...; store {state / 'store.sqlite'}")
        out(f"recording: {rec.name}, {rec.duration_s:.1f} s at {rec.sample_rate_hz:g} Hz in {rec.unit}"
                   + (f" ({rec.metadata.get('description')})" if rec.metadata.get("description") else ""))
        svc.start()
        dash = None
        try:
            if not svc.ingestor.wait_ready(15):
                raise PdmEdgeError("ingestion did not connect to the embedded broker")
            # the dashboard reads the configuration: give it the port the service actually bound
            bound = svc.http_url.removeprefix("http://") if svc.http_url else cfg.service.http
            atomic_write(cfg_path, config_toml(cfg.model_copy(update={"service": cfg.service.model_copy(update={"http": bound})})))
            out(f"appliance health {svc.http_url}/healthz, metrics {svc.http_url}/metrics; configuration {cfg_path}")
            out("dashboard accounts (local demo only, written to " + str(state / "users.toml") + "): "
                       + ", ".join(f"{n} / {passwords[n]} ({role})" for n, role in DEMO_USERS))
            marks = cfg.sensors[f"{site}/{machine}/{sensor}"]
            if marks.bearing is not None and marks.shaft_hz is not None:
                d = marks.bearing.geometry().defect_frequencies(marks.shaft_hz)
                out(f"bearing {marks.bearing.name or 'configured'} at {marks.shaft_hz:g} Hz: BPFO {d.bpfo_hz:.1f} Hz, "
                           f"BPFI {d.bpfi_hz:.1f} Hz, BSF {d.bsf_hz:.1f} Hz, FTF {d.ftf_hz:.1f} Hz (marked on the envelope spectrum)")
            if opts.dashboard:
                dash = start_dashboard(cfg_path, opts.dashboard_port, out)
            pub = ChunkPublisher(cfg.mqtt, site, machine, sensor, sample_rate_hz=rec.sample_rate_hz, unit=rec.unit).start()
            done = threading.Event()

            def _publish() -> None:
                try:
                    # stamped so that the recording ends when its replay ends (never in the future, at any speed)
                    first = rec.segments[0].start_ns
                    last = max(sg.start_ns + round(sg.samples.shape[-1] / rec.sample_rate_hz * 1e9) for sg in rec.segments)
                    replay_ns = 0 if math.isinf(rate) else round((last - first) / rate)
                    offset = time.time_ns() + replay_ns - last
                    publish_timed(pub, iter_chunks(((s.start_ns, s.samples) for s in rec.segments), rec.sample_rate_hz, 0.1),
                                  speed=rate, time_offset_ns=offset)
                    pub.flush(30)
                finally:
                    done.set()

            threading.Thread(target=_publish, name="demo-replay", daemon=True).start()
            out(f"replaying to {pub.topic} at speed {rate_text}; windows of 1 s, hop 0.5 s; "
                       f"calibrating on the first {calibration_s:g} s:\n")
            try:
                while not done.wait(0.2):
                    pass
            finally:
                pub.close(5)
            if not svc.wait_idle(timeout=120):
                warn("warning: the appliance was still busy after 120 s; the summary may be incomplete")
            for line in ingest_summary_lines(svc.ingestor.stats(), published=pub.published):
                out(line)
            n_scores = len(svc.store.query_scores(site, machine, 0, 2**62))
            raised = [a for a in alerts if a.state == "raised"]
            out(f"  calibration            {'; '.join(events) or 'not reached'}")
            out(f"  scores stored          {n_scores} (SQLite store {state / 'store.sqlite'})")
            on_arrival = sum(1 for i in scored if arrival.get(i) == "scoring")
            out(f"  window outcomes        {len(arrival)}: {len(set(arrival) - scored)} calibration baseline (not scored), "
                       f"{len(scored) - on_arrival} waited while the model trained (scored after it), "
                       f"{on_arrival} scored on arrival")
            first = f", first from {(raised[0].start_ns - t0_ns[0]) / 1e9:.1f} s into the recording" if raised and t0_ns else ""
            out(f"  alerts raised          {len(raised)}{first}")
            fault = rec.metadata.get("onset_s")
            if fault is not None:
                out(f"  fault onset (truth)    {float(fault):.1f} s into the recording")
            out(f"  model registry         {state / 'registry'}: pdm-edge --config {cfg_path} models list")
            if dash is not None:
                out(f"\nthe appliance and the dashboard (http://localhost:{opts.dashboard_port}) keep running; Ctrl-C to stop")
                try:
                    while dash.poll() is None:
                        time.sleep(0.5)
                    out(f"the dashboard exited with status {dash.returncode}")
                except KeyboardInterrupt:
                    pass
        finally:
            if dash is not None and dash.poll() is None:
                dash.terminate()
                try:
                    dash.wait(10)
                except Exception:
                    dash.kill()
            svc.stop(timeout=60)
