"""Feature extraction: one fixed, documented transform from a batch of windows to the encoder input.

Every window, whatever its sample rate and length, becomes a float32 image of shape
:data:`INPUT_SHAPE` ``= (2, N_BANDS, N_FRAMES) = (2, 64, 32)`` (DESIGN.md section 3), plus a flat
vector of hand-crafted features for the classical baselines (DESIGN.md section 5). Everything is
numpy + ``scipy.signal``, vectorised over a batch of windows (``(B, N)`` arrays); there is no
per-window Python loop. The decisions, in the order the data meets them:

Input and units
    Windows are ``(B, N)`` (or ``(N,)``, a batch of one) arrays of samples in the stream's
    physical unit (:mod:`pdm_edge.types`): g (or m/s^2) for vibration, Pa (or FS, digital full
    scale) for acoustic. All powers below are in that unit squared (g^2, Pa^2, FS^2) and all
    logarithms are decibels **re 1 unit^2**: ``10 * log10(power + eps)`` with
    ``eps = 10 ** (floor_db / 10)``, so no value is ever below ``floor_db`` (default -120 dB:
    1e-12 g^2, i.e. 1 micro-g RMS, or 1 micro-Pa RMS -- far below any real sensor's noise in a
    band) and an all-zero window gives exactly ``floor_db`` everywhere, never ``-inf``. A stream
    in m/s^2 sits 19.8 dB above the same stream in g; the per-machine standardisation
    (:mod:`pdm_edge.model.standardize`) removes such constant offsets. Non-finite samples,
    empty windows, unknown sensor kinds and windows shorter than :data:`MIN_SAMPLES` after
    resampling raise :class:`FeatureError` (a ``ValueError``).

The sample-rate rule (any rate -> one fixed shape)
    Each kind has a canonical rate, :data:`CANONICAL_RATE_HZ` (vibration 25.6 kHz, the
    PRONOSTIA rate; acoustic 16 kHz, the MIMII / DCASE rate). A window sampled **above** the
    canonical rate of its kind is resampled **down** to it (:func:`resample`: anti-aliased
    polyphase filtering, ``scipy.signal.resample_poly``, with ``up/down`` the ratio
    ``fs_out/fs_in`` as a fraction of denominator <= 1000; the Kaiser (beta = 5) low-pass of
    ``resample_poly`` removes everything above the new Nyquist frequency). A window at or
    **below** the canonical rate is kept as it is (no up-sampling: it would invent nothing but
    a longer array). Whatever the rate ``fs`` the analysis runs at, every band whose centre
    frequency lies above ``0.45 * fs`` (in or near the anti-aliasing filter's transition band,
    or above the Nyquist frequency) is set to ``floor_db``; the per-machine standardisation
    later turns these constant bands into zeros. The rule is applied at every rate, the
    canonical ones included, so a natively sampled window and a resampled one are treated
    alike; at 16 kHz it floors the 2 highest acoustic bands (centres 7.28 and 7.63 kHz), at
    12 kHz the 12 highest vibration bands (centres above 5.4 kHz), at 25.6 kHz no vibration band.
    The *frequency* axis is therefore fixed in Hz for a kind; the *time* axis is fixed in
    frames: whatever the window length ``N`` (in samples after resampling), the STFT has
    exactly :data:`N_FRAMES` = 32 frames (rule below).

Mean removal
    The window mean is subtracted first (before resampling, so the resampler's zero-padded
    edges see no step). DC carries no vibration or sound information (for an accelerometer
    it is gravity and bias), and it would otherwise leak into the lowest bands. The
    time-domain statistics of :func:`handcrafted_features` are computed on this mean-removed,
    resampled window; :func:`rms` is the plain RMS of the samples as given.

Channel 0 -- band spectrogram (:func:`band_spectrogram`), ``(64, 32)``, dB re 1 unit^2
    STFT framing for any window length ``N >= 256``: ``hop = N // 32``;
    ``n_fft = max(256, 2 ** ceil(log2(2 * hop)))`` (frames overlap by at least 50 %);
    periodic Hann window of length ``n_fft`` (no zero-padding inside a frame); frame ``t``
    (``t = 0..31``) is centred on sample ``t * hop + hop // 2``, the middle of the ``t``-th
    of 32 equal segments, and the signal is extended by ``n_fft // 2`` samples of
    **reflection** (``numpy.pad(mode="reflect")``, as ``librosa``'s ``center=True``) at both
    ends, so edge frames see as much signal as inner ones and are not biased low by zeros.
    Every sample falls inside at least one frame (the ``N - 32 * hop < 32`` leftover samples at
    the end are inside the last frame). One-sided power per FFT bin is
    ``c_k |X_k|^2 / (n_fft * sum(w^2))`` (``c_k = 2`` except at DC and Nyquist), so that
    summed over all bins it equals the frame's mean square (Parseval); a sine of amplitude
    ``A`` contributes ``A^2 / 2``. The bin powers are summed through a 64-band triangular
    filterbank on the **mel scale of Slaney's Auditory Toolbox** (M. Slaney, "Auditory Toolbox,
    version 2", Interval Research Corporation Technical Report #1998-010, 1998: linear below
    1 kHz at 200/3 Hz per mel, logarithmic above with 27 mels per factor 6.4; the
    ``htk=False`` scale of librosa) between ``fmin_hz`` and ``fmax_hz``
    (:func:`mel_filterbank`). We take Slaney's *scale* but not his area normalisation:
    each triangle has a peak of 1 at its centre, so neighbouring triangles sum to one and a
    band's value is the signal **power in that band, in unit^2** (not a density). Acoustic:
    50 Hz - 8 kHz, the log-mel spectrogram. Vibration: the same filterbank over 10 Hz -
    10 kHz ("log band power on a frequency grid in Hz", DESIGN.md section 3: narrow bands at
    low frequencies where shaft harmonics live, wider ones up through the resonances).

Channel 1
    - vibration: the **log squared-envelope spectrum** (SES; R. B. Randall and J. Antoni,
      "Rolling element bearing diagnostics -- A tutorial", Mech. Syst. Signal Process. 25(2)
      (2011) 485-520), 64 linear frequency bins from 0 to ``envelope_fmax_hz`` (640 Hz holds
      BPFI and 2 x BPFI, BPFO up to 3 x BPFO of an SKF 6205 for shaft speeds up to 59 Hz), **tiled** along the 32
      frames. The envelope spectrum has no time axis: its frequency resolution (``fs/N``, 1 Hz
      for a 1 s window) needs the whole window, and cutting it into 32 frames would smear a
      100 Hz BPFO over 32 Hz-wide bins; tiling keeps the image shape and lets a convolution
      along frames see a constant. See :func:`envelope_spectrum` for the recipe.
    - acoustic: the **delta** (time derivative, ``numpy.gradient`` along frames, dB per frame)
      of channel 0: onsets, bursts and sweeps, the dynamics a log-mel image alone shows only
      implicitly.

The envelope band (vibration)
    Band-pass before demodulation, default ``(0.1 * fs_c, 0.4 * fs_c)`` with
    ``fs_c = min(fs, 25600)`` the rate after resampling (1.2-4.8 kHz at 12 kHz, 2.56-10.24 kHz
    at 25.6 kHz and above): wide enough to contain the structural resonances that bearing
    impacts excite (typically 1-10 kHz), above the shaft harmonics and below the anti-aliasing
    roll-off. A :class:`FeatureSpec` may fix another band (e.g. from a spectral-kurtosis study
    of the machine); ``None`` means this default for the rate of the window.

Hand-crafted features (:func:`handcrafted_features`), ``D = 132``, in this order
    ``[0:64]`` mean over frames of channel 0 (band log-power, dB);
    ``[64:128]`` vibration: the 64-bin log SES (dB) -- acoustic: the standard deviation over
    frames of channel 0 (dB); ``[128]`` log RMS, ``20 log10(RMS)`` dB re 1 unit;
    ``[129]`` kurtosis (Pearson: 3 for Gaussian noise; ``scipy.stats.kurtosis(fisher=False)``);
    ``[130]`` crest factor ``max|x| / RMS``; ``[131]`` log peak ``20 log10(max|x|)`` dB re 1 unit.
    For a constant window (zero variance) kurtosis and crest factor are undefined and set to 0,
    a value no real signal has (both are >= 1), so a dead sensor stands out.

Other decisions
    Computation is in float32 for the STFT (plenty for dB values) and float64 where it matters
    (means, filters, kurtosis); outputs are float32 except :func:`welch_psd` (float64).
    Results of a batch equal those of its windows one by one. The transform has a version,
    :data:`FEATURE_VERSION`, stored with :meth:`FeatureSpec.to_dict` in every model version;
    any change to this module that changes its output must bump it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import scipy.fft
import scipy.stats
from scipy import signal

from pdm_edge.errors import FeatureError
from pdm_edge.types import SENSOR_KINDS

__all__ = [
    "CANONICAL_RATE_HZ",
    "DEFAULT_FLOOR_DB",
    "FEATURE_VERSION",
    "FeatureError",
    "FeatureSpec",
    "HANDCRAFTED_DIM",
    "HANDCRAFTED_NAMES",
    "INPUT_SHAPE",
    "MIN_SAMPLES",
    "N_BANDS",
    "N_FRAMES",
    "band_centers_hz",
    "band_spectrogram",
    "canonical_rate",
    "encoder_input",
    "envelope_frequencies",
    "envelope_spectrum",
    "handcrafted_features",
    "hz_to_mel",
    "mel_filterbank",
    "mel_to_hz",
    "resample",
    "rms",
    "stft_params",
    "welch_psd",
]

FEATURE_VERSION = 1
"""Version of the transform; bump it whenever the output of this module changes."""

N_BANDS = 64
"""Frequency bands (rows) of the encoder input."""
N_FRAMES = 32
"""Time frames (columns) of the encoder input."""
INPUT_SHAPE: tuple[int, int, int] = (2, N_BANDS, N_FRAMES)
"""Shape of one window's encoder input: ``(channels, bands, frames)``."""

CANONICAL_RATE_HZ: Mapping[str, float] = {"vibration": 25600.0, "acoustic": 16000.0}
"""Rate (Hz) a window is resampled down to when sampled faster; slower windows are kept."""

MIN_SAMPLES = 256
"""Fewest samples a window may have after resampling (the smallest STFT frame, 8 per frame hop)."""

MIN_NFFT = 256
"""Smallest STFT frame length, samples."""

FEATURE_CHUNK = 16
"""Windows transformed at a time by :func:`encoder_input`: a batch of any size is cut into
chunks of this many, so its temporaries (STFT frames and spectra, band-passed and analytic
envelopes: about 2 MB per 1 s window at 25.6 kHz) stay bounded. The output does not depend on
it (the transform is batch-invariant)."""

DEFAULT_FLOOR_DB = -120.0
"""Default floor of every log value, dB re 1 unit^2 (see the module docstring)."""

DEFAULT_ENVELOPE_FMAX_HZ = 640.0
"""Default upper frequency of the envelope spectrum, Hz."""

_VIB_FMIN_HZ, _VIB_FMAX_HZ = 10.0, 10000.0
_AC_FMIN_HZ, _AC_FMAX_HZ = 50.0, 8000.0
_BAND_LIMIT = 0.45  # bands centred above _BAND_LIMIT * fs are set to the floor
_ENV_FILTER_ORDER = 4  # Butterworth order of the envelope band-pass (prototype order)
_ENV_OVERSAMPLE = 4  # fine spectrum at least this many points per SES bin before peak-hold

HANDCRAFTED_NAMES: dict[str, tuple[str, ...]] = {
    "vibration": tuple(f"band_db_{i}" for i in range(N_BANDS))
    + tuple(f"ses_db_{i}" for i in range(N_BANDS))
    + ("log_rms_db", "kurtosis", "crest_factor", "log_peak_db"),
    "acoustic": tuple(f"band_db_{i}" for i in range(N_BANDS))
    + tuple(f"band_std_db_{i}" for i in range(N_BANDS))
    + ("log_rms_db", "kurtosis", "crest_factor", "log_peak_db"),
}
"""Name of every column of :func:`handcrafted_features`, per kind."""
HANDCRAFTED_DIM = 2 * N_BANDS + 4
"""Length ``D`` of the hand-crafted feature vector (132)."""


# --------------------------------------------------------------------------------------------
# Validation helpers


def _check_kind(kind: str) -> str:
    if kind not in SENSOR_KINDS:
        raise FeatureError(f"unknown sensor kind {kind!r}; expected one of {SENSOR_KINDS}")
    return kind


def _check_rate(name: str, fs: float) -> float:
    try:
        value = float(fs)
    except (TypeError, ValueError):
        raise FeatureError(f"{name} must be a number (Hz), got {fs!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise FeatureError(f"{name} must be a positive finite sample rate in Hz, got {fs!r}")
    return value


def _as_batch(windows: Any, dtype: type = np.float32) -> np.ndarray:
    """``(N,)`` or ``(B, N)`` real samples -> finite ``(B, N)`` array of ``dtype``."""
    x = np.asarray(windows)
    if np.iscomplexobj(x):
        raise FeatureError("windows must be real-valued samples, got complex values")
    if x.dtype.kind not in "fiub":
        raise FeatureError(f"windows must be numeric samples, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[np.newaxis, :]
    elif x.ndim != 2:
        raise FeatureError(f"windows must have shape (N,) or (B, N), got shape {x.shape}")
    if x.shape[1] == 0:
        raise FeatureError("empty window: a window needs at least one sample")
    x = np.asarray(x, dtype=dtype)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise FeatureError(
            f"windows contain non-finite samples (NaN or infinity), first at window {bad[0]}, "
            f"sample {bad[1]}"
        )
    return x


def _db(power: np.ndarray, floor_db: float) -> np.ndarray:
    """``10 log10(power + 10**(floor_db/10))``, clipped at ``floor_db`` (round-off), dtype kept."""
    eps = power.dtype.type(10.0 ** (floor_db / 10.0))
    out = (10.0 * np.log10(power + eps)).astype(power.dtype, copy=False)
    return np.maximum(out, power.dtype.type(floor_db), out=out)


def _demean(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float64)
    return (x - mean).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Specification


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Parameters of the transform for one sensor stream; saved inside every model version.

    Attributes:
        kind: ``"vibration"`` or ``"acoustic"``.
        fmin_hz: lower edge of the band filterbank, Hz, ``>= 0``.
        fmax_hz: upper edge of the band filterbank, Hz, ``> fmin_hz``. Bands centred above
            ``0.45 * fs`` of a window are set to ``floor_db``.
        envelope_band_hz: ``(low, high)`` band-pass before envelope demodulation, Hz
            (vibration), or ``None`` for ``(0.1 * fs_c, 0.4 * fs_c)`` with ``fs_c`` the rate
            after resampling. Ignored for acoustic streams.
        envelope_fmax_hz: upper frequency of the 64-bin squared-envelope spectrum, Hz.
        floor_db: floor of every log value, dB re 1 unit^2 (``eps = 10**(floor_db/10)``).

    Raises:
        FeatureError (ValueError): for an unknown kind or a value out of range.
    """

    kind: Literal["vibration", "acoustic"]
    fmin_hz: float
    fmax_hz: float
    envelope_band_hz: tuple[float, float] | None = None
    envelope_fmax_hz: float = DEFAULT_ENVELOPE_FMAX_HZ
    floor_db: float = DEFAULT_FLOOR_DB

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        for name in ("fmin_hz", "fmax_hz", "envelope_fmax_hz", "floor_db"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise FeatureError(f"FeatureSpec.{name} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise FeatureError(f"FeatureSpec.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.fmin_hz < self.fmax_hz:
            raise FeatureError(
                f"FeatureSpec needs 0 <= fmin_hz < fmax_hz, got fmin_hz={self.fmin_hz}, "
                f"fmax_hz={self.fmax_hz}"
            )
        if self.envelope_fmax_hz <= 0.0:
            raise FeatureError(f"FeatureSpec.envelope_fmax_hz must be > 0, got {self.envelope_fmax_hz}")
        band = self.envelope_band_hz
        if band is not None:
            try:
                lo, hi = (float(v) for v in band)
            except (TypeError, ValueError):
                raise FeatureError(
                    f"FeatureSpec.envelope_band_hz must be (low_hz, high_hz) or None, got {band!r}"
                ) from None
            if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi):
                raise FeatureError(
                    f"FeatureSpec.envelope_band_hz needs 0 < low < high (Hz), got {band!r}"
                )
            object.__setattr__(self, "envelope_band_hz", (lo, hi))

    @classmethod
    def default(cls, kind: str, sample_rate_hz: float) -> FeatureSpec:
        """The project's default spec for a stream of ``kind`` sampled at ``sample_rate_hz`` (Hz).

        Vibration: bands 10 Hz - 10 kHz, envelope band ``(0.1 * fs_c, 0.4 * fs_c)`` with
        ``fs_c = min(sample_rate_hz, 25600)`` (12 kHz -> 1.2-4.8 kHz; 25.6 kHz and above ->
        2.56-10.24 kHz), envelope spectrum 0-640 Hz. Acoustic: bands 50 Hz - 8 kHz.
        ``floor_db`` = -120 dB re 1 unit^2 for both.

        Raises:
            FeatureError (ValueError): for an unknown kind or a non-positive rate.
        """
        _check_kind(kind)
        fs_c = canonical_rate(kind, sample_rate_hz)
        if kind == "vibration":
            return cls(kind="vibration", fmin_hz=_VIB_FMIN_HZ, fmax_hz=_VIB_FMAX_HZ,
                       envelope_band_hz=_default_envelope_band(fs_c))
        return cls(kind="acoustic", fmin_hz=_AC_FMIN_HZ, fmax_hz=_AC_FMAX_HZ)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict, with ``feature_version``, ``n_bands`` and ``n_frames``."""
        return {
            "feature_version": FEATURE_VERSION,
            "n_bands": N_BANDS,
            "n_frames": N_FRAMES,
            "kind": self.kind,
            "fmin_hz": self.fmin_hz,
            "fmax_hz": self.fmax_hz,
            "envelope_band_hz": None if self.envelope_band_hz is None else list(self.envelope_band_hz),
            "envelope_fmax_hz": self.envelope_fmax_hz,
            "floor_db": self.floor_db,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            FeatureError (ValueError): for unknown or missing keys, or a ``feature_version``,
                ``n_bands`` or ``n_frames`` different from this module's (a model version made
                with another transform cannot be used with this one).
        """
        if not isinstance(data, Mapping):
            raise FeatureError(f"FeatureSpec.from_dict needs a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        meta = {"feature_version": FEATURE_VERSION, "n_bands": N_BANDS, "n_frames": N_FRAMES}
        unknown = set(data) - fields - set(meta)
        if unknown:
            raise FeatureError(f"FeatureSpec.from_dict: unknown keys {sorted(unknown)}")
        for key, expected in meta.items():
            if key in data and data[key] != expected:
                raise FeatureError(
                    f"FeatureSpec.from_dict: {key} is {data[key]!r}, this pdm-edge computes "
                    f"{key} {expected}"
                )
        missing = {"kind", "fmin_hz", "fmax_hz"} - set(data)
        if missing:
            raise FeatureError(f"FeatureSpec.from_dict: missing keys {sorted(missing)}")
        kwargs = {k: data[k] for k in fields if k in data}
        if kwargs.get("envelope_band_hz") is not None:
            kwargs["envelope_band_hz"] = tuple(kwargs["envelope_band_hz"])
        return cls(**kwargs)


def _default_envelope_band(fs_c: float) -> tuple[float, float]:
    return (0.1 * fs_c, 0.4 * fs_c)


def canonical_rate(kind: str, fs: float) -> float:
    """The rate (Hz) a window of ``kind`` sampled at ``fs`` Hz is analysed at.

    ``fs`` itself if ``fs <= CANONICAL_RATE_HZ[kind]``, else the canonical rate (25600 Hz
    vibration, 16000 Hz acoustic).

    Raises:
        FeatureError (ValueError): for an unknown kind or a non-positive / non-finite rate.
    """
    _check_kind(kind)
    fs = _check_rate("fs", fs)
    return fs if fs <= CANONICAL_RATE_HZ[kind] else CANONICAL_RATE_HZ[kind]


# --------------------------------------------------------------------------------------------
# Resampling


def _ratio(fs_in: float, fs_out: float) -> tuple[int, int]:
    frac = Fraction(fs_out / fs_in).limit_denominator(1000)
    if frac.numerator == 0:
        raise FeatureError(f"cannot resample from {fs_in} Hz to {fs_out} Hz: ratio too small")
    return frac.numerator, frac.denominator


def _resampled_length(n: int, up: int, down: int) -> int:
    return -(-n * up // down)  # ceil, as scipy.signal.resample_poly


def resample(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Anti-aliased polyphase resampling along the last axis.

    ``scipy.signal.resample_poly`` with ``up/down = Fraction(fs_out / fs_in)
    .limit_denominator(1000)`` (its default Kaiser-windowed FIR, beta = 5, cutoff at the lower
    of the two Nyquist frequencies, zero padding beyond the ends). Exact for the usual rates
    (48 k -> 25.6 k is 8/15, 48 k -> 16 k is 1/3, 44.1 k -> 16 k is 160/441); otherwise the
    actual output rate is ``fs_in * up / down``, the nearest fraction of denominator <= 1000
    (absolute error of the ratio below 1e-3), and it is treated as ``fs_out``. A ratio that
    rounds to 1 (e.g. 25601 -> 25600 Hz) returns a copy of the input.

    Args:
        x: shape ``(..., N)`` (typically ``(B, N)``), real samples in any unit.
        fs_in, fs_out: input and output rates, Hz, ``> 0``.

    Returns:
        shape ``(..., ceil(N * up / down))``, ``float32``, same unit (a copy when
        ``fs_in == fs_out``).

    Raises:
        FeatureError (ValueError): for non-positive rates or an empty / non-numeric array.
    """
    fs_in = _check_rate("fs_in", fs_in)
    fs_out = _check_rate("fs_out", fs_out)
    arr = np.asarray(x)
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise FeatureError("resample needs a non-empty array of samples")
    if arr.dtype.kind not in "fiub":
        raise FeatureError(f"resample needs real numeric samples, got dtype {arr.dtype}")
    up, down = _ratio(fs_in, fs_out)
    if up == down:
        return np.array(arr, dtype=np.float32)
    y = signal.resample_poly(np.asarray(arr, dtype=np.float32), up, down, axis=-1)
    return np.ascontiguousarray(y, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Mel scale and filterbank (Slaney 1998)

_F_SP = 200.0 / 3.0  # Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(f_hz: np.ndarray | float) -> np.ndarray:
    """Hz -> mel on Slaney's Auditory Toolbox scale (linear below 1 kHz, log above); float64."""
    f = np.asarray(f_hz, dtype=np.float64)
    lin = f / _F_SP
    with np.errstate(divide="ignore", invalid="ignore"):
        log = _MIN_LOG_MEL + np.log(np.maximum(f, 1e-300) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """Mel (Slaney scale) -> Hz, inverse of :func:`hz_to_mel`; float64."""
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


def _mel_points(n_bands: int, fmin: float, fmax: float) -> np.ndarray:
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_bands + 2))


def band_centers_hz(fmin_hz: float, fmax_hz: float, n_bands: int = N_BANDS) -> np.ndarray:
    """Centre frequencies (Hz) of the ``n_bands`` mel bands between ``fmin_hz`` and ``fmax_hz``.

    Returns:
        shape ``(n_bands,)``, float64, increasing: ``n_bands + 2`` points equally spaced in mel
        (Slaney scale) from ``fmin_hz`` to ``fmax_hz``, without the two ends.
    """
    return _mel_points(int(n_bands), float(fmin_hz), float(fmax_hz))[1:-1]


def _check_filterbank_args(fs: float, n_fft: int, n_bands: int, fmin: float, fmax: float) -> None:
    _check_rate("fs", fs)
    if isinstance(n_fft, bool) or not isinstance(n_fft, (int, np.integer)) or n_fft < 2:
        raise FeatureError(f"n_fft must be an integer >= 2, got {n_fft!r}")
    if isinstance(n_bands, bool) or not isinstance(n_bands, (int, np.integer)) or n_bands < 1:
        raise FeatureError(f"n_bands must be an integer >= 1, got {n_bands!r}")
    if not (math.isfinite(fmin) and math.isfinite(fmax) and 0.0 <= fmin < fmax):
        raise FeatureError(f"need 0 <= fmin < fmax (Hz), got fmin={fmin}, fmax={fmax}")


@functools.lru_cache(maxsize=64)
def _filterbank_cached(fs: float, n_fft: int, n_bands: int, fmin: float, fmax: float) -> np.ndarray:
    pts = _mel_points(n_bands, fmin, fmax)
    lower, centre, upper = pts[:-2], pts[1:-1], pts[2:]
    df = fs / n_fft
    # At least one FFT bin of half-width on each side, so every band covers a bin.
    left = np.maximum(centre - lower, df)[:, None]
    right = np.maximum(upper - centre, df)[:, None]
    freqs = np.arange(n_fft // 2 + 1, dtype=np.float64) * df
    d = freqs[None, :] - centre[:, None]
    weights = np.maximum(0.0, np.minimum(1.0 + d / left, 1.0 - d / right))
    weights[:, 0] = 0.0  # DC carries no vibration or sound information
    weights.flags.writeable = False
    return weights


def mel_filterbank(fs: float, n_fft: int, n_bands: int = N_BANDS, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular filters on Slaney's mel scale (Auditory Toolbox, 1998), unit peak, on rfft bins.

    Band ``b`` rises linearly (in Hz) from the mel point ``b`` to its centre ``b + 1`` and
    falls to point ``b + 2``, the ``n_bands + 2`` points being equally spaced in mel between
    ``fmin`` and ``fmax``. Unlike the Auditory Toolbox (and librosa's ``norm="slaney"``) the
    triangles are **not** area-normalised: peak 1, so overlapping triangles sum to one and a
    filter's output is a power (unit^2), not a density. Where a triangle's side would be
    narrower than one FFT bin (``fs / n_fft``, short frames at low frequencies), it is widened
    to one bin, so every band still covers at least one bin with weight >= 0.5 (neighbouring
    low bands then share bins: they interpolate the coarse spectrum). The DC bin has weight 0.
    Bands above ``fs / 2`` cover no bin and are all-zero rows.

    Args:
        fs: sample rate, Hz.
        n_fft: FFT length (samples); the filters act on the ``n_fft // 2 + 1`` rfft bins.
        n_bands: number of bands.
        fmin, fmax: band edges, Hz (``fmax`` default ``fs / 2``).

    Returns:
        shape ``(n_bands, n_fft // 2 + 1)``, float64, values in ``[0, 1]``.

    Raises:
        FeatureError (ValueError): for invalid arguments.
    """
    fmax = float(fs) / 2.0 if fmax is None else float(fmax)
    _check_filterbank_args(fs, n_fft, n_bands, float(fmin), fmax)
    return _filterbank_cached(float(fs), int(n_fft), int(n_bands), float(fmin), fmax).copy()


@functools.lru_cache(maxsize=64)
def _filterbank_f32_t(fs: float, n_fft: int, fmin: float, fmax: float) -> np.ndarray:
    w = np.ascontiguousarray(_filterbank_cached(fs, n_fft, N_BANDS, fmin, fmax).T, dtype=np.float32)
    w.flags.writeable = False
    return w


@functools.lru_cache(maxsize=32)
def _hann(n: int, dtype: type = np.float32) -> np.ndarray:
    """The periodic Hann window of length ``n`` in ``dtype``, computed once per length (read-only)."""
    w = signal.get_window("hann", n, fftbins=True).astype(dtype)
    w.flags.writeable = False
    return w


# --------------------------------------------------------------------------------------------
# Band spectrogram (channel 0)


def stft_params(n_samples: int) -> tuple[int, int]:
    """``(hop, n_fft)`` of the STFT of a window of ``n_samples`` samples (after resampling).

    ``hop = n_samples // 32``; ``n_fft = max(256, next power of two >= 2 * hop)``.

    Raises:
        FeatureError (ValueError): if ``n_samples < MIN_SAMPLES`` (256).
    """
    n = int(n_samples)
    if n < MIN_SAMPLES:
        raise FeatureError(f"window too short: {n} samples, at least {MIN_SAMPLES} are needed")
    hop = n // N_FRAMES
    n_fft = max(MIN_NFFT, 1 << (2 * hop - 1).bit_length())
    return hop, n_fft


def _band_power_db(x: np.ndarray, fs: float, spec: FeatureSpec) -> np.ndarray:
    """Channel 0 for validated, mean-removed float32 ``x`` of shape (B, N) -> (B, 64, 32)."""
    b, n = x.shape
    hop, n_fft = stft_params(n)
    half = n_fft // 2
    padded = np.pad(x, ((0, 0), (half, half)), mode="reflect")
    # frame t covers padded[start_t : start_t + n_fft], centred on sample t*hop + hop//2
    starts = np.arange(N_FRAMES) * hop + hop // 2
    idx = starts[:, None] + np.arange(n_fft)[None, :]
    frames = padded[:, idx]  # (B, 32, n_fft)
    win = _hann(n_fft)
    frames *= win
    spec_c = scipy.fft.rfft(frames, axis=-1)
    power = spec_c.real ** 2 + spec_c.imag ** 2  # (B, 32, F), float32
    scale = np.float32(2.0 / (n_fft * float(np.sum(win.astype(np.float64) ** 2))))
    power *= scale
    power[..., 0] *= 0.5
    if n_fft % 2 == 0:
        power[..., -1] *= 0.5
    fb_t = _filterbank_f32_t(float(fs), n_fft, spec.fmin_hz, spec.fmax_hz)  # (F, 64)
    bands = np.matmul(power, fb_t)  # (B, 32, 64)
    out = _db(np.ascontiguousarray(bands.transpose(0, 2, 1)), spec.floor_db)  # (B, 64, 32)
    dead = band_centers_hz(spec.fmin_hz, spec.fmax_hz) > _BAND_LIMIT * fs
    if dead.any():
        out[:, dead, :] = np.float32(spec.floor_db)
    return out


def band_spectrogram(x: np.ndarray, fs: float, spec: FeatureSpec) -> np.ndarray:
    """Log band-power spectrogram (channel 0 of the encoder input), at the rate given.

    STFT of ``N // 32`` hop, ``max(256, 2**ceil(log2(2 * hop)))`` samples per periodic-Hann
    frame, 32 frames centred on the 32 equal segments of the window with reflection padding
    at the ends, one-sided power (Parseval-normalised, unit^2 per bin) summed through
    :func:`mel_filterbank` (Slaney 1998 mel scale, unit-peak triangles) between
    ``spec.fmin_hz`` and ``spec.fmax_hz``; ``10 log10(power + eps)``. The window mean is
    removed first; bands centred above ``0.45 * fs`` are set to ``spec.floor_db``. No
    resampling is done here (see :func:`encoder_input`). For acoustic specs this is the
    log-mel spectrogram.

    Args:
        x: shape ``(B, N)`` or ``(N,)``, samples in the stream's unit (g, m/s^2, Pa, FS),
            ``N >= 256``.
        fs: sample rate of ``x``, Hz.
        spec: the :class:`FeatureSpec` (band edges and floor).

    Returns:
        shape ``(B, 64, 32)`` (bands low to high, frames in time order), float32, dB re
        1 unit^2 (power in the band), ``>= spec.floor_db``.

    Raises:
        FeatureError (ValueError): for non-finite, empty or too short (< 256 samples) windows
            or a non-positive rate.
    """
    fs = _check_rate("fs", fs)
    xb = _as_batch(x)
    stft_params(xb.shape[1])
    return _band_power_db(_demean(xb), fs, spec)


# --------------------------------------------------------------------------------------------
# Welch PSD


def welch_psd(x: np.ndarray, fs: float, nperseg: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Power spectral density by Welch's method (P. D. Welch, IEEE Trans. Audio Electroacoust.
    AU-15(2) (1967) 70-73), via ``scipy.signal.welch``.

    Periodic Hann segments with 50 % overlap, constant (mean) detrending per segment, one-sided
    density, mean of the segment periodograms. Default ``nperseg``: the largest power of two
    ``<= N / 4`` (about 7 averaged segments), but at least 256 and at most ``N``.
    ``trapezoid(psd, freqs)`` is the signal's variance: a sine of amplitude ``A`` integrates
    to ``A^2 / 2``.

    Args:
        x: shape ``(B, N)`` or ``(N,)``, samples in the stream's unit.
        fs: sample rate, Hz.
        nperseg: segment length, samples (``1 <= nperseg``; capped at ``N``).

    Returns:
        ``(freqs_hz, psd)``: ``freqs_hz`` shape ``(F,)`` float64 in Hz, ``F = nperseg // 2 + 1``;
        ``psd`` shape ``(B, F)`` float64 in unit^2/Hz (g^2/Hz, Pa^2/Hz, FS^2/Hz).

    Raises:
        FeatureError (ValueError): for non-finite or empty windows, a non-positive rate or an
            invalid ``nperseg``.
    """
    fs = _check_rate("fs", fs)
    xb = _as_batch(x, dtype=np.float64)
    n = xb.shape[1]
    if nperseg is None:
        nperseg = min(n, max(MIN_NFFT, 1 << max(0, (n // 4).bit_length() - 1)))
    elif isinstance(nperseg, bool) or not isinstance(nperseg, (int, np.integer)) or nperseg < 1:
        raise FeatureError(f"nperseg must be a positive integer, got {nperseg!r}")
    nperseg = int(min(nperseg, n))
    freqs, psd = signal.welch(xb, fs=fs, window="hann", nperseg=nperseg, noverlap=nperseg // 2,
                              detrend="constant", return_onesided=True, scaling="density",
                              axis=-1, average="mean")
    return freqs, psd


# --------------------------------------------------------------------------------------------
# Squared envelope spectrum (channel 1 for vibration)


def envelope_frequencies(fmax_hz: float = DEFAULT_ENVELOPE_FMAX_HZ, n_bins: int = N_BANDS) -> np.ndarray:
    """Centre frequencies (Hz) of the envelope-spectrum bins: ``linspace(0, fmax_hz, n_bins)``."""
    return np.linspace(0.0, float(fmax_hz), int(n_bins))


@functools.lru_cache(maxsize=32)
def _envelope_sos(fs: float, lo: float, hi: float) -> np.ndarray:
    return signal.butter(_ENV_FILTER_ORDER, [lo, hi], btype="bandpass", output="sos", fs=fs)


@functools.lru_cache(maxsize=32)
def _pool_plan(fs: float, n_fft: int, fmax: float, n_bins: int) -> tuple[int, np.ndarray]:
    """(number of fine bins used, start index of each output bin's group) for peak-hold pooling."""
    step = fmax / (n_bins - 1)
    fine = np.arange(n_fft // 2 + 1) * (fs / n_fft)
    last = int(np.searchsorted(fine, fmax + step / 2.0, side="left"))  # fine bins [0, last)
    edges = (np.arange(n_bins) - 0.5) * step
    edges[0] = 0.0
    starts = np.searchsorted(fine[:last], edges, side="left")
    if np.any(np.diff(starts) <= 0) or starts[-1] >= last:
        raise AssertionError("envelope pooling plan has an empty bin")  # guarded by oversampling
    starts.flags.writeable = False
    return last, starts


def _envelope_spectrum(x: np.ndarray, fs: float, band: tuple[float, float], fmax: float,
                       n_bins: int) -> np.ndarray:
    """SES (linear, unit^2) for validated, mean-removed float32 (B, N) -> (B, n_bins) float64."""
    n = x.shape[1]
    sos = _envelope_sos(fs, band[0], band[1])
    xb = signal.sosfiltfilt(sos, x, axis=-1)
    analytic = signal.hilbert(xb, axis=-1)
    sq = analytic.real ** 2 + analytic.imag ** 2  # squared envelope, unit^2
    sq -= sq.mean(axis=-1, keepdims=True)
    win = _hann(n, np.float64)
    step = fmax / (n_bins - 1)
    n_fft = scipy.fft.next_fast_len(max(n, math.ceil(_ENV_OVERSAMPLE * fs / step)), real=True)
    amp = np.abs(scipy.fft.rfft(sq * win, n=n_fft, axis=-1)) * (2.0 / win.sum())
    last, starts = _pool_plan(fs, n_fft, fmax, n_bins)
    return np.maximum.reduceat(amp[:, :last], starts, axis=-1)


def _check_envelope_args(fs: float, band_hz: Any, fmax_hz: float, n_bins: int) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in band_hz)
    except (TypeError, ValueError):
        raise FeatureError(f"band_hz must be (low_hz, high_hz), got {band_hz!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi < fs / 2.0):
        raise FeatureError(
            f"envelope band {band_hz!r} Hz must satisfy 0 < low < high < fs/2 = {fs / 2.0} Hz"
        )
    if not (math.isfinite(fmax_hz) and 0.0 < fmax_hz < fs / 2.0):
        raise FeatureError(f"envelope fmax_hz must be in (0, fs/2 = {fs / 2.0}) Hz, got {fmax_hz}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
        raise FeatureError(f"n_bins must be an integer >= 2, got {n_bins!r}")
    return lo, hi


def envelope_spectrum(x: np.ndarray, fs: float, band_hz: tuple[float, float],
                      fmax_hz: float = DEFAULT_ENVELOPE_FMAX_HZ, n_bins: int = N_BANDS, *,
                      log: bool = False, floor_db: float = DEFAULT_FLOOR_DB
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Squared envelope spectrum (SES), after R. B. Randall and J. Antoni, "Rolling element
    bearing diagnostics -- A tutorial", MSSP 25(2) (2011) 485-520.

    Recipe: remove the window mean; band-pass to ``band_hz`` (Butterworth, order 4 prototype,
    second-order sections, zero-phase ``scipy.signal.sosfiltfilt``); Hilbert envelope
    (``|scipy.signal.hilbert(x)|``); square it and remove its mean; periodic-Hann window;
    amplitude spectrum ``|rfft| * 2 / sum(w)`` (zero-padded to at least 4 points per output
    bin); **peak-hold** onto ``n_bins`` linear bins centred on ``linspace(0, fmax_hz,
    n_bins)`` (each bin the maximum of the fine spectrum within +- half a bin spacing).
    Normalisation: a component ``a cos(2 pi f0 t)`` of the squared envelope shows as a peak of
    height ``a`` (unit^2) in the bin nearest ``f0``, so an impulse train at ``f0`` exciting a
    resonance inside the band peaks at ``f0`` (and its harmonics), whatever the window
    length; peak-hold keeps a narrow line at full height when the fine resolution ``fs / N``
    is finer than the bin spacing.

    Args:
        x: shape ``(B, N)`` or ``(N,)``, vibration samples (g or m/s^2) at ``fs``.
        fs: sample rate, Hz.
        band_hz: ``(low, high)`` demodulation band, Hz, ``0 < low < high < fs / 2``.
        fmax_hz: centre of the last bin, Hz, ``< fs / 2`` (default 640 Hz).
        n_bins: number of bins, ``>= 2`` (default 64).
        log: return ``10 log10(ses + 10**(floor_db/10))``, dB re 1 unit^2, as in the encoder
            input, instead of the linear SES.
        floor_db: floor of the log variant, dB.

    Returns:
        ``(freqs_hz, ses)``: ``freqs_hz`` shape ``(n_bins,)`` float64, Hz; ``ses`` shape
        ``(B, n_bins)`` float32, unit^2 (g^2), or dB re 1 unit^2 with ``log=True``.

    Raises:
        FeatureError (ValueError): for non-finite, empty or too short (< 256 samples) windows,
            a non-positive rate, or a band / ``fmax_hz`` outside ``(0, fs / 2)``.
    """
    fs = _check_rate("fs", fs)
    lo, hi = _check_envelope_args(fs, band_hz, float(fmax_hz), n_bins)
    xb = _as_batch(x)
    if xb.shape[1] < MIN_SAMPLES:
        raise FeatureError(f"window too short: {xb.shape[1]} samples, at least {MIN_SAMPLES} are needed")
    ses = _envelope_spectrum(_demean(xb), fs, (lo, hi), float(fmax_hz), int(n_bins)).astype(np.float32)
    if log:
        ses = _db(ses, floor_db)
    return envelope_frequencies(fmax_hz, n_bins), ses


# --------------------------------------------------------------------------------------------
# Encoder input and hand-crafted features


def _prepare(windows: Any, fs: float, kind: str, spec: FeatureSpec | None
             ) -> tuple[np.ndarray, float, FeatureSpec]:
    """Validate, remove the mean, resample per the rule -> (x (B, N') float32, rate, spec)."""
    _check_kind(kind)
    fs = _check_rate("fs", fs)
    if spec is None:
        spec = FeatureSpec.default(kind, fs)
    elif not isinstance(spec, FeatureSpec):
        raise FeatureError(f"spec must be a FeatureSpec or None, got {type(spec).__name__}")
    elif spec.kind != kind:
        raise FeatureError(f"spec is for {spec.kind!r} streams, the windows are {kind!r}")
    x = _as_batch(windows)
    fs_out = canonical_rate(kind, fs)
    n = x.shape[1]
    if fs_out != fs:
        up, down = _ratio(fs, fs_out)
        n_out = _resampled_length(n, up, down)
    else:
        up = down = 1
        n_out = n
    if n_out < MIN_SAMPLES:
        raise FeatureError(
            f"window too short: {n} samples at {fs:g} Hz give {n_out} samples at the analysis "
            f"rate {fs_out:g} Hz, at least {MIN_SAMPLES} are needed "
            f"({MIN_SAMPLES / fs_out * 1e3:.1f} ms)"
        )
    x = _demean(x)
    if up != down:
        x = np.ascontiguousarray(signal.resample_poly(x, up, down, axis=-1), dtype=np.float32)
    return x, fs_out, spec


def _ses_db(x: np.ndarray, fs: float, spec: FeatureSpec) -> np.ndarray:
    band = spec.envelope_band_hz or _default_envelope_band(fs)
    lo, hi = _check_envelope_args(fs, band, spec.envelope_fmax_hz, N_BANDS)
    ses = _envelope_spectrum(x, fs, (lo, hi), spec.envelope_fmax_hz, N_BANDS)
    return _db(ses.astype(np.float32), spec.floor_db)


def encoder_input(windows: np.ndarray, fs: float, kind: str, spec: FeatureSpec | None = None) -> np.ndarray:
    """The encoder's input image of a batch of windows (see the module docstring for every rule).

    Steps: validate; remove each window's mean; resample down to :data:`CANONICAL_RATE_HZ`
    if ``fs`` is above it (:func:`resample`); channel 0 = :func:`band_spectrogram` (dB);
    channel 1 = for vibration the log squared-envelope spectrum (:func:`envelope_spectrum`,
    Randall & Antoni 2011; 64 linear bins 0 - ``spec.envelope_fmax_hz``) tiled along the 32
    frames, for acoustic the delta of channel 0 along frames (``numpy.gradient``, dB/frame).

    Args:
        windows: shape ``(B, N)`` or ``(N,)`` (a batch of one), samples in the stream's unit
            (g or m/s^2 for vibration, Pa or FS for acoustic), all at the same rate.
        fs: sample rate of the windows, Hz.
        kind: ``"vibration"`` or ``"acoustic"``.
        spec: the stream's :class:`FeatureSpec` (default :meth:`FeatureSpec.default`).

    Returns:
        shape ``(B, 2, 64, 32)`` = ``(B, *INPUT_SHAPE)``, float32; channel 0 in dB re 1 unit^2,
        channel 1 in dB re 1 unit^2 (vibration) or dB per frame (acoustic).

    Raises:
        FeatureError (ValueError): for an unknown kind, a spec of another kind, a non-positive
            rate, non-finite samples, empty windows, or windows shorter than 256 samples after
            resampling (10 ms at 25.6 kHz, 16 ms at 16 kHz).
    """
    x, fs_a, spec = _prepare(windows, fs, kind, spec)
    b = x.shape[0]
    out = np.empty((b, *INPUT_SHAPE), dtype=np.float32)
    for lo in range(0, b, FEATURE_CHUNK):  # bounded temporaries (frames, spectra, envelopes)
        xc = x[lo:lo + FEATURE_CHUNK]
        ch0 = _band_power_db(xc, fs_a, spec)
        out[lo:lo + len(xc), 0] = ch0
        if kind == "vibration":
            out[lo:lo + len(xc), 1] = _ses_db(xc, fs_a, spec)[:, :, None]
        else:
            out[lo:lo + len(xc), 1] = np.gradient(ch0, axis=-1)
    return out


def handcrafted_features(windows: np.ndarray, fs: float, kind: str,
                         spec: FeatureSpec | None = None) -> np.ndarray:
    """Flat feature vector for the classical baselines and the "hand-crafted features" ablation.

    Same validation, mean removal and resampling as :func:`encoder_input`. Columns
    (:data:`HANDCRAFTED_NAMES`), ``D = 132``:

    - ``[0:64]``: mean over the 32 frames of channel 0 (band log-power, dB re 1 unit^2);
    - ``[64:128]``: vibration: the 64-bin log squared-envelope spectrum (dB re 1 unit^2,
      Randall & Antoni 2011); acoustic: the standard deviation over frames of channel 0 (dB);
    - ``[128]``: log RMS, ``20 log10(RMS + eps)`` dB re 1 unit (g, Pa, FS);
    - ``[129]``: kurtosis, Pearson (3 for Gaussian noise), ``scipy.stats.kurtosis(fisher=False)``;
    - ``[130]``: crest factor, ``max|x| / RMS`` (dimensionless);
    - ``[131]``: log peak, ``20 log10(max|x| + eps)`` dB re 1 unit.

    Time-domain statistics use the mean-removed, resampled window; for a constant window
    kurtosis and crest factor are 0.

    Returns:
        shape ``(B, 132)``, float32.

    Raises:
        FeatureError (ValueError): as :func:`encoder_input`.
    """
    x, fs_a, spec = _prepare(windows, fs, kind, spec)
    ch0 = _band_power_db(x, fs_a, spec)
    second = _ses_db(x, fs_a, spec) if kind == "vibration" else ch0.std(axis=-1)
    x64 = x.astype(np.float64)
    ms = np.mean(x64 * x64, axis=-1)
    r = np.sqrt(ms)
    peak = np.max(np.abs(x64), axis=-1)
    eps = 10.0 ** (spec.floor_db / 10.0)
    alive = ms > 0.0
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        kurt = scipy.stats.kurtosis(x64, axis=-1, fisher=False, bias=True)
        crest = peak / r
    kurt = np.where(alive & np.isfinite(kurt), kurt, 0.0)
    crest = np.where(alive, crest, 0.0)
    stats = np.stack([10.0 * np.log10(ms + eps), kurt, crest, 10.0 * np.log10(peak * peak + eps)], axis=-1)
    return np.concatenate([ch0.mean(axis=-1), second, stats.astype(np.float32)], axis=-1).astype(np.float32)


def rms(windows: np.ndarray) -> np.ndarray:
    """Root mean square of each window, ``sqrt(mean(x^2))``, of the samples as given (no mean
    removal, no resampling; as the ``ingest`` command prints it).

    Args:
        windows: shape ``(B, N)`` or ``(N,)``, samples in the stream's unit.

    Returns:
        shape ``(B,)``, float64, in the stream's unit (g, m/s^2, Pa, FS).

    Raises:
        FeatureError (ValueError): for non-finite or empty windows.
    """
    x = _as_batch(windows, dtype=np.float64)
    return np.sqrt(np.mean(x * x, axis=-1))
