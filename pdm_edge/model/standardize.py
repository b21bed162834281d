"""Per-machine standardisation of the encoder's input features.

A machine's model version holds the mean and spread of every (channel, band) of the feature
image :func:`pdm_edge.features.encoder_input` over that machine's normal windows; the encoder
always sees ``(x - mean) / std``: how far each band is from *this machine's* normal, in units
of its normal variation. Pretraining uses the same transform with each simulated machine's (or
recording's) own healthy windows, so the encoder learns the shape of deviations rather than
absolute levels.

After the z-score the values are compressed with ``asinh`` (linear within about +-1, then
logarithmic): a failing bearing can sit 100 spreads above normal, and without compression such
windows would dominate every squared-error objective while carrying no more information than
"very far from normal".

For vibration the deviations are **one-sided** (``one_sided=True``: negative z-scores are set
to 0 before the compression): bearing defects, imbalance, misalignment and looseness all *add*
vibration energy in some band or in the envelope, while a machine that becomes quieter than its
calibration (run-in ending, a lighter load) is not failing. Without this, a machine calibrated
during run-in alarms for the rest of its life (FEMTO Bearing3_1 drops from 0.45 g to 0.32 g RMS
right after its first 10 % of life). Acoustic deviations stay two-sided: an anomalous valve or
fan can be quieter than normal.

Statistics are pooled over frames (a stationary machine has no preferred frame), so they have
shape ``(2, 64, 1)``. The spread has a floor (``min_std``, in the features' unit: dB for the
log-power channels) so a band that never varies (above the Nyquist frequency of a slow sensor,
say) maps to zero instead of amplifying round-off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

FIT_CHUNK = 256
"""Windows per chunk when fitting or transforming a sequence of windows."""


@dataclasses.dataclass(frozen=True, eq=False)
class Standardizer:
    """``asinh((x - mean) / std)`` per channel and band (negative deviations cut at 0 when
    ``one_sided``).

    Attributes:
        mean: ``(C, F, 1)`` float32, in the features' unit (dB).
        std: ``(C, F, 1)`` float32, >= ``min_std``.
    """

    mean: np.ndarray
    std: np.ndarray
    one_sided: bool = False

    @classmethod
    def fit(cls, x: np.ndarray | Sequence[np.ndarray], min_std: float = 1.0, one_sided: bool = False,
            chunk: int = FIT_CHUNK) -> Standardizer:
        """Fit on normal windows ``x``: an array ``(N, C, F, T)`` or a sequence of ``N`` arrays
        ``(C, F, T)`` (a scorer's collected windows, which are then never stacked whole).

        Mean and spread are accumulated in float64 over chunks of ``chunk`` windows (two
        passes: mean, then squared deviations from it), so fitting needs no float64 copy of
        the data; the result is the same as on the whole array up to float64 rounding.

        Raises:
            ValueError: for fewer than 2 windows, windows that are not ``(C, F, T)``, or
                non-finite values.
        """
        n = len(x)
        first = np.asarray(x[0]) if n else np.zeros(0)
        if n < 2 or first.ndim != 3:
            shape = (n, *first.shape) if n else (0,)
            raise ValueError(f"need at least 2 windows of shape (C, F, T), got {shape}")

        def chunks():  # type: ignore[no-untyped-def]
            for i in range(0, n, chunk):
                part = x[i:i + chunk]
                if not isinstance(part, np.ndarray) and any(np.shape(w) != first.shape for w in part):
                    raise ValueError(f"every window must have shape {first.shape}, got {[np.shape(w) for w in part]}"[:200])
                yield np.asarray(part if isinstance(part, np.ndarray) else np.stack(part), dtype=np.float32)

        total = np.zeros((first.shape[0], first.shape[1], 1))
        for c in chunks():
            if not np.isfinite(c).all():
                raise ValueError("features contain NaN or infinity")
            total += c.sum(axis=(0, 3), keepdims=True, dtype=np.float64)[0]
        count = n * first.shape[2]
        mean = total / count
        sq = np.zeros_like(total)
        for c in chunks():
            sq += ((c - mean[None]) ** 2).sum(axis=(0, 3), keepdims=True)[0]
        std = np.sqrt(sq / count)
        return cls(mean.astype(np.float32), np.maximum(std, min_std).astype(np.float32), one_sided)

    def transform(self, x: np.ndarray | Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """``asinh(z)`` with ``z = (x - mean) / std`` (``max(z, 0)`` when one-sided):
        ``(N, C, F, T)`` (or a sequence of ``N`` arrays ``(C, F, T)``) -> ``(N, C, F, T)``
        float32, computed in float32 in place (one output array, no temporaries of the data's
        size). ``out``: a float32 array of that shape to write into (returned)."""
        x = np.asarray(x if isinstance(x, np.ndarray) or not len(x) else np.stack(x), dtype=np.float32)
        if out is None:
            out = np.empty(x.shape, np.float32)
        np.subtract(x, self.mean[None], out=out)
        np.divide(out, self.std[None], out=out)
        if self.one_sided:
            np.maximum(out, 0.0, out=out)
        return np.arcsinh(out, out=out)

    def transform_many(self, x: Sequence[np.ndarray], chunk: int = FIT_CHUNK) -> np.ndarray:
        """:meth:`transform` of a sequence of ``N`` windows ``(C, F, T)`` into one float32 array
        ``(N, C, F, T)``, stacking ``chunk`` windows at a time (the collected windows are never
        copied whole)."""
        n = len(x)
        if not n:
            return np.zeros((0, *self.mean.shape[:2], 0), np.float32)
        out = np.empty((n, *np.asarray(x[0]).shape), np.float32)
        for i in range(0, n, chunk):
            part = x[i:i + chunk]
            self.transform(part, out=out[i:i + len(part)])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "one_sided": self.one_sided}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Standardizer:
        return cls(np.asarray(d["mean"], dtype=np.float32), np.asarray(d["std"], dtype=np.float32), bool(d.get("one_sided", False)))
