"""Synthetic sensors: determinism, chunk invariance, and the physics a diagnostician would check."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import signal

from pdm_edge.bearing import SKF_6205
from sensors.simulator import AcousticFaultSpec, AcousticSimulator, FaultSpec, VibrationSimulator

FS = 25600.0


def envelope_spectrum(x: np.ndarray, fs: float, band: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Envelope spectrum (amplitude): band-pass around the resonance, Hilbert envelope, |FFT|."""
    sos = signal.butter(4, band, btype="bandpass", fs=fs, output="sos")
    env = np.abs(signal.hilbert(signal.sosfiltfilt(sos, x.astype(np.float64))))
    env -= env.mean()
    spec = np.abs(np.fft.rfft(env)) / env.size
    return np.fft.rfftfreq(env.size, 1.0 / fs), spec


def test_output_shape_dtype_and_clock() -> None:
    sim = VibrationSimulator()
    x = sim.generate(1000)
    assert x.shape == (1000,) and x.dtype == np.float32 and np.all(np.isfinite(x))
    assert sim.t_s == pytest.approx(1000 / FS)
    assert sim.n_generated == 1000
    assert sim.generate(0).shape == (0,)
    assert sim.unit == "g" and sim.kind == "vibration"


def test_same_seed_same_signal_other_seed_differs() -> None:
    fault = FaultSpec("inner", onset_s=0.1, severity=0.5)
    a = VibrationSimulator(fault=fault, seed=3).generate(20000)
    b = VibrationSimulator(fault=fault, seed=3).generate(20000)
    c = VibrationSimulator(fault=fault, seed=4).generate(20000)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", ["outer", "inner", "ball"])
def test_chunked_equals_one_shot_bit_for_bit(kind: str) -> None:
    fault = FaultSpec(kind, onset_s=0.05, severity=0.8, growth_s=0.5, slip=0.02)  # type: ignore[arg-type]
    one = VibrationSimulator(fault=fault, seed=11).generate(60000)
    sim = VibrationSimulator(fault=fault, seed=11)
    sizes = [1, 2, 3, 255, 256, 1000, 7, 25600, 32876]
    assert sum(sizes) == 60000
    chunked = np.concatenate([sim.generate(n) for n in sizes])
    assert np.array_equal(one, chunked)


def test_psd_peaks_at_shaft_frequency() -> None:
    sim = VibrationSimulator(shaft_hz=25.0, seed=1)
    x = sim.generate(int(8 * FS))
    f, pxx = signal.welch(x, fs=FS, nperseg=int(FS))  # 1 Hz resolution
    assert f[np.argmax(pxx)] == pytest.approx(25.0, abs=1.0)
    # 2x and 3x shaft lines stand out of the floor next to them
    for k in (2, 3):
        i = int(np.argmin(np.abs(f - 25.0 * k)))
        assert pxx[i] > 100 * np.median(pxx[i + 5 : i + 20])
    # the resonance is excited weakly by noise: a bump around 3 kHz in the healthy spectrum
    bump = pxx[(f > 2800) & (f < 3200)].mean()
    floor = pxx[(f > 8000) & (f < 9000)].mean()
    assert bump > 3 * floor


def test_envelope_spectrum_shows_bpfo_for_outer_race_fault_only() -> None:
    n = int(10 * FS)  # 0.1 Hz resolution
    bpfo = SKF_6205.defect_frequencies(25.0).bpfo_hz
    faulty = VibrationSimulator(fault=FaultSpec("outer", severity=0.3), seed=5)
    assert faulty.impact_rate_hz == pytest.approx(bpfo)
    healthy = VibrationSimulator(seed=5)
    band = (2000.0, 4000.0)  # around the 3 kHz resonance
    f, s_fault = envelope_spectrum(faulty.generate(n), FS, band)
    _, s_ok = envelope_spectrum(healthy.generate(n), FS, band)
    df = f[1] - f[0]
    search = (f > 20) & (f < 400)
    peak_f = f[search][np.argmax(s_fault[search])]
    assert abs(peak_f - bpfo) <= df
    at_bpfo = np.abs(f - bpfo) <= df
    assert s_fault[at_bpfo].max() > 20 * np.median(s_fault[search])
    assert s_ok[at_bpfo].max() < 6 * np.median(s_ok[search])


def test_inner_race_fault_has_bpfi_and_shaft_sidebands() -> None:
    n = int(10 * FS)
    freqs = SKF_6205.defect_frequencies(25.0)
    sim = VibrationSimulator(fault=FaultSpec("inner", severity=0.3), seed=2)
    f, s = envelope_spectrum(sim.generate(n), FS, (2000.0, 4000.0))
    df = f[1] - f[0]
    floor = np.median(s[(f > 20) & (f < 400)])
    for line in (freqs.bpfi_hz, freqs.bpfi_hz - 25.0, freqs.bpfi_hz + 25.0, 25.0):
        assert s[np.abs(f - line) <= df].max() > 10 * floor, line


def test_severity_grows_and_rms_rises() -> None:
    fault = FaultSpec("outer", onset_s=1.0, severity=1.0, growth_s=2.0)
    sim = VibrationSimulator(fault=fault, seed=0)
    assert sim.severity_at(0.5) == 0.0
    assert sim.severity_at(2.0) == pytest.approx(0.5)
    assert sim.severity_at(10.0) == pytest.approx(1.0)
    np.testing.assert_allclose(sim.severity_at(np.array([0.0, 1.0, 3.0])), [0.0, 0.0, 1.0])
    x = sim.generate(int(4 * FS))
    rms = [float(np.sqrt(np.mean(x[int(k * FS) : int((k + 1) * FS)] ** 2))) for k in range(4)]
    assert rms[0] < rms[1] < rms[2] < rms[3]
    assert rms[3] > 2.5 * rms[0]
    # a step fault at full severity rings with a peak of about `severity` g
    step = VibrationSimulator(fault=FaultSpec("outer", severity=2.0), noise_g=0.0, harmonics=(),
                              resonance_noise_g=0.0, seed=0)
    assert float(np.max(np.abs(step.generate(int(FS))))) == pytest.approx(2.0, rel=0.02)


def test_healthy_severity_is_zero() -> None:
    sim = VibrationSimulator()
    assert sim.severity_at(100.0) == 0.0 and sim.impact_rate_hz is None


def test_unit_m_s2() -> None:
    g = VibrationSimulator(seed=9).generate(5000)
    ms2 = VibrationSimulator(seed=9, unit="m/s2").generate(5000)
    np.testing.assert_allclose(ms2, g * 9.80665, rtol=1e-6, atol=1e-6)


def test_fast_enough() -> None:
    sim = VibrationSimulator(fault=FaultSpec("outer", onset_s=30.0, growth_s=25.0))
    t0 = time.perf_counter()
    x = sim.generate(int(60 * FS))
    assert time.perf_counter() - t0 < 2.0
    assert x.size == int(60 * FS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate_hz": 0.0},
        {"resonance_hz": 13000.0},
        {"damping_ratio": 1.0},
        {"damping_ratio": 0.0},
        {"harmonics": (-0.1,)},
        {"noise_g": -1.0},
        {"shaft_hz": 0.0},
        {"unit": "Pa"},
        {"seed": -1},
        {"fault": "outer"},
    ],
)
def test_invalid_vibration_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        VibrationSimulator(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "crack"}, {"onset_s": -1.0}, {"severity": -0.1}, {"growth_s": float("nan")}, {"slip": 0.5}],
)
def test_invalid_fault_spec(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FaultSpec(**kwargs)


def test_generate_rejects_bad_counts() -> None:
    sim = VibrationSimulator()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            sim.generate(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- acoustic


@pytest.mark.parametrize(
    "fault",
    [None, AcousticFaultSpec("bursts", onset_s=0.5, severity=0.3), AcousticFaultSpec("tone", onset_s=0.2, growth_s=1.0, tone_sweep_hz=400.0)],
)
def test_acoustic_shape_dtype_finite_and_chunking(fault: AcousticFaultSpec | None) -> None:
    one = AcousticSimulator(fault=fault, seed=4).generate(32000)
    assert one.shape == (32000,) and one.dtype == np.float32 and np.all(np.isfinite(one))
    sim = AcousticSimulator(fault=fault, seed=4)
    chunked = np.concatenate([sim.generate(n) for n in (1, 999, 15000, 16000)])
    assert np.array_equal(one, chunked)
    assert sim.t_s == pytest.approx(2.0)


def test_acoustic_blade_pass_tone_and_fault_energy() -> None:
    fs = 16000.0
    healthy = AcousticSimulator(seed=1)
    f, pxx = signal.welch(healthy.generate(int(4 * fs)), fs=fs, nperseg=int(fs))
    assert f[np.argmax(pxx)] == pytest.approx(healthy.blade_pass_hz, abs=1.0)

    sim = AcousticSimulator(fault=AcousticFaultSpec("bursts", onset_s=2.0, severity=0.5), seed=1)
    x = sim.generate(int(4 * fs))
    sos = signal.butter(4, 3000.0, btype="highpass", fs=fs, output="sos")
    hf = signal.sosfiltfilt(sos, x.astype(np.float64))
    before, after = hf[: int(2 * fs)], hf[int(2 * fs) :]
    assert np.sqrt(np.mean(after**2)) > 3 * np.sqrt(np.mean(before**2))
    assert sim.severity_at(1.0) == 0.0 and sim.severity_at(3.0) == pytest.approx(0.5)


def test_acoustic_invalid() -> None:
    with pytest.raises(ValueError):
        AcousticFaultSpec("hiss")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AcousticSimulator(blade_count=0)
    with pytest.raises(ValueError):
        AcousticSimulator(fault=AcousticFaultSpec("tone", tone_hz=7900.0, tone_sweep_hz=500.0))
