"""The edge training loop: triggers, replay buffer, label learning, gate, hot swap, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pdm_edge.feedback import Feedback, LabelBook, LabelledWindowBuffer, RecentWindows
from pdm_edge.learning import LearningLoop, ReplayBuffer, request_training
from pdm_edge.pipeline.scoring import ScoringStage
from pdm_edge.model import load_encoder
from pdm_edge.model.scorer import ScorerConfig, TrainConfig
from pdm_edge.registry import Registry
from pdm_edge.types import Window
from sensors.simulator import FaultSpec, VibrationSimulator

FS = 12000.0
N = 3000  # 0.25 s windows, no overlap
STREAM = "s/m/acc"
HERE = Path(__file__).resolve().parent


def _windows(sim: VibrationSimulator, k: int, t0_s: float = 0.0) -> list[Window]:
    x = sim.generate(N * k).reshape(k, N)
    t0 = int(t0_s * 1e9)
    return [Window("s", "m", "acc", "vibration", t0 + i * 250_000_000, FS, "g", x[i], i) for i in range(k)]


def _cfg(max_epochs: int = 2, max_seconds: float = 60.0):
    return lambda stream, window=None: ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=0.25,
                                                    train=TrainConfig(max_epochs=max_epochs, max_seconds=max_seconds),
                                                    min_windows=10)


class Rig:
    """A registry, label book, labelled-window buffer, learning loop and scoring stage in ``d``."""

    def __init__(self, d: Path, **kw) -> None:
        self.enc, self.sha = load_encoder()
        self.registry = Registry(d / "registry")
        self.book = LabelBook.in_dir(d)
        self.buffer = LabelledWindowBuffer.in_dir(d)
        self.feedback = Feedback(self.book, self.buffer, RecentWindows(3600.0))
        self.events: list[tuple[str, str, str, str]] = []
        kw.setdefault("scorer_config", _cfg())
        kw.setdefault("calibration_s", 10.0)
        self.loop = LearningLoop(self.registry, self.enc, self.sha, d, labels=self.book, label_windows=self.buffer,
                                 on_event=lambda *e: self.events.append(e), **kw)
        self.stage = ScoringStage.following(self.loop)
        self.feedback.subscribe(self.loop.take_label)

    def feed(self, windows: list[Window]) -> list:
        self.feedback.observe_many(windows)
        return self.stage.handle_many(windows)

    def label(self, kind: str, ws: list[Window], **kw) -> None:
        self.feedback.submit(site="s", machine="m", sensor="acc", start_ns=ws[0].start_ns, end_ns=ws[-1].end_ns,
                             kind=kind, author="tech", **kw)

    def close(self) -> None:
        self.stage.close()
        self.loop.close()
        self.feedback.close()
        self.registry.close()


@pytest.fixture
def rig(tmp_path: Path, one_torch_thread):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_replay_buffer_reservoir_and_gate_split(tmp_path: Path):
    rb = ReplayBuffer(tmp_path / "r.sqlite", capacity=20, gate_fraction=0.2)
    f = np.random.default_rng(0).standard_normal((100, 2, 64, 32)).astype(np.float32)
    for i in range(0, 100, 10):
        rb.offer(STREAM, list(range(i, i + 10)), f[i:i + 10])
    assert rb.size(STREAM) == 20 and rb.span(STREAM) == (100, 0, 99)
    t_tr, f_tr = rb.training(STREAM)
    t_g, f_g = rb.gate_set(STREAM)
    assert len(t_tr) == 16 and len(t_g) == 4 and not set(t_tr) & set(t_g)
    assert (np.diff(t_tr) > 0).all() and t_tr.max() >= 20  # time order; later windows replaced some
    assert np.array_equal(f_tr[0], f[t_tr[0]])
    with pytest.raises(ValueError):
        rb.offer(STREAM, [1], np.full((1, 2, 64, 32), np.nan, np.float32))
    rb.close()
    # durable: reopened, the same content
    rb2 = ReplayBuffer(tmp_path / "r.sqlite", capacity=20, gate_fraction=0.2)
    assert np.array_equal(rb2.training(STREAM)[0], t_tr)
    rb2.close()


def test_triggers_initial_labels_manual(rig: Rig, tmp_path: Path):
    sim = VibrationSimulator(sample_rate_hz=FS, seed=5, resonance_hz=2500)
    normal = _windows(sim, 100)
    assert rig.feed(normal[:39]) == []  # 9.75 s: not enough for calibration
    assert rig.stage.state(STREAM) == "collecting" and not rig.loop.jobs()
    rig.feed(normal[39:42])
    jobs = rig.loop.jobs()
    assert [(j.trigger, j.status) for j in jobs] == [("initial", "queued")]
    assert rig.loop.replay.span(STREAM)[0] == 41  # up to the window 10 s after the first; #41 waits
    assert rig.stage.state(STREAM) == "calibrating"
    assert rig.feed(normal[42:60]) == []  # backlogged while calibrating; no second job
    assert len(rig.loop.jobs()) == 1
    done = rig.loop.run_pending()
    assert done[0].status == "done" and done[0].version == "m-acc-v1"
    scored = rig.feed(normal[60:70])
    assert [w.index for w, _ in scored] == list(range(41, 70))  # the backlog first, nothing lost
    assert {s.model_version for _, s in scored} == {"m-acc-v1"}
    assert [e[1] for e in rig.events] == ["queued", "training", "promoted"]
    # labels: ignore labels and other machines do not count; two normal/fault labels do
    rig.label("ignore", normal[60:62])
    rig.feedback.submit(site="s", machine="other", start_ns=0, end_ns=10**9, kind="normal", author="t")
    rig.label("normal", normal[62:64])
    rig.loop.check_labels()
    assert len(rig.loop.jobs()) == 1
    rig.label("normal", normal[62:64])  # the same label again is one label
    rig.loop.check_labels()
    assert len(rig.loop.jobs()) == 1
    rig.loop.retrain_after_labels = 2
    rig.label("normal", normal[64:66])
    rig.loop.check_labels()
    assert [(j.trigger, j.status) for j in rig.loop.jobs()][0] == ("labels", "queued")
    rig.loop.check_labels()
    assert len(rig.loop.jobs()) == 2  # one pending job per stream
    rig.loop.run_pending()
    assert rig.loop.jobs()[0].status == "done"
    rig.loop.check_labels()  # the labels were used: no new job
    assert len(rig.loop.jobs()) == 2
    # manual, from another process's point of view: a row in the job table
    assert request_training(tmp_path, STREAM) is not None
    assert request_training(tmp_path, STREAM) is None  # already queued
    assert rig.loop.jobs()[0].trigger == "manual"


def test_only_adapter_parameters_change(rig: Rig):
    before = {k: v.clone() for k, v in rig.enc.state_dict().items()}
    rig.feed(_windows(VibrationSimulator(sample_rate_hz=FS, seed=5, resonance_hz=2500), 41))
    rig.loop.run_pending()
    v1 = rig.registry.load("m-acc-v1", rig.enc, rig.sha)
    assert all(torch.equal(before[k], v) for k, v in rig.enc.state_dict().items())
    init = rig.loop.template(STREAM).adapter.state_dict()
    assert any(not torch.equal(init[k], v) for k, v in v1.adapter.state_dict().items())


def test_false_alarms_labelled_normal_stop_recurring_and_faults_stay_detected(rig: Rig):
    base = dict(sample_rate_hz=FS, resonance_hz=2500)
    rig.feed(_windows(VibrationSimulator(seed=5, **base), 41))
    rig.loop.run_pending()
    # a benign change (a neighbouring machine starts: more broadband vibration) raises false alarms
    louder = VibrationSimulator(seed=6, noise_g=0.06, **base)
    first = rig.feed(_windows(louder, 40, t0_s=20))
    far_before = np.mean([s.is_anomaly for _, s in first])
    assert far_before > 0.5
    rig.label("normal", [w for w, _ in first])  # the technician: "false alarm"
    fault_sim = VibrationSimulator(seed=7, fault=FaultSpec(kind="outer", severity=0.5), **base)
    fault = rig.feed(_windows(fault_sim, 12, t0_s=40))
    rig.label("fault", [w for w, _ in fault], fault_type="bearing_outer_race")
    rig.feedback.sync()
    rig.loop.enqueue(STREAM, "manual")
    job = rig.loop.run_pending()[0]
    assert job.version == "m-acc-v2" and job.detail.startswith("promoted"), job.detail
    v2 = rig.registry.get("m-acc-v2")
    assert v2.training_summary["labelled_normal_windows"] == 40 and v2.training_summary["fault_windows"] == 12
    # similar windows later (never labelled, another seed): no longer false alarms
    later = rig.feed(_windows(VibrationSimulator(seed=8, noise_g=0.06, **base), 40, t0_s=60))
    assert {s.model_version for _, s in later} == {"m-acc-v2"}
    far_after = np.mean([s.is_anomaly for _, s in later])
    assert far_after < 0.1 < far_before
    # a new occurrence of the confirmed fault is still detected
    again = rig.feed(_windows(VibrationSimulator(seed=9, fault=FaultSpec(kind="outer", severity=0.5), **base), 12, t0_s=80))
    assert np.mean([s.is_anomaly for _, s in again]) > 0.9
    # ... and named: an anomalous window carries the confirmed fault it looks like (for its alert)
    fault_label = next(lb for lb in rig.book.list(machine="m") if lb.kind == "fault")
    named = [s.fault_match for _, s in again if s.is_anomaly]
    assert sum(m is not None and m.label_id == fault_label.id and m.fault_type == "bearing_outer_race"
               and m.start_ns == fault_label.start_ns for m in named) >= 0.9 * len(named), named
    assert all(s.fault_match is None for _, s in fault + later)  # v1 knew no confirmed fault; v2's normals match none


def test_gate_rejects_a_poisoned_candidate(rig: Rig):
    base = dict(sample_rate_hz=FS, resonance_hz=2500)
    rig.feed(_windows(VibrationSimulator(seed=5, **base), 41))
    rig.loop.run_pending()
    fault_ws = [w for w, _ in rig.feed(_windows(VibrationSimulator(seed=7, fault=FaultSpec(kind="outer", severity=0.5), **base), 12, t0_s=20))]
    rig.label("fault", fault_ws[:6], fault_type="bearing_outer_race")
    # poisoning: the same kind of fault, labelled as normal
    rig.label("normal", fault_ws[6:])
    rig.feedback.sync()
    rig.loop.enqueue(STREAM, "manual")
    job = rig.loop.run_pending()[0]
    rec = rig.registry.get(job.version)
    assert rec.status == "rejected" and "labelled fault events would raise no 3-of-5 alert" in (rec.reason or ""), rec.reason
    assert rig.registry.active("s", "m", "acc").id == "m-acc-v1"
    assert rig.events[-1][1] == "rejected"


def test_promote_and_rollback_hot_swap_the_running_scorer(rig: Rig, tmp_path: Path):
    sim = VibrationSimulator(sample_rate_hz=FS, seed=5, resonance_hz=2500)
    rig.feed(_windows(sim, 41))
    rig.loop.run_pending()
    probe = _windows(sim, 4, t0_s=30)
    s1 = [s.score for _, s in rig.feed(probe)]
    rig.loop.enqueue(STREAM, "manual")
    rig.loop.run_pending()  # v2 promoted in this process: swapped in through the registry listener
    out2 = rig.feed(probe)
    assert {s.model_version for _, s in out2} == {"m-acc-v2"}
    assert [s.score for _, s in out2] != s1
    # a rollback by another process (the command line): seen by the stage's refresh
    other = Registry(tmp_path / "registry")
    other.rollback("s", "m", "acc")
    other.close()
    rig.stage.refresh_s = 0.0
    out3 = rig.feed(probe)
    assert {s.model_version for _, s in out3} == {"m-acc-v1"}
    assert [s.score for _, s in out3] == s1  # bit-identical to the first version's scores


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_killed_mid_run_resumes_and_active_version_survives(tmp_path: Path, one_torch_thread):
    """SIGKILL a process while it trains (after its first epoch checkpoint), restart: the
    active version is intact and loads, and the job resumes from its checkpoint."""
    r = Rig(tmp_path)
    sim = VibrationSimulator(sample_rate_hz=FS, seed=5, resonance_hz=2500)
    r.feed(_windows(sim, 41))
    r.loop.run_pending()
    r.feed(_windows(sim, 40, t0_s=12))
    active = r.registry.active("s", "m", "acc")
    r.close()
    request_training(tmp_path, STREAM)
    proc = subprocess.Popen([sys.executable, str(HERE / "learning_app.py"), str(tmp_path), "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "learning").glob("ckpt-*.pt")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    r = Rig(tmp_path, scorer_config=_cfg(max_epochs=3))
    try:
        assert r.registry.active("s", "m", "acc") == active
        r.registry.load(active.id, r.enc, r.sha)  # hash-verified load
        [job] = [j for j in r.loop.jobs() if j.trigger == "manual"]
        assert job.status == "queued" and "interrupted" in job.detail
        done = r.loop.run_pending()[0]
        assert done.status == "done" and done.attempts == 2
        summary = r.registry.get(done.version).training_summary
        assert summary["resumed_from_epoch"] is not None and summary["resumed_from_epoch"] >= 1
        assert not list((tmp_path / "learning").glob("ckpt-*.pt"))
    finally:
        r.close()


def test_stop_mid_training_writes_a_checkpoint_and_requeues(tmp_path: Path, one_torch_thread):
    r = Rig(tmp_path, scorer_config=_cfg(max_epochs=40))
    r.feed(_windows(VibrationSimulator(sample_rate_hz=FS, seed=5, resonance_hz=2500), 41))
    r.loop.start()
    deadline = time.monotonic() + 180
    while not list((tmp_path / "learning").glob("ckpt-*.pt")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r.loop.stop(120)
    [job] = r.loop.jobs()
    assert job.status == "queued" and "stopped at epoch" in job.detail
    assert r.registry.active("s", "m", "acc") is None
    assert [e[1] for e in r.events][-1] == "interrupted"
    r.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_models_train_cli_queues_and_runs(tmp_path: Path):
    from tests.conftest import run_cli

    cfg = tmp_path / "pdm-edge.toml"
    cfg.write_text(f'[mqtt]\nbroker = "127.0.0.1:1883"\n[feedback]\nstate_dir = "{tmp_path}"\n'
                   f'[registry]\ndir = "{tmp_path / "registry"}"\n'
                   '[sensors."s/m/acc"]\nkind = "vibration"\nsample_rate_hz = 12000\nunit = "g"\nwindow_s = 0.25\nhop_s = 0.25\n')
    r = run_cli("--config", str(cfg), "models", "train", "s/m/acc")
    assert r.returncode == 0 and "training job 1 queued" in r.stdout, r.stderr
    r = run_cli("--config", str(cfg), "models", "train", "s/m/acc")
    assert "already queued" in r.stdout
    # --now with no data collected for the stream: the job fails with the reason, exit status 1
    r = run_cli("--config", str(cfg), "models", "train", "s/m/acc", "--now")
    assert r.returncode == 1 and "failed" in r.stdout and "normal windows" in r.stdout, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    r = run_cli("--config", str(cfg), "models", "train", "bad-stream")
    assert r.returncode == 2


def test_resources_read_through_psutil() -> None:
    """The real reader on this machine: a load average (Linux has one); temperature and battery
    are None where the machine has no such sensor, never an error."""
    from pdm_edge.learning.resources import read_resources

    r = read_resources()
    assert r.load_per_cpu is not None and r.load_per_cpu >= 0
    assert r.cpu_temp_c is None or -40 < r.cpu_temp_c < 150
    assert (r.battery_percent is None) == (r.on_battery is None)


def test_resource_limits_start_pause_and_absent_sensors() -> None:
    from pdm_edge.learning.resources import ResourceGuard, ResourceLimits, Resources

    reading = {"r": Resources(0.2, 60.0, None, None)}
    guard = ResourceGuard(ResourceLimits(max_load_start=0.5, max_load_pause=1.0, max_cpu_temp_c=80.0),
                          reader=lambda: reading["r"], min_interval_s=0.0)
    assert guard.why_not_start() is None and guard.why_pause() is None
    reading["r"] = Resources(0.7, 60.0, None, None)  # busy: no new start, but a running job goes on
    assert "load 0.70" in guard.why_not_start() and guard.why_pause() is None
    reading["r"] = Resources(0.2, 82.5, None, None)
    assert guard.why_not_start() == guard.why_pause() == "CPU temperature 82.5 C >= 80 C"
    reading["r"] = Resources(0.2, 60.0, 15.0, True)
    assert "battery 15 %" in guard.why_pause()
    assert guard.why_pause() is not None and ResourceGuard(ResourceLimits(train_on_battery=False),
                                                           reader=lambda: reading["r"]).why_not_start() == "on battery power"
    reading["r"] = Resources(None, None, None, None)  # a machine without the sensors
    assert guard.why_not_start() is None
    strict = ResourceGuard(ResourceLimits(when_sensor_absent="block"), reader=lambda: reading["r"])
    assert "no CPU temperature reading" in strict.why_not_start()


def test_thermal_drill_pauses_with_a_checkpoint_and_resumes_to_the_same_adapter(tmp_path: Path, one_torch_thread):
    """Drill: a CPU temperature over the limit pauses the running job at its next batch (its
    checkpoint written, the job back in the queue); nothing starts while it stays hot; when it
    cools the job resumes from the checkpoint and ends with exactly the adapter and threshold of
    an uninterrupted job on the same data. The temperature reader is the one stand-in (heat
    cannot be produced here): everything else is the real loop, registry and checkpoint files."""
    from pdm_edge.learning.resources import ResourceGuard, ResourceLimits, Resources

    def run(d: Path, reader) -> tuple[Rig, list]:
        r = Rig(d, scorer_config=_cfg(max_epochs=4, max_seconds=600.0),
                resources=ResourceGuard(ResourceLimits(max_cpu_temp_c=80.0), reader=reader, min_interval_s=0.0))
        r.feed(_windows(VibrationSimulator(sample_rate_hz=FS, seed=5, resonance_hz=2500), 61))
        return r, r.loop.run_pending()

    ref, [ref_job] = run(tmp_path / "ref", lambda: Resources(0.1, 50.0, None, None))
    try:
        ref_version = ref.registry.load(ref_job.version, ref.enc, ref.sha)
    finally:
        ref.close()

    reads = {"n": 0, "temp": 50.0}

    def thermometer() -> Resources:
        reads["n"] += 1
        if reads["n"] == 4:  # the start check, then one read per batch: hot during epoch 2 or 3
            reads["temp"] = 91.0
        return Resources(0.1, reads["temp"], None, None)

    r, [paused] = run(tmp_path / "drill", thermometer)
    try:
        assert paused.status == "queued" and paused.detail.startswith("paused (CPU temperature 91.0 C >= 80 C)"), paused.detail
        assert [e[1] for e in r.events][-1] == "paused" and r.loop.runs["paused"] == 1
        [ckpt] = (tmp_path / "drill" / "learning").glob("ckpt-*.pt")
        state = torch.load(ckpt, weights_only=True)["state"]
        assert state["epoch"] >= 1 and {"torch_rng", "numpy_rng"} <= set(state)
        assert r.loop.run_pending() == [] and r.loop.job(paused.id).status == "queued"  # still hot: nothing starts
        reads["temp"] = 55.0
        [done] = r.loop.run_pending()
        assert done.status == "done" and done.attempts == 2
        assert r.registry.get(done.version).training_summary["resumed_from_epoch"] == state["epoch"]
        got = r.registry.load(done.version, r.enc, r.sha)
        for k, v in ref_version.adapter.state_dict().items():
            assert torch.equal(got.adapter.state_dict()[k], v), k
        assert got.threshold == ref_version.threshold
    finally:
        r.close()
