"""Tests of pdm_edge.model: frozen encoder, adapter, scorer contract, threshold, model versions.

None of these tests needs ``models/encoder.pt``: they use a randomly initialised encoder
(``torch.manual_seed(0)``) with a made-up sha256, small calibration sets from the vibration
simulator at 12 kHz (0.25 s windows) and 3 adapter epochs, so the file runs in seconds on a
2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special, stats
from sklearn.metrics import roc_auc_score

from pdm_edge.errors import ModelError, NotCalibratedError
from pdm_edge.features import INPUT_SHAPE
from pdm_edge.model import load_encoder
from pdm_edge.model import version as version_mod
from pdm_edge.model.adapter import Adapter, AdapterConfig, trainable_fraction
from pdm_edge.model.encoder import Encoder, EncoderConfig
from pdm_edge.model.postprocess import exceedance_probability
from pdm_edge.model.scorer import MAX_FAULT_PROTOTYPES, Scorer, ScorerConfig, TrainConfig
from pdm_edge.model.version import load_version, save_version
from pdm_edge.types import Window
from sensors.simulator import FaultSpec, VibrationSimulator

FS = 12_000.0
WIN_S = 0.25
N_SAMPLES = int(FS * WIN_S)
SEED = 11  # the simulated machine: same seed = same machine parameters and noise streams
N_CALIB = 60
N_HELD = 400
N_FAULT = 30
ENCODER_SHA = hashlib.sha256(b"pdm-edge tests: randomly initialised encoder, seed 0").hexdigest()
OTHER_SHA = hashlib.sha256(b"another encoder").hexdigest()

COMPONENT_SETTINGS = [
    pytest.param(("mahalanobis",), False, id="mahalanobis-frozen"),
    pytest.param(("mahalanobis",), True, id="mahalanobis-adapter"),
    pytest.param(("reconstruction",), False, id="reconstruction-frozen"),
    pytest.param(("reconstruction",), True, id="reconstruction-adapter"),
    pytest.param(("mahalanobis", "reconstruction"), False, id="both-frozen"),
    pytest.param(("mahalanobis", "reconstruction"), True, id="both-adapter"),
]
_SETTINGS_AS_ONE = [pytest.param(p.values, id=p.id) for p in COMPONENT_SETTINGS]


# --------------------------------------------------------------------------------------------
# fixtures and helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _windows(sim: VibrationSimulator, count: int, first_index: int = 0, fs: float = FS) -> list[Window]:
    n = int(fs * WIN_S)
    out = []
    for i in range(first_index, first_index + count):
        out.append(Window("site", "m1", "de", "vibration", i * round(WIN_S * 1e9), fs, "g", sim.generate(n), i))
    return out


def _config(components: tuple[str, ...] = ("mahalanobis", "reconstruction"), train_adapter: bool = True,
            **kw: object) -> ScorerConfig:
    return ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S, components=components,
                        train_adapter=train_adapter, train=TrainConfig(max_epochs=3, max_seconds=30.0), **kw)


@pytest.fixture(scope="module")
def frozen() -> types.SimpleNamespace:
    """A randomly initialised encoder, its made-up sha256 and a snapshot of every tensor taken
    before any scorer has seen it."""
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig())
    snapshot = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    return types.SimpleNamespace(encoder=enc, sha=ENCODER_SHA, snapshot=snapshot)


@pytest.fixture(scope="module")
def data() -> types.SimpleNamespace:
    """One machine: 60 calibration windows, then 400 held-back normal windows continuing the same
    stream, and 30 windows of the same machine with an outer-race fault (severity 0.5 g)."""
    sim = VibrationSimulator(sample_rate_hz=FS, seed=SEED)
    calib = _windows(sim, N_CALIB)
    held = _windows(sim, N_HELD, first_index=N_CALIB)
    faulty = VibrationSimulator(sample_rate_hz=FS, seed=SEED, fault=FaultSpec(kind="outer", severity=0.5))
    fault = _windows(faulty, N_FAULT)
    return types.SimpleNamespace(calib=calib, held=held, fault=fault)


@pytest.fixture(scope="module")
def trained(frozen: types.SimpleNamespace, data: types.SimpleNamespace) -> types.SimpleNamespace:
    """The default scorer (both components, adapter training on), calibrated once for the module;
    with the adapter's tensors as they were before calibration."""
    s = Scorer(frozen.encoder, frozen.sha, _config())
    s.learn_many(data.calib)
    initial = {k: v.detach().clone() for k, v in s.adapter.state_dict().items()}
    summary = s.calibrate()
    return types.SimpleNamespace(scorer=s, initial_adapter=initial, summary=summary)


@pytest.fixture(scope="module", params=_SETTINGS_AS_ONE)
def calibrated(request: pytest.FixtureRequest, frozen: types.SimpleNamespace,
               data: types.SimpleNamespace) -> types.SimpleNamespace:
    components, train_adapter = request.param
    s = Scorer(frozen.encoder, frozen.sha, _config(components, train_adapter))
    s.learn_many(data.calib)
    summary = s.calibrate()
    normal = s.score_windows(data.held[:100])
    fault = s.score_windows(data.fault)
    return types.SimpleNamespace(scorer=s, summary=summary, normal=normal, fault=fault,
                                 components=components, train_adapter=train_adapter)


# --------------------------------------------------------------------------------------------
# 1-2. the encoder stays frozen; only adapter tensors train


def test_encoder_bit_identical_after_adapter_training(frozen: types.SimpleNamespace,
                                                      trained: types.SimpleNamespace) -> None:
    assert trained.summary["adapter_epochs"] > 1, "the adapter did not train at all"
    state = frozen.encoder.state_dict()
    assert state.keys() == frozen.snapshot.keys()
    changed = [k for k, v in state.items() if not torch.equal(v, frozen.snapshot[k])]
    assert changed == [], f"encoder tensors changed by adapter training: {changed}"
    for name, p in frozen.encoder.named_parameters():
        assert not p.requires_grad, f"encoder parameter {name} requires grad"
        assert p.grad is None, f"encoder parameter {name} has a .grad"
    assert not frozen.encoder.training


def test_only_adapter_parameters_change(frozen: types.SimpleNamespace, trained: types.SimpleNamespace) -> None:
    s = trained.scorer
    after = s.adapter.state_dict()
    assert after.keys() == trained.initial_adapter.keys()
    # LoRA B and the head's up-projection start at exactly zero ...
    zero_init = [k for k in after if k.startswith("lora_b.") or k.startswith("up.")]
    assert len(zero_init) == 2 * EncoderConfig().depth + 2
    for k in zero_init:
        assert torch.count_nonzero(trained.initial_adapter[k]) == 0, k
    # ... and every adapter tensor has moved after the optimiser steps
    unchanged = [k for k, v in after.items() if torch.equal(v, trained.initial_adapter[k])]
    assert unchanged == [], f"adapter tensors unchanged by calibration: {unchanged}"
    for k in zero_init:
        assert torch.count_nonzero(after[k]) > 0, f"{k} still zero after training"
    assert all(p.requires_grad for p in s.adapter.parameters())
    # no encoder tensor is part of the adapter
    enc_ids = {id(p) for p in frozen.encoder.parameters()}
    assert not enc_ids & {id(p) for p in s.adapter.parameters()}
    # and the encoder is still what it was
    assert all(torch.equal(v, frozen.snapshot[k]) for k, v in frozen.encoder.state_dict().items())


# --------------------------------------------------------------------------------------------
# 3. a fresh adapter is the identity


@pytest.mark.parametrize("kind", [0, 1, "tensor"])
def test_fresh_adapter_is_identity(frozen: types.SimpleNamespace, kind: int | str) -> None:
    enc = frozen.encoder
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, *INPUT_SHAPE, generator=g)
    k = torch.tensor([0, 1, 0]) if kind == "tensor" else kind
    torch.manual_seed(1)
    adapter = Adapter(enc, AdapterConfig(targets=("qkv", "proj", "fc1", "fc2")))
    with torch.no_grad():
        plain = enc.tokens(x, k)
        adapted = adapter.head(enc.tokens(x, k, adapter=adapter))
        assert torch.equal(plain, adapted)
        assert torch.equal(enc(x, k), adapted.mean(dim=1))
        mask = torch.zeros(3, enc.cfg.n_tokens, dtype=torch.bool)
        mask[:, ::3] = True
        assert torch.equal(enc.tokens(x, k, mask), adapter.head(enc.tokens(x, k, mask, adapter=adapter)))


def test_trained_adapter_is_not_identity(frozen: types.SimpleNamespace, trained: types.SimpleNamespace) -> None:
    """Guards test_fresh_adapter_is_identity against an adapter that does nothing at all."""
    enc, adapter = frozen.encoder, trained.scorer.adapter
    x = torch.randn(2, 2, 64, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert not torch.equal(enc.tokens(x, 0), adapter.head(enc.tokens(x, 0, adapter=adapter)))


# --------------------------------------------------------------------------------------------
# 4. parameter budget


def test_trainable_fraction_default_under_5_percent(frozen: types.SimpleNamespace) -> None:
    enc = frozen.encoder
    adapter = Adapter(enc, AdapterConfig())
    frac = trainable_fraction(adapter, enc)
    n_adapter = sum(p.numel() for p in adapter.parameters())
    n_enc = sum(p.numel() for n, p in enc.named_parameters() if not n.startswith("decoder"))
    assert frac == n_adapter / n_enc
    assert 0.0 < frac < 0.05, f"trainable fraction {frac:.6f} ({n_adapter} / {n_enc}) is not < 5 %"


def test_trainable_fraction_rank_64_exceeds_5_percent(frozen: types.SimpleNamespace) -> None:
    frac = trainable_fraction(Adapter(frozen.encoder, AdapterConfig(rank=64)), frozen.encoder)
    assert frac > 0.05, f"rank-64 trainable fraction {frac:.6f}: the 5 % check would not discriminate"


# --------------------------------------------------------------------------------------------
# 5. model versions


def test_save_reload_scores_bit_identical(tmp_path: Path, frozen: types.SimpleNamespace,
                                          trained: types.SimpleNamespace, data: types.SimpleNamespace) -> None:
    s = trained.scorer
    windows = data.held[:16] + data.fault[:4]
    before = s.score_windows(windows)
    path = tmp_path / "m1.version"
    digest = save_version(path, s, {"note": "test"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1.version"], "temporary files left behind"
    for expected in (None, digest):
        r = load_version(path, frozen.encoder, frozen.sha, expected_sha256=expected)
        assert r.is_calibrated and r.threshold == s.threshold
        assert r.config == s.config and r.component_stats == s.component_stats
        after = r.score_windows(windows)
        assert np.array_equal(before, after), np.max(np.abs(before - after))
        assert r.score_windows([windows[3]])[0] == s.score_windows([windows[3]])[0]


def test_save_overwrites_atomically(tmp_path: Path, trained: types.SimpleNamespace) -> None:
    path = tmp_path / "v.pt"
    path.write_bytes(b"old version")
    digest = save_version(path, trained.scorer)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert [p.name for p in tmp_path.iterdir()] == ["v.pt"]


def test_failed_save_keeps_old_file(tmp_path: Path, trained: types.SimpleNamespace,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.pt"
    path.write_bytes(b"old version")

    def boom(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(version_mod.os, "replace", boom)
    with pytest.raises(OSError):
        save_version(path, trained.scorer)
    assert path.read_bytes() == b"old version"


def test_failed_save_leaves_no_temp_file(tmp_path: Path, trained: types.SimpleNamespace,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.pt"

    def boom(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(version_mod.os, "replace", boom)
    with pytest.raises(OSError):
        save_version(path, trained.scorer)
    assert list(tmp_path.iterdir()) == []


def test_load_version_errors(tmp_path: Path, frozen: types.SimpleNamespace, trained: types.SimpleNamespace) -> None:
    path = tmp_path / "v.pt"
    digest = save_version(path, trained.scorer)
    data = path.read_bytes()
    # wrong recorded hash
    with pytest.raises(ModelError, match="sha256"):
        load_version(path, frozen.encoder, frozen.sha, expected_sha256="0" * 64)
    # a different encoder
    with pytest.raises(ModelError, match="encoder"):
        load_version(path, frozen.encoder, OTHER_SHA)
    with pytest.raises(ModelError):
        load_version(path, frozen.encoder, OTHER_SHA, expected_sha256=digest)
    # truncated file (with and without a recorded hash)
    bad = tmp_path / "truncated.pt"
    for cut in (len(data) // 2, 100, 0):
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelError):
            load_version(bad, frozen.encoder, frozen.sha)
        with pytest.raises(ModelError):
            load_version(bad, frozen.encoder, frozen.sha, expected_sha256=digest)
    # a flipped byte is caught by the hash
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ModelError):
        load_version(bad, frozen.encoder, frozen.sha, expected_sha256=digest)
    # a missing file, and a torch file that is not a model version
    with pytest.raises(ModelError):
        load_version(tmp_path / "missing.pt", frozen.encoder, frozen.sha)
    torch.save({"format": "something-else/1", "state": {}}, tmp_path / "other.pt")
    with pytest.raises(ModelError):
        load_version(tmp_path / "other.pt", frozen.encoder, frozen.sha)


def test_uncalibrated_scorer_cannot_be_saved(tmp_path: Path, frozen: types.SimpleNamespace) -> None:
    s = Scorer(frozen.encoder, frozen.sha, _config())
    with pytest.raises(NotCalibratedError):
        save_version(tmp_path / "v.pt", s)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 6. the scorer contract, for every component setting


@pytest.mark.parametrize(("components", "train_adapter"), COMPONENT_SETTINGS)
def test_not_calibrated_before_calibrate(frozen: types.SimpleNamespace, data: types.SimpleNamespace,
                                         components: tuple[str, ...], train_adapter: bool) -> None:
    cfg = _config(components, train_adapter)
    s = Scorer(frozen.encoder, frozen.sha, cfg)
    assert not s.is_calibrated
    with pytest.raises(NotCalibratedError):
        s.score_windows(data.calib[:2])
    with pytest.raises(NotCalibratedError):
        s.score_windows([data.calib[0]])
    with pytest.raises(NotCalibratedError):
        s.calibrate()
    s.learn_many(data.calib[: cfg.min_windows - 1])
    assert s.n_normal == cfg.min_windows - 1
    with pytest.raises(NotCalibratedError):
        s.calibrate()
    with pytest.raises(NotCalibratedError):
        s.score_windows([data.calib[0]])
    assert not s.is_calibrated


def test_fault_scores_above_normal(calibrated: types.SimpleNamespace) -> None:
    normal, fault = calibrated.normal, calibrated.fault
    assert np.isfinite(normal).all() and np.isfinite(fault).all()
    auc = roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(fault))], np.r_[normal, fault])
    p99 = np.percentile(normal, 99)
    assert auc > 0.95, f"AUC {auc:.3f}"
    assert fault.mean() > p99, f"mean fault score {fault.mean():.2f} <= 99th percentile of normal {p99:.2f}"
    # scores are in units of the normal spread, about 0 for normal windows
    assert abs(np.median(normal)) < 2.0, np.median(normal)


def test_calibration_summary(calibrated: types.SimpleNamespace) -> None:
    c, s = calibrated.summary, calibrated.scorer
    assert c["windows"] == N_CALIB and 0 < c["train_windows"] < N_CALIB
    # cross-fitted distances hold out every window; the reconstruction error only the validation part
    expected_held = N_CALIB - c["train_windows"] if "reconstruction" in calibrated.components else N_CALIB
    assert c["held_out_windows"] == expected_held
    assert (c["adapter_epochs"] > 0) == calibrated.train_adapter
    assert set(s.component_stats) == set(calibrated.components)
    assert math.isfinite(s.threshold) and s.threshold >= c["held_out_score_max"]


def test_score_windows_equals_score_features(calibrated: types.SimpleNamespace, data: types.SimpleNamespace) -> None:
    s = calibrated.scorer
    windows = data.held[:3] + data.fault[:2]
    many = s.score_windows(windows)
    assert many.shape == (5,) and many.dtype == np.float64
    np.testing.assert_array_equal(s.score_features(s.features(windows)), many)
    for i, w in enumerate(windows):
        one = s.score_windows([w])[0]
        assert one == pytest.approx(many[i], rel=1e-5, abs=1e-5)
        # raw samples score like the window that holds them, as a batch or one (N,) array
        assert s.score_windows(np.asarray(w.samples)[None])[0] == one
        assert s.score_windows(np.asarray(w.samples))[0] == one


def test_inputs_are_explicit(calibrated: types.SimpleNamespace, data: types.SimpleNamespace) -> None:
    """Feature images go to the *_features entry points only; samples to the others."""
    s = calibrated.scorer
    f = s.features(data.held[:2])
    with pytest.raises(ValueError, match="feature images"):
        s.score_windows(f)
    with pytest.raises(ValueError, match="feature images"):
        s.learn_many(f)
    with pytest.raises(ValueError, match=r"\(B, 2, 64, 32\)"):
        s.score_features(np.stack([w.samples for w in data.held[:2]]))
    with pytest.raises(ValueError, match=r"\(B, 2, 64, 32\)"):
        s.learn_features(f[:, 0])


def test_other_sample_rate_rejected(calibrated: types.SimpleNamespace) -> None:
    s = calibrated.scorer
    (w,) = _windows(VibrationSimulator(sample_rate_hz=25_600.0, seed=SEED), 1, fs=25_600.0)
    with pytest.raises(ModelError, match="Hz"):
        s.score_windows([w])
    with pytest.raises(ModelError):
        s.score_windows([w])


def test_nan_window_rejected(calibrated: types.SimpleNamespace, data: types.SimpleNamespace) -> None:
    s = calibrated.scorer
    x = np.array(data.held[0].samples)
    x[100] = np.nan
    w = Window("site", "m1", "de", "vibration", 0, FS, "g", x)
    with pytest.raises(ValueError):
        s.score_windows([w])
    with pytest.raises(ValueError):
        s.score_windows([data.held[1], w])
    with pytest.raises(ValueError):
        s.score_windows(x)
    x[100] = np.inf
    with pytest.raises(ValueError):
        s.score_windows(x)


def test_nan_window_not_learned(frozen: types.SimpleNamespace, data: types.SimpleNamespace) -> None:
    s = Scorer(frozen.encoder, frozen.sha, _config())
    x = np.array(data.calib[0].samples)
    x[0] = np.nan
    with pytest.raises(ValueError):
        s.learn_one(Window("site", "m1", "de", "vibration", 0, FS, "g", x))
    (w,) = _windows(VibrationSimulator(sample_rate_hz=25_600.0, seed=SEED), 1, fs=25_600.0)
    with pytest.raises(ModelError):
        s.learn_one(w)
    assert s.n_normal == 0


def test_tiny_min_windows_rejected() -> None:
    with pytest.raises(ValueError, match="min_windows"):
        _config(min_windows=2)


# --------------------------------------------------------------------------------------------
# 7. the threshold


@pytest.fixture(scope="module")
def held_scores(trained: types.SimpleNamespace, data: types.SimpleNamespace) -> np.ndarray:
    """Scores of the 400 held-back normal windows (the stream continuing after calibration)."""
    return trained.scorer.score_windows(data.held)


def test_threshold_is_finite_and_above_held_out_scores(trained: types.SimpleNamespace) -> None:
    s, cfg = trained.scorer, trained.scorer.config
    p = exceedance_probability(cfg.target_false_alerts_per_h, cfg.hop_s, cfg.alert_k, cfg.alert_n)
    assert trained.summary["exceedance_probability"] == p
    assert trained.summary["threshold"] == s.threshold
    assert math.isfinite(s.threshold)
    assert s.threshold >= trained.summary["held_out_score_max"]
    assert s.threshold >= trained.summary["held_out_score_mean"] + trained.summary["held_out_score_std"] * stats.norm.isf(p) - 1e-9


def test_threshold_not_grossly_low(trained: types.SimpleNamespace, held_scores: np.ndarray) -> None:
    """Loose guard (10 p + 0.02): catches a threshold that is far off, e.g. a sign or unit error."""
    s, cfg = trained.scorer, trained.scorer.config
    p = exceedance_probability(cfg.target_false_alerts_per_h, cfg.hop_s, cfg.alert_k, cfg.alert_n)
    measured = float(np.mean(held_scores > s.threshold))
    assert measured <= 10 * p + 0.02, f"{measured:.4f} above threshold {s.threshold:.3f}, p = {p:.4f}"


def test_threshold_false_alarm_rate_on_held_back_normal(trained: types.SimpleNamespace,
                                                        held_scores: np.ndarray) -> None:
    s, cfg = trained.scorer, trained.scorer.config
    p = exceedance_probability(cfg.target_false_alerts_per_h, cfg.hop_s, cfg.alert_k, cfg.alert_n)
    measured = float(np.mean(held_scores > s.threshold))
    assert measured <= 3 * p + 0.01, (
        f"{measured:.4f} of {len(held_scores)} held-back normal windows above threshold {s.threshold:.3f}; "
        f"target per-window exceedance p = {p:.4f}"
    )


def test_exceedance_probability_k1_n1() -> None:
    for rate, hop in [(0.1, 0.25), (1.0, 1.0), (0.5, 10.0), (2.0, 0.5)]:
        assert exceedance_probability(rate, hop, 1, 1) == pytest.approx(rate * hop / 3600.0, rel=1e-12)


def test_exceedance_probability_solves_the_rate_equation() -> None:
    for rate, hop, k, n in [(0.1, 0.25, 3, 5), (0.01, 1.0, 2, 4), (1.0, 2.0, 1, 3), (0.1, 0.25, 5, 5)]:
        p = exceedance_probability(rate, hop, k, n)
        assert (3600.0 / hop) * special.comb(n, k) * p**k == pytest.approx(rate, rel=1e-9)


def test_exceedance_probability_versus_k() -> None:
    """Requiring more coincident exceedances (larger k, fixed n) allows a *larger* per-window
    probability p for the same alert rate (p_k = (rate / (W C(n, k)))^(1/k) with rate/W << 1), so
    the Gaussian threshold isf(p) *decreases* as k grows. For k = n, p grows with n."""
    ps = [exceedance_probability(0.1, 0.25, k, 5) for k in range(1, 6)]
    assert all(a < b for a, b in zip(ps, ps[1:])), ps
    z = [stats.norm.isf(p) for p in ps]
    assert all(a > b for a, b in zip(z, z[1:])), z
    kk = [exceedance_probability(0.1, 0.25, k, k) for k in range(1, 6)]
    assert all(a < b for a, b in zip(kk, kk[1:])), kk
    # a higher target alert rate, or longer hops (fewer windows per hour), allow a larger p
    assert exceedance_probability(1.0, 0.25, 3, 5) > exceedance_probability(0.1, 0.25, 3, 5)
    assert exceedance_probability(0.1, 1.0, 3, 5) > exceedance_probability(0.1, 0.25, 3, 5)


def test_exceedance_probability_clipped() -> None:
    assert exceedance_probability(1e6, 1.0, 1, 1) == 0.5
    assert exceedance_probability(1e-12, 0.01, 1, 5) == 1e-9


# --------------------------------------------------------------------------------------------
# 9. loading the frozen encoder


def _write_encoder(dirpath: Path, enc: Encoder) -> tuple[Path, str]:
    path = dirpath / "enc.pt"
    torch.save({k: v.contiguous() for k, v in enc.state_dict().items()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (dirpath / "enc.json").write_text(json.dumps({"sha256": digest, "config": EncoderConfig().to_dict()}))
    return path, digest


def test_load_encoder_ok(tmp_path: Path, frozen: types.SimpleNamespace) -> None:
    path, digest = _write_encoder(tmp_path, frozen.encoder)
    enc, sha = load_encoder(path)
    assert sha == digest
    assert not enc.training
    assert all(not p.requires_grad for p in enc.parameters())
    ref = frozen.encoder.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in enc.state_dict().items())
    assert enc.cfg == EncoderConfig()


def test_load_encoder_tampered(tmp_path: Path, frozen: types.SimpleNamespace) -> None:
    path, _ = _write_encoder(tmp_path, frozen.encoder)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_encoder(path)


def test_load_encoder_missing_card_or_file(tmp_path: Path, frozen: types.SimpleNamespace) -> None:
    path, _ = _write_encoder(tmp_path, frozen.encoder)
    (tmp_path / "enc.json").unlink()
    with pytest.raises(ModelError):
        load_encoder(path)
    with pytest.raises(ModelError):
        load_encoder(tmp_path / "nothing.pt")


def test_load_encoder_wrong_architecture(tmp_path: Path, frozen: types.SimpleNamespace) -> None:
    path, digest = _write_encoder(tmp_path, frozen.encoder)
    cfg = {**EncoderConfig().to_dict(), "dim": 64}
    (tmp_path / "enc.json").write_text(json.dumps({"sha256": digest, "config": cfg}))
    with pytest.raises(ModelError, match="architecture"):
        load_encoder(path)


def test_load_encoder_damaged_card(tmp_path: Path, frozen: types.SimpleNamespace) -> None:
    path, _ = _write_encoder(tmp_path, frozen.encoder)
    card = tmp_path / "enc.json"
    card.write_text(card.read_text()[:20])  # e.g. a crash while models/pretrain.py wrote it
    with pytest.raises(ModelError):
        load_encoder(path)


def test_load_encoder_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "enc.pt"
    path.write_bytes(b"this is not a torch file" * 10)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "enc.json").write_text(json.dumps({"sha256": digest, "config": EncoderConfig().to_dict()}))
    with pytest.raises(ModelError):
        load_encoder(path)


def test_known_fault_prototypes_saved_and_reloaded_bit_identical(tmp_path: Path, frozen: types.SimpleNamespace,
                                                                 data: types.SimpleNamespace) -> None:
    s = Scorer(frozen.encoder, frozen.sha, _config())
    s.learn_many(data.calib)
    s.learn_many(data.fault[:10], "fault")
    with pytest.raises(ValueError, match="label"):
        s.learn_many(data.fault[:1], "broken")
    summary = s.calibrate()
    assert summary["fault_windows"] == 10 and summary["fault_prototypes"] == 10
    labelled = s.score_windows(data.fault[:10])
    assert (labelled > s.threshold).all()
    assert (s.fault_match(np.zeros((1, frozen.encoder.cfg.dim), np.float32) + s.baseline.mean.astype(np.float32)) == 0).all()
    windows = data.held[:8] + data.fault[10:14]
    before = s.score_windows(windows)
    save_version(tmp_path / "v.pt", s)
    r = load_version(tmp_path / "v.pt", frozen.encoder, frozen.sha)
    assert np.array_equal(r.score_windows(windows), before)
    assert np.array_equal(r.fault_prototypes, s.fault_prototypes)


def test_a_default_version_with_the_most_fault_prototypes_fits_256_kib(tmp_path: Path, frozen: types.SimpleNamespace,
                                                                       data: types.SimpleNamespace) -> None:
    """The default components (embedding and spectral baselines, logit) and 256 known-fault
    prototypes: the baselines' precision matrices are stored as one triangle, so the file stays
    under 256 KiB; a version file written before (full matrices) loads to the same scores."""
    s = Scorer(frozen.encoder, frozen.sha, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=WIN_S,
                                                        train=TrainConfig(max_epochs=1, max_seconds=30.0)))
    assert s.config.components == ("mahalanobis", "spectral", "logit")
    s.learn_many(data.calib)
    s.learn_many([data.fault[i % 10] for i in range(400)], "fault")
    assert s.calibrate()["fault_prototypes"] == MAX_FAULT_PROTOTYPES
    save_version(tmp_path / "big.pt", s)
    assert (tmp_path / "big.pt").stat().st_size < 256 * 1024, (tmp_path / "big.pt").stat().st_size
    windows = data.held[:8] + data.fault[10:14]
    before = s.score_windows(windows)
    assert np.array_equal(load_version(tmp_path / "big.pt", frozen.encoder, frozen.sha).score_windows(windows), before)
    old = s.state()
    for key in ("baseline", "spectral_baseline"):
        b = getattr(s, key)
        old[key] = {"mean": torch.from_numpy(b.mean.astype(np.float32)), "precision": torch.from_numpy(b.precision.astype(np.float32))}
    assert np.array_equal(Scorer.from_state(frozen.encoder, frozen.sha, old).score_windows(windows), before)


def test_lora_in_the_last_blocks_only(frozen: types.SimpleNamespace) -> None:
    full, last = Adapter(frozen.encoder, AdapterConfig()), Adapter(frozen.encoder, AdapterConfig(layers=1))
    depth = len(frozen.encoder.blocks)
    assert {k.split("_")[0] for k in full.lora_a} == {str(i) for i in range(depth)}
    assert {k.split("_")[0] for k in last.lora_a} == {str(depth - 1)}
    assert trainable_fraction(last, frozen.encoder) < trainable_fraction(full, frozen.encoder)
    out = torch.ones(1, 3 * frozen.encoder.cfg.dim)
    assert torch.equal(last.add_delta(0, "qkv", torch.ones(1, frozen.encoder.cfg.dim), out.clone()), out)
    with pytest.raises(ValueError):
        AdapterConfig(layers=-1)
    # the frozen blocks before the LoRA block build no autograd graph (nothing kept for backprop)
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.requires_grad))
             for k, blk in enumerate(frozen.encoder.blocks)]
    try:
        frozen.encoder.tokens(torch.randn(2, *INPUT_SHAPE), 0, adapter=last)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {k: k == depth - 1 for k in range(depth)}


def test_ledoit_wolf_matches_scikit_learn() -> None:
    from sklearn.covariance import LedoitWolf

    from pdm_edge.model.baseline import ledoit_wolf

    rng = np.random.default_rng(3)
    for n, d in ((30, 128), (500, 16), (5, 3)):
        x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 2.0
        mean, cov = ledoit_wolf(x)
        ref = LedoitWolf().fit(x)
        np.testing.assert_allclose(mean, ref.location_, rtol=1e-12)
        np.testing.assert_allclose(cov, ref.covariance_, rtol=1e-9, atol=1e-12)
