"""Synthetic vibration and acoustic sensor signals with seeded faults, streamed in chunks.

Two simulators stand in for real sensors during development, demos and tests:

- :class:`VibrationSimulator`: a radial accelerometer on a bearing housing, in g (or m/s^2).
- :class:`AcousticSimulator`: a microphone near a fan or pump, sound pressure in Pa.

Both produce the signal sample by sample from a global sample index, so that **a stream is the
same whichever way it is cut into chunks**: ``generate(a)`` followed by ``generate(b)`` returns
bit for bit what ``generate(a + b)`` would. Tonal components are computed from the absolute
sample time (phase continuity), linear filters carry their state between calls
(``scipy.signal.lfilter`` with ``zi``), random numbers come from dedicated
``numpy.random.Generator`` streams consumed in sample order, and fault impacts are generated
sequentially in fixed-size blocks that do not depend on the chunk size. A given ``seed`` gives
the same signal on every run.

Vibration model
---------------
Following P. D. McFadden and J. D. Smith, "Model for the vibration produced by a single point
defect in a rolling element bearing", J. Sound Vib. 96(1) (1984) 69-82, and R. B. Randall and
J. Antoni, "Rolling element bearing diagnostics—A tutorial", Mech. Syst. Signal Process. 25(2)
(2011) 485-520, the accelerometer signal is the sum of

1. shaft harmonics ``A_k sin(2 pi k fr t + phi_k)`` (imbalance / misalignment lines at
   1x, 2x, 3x ... shaft speed ``fr``; random fixed phases ``phi_k`` from the seed);
2. a structural resonance (a single-degree-of-freedom mode at ``resonance_hz`` with damping
   ratio ``damping_ratio``, realised as the impulse-invariant 2nd-order resonator
   ``h[n] = r^n sin(n theta)`` and run with ``scipy.signal.lfilter``), excited by
   - weak broadband (white Gaussian) forcing, so that a healthy spectrum already shows a
     resonance bump of RMS ``resonance_noise_g``; and
   - with a fault, a train of impacts at the defect's impact rate: BPFO (outer race),
     BPFI (inner race) or 2 x BSF (ball; a spall strikes both races once per spin revolution).
     The resonator is normalised so that one impact of amplitude ``A`` rings with a peak of
     ``A`` g. Inter-impact periods fluctuate randomly by ``slip`` (a fraction, typically
     0.01-0.02) around their nominal value, which models rolling-element slip; the impacts
     are placed on the nearest sample.
     Amplitude modulation follows the load zone (McFadden & Smith 1984): an outer-race defect
     on the stationary race sits at a fixed place in the load zone (constant amplitude); an
     inner-race defect passes through the load zone once per shaft revolution
     (amplitude modulated at ``fr``); a ball defect is carried through it by the cage
     (amplitude modulated at FTF). The load distribution is Stribeck's
     ``q(psi) = (1 - (1 - cos psi) / (2 epsilon))^(3/2)`` for ball bearings with
     ``epsilon = 0.5`` (zero clearance; load zone of +-90 degrees).
3. Gaussian measurement noise of RMS ``noise_g``.

The fault's impact amplitude follows :meth:`FaultSpec.severity_at`: zero before ``onset_s``,
then a linear ramp over ``growth_s`` to ``severity`` (a step if ``growth_s == 0``).

Acoustic model
--------------
Blade-pass tones (``blade_count * rotation_hz`` and its harmonics, amplitudes ``tonal_pa`` in Pa)
over broadband machine noise (white Gaussian noise low-passed by a 1st-order Butterworth filter
at ``noise_corner_hz``, scaled to RMS ``noise_pa``). Faults (:class:`AcousticFaultSpec`):

- ``"bursts"``: cavitation-like intermittent broadband bursts — a Poisson process of rate
  ``burst_rate_hz``; each burst is high-pass filtered (above 1.5 kHz) white noise under an
  exponentially decaying envelope of time constant ``burst_decay_s``, with a random amplitude
  between 0.5 and 1 times the current severity;
- ``"tone"``: a tone of amplitude ``severity`` Pa (ramped like the vibration fault) whose
  frequency rises from ``tone_hz`` by ``tone_sweep_hz`` over ``growth_s`` (a developing whine).

Parameters are validated on construction; invalid values raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from scipy import signal

from pdm_edge.bearing import SKF_6205, BearingGeometry, DefectFrequencies
from pdm_edge.types import STANDARD_GRAVITY_M_S2

__all__ = [
    "AcousticFaultSpec",
    "AcousticSimulator",
    "FaultSpec",
    "LOAD_ZONE_EPSILON",
    "VibrationSimulator",
]

FaultKind = Literal["outer", "inner", "ball"]
FAULT_KINDS: tuple[str, ...] = ("outer", "inner", "ball")
AcousticFaultKind = Literal["bursts", "tone"]
ACOUSTIC_FAULT_KINDS: tuple[str, ...] = ("bursts", "tone")

LOAD_ZONE_EPSILON = 0.5
"""Load-distribution factor epsilon of Stribeck's law (0.5 = zero clearance, load zone +-90 deg)."""
LOAD_ZONE_EXPONENT = 1.5
"""Load-deflection exponent of Stribeck's law for ball bearings (10/9 for roller bearings)."""

_EVENT_BLOCK = 512  # events generated per block; fixed so the sequence is chunk-independent


def _check_number(name: str, value: float, *, minimum: float | None = None,
                  positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _ramp(t_s: np.ndarray | float, onset_s: float, growth_s: float) -> np.ndarray:
    """Growth fraction in [0, 1]: 0 before onset, linear over ``growth_s``, then 1."""
    t = np.asarray(t_s, dtype=np.float64)
    if growth_s == 0.0:
        return (t >= onset_s).astype(np.float64)
    return np.clip((t - onset_s) / growth_s, 0.0, 1.0)


def _scalar_or_array(value: np.ndarray, like: object) -> float | np.ndarray:
    return float(value) if np.ndim(like) == 0 else value


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    """A localised bearing defect seeded into :class:`VibrationSimulator`.

    Attributes:
        kind: ``"outer"`` (outer race, impacts at BPFO), ``"inner"`` (inner race, impacts at
            BPFI, amplitude-modulated at shaft speed by the load zone) or ``"ball"`` (rolling
            element, impacts at 2 x BSF, amplitude-modulated at FTF).
        onset_s: time of the defect's appearance, seconds from the start of the stream, ``>= 0``.
        severity: impact amplitude in g at full growth (peak of one impact's ringing at the
            resonance, inside the load zone), ``>= 0``.
        growth_s: duration of the linear ramp from 0 at ``onset_s`` to ``severity``, seconds,
            ``>= 0``; 0 = a step at the onset.
        slip: standard deviation of the random fluctuation of the inter-impact period, as a
            fraction of the nominal period, ``0 <= slip <= 0.1`` (rolling-element slip; 1-2 %
            is typical per Randall & Antoni 2011).

    Raises:
        ValueError: for an unknown kind or a value out of range.
    """

    kind: FaultKind = "outer"
    onset_s: float = 0.0
    severity: float = 1.0
    growth_s: float = 0.0
    slip: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "onset_s", _check_number("onset_s", self.onset_s, minimum=0.0))
        object.__setattr__(self, "severity", _check_number("severity", self.severity, minimum=0.0))
        object.__setattr__(self, "growth_s", _check_number("growth_s", self.growth_s, minimum=0.0))
        slip = _check_number("slip", self.slip, minimum=0.0)
        if slip > 0.1:
            raise ValueError(f"slip must be <= 0.1 (a fraction of the period), got {slip}")
        object.__setattr__(self, "slip", slip)

    def severity_at(self, t_s: float | np.ndarray) -> float | np.ndarray:
        """Impact amplitude in g at time(s) ``t_s`` (seconds from the stream's start).

        0 before ``onset_s``, ``severity * (t - onset_s) / growth_s`` during growth,
        ``severity`` afterwards. Accepts a scalar (returns ``float``) or an array (returns a
        ``float64`` array of the same shape).
        """
        return _scalar_or_array(self.severity * _ramp(t_s, self.onset_s, self.growth_s), t_s)


@dataclasses.dataclass(frozen=True)
class AcousticFaultSpec:
    """A fault seeded into :class:`AcousticSimulator`.

    Attributes:
        kind: ``"bursts"`` (cavitation-like intermittent broadband bursts) or ``"tone"``
            (a developing tonal whine).
        onset_s: time the fault appears, seconds from the start of the stream, ``>= 0``.
        severity: at full growth, for ``"bursts"`` the RMS sound pressure in Pa at the start
            of a burst (each burst draws a random factor in [0.5, 1]); for ``"tone"`` the
            tone's amplitude in Pa. ``>= 0``.
        growth_s: linear ramp from 0 to ``severity`` after the onset, seconds; 0 = a step.
        burst_rate_hz: mean number of bursts per second (Poisson process), ``> 0``.
        burst_decay_s: time constant of a burst's exponential decay, seconds, ``> 0``.
        tone_hz: frequency of the tone at the onset, Hz, ``> 0``.
        tone_sweep_hz: rise of the tone frequency, Hz, reached at full growth (0 = steady).

    Raises:
        ValueError: for an unknown kind or a value out of range.
    """

    kind: AcousticFaultKind = "bursts"
    onset_s: float = 0.0
    severity: float = 0.2
    growth_s: float = 0.0
    burst_rate_hz: float = 20.0
    burst_decay_s: float = 0.004
    tone_hz: float = 2400.0
    tone_sweep_hz: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ACOUSTIC_FAULT_KINDS:
            raise ValueError(
                f"acoustic fault kind must be one of {ACOUSTIC_FAULT_KINDS}, got {self.kind!r}"
            )
        for name in ("onset_s", "severity", "growth_s", "tone_sweep_hz"):
            object.__setattr__(self, name, _check_number(name, getattr(self, name), minimum=0.0))
        for name in ("burst_rate_hz", "burst_decay_s", "tone_hz"):
            object.__setattr__(self, name, _check_number(name, getattr(self, name), positive=True))

    def severity_at(self, t_s: float | np.ndarray) -> float | np.ndarray:
        """Fault amplitude in Pa at time(s) ``t_s``: 0 before onset, linear ramp, then ``severity``."""
        return _scalar_or_array(self.severity * _ramp(t_s, self.onset_s, self.growth_s), t_s)

    def tone_phase_rad(self, t_s: np.ndarray) -> np.ndarray:
        """Phase in rad of the ``"tone"`` fault at times ``t_s`` (s): ``2 pi * integral of f(t)``.

        ``f(t) = tone_hz + tone_sweep_hz * ramp(t)``; the integral is evaluated in closed form,
        so the phase is continuous and independent of how the stream is chunked.
        """
        t = np.asarray(t_s, dtype=np.float64)
        g = self.growth_s
        rel = np.maximum(t - self.onset_s, 0.0)
        if g == 0.0:
            integral = rel
        else:
            integral = np.where(rel < g, rel * rel / (2.0 * g), g / 2.0 + (rel - g))
        return 2.0 * np.pi * (self.tone_hz * t + self.tone_sweep_hz * integral)


class _EventTrain:
    """Sequential event times (float sample positions), generated in fixed-size blocks.

    Block ``k`` always holds the same events whatever chunk sizes the caller uses, so the event
    sequence depends on the seed only. ``draw(rng, size)`` returns ``(intervals, gains)`` with
    intervals in samples (each >= 2, so no two events round to the same sample).
    """

    def __init__(self, rng: np.random.Generator, first_pos: float, first_gain: float,
                 draw: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]) -> None:
        self._rng = rng
        self._draw = draw
        self._last = float(first_pos)
        self._pos = np.array([first_pos], dtype=np.float64)
        self._gain = np.array([first_gain], dtype=np.float64)

    def take(self, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Events whose nearest sample is ``< end``: (sample index int64, position, gain)."""
        while self._pos.size == 0 or math.floor(self._pos[-1] + 0.5) < end:
            intervals, gains = self._draw(self._rng, _EVENT_BLOCK)
            new = self._last + np.cumsum(intervals)
            self._last = float(new[-1])
            self._pos = np.concatenate([self._pos, new])
            self._gain = np.concatenate([self._gain, gains])
        idx = np.floor(self._pos + 0.5).astype(np.int64)
        k = int(np.searchsorted(idx, end, side="left"))
        out = idx[:k], self._pos[:k], self._gain[:k]
        self._pos, self._gain = self._pos[k:], self._gain[k:]
        return out


def _power_gain(b: np.ndarray, a: np.ndarray, n: int) -> float:
    """Sum of squares of the first ``n`` samples of the filter's impulse response."""
    impulse = np.zeros(n)
    impulse[0] = 1.0
    h = signal.lfilter(b, a, impulse)
    return float(np.sum(h * h))


class _StreamClock:
    """What both simulators share: the sample counter and the fault's severity over time."""

    sample_rate_hz: float
    fault: FaultSpec | AcousticFaultSpec | None
    _n: int

    @property
    def n_generated(self) -> int:
        """Number of samples generated so far."""
        return self._n

    @property
    def t_s(self) -> float:
        """Time in seconds of the next sample to be generated (= seconds generated so far)."""
        return self._n / self.sample_rate_hz

    def severity_at(self, t_s: float | np.ndarray) -> float | np.ndarray:
        """Fault amplitude at time(s) ``t_s`` (s): impact amplitude in g for vibration, Pa for
        acoustic; 0 everywhere without a fault."""
        if self.fault is None:
            return _scalar_or_array(np.zeros(np.shape(t_s)), t_s)
        return self.fault.severity_at(t_s)


class VibrationSimulator(_StreamClock):
    """Synthetic bearing-housing accelerometer: shaft harmonics, a resonance, noise, a bearing fault.

    See the module docstring for the model (McFadden & Smith 1984; Randall & Antoni 2011).

    Args:
        sample_rate_hz: sample rate in Hz (default 25.6 kHz, as PRONOSTIA).
        shaft_hz: shaft speed in Hz (rpm / 60), ``> 0``.
        bearing: geometry used for the defect frequencies (default the SKF 6205 of CWRU).
        resonance_hz: natural frequency of the structural resonance excited by impacts, Hz,
            below the Nyquist frequency.
        damping_ratio: damping ratio of that resonance, ``0 < damping_ratio < 1``.
        harmonics: amplitudes in g of the 1x, 2x, 3x ... shaft-speed sinusoids (each ``>= 0``,
            all below the Nyquist frequency).
        noise_g: RMS of the white Gaussian measurement noise, g.
        resonance_noise_g: RMS of the resonance's response to weak broadband forcing, g
            (the resonance bump of a healthy machine).
        fault: the seeded defect, or ``None`` for a healthy bearing.
        seed: seed of all random streams (phases, noise, slip); same seed = same signal.
        unit: output unit, ``"g"`` or ``"m/s2"``; amplitudes are always given in g.

    Attributes:
        defect_frequencies: BPFO, BPFI, BSF and FTF in Hz of ``bearing`` at ``shaft_hz``.
        kind: ``"vibration"``.

    The constructor arguments are kept as attributes of the same names.

    Raises:
        ValueError: for parameters out of range (see each argument), e.g. a resonance at or
            above the Nyquist frequency, or an impact rate too high for the sample rate.
    """

    kind = "vibration"

    def __init__(
        self,
        sample_rate_hz: float = 25600.0,
        shaft_hz: float = 25.0,
        bearing: BearingGeometry = SKF_6205,
        resonance_hz: float = 3000.0,
        damping_ratio: float = 0.05,
        harmonics: Sequence[float] = (0.05, 0.02, 0.01),
        noise_g: float = 0.02,
        resonance_noise_g: float = 0.01,
        fault: FaultSpec | None = None,
        seed: int = 0,
        unit: Literal["g", "m/s2"] = "g",
    ) -> None:
        self.sample_rate_hz = fs = _check_number("sample_rate_hz", sample_rate_hz, positive=True)
        self.shaft_hz = _check_number("shaft_hz", shaft_hz, positive=True)
        if not isinstance(bearing, BearingGeometry):
            raise ValueError(f"bearing must be a BearingGeometry, got {type(bearing).__name__}")
        self.bearing = bearing
        self.resonance_hz = _check_number("resonance_hz", resonance_hz, positive=True)
        if self.resonance_hz >= fs / 2.0:
            raise ValueError(
                f"resonance_hz ({self.resonance_hz} Hz) must be below the Nyquist frequency "
                f"({fs / 2.0} Hz)"
            )
        self.damping_ratio = _check_number("damping_ratio", damping_ratio, positive=True)
        if self.damping_ratio >= 1.0:
            raise ValueError(f"damping_ratio must be < 1 (underdamped), got {self.damping_ratio}")
        self.harmonics = tuple(
            _check_number(f"harmonics[{k}]", a, minimum=0.0) for k, a in enumerate(harmonics)
        )
        if self.harmonics and len(self.harmonics) * self.shaft_hz >= fs / 2.0:
            raise ValueError("the highest shaft harmonic must be below the Nyquist frequency")
        self.noise_g = _check_number("noise_g", noise_g, minimum=0.0)
        self.resonance_noise_g = _check_number("resonance_noise_g", resonance_noise_g, minimum=0.0)
        if fault is not None and not isinstance(fault, FaultSpec):
            raise ValueError(f"fault must be a FaultSpec or None, got {type(fault).__name__}")
        self.fault = fault
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        if unit not in ("g", "m/s2"):
            raise ValueError(f"unit must be 'g' or 'm/s2', got {unit!r}")
        self.unit = unit
        self._out_scale = 1.0 if unit == "g" else STANDARD_GRAVITY_M_S2

        self.defect_frequencies: DefectFrequencies = bearing.defect_frequencies(self.shaft_hz)

        phase_ss, res_ss, meas_ss, event_ss = np.random.SeedSequence(self.seed).spawn(4)
        self._phases = np.random.default_rng(phase_ss).uniform(0.0, 2.0 * np.pi, len(self.harmonics))
        self._res_rng = np.random.default_rng(res_ss)
        self._meas_rng = np.random.default_rng(meas_ss)

        # Impulse-invariant single-degree-of-freedom resonator, h[n] = r^n sin(n*theta) / peak.
        wn = 2.0 * np.pi * self.resonance_hz
        r = math.exp(-self.damping_ratio * wn / fs)
        theta = wn * math.sqrt(1.0 - self.damping_ratio**2) / fs
        self._a = np.array([1.0, -2.0 * r * math.cos(theta), r * r])
        b = np.array([0.0, r * math.sin(theta)])
        n_ir = int(math.ceil(math.log(1e-9) / math.log(r))) + 2
        impulse = np.zeros(n_ir)
        impulse[0] = 1.0
        peak = float(np.max(np.abs(signal.lfilter(b, self._a, impulse))))
        self._b = b / peak
        gain = _power_gain(self._b, self._a, n_ir)
        self._res_in_sigma = self.resonance_noise_g / math.sqrt(gain)
        self._zi = np.zeros(2)

        self._n = 0
        self._train: _EventTrain | None = None
        if fault is not None:
            rate = self.impact_rate_hz
            period = fs / rate  # samples
            if period < 4.0:
                raise ValueError(f"impact rate {rate:.1f} Hz is too high for {fs} Hz sampling")
            slip = fault.slip

            def draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
                jitter = np.clip(rng.standard_normal(size), -3.0, 3.0)
                return period * (1.0 + slip * jitter), np.ones(size)

            event_rng = np.random.default_rng(event_ss)
            self._train = _EventTrain(event_rng, event_rng.uniform(0.0, period), 1.0, draw)

    @property
    def impact_rate_hz(self) -> float | None:
        """Nominal impact rate of the seeded fault in Hz (BPFO, BPFI or 2 x BSF), ``None`` if healthy."""
        if self.fault is None:
            return None
        f = self.defect_frequencies
        return {"outer": f.bpfo_hz, "inner": f.bpfi_hz, "ball": 2.0 * f.bsf_hz}[self.fault.kind]

    def _load_zone(self, t_s: np.ndarray) -> np.ndarray:
        """Amplitude modulation of the impacts by the load zone (Stribeck), in [0, 1]."""
        assert self.fault is not None
        if self.fault.kind == "outer":
            return np.ones_like(t_s)
        f = self.shaft_hz if self.fault.kind == "inner" else self.defect_frequencies.ftf_hz
        psi = 2.0 * np.pi * f * t_s
        base = 1.0 - (1.0 - np.cos(psi)) / (2.0 * LOAD_ZONE_EPSILON)
        return np.maximum(base, 0.0) ** LOAD_ZONE_EXPONENT

    def generate(self, n_samples: int) -> np.ndarray:
        """Generate the next ``n_samples`` samples of the stream.

        Returns:
            shape ``(n_samples,)``, ``float32``, in ``self.unit`` (g by default). Consecutive
            calls continue the same signal without discontinuity.

        Raises:
            ValueError: if ``n_samples`` is not a non-negative integer.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
            raise ValueError(f"n_samples must be a non-negative integer, got {n_samples!r}")
        n = int(n_samples)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        fs = self.sample_rate_hz
        k0 = self._n
        t = np.arange(k0, k0 + n, dtype=np.float64) / fs

        forcing = self._res_in_sigma * self._res_rng.standard_normal(n)
        if self._train is not None:
            idx, pos, gain = self._train.take(k0 + n)
            t_imp = pos / fs
            amp = gain * np.asarray(self.severity_at(t_imp)) * self._load_zone(t_imp)
            np.add.at(forcing, idx - k0, amp)
        y, self._zi = signal.lfilter(self._b, self._a, forcing, zi=self._zi)

        for k, (a_k, phi_k) in enumerate(zip(self.harmonics, self._phases), start=1):
            if a_k:
                y += a_k * np.sin(2.0 * np.pi * (k * self.shaft_hz) * t + phi_k)
        y += self.noise_g * self._meas_rng.standard_normal(n)
        self._n = k0 + n
        if self._out_scale != 1.0:
            y *= self._out_scale
        return y.astype(np.float32)

    def params(self) -> dict[str, object]:
        """The constructor arguments as a JSON-serialisable dict (for recording metadata)."""
        return {
            "sample_rate_hz": self.sample_rate_hz,
            "shaft_hz": self.shaft_hz,
            "bearing": self.bearing.as_dict(),
            "resonance_hz": self.resonance_hz,
            "damping_ratio": self.damping_ratio,
            "harmonics": list(self.harmonics),
            "noise_g": self.noise_g,
            "resonance_noise_g": self.resonance_noise_g,
            "fault": None if self.fault is None else dataclasses.asdict(self.fault),
            "seed": self.seed,
            "unit": self.unit,
        }


class AcousticSimulator(_StreamClock):
    """Synthetic microphone near a fan or pump: blade-pass tones, broadband noise, a fault.

    See the module docstring for the model.

    Args:
        sample_rate_hz: sample rate in Hz (default 16 kHz, as MIMII / DCASE).
        rotation_hz: rotor speed in Hz, ``> 0``.
        blade_count: number of blades (or impeller vanes); blade-pass frequency
            ``BPF = blade_count * rotation_hz``.
        tonal_pa: amplitudes in Pa of the tones at 1x, 2x, 3x ... BPF (each ``>= 0``, all below
            the Nyquist frequency).
        noise_pa: RMS of the broadband machine noise, Pa.
        noise_corner_hz: corner frequency of the 1st-order low-pass that shapes that noise, Hz.
        fault: the seeded fault, or ``None``.
        seed: seed of all random streams; same seed = same signal.

    Raises:
        ValueError: for parameters out of range.
    """

    kind = "acoustic"
    unit = "Pa"
    BURST_HIGHPASS_HZ = 1500.0
    """Lower edge of the bursts' broadband content, Hz (2nd-order Butterworth high-pass)."""

    def __init__(
        self,
        sample_rate_hz: float = 16000.0,
        rotation_hz: float = 25.0,
        blade_count: int = 6,
        tonal_pa: Sequence[float] = (0.05, 0.02, 0.01),
        noise_pa: float = 0.02,
        noise_corner_hz: float = 1000.0,
        fault: AcousticFaultSpec | None = None,
        seed: int = 0,
    ) -> None:
        self.sample_rate_hz = fs = _check_number("sample_rate_hz", sample_rate_hz, positive=True)
        self.rotation_hz = _check_number("rotation_hz", rotation_hz, positive=True)
        if isinstance(blade_count, bool) or not isinstance(blade_count, (int, np.integer)) or blade_count < 1:
            raise ValueError(f"blade_count must be an integer >= 1, got {blade_count!r}")
        self.blade_count = int(blade_count)
        self.tonal_pa = tuple(_check_number(f"tonal_pa[{k}]", a, minimum=0.0) for k, a in enumerate(tonal_pa))
        if self.tonal_pa and len(self.tonal_pa) * self.blade_pass_hz >= fs / 2.0:
            raise ValueError("the highest blade-pass harmonic must be below the Nyquist frequency")
        self.noise_pa = _check_number("noise_pa", noise_pa, minimum=0.0)
        self.noise_corner_hz = _check_number("noise_corner_hz", noise_corner_hz, positive=True)
        if self.noise_corner_hz >= fs / 2.0:
            raise ValueError("noise_corner_hz must be below the Nyquist frequency")
        if fault is not None and not isinstance(fault, AcousticFaultSpec):
            raise ValueError(f"fault must be an AcousticFaultSpec or None, got {type(fault).__name__}")
        if fault is not None and fault.kind == "tone" and fault.tone_hz + fault.tone_sweep_hz >= fs / 2.0:
            raise ValueError("the fault tone must stay below the Nyquist frequency")
        if fault is not None and fault.kind == "bursts" and fs / fault.burst_rate_hz < 4.0:
            raise ValueError("burst_rate_hz is too high for the sample rate")
        self.fault = fault
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)

        phase_ss, noise_ss, carrier_ss, event_ss = np.random.SeedSequence(self.seed).spawn(4)
        self._phases = np.random.default_rng(phase_ss).uniform(0.0, 2.0 * np.pi, len(self.tonal_pa))
        self._noise_rng = np.random.default_rng(noise_ss)
        self._carrier_rng = np.random.default_rng(carrier_ss)

        self._noise_b, self._noise_a = signal.butter(1, self.noise_corner_hz, "lowpass", fs=fs)
        self._noise_scale = self.noise_pa / math.sqrt(_power_gain(self._noise_b, self._noise_a, 8192))
        self._noise_zi = np.zeros(max(len(self._noise_a), len(self._noise_b)) - 1)

        self._n = 0
        self._train: _EventTrain | None = None
        if fault is not None and fault.kind == "bursts":
            hp = min(self.BURST_HIGHPASS_HZ, 0.25 * fs)
            self._hp_b, self._hp_a = signal.butter(2, hp, "highpass", fs=fs)
            self._hp_scale = 1.0 / math.sqrt(_power_gain(self._hp_b, self._hp_a, 8192))
            self._hp_zi = np.zeros(2)
            self._env_a = np.array([1.0, -math.exp(-1.0 / (fault.burst_decay_s * fs))])
            self._env_zi = np.zeros(1)
            mean_interval = fs / fault.burst_rate_hz

            def draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
                intervals = np.maximum(rng.exponential(mean_interval, size), 2.0)
                return intervals, rng.uniform(0.5, 1.0, size)

            event_rng = np.random.default_rng(event_ss)
            first = event_rng.exponential(mean_interval)
            self._train = _EventTrain(event_rng, first, event_rng.uniform(0.5, 1.0), draw)

    @property
    def blade_pass_hz(self) -> float:
        """Blade-pass frequency ``blade_count * rotation_hz`` in Hz."""
        return self.blade_count * self.rotation_hz

    def generate(self, n_samples: int) -> np.ndarray:
        """Generate the next ``n_samples`` samples of sound pressure.

        Returns:
            shape ``(n_samples,)``, ``float32``, in Pa. Consecutive calls continue the same
            signal without discontinuity.

        Raises:
            ValueError: if ``n_samples`` is not a non-negative integer.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
            raise ValueError(f"n_samples must be a non-negative integer, got {n_samples!r}")
        n = int(n_samples)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        fs = self.sample_rate_hz
        k0 = self._n
        t = np.arange(k0, k0 + n, dtype=np.float64) / fs

        white = self._noise_rng.standard_normal(n)
        y, self._noise_zi = signal.lfilter(self._noise_b, self._noise_a, white, zi=self._noise_zi)
        y *= self._noise_scale
        for k, (a_k, phi_k) in enumerate(zip(self.tonal_pa, self._phases), start=1):
            if a_k:
                y += a_k * np.sin(2.0 * np.pi * (k * self.blade_pass_hz) * t + phi_k)

        fault = self.fault
        if fault is not None and fault.kind == "bursts":
            assert self._train is not None
            idx, pos, gain = self._train.take(k0 + n)
            kicks = np.zeros(n)
            np.add.at(kicks, idx - k0, gain * np.asarray(fault.severity_at(pos / fs)))
            env, self._env_zi = signal.lfilter([1.0], self._env_a, kicks, zi=self._env_zi)
            carrier, self._hp_zi = signal.lfilter(
                self._hp_b, self._hp_a, self._carrier_rng.standard_normal(n), zi=self._hp_zi
            )
            y += env * (self._hp_scale * carrier)
        elif fault is not None and fault.kind == "tone":
            y += np.asarray(fault.severity_at(t)) * np.sin(fault.tone_phase_rad(t))
        self._n = k0 + n
        return y.astype(np.float32)

    def params(self) -> dict[str, object]:
        """The constructor arguments as a JSON-serialisable dict (for recording metadata)."""
        return {
            "sample_rate_hz": self.sample_rate_hz,
            "rotation_hz": self.rotation_hz,
            "blade_count": self.blade_count,
            "tonal_pa": list(self.tonal_pa),
            "noise_pa": self.noise_pa,
            "noise_corner_hz": self.noise_corner_hz,
            "fault": None if self.fault is None else dataclasses.asdict(self.fault),
            "seed": self.seed,
        }
