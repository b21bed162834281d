"""Tests of pdm_edge.features: shapes, units, the sample-rate rule, the envelope spectrum, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pdm_edge import features as F
from pdm_edge.errors import PdmEdgeError
from sensors.simulator import AcousticFaultSpec, AcousticSimulator, FaultSpec, VibrationSimulator

RATES = (12000.0, 16000.0, 25600.0, 48000.0)
DURATIONS = (0.1, 0.25, 1.0, 2.0)


def _sine(fs: float, n: int, f: float, amp: float = 1.0, phase: float = 0.3) -> np.ndarray:
    t = np.arange(n) / fs
    return (amp * np.sin(2.0 * np.pi * f * t + phase)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# constants and spec


def test_constants() -> None:
    assert F.N_BANDS == 64 and F.N_FRAMES == 32
    assert F.INPUT_SHAPE == (2, 64, 32)
    assert F.CANONICAL_RATE_HZ == {"vibration": 25600.0, "acoustic": 16000.0}
    assert F.HANDCRAFTED_DIM == 132
    assert all(len(v) == F.HANDCRAFTED_DIM for v in F.HANDCRAFTED_NAMES.values())


def test_canonical_rate() -> None:
    assert F.canonical_rate("vibration", 12000) == 12000.0
    assert F.canonical_rate("vibration", 25600) == 25600.0
    assert F.canonical_rate("vibration", 48000) == 25600.0
    assert F.canonical_rate("acoustic", 8000) == 8000.0
    assert F.canonical_rate("acoustic", 44100) == 16000.0
    with pytest.raises(ValueError, match="unknown sensor kind"):
        F.canonical_rate("thermal", 1000)
    with pytest.raises(ValueError):
        F.canonical_rate("vibration", 0)


def test_default_spec() -> None:
    s12 = F.FeatureSpec.default("vibration", 12000)
    assert (s12.fmin_hz, s12.fmax_hz) == (10.0, 10000.0)
    assert s12.envelope_band_hz == pytest.approx((1200.0, 4800.0))
    s25 = F.FeatureSpec.default("vibration", 25600)
    assert s25.envelope_band_hz == pytest.approx((2560.0, 10240.0))
    assert F.FeatureSpec.default("vibration", 48000).envelope_band_hz == pytest.approx((2560.0, 10240.0))
    assert s25.envelope_fmax_hz == 640.0
    ac = F.FeatureSpec.default("acoustic", 16000)
    assert (ac.kind, ac.fmin_hz, ac.fmax_hz, ac.envelope_band_hz) == ("acoustic", 50.0, 8000.0, None)


def test_spec_round_trip_and_validation() -> None:
    for spec in (F.FeatureSpec.default("vibration", 12000), F.FeatureSpec.default("acoustic", 16000)):
        d = json.loads(json.dumps(spec.to_dict()))
        assert d["feature_version"] == F.FEATURE_VERSION
        assert F.FeatureSpec.from_dict(d) == spec
    d = F.FeatureSpec.default("vibration", 25600).to_dict()
    with pytest.raises(ValueError, match="feature_version"):
        F.FeatureSpec.from_dict({**d, "feature_version": F.FEATURE_VERSION + 1})
    with pytest.raises(ValueError, match="unknown keys"):
        F.FeatureSpec.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="fmin_hz < fmax_hz"):
        F.FeatureSpec(kind="vibration", fmin_hz=100.0, fmax_hz=50.0)
    with pytest.raises(ValueError, match="envelope_band_hz"):
        F.FeatureSpec(kind="vibration", fmin_hz=10.0, fmax_hz=1e4, envelope_band_hz=(5e3, 1e3))
    with pytest.raises(ValueError, match="unknown sensor kind"):
        F.FeatureSpec(kind="thermal", fmin_hz=10.0, fmax_hz=1e4)


# --------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("fs", RATES)
@pytest.mark.parametrize("duration", DURATIONS)
def test_shapes_and_dtypes(fs: float, duration: float) -> None:
    n = round(fs * duration)
    x = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32)
    for kind in ("vibration", "acoustic"):
        y = F.encoder_input(x, fs, kind)
        assert y.shape == (2, *F.INPUT_SHAPE) and y.dtype == np.float32
        assert np.isfinite(y).all()
        h = F.handcrafted_features(x, fs, kind)
        assert h.shape == (2, F.HANDCRAFTED_DIM) and h.dtype == np.float32
        assert np.isfinite(h).all()
    fs_a = F.canonical_rate("vibration", fs)
    xr = F.resample(x, fs, fs_a)
    spec = F.FeatureSpec.default("vibration", fs)
    bs = F.band_spectrogram(xr, fs_a, spec)
    assert bs.shape == (2, 64, 32) and bs.dtype == np.float32
    freqs, ses = F.envelope_spectrum(xr, fs_a, spec.envelope_band_hz)
    assert freqs.shape == (64,) and ses.shape == (2, 64) and ses.dtype == np.float32
    assert F.rms(x).shape == (2,)


def test_one_dimensional_window_is_a_batch_of_one() -> None:
    x = np.random.default_rng(1).standard_normal(6400).astype(np.float32)
    y = F.encoder_input(x, 25600, "vibration")
    assert y.shape == (1, *F.INPUT_SHAPE)
    np.testing.assert_array_equal(y, F.encoder_input(x[None, :], 25600, "vibration"))
    assert F.handcrafted_features(x, 25600, "vibration").shape == (1, F.HANDCRAFTED_DIM)
    assert F.welch_psd(x, 25600)[1].shape[0] == 1


def test_empty_batch() -> None:
    assert F.encoder_input(np.zeros((0, 4000), np.float32), 16000, "acoustic").shape == (0, *F.INPUT_SHAPE)


# --------------------------------------------------------------------------------------------
# band spectrogram


@pytest.mark.parametrize(("kind", "fs"), [("vibration", 25600.0), ("acoustic", 16000.0)])
def test_sine_peaks_in_nearest_band(kind: str, fs: float) -> None:
    spec = F.FeatureSpec.default(kind, fs)
    centres = F.band_centers_hz(spec.fmin_hz, spec.fmax_hz)
    for f in (97.0, 440.0, 1000.0, 2345.0, 5000.0, 6800.0):
        x = _sine(fs, int(fs), f)
        bands = F.band_spectrogram(x, fs, spec)[0].mean(axis=-1)
        assert int(np.argmax(bands)) == int(np.argmin(np.abs(centres - f))), f


def test_band_power_units() -> None:
    """A sine of amplitude A carries A^2/2 (unit^2) summed over the bands."""
    fs, amp = 25600.0, 0.5
    spec = F.FeatureSpec.default("vibration", fs)
    for f in (300.0, 3000.0):
        db = F.band_spectrogram(_sine(fs, int(fs), f, amp), fs, spec)[0]
        power = 10.0 ** (db.astype(np.float64) / 10.0) - 10.0 ** (spec.floor_db / 10.0)
        assert power.sum(axis=0) == pytest.approx(np.full(32, amp**2 / 2), rel=0.05)


def test_zero_window_is_floor_and_bands_above_045_fs_are_floor() -> None:
    spec = F.FeatureSpec.default("vibration", 12000)
    y = F.encoder_input(np.zeros(3000, np.float32), 12000, "vibration", spec)
    assert np.all(y == np.float32(spec.floor_db))
    x = np.random.default_rng(2).standard_normal(3000).astype(np.float32)
    ch0 = F.encoder_input(x, 12000, "vibration")[0, 0]
    dead = F.band_centers_hz(10.0, 10000.0) > 0.45 * 12000
    assert dead.any() and not dead.all()
    assert np.all(ch0[dead] == np.float32(spec.floor_db))
    assert np.all(ch0[~dead] > spec.floor_db + 60.0)


def test_mel_filterbank() -> None:
    fb = F.mel_filterbank(25600, 256, 64, 10.0, 10000.0)  # short frames: 100 Hz bins
    assert fb.shape == (64, 129)
    assert np.all(fb.max(axis=1) >= 0.5)  # every band covers at least one bin
    assert np.all(fb[:, 0] == 0.0)
    fine = F.mel_filterbank(25600, 8192, 64, 10.0, 10000.0)
    freqs = np.arange(4097) * 25600 / 8192
    centres = F.band_centers_hz(10.0, 10000.0)
    inner = (freqs > centres[0]) & (freqs < centres[-1])
    np.testing.assert_allclose(fine[:, inner].sum(axis=0), 1.0, atol=1e-9)  # partition of unity
    with pytest.raises(ValueError):
        F.mel_filterbank(25600, 256, 64, 500.0, 100.0)


# --------------------------------------------------------------------------------------------
# Welch PSD


def test_welch_peak_and_units() -> None:
    fs, amp, f = 25600.0, 2.0, 1234.0
    x = _sine(fs, int(fs), f, amp) + 0.7  # the DC offset is detrended
    freqs, psd = F.welch_psd(x, fs)
    assert psd.shape == (1, freqs.size) and psd.dtype == np.float64
    assert abs(freqs[np.argmax(psd[0])] - f) <= freqs[1] - freqs[0]
    assert np.trapezoid(psd[0], freqs) == pytest.approx(amp**2 / 2, rel=0.01)
    freqs, psd = F.welch_psd(np.stack([x, 2 * x]), fs, nperseg=1024)
    assert freqs.size == 513 and psd.shape == (2, 513)
    np.testing.assert_allclose(psd[1], 4 * psd[0], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# resampling


def test_resample_anti_aliasing() -> None:
    fs_in, fs_out, n = 48000.0, 12000.0, 48000
    x = np.stack([_sine(fs_in, n, 1000.0, 1.5), _sine(fs_in, n, 10000.0, 1.5)])
    y = F.resample(x, fs_in, fs_out)
    assert y.shape == (2, 12000) and y.dtype == np.float32
    mid = y[:, 1000:-1000].astype(np.float64)
    assert np.sqrt(2.0 * np.mean(mid[0] ** 2)) == pytest.approx(1.5, rel=0.005)
    assert np.sqrt(2.0 * np.mean(mid[1] ** 2)) < 1.5e-3  # 10 kHz > 6 kHz Nyquist: removed
    assert F.resample(x, 12000, 12000).shape == x.shape


def test_resample_48k_matches_native_25k6() -> None:
    """The same continuous signal sampled at 48 kHz and at 25.6 kHz gives nearly the same input."""
    rng = np.random.default_rng(1)
    freqs = np.geomspace(20.0, 11000.0, 300)
    amps = rng.uniform(0.005, 0.02, freqs.size)
    phases = rng.uniform(0.0, 2.0 * np.pi, freqs.size)

    def sampled(fs: float, duration: float) -> np.ndarray:
        t = np.arange(round(fs * duration)) / fs
        x = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(axis=0)
        x += (1.0 + np.cos(2 * np.pi * 97.0 * t)) * 0.3 * np.sin(2 * np.pi * 3000.0 * t)
        return x.astype(np.float32)

    for duration in (0.25, 1.0):
        a = F.encoder_input(sampled(48000.0, duration), 48000.0, "vibration")
        b = F.encoder_input(sampled(25600.0, duration), 25600.0, "vibration")
        diff = np.abs(a - b)
        assert np.median(diff) < 0.02  # dB
        assert diff.max() < 0.25  # dB (edge frames see the resampler's start-up)


# --------------------------------------------------------------------------------------------
# envelope spectrum


@pytest.mark.parametrize("fs", [12000.0, 25600.0])
def test_envelope_spectrum_finds_bpfo(fs: float) -> None:
    spec = F.FeatureSpec.default("vibration", fs)
    faulty = VibrationSimulator(sample_rate_hz=fs, fault=FaultSpec(kind="outer", severity=1.0), seed=3)
    healthy = VibrationSimulator(sample_rate_hz=fs, seed=3)
    bpfo = faulty.defect_frequencies.bpfo_hz
    n = int(fs)
    freqs, ses = F.envelope_spectrum(np.stack([faulty.generate(n), healthy.generate(n)]), fs,
                                     spec.envelope_band_hz)
    step = freqs[1] - freqs[0]
    k_peak = 1 + int(np.argmax(ses[0, 1:]))
    assert abs(freqs[k_peak] - bpfo) <= step
    k_bpfo = int(np.argmin(np.abs(freqs - bpfo)))
    assert ses[0, k_bpfo] / np.median(ses[0, 1:]) > 10.0
    assert ses[1, k_bpfo] / np.median(ses[1, 1:]) < 3.0
    # the log variant is the same spectrum in dB
    _, ses_db = F.envelope_spectrum(faulty.generate(n), fs, spec.envelope_band_hz, log=True)
    assert ses_db.shape == (1, 64) and ses_db.min() >= spec.floor_db


def test_envelope_spectrum_normalisation() -> None:
    """Squared envelope with a component a*cos(2 pi f0 t) shows a peak of height a at f0."""
    fs, n, f0, fc = 25600.0, 25600, 100.0, 5000.0
    t = np.arange(n) / fs
    m = 0.5
    x = (np.sqrt(1.0 + m * np.cos(2 * np.pi * f0 * t)) * np.sin(2 * np.pi * fc * t)).astype(np.float32)
    # envelope^2 = 1 + m cos(2 pi f0 t): the SES line at f0 has height m (unit^2)
    freqs, ses = F.envelope_spectrum(x, fs, (2560.0, 10240.0))
    k = int(np.argmin(np.abs(freqs - f0)))
    assert int(np.argmax(ses[0, 1:])) + 1 == k
    assert ses[0, k] == pytest.approx(m, rel=0.05)


def test_vibration_channel_1_is_tiled_log_ses_and_acoustic_is_delta() -> None:
    fs = 25600.0
    sim = VibrationSimulator(sample_rate_hz=fs, fault=FaultSpec(kind="inner"), seed=1)
    x = sim.generate(12800)
    y = F.encoder_input(x, fs, "vibration")
    spec = F.FeatureSpec.default("vibration", fs)
    _, ses_db = F.envelope_spectrum(x, fs, spec.envelope_band_hz, log=True)
    np.testing.assert_allclose(y[0, 1], np.repeat(ses_db[0][:, None], 32, axis=1), atol=1e-4)
    ac = AcousticSimulator(fault=AcousticFaultSpec(kind="bursts", severity=0.2), seed=1).generate(16000)
    ya = F.encoder_input(ac, 16000.0, "acoustic")
    np.testing.assert_allclose(ya[0, 1], np.gradient(ya[0, 0], axis=-1), atol=1e-5)
    assert np.abs(ya[0, 1]).max() > 1.0  # bursts make the delta move


# --------------------------------------------------------------------------------------------
# hand-crafted features


def test_handcrafted_time_domain_stats() -> None:
    fs = 25600.0
    rng = np.random.default_rng(5)
    noise = (0.1 * rng.standard_normal(int(fs))).astype(np.float32)
    sine = _sine(fs, int(fs), 50.0, 2.0, phase=0.0)
    h = F.handcrafted_features(np.stack([noise, sine]), fs, "vibration")
    log_rms, kurt, crest, log_peak = h[:, 128], h[:, 129], h[:, 130], h[:, 131]
    assert log_rms[0] == pytest.approx(-20.0, abs=0.1)
    assert kurt[0] == pytest.approx(3.0, abs=0.15)
    assert log_rms[1] == pytest.approx(20 * math.log10(2.0 / math.sqrt(2.0)), abs=0.01)
    assert kurt[1] == pytest.approx(1.5, abs=0.01)
    assert crest[1] == pytest.approx(math.sqrt(2.0), rel=1e-3)
    assert log_peak[1] == pytest.approx(20 * math.log10(2.0), abs=0.01)
    ch0 = F.encoder_input(np.stack([noise, sine]), fs, "vibration")[:, 0]
    np.testing.assert_allclose(h[:, :64], ch0.mean(axis=-1), atol=1e-4)
    dead = F.handcrafted_features(np.ones(1000, np.float32), fs, "vibration")[0]
    assert dead[129] == 0.0 and dead[130] == 0.0 and np.isfinite(dead).all()
    ha = F.handcrafted_features(noise, 16000.0, "acoustic")
    ca = F.encoder_input(noise, 16000.0, "acoustic")[0, 0]
    np.testing.assert_allclose(ha[0, 64:128], ca.std(axis=-1), atol=1e-4)


def test_rms() -> None:
    x = np.stack([np.full(1000, 3.0), _sine(1000.0, 1000, 50.0, 2.0)])
    np.testing.assert_allclose(F.rms(x), [3.0, math.sqrt(2.0)], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# batch invariance


@pytest.mark.parametrize(("kind", "fs", "n"), [("vibration", 25600.0, 6400), ("vibration", 48000.0, 12000),
                                               ("acoustic", 16000.0, 8000), ("acoustic", 44100.0, 11025)])
def test_batch_equals_one_by_one(kind: str, fs: float, n: int) -> None:
    x = np.random.default_rng(7).standard_normal((F.FEATURE_CHUNK + 4, n)).astype(np.float32)  # cut into two chunks
    x[2] += 0.3 * _sine(fs, n, 120.0)
    batch = F.encoder_input(x, fs, kind)
    single = np.concatenate([F.encoder_input(w, fs, kind) for w in x])
    np.testing.assert_array_equal(batch, single)
    hb = F.handcrafted_features(x, fs, kind)
    hs = np.concatenate([F.handcrafted_features(w, fs, kind) for w in x])
    np.testing.assert_array_equal(hb, hs)


# --------------------------------------------------------------------------------------------
# errors


def test_errors() -> None:
    good = np.zeros(4000, np.float32)
    bad = good.copy()
    bad[17] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        F.encoder_input(bad, 16000, "acoustic")
    bad[17] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        F.handcrafted_features(bad, 25600, "vibration")
    with pytest.raises(ValueError, match="empty"):
        F.encoder_input(np.zeros(0, np.float32), 16000, "acoustic")
    with pytest.raises(ValueError, match="empty"):
        F.encoder_input(np.zeros((3, 0), np.float32), 16000, "acoustic")
    with pytest.raises(ValueError, match="too short"):
        F.encoder_input(np.zeros(255, np.float32), 25600, "vibration")
    with pytest.raises(ValueError, match="too short"):  # 400 samples at 48 kHz -> 214 at 25.6 kHz
        F.encoder_input(np.zeros(400, np.float32), 48000, "vibration")
    assert F.encoder_input(np.zeros(480, np.float32), 48000, "vibration").shape == (1, *F.INPUT_SHAPE)
    with pytest.raises(ValueError, match="unknown sensor kind"):
        F.encoder_input(good, 16000, "thermal")
    with pytest.raises(ValueError, match="shape"):
        F.encoder_input(np.zeros((2, 2, 400), np.float32), 16000, "acoustic")
    with pytest.raises(ValueError, match="spec is for"):
        F.encoder_input(good, 16000, "acoustic", F.FeatureSpec.default("vibration", 16000))
    with pytest.raises(ValueError, match="sample rate"):
        F.encoder_input(good, -1.0, "acoustic")
    with pytest.raises(ValueError, match="fs/2"):
        F.envelope_spectrum(good, 8000.0, (2560.0, 10240.0))
    with pytest.raises(F.FeatureError):
        F.band_spectrogram(np.zeros(100, np.float32), 16000, F.FeatureSpec.default("acoustic", 16000))
    assert issubclass(F.FeatureError, PdmEdgeError)
