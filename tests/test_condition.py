"""ISO 20816-3 severity and the condition trend values (:mod:`pdm_edge.condition`), checked against
closed forms: the velocity of a sine of acceleration is A / (2 pi f), band-limited to 10-1000 Hz."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdm_edge import condition as cond
from pdm_edge.types import Window

FS = 25_600.0
N = 25_600
T = np.arange(N) / FS


def _sine(f_hz: float, amp: float) -> np.ndarray:
    return amp * np.sin(2 * math.pi * f_hz * T)


@pytest.mark.parametrize("f_hz", [25.0, 100.0, 400.0, 900.0])
def test_velocity_of_a_sine_matches_the_closed_form(f_hz: float) -> None:
    a = 1.0  # m/s^2 peak
    v = cond.velocity_rms_mm_s(_sine(f_hz, a)[None], FS, "m/s2")
    expected = a / (2 * math.pi * f_hz) / math.sqrt(2) * 1000.0
    assert v.shape == (1,) and v.dtype == np.float64
    assert v[0] == pytest.approx(expected, rel=1e-3)


def test_units_band_limits_and_batches() -> None:
    g = cond.velocity_rms_mm_s(_sine(100.0, 1.0), FS, "g")[0]
    ms2 = cond.velocity_rms_mm_s(_sine(100.0, cond.G_M_S2), FS, "m/s2")[0]
    assert g == pytest.approx(ms2, rel=1e-9)
    # 5 Hz and 3 kHz lie outside 10-1000 Hz: (almost) nothing is left
    out = cond.velocity_rms_mm_s(np.stack([_sine(5.0, 1.0), _sine(3000.0, 1.0)]), FS, "m/s2")
    inside = cond.velocity_rms_mm_s(_sine(100.0, 1.0), FS, "m/s2")[0]
    assert out.shape == (2,) and (out < 0.01 * inside).all()
    # two tones in the band add in power
    both = cond.velocity_rms_mm_s(_sine(100.0, 1.0) + _sine(200.0, 1.0), FS, "m/s2")[0]
    one, two = (cond.velocity_rms_mm_s(_sine(f, 1.0), FS, "m/s2")[0] for f in (100.0, 200.0))
    assert both == pytest.approx(math.hypot(one, two), rel=1e-3)
    with pytest.raises(ValueError, match="unit 'Pa'"):
        cond.velocity_rms_mm_s(_sine(100.0, 1.0), FS, "Pa")
    with pytest.raises(ValueError, match="finite"):
        cond.velocity_rms_mm_s(np.array([[0.0, np.nan, 1.0]]), FS, "g")


def test_zones_group_2_rigid_and_configured() -> None:
    assert [cond.iso_zone(v) for v in (0.0, 1.39, 1.4, 2.79, 2.8, 4.49, 4.5, 30.0)] == \
        ["A", "A", "B", "B", "C", "C", "D", "D"]
    assert cond.iso_zone(4.0, (2.3, 4.5, 7.1)) == "B"
    for bad in ((1.0, 2.0), (2.8, 1.4, 4.5), (0.0, 1.0, 2.0), (1.0, 2.0, math.inf)):
        with pytest.raises(ValueError, match="zone boundaries"):
            cond.iso_zone(1.0, bad)


def test_indicators_rms_peak_crest_kurtosis_and_bands() -> None:
    x = np.stack([_sine(100.0, 1.0), np.zeros(N), _sine(2000.0, 0.5) + _sine(8000.0, 0.25)])
    rows = cond.indicators("s", "m", "de", [1, 2, 3], x, FS, "g", (1.4, 2.8, 4.5))
    sine, zero, two = rows
    assert sine.rms == pytest.approx(1 / math.sqrt(2), rel=1e-6) and sine.peak == pytest.approx(1.0, rel=1e-4)
    assert sine.crest_factor == pytest.approx(math.sqrt(2), rel=1e-4) and sine.kurtosis == pytest.approx(1.5, rel=1e-3)
    assert sine.band_10_1k == pytest.approx(0.5, rel=1e-3) and sine.band_1k_5k < 1e-6
    # 1 g at 100 Hz: 9.80665 / (2 pi 100) / sqrt 2 m/s = 11.04 mm/s: zone D
    assert sine.velocity_rms_mm_s == pytest.approx(11.04, rel=1e-3) and sine.zone == "D"
    assert (zero.rms, zero.crest_factor, zero.kurtosis, zero.velocity_rms_mm_s, zero.zone) == (0.0, 0.0, 0.0, 0.0, "A")
    assert two.band_1k_5k == pytest.approx(0.125, rel=1e-3) and two.band_5k_up == pytest.approx(0.03125, rel=1e-3)
    acoustic = cond.indicators("s", "m", "mic", [1], x[:1], FS, "Pa")[0]
    assert acoustic.velocity_rms_mm_s is None and acoustic.zone is None and acoustic.rms > 0


def test_for_windows_groups_streams_and_uses_the_zones_given() -> None:
    ws = [Window("s", "m", "de", "vibration", i, FS, "g", _sine(100.0, 0.1).astype(np.float32), i) for i in range(3)]
    ws.append(Window("s", "m", "mic", "acoustic", 9, 16000.0, "Pa", np.ones(160, np.float32), 0))
    out = cond.for_windows(ws, lambda w: (20.0, 30.0, 40.0))
    de = [c for c in out if c.sensor == "de"]
    assert [c.start_ns for c in de] == [0, 1, 2] and {c.zone for c in de} == {"A"}  # 1.1 mm/s, boundaries from 20
    assert [c.sensor for c in out if c.sensor == "mic"] == ["mic"]


def test_for_windows_batched_over_streams_equals_indicators_per_stream() -> None:
    rng = np.random.default_rng(3)
    ws = [Window("s", f"m{i}", "de", "vibration", k, FS, "g", (0.1 * rng.standard_normal(N)).astype(np.float32), k)
          for k in range(2) for i in range(3)]
    ws.append(Window("s", "m0", "de", "vibration", 7, FS, "g", np.full(N, np.nan, np.float32), 7))  # left out
    out = cond.for_windows(ws, lambda w: (0.01, 0.02, 0.03) if w.machine == "m1" else cond.GROUP2_RIGID_MM_S)
    assert [(c.machine, c.start_ns) for c in out] == [(w.machine, w.start_ns) for w in ws[:-1]]  # input order
    for m in ("m0", "m1", "m2"):
        mine = [w for w in ws[:-1] if w.machine == m]
        zones = (0.01, 0.02, 0.03) if m == "m1" else cond.GROUP2_RIGID_MM_S
        one = cond.indicators("s", m, "de", [w.start_ns for w in mine], np.stack([w.samples for w in mine]), FS, "g", zones)
        got = [c for c in out if c.machine == m]
        for a, b in zip(got, one):
            assert a.zone == b.zone and a.velocity_rms_mm_s == pytest.approx(b.velocity_rms_mm_s, rel=1e-12)
            assert (a.rms, a.kurtosis, a.band_5k_up) == pytest.approx((b.rms, b.kurtosis, b.band_5k_up), rel=1e-12)
    assert {c.zone for c in out if c.machine == "m1"} == {"D"}
