"""On-device learning: the replay buffer and the edge training loop (DESIGN.md section 3).

- :mod:`.replay`: :class:`ReplayBuffer`, the durable reservoir of each stream's normal windows
  with its held-back gate slots;
- :mod:`.trainer`: :func:`~.trainer.train_adapter`, the adapter's training loop;
- :mod:`.resources`: :class:`ResourceGuard`, when the machine may train (load, heat, battery);
- :mod:`.loop`: :class:`LearningLoop`, triggers -> data -> adapter training with atomic
  checkpoints -> gate -> registry, in one low-priority thread; :func:`request_training` queues
  a job from another process.

:func:`build_learning` makes the loop that ``pdm-edge run`` and ``pdm-edge demo`` use from the
appliance configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdm_edge.learning.loop import JOB_STATES, TRIGGERS, Job, LearningLoop, request_training
from pdm_edge.learning.replay import ReplayBuffer
from pdm_edge.learning.resources import ResourceGuard, ResourceLimits

__all__ = ["JOB_STATES", "TRIGGERS", "Job", "LearningLoop", "ReplayBuffer", "ResourceGuard", "ResourceLimits", "build_learning", "scorer_config_for", "request_training", "train_config_for"]


def scorer_config_for(cfg: Any, train: Any = None) -> Any:
    """``(stream, window) -> ScorerConfig`` from an :class:`~pdm_edge.config.AppConfig`: kind,
    sample rate and hop from the stream's ``[sensors]`` table (or, for an accepted unconfigured
    stream, from its window and ``[ingest.default_sensor]``), LoRA rank, training budget and
    false-alert target from ``[learning]``, the k-of-n rule from ``[alerts]``; ``train`` (a
    ``TrainConfig``) replaces the training settings when given."""
    from pdm_edge.model.adapter import AdapterConfig
    from pdm_edge.model.scorer import ScorerConfig

    def make(stream: str, window: Any = None) -> ScorerConfig | None:
        sensor = cfg.sensors.get(stream)
        if sensor is not None:
            kind, fs, hop = sensor.kind, sensor.sample_rate_hz, sensor.hop_s
        elif window is not None:
            kind, fs, hop = window.kind, window.sample_rate_hz, cfg.ingest.default_sensor.hop_s
        else:
            return None
        return ScorerConfig(kind=kind, sample_rate_hz=fs, hop_s=hop, adapter=AdapterConfig(rank=cfg.learning.lora_rank),
                            train=train if train is not None else train_config_for(cfg),
                            target_false_alerts_per_h=cfg.learning.target_false_alerts_per_h,
                            alert_k=cfg.alerts.k, alert_n=cfg.alerts.n, inference=cfg.learning.inference)

    return make


def train_config_for(cfg: Any) -> Any:
    """The adapter training settings (``TrainConfig``) of an :class:`~pdm_edge.config.AppConfig`'s
    ``[learning]``: step and wall-time budgets, optimiser, micro-batch, gradient checkpointing, frozen-prefix
    cache, memory envelope and augmentation of replay windows."""
    from pdm_edge.model.scorer import TrainConfig

    lc = cfg.learning
    return TrainConfig(max_steps=lc.max_train_steps, max_seconds=lc.max_train_seconds, optimizer=lc.optimizer, micro_batch=lc.micro_batch,
                       grad_checkpointing=lc.grad_checkpointing, prefix_cache=lc.prefix_cache, max_memory_mb=lc.max_memory_mb,
                       aug_gain_db=lc.aug_gain_db, aug_noise_snr_db=lc.aug_noise_snr_db, aug_shift_frames=lc.aug_shift_frames,
                       aug_speed_pct=lc.aug_speed_pct)


def build_learning(cfg: Any, registry: Any, encoder: Any, encoder_sha256: str, *, labels: Any = None,
                   label_windows: Any = None, on_event: Any = None, state_dir: str | Path | None = None,
                   train: Any = None) -> LearningLoop:
    """The :class:`LearningLoop` of an :class:`~pdm_edge.config.AppConfig` (``[learning]``),
    with its state in ``state_dir`` (default ``[feedback] state_dir``); ``train`` overrides the
    adapter training settings (:func:`scorer_config_for`). With ``[fleet] enabled`` and
    ``use_prior``, calibrations start from the fleet prior of the stream's machine class
    (:class:`pdm_edge.fleet.priors.PriorStore`)."""
    lc = cfg.learning
    prior_for = None
    if cfg.fleet.enabled and cfg.fleet.use_prior:
        from pdm_edge.fleet.priors import PriorStore

        prior_for = PriorStore.for_config(cfg, encoder, encoder_sha256).adapter_for
    return LearningLoop(registry, encoder, encoder_sha256, state_dir if state_dir is not None else cfg.feedback.state_dir,
                        scorer_config=scorer_config_for(cfg, train), calibration_s=lc.calibration_s,
                        retrain_after_labels=lc.retrain_after_labels, replay_capacity=lc.replay_normal_windows,
                        gate_fraction=lc.gate_fraction, gate_margin=lc.gate_margin, labels=labels,
                        label_windows=label_windows, nice=lc.nice, on_event=on_event, prior_for=prior_for,
                        confirm_far_above=lc.confirm_far_above or None, confirm_silenced_alerts=lc.confirm_silenced_alerts,
                        resources=ResourceGuard(ResourceLimits(
                            max_load_start=lc.max_load_start, max_load_pause=lc.max_load_pause, max_cpu_temp_c=lc.max_cpu_temp_c,
                            min_battery_percent=lc.min_battery_percent, train_on_battery=lc.train_on_battery,
                            when_sensor_absent=lc.when_sensor_absent)))
