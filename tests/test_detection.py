"""Detection v2: the parts of the detector that make it more than a spectral peer.

- synthetic anomalies for outlier exposure change every copy and leave their input alone
  (vibration: added energy only; acoustic: also losses of sound);
- the acoustic adapter's anomaly logit rises for a quieter machine as for a louder one;
- the clip / sequence statistic of the evaluation is exactly what the k-of-n alert rule sees;
- the trained adapter (outlier exposure + anomaly logit) detects a weak simulated bearing
  fault at its threshold where the frozen encoder misses more of it (the shipped encoder);
- a recurrence of a confirmed fault is named (fault type, label, similarity), also after the
  model version is saved and reloaded;
- the compact FEMTO loader reads the set-A bearings (skipped without the recordings).

Quality on the real recordings is what ``pdm-edge eval`` measures; ``tests/test_eval.py`` runs
its protocol on subsets (slow tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import butter, sosfiltfilt

from pdm_edge.alerts.debounce import KOfN, alert_statistic
from pdm_edge.model import load_encoder
from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
from pdm_edge.model.synthetic import synthetic_anomalies
from sensors.simulator import AcousticSimulator, FaultSpec, VibrationSimulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FS = 12_000.0
N = 3000  # 0.25 s windows


@pytest.mark.parametrize("kind", ["vibration", "acoustic"])
def test_synthetic_anomalies_change_every_copy_and_leave_the_input(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.asinh(torch.randn(64, 2, 64, 32, generator=g).clamp_min(0 if kind == "vibration" else -9))
    before = x.clone()
    y = synthetic_anomalies(x, kind, torch.Generator().manual_seed(1))
    assert torch.equal(x, before), "the normal windows were modified"
    assert y.shape == x.shape and y.dtype == torch.float32
    change = (y - x).flatten(1)
    assert (change.abs().max(dim=1).values > 0.5).all(), "some copies got no anomaly"
    removed = (change < -0.5).any(dim=1)
    added = (change > 0.5).any(dim=1)
    assert not (removed & added).any(), "one copy got energy both added and removed"
    if kind == "vibration":  # one-sided images: a vibration defect only adds energy
        assert (change >= -1e-5).all(), "a vibration anomaly removed deviation"
    else:  # two-sided images: a loss of sound is a defect too (attenuation), about a third of them
        assert 0.15 < float(removed.float().mean()) < 0.55, f"share of attenuations {float(removed.float().mean()):.2f}"
    again = synthetic_anomalies(x, kind, torch.Generator().manual_seed(1))
    assert torch.equal(y, again), "not reproducible from the generator"


def test_acoustic_logit_scores_a_loss_of_sound_like_an_added_one() -> None:
    """With added-energy defects only, the logit learnt that a quieter window is more normal than
    the machine's own (on this case its median score for 3 dB less was -2.2, below every normal
    window's); with the attenuation defect a loss of sound scores high as well."""
    fs = 16000.0
    x = AcousticSimulator(sample_rate_hz=fs, seed=3).generate(int(30 * fs)).astype(np.float32)
    cal, later = x[: int(20 * fs)], x[int(20 * fs):]
    band = sosfiltfilt(butter(4, (1000.0, 3000.0), btype="bandpass", fs=fs, output="sos"), later)

    def windows(v: np.ndarray) -> np.ndarray:
        return np.stack([v[s:s + 16000] for s in range(0, len(v) - 16000 + 1, 8000)]).astype(np.float32)

    enc, sha = load_encoder()
    s = Scorer(enc, sha, ScorerConfig(kind="acoustic", sample_rate_hz=fs, hop_s=0.5, min_windows=10, components=("logit",),
                                      train=TrainConfig(max_epochs=12)))
    s.learn_many(windows(cal)).calibrate()
    normal = s.score_windows(windows(later))
    quieter = s.score_windows(windows(later - (1 - 10 ** (-3 / 20)) * band))  # 3 dB less in 1-3 kHz
    louder = s.score_windows(windows(later + (10 ** (3 / 20) - 1) * band))
    assert np.median(quieter) > normal.max(), (np.median(quieter), normal.max())
    assert np.median(louder) > normal.max(), (np.median(louder), normal.max())


def test_alert_statistic_is_what_the_k_of_n_rule_sees() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        s = rng.normal(size=rng.integers(1, 30))
        stat = alert_statistic(s, 3, 5)
        for h in np.r_[s, stat - 1e-9, stat + 1e-9]:
            deb = KOfN(3, 5)
            raised = any((ev := deb.update(float(v), float(h), i, i + 1)) is not None and ev.state == "raised" for i, v in enumerate(s))
            if len(s) >= 3:
                assert raised == (stat > h), (s, h, stat)


@pytest.fixture(scope="module")
def bearing() -> dict[str, np.ndarray]:
    sim = VibrationSimulator(sample_rate_hz=FS, seed=11)
    weak = VibrationSimulator(sample_rate_hz=FS, seed=11, fault=FaultSpec(kind="outer", severity=0.05))
    strong = VibrationSimulator(sample_rate_hz=FS, seed=11, fault=FaultSpec(kind="outer", severity=0.5))
    return {"cal": np.stack([sim.generate(N) for _ in range(80)]), "held": np.stack([sim.generate(N) for _ in range(100)]),
            "weak": np.stack([weak.generate(N) for _ in range(60)]), "strong": np.stack([strong.generate(N) for _ in range(20)])}


def _scorer(train_adapter: bool, cal: np.ndarray) -> Scorer:
    enc, sha = load_encoder()
    cfg = ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=0.25, train_adapter=train_adapter,
                       train=TrainConfig(max_epochs=10, max_seconds=60))
    s = Scorer(enc, sha, cfg).learn_many(cal)
    s.calibrate()
    return s


def test_trained_adapter_detects_a_weak_bearing_fault_the_frozen_encoder_misses(bearing: dict[str, np.ndarray]) -> None:
    trained, frozen = _scorer(True, bearing["cal"]), _scorer(False, bearing["cal"])
    assert trained.config.components == ("mahalanobis", "spectral", "logit")
    assert frozen.config.components == ("mahalanobis", "spectral")
    det = {}
    for name, s in (("trained", trained), ("frozen", frozen)):
        assert np.mean(s.score_windows(bearing["held"]) > s.threshold) <= 0.02, f"{name}: false alarms on held-back normal windows"
        det[name] = float(np.mean(s.score_windows(bearing["weak"]) > s.threshold))
    assert det["trained"] >= det["frozen"] + 0.1, det


def test_a_recurrence_of_a_confirmed_fault_is_named(bearing: dict[str, np.ndarray]) -> None:
    enc, sha = load_encoder()
    s = Scorer(enc, sha, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=0.25, train=TrainConfig(max_epochs=2)))
    s.learn_many(bearing["cal"])
    event = {"label": "lbl-0007", "fault_type": "bearing_outer_race", "start_ns": 1_762_000_000 * 10**9}
    s.learn_many(bearing["strong"][:10], "fault", events=[event] * 10)
    with pytest.raises(ValueError, match="every fault window"):
        s.learn_many(bearing["strong"][:2], "fault", events=[event])
    s.calibrate()
    named = s.nearest_fault(np.r_[bearing["held"][:5], bearing["strong"][10:]])
    assert named[:5] == [None] * 5, "normal windows were named as a fault"
    for n in named[5:]:
        assert n is not None and n.fault_type == "bearing_outer_race" and n.label_id == "lbl-0007"
        assert n.start_ns == event["start_ns"] and 0.5 < n.similarity <= 1.0
    reloaded = Scorer.from_state(enc, sha, s.state())
    assert reloaded.nearest_fault(bearing["strong"][10:12]) == s.nearest_fault(bearing["strong"][10:12])
    # the scoring path names them from the same encoder pass: windows above the threshold only
    f = s.features(np.r_[bearing["held"][:5], bearing["strong"][10:]])
    scores, names = s.score_and_name_features(f)
    assert np.array_equal(scores, s.score_features(f))
    assert names == [m if sc > s.threshold else None for sc, m in zip(scores, s.nearest_fault_features(f))]
    assert any(n is not None for n in names)


def test_several_machines_scored_in_one_batch_equal_one_at_a_time(bearing: dict[str, np.ndarray]) -> None:
    """``score_and_name_many``: the windows of three machines (two trained adapters, one that
    knows a confirmed fault) go through the shared encoder in one batched pass, each through its
    own adapter, and come out with the scores and fault names of scoring each machine alone."""
    from pdm_edge.model.adapter import StackedAdapters
    from pdm_edge.model.scorer import score_and_name_many

    enc, sha = load_encoder()
    cfg = ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=0.25, train=TrainConfig(max_epochs=2))
    a = Scorer(enc, sha, cfg).learn_many(bearing["cal"][:40])
    b = Scorer(enc, sha, cfg).learn_many(bearing["cal"][40:])
    c = Scorer(enc, sha, cfg).learn_many(bearing["cal"])
    c.learn_many(bearing["strong"][:10], "fault", events=[{"label": "lbl-1", "fault_type": "bearing_outer_race", "start_ns": 1}] * 10)
    for s in (a, b, c):
        s.calibrate()
    assert not torch.equal(a.adapter.lora_b["0_qkv"], b.adapter.lora_b["0_qkv"])  # different machines' adapters
    jobs = [(a, a.features(bearing["held"][:7])), (b, b.features(bearing["weak"][:5])), (a, a.features(bearing["held"][:0])),
            (c, c.features(np.r_[bearing["held"][7:10], bearing["strong"][10:14]]))]
    together = score_and_name_many(jobs, batch=8)  # chunks of 8 cut across the machines
    for (s, f), (scores, names) in zip(jobs, together):
        alone, alone_names = s.score_and_name_features(f)
        np.testing.assert_allclose(scores, alone, rtol=1e-4, atol=1e-4)
        assert names == alone_names
    assert any(n is not None for n in together[3][1])
    with pytest.raises(ValueError, match="out of range"):
        StackedAdapters([a.adapter], torch.tensor([0, 1]))


def test_femto_compact_loader_reads_set_a(datasets_dir) -> None:
    from sample_data.loaders import load_femto_compact, load_recording

    path = datasets_dir / "femto_pronostia" / "compact" / "Bearing2_1.npz"
    rec = load_femto_compact(path)
    assert rec.sample_rate_hz == 25600.0 and rec.unit == "g" and len(rec.segments) == 911
    assert all(s.samples.shape == (2560,) and s.samples.dtype == np.float32 for s in rec.segments[:5])
    assert rec.segments[-1].start_ns == 9_100 * 10**9 and rec.metadata["shaft_hz"] == 27.5
    assert load_recording(path).metadata["format"] == "femto_compact"
    vertical = load_femto_compact(path, channel="vertical")
    assert not np.array_equal(vertical.segments[0].samples, rec.segments[0].samples)
