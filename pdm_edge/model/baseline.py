"""The machine's normal baseline in an embedding space: mean and Ledoit-Wolf precision.

A :class:`Baseline` is fitted on the embeddings ``(N, D)`` of a machine's normal windows (the
adapter's pooled embedding, or the spectral summary of :func:`pdm_edge.model.scorer.spectral_summary`)
and answers the Mahalanobis distance of new embeddings to it. :func:`crossfit_distances` gives
every calibration window a held-out distance (K-fold cross-fitting in time order), from which
:mod:`pdm_edge.model.postprocess` sets the threshold.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from scipy import linalg

__all__ = ["CROSSFIT_FOLDS", "Baseline", "crossfit_distances", "ledoit_wolf"]

CROSSFIT_FOLDS = 5


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and Ledoit-Wolf shrunk covariance ``(D, D)`` of samples ``x`` ``(N, D)``.

    The shrinkage towards ``mu * I`` (``mu`` the mean variance) is the one of O. Ledoit and
    M. Wolf, "A well-conditioned estimator for large-dimensional covariance matrices", Journal
    of Multivariate Analysis 88(2) (2004) 365-411, computed as scikit-learn's ``LedoitWolf``
    does (a test checks they agree). It is written out here so that the running appliance does
    not import scikit-learn (about 85 MB of resident memory) for these few lines.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / n
    if d == 1:
        return mean, cov
    x2 = xc * xc
    var = x2.sum(axis=0) / n
    mu = var.sum() / d
    delta_ = float(np.sum((xc.T @ xc) ** 2)) / n**2
    beta_ = float(np.sum(x2.T @ x2))
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * var.sum() + d * mu**2) / d
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    shrunk = (1.0 - shrinkage) * cov
    shrunk.flat[:: d + 1] += shrinkage * mu
    return mean, shrunk


@dataclasses.dataclass
class Baseline:
    """Normal embeddings' mean and Ledoit-Wolf precision (inverse covariance)."""

    mean: np.ndarray  # (D,) float64 holding float32-representable values
    precision: np.ndarray  # (D, D) float64 holding float32-representable values

    @classmethod
    def fit(cls, emb: np.ndarray) -> Baseline:
        """Fit on embeddings ``(N, D)``, ``N >= 2`` (:func:`ledoit_wolf`)."""
        mean, cov = ledoit_wolf(np.asarray(emb, dtype=np.float64))
        precision = linalg.pinvh(cov, check_finite=False)
        precision = 0.5 * (precision + precision.T)  # exactly symmetric: a version stores one triangle
        # rounded to float32 so that a model version stores them in half the bytes and a
        # reloaded scorer computes exactly what the live one does
        return cls(mean.astype(np.float32).astype(np.float64), precision.astype(np.float32).astype(np.float64))

    def to_state(self) -> dict[str, torch.Tensor]:
        """What a model version stores: the mean ``(D,)`` and the precision's upper triangle
        (row by row, ``D (D + 1) / 2`` values), float32: exactly what :meth:`fit` computed,
        in about half the bytes of the full matrix."""
        d = len(self.mean)
        return {"mean": torch.from_numpy(self.mean.astype(np.float32)),
                "precision_triu": torch.from_numpy(self.precision[np.triu_indices(d)].astype(np.float32))}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Baseline:
        """The baseline of :meth:`to_state` (or of a version file written before it, which
        stored the full ``precision`` matrix)."""
        mean = state["mean"].numpy().astype(np.float64)
        if "precision" in state:
            return cls(mean, state["precision"].numpy().astype(np.float64))
        d = len(mean)
        precision = np.zeros((d, d))
        precision[np.triu_indices(d)] = state["precision_triu"].numpy()
        return cls(mean, precision + np.triu(precision, 1).T)

    def distance(self, emb: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of embeddings ``(B, D)`` to the mean, ``(B,)`` float64."""
        d = np.asarray(emb, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0))


def crossfit_distances(emb: np.ndarray, folds: int = CROSSFIT_FOLDS) -> np.ndarray:
    """Held-out Mahalanobis distance of every calibration embedding.

    The embeddings ``(N, D)`` are split into ``folds`` contiguous blocks (in time order); each
    block is scored against a Ledoit-Wolf baseline fitted on the other blocks, so every normal
    window gets a score from a baseline that has not seen it (K-fold cross-fitting). Returns
    ``(N,)``.
    """
    n = len(emb)
    out = np.empty(n)
    for idx in np.array_split(np.arange(n), min(folds, n // 2)):
        rest = np.setdiff1d(np.arange(n), idx)
        out[idx] = Baseline.fit(emb[rest]).distance(emb[idx])
    return out
