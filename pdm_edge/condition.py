"""Condition indicators of a window: ISO 20816-3 vibration severity and the classic trend values.

What a vibration analyst reads beside the anomaly score, computed per window in the scoring
path (:class:`pdm_edge.runtime.worker.ScoringWorker` spools one :class:`Condition` per scored window, the
store keeps them as the ``condition`` measurement, the dashboard trends them):

- **Velocity RMS, mm/s, 10-1000 Hz** (:func:`velocity_rms_mm_s`): the broadband severity
  quantity of ISO 20816-3 (machines above 15 kW, 120-30 000 r/min; the 10 Hz lower limit is the
  standard's for machines above 600 r/min). The acceleration window is integrated to velocity in
  the frequency domain: ``V(f) = A(f) / (j 2 pi f)`` on the rFFT of the mean-removed window,
  bins outside the band set to zero, RMS from Parseval's theorem (rectangular window: the RMS
  of the band-limited signal over the window, no window-amplitude correction needed). Units:
  ``g`` (x 9.80665 m/s^2) or ``m/s2``; other units (``Pa``, ``FS``) have no velocity.
- **Zone** (:func:`iso_zone`): A (newly commissioned), B (unrestricted long-term operation),
  C (restricted operation), D (damage possible), from the three zone boundaries of the
  machine's group and support. Defaults: ISO 20816-3 Table A.2, group 2 (15-300 kW), rigid
  support: 1.4 / 2.8 / 4.5 mm/s. Configure per sensor (``[sensors."..."] severity_zones_mm_s``)
  for other groups or flexible support (group 2 flexible: 2.3 / 4.5 / 7.1; group 1 rigid:
  2.3 / 4.5 / 7.1; group 1 flexible: 3.5 / 7.1 / 11.0).
- **Trend values** (:func:`indicators`): RMS and peak (the window's unit), crest factor
  (peak / RMS), kurtosis (Pearson: 3 for Gaussian noise; impacts raise it), and the mean-square
  energy in three bands (unit^2): 10-1000 Hz (the severity band), 1-5 kHz (bearing and gear
  resonances), 5 kHz to 0.45 x the sample rate (early bearing damage). A band above the
  window's Nyquist range is 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

G_M_S2 = 9.80665
"""Standard gravity, m/s^2 per g."""

ISO_BAND_HZ: tuple[float, float] = (10.0, 1000.0)
"""ISO 20816-3 broadband measurement range for machines above 600 r/min, Hz."""

GROUP2_RIGID_MM_S: tuple[float, float, float] = (1.4, 2.8, 4.5)
"""ISO 20816-3 zone boundaries A/B, B/C, C/D in mm/s RMS, group 2, rigid support (the default)."""

ZONES = ("A", "B", "C", "D")
ZONE_MEANING = {"A": "newly commissioned", "B": "unrestricted long-term operation", "C": "restricted operation",
                "D": "damage possible"}

BANDS_HZ: dict[str, tuple[float, float | None]] = {
    "band_10_1k": (10.0, 1000.0), "band_1k_5k": (1000.0, 5000.0), "band_5k_up": (5000.0, None)}
"""The band-energy fields and their ranges, Hz (``None``: up to 0.45 x the sample rate)."""

_UNIT_TO_M_S2 = {"g": G_M_S2, "m/s2": 1.0}


@dataclasses.dataclass(frozen=True)
class Condition:
    """Condition indicators of one window (store measurement ``condition``).

    Attributes:
        site, machine, sensor, start_ns: the window (start in ns, UTC; the store's timestamp).
        unit: the window's unit (``g``, ``m/s2``, ``Pa``, ``FS``).
        rms, peak: in ``unit``; crest_factor = peak / rms (0 for a zero window); kurtosis
            (Pearson, dimensionless; 0 for a zero window).
        band_10_1k, band_1k_5k, band_5k_up: mean-square energy in the band, unit^2.
        velocity_rms_mm_s: ISO 20816-3 velocity RMS 10-1000 Hz, mm/s (``None``: not an
            acceleration unit).
        zone: ``"A"``..``"D"`` (``None`` without a velocity).
    """

    site: str
    machine: str
    sensor: str
    start_ns: int
    unit: str
    rms: float
    peak: float
    crest_factor: float
    kurtosis: float
    band_10_1k: float
    band_1k_5k: float
    band_5k_up: float
    velocity_rms_mm_s: float | None
    zone: str | None


def _batch(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"samples must be (N,) or (B, N) with N >= 2, got shape {np.shape(samples)}")
    if not np.isfinite(x).all():
        raise ValueError("samples must be finite")
    return x


def _mean_square_spectrum(c: np.ndarray, fs_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """``(f (F,) Hz, p (B, F))`` of mean-removed float64 windows ``c`` ``(B, N)``: each one-sided
    rFFT bin's share of the window's mean square (unit^2), so that ``p.sum(axis=1)`` is the
    variance (Parseval; one-sided bins count twice, except DC and Nyquist)."""
    n = c.shape[1]
    spec = np.fft.rfft(c, axis=1)
    f = np.fft.rfftfreq(n, 1.0 / fs_hz)
    w = np.full(f.shape, 2.0 / n ** 2)
    w[0] = 1.0 / n ** 2
    if n % 2 == 0:
        w[-1] = 1.0 / n ** 2
    return f, (spec.real ** 2 + spec.imag ** 2) * w


def _velocity_band(unit: str, fs_hz: float, band_hz: tuple[float, float]) -> tuple[float, float]:
    if unit not in _UNIT_TO_M_S2:
        raise ValueError(f"velocity needs acceleration in g or m/s2, got unit {unit!r}")
    if not fs_hz > 0:
        raise ValueError(f"fs_hz must be > 0, got {fs_hz!r}")
    lo, hi = float(band_hz[0]), min(float(band_hz[1]), fs_hz / 2.0)
    if not 0 < lo < hi:
        raise ValueError(f"empty band {band_hz!r} at fs {fs_hz:g} Hz")
    return lo, hi


def _velocity_from_spectrum(f: np.ndarray, p: np.ndarray, unit: str, band: tuple[float, float]) -> np.ndarray:
    """Velocity RMS (mm/s) from :func:`_mean_square_spectrum` of acceleration in ``unit``:
    ``V(f) = A(f) / (j 2 pi f)`` in the band, zero outside."""
    keep = (f >= band[0]) & (f <= band[1])
    gain = (_UNIT_TO_M_S2[unit] / (2.0 * np.pi * f[keep])) ** 2
    return np.sqrt((p[:, keep] * gain).sum(axis=1)) * 1000.0


def velocity_rms_mm_s(samples: np.ndarray, fs_hz: float, unit: str = "g",
                      band_hz: tuple[float, float] = ISO_BAND_HZ) -> np.ndarray:
    """ISO 20816-3 velocity RMS of acceleration windows, by integration in the frequency domain.

    Args:
        samples: acceleration, shape ``(B, N)`` (or ``(N,)``), float, in ``unit``.
        fs_hz: sample rate, Hz.
        unit: ``"g"`` or ``"m/s2"``.
        band_hz: the band kept, Hz (default 10-1000 Hz); clipped to the Nyquist frequency.

    Returns:
        ``(B,)`` float64: velocity RMS in mm/s over the band.

    Raises:
        ValueError: another unit, a non-positive rate, an empty band, or samples that are not
            finite or not ``(B, N)`` with ``N >= 2``.
    """
    band = _velocity_band(unit, fs_hz, band_hz)
    x = _batch(samples)
    f, p = _mean_square_spectrum(x - x.mean(axis=1, keepdims=True), fs_hz)
    return _velocity_from_spectrum(f, p, unit, band)


def iso_zone(velocity_mm_s: float, boundaries_mm_s: Sequence[float] = GROUP2_RIGID_MM_S) -> str:
    """The ISO 20816-3 zone of a velocity RMS: ``"A"`` below the first boundary, ``"B"`` below
    the second, ``"C"`` below the third, else ``"D"`` (a value on a boundary is in the upper zone).

    Raises:
        ValueError: boundaries that are not three increasing positive numbers, or a negative or
            non-finite velocity.
    """
    check_boundaries(boundaries_mm_s)
    if not np.isfinite(velocity_mm_s) or velocity_mm_s < 0:
        raise ValueError(f"velocity must be finite and >= 0, got {velocity_mm_s!r}")
    return ZONES[int(np.searchsorted(np.asarray(boundaries_mm_s, dtype=np.float64), velocity_mm_s, side="right"))]


def check_boundaries(boundaries_mm_s: Sequence[float]) -> tuple[float, float, float]:
    """The three zone boundaries A/B, B/C, C/D (mm/s) as floats.

    Raises:
        ValueError: not three finite, positive, strictly increasing numbers.
    """
    b = tuple(float(v) for v in boundaries_mm_s)
    if len(b) != 3 or not all(np.isfinite(b)) or not 0 < b[0] < b[1] < b[2]:
        raise ValueError(f"zone boundaries must be three increasing positive mm/s values (A/B, B/C, C/D), got {boundaries_mm_s!r}")
    return b  # type: ignore[return-value]


def _band_energies_from_spectrum(f: np.ndarray, p: np.ndarray, fs_hz: float) -> dict[str, np.ndarray]:
    out = {}
    for name, (lo, hi) in BANDS_HZ.items():
        top = 0.45 * fs_hz if hi is None else min(hi, 0.45 * fs_hz)
        keep = (f >= lo) & (f < top)
        out[name] = p[:, keep].sum(axis=1) if keep.any() else np.zeros(p.shape[0])
    return out


def band_energies(samples: np.ndarray, fs_hz: float) -> dict[str, np.ndarray]:
    """Mean-square energy of each band of :data:`BANDS_HZ` (unit^2), ``{field: (B,) float64}``,
    from the rFFT of the mean-removed windows (Parseval)."""
    x = _batch(samples)
    f, p = _mean_square_spectrum(x - x.mean(axis=1, keepdims=True), fs_hz)
    return _band_energies_from_spectrum(f, p, fs_hz)


def _values(x: np.ndarray, fs_hz: float, unit: str) -> dict[str, np.ndarray | None]:
    """Every indicator of validated float64 windows ``x`` ``(B, N)`` as ``(B,)`` arrays (velocity
    ``None`` without one), from one rFFT per window."""
    c = x - x.mean(axis=1, keepdims=True)
    c2 = c * c
    rms = np.sqrt((x * x).mean(axis=1))
    peak = np.abs(x).max(axis=1)
    var = c2.mean(axis=1)
    kurt = np.where(var > 0, (c2 * c2).mean(axis=1) / np.where(var > 0, var, 1.0) ** 2, 0.0)
    crest = np.where(rms > 0, peak / np.where(rms > 0, rms, 1.0), 0.0)
    f, p = _mean_square_spectrum(c, fs_hz)
    out: dict[str, np.ndarray | None] = {"rms": rms, "peak": peak, "crest": crest, "kurt": kurt,
                                         **_band_energies_from_spectrum(f, p, fs_hz)}
    out["velocity"] = (_velocity_from_spectrum(f, p, unit, _velocity_band(unit, fs_hz, ISO_BAND_HZ))
                       if unit in _UNIT_TO_M_S2 and fs_hz / 2 > ISO_BAND_HZ[0] else None)
    return out


def _conditions(streams: Sequence[tuple[str, str, str]], start_ns: Sequence[int], unit: str,
                v: dict[str, np.ndarray | None], zones: Sequence[Sequence[float]]) -> list[Condition]:
    out = []
    vel = v["velocity"]
    for i, ((site, machine, sensor), t) in enumerate(zip(streams, start_ns)):
        vi = None if vel is None else float(vel[i])
        out.append(Condition(site, machine, sensor, int(t), unit, float(v["rms"][i]), float(v["peak"][i]),  # type: ignore[index]
                             float(v["crest"][i]), float(v["kurt"][i]), float(v["band_10_1k"][i]),  # type: ignore[index]
                             float(v["band_1k_5k"][i]), float(v["band_5k_up"][i]),  # type: ignore[index]
                             vi, None if vi is None else iso_zone(vi, zones[i])))
    return out


def indicators(site: str, machine: str, sensor: str, start_ns: Sequence[int], samples: np.ndarray, fs_hz: float,
               unit: str, zones_mm_s: Sequence[float] = GROUP2_RIGID_MM_S) -> list[Condition]:
    """The :class:`Condition` of each window of one stream.

    Args:
        site, machine, sensor: the stream.
        start_ns: each window's start (ns, UTC), length ``B``.
        samples: ``(B, N)`` float windows in ``unit``.
        fs_hz: sample rate, Hz.
        unit: the stream's unit; velocity and zone only for ``g`` and ``m/s2``.
        zones_mm_s: the zone boundaries (see :func:`iso_zone`).

    Raises:
        ValueError: as :func:`velocity_rms_mm_s`; ``start_ns`` not of length ``B``.
    """
    x = _batch(samples)
    if len(start_ns) != x.shape[0]:
        raise ValueError(f"{len(start_ns)} start times for {x.shape[0]} windows")
    return _conditions([(site, machine, sensor)] * len(start_ns), start_ns, unit, _values(x, fs_hz, unit),
                       [zones_mm_s] * len(start_ns))


def for_windows(windows: Sequence[object], zones_for: object = None) -> list[Condition]:
    """:func:`indicators` of scored windows (:class:`pdm_edge.types.Window`) of any streams, in
    their order; computed in one batch per sample rate, unit and length (not per stream);
    ``zones_for(window)`` gives a window's zone boundaries (default: group 2 rigid; asked once
    per stream). A window that cannot be measured (non-finite samples) is left out."""
    groups: dict[tuple[float, str, int], list[int]] = {}
    ok = [w for w in windows if np.isfinite(w.samples).all()]  # type: ignore[attr-defined]
    for i, w in enumerate(ok):
        groups.setdefault((float(w.sample_rate_hz), w.unit, int(w.samples.shape[-1])), []).append(i)  # type: ignore[attr-defined]
    zone_of: dict[tuple[str, str, str], Sequence[float]] = {}

    def zones(w: object) -> Sequence[float]:
        key = (w.site, w.machine, w.sensor)  # type: ignore[attr-defined]
        if key not in zone_of:
            zone_of[key] = zones_for(w) if callable(zones_for) else GROUP2_RIGID_MM_S
        return zone_of[key]

    out: list[Condition | None] = [None] * len(ok)
    for (fs, unit, _), idx in groups.items():
        ws = [ok[i] for i in idx]
        x = _batch(np.stack([w.samples for w in ws]))  # type: ignore[attr-defined]
        rows = _conditions([(w.site, w.machine, w.sensor) for w in ws], [w.start_ns for w in ws],  # type: ignore[attr-defined]
                           unit, _values(x, fs, unit), [zones(w) for w in ws])
        for i, c in zip(idx, rows):
            out[i] = c
    return [c for c in out if c is not None]
