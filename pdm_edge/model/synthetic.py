"""Synthetic anomalies built from a machine's own normal windows, for outlier exposure.

The adapter is given a job beyond reconstruction (Hendrycks et al. 2019, "Deep Anomaly
Detection with Outlier Exposure", ICLR): separate the machine's normal windows from copies of
them with a plausible defect added. The defects are made in the standardised feature space of
:mod:`pdm_edge.model.standardize` (``asinh`` of the deviation from this machine's normal, per
channel and band), so they need no raw waveform (the replay buffer keeps feature images only)
and their size is in units of the machine's own normal spread:

- **band burst** (both kinds): extra energy in a contiguous run of 2-12 bands over a run of
  1-32 frames: a resonance excited by impacts, a rub, a leak, a valve seating harder. Short
  runs are transients (a few frames of a 1 s window), long runs stationary changes.
- **tone** (both kinds): one or two bands raised over every frame: a new tonal component
  (gear mesh, blade pass, electrical line harmonic).
- **envelope harmonics** (vibration, channel 1, the squared-envelope spectrum): a series of
  peaks at a fundamental bin and its harmonics, the signature of a repetitive bearing impact
  at BPFO / BPFI / BSF (Randall & Antoni 2011) whatever the bearing's geometry and speed.
- **attenuation** (acoustic): energy *removed* from a run of 2-64 bands over a run of 1-32
  frames: a valve that no longer seats with a click, a blocked or leaking flow path, a missing
  blade pass, a muffled component. Acoustic images are standardised two-sided, so a loss of
  sound is as much a deviation as an added one; with added-energy defects alone the anomaly
  logit would learn that a quieter window is *more* normal than the machine's own. Vibration
  images are one-sided (a bearing defect adds energy; less vibration is not a fault the
  appliance names), so vibration has no attenuation defect.

The added deviation ``a`` is drawn uniformly in ``[0.8, 3.0]`` asinh units (a z-score of about
0.9 to 10) and added as ``asinh(sinh(x) + sinh(a))``, i.e. as added deviation before the
compression (``-a`` for an attenuation). Each kind's defects are drawn with equal probability:
burst, tone and envelope harmonics for vibration; burst, tone and attenuation for acoustic.
Everything is drawn from a ``torch.Generator`` so a training run is reproducible.
"""

from __future__ import annotations

import torch

__all__ = ["synthetic_anomalies"]

MIN_ADDED = 0.8
MAX_ADDED = 3.0


def _add(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.asinh(torch.sinh(x) + torch.sinh(a))


def synthetic_anomalies(xs: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """One synthetic anomaly per normal window.

    Args:
        xs: ``(B, 2, 64, 32)`` float32, standardised feature images of normal windows.
        kind: ``"vibration"`` or ``"acoustic"``.
        generator: the random source (training's generator).

    Returns:
        ``(B, 2, 64, 32)`` float32, a new tensor; ``xs`` is not modified.
    """
    b, _, n_bands, n_frames = xs.shape
    out = xs.clone()
    u = torch.rand(b, 6, generator=generator)
    kinds = (u[:, 0] * 3).long()  # 0 burst, 1 tone, 2 envelope harmonics (vibration) or attenuation (acoustic)
    amp = MIN_ADDED + (MAX_ADDED - MIN_ADDED) * u[:, 1]
    band_idx = torch.arange(n_bands)
    frame_idx = torch.arange(n_frames)
    for i in range(b):
        a = amp[i]
        attenuation = kinds[i] == 2 and kind != "vibration"
        if kinds[i] == 0 or attenuation:  # a run of bands over a run of frames, energy added or removed
            width = 2 + int(u[i, 2] * (n_bands - 1 if attenuation else 11))  # burst 2-12 bands, attenuation up to all
            lo = int(u[i, 3] * (n_bands - width + 1))
            length = 1 + int(u[i, 4] ** 2 * n_frames)  # short runs are as likely as long ones
            t0 = int(u[i, 5] * (n_frames - length + 1))
            sel = ((band_idx >= lo) & (band_idx < lo + width))[:, None] & ((frame_idx >= t0) & (frame_idx < t0 + length))[None, :]
            out[i, 0] = torch.where(sel, _add(out[i, 0], -a if attenuation else a), out[i, 0])
        elif kinds[i] == 1:
            lo = int(u[i, 3] * (n_bands - 1))
            sel = (band_idx >= lo) & (band_idx < lo + 1 + int(u[i, 2] * 2))
            out[i, 0, sel] = _add(out[i, 0, sel], a)
        else:
            f0 = 3 + int(u[i, 3] * 14)  # fundamental bin: 3-16 of 64 (30-160 Hz at 640 Hz / 64 bins)
            sel = (band_idx % f0 == 0) & (band_idx > 0)
            decay = torch.exp(-0.25 * (band_idx[sel] // f0 - 1).float())
            out[i, 1, sel] = _add(out[i, 1, sel], a * decay[:, None])
    return out
