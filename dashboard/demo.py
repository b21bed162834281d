"""A demo appliance state for the dashboard, from real recordings: ``python -m dashboard.demo DIR``.

Builds, in ``DIR``, what a running appliance would have after a few hours: a configuration
(``config.toml``), a SQLite results store with scores, alerts, labels and model events, a model
registry, a label book and a labelled-window buffer, and a users file. Then::

    PDM_EDGE_CONFIG=DIR/config.toml streamlit run dashboard/app.py

Data: CWRU drive-end recordings (``../shared/datasets/cwru``: the 0 hp normal file resampled
48 -> 12 kHz, and the 12 kHz inner-race, outer-race and ball fault files) when present, else the
project's synthetic sample (``sample_data/sim_outer_race.npz``, 25.6 kHz: healthy first half,
outer-race fault second half). 0.25 s windows are cut from the recordings (50 % overlap) and
scored by a real :class:`pdm_edge.model.scorer.Scorer` (the shipped frozen encoder, calibrated
with a short :class:`TrainConfig` on the first two thirds of the normal windows); alerts come
from :class:`pdm_edge.alerts.AlertTracker` (k of n). The *timeline* is staged: the windows are
placed ``hop_s`` (5 min) apart, ending about a minute before now, as if the appliance scored
one 0.25 s window every five minutes:

- ``plant1/pump-3``: calibration, normal running (a span labelled ``normal`` at commissioning,
  its windows kept as the spectral baseline), then an inner-race fault (outer race for the
  synthetic sample): an **open alert, unlabelled**, its windows held in the buffer;
- ``plant1/fan-1``: an outer-race burst, alert cleared and labelled ``fault`` by a technician;
  after the label a retrained version was **rejected** by the gate and a later one promoted;
- ``plant1/mill-5``: a ball-fault burst (alert cleared, unlabelled); the newest window is above
  threshold (**warning**);
- ``plant1/compressor-2``: normal, but its newest score is 3 h old (**stale**);
- ``plant2/press-4``: configured, never scored (**uncalibrated**).

Users: ``tina`` (technician) and ``erik`` (engineer), passwords as given (defaults below: demo
only).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

NS = 1_000_000_000
WINDOW_S = 0.25
HOP_S = 300.0
SHAFT_HZ_CWRU = 1797 / 60.0
DEMO_PASSWORDS = {"tina": "tina-demo-pass", "erik": "erik-demo-pass"}
STALE_AFTER_S = 900.0


@dataclasses.dataclass
class DemoState:
    """What :func:`build_demo` made."""

    root: Path
    config_path: Path
    source: str
    """``"cwru"`` or ``"sample"``."""
    passwords: dict[str, str]
    open_alert_id: str
    """The unlabelled open alert of plant1/pump-3."""
    timings: dict[str, float]


@dataclasses.dataclass
class _Source:
    name: str
    fs: float
    normal: np.ndarray
    faults: dict[str, np.ndarray]  # "inner", "outer", "ball"
    shaft_hz: float
    bearing: dict[str, Any]


def _windows(x: np.ndarray, n: int, hop: int) -> np.ndarray:
    return np.stack([x[i:i + n] for i in range(0, x.size - n + 1, hop)]).astype(np.float32)


def load_source(datasets: Path | None) -> _Source:
    """CWRU from ``datasets/cwru`` when it is there, else the bundled synthetic sample."""
    from pdm_edge import features
    from pdm_edge.bearing import SKF_6205
    from sample_data.loaders import load_cwru, load_sample

    bearing = {"n_elements": SKF_6205.n_elements, "element_diameter_mm": SKF_6205.element_diameter_mm,
               "pitch_diameter_mm": SKF_6205.pitch_diameter_mm, "contact_angle_deg": SKF_6205.contact_angle_deg,
               "name": SKF_6205.name}
    cwru = datasets / "cwru" if datasets is not None else None
    if cwru is not None and (cwru / "normal_48k" / "normal_0_97.mat").is_file():
        x48 = load_cwru(cwru / "normal_48k" / "normal_0_97.mat").concatenated()
        normal = features.resample(x48[None], 48000.0, 12000.0)[0]
        files = {"inner": "12k_Drive_End_IR007_0_105.mat", "outer": "12k_Drive_End_OR007@6_0_130.mat",
                 "ball": "12k_Drive_End_B007_0_118.mat"}
        faults = {k: load_cwru(cwru / "de_12k" / f).concatenated() for k, f in files.items()}
        return _Source("cwru", 12000.0, np.asarray(normal, np.float32), faults, SHAFT_HZ_CWRU, bearing)
    rec = load_sample()
    x = rec.concatenated()
    fs = rec.sample_rate_hz
    onset = int(float(rec.metadata.get("onset_s", 30.0)) * fs)
    fault = x[int(onset + 10 * fs):]
    b = dict(rec.metadata.get("bearing") or bearing)
    b = {k: b[k] for k in ("n_elements", "element_diameter_mm", "pitch_diameter_mm", "contact_angle_deg", "name") if k in b}
    return _Source("sample", fs, np.asarray(x[:onset], np.float32), {"inner": fault, "outer": fault, "ball": fault},
                   float(rec.metadata.get("shaft_hz", 25.0)), b)


def _toml_config(root: Path, fs: float, shaft_hz: float, bearing: dict[str, Any]) -> str:
    def sensor(key: str, with_bearing: bool) -> str:
        s = (f'[sensors."{key}"]\nkind = "vibration"\nsample_rate_hz = {fs:.1f}\nunit = "g"\n'
             f"window_s = {WINDOW_S}\nhop_s = {HOP_S}\n")
        if with_bearing:
            s += f"shaft_hz = {shaft_hz:.4f}\n[sensors.\"{key}\".bearing]\n"
            for k, v in bearing.items():
                s += f"{k} = {v!r}\n" if not isinstance(v, str) else f'{k} = "{v}"\n'
        return s + "\n"

    return (
        "# pdm-edge demo configuration, written by python -m dashboard.demo\n"
        'site = "plant1"\n\n'
        '[mqtt]\nbroker = "127.0.0.1:1883"\n\n'
        f'[store]\nbackend = "sqlite"\nsqlite_path = "{root / "store.sqlite"}"\n\n'
        f'[spool]\npath = "{root / "spool.sqlite"}"\n\n'
        f'[alerts]\nk = 3\nn = 5\nstale_after_s = {STALE_AFTER_S}\n\n'
        f'[feedback]\nstate_dir = "{root / "state"}"\n\n'
        f'[registry]\ndir = "{root / "registry"}"\n\n'
        '[service]\nhttp = "127.0.0.1:1"\n\n'
        f'[dashboard]\nusers_file = "{root / "users.toml"}"\nrefresh_s = 5.0\n\n'
        + sensor("plant1/pump-3/de", True) + sensor("plant1/fan-1/de", True) + sensor("plant1/mill-5/de", False)
        + sensor("plant1/compressor-2/de", False) + sensor("plant2/press-4/de", False)
    )


def build_demo(root: str | os.PathLike[str], *, datasets: str | os.PathLike[str] | None = None,
               now_ns: int | None = None, passwords: dict[str, str] | None = None, max_epochs: int = 3,
               max_train_s: float = 5.0) -> DemoState:
    """Write the demo state into ``root`` (see the module docstring); returns what was made.

    Args:
        root: an empty or new directory.
        datasets: the shared datasets folder (``None`` or missing CWRU: the synthetic sample).
        now_ns: "now" (ns); the timelines end shortly before it.
        passwords: ``{"tina": ..., "erik": ...}``; :data:`DEMO_PASSWORDS` by default.
        max_epochs, max_train_s: adapter training budget of the one calibration.
    """
    import torch

    t_start = time.monotonic()
    timings: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(root, datasets, now_ns, passwords, max_epochs, max_train_s, t_start, timings)
    finally:
        torch.set_num_threads(threads)


def _build(root: str | os.PathLike[str], datasets: str | os.PathLike[str] | None, now_ns: int | None,
           passwords: dict[str, str] | None, max_epochs: int, max_train_s: float, t_start: float,
           timings: dict[str, float]) -> DemoState:
    from dashboard.auth import UserRecord, hash_password, write_users
    from pdm_edge import condition
    from pdm_edge.alerts import AlertTracker
    from pdm_edge.config import load_config
    from pdm_edge.feedback import LabelBook, LabelledWindowBuffer, submit_label
    from pdm_edge.model import load_encoder
    from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
    from pdm_edge.registry import Registry
    from pdm_edge.store.base import ModelEvent
    from pdm_edge.store.sqlite import SQLiteStore
    from pdm_edge.types import Score, Window

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    now_ns = time.time_ns() if now_ns is None else int(now_ns)
    passwords = dict(passwords or DEMO_PASSWORDS)
    src = load_source(Path(datasets) if datasets is not None else None)
    cfg_path = root / "config.toml"
    cfg_path.write_text(_toml_config(root, src.fs, src.shaft_hz, src.bearing))
    cfg = load_config(cfg_path, environ={})
    write_users(cfg.dashboard.users_file, {
        "tina": UserRecord("tina", "technician", hash_password(passwords["tina"])),
        "erik": UserRecord("erik", "engineer", hash_password(passwords["erik"])),
    })
    timings["load"] = time.monotonic() - t_start

    # -- windows and one calibration ---------------------------------------------------------
    n = round(WINDOW_S * src.fs)
    normal = _windows(src.normal, n, n // 2)
    faults = {k: _windows(v, n, n // 2) for k, v in src.faults.items()}
    n_cal = max(20, (2 * len(normal)) // 3)
    encoder, sha = load_encoder()
    scorer = Scorer(encoder, sha, ScorerConfig(kind="vibration", sample_rate_hz=src.fs, hop_s=HOP_S, min_windows=20,
                                               train=TrainConfig(max_epochs=max_epochs, max_seconds=max_train_s)))
    scorer.learn_many(normal[:n_cal])
    scorer.calibrate()
    threshold = float(scorer.threshold)  # type: ignore[arg-type]
    s_normal = scorer.score_windows(normal)
    s_fault = {k: scorer.score_windows(v) for k, v in faults.items()}
    timings["calibrate_and_score"] = time.monotonic() - t_start - timings["load"]

    store = SQLiteStore(cfg.store.sqlite_path)
    registry = Registry(cfg.registry.dir)
    book = LabelBook.in_dir(cfg.feedback.state_dir)
    buffer = LabelledWindowBuffer.in_dir(cfg.feedback.state_dir)
    tracker = AlertTracker(cfg.alerts.k, cfg.alerts.n, cfg.alerts.stale_after_s)
    hop_ns = round(HOP_S * NS)
    win_ns = round(WINDOW_S * NS)
    held_out = list(range(n_cal, len(normal)))

    def normal_seq(count: int, offset: int = 0) -> list[tuple[np.ndarray, float]]:
        idx = [held_out[(offset + i) % len(held_out)] for i in range(count)]
        return [(normal[i], float(s_normal[i])) for i in idx]

    def fault_seq(kind: str, count: int, offset: int = 0) -> list[tuple[np.ndarray, float]]:
        w, s = faults[kind], s_fault[kind]
        return [(w[(offset + i) % len(w)], float(s[(offset + i) % len(w)])) for i in range(count)]

    def play(site: str, machine: str, sensor: str, end_ns: int, calib: int,
             segments: list[tuple[str, list[tuple[np.ndarray, float]]]], versions: list[tuple[int, str]]
             ) -> tuple[list[Window], list[Any], list[int]]:
        """Write a machine's timeline; ``versions``: (index of the first window it scores, id)."""
        items = [(normal[i % n_cal], None) for i in range(calib)] + [it for _, seq in segments for it in seq]
        t0 = end_ns - (len(items) - 1) * hop_ns
        scores, alerts_out, windows = [], [], []
        for i, (x, sc) in enumerate(items):
            start = t0 + i * hop_ns
            windows.append(Window(site, machine, sensor, "vibration", start, src.fs, "g", x, i))
            if sc is None:
                score = Score(site, machine, sensor, start, float(np.clip(np.random.default_rng(i).normal(0, 0.6), -2, 2)),
                              None, False, None)
            else:
                mv = [v for first, v in versions if i >= first][-1]
                score = Score(site, machine, sensor, start, sc, threshold, sc > threshold, mv)
            scores.append(score)
            alerts_out += tracker.update(score, start + win_ns)
        store.write_scores(scores)
        store.write_conditions(condition.for_windows([w for w, s in zip(windows, scores) if s.threshold is not None]))
        store.write_alerts(alerts_out)
        return windows, alerts_out, [t0 + i * hop_ns for i in range(len(items))]

    def register(machine: str, trigger: str, created_ns: int, parent: str | None = None) -> Any:
        rec = registry.add_candidate(scorer, site="plant1", machine=machine, sensor="de", parent=parent, trigger=trigger,
                                     training_summary={"windows": n_cal, "recording": src.name, "window_s": WINDOW_S})
        # the staged timeline: the version "was created" at created_ns (the registry stamps the wall clock)
        with sqlite3.connect(registry.db_path) as con:
            con.execute("UPDATE versions SET created_ns = ?, changed_ns = ? WHERE id = ?", (created_ns, created_ns, rec.id))
        con.close()
        return registry.get(rec.id)

    cal_metrics = {"candidate_far": 0.0, "active_far": None, "margin": 0.01, "fault_detection": None, "n_normal": len(held_out),
                   "n_fault": 0, "candidate_threshold": threshold, "missed_faults": 0}
    events: list[ModelEvent] = []
    calib = 26

    # pump-3: calibration, normal (a commissioning label "normal"), inner-race fault -> open alert
    end = now_ns - 60 * NS
    segs = [("normal", normal_seq(150)), ("fault", fault_seq("inner", 30))]
    v1 = register("pump-3", "initial_calibration", end - (180 + 1) * hop_ns)
    registry.promote(v1.id, "initial calibration on 26 windows", metrics=cal_metrics)
    wins, alerts, times = play("plant1", "pump-3", "de", end, calib, segs, [(calib, v1.id)])
    events.append(ModelEvent("plant1", "pump-3", times[calib] - NS, "calibrated", v1.id, "threshold %.2f" % threshold))
    lab, _ = submit_label(book, site="plant1", machine="pump-3", sensor="de", start_ns=times[calib + 2],
                          end_ns=times[calib + 26] + win_ns, kind="normal", author="commissioning",
                          note="commissioning run: machine healthy", created_ns=times[calib + 27])
    for w in wins[calib + 2:calib + 27]:
        buffer.add(lab, w)
    open_alert = next(a for a in alerts if a.state == "raised")
    for w in wins:
        if w.start_ns >= open_alert.start_ns:
            buffer.hold(w)

    # fan-1: outer-race burst, cleared, labelled fault by tina; then v2 rejected, v3 promoted
    end = now_ns - 75 * NS
    total = calib + 60 + 6 + 60 + 60
    t0 = end - (total - 1) * hop_ns
    v1f = register("fan-1", "initial_calibration", t0 + (calib - 1) * hop_ns)
    registry.promote(v1f.id, "initial calibration on 26 windows", metrics=cal_metrics)
    label_at = t0 + (calib + 60 + 6 + 6) * hop_ns
    v2f = register("fan-1", "labels", label_at + 40 * 60 * NS, parent=v1f.id)
    gate_fail = dict(cal_metrics, candidate_far=0.0312, active_far=0.0, fault_detection=1.0, n_fault=6)
    registry.reject(v2f.id, "gate failed: false-alarm rate 0.0312 on 13 held-back normal windows exceeds the active "
                    "version's 0.0000 by more than the margin 0.01", metrics=gate_fail)
    v3f = register("fan-1", "labels", label_at + 100 * 60 * NS, parent=v1f.id)
    first_v3 = calib + 60 + 6 + 60 + 1
    registry.promote(v3f.id, "gate passed: false-alarm rate 0.0000 vs active 0.0000 (margin 0.01); all 6 labelled fault "
                     "windows above threshold", metrics=dict(cal_metrics, active_far=0.0, fault_detection=1.0, n_fault=6,
                                                             active_version=v1f.id))
    segs = [("normal", normal_seq(60)), ("fault", fault_seq("outer", 6)), ("normal", normal_seq(60, 5)),
            ("normal", normal_seq(60, 9))]
    wins, alerts, times = play("plant1", "fan-1", "de", end, calib, segs, [(calib, v1f.id), (first_v3, v3f.id)])
    events += [ModelEvent("plant1", "fan-1", times[calib] - NS, "calibrated", v1f.id, "threshold %.2f" % threshold),
               ModelEvent("plant1", "fan-1", label_at + 40 * 60 * NS, "rejected", v2f.id, registry.get(v2f.id).reason or ""),
               ModelEvent("plant1", "fan-1", label_at + 100 * 60 * NS, "promoted", v3f.id, "gate passed")]
    cleared = [a for a in alerts if a.state == "cleared"][0]
    lab, _ = submit_label(book, site="plant1", machine="fan-1", sensor="de", alert_id=cleared.id, start_ns=cleared.start_ns,
                          end_ns=cleared.end_ns, kind="fault", fault_type="bearing_outer_race", author="tina",
                          note="outer race spalling found at inspection, bearing replaced", created_ns=label_at)
    for w in wins:
        if lab.start_ns <= w.start_ns < lab.end_ns:
            buffer.add(lab, w)
    store.write_labels([lab])
    book.mark_exported([lab.id])

    # mill-5: ball-fault burst (cleared, unlabelled), the newest window above threshold
    end = now_ns - 45 * NS
    segs = [("normal", normal_seq(100)), ("fault", fault_seq("ball", 4)), ("normal", normal_seq(60, 3)),
            ("fault", fault_seq("ball", 1, 7))]
    v1m = register("mill-5", "initial_calibration", end - (165 + calib) * hop_ns)
    registry.promote(v1m.id, "initial calibration on 26 windows", metrics=cal_metrics)
    wins, alerts, times = play("plant1", "mill-5", "de", end, calib, segs, [(calib, v1m.id)])
    events.append(ModelEvent("plant1", "mill-5", times[calib] - NS, "calibrated", v1m.id, "threshold %.2f" % threshold))
    for a in alerts:
        if a.state == "cleared":
            for w in wins:
                if a.start_ns <= w.start_ns < (a.end_ns or w.start_ns + 1):
                    buffer.hold(w)

    # compressor-2: stopped sending 3 h ago
    end = now_ns - 3 * 3600 * NS
    v1c = register("compressor-2", "initial_calibration", end - 100 * hop_ns)
    registry.promote(v1c.id, "initial calibration on 26 windows", metrics=cal_metrics)
    _, _, times = play("plant1", "compressor-2", "de", end, calib, [("normal", normal_seq(80))], [(calib, v1c.id)])
    events.append(ModelEvent("plant1", "compressor-2", times[calib] - NS, "calibrated", v1c.id, "threshold %.2f" % threshold))

    store.write_model_events(events)
    for obj in (store, registry, book, buffer):
        obj.close()
    timings["total"] = time.monotonic() - t_start
    return DemoState(root, cfg_path, src.name, passwords, open_alert.id, timings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboard.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="directory to write the demo state into")
    ap.add_argument("--datasets", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"),
                    help="shared datasets folder (CWRU); the synthetic sample is used when it is missing")
    args = ap.parse_args(argv)
    st = build_demo(args.dir, datasets=args.datasets)
    print(f"demo state ({st.source}) in {st.root} in {st.timings['total']:.1f} s")
    print("users: " + ", ".join(f"{u} / {p}" for u, p in st.passwords.items()))
    print(f"run:   PDM_EDGE_CONFIG={st.config_path} streamlit run dashboard/app.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
