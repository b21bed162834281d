"""On-the-fly augmentation of replay windows' feature images (training data pipeline only).

The replay buffer keeps feature images (``(2, 64, 32)``, dB; :func:`pdm_edge.features.encoder_input`),
not waveforms, so each augmentation is the change its waveform counterpart makes to the image,
applied before the machine's standardisation:

- **gain** (``aug_gain_db``, uniform in +-dB): a gain ``g`` shifts the band powers (channel 0) by
  ``20 log10 g`` dB, and for vibration the squared-envelope spectrum (channel 1, the amplitude
  spectrum of the squared envelope, which scales with ``g**2``) by the same dB;
- **noise at a set SNR** (``aug_noise_snr_db``): noise whose power is the window's mean band
  power divided by ``10**(SNR/10)``, equal in every band, is added to the band powers (in
  linear units); the envelope spectrum is left as it is;
- **time shift** (``aug_shift_frames``, uniform in +-frames): the frames of channel 0 roll
  (circularly); the vibration envelope spectrum has no time axis;
- **small speed change** (``aug_speed_pct``, uniform in +-%): frequencies scale by ``1 + d``, so
  every band's content moves to the band ``1 + d`` times higher (linear interpolation along the
  band axis; exact for the envelope spectrum's linear bins, an approximation on the band
  power's mel-like grid).

For acoustic streams channel 1 (the change of channel 0 along frames) is recomputed from the
augmented channel 0. Only replay windows are augmented; labelled windows, the validation part
and the gate stay as they were recorded. Each switch is a ``TrainConfig`` field (``[learning]``
keys), all off by default. Draws come from the training loop's numpy generator, so they are
part of the checkpointed state.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Augmenter", "augment_features"]


def augment_features(f: np.ndarray, kind: str, rng: np.random.Generator, *, gain_db: float = 0.0, noise_snr_db: float = 0.0,
                     shift_frames: int = 0, speed_pct: float = 0.0) -> np.ndarray:
    """Augmented copy of raw feature images ``(B, 2, 64, 32)`` float32 (dB); a switch at 0 is off."""
    x = np.array(f, dtype=np.float32, copy=True)
    b = len(x)
    if not b:
        return x
    ch0 = x[:, 0]
    if gain_db > 0:
        g = rng.uniform(-gain_db, gain_db, size=(b, 1, 1)).astype(np.float32)
        ch0 += g
        if kind == "vibration":
            x[:, 1] += g
    if noise_snr_db > 0:
        p = 10.0 ** (ch0.astype(np.float64) / 10.0)
        noise = p.mean(axis=(1, 2), keepdims=True) * 10.0 ** (-noise_snr_db / 10.0)
        ch0[:] = (10.0 * np.log10(p + noise)).astype(np.float32)
    if shift_frames > 0:
        for i, k in enumerate(rng.integers(-shift_frames, shift_frames + 1, size=b)):
            ch0[i] = np.roll(ch0[i], int(k), axis=-1)
    if speed_pct > 0:
        bands = np.arange(x.shape[2], dtype=np.float64)
        for i, r in enumerate(1.0 + rng.uniform(-speed_pct, speed_pct, size=b) / 100.0):
            src = bands / r  # content at band k / r moves to band k
            chans = (0, 1) if kind == "vibration" else (0,)
            for c in chans:
                img = x[i, c]
                x[i, c] = np.stack([np.interp(src, bands, img[:, t]) for t in range(img.shape[1])], axis=1)
    if kind != "vibration":
        x[:, 1] = np.gradient(x[:, 0], axis=-1)
    return x


class Augmenter:
    """The training loop's augmentation step: ``(window indices, standardised batch, rng) ->
    standardised batch`` with the replay windows among them augmented.

    Args:
        raw: raw feature images of the training windows ``(N, 2, 64, 32)``.
        replay: ``(N,)`` bool, True for windows from the replay buffer (only these change).
        transform: the machine's standardisation (raw -> standardised images).
        kind: ``"vibration"`` or ``"acoustic"``.
        settings: ``gain_db``, ``noise_snr_db``, ``shift_frames``, ``speed_pct``.
    """

    def __init__(self, raw: np.ndarray, replay: np.ndarray, transform, kind: str, **settings: float) -> None:  # type: ignore[no-untyped-def]
        self.raw, self.replay, self.transform, self.kind, self.settings = raw, np.asarray(replay, bool), transform, kind, settings

    def __call__(self, j: np.ndarray, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        sel = self.replay[j]
        if not sel.any():
            return x
        out = x.clone()
        aug = augment_features(self.raw[j[sel]], self.kind, rng, **self.settings)  # type: ignore[arg-type]
        out[torch.from_numpy(sel)] = torch.from_numpy(self.transform(aug).astype(np.float32))
        return out
