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
from typing import Any

import numpy as np


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
    def fit(cls, x: np.ndarray, min_std: float = 1.0, one_sided: bool = False) -> Standardizer:
        """Fit on normal windows ``x`` of shape ``(N, C, F, T)``.

        Raises:
            ValueError: for fewer than 2 windows or non-finite values.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 4 or x.shape[0] < 2:
            raise ValueError(f"need at least 2 windows of shape (C, F, T), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or infinity")
        mean = x.mean(axis=(0, 3), keepdims=True)[0]
        std = np.sqrt(((x - mean[None]) ** 2).mean(axis=(0, 3), keepdims=True)[0])
        return cls(mean.astype(np.float32), np.maximum(std, min_std).astype(np.float32), one_sided)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``asinh(z)`` with ``z = (x - mean) / std`` (``max(z, 0)`` when one-sided):
        ``(N, C, F, T)`` -> same shape, float32."""
        z = (np.asarray(x, dtype=np.float32) - self.mean[None]) / self.std[None]
        if self.one_sided:
            z = np.maximum(z, 0.0)
        return np.arcsinh(z).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "one_sided": self.one_sided}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Standardizer:
        return cls(np.asarray(d["mean"], dtype=np.float32), np.asarray(d["std"], dtype=np.float32), bool(d.get("one_sided", False)))
