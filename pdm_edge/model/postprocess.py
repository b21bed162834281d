"""Post-processing of raw anomaly measures: score standardisation and the threshold.

As in anomalib, the threshold belongs to the model version, not to the code that scores: the
scorer saves :attr:`Scorer.component_stats` (per measure: held-out median and robust spread)
and :attr:`Scorer.threshold` with the version, and both come from here:

- :func:`robust_scale`: median and interquartile range / 1.349 of a measure's held-out values,
  the units a raw measure is standardised in before the measures are averaged into the score;
- :func:`exceedance_probability`: a target false-alert rate per hour under the k-of-n alert
  rule -> per-window exceedance probability ``p``;
- :func:`threshold_from_held_out`: the upper prediction bound of the held-out normal scores at
  ``p``, never below their maximum.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

__all__ = ["exceedance_probability", "robust_scale", "threshold_from_held_out"]


def robust_scale(x: np.ndarray) -> tuple[float, float]:
    """``(median, spread)`` of held-out values ``(M,)``: spread = interquartile range / 1.349
    (the standard deviation of a normal sample), floored so that it is never 0."""
    med = float(np.median(x))
    q75, q25 = np.percentile(x, [75, 25])
    return med, max(float(q75 - q25) / 1.349, 1e-6 * max(1.0, abs(med)), 1e-12)


def exceedance_probability(false_alerts_per_h: float, hop_s: float, k: int, n: int) -> float:
    """Per-window probability ``p`` of exceeding the threshold that gives ``false_alerts_per_h``
    under the k-of-n rule, assuming independent windows: ``W * C(n, k) * p**k = rate`` with
    ``W = 3600 / hop_s`` windows per hour; clipped to [1e-9, 0.5]."""
    w = 3600.0 / hop_s
    p = (false_alerts_per_h / (w * special.comb(n, k))) ** (1.0 / k)
    return float(min(0.5, max(1e-9, p)))


def threshold_from_held_out(scores: np.ndarray, p: float) -> float:
    """Upper prediction bound of one new normal score at exceedance probability ``p``, never
    below the largest held-out score.

    With ``M`` held-out scores of mean ``m`` and standard deviation ``s`` (normal model), a new
    score exceeds ``m + s * t_{M-1}(1 - p) * sqrt(1 + 1/M)`` with probability ``p`` (the
    prediction interval of a normal sample; Student's t accounts for the few scores a small
    calibration gives).

    Args:
        scores: ``(M,)`` scores of normal windows that the model was not fitted on, ``M >= 2``.
        p: target per-window exceedance probability (:func:`exceedance_probability`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = len(scores)
    mu, sigma = float(np.mean(scores)), float(np.std(scores, ddof=1))
    q = float(stats.t.isf(p, df=m - 1)) * float(np.sqrt(1.0 + 1.0 / m))
    return float(max(mu + sigma * q, np.max(scores)))
