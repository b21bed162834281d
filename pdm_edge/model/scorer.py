"""Anomaly scoring of windows: features -> frozen encoder + adapter -> distance to normal.

A :class:`Scorer` is one sensor stream's model (inference; the adapter's training loop is
:mod:`pdm_edge.learning.trainer`, the baseline :mod:`pdm_edge.model.baseline`, the score
standardisation and threshold :mod:`pdm_edge.model.postprocess`). Its API follows river's
(``learn_one`` / ``learn_many`` on normal windows), with explicit inputs: ``*_windows`` /
``*_many`` take ``Window`` objects or raw samples ``(B, N)``, ``*_features`` take feature
images ``(B, 2, 64, 32)`` (:meth:`Scorer.features`); :meth:`Scorer.score_windows` and
:meth:`Scorer.score_features` return ``(B,)`` float scores, higher = more anomalous. One
deliberate difference from river: learning from normal windows only *collects*
them until :meth:`Scorer.calibrate` fits the machine's baseline, because training the adapter
takes seconds, not microseconds. After calibration, ``learn_*`` also widens the baseline (the
embedding statistics) without retraining the adapter.

Calibration (the machine's baseline, from its own normal windows):

1. Per-machine standardisation of the feature images (:class:`Standardizer`; one-sided for
   vibration: only added energy counts, see :mod:`pdm_edge.model.standardize`).
2. Split the windows in time order: the first 80 % train the adapter (LoRA + bottleneck head +
   anomaly logit; :func:`pdm_edge.learning.trainer.train_adapter`) with early stopping on the last 20 % and a wall-time budget. Two objectives,
   summed: the self-supervised masked-patch reconstruction through the frozen decoder, and
   **outlier exposure** (Hendrycks et al. 2019): the anomaly logit separates the machine's
   normal windows from synthetic anomalies made from them (band bursts, tones, envelope
   harmonics, attenuations; :mod:`pdm_edge.model.synthetic`) and from windows a technician
   confirmed as faults. Only adapter parameters have gradients; the encoder stays bit-identical.
3. Raw anomaly measures of a window (:data:`COMPONENTS`, :attr:`ScorerConfig.components`):
   ``mahalanobis``, the distance of its embedding to the normal embeddings (Ledoit-Wolf
   shrinkage covariance, Ledoit & Wolf 2004); ``spectral``, the same distance for its spectral
   summary (:func:`spectral_summary`: band means, band maxima over frames (time-localised) and
   the envelope spectrum or the spread over frames, of the standardised image), fusing the
   hand-crafted spectral statistics with the embedding; ``logit``, the adapter's anomaly
   logit; optionally ``reconstruction``, the masked-reconstruction error over a fixed set of
   complementary masks.
4. Held-out calibration scores: the distances of every calibration window are computed
   against a baseline fitted on the other four fifths (5-fold cross-fitting in time order);
   the adapter's measures (logit, reconstruction) are held out only for the adapter's
   validation part, and then so are the others. Each measure is standardised by the held-out
   median and a robust spread (interquartile range / 1.349); the score is their mean: about 0
   for normal windows, in units of normal spread.
5. Threshold: a target false-alert rate per hour becomes a per-window exceedance probability
   ``p`` through the k-of-n alert rule (independent windows: alerts/h ~= W * C(n, k) * p^k with
   W windows per hour); the threshold is the upper prediction bound of the held-out scores at
   ``p`` (:func:`~pdm_edge.model.postprocess.threshold_from_held_out`), and never below their maximum.
6. The final baselines are refitted on all calibration windows.

Learning from technician labels (DESIGN.md section 3; the on-device loop in
:mod:`pdm_edge.learning` feeds them in):

- windows labelled ``normal`` (false alarms) join the normal windows: they are part of the
  standardisation, the adapter's training data, the baseline and the held-out scores, so the
  threshold (never below the largest held-out score) rises above them and similar windows stop
  alarming;
- windows labelled ``fault`` are positives of the outlier-exposure objective (the adapter
  learns to push them away from normal, Deep SAD-style, Ruff et al. 2020) and become
  known-fault examples: their embeddings (at most :data:`MAX_FAULT_PROTOTYPES`) are kept in
  the model version, and a window nearer (in the baseline's Mahalanobis metric) to a known
  fault than to the normal mean gets the difference added to its score
  (:meth:`Scorer.fault_match`), so a recurrence of a confirmed fault scores high even when it
  is only moderately far from normal.

Everything a score depends on is saved in a model version (:mod:`pdm_edge.model.version`), and
reloading it reproduces the scores bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pdm_edge import features
from pdm_edge.config import DEFAULT_ALERT_K, DEFAULT_ALERT_N
from pdm_edge.errors import ModelError, NotCalibratedError, TrainingInterrupted
from pdm_edge.model.adapter import Adapter, AdapterConfig, StackedAdapters
from pdm_edge.model.baseline import CROSSFIT_FOLDS, Baseline, crossfit_distances
from pdm_edge.model.encoder import Encoder, kind_index, masked_error
from pdm_edge.model.postprocess import exceedance_probability, robust_scale, threshold_from_held_out
from pdm_edge.model.quantize import INFERENCE_PATHS, int8_encoder
from pdm_edge.model.standardize import Standardizer
from pdm_edge.types import FaultMatch, Window

N_RECON_MASKS = 4
NO_GRAD_BATCH = 64
"""Windows per inference pass (embedding, validation loss): bounds the activation memory."""
MAX_FAULT_PROTOTYPES = 256
"""Most known-fault embeddings a model version keeps (evenly subsampled in time order beyond
it); stored as float16 (64 KiB at most), so a version file with the default components stays
under 256 KiB (about 155 KB without prototypes: the baselines store one triangle of their
precision matrices)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the adapter is trained on the device."""

    max_epochs: int = 40
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    mask_ratio: float = 0.5
    patience: int = 5
    """Epochs without improvement of the validation loss before stopping."""
    max_steps: int = 48
    """Optimiser steps (batches of ``batch`` windows) per training job, checked before every
    batch like ``max_seconds``: when they are spent the running epoch ends early, is validated,
    and training stops. The budget that decides the work of a large calibration, the same on
    every machine (10 min of 1 s windows with 0.5 s hop: 959 training windows, 30 steps an
    epoch, so 48 steps are 1.6 epochs); small calibrations mostly stop on early stopping first
    (``models/README.md``, "Calibration time")."""
    max_seconds: float = 120.0
    """Wall-time budget of the adapter training, s, the safety net of a slow or loaded machine:
    checked before every batch; when it is spent the running epoch ends early, is validated, and
    training stops (so a calibration overruns it by one batch, one validation pass and the
    baseline fit, not by a whole epoch)."""
    val_fraction: float = 0.2
    seed: int = 0
    outlier_exposure: float = 1.0
    """Weight of the outlier-exposure loss (normal windows vs synthetic anomalies and labelled
    faults, :mod:`pdm_edge.model.synthetic`) beside the reconstruction loss; 0 turns it off."""
    optimizer: str = "adamw"
    """``"adamw"`` (AdamW, two state tensors per parameter) or ``"sgd"`` (plain SGD without
    momentum: no optimiser state). 8-bit optimiser states are not offered: with about 23 k
    adapter parameters AdamW's states are 180 KiB, so 8 bits would save under 150 KiB, and
    bitsandbytes (the maintained library for them) is not installed here and its 8-bit
    optimiser kernels target accelerators (:mod:`pdm_edge.learning.trainer`)."""
    micro_batch: int = 0
    """Windows per forward/backward pass; gradients of ``batch / micro_batch`` passes are
    accumulated into one optimiser step (the step is the same as one pass of ``batch``, up to
    floating-point order). 0: one pass per batch. Less activation memory, a little more time."""
    grad_checkpointing: bool = False
    """Recompute the activations of the adapted blocks in the backward pass instead of keeping
    them (``torch.utils.checkpoint``): less training memory, about one more forward pass."""
    prefix_cache: bool = False
    """When the adapter leaves a frozen prefix (``AdapterConfig.layers`` < depth), run the frozen
    blocks once per window per job (no autograd graph) and keep their outputs: the window's clean
    tokens, and its masked tokens and synthetic anomaly for ``cache_views`` fixed draws (epoch
    ``e`` uses draw ``e % cache_views``); only the adapted blocks, the head and the decoder run
    each epoch. Without a prefix (LoRA in every block) it does nothing. Off by default: it saves
    time, not memory (a row is 32 KiB, 5 rows a window with 2 views: 196 MB for 10 min of
    windows, more than the activations it spares; ``benchmarks/train_memory.py``); with
    ``max_memory_mb`` it goes to a file when it does not fit."""
    cache_views: int = 2
    """Fixed (mask, synthetic anomaly) draws per window kept by the prefix cache."""
    max_memory_mb: float = 0.0
    """Memory envelope of one training job, MiB (estimated activations of a pass plus the
    prefix cache in memory); the loop picks the micro-batch and moves the prefix cache to a file
    in the job's directory to fit, and refuses (``ModelError``) when one window does not fit.
    0: no envelope."""

    proximal_mu: float = 0.0
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): weight
    ``mu`` of the proximal term ``mu/2 * ||theta - theta_0||^2`` that keeps the adapter near the
    one training started from (the fleet prior, :attr:`Scorer.prior_adapter`); set by the fleet
    server's FedProx rounds (``proximal-mu``). 0: off (FedAvg)."""

    aug_gain_db: float = 0.0
    """Augmentation of replay windows (:mod:`pdm_edge.learning.augment`): gain, uniform in
    +- this many dB; 0: off."""
    aug_noise_snr_db: float = 0.0
    """Augmentation: added noise at this SNR, dB; 0: off."""
    aug_shift_frames: int = 0
    """Augmentation: time shift, uniform in +- this many frames; 0: off."""
    aug_speed_pct: float = 0.0
    """Augmentation: speed change, uniform in +- this many percent; 0: off."""

    @property
    def augmentation(self) -> dict[str, float]:
        """The augmentation switches that are on (keyword arguments of
        :func:`pdm_edge.learning.augment.augment_features`)."""
        d = {"gain_db": self.aug_gain_db, "noise_snr_db": self.aug_noise_snr_db, "shift_frames": self.aug_shift_frames,
             "speed_pct": self.aug_speed_pct}
        return {k: v for k, v in d.items() if v}

    def __post_init__(self) -> None:
        if min(self.aug_gain_db, self.aug_noise_snr_db, self.aug_shift_frames, self.aug_speed_pct) < 0:
            raise ValueError("augmentation settings must be >= 0 (0: off)")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if self.micro_batch < 0 or self.cache_views < 1 or self.max_memory_mb < 0 or self.batch < 1:
            raise ValueError("need batch >= 1, micro_batch >= 0, cache_views >= 1 and max_memory_mb >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """Everything that defines a stream's scorer besides its learned state.

    Attributes:
        kind: ``"vibration"`` or ``"acoustic"``.
        sample_rate_hz: the stream's sample rate, Hz.
        hop_s: time between window starts, s (converts a rate per hour into per window).
        features: feature settings (:class:`pdm_edge.features.FeatureSpec` as a dict); the
            default for ``kind`` and ``sample_rate_hz`` when None.
        adapter: LoRA rank, targets and head width.
        train: adapter training settings.
        components: raw measures averaged into the score (:data:`COMPONENTS`): by default
            ``"mahalanobis"`` (embedding distance), ``"spectral"`` (distance of the window's
            spectral summary) and ``"logit"`` (the adapter's anomaly logit); ``"reconstruction"``
            (the masked-reconstruction error) is optional: it costs four more encoder passes
            per window.
        train_adapter: False skips step 2 (the frozen-encoder ablation); ``"logit"`` needs a
            trained adapter and is dropped without one.
        target_false_alerts_per_h: false alerts per hour the threshold aims at.
        alert_k, alert_n: an alert needs ``alert_k`` of the last ``alert_n`` windows above threshold.
        min_windows: fewest normal windows :meth:`Scorer.calibrate` accepts.
        inference: ``"float32"`` or ``"int8"``: the frozen encoder's linear layers dynamically
            quantised for scoring and calibration (:mod:`pdm_edge.model.quantize`); saved with
            the model version, so a version is scored on the path it was calibrated for.
    """

    kind: str
    sample_rate_hz: float
    hop_s: float
    features: dict[str, Any] | None = None
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    components: tuple[str, ...] = ("mahalanobis", "spectral", "logit")
    train_adapter: bool = True
    target_false_alerts_per_h: float = 0.1
    alert_k: int = DEFAULT_ALERT_K
    alert_n: int = DEFAULT_ALERT_N
    min_windows: int = 20
    inference: str = "float32"

    def __post_init__(self) -> None:
        kind_index(self.kind)
        if self.inference not in INFERENCE_PATHS:
            raise ValueError(f"inference must be one of {INFERENCE_PATHS}, got {self.inference!r}")
        if not set(self.components) <= set(COMPONENTS) or not self.components:
            raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {self.components}")
        if not 1 <= self.alert_k <= self.alert_n:
            raise ValueError("need 1 <= alert_k <= alert_n")
        if self.min_windows < 10:
            raise ValueError(f"min_windows must be >= 10 (a baseline and a held-out split need them), got {self.min_windows}")
        if self.features is None:
            object.__setattr__(self, "features", features.FeatureSpec.default(self.kind, self.sample_rate_hz).to_dict())
        comps = tuple(c for c in COMPONENTS if c in self.components and (self.train_adapter or c != "logit"))
        if not comps:
            raise ValueError(f"components {self.components} all need a trained adapter, and train_adapter is False")
        object.__setattr__(self, "components", comps)

    @property
    def feature_spec(self) -> features.FeatureSpec:
        return features.FeatureSpec.from_dict(self.features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "sample_rate_hz": self.sample_rate_hz, "hop_s": self.hop_s, "features": dict(self.features or {}),
            "adapter": self.adapter.to_dict(), "train": self.train.to_dict(), "components": list(self.components),
            "train_adapter": self.train_adapter, "target_false_alerts_per_h": self.target_false_alerts_per_h,
            "alert_k": self.alert_k, "alert_n": self.alert_n, "min_windows": self.min_windows, "inference": self.inference,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScorerConfig:
        d = dict(d)
        d["adapter"] = AdapterConfig.from_dict(d["adapter"])
        d["train"] = TrainConfig(**d["train"])
        d["components"] = tuple(d["components"])
        return cls(**d)


COMPONENTS = ("mahalanobis", "spectral", "logit", "reconstruction")
"""Raw anomaly measures a scorer can average (see :class:`ScorerConfig`)."""
ADAPTER_COMPONENTS = ("logit", "reconstruction")
"""Measures of the adapter's training objectives: their held-out scores come from the adapter's
validation windows only (the last part in time). ``"logit"`` needs a trained adapter (an
untrained one answers 0); the reconstruction error is defined for the frozen encoder too."""


def spectral_summary(xs: np.ndarray, kind: str) -> np.ndarray:
    """The spectral summary of standardised feature images, ``(B, 2, 64, 32)`` -> ``(B, 96)``
    float64: per band (pairs of the 64 bands averaged, so 32 values each), the mean over frames
    of channel 0 (stationary band power), its maximum over frames (time-localised: a transient
    in a few frames of the window), and for vibration the squared-envelope spectrum (channel 1),
    for acoustic the spread over frames of channel 0 (how much the sound changes within the
    window). It is the hand-crafted spectral statistics of the Mahalanobis peer, computed on
    the machine's standardised deviations so that it fuses with the embedding distance
    (one-sided for vibration) instead of competing with it."""
    if len(xs) > NO_GRAD_BATCH * 4:  # per window: chunks give the same values without a float64 copy of every image
        return np.concatenate([spectral_summary(xs[i:i + NO_GRAD_BATCH * 4], kind) for i in range(0, len(xs), NO_GRAD_BATCH * 4)])
    x = np.asarray(xs, dtype=np.float64)
    ch0 = x[:, 0]
    third = x[:, 1].mean(axis=-1) if kind == "vibration" else ch0.std(axis=-1)
    v = np.stack([ch0.mean(axis=-1), ch0.max(axis=-1), third], axis=1)  # (B, 3, 64)
    return v.reshape(len(x), 3, v.shape[-1] // 2, 2).mean(axis=-1).reshape(len(x), -1)


class Scorer:
    """One stream's anomaly scorer (see the module docstring for the method).

    Args:
        encoder: the frozen pretrained encoder (shared by all scorers; never modified).
        encoder_sha256: sha256 of the encoder's weights file, recorded in the model version.
        config: the stream's :class:`ScorerConfig`.
    """

    def __init__(self, encoder: Encoder, encoder_sha256: str, config: ScorerConfig) -> None:
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder_sha256 = encoder_sha256
        self.config = config
        self.infer_encoder = int8_encoder(self.encoder) if config.inference == "int8" else self.encoder
        """The encoder that scores and calibrates: the frozen one, or its int8 copy."""
        self.prior_adapter: dict[str, torch.Tensor] | None = None
        """Fleet prior (an adapter ``state_dict``, :mod:`pdm_edge.fleet`): when set, every fresh
        adapter starts from it instead of the seed's initialisation, so calibration starts from
        what the machine's class learned."""
        self.spec = config.feature_spec
        self.kind = kind_index(config.kind)
        self.adapter = self._new_adapter()
        self.standardizer: Standardizer | None = None
        self.baseline: Baseline | None = None
        self.spectral_baseline: Baseline | None = None
        self.component_stats: dict[str, tuple[float, float]] = {}
        self.threshold: float | None = None
        self.calibration: dict[str, Any] = {}
        self._normal: list[np.ndarray] = []  # raw feature images of normal windows, (2, 64, 32)
        self._replay: list[bool] = []  # per normal window: from the replay buffer (may be augmented)
        self._faults: list[np.ndarray] = []  # raw feature images of labelled fault windows
        self._fault_event_of: list[int] = []  # per fault window: index into fault_events
        self.fault_events: list[dict[str, Any]] = []  # the confirmed faults: label id, fault type, span start
        self.fault_prototypes: np.ndarray | None = None  # (F, D) embeddings of known faults
        self.fault_prototype_events: np.ndarray | None = None  # (F,) index into fault_events
        self._baseline_emb: np.ndarray | None = None
        self._recon_masks = self._complementary_masks()

    def _new_adapter(self) -> Adapter:
        """A fresh adapter, initialised from the configured seed without touching torch's global
        RNG, then loaded with :attr:`prior_adapter` when one is set.

        Raises:
            RuntimeError: the prior does not fit this adapter configuration (torch's message).
        """
        with torch.random.fork_rng():
            torch.manual_seed(self.config.train.seed)
            adapter = Adapter(self.encoder, self.config.adapter)
        if self.prior_adapter is not None:
            adapter.load_state_dict(self.prior_adapter)
        return adapter

    # -- features --------------------------------------------------------------------------
    def _samples(self, windows: Sequence[Window] | np.ndarray) -> np.ndarray:
        if isinstance(windows, np.ndarray):
            x = windows.reshape(1, -1) if windows.ndim == 1 else windows
            if x.ndim != 2:
                raise ValueError(f"raw samples must be (B, N) or (N,), got shape {windows.shape}; "
                                 "feature images go to score_features / learn_features")
            return x
        if not windows:
            return np.zeros((0, 1), np.float32)
        for w in windows:
            if w.sample_rate_hz != self.config.sample_rate_hz:
                raise ModelError(f"{w.stream}: window at {w.sample_rate_hz:g} Hz, scorer configured for {self.config.sample_rate_hz:g} Hz")
        return np.stack([w.samples for w in windows])

    def features(self, windows: Sequence[Window] | np.ndarray) -> np.ndarray:
        """Feature images ``(B, 2, 64, 32)`` float32 (before standardisation) of ``Window``
        objects or raw samples ``(B, N)`` / ``(N,)`` (:func:`pdm_edge.features.encoder_input`).

        Raises:
            ModelError: a window's sample rate differs from the configured one.
            ValueError: a sample array that is not 1-D or 2-D; non-finite or too short windows.
        """
        x = self._samples(windows)
        if x.shape[0] == 0:
            return np.zeros((0, *features.INPUT_SHAPE), np.float32)
        return features.encoder_input(x, self.config.sample_rate_hz, self.config.kind, self.spec)

    @staticmethod
    def _check_features(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float32)
        if f.ndim != 4 or tuple(f.shape[1:]) != features.INPUT_SHAPE:
            raise ValueError(f"feature images must be (B, {', '.join(map(str, features.INPUT_SHAPE))}), got shape {f.shape}")
        return f

    # -- river-like API --------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        return self.threshold is not None

    @property
    def n_normal(self) -> int:
        return len(self._normal)

    @property
    def n_fault(self) -> int:
        return len(self._faults)

    def learn_one(self, window: Window | np.ndarray, label: str = "normal") -> Scorer:
        """Add one window, a ``Window`` or raw samples ``(N,)`` (see :meth:`learn_features`)."""
        return self.learn_many([window] if isinstance(window, Window) else np.asarray(window)[None], label)

    def learn_many(self, windows: Sequence[Window] | np.ndarray, label: str = "normal",
                   events: Sequence[dict[str, Any]] | None = None) -> Scorer:
        """Add windows of the machine, ``Window`` objects or raw samples ``(B, N)``, as examples
        of ``label``: :meth:`learn_features` of their :meth:`features`.

        Raises:
            ModelError: a window's sample rate differs from the configured one.
            ValueError: an unknown label, non-finite or too short windows.
        """
        return self.learn_features(self.features(windows), label, events)

    def learn_features(self, feature_images: np.ndarray, label: str = "normal",
                       events: Sequence[dict[str, Any]] | None = None, *, replay: bool | np.ndarray = False) -> Scorer:
        """Add feature images ``(B, 2, 64, 32)`` (:meth:`features`, before standardisation) of
        the machine's windows as examples of ``label``.

        ``label="normal"`` (the default: unlabelled data of a healthy machine, and windows a
        technician marked as a false alarm): before calibration they are only collected; after
        calibration the embedding baseline is also refitted with them (the adapter is not
        retrained; use :meth:`calibrate` for that). A scorer reloaded from a model version does
        not carry the baseline's embeddings (they would make the file large), so there they are
        only collected until the next calibration.

        ``label="fault"`` (windows of a confirmed fault): collected for the next
        :meth:`calibrate`, which makes them known-fault examples (see the module docstring).
        ``events`` names the confirmed fault of each window (one dict per window, JSON values:
        ``{"label": id, "fault_type": ..., "start_ns": ...}``), so that :meth:`nearest_fault`
        can say which confirmed fault a new window looks like.

        ``replay`` (one bool, or ``(B,)`` bools) marks normal windows that come from the replay
        buffer: only these are augmented in training (``TrainConfig.aug_*``).

        Raises:
            ValueError: an unknown label, or an array that is not ``(B, 2, 64, 32)``.
        """
        if label not in ("normal", "fault"):
            raise ValueError(f"label must be 'normal' or 'fault', got {label!r}")
        f = self._check_features(feature_images)
        if label == "fault":
            if events is not None and len(events) != len(f):
                raise ValueError(f"events must name every fault window: {len(events)} events for {len(f)} windows")
            for ev in events if events is not None else [{}] * len(f):
                if ev not in self.fault_events:
                    self.fault_events.append(dict(ev))
                self._fault_event_of.append(self.fault_events.index(ev))
            self._faults.extend(f)
            return self
        self._normal.extend(f)
        self._replay.extend(np.broadcast_to(np.asarray(replay, bool), (len(f),)).tolist())
        if self.is_calibrated and len(f) and self._baseline_emb is not None:
            emb = self._embed(self.standardizer.transform(f))  # type: ignore[union-attr]
            self._baseline_emb = np.concatenate([self._baseline_emb, emb]) if self._baseline_emb is not None else emb
            self.baseline = Baseline.fit(self._baseline_emb)
        return self

    def score_windows(self, windows: Sequence[Window] | np.ndarray) -> np.ndarray:
        """Anomaly scores of ``Window`` objects or raw samples ``(B, N)`` / ``(N,)``: the
        :meth:`score_features` of their :meth:`features`. Shape ``(B,)`` float64.

        Raises:
            NotCalibratedError: before :meth:`calibrate`.
            ModelError: a window's sample rate differs from the configured one.
            ValueError: non-finite or too short windows (from the features).
        """
        self._require_calibrated()
        return self.score_features(self.features(windows))

    def _require_calibrated(self) -> None:
        if not self.is_calibrated:
            raise NotCalibratedError(f"not calibrated: {self.n_normal} normal window(s) collected, calibrate() first")

    # -- internals -------------------------------------------------------------------------
    def _complementary_masks(self) -> torch.Tensor:
        n = self.encoder.cfg.n_tokens
        g = torch.Generator().manual_seed(1234)
        perm = torch.randperm(n, generator=g)
        masks = torch.zeros(N_RECON_MASKS, n, dtype=torch.bool)
        for i, chunk in enumerate(perm.chunk(N_RECON_MASKS)):
            masks[i, chunk] = True
        return masks

    def _tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.adapter.head(self.infer_encoder.tokens(x, self.kind, mask, adapter=self.adapter))

    @torch.no_grad()
    def _embed(self, xs: np.ndarray, batch: int = NO_GRAD_BATCH) -> np.ndarray:
        out = [self._tokens(torch.from_numpy(xs[i:i + batch])).mean(dim=1).numpy() for i in range(0, len(xs), batch)]
        return np.concatenate(out) if out else np.zeros((0, self.encoder.cfg.dim), np.float32)

    def _logit(self, emb: np.ndarray) -> np.ndarray:
        """The adapter's anomaly logit of pooled embeddings ``(B, D)`` -> ``(B,)`` float64."""
        with torch.no_grad():
            return self.adapter.logit(torch.from_numpy(np.asarray(emb, dtype=np.float32)))[:, 0].double().numpy()

    @torch.no_grad()
    def _recon_error(self, xs: np.ndarray, batch: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(xs), batch):
            x = torch.from_numpy(xs[i:i + batch])
            target = self.encoder.patchify(x)
            err = torch.zeros(len(x))
            for m in self._recon_masks:
                mask = m.expand(len(x), -1)
                err += masked_error(self.encoder.reconstruct(self._tokens(x, mask)), target, mask)
            out.append((err / len(self._recon_masks)).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def _raw(self, xs: np.ndarray, emb: np.ndarray) -> dict[str, np.ndarray]:
        raw = {}
        if "mahalanobis" in self.config.components:
            raw["mahalanobis"] = self.baseline.distance(emb)  # type: ignore[union-attr]
        if "spectral" in self.config.components:
            raw["spectral"] = self.spectral_baseline.distance(spectral_summary(xs, self.config.kind))  # type: ignore[union-attr]
        if "logit" in self.config.components:
            raw["logit"] = self._logit(emb)
        if "reconstruction" in self.config.components:
            raw["reconstruction"] = self._recon_error(xs)
        return raw

    def _combine(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        z = [(raw[c] - self.component_stats[c][0]) / self.component_stats[c][1] for c in self.config.components]
        return np.mean(z, axis=0)

    def _fault_distances(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(d_normal (B,), d_fault (B, F))`` of embeddings ``(B, D)``: the baseline Mahalanobis
        distance to the normal mean and to each known-fault prototype; None without prototypes."""
        if self.fault_prototypes is None or not len(self.fault_prototypes) or self.baseline is None:
            return None
        e = np.asarray(emb, dtype=np.float64)
        diff = e[:, None, :] - np.asarray(self.fault_prototypes, dtype=np.float64)[None]
        d = np.sqrt(np.maximum(np.einsum("bfi,ij,bfj->bf", diff, self.baseline.precision, diff), 0.0))
        return self.baseline.distance(e), d

    def fault_match(self, emb: np.ndarray) -> np.ndarray:
        """Known-fault evidence of embeddings ``(B, D)``: ``max(0, d_normal - d_fault) / spread``
        with ``d_normal`` the Mahalanobis distance to the normal mean, ``d_fault`` the distance
        (same metric) to the nearest known-fault prototype and ``spread`` the normal spread of
        ``d_normal``; 0 for windows nearer to normal than to every known fault, and zeros
        without fault prototypes. Shape ``(B,)`` float64."""
        dist = self._fault_distances(emb)
        if dist is None:
            return np.zeros(len(emb))
        d0, d = dist
        spread = self.component_stats.get("mahalanobis", (0.0, 1.0))[1]
        return np.maximum(0.0, d0 - d.min(axis=1)) / spread

    def _nearest_faults(self, emb: np.ndarray) -> list[FaultMatch | None]:
        """:meth:`nearest_fault_features` of embeddings ``(B, D)``."""
        dist = self._fault_distances(emb)
        if dist is None:
            return [None] * len(emb)
        d0, d = dist
        out: list[FaultMatch | None] = []
        for i in range(len(emb)):
            j = int(np.argmin(d[i]))
            ev = self.fault_events[int(self.fault_prototype_events[j])] if self.fault_prototype_events is not None and self.fault_events else {}
            if d[i, j] >= d0[i] or not ev.get("label"):
                out.append(None)
                continue
            out.append(FaultMatch(str(ev["label"]), ev.get("fault_type"), int(ev.get("start_ns") or 0),
                                  round(float(d0[i] / (d0[i] + d[i, j])), 3)))
        return out

    def nearest_fault(self, windows: Sequence[Window] | np.ndarray) -> list[FaultMatch | None]:
        """:meth:`nearest_fault_features` of ``Window`` objects or raw samples, as
        :meth:`score_windows`."""
        return self.nearest_fault_features(self.features(windows))

    def nearest_fault_features(self, feature_images: np.ndarray) -> list[FaultMatch | None]:
        """For each feature image ``(B, 2, 64, 32)`` (:meth:`features`), the confirmed fault it
        looks like (:class:`~pdm_edge.types.FaultMatch`), or None: the event (label id, fault
        type, span start; see :meth:`learn_many`) of the nearest known-fault prototype when the
        window is nearer (baseline Mahalanobis metric) to it than to the normal mean, with
        ``similarity = d_normal / (d_normal + d_fault)`` in (0.5, 1] (1: on the prototype); None
        too for a prototype learnt without an event (no label id to name).

        Raises:
            NotCalibratedError: before :meth:`calibrate`.
        """
        self._require_calibrated()
        f = self._check_features(feature_images)
        if self.fault_prototypes is None or not len(f):
            return [None] * len(f)
        return self._nearest_faults(self._embed(self.standardizer.transform(f)))  # type: ignore[union-attr]

    def score_features(self, feature_images: np.ndarray) -> np.ndarray:
        """Anomaly scores of feature images ``(B, 2, 64, 32)`` float32 (:meth:`features`, before
        standardisation), shape ``(B,)`` float64; higher = more anomalous, about 0 for normal
        windows, in units of the normal spread.

        Raises:
            NotCalibratedError: before :meth:`calibrate` has run: the machine says it has no
                baseline instead of guessing.
            ValueError: an array that is not ``(B, 2, 64, 32)``.
        """
        return self.score_and_name_features(feature_images, name_faults=False)[0]

    def score_and_name_features(self, feature_images: np.ndarray, *,
                                name_faults: bool = True) -> tuple[np.ndarray, list[FaultMatch | None]]:
        """:meth:`score_features`, and for each window above the threshold the confirmed fault it
        looks like (:meth:`nearest_fault_features`; None for the others), from one pass of the
        encoder. ``name_faults=False``: no names (all None).

        Raises:
            As :meth:`score_features`.
        """
        self._require_calibrated()
        f = self._check_features(feature_images)
        if len(f) == 0:
            return np.zeros(0), []
        xs = self.standardizer.transform(f)  # type: ignore[union-attr]
        return self._score_embedded(xs, self._embed(xs), name_faults)

    def _score_embedded(self, xs: np.ndarray, emb: np.ndarray,
                        name_faults: bool) -> tuple[np.ndarray, list[FaultMatch | None]]:
        """The scores and names of standardised images ``xs`` whose embeddings are ``emb``."""
        score = self._combine(self._raw(xs, emb))
        if self.fault_prototypes is not None:
            score = score + self.fault_match(emb)
        names: list[FaultMatch | None] = [None] * len(xs)
        above = np.flatnonzero(score > float(self.threshold))  # type: ignore[arg-type]
        if name_faults and len(above) and self.fault_events:
            for i, m in zip(above, self._nearest_faults(emb[above])):
                names[i] = m
        return score, names

    # -- calibration -----------------------------------------------------------------------
    def calibrate(self, *, checkpoint: Callable[[dict[str, Any]], None] | None = None,
                  resume: dict[str, Any] | None = None, should_stop: Callable[[], bool] | None = None,
                  work_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Fit the machine's baseline, adapter, score standardisation and threshold on the
        normal windows collected so far (in time order), with the fault windows collected so
        far as known-fault examples.

        Args:
            checkpoint: called after every adapter epoch with the training state (adapter,
                optimizer, best state, history; tensors and plain values) so the caller can
                write it atomically; the on-device training loop does (:mod:`pdm_edge.learning`).
            resume: such a state: training continues after its epoch instead of starting over.
            should_stop: polled between batches; when it returns True the current state is
                passed to ``checkpoint`` and :class:`TrainingInterrupted` is raised.
            work_dir: where the training job may spill its frozen-prefix cache
                (:func:`pdm_edge.learning.trainer.train_adapter`).

        Returns:
            a summary: windows used, adapter epochs and losses, training seconds, held-out
            score statistics, threshold and per-window exceedance probability.

        Raises:
            NotCalibratedError: fewer than ``config.min_windows`` normal windows.
            TrainingInterrupted: ``should_stop`` asked to stop.
        """
        n = len(self._normal)
        if n < self.config.min_windows:
            raise NotCalibratedError(f"calibration needs at least {self.config.min_windows} normal windows, have {n}")
        t0 = time.monotonic()
        # the collected windows are standardised chunk by chunk into one float32 array: no
        # stacked raw copy and no float64 copy of them (training memory, issue 14)
        self.standardizer = Standardizer.fit(self._normal, one_sided=self.config.kind == "vibration")
        xs = self.standardizer.transform_many(self._normal)
        n_val = max(2, int(round(n * self.config.train.val_fraction)))
        tr, va = xs[: n - n_val], xs[n - n_val:]
        fault_xs = self.standardizer.transform(np.stack(self._faults)) if self._faults else None
        self.adapter = self._new_adapter()
        history: list[dict[str, float]] = []
        plans: list[dict[str, Any]] = []
        if self.config.train_adapter:
            from pdm_edge.learning.trainer import train_adapter  # here: pdm_edge.learning imports this module

            from pdm_edge.learning.augment import Augmenter

            aug = self.config.train.augmentation
            replay = np.asarray(self._replay[: n - n_val], bool)
            augment = (Augmenter(np.stack(self._normal[: n - n_val]), replay, self.standardizer.transform, self.config.kind, **aug)
                       if aug and replay.any() else None)
            history = train_adapter(self, tr, va, fault_xs, checkpoint=checkpoint, resume=resume, should_stop=should_stop,
                                    work_dir=work_dir, on_plan=lambda p: plans.append(p.to_dict()), augment=augment)
        emb = self._embed(xs)
        comps = self.config.components
        # cross-fitted distances hold out every window; measures of the trained adapter only
        # the adapter's validation windows (the last part in time)
        held_idx = np.arange(n - n_val, n) if set(comps) & set(ADAPTER_COMPONENTS) else np.arange(n)
        held: dict[str, np.ndarray] = {}
        if "mahalanobis" in comps:
            held["mahalanobis"] = crossfit_distances(emb, CROSSFIT_FOLDS)[held_idx]
        spec = spectral_summary(xs, self.config.kind) if "spectral" in comps else None
        if spec is not None:
            held["spectral"] = crossfit_distances(spec, CROSSFIT_FOLDS)[held_idx]
        if "logit" in comps:
            held["logit"] = self._logit(emb[held_idx])
        if "reconstruction" in comps:
            held["reconstruction"] = self._recon_error(va)
        self.component_stats = {c: robust_scale(v) for c, v in held.items()}
        self._baseline_emb = emb
        self.baseline = Baseline.fit(emb)
        self.spectral_baseline = Baseline.fit(spec) if spec is not None else None
        self.fault_prototypes, self.fault_prototype_events = None, None
        if fault_xs is not None:
            fe = self._embed(fault_xs)
            keep = np.unique(np.linspace(0, len(fe) - 1, min(len(fe), MAX_FAULT_PROTOTYPES)).round().astype(int))
            self.fault_prototype_events = np.asarray(self._fault_event_of, dtype=np.int16)[keep]
            # rounded to float16, as the version file stores them: reloaded scores are identical
            self.fault_prototypes = fe[keep].astype(np.float16).astype(np.float32)
        held_scores = self._combine(held) + self.fault_match(emb[held_idx])
        p = exceedance_probability(self.config.target_false_alerts_per_h, self.config.hop_s, self.config.alert_k, self.config.alert_n)
        self.threshold = threshold_from_held_out(held_scores, p)
        mu, sigma = float(np.mean(held_scores)), float(np.std(held_scores, ddof=1))
        self.calibration = {
            "windows": n, "fault_windows": len(self._faults),
            "fault_prototypes": 0 if self.fault_prototypes is None else len(self.fault_prototypes),
            "train_windows": len(tr), "held_out_windows": len(held_idx),
            "adapter_epochs": len(history), "adapter_history": history, "memory_plan": plans[0] if plans else None,
            "train_seconds": round(time.monotonic() - t0, 3),
            "held_out_score_mean": mu, "held_out_score_std": sigma, "held_out_score_max": float(np.max(held_scores)),
            "exceedance_probability": p, "threshold": self.threshold,
        }
        return self.calibration

    # -- state for model versions ------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild this scorer's scores (tensors and plain values only)."""
        if not self.is_calibrated:
            raise NotCalibratedError("an uncalibrated scorer has no state to save")
        return {
            "config": self.config.to_dict(),
            "encoder_sha256": self.encoder_sha256,
            "adapter": {k: v.detach().clone() for k, v in self.adapter.state_dict().items()},
            "standardizer": {"mean": torch.from_numpy(self.standardizer.mean), "std": torch.from_numpy(self.standardizer.std),  # type: ignore[union-attr]
                             "one_sided": self.standardizer.one_sided},  # type: ignore[union-attr]
            "baseline": self.baseline.to_state(),  # type: ignore[union-attr]
            "spectral_baseline": None if self.spectral_baseline is None else self.spectral_baseline.to_state(),
            "component_stats": {c: list(v) for c, v in self.component_stats.items()},
            "threshold": self.threshold,
            "calibration": {k: v for k, v in self.calibration.items() if k != "adapter_history"},
            "fault_prototypes": None if self.fault_prototypes is None else torch.from_numpy(self.fault_prototypes.astype(np.float16)),
            "fault_prototype_events": None if self.fault_prototype_events is None else torch.from_numpy(self.fault_prototype_events),
            "fault_events": [dict(ev) for ev in self.fault_events],
        }

    @classmethod
    def from_state(cls, encoder: Encoder, encoder_sha256: str, state: dict[str, Any]) -> Scorer:
        """Rebuild a scorer from :meth:`state`.

        Raises:
            ModelError: the state was made with a different encoder (sha256 mismatch).
        """
        if state["encoder_sha256"] != encoder_sha256:
            raise ModelError(f"model version needs encoder {state['encoder_sha256'][:12]}..., loaded encoder is {encoder_sha256[:12]}...")
        s = cls(encoder, encoder_sha256, ScorerConfig.from_dict(state["config"]))
        # versions made before the adapter had its anomaly logit load with a zero logit
        missing, unexpected = s.adapter.load_state_dict(state["adapter"], strict=False)
        if unexpected or set(missing) - {"logit.weight", "logit.bias"}:
            raise ModelError(f"model version's adapter does not match: missing {missing}, unexpected {unexpected}")
        s.standardizer = Standardizer(state["standardizer"]["mean"].numpy(), state["standardizer"]["std"].numpy(),
                                      bool(state["standardizer"]["one_sided"]))
        s.baseline = Baseline.from_state(state["baseline"])
        sb = state.get("spectral_baseline")
        if sb is not None:
            s.spectral_baseline = Baseline.from_state(sb)
        s.component_stats = {c: (float(v[0]), float(v[1])) for c, v in state["component_stats"].items()}
        s.threshold = float(state["threshold"])
        s.calibration = dict(state["calibration"])
        fp = state.get("fault_prototypes")
        s.fault_prototypes = None if fp is None else fp.numpy().astype(np.float16).astype(np.float32)
        fpe = state.get("fault_prototype_events")
        s.fault_prototype_events = None if fpe is None else fpe.numpy().astype(np.int16)
        s.fault_events = [dict(ev) for ev in state.get("fault_events", [])]
        return s


def score_and_name_many(jobs: Sequence[tuple[Scorer, np.ndarray]], *, name_faults: bool = True,
                        batch: int = NO_GRAD_BATCH) -> list[tuple[np.ndarray, list[FaultMatch | None]]]:
    """:meth:`Scorer.score_and_name_features` of several machines at once: ``jobs`` are
    ``(scorer, feature images (B_i, 2, 64, 32))`` pairs, one per stream; returns each job's
    ``(scores (B_i,) float64, names)`` in the same order.

    The windows of all the scorers that share the frozen encoder, the inference path
    (float32 / int8) and the sensor kind are embedded in one batched forward pass, each
    sample through its own machine's adapter (:class:`~pdm_edge.model.adapter.StackedAdapters`);
    a stream scored alone costs about twice as much per window as in a batch (small matrix
    products). Standardisation, baselines, the threshold and the fault names stay each
    scorer's own. The scores equal one scorer at a time to float32 rounding.

    Raises:
        NotCalibratedError: a scorer before :meth:`Scorer.calibrate`.
        ValueError: an array that is not ``(B, 2, 64, 32)``.
    """
    out: list[tuple[np.ndarray, list[FaultMatch | None]] | None] = [None] * len(jobs)
    groups: dict[tuple[Any, ...], list[tuple[int, np.ndarray]]] = {}
    for i, (scorer, images) in enumerate(jobs):
        scorer._require_calibrated()
        f = scorer._check_features(images)
        if not len(f) or "reconstruction" in scorer.config.components:  # the reconstruction term runs masked passes
            out[i] = scorer.score_and_name_features(f, name_faults=name_faults)
            continue
        key = (id(scorer.encoder), scorer.config.inference, scorer.kind, scorer.adapter.cfg)
        groups.setdefault(key, []).append((i, scorer.standardizer.transform(f)))  # type: ignore[union-attr]
    for members in groups.values():
        scorers = [jobs[i][0] for i, _ in members]
        xs_all = np.concatenate([xs for _, xs in members])
        if len(members) == 1:
            emb = scorers[0]._embed(xs_all, batch)
        else:
            index = torch.from_numpy(np.repeat(np.arange(len(members)), [len(xs) for _, xs in members]))
            emb = _embed_stacked(scorers, xs_all, index, batch)
        at = 0
        for (i, xs), scorer in zip(members, scorers):
            out[i] = scorer._score_embedded(xs, emb[at:at + len(xs)], name_faults)
            at += len(xs)
    return out  # type: ignore[return-value]


@torch.no_grad()
def _embed_stacked(scorers: list[Scorer], xs: np.ndarray, index: torch.Tensor, batch: int) -> np.ndarray:
    """Pooled embeddings ``(B, D)`` of standardised images ``xs`` ``(B, 2, 64, 32)``, sample
    ``i`` through ``scorers[index[i]]``'s adapter, on the first scorer's inference encoder (the
    group shares the encoder weights and the inference path)."""
    encoder, kind = scorers[0].infer_encoder, scorers[0].kind
    adapters = [s.adapter for s in scorers]
    out = []
    for i in range(0, len(xs), batch):
        stacked = StackedAdapters(adapters, index[i:i + batch])  # type: ignore[arg-type]
        tokens = encoder.tokens(torch.from_numpy(xs[i:i + batch]), kind, None, adapter=stacked)
        out.append(stacked.head(tokens).mean(dim=1).numpy())
    return np.concatenate(out)
