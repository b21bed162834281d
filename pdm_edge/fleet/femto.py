"""FEMTO set A as a fleet: leave-one-bearing-out evaluation of the fleet prior.

The five run-to-failure bearings of FEMTO-ST PRONOSTIA set A (Bearing1_1, 2_1, 2_2, 3_1, 3_2;
three operating conditions) are five appliances of one machine class: the same bearing type,
the same accelerometer (horizontal channel, g) at 25.6 kHz (band ``16-32k``); the operating
condition differs (1800/1650/1500 rpm), as it would between pumps of one type. One window per
0.1 s snapshot, one snapshot every 10 s (as ``pdm-edge eval``'s FEMTO row, DESIGN.md section 5).

For each left-out bearing ``L`` (a fold):

1. **Fleet prior** from the other four: each is an appliance whose replay buffer holds the
   healthy first 10 % of its life. ``rounds`` federated rounds run in-process with the same
   training as the Flower client (:class:`~pdm_edge.model.scorer.Scorer` calibrated from the
   global adapter, :attr:`~pdm_edge.model.scorer.Scorer.prior_adapter`) and Flower's own FedAvg
   aggregation (``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``, weighted by
   windows); optionally with the same client-side clipping and Gaussian noise as the DP
   wrapper (``dp_noise``, ``dp_clip``; epsilon from Flower's RDP accountant). Round-1 updates
   start from the base adapter and do not depend on the fold, so they are computed once.
2. Left-out bearing ``L``, three calibrations, every one scored on its whole life:

   - ``prior_2min``: from the prior, adapter fine-tuned and baseline/threshold fitted on the
     first 2 minutes of ``L`` (12 snapshots);
   - ``scratch_10pct``: from a fresh adapter on the first 10 % of ``L``'s life (the
     appliance's own calibration, ``pdm-edge eval``'s protocol);
   - ``prior_alone_2min``: the prior adapter as it is (no fine-tuning), baseline and threshold
     on the same 2 minutes.
3. Per calibration: sustained alarms (3 of 5 windows above threshold, the appliance's k-of-n
   rule) in the healthy first half of life (false alarms), the first sustained alarm after it,
   lead time before the end of life. ``prior_2min`` *is at least as good as* ``scratch_10pct``
   on a fold when it has no more first-half alarms and a lead time at least as long (no alarm
   counts as lead time 0).

The bearings are read as ``pdm-edge eval`` reads them (:func:`load_bearings`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

BEARINGS = ("Bearing1_1", "Bearing2_1", "Bearing2_2", "Bearing3_1", "Bearing3_2")
FS = 25_600.0
HOP_S = 10.0
TWO_MIN_SNAPSHOTS = 12


@dataclasses.dataclass
class Bearing:
    """One run to failure: ``t_s`` ``(N,)`` seconds since the first snapshot, ``x`` ``(N, 2560)``
    horizontal acceleration in g."""

    name: str
    t_s: np.ndarray
    x: np.ndarray

    @property
    def end_s(self) -> float:
        return float(self.t_s[-1])


def load_bearings(data: Path) -> dict[str, Bearing]:
    """The five set-A bearings from ``{data}/femto_pronostia``, read as ``pdm-edge eval`` reads
    them (:func:`pdm_edge.evaluation.femto_arrays`)."""
    from pdm_edge.evaluation import femto_arrays

    out = {}
    for name in BEARINGS:
        x, t = femto_arrays(data, name)
        out[name] = Bearing(name, t, x.astype(np.float32))
    return out


def alarms(scores: np.ndarray, threshold: float, t_s: np.ndarray, end_s: float) -> dict[str, Any]:
    """Sustained alarms of a bearing's scores (:func:`pdm_edge.evaluation.life_alarms`, the
    appliance's k-of-n rule): count in the first half of life, first alarm after it, lead time."""
    from pdm_edge.evaluation import life_alarms

    a = life_alarms(scores, threshold, t_s, end_s)
    return {"first_half_alarms": a["first_half_alarms"], "sustained_alarms": len(a["raises_s"]),
            "first_alarm_after_half_s": a["first_alarm_after_half_s"], "lead_time_s": a["lead_time_s"],
            "threshold": float(threshold)}


class FleetEval:
    """The leave-one-out evaluation (see the module docstring).

    Args:
        bearings: from :func:`load_bearings`.
        rounds: federated rounds building each prior.
        max_epochs, max_seconds: adapter training budget of every calibration.
        dp_noise, dp_clip, dp_delta: differential privacy of the prior's rounds (0: off).
    """

    def __init__(self, bearings: dict[str, Bearing], *, rounds: int = 2, max_epochs: int = 15, max_seconds: float = 60.0,
                 dp_noise: float = 0.0, dp_clip: float = 1.0, dp_delta: float = 1e-3, log: Any = None) -> None:
        from pdm_edge.fleet.delta import base_adapter
        from pdm_edge.model import load_encoder
        from pdm_edge.model.scorer import ScorerConfig, TrainConfig

        self.bearings = bearings
        self.rounds, self.dp_noise, self.dp_clip, self.dp_delta = rounds, dp_noise, dp_clip, dp_delta
        self.encoder, self.sha = load_encoder()
        self.train = TrainConfig(max_epochs=max_epochs, max_seconds=max_seconds)
        self.config = ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=HOP_S, train=self.train, min_windows=10)
        self.base = base_adapter(self.encoder, self.config.adapter, self.train.seed)
        self.log = log or (lambda m: None)
        self._features: dict[str, np.ndarray] = {}
        self._round1: dict[str, tuple[dict[str, np.ndarray], int]] = {}
        self.rng = np.random.default_rng(0)

    def features(self, name: str) -> np.ndarray:
        """Feature images ``(N, 2, 64, 32)`` of every snapshot of a bearing (cached)."""
        if name not in self._features:
            from pdm_edge.model.scorer import Scorer

            self._features[name] = Scorer(self.encoder, self.sha, self.config).features(self.bearings[name].x)
        return self._features[name]

    def _n10(self, name: str) -> int:
        b = self.bearings[name]
        return int(np.sum(b.t_s <= 0.1 * b.end_s))

    def _calibrate(self, feats: np.ndarray, prior: dict[str, np.ndarray] | None, train_adapter: bool = True) -> Any:
        import torch

        from pdm_edge.model.scorer import Scorer

        cfg = dataclasses.replace(self.config, train_adapter=train_adapter)
        s = Scorer(self.encoder, self.sha, cfg)
        if prior is not None:
            s.prior_adapter = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in prior.items()}
        s.learn_features(feats)
        s.calibrate()
        return s

    def client_update(self, name: str, global_delta: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """One appliance's round: calibrate from base + global on its healthy 10 %; returns the
        delta to the base and its window count (what the Flower client sends)."""
        feats = self.features(name)[: self._n10(name)]
        s = self._calibrate(feats, {k: self.base[k] + global_delta[k] for k in self.base})
        return {k: v.detach().numpy().astype(np.float32) - self.base[k] for k, v in s.adapter.state_dict().items()}, len(feats)

    def prior(self, left_out: str) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """The fleet prior of the other bearings (delta to the base) and each round's record."""
        from flwr.app import RecordDict
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
        from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update, compute_stdv

        from pdm_edge.fleet.client_app import WEIGHT, array_record

        others = [b for b in self.bearings if b != left_out]
        names = sorted(self.base)
        glob = {k: np.zeros_like(v) for k, v in self.base.items()}
        acc = self._accountant(len(others)) if self.dp_noise > 0 else None
        records = []
        for rnd in range(1, self.rounds + 1):
            t0 = time.monotonic()
            replies = []
            for b in others:
                if rnd == 1:
                    if b not in self._round1:
                        self._round1[b] = self.client_update(b, glob)
                    upd, n = self._round1[b]
                else:
                    upd, n = self.client_update(b, glob)
                arrays = [upd[k].copy() for k in names]
                if self.dp_noise > 0 and any(np.any(upd[k] != glob[k]) for k in names):
                    # Flower's fixedclipping_mod: clip the update relative to the global (an
                    # unchanged adapter has norm 0, within any clipping norm)
                    compute_clip_model_update(arrays, [glob[k] for k in names], self.dp_clip)
                from flwr.app import MetricRecord

                replies.append(RecordDict({"arrays": array_record(dict(zip(names, arrays))),
                                           "metrics": MetricRecord({WEIGHT: 1 if self.dp_noise > 0 else n})}))
            agg = aggregate_arrayrecords(replies, WEIGHT)
            new = dict(zip(agg.keys(), agg.to_numpy_ndarrays()))
            eps = None
            if self.dp_noise > 0:
                nd = [new[k] for k in names]
                add_gaussian_noise_inplace(nd, compute_stdv(self.dp_noise, self.dp_clip, len(others)))
                new = dict(zip(names, nd))
                from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

                acc.compose(GaussianPrivacyEvent(noise_multiplier=self.dp_noise, sample_size=len(others), population_size=len(others)))
                eps = float(acc.get_privacy_spent().epsilon)
            change = float(np.sqrt(sum(float(np.sum((new[k] - glob[k]) ** 2)) for k in names)))
            glob = {k: np.asarray(v, np.float32) for k, v in new.items()}
            records.append({"round": rnd, "participants": others, "change_l2": change, "epsilon": eps,
                            "seconds": round(time.monotonic() - t0, 1)})
            self.log(f"  prior without {left_out}: round {rnd} change {change:.3f}" + (f" epsilon {eps:.2f}" if eps else ""))
        return glob, records

    def _accountant(self, n: int) -> Any:
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        return RdpAccountant(PrivacyConfig(target_delta=self.dp_delta, population_size=n,
                                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           sampling_method=SamplingMethod.NO_AMPLIFICATION))

    def fold(self, left_out: str) -> dict[str, Any]:
        """Every calibration of one left-out bearing, scored on its whole life."""
        b = self.bearings[left_out]
        feats = self.features(left_out)
        prior_delta, rounds = self.prior(left_out)
        prior = {k: self.base[k] + prior_delta[k] for k in self.base}
        variants = {
            "prior_2min": (feats[:TWO_MIN_SNAPSHOTS], prior, True),
            "scratch_10pct": (feats[: self._n10(left_out)], None, True),
            "prior_alone_2min": (feats[:TWO_MIN_SNAPSHOTS], prior, False),
        }
        out: dict[str, Any] = {"snapshots": len(feats), "end_of_life_s": b.end_s, "prior_rounds": rounds, "methods": {}}
        for name, (cal, pri, train) in variants.items():
            t0 = time.monotonic()
            s = self._calibrate(cal, pri, train)
            scores = np.concatenate([s.score_features(feats[i:i + 256]) for i in range(0, len(feats), 256)])
            row = alarms(scores, float(s.threshold), b.t_s, b.end_s)
            row.update(calibration_windows=len(cal), seconds=round(time.monotonic() - t0, 1))
            out["methods"][name] = row
            self.log(f"  {left_out} {name}: {json.dumps(row)}")
        p, s_ = out["methods"]["prior_2min"], out["methods"]["scratch_10pct"]
        out["prior_2min_at_least_as_good"] = bool(p["first_half_alarms"] <= s_["first_half_alarms"]
                                                  and (p["lead_time_s"] or 0.0) >= (s_["lead_time_s"] or 0.0))
        return out

    def run(self, folds: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Every fold; the summary counts the folds where ``prior_2min`` is at least as good."""
        t0 = time.monotonic()
        res = {}
        for name in folds or tuple(self.bearings):
            self.log(f"fold {name}")
            res[name] = self.fold(name)
        good = sum(r["prior_2min_at_least_as_good"] for r in res.values())
        return {"folds": res, "prior_2min_at_least_as_good_folds": good, "n_folds": len(res),
                "settings": {"rounds": self.rounds, "max_epochs": self.train.max_epochs, "max_seconds": self.train.max_seconds,
                             "dp_noise": self.dp_noise, "dp_clip": self.dp_clip, "dp_delta": self.dp_delta,
                             "encoder_sha256": self.sha}, "seconds": round(time.monotonic() - t0, 1)}
