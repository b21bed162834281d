"""``pdm-edge eval``: the evaluation protocol v2 of DESIGN.md section 5 on real recordings.

Every dataset row reports pdm-edge's figure beside peers computed in the same run, on the same
windows, with the same threshold rule, and the frozen-encoder ablation:

- ``pdm_edge``: the product's scorer (frozen encoder + adapter trained on the calibration side,
  the default :class:`~pdm_edge.model.scorer.ScorerConfig` of the sensor kind).
- ``pdm_edge_frozen``: ablation, the same scorer without adapter training (untrained LoRA /
  head = the frozen encoder; the measures that need a trained adapter are dropped).
- ``mahalanobis``: Ledoit-Wolf Mahalanobis distance on the hand-crafted spectral features
  (:func:`pdm_edge.features.handcrafted_features`); also the "hand-crafted features alone"
  ablation.
- ``iforest``: scikit-learn IsolationForest on the same features (200 trees, seed 0).
- ``rms_z``: RMS z-score of log RMS (one-sided: a fault adds energy).
- ``kurtosis_z``: kurtosis z-score (the "kurtosis 2-sigma" first-prediction-time rule of the
  bearing-prognostics literature, e.g. Lei et al. 2018, with the common threshold rule below
  instead of a fixed 2 sigma).
- ``knn_spectrum``: mean Euclidean distance to the 5 nearest calibration windows of the
  standardised band spectrum (log-mel for acoustic, log band PSD for vibration: the frame mean
  of feature channel 0).
- ``iso_velocity_z`` (vibration only): the ISO 20816-3 severity measure as a detector, the
  z-score of log velocity RMS over 10-1000 Hz (mm/s, :func:`pdm_edge.condition.velocity_rms_mm_s`)
  against the calibration windows (one-sided).
- ``twfr_gmm`` (acoustic only): the time-weighted frequency representation with a Gaussian
  mixture after Guan et al. 2023 (arXiv 2310.14173): per log-mel band, frames sorted in
  decreasing order and averaged with global weighted ranking pooling weights ``r**i``
  (``r = 0.9`` fixed a priori, between mean (1) and max (0) pooling; the paper tunes ``r`` per
  machine type, which this protocol does not allow), then the negative log-likelihood under a
  2-component full-covariance GMM (scikit-learn, seed 0).

Threshold rule, the same for every method (:func:`_calibrate_threshold`): fit on the first
80 % of the calibration windows, score the last 20 %, take
:func:`pdm_edge.model.postprocess.threshold_from_held_out` at the per-window exceedance probability of
the 3-of-5 alert rule, then refit on all of them (the product computes its own held-out scores
by cross-fitting, with the same bound).

Rows (nothing is tuned on a test side; no setting is chosen per dataset):

- **CWRU** (sanity): 0.25 s windows, 50 % hop; calibrate on the first half of
  ``normal_0_97.mat``, test its second half against every fault file at the same rate (the
  12 kHz row resamples the 48 kHz normal recording). Window ROC AUC.
- **DCASE 2023 valve** (acoustic, source domain): 1 s windows, 50 % hop; calibrate on the 2
  train normals and the test normals with clip index < 25; test the other normals against all
  anomalies. A clip's score is its **alert statistic** (:func:`alert_statistic`: the largest
  ``k``-th highest window score over any ``n`` consecutive windows, so the clip raises a k-of-n
  alert exactly when it exceeds the threshold); the mean of the window scores is reported too
  (``auc_mean``). ROC AUC and pAUC (FPR <= 0.1, McClish-standardised as the DCASE evaluator).
- **FEMTO PRONOSTIA**, the five set-A bearings (Bearing3_1 from its CSV folder; Bearing1_1,
  2_1, 2_2, 3_2 from ``compact/``), one window per 0.1 s snapshot (one every 10 s); calibrate
  on the first 10 % of life; the first half of life counts as healthy. A *sustained alarm* is
  a raise of the product's k-of-n debouncer (3 of 5). Per bearing: sustained alarms in the
  first half (an alert still raised at half-life counts there), the first raise after it, its
  lead time before the end of life, and whether the bearing was in alarm before failure at
  all. The ``femto`` summary row totals them.
- **Simulated technician** (``technician``; FEMTO and DCASE): replay in time order through
  the product's feedback path and learning loop; each sustained alarm in the first half of a
  bearing's life (FEMTO) or on a normal clip of the DCASE live side is labelled ``normal`` once
  and the loop retrains and gates before the replay goes on.
- **Feedback curve** (``feedback``): DCASE valve, 0 / 1 / 5 / 10 labelled events.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pdm_edge import features
from pdm_edge.alerts.debounce import DEFAULT_K, DEFAULT_N, KOfN, alert_statistic
from pdm_edge.errors import PdmEdgeError
from pdm_edge.model.encoder import Encoder
from pdm_edge.model.postprocess import exceedance_probability, threshold_from_held_out
from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig

METHODS = ("pdm_edge", "pdm_edge_frozen", "mahalanobis", "iforest", "rms_z", "kurtosis_z", "knn_spectrum", "iso_velocity_z",
           "twfr_gmm")
"""Every method of the protocol; ``twfr_gmm`` runs on acoustic rows only, ``iso_velocity_z`` on
vibration rows only."""
ALERT_K, ALERT_N = DEFAULT_K, DEFAULT_N
FALSE_ALERTS_PER_H = 0.1
TWFR_R = 0.9
KNN_K = 5
FEMTO_BEARINGS = ("Bearing3_1", "Bearing1_1", "Bearing2_1", "Bearing2_2", "Bearing3_2")


def methods_for(kind: str) -> tuple[str, ...]:
    """The methods that apply to a sensor kind."""
    skip = "iso_velocity_z" if kind == "acoustic" else "twfr_gmm"
    return tuple(m for m in METHODS if m != skip)


def _windows(x: np.ndarray, n: int, hop: int) -> np.ndarray:
    if x.size < n:
        return np.zeros((0, n), np.float32)
    starts = np.arange(0, x.size - n + 1, hop)
    return np.stack([x[s:s + n] for s in starts]).astype(np.float32)


# -- methods ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Calibrated:
    """A method fitted on calibration windows: ``score(windows) -> (B,)`` and its threshold."""

    score: Callable[[np.ndarray], np.ndarray]
    threshold: float
    fit_seconds: float


def _split(n: int) -> int:
    return n - max(2, int(round(0.2 * n)))


def _kurtosis(w: np.ndarray) -> np.ndarray:
    from scipy import stats

    return stats.kurtosis(w.astype(np.float64), axis=-1, fisher=False)


def _peer_fit(name: str, w: np.ndarray, fs: float, kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """Fit peer ``name`` on windows ``w`` ``(N, n)``; returns its scoring function."""
    from sklearn.covariance import LedoitWolf
    from sklearn.ensemble import IsolationForest
    from sklearn.mixture import GaussianMixture
    from sklearn.neighbors import NearestNeighbors

    if name == "rms_z":
        r = np.log(features.rms(w).astype(np.float64))
        mu, sd = r.mean(), max(r.std(ddof=1), 1e-9)
        return lambda x: (np.log(features.rms(x).astype(np.float64)) - mu) / sd
    if name == "iso_velocity_z":
        from pdm_edge.condition import velocity_rms_mm_s

        v = np.log(velocity_rms_mm_s(w, fs, "g") + 1e-9)
        mu, sd = v.mean(), max(v.std(ddof=1), 1e-9)
        return lambda x: (np.log(velocity_rms_mm_s(x, fs, "g") + 1e-9) - mu) / sd
    if name == "kurtosis_z":
        k = _kurtosis(w)
        mu, sd = k.mean(), max(k.std(ddof=1), 1e-9)
        return lambda x: (_kurtosis(x) - mu) / sd
    if name == "twfr_gmm":
        weights = TWFR_R ** np.arange(features.N_FRAMES)
        weights /= weights.sum()

        def twfr(x: np.ndarray) -> np.ndarray:
            spec = features.encoder_input(x, fs, kind)[:, 0]  # (B, 64, 32) log-mel, dB
            return (np.sort(spec, axis=-1)[..., ::-1] * weights).sum(axis=-1).astype(np.float64)

        f = twfr(w)
        mu, sd = f.mean(axis=0), np.maximum(f.std(axis=0), 1e-6)
        gmm = GaussianMixture(n_components=2, covariance_type="full", reg_covar=1e-3, random_state=0).fit((f - mu) / sd)
        return lambda x: -gmm.score_samples((twfr(x) - mu) / sd)
    f = features.handcrafted_features(w, fs, kind).astype(np.float64)
    if name == "knn_spectrum":
        f = f[:, : features.N_BANDS]
    mu, sd = f.mean(axis=0), np.maximum(f.std(axis=0), 1e-6)

    def feats(x: np.ndarray) -> np.ndarray:
        g = features.handcrafted_features(x, fs, kind).astype(np.float64)
        return ((g[:, : features.N_BANDS] if name == "knn_spectrum" else g) - mu) / sd

    if name == "mahalanobis":
        lw = LedoitWolf().fit((f - mu) / sd)
        return lambda x: np.sqrt(np.maximum(lw.mahalanobis(feats(x)), 0.0))
    if name == "iforest":
        forest = IsolationForest(n_estimators=200, random_state=0).fit((f - mu) / sd)
        return lambda x: -forest.score_samples(feats(x))
    if name == "knn_spectrum":
        nn_ = NearestNeighbors(n_neighbors=min(KNN_K, len(f))).fit((f - mu) / sd)
        return lambda x: nn_.kneighbors(feats(x))[0].mean(axis=1)
    raise ValueError(name)


def _feature_method(name: str, cal: np.ndarray, fs: float, kind: str, p: float) -> Calibrated:
    t0 = time.monotonic()
    k = _split(len(cal))
    held = _peer_fit(name, cal[:k], fs, kind)(cal[k:])
    threshold = threshold_from_held_out(held, p)
    return Calibrated(_peer_fit(name, cal, fs, kind), threshold, time.monotonic() - t0)


def product_config(kind: str, fs: float, hop_s: float, train: TrainConfig, *, train_adapter: bool = True,
                   min_windows: int = 20) -> ScorerConfig:
    """The product's default scorer configuration for a sensor kind (the same one ``pdm-edge
    run`` builds from a sensor's config), with the evaluation's training budget."""
    return ScorerConfig(kind=kind, sample_rate_hz=fs, hop_s=hop_s, train_adapter=train_adapter, train=train,
                        alert_k=ALERT_K, alert_n=ALERT_N, target_false_alerts_per_h=FALSE_ALERTS_PER_H, min_windows=min_windows)


def _pdm_method(encoder: Encoder, sha: str, cal: np.ndarray, fs: float, kind: str, hop_s: float,
                train_adapter: bool, train: TrainConfig) -> Calibrated:
    t0 = time.monotonic()
    cfg = product_config(kind, fs, hop_s, train, train_adapter=train_adapter, min_windows=min(20, len(cal)))
    s = Scorer(encoder, sha, cfg).learn_many(cal)
    s.calibrate()
    return Calibrated(lambda x: np.concatenate([s.score_windows(x[i:i + 128]) for i in range(0, len(x), 128)]) if len(x) else np.zeros(0),
                      float(s.threshold), time.monotonic() - t0)  # type: ignore[arg-type]


def calibrate_all(encoder: Encoder, sha: str, cal: np.ndarray, fs: float, kind: str, hop_s: float,
                  train: TrainConfig, methods: tuple[str, ...] | None = None) -> dict[str, Calibrated]:
    """Fit every method on the same calibration windows ``cal`` of shape ``(N, n)``."""
    p = exceedance_probability(FALSE_ALERTS_PER_H, hop_s, ALERT_K, ALERT_N)
    out = {}
    for m in methods or methods_for(kind):
        if m == "pdm_edge":
            out[m] = _pdm_method(encoder, sha, cal, fs, kind, hop_s, True, train)
        elif m == "pdm_edge_frozen":
            out[m] = _pdm_method(encoder, sha, cal, fs, kind, hop_s, False, train)
        else:
            out[m] = _feature_method(m, cal, fs, kind, p)
    return out


def _auc(y: np.ndarray, s: np.ndarray, max_fpr: float | None = None) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s, max_fpr=max_fpr))


# -- datasets -------------------------------------------------------------------------------------
def eval_cwru(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool = False) -> dict[str, Any]:
    """Both CWRU rows (12 kHz and 48 kHz); see the module docstring."""
    from sample_data.loaders import load_cwru

    normal = load_cwru(data / "cwru" / "normal_48k" / "normal_0_97.mat")
    x48 = normal.concatenated()
    out: dict[str, Any] = {}
    for rate, folder in ((12000.0, "de_12k"), (48000.0, "de_48k")):
        x = x48 if rate == 48000.0 else features.resample(x48[None], 48000.0, 12000.0)[0]
        n, hop = round(0.25 * rate), round(0.125 * rate)
        half = x.size // 2
        cal, test_normal = _windows(x[:half], n, hop), _windows(x[half:], n, hop)
        files = sorted((data / "cwru" / folder).glob("*.mat"))
        if subset:
            files = files[::4]
        faults = {f.stem: _windows(load_cwru(f).concatenated(), n, hop) for f in files}
        methods = calibrate_all(encoder, sha, cal, rate, "vibration", 0.125, train)
        y = np.r_[np.zeros(len(test_normal)), np.ones(sum(len(v) for v in faults.values()))]
        row: dict[str, Any] = {"sample_rate_hz": rate, "calibration_windows": len(cal), "test_normal_windows": len(test_normal),
                               "fault_windows": int(y.sum()), "fault_files": list(faults), "methods": {}, "roc": {}}
        for m, c in methods.items():
            sn = c.score(test_normal)
            per_file = {k: _auc(np.r_[np.zeros(len(sn)), np.ones(len(v))], np.r_[sn, sf]) for k, v in faults.items()
                        for sf in [c.score(v)]}
            allf = np.concatenate([c.score(v) for v in faults.values()])
            s = np.r_[sn, allf]
            row["methods"][m] = {"auc": _auc(y, s), "auc_min_file": min(per_file.values()), "auc_per_file": per_file,
                                 "false_alarm_fraction": float(np.mean(sn > c.threshold)),
                                 "detected_fraction": float(np.mean(allf > c.threshold)), "fit_seconds": round(c.fit_seconds, 2)}
            row["roc"][m] = (y, s)
        out[f"cwru_{int(rate // 1000)}k"] = row
    return out


def _dcase_split(data: Path, subset: bool) -> tuple[list, list]:
    from sample_data.loaders import dcase_clips

    clips = dcase_clips(data / "dcase2023_task2" / "valve")
    cal_clips = [c for c in clips if c[1] == "train" or (c[2] == "normal" and c[3] < 25)]
    test_clips = [c for c in clips if c[1] == "test" and not (c[2] == "normal" and c[3] < 25)]
    if subset:
        cal_clips, test_clips = cal_clips[:8], test_clips[::8]
    return cal_clips, test_clips


def eval_dcase_valve(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool = False) -> dict[str, Any]:
    """DCASE 2023 valve, source domain; see the module docstring."""
    from sample_data.loaders import load_wav

    cal_clips, test_clips = _dcase_split(data, subset)
    fs = 16000.0
    n, hop = 16000, 8000

    def clip_windows(c: tuple) -> np.ndarray:
        return _windows(load_wav(c[0]).concatenated(), n, hop)

    cal = np.concatenate([clip_windows(c) for c in cal_clips])
    test = [clip_windows(c) for c in test_clips]
    y = np.array([1.0 if c[2] == "anomaly" else 0.0 for c in test_clips])
    methods = calibrate_all(encoder, sha, cal, fs, "acoustic", 0.5, train)
    row: dict[str, Any] = {"calibration_clips": len(cal_clips), "calibration_windows": len(cal), "test_clips": len(test_clips),
                           "test_anomalies": int(y.sum()), "clip_score": "alert statistic (3 of 5)", "methods": {}, "roc": {}}
    for m, c in methods.items():
        per_clip = [c.score(w) for w in test]
        s = np.array([alert_statistic(v) for v in per_clip])
        s_mean = np.array([float(np.mean(v)) for v in per_clip])
        row["methods"][m] = {"auc": _auc(y, s), "pauc": _auc(y, s, max_fpr=0.1), "auc_mean": _auc(y, s_mean),
                             "normal_clips_alerting": float(np.mean(s[y == 0] > c.threshold)),
                             "anomaly_clips_alerting": float(np.mean(s[y == 1] > c.threshold)),
                             "fit_seconds": round(c.fit_seconds, 2)}
        row["roc"][m] = (y, s)
    return {"dcase_valve": row}


def load_femto_bearing(data: Path, name: str):
    """A set-A FEMTO bearing as a :class:`sample_data.loaders.Recording` (Bearing3_1 from its CSV
    folder, the others from ``compact/``)."""
    from sample_data.loaders import load_femto, load_femto_compact

    root = data / "femto_pronostia"
    if (root / "Learning_set" / name).is_dir():
        return load_femto(root / "Learning_set" / name)
    return load_femto_compact(root / "compact" / f"{name}.npz")


def femto_arrays(data: Path, name: str, subset: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A set-A FEMTO bearing's snapshots ``(T, 2560)`` float32 (g, horizontal) and their times
    ``(T,)`` s since the first; ``subset``: the first tenth of life and every fourth snapshot
    after it."""
    rec = load_femto_bearing(data, name)
    segs = rec.segments
    t = np.array([(s.start_ns - segs[0].start_ns) / 1e9 for s in segs])
    x = np.stack([s.samples for s in segs])
    if subset:
        keep = np.r_[np.arange(0, len(x) // 10 + 1), np.arange(len(x) // 10 + 1, len(x), 4)]
        x, t = x[keep], t[keep]
    return x, t


def life_alarms(scores: np.ndarray, threshold: float, t: np.ndarray, end_s: float, window_s: float = 0.1) -> dict[str, Any]:
    """Sustained alarms of the 3-of-5 debouncer over a run to failure.

    Args:
        scores: ``(T,)`` window scores in time order; ``t``: ``(T,)`` their start times, s.
        threshold: the method's threshold; ``end_s``: end of life, s (half of it is healthy).

    Returns:
        raises (s), first-half alarms (a raise in the first half, or an alert still raised at
        half-life), the first raise after half-life, its lead time before the end, and whether
        an alert was raised before the end at all.
    """
    deb = KOfN(ALERT_K, ALERT_N)
    raises, spans = [], []
    for i, v in enumerate(scores):
        ev = deb.update(float(v), threshold, int(t[i] * 1e9), int((t[i] + window_s) * 1e9))
        if ev is not None and ev.state == "raised":
            raises.append(ev.start_ns / 1e9)
        elif ev is not None:
            spans.append((ev.start_ns / 1e9, ev.end_ns / 1e9))
    half = 0.5 * end_s
    first_half = [a for a in raises if a <= half]
    after = [a for a in raises if a > half]
    first = after[0] if after else None
    alarmed = bool(raises)
    return {"raises_s": raises, "first_half_alarms": len(first_half), "first_alarm_after_half_s": first,
            "lead_time_s": None if first is None else float(end_s - first),
            "alarmed_before_failure": alarmed, "in_alarm_at_end": deb.active}


def rms_profile(x: np.ndarray, t: np.ndarray, end_s: float) -> list[float]:
    """The median horizontal RMS (g) of each tenth of a bearing's life, relative to the first
    tenth (the calibration part): ``x`` ``(T, n)`` snapshots in g, ``t`` ``(T,)`` s. It shows
    what no detector can change: whether the "healthy" first half is flat (Bearing3_1 after
    run-in) or already degrading. 10 floats, the first 1.0."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=1))
    tenth = np.minimum((t / end_s * 10).astype(int), 9)
    med = [float(np.median(rms[tenth == i])) if np.any(tenth == i) else float("nan") for i in range(10)]
    return [round(m / med[0], 2) for m in med]


def eval_femto(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool = False,
               bearings: tuple[str, ...] = FEMTO_BEARINGS) -> dict[str, Any]:
    """The FEMTO set-A bearings, run to failure; see the module docstring."""
    out: dict[str, Any] = {}
    for name in bearings:
        x, t = femto_arrays(data, name, subset)
        end_s = float(t[-1])
        n_cal = int(np.sum(t <= 0.1 * end_s))
        methods = calibrate_all(encoder, sha, x[:n_cal], 25600.0, "vibration", 10.0, train)
        row: dict[str, Any] = {"snapshots": len(x), "calibration_snapshots": n_cal, "end_of_life_s": end_s,
                               "healthy_until_s": 0.5 * end_s, "rms_by_tenth_of_life": rms_profile(x, t, end_s),
                               "methods": {}, "series": {"t_s": t.tolist()}}
        for m, c in methods.items():
            s = c.score(x)
            a = life_alarms(s, c.threshold, t, end_s)
            row["methods"][m] = {"false_alarms_healthy_half": a["first_half_alarms"], "sustained_alarms": len(a["raises_s"]),
                                 "first_alarm_after_healthy_half_s": a["first_alarm_after_half_s"], "lead_time_s": a["lead_time_s"],
                                 "alarmed_before_failure": a["alarmed_before_failure"], "threshold": c.threshold,
                                 "fit_seconds": round(c.fit_seconds, 2)}
            row["series"][m] = {"score": s.tolist(), "threshold": c.threshold, "alarms_s": a["raises_s"]}
        out[f"femto_{name.lower()}"] = row
    out["femto"] = femto_summary(out)
    return out


def femto_summary(rows: dict[str, Any]) -> dict[str, Any]:
    """Totals over the FEMTO bearings per method: first-half alarms, bearings without one,
    bearings alarmed before failure, median lead time (s; a bearing without a second-half
    raise counts as 0 s)."""
    per = [r for k, r in rows.items() if k.startswith("femto_") and "methods" in r]
    summary: dict[str, Any] = {"bearings": len(per), "methods": {}}
    if not per:
        return summary
    for m in per[0]["methods"]:
        ms = [r["methods"][m] for r in per]
        leads = [v["lead_time_s"] or 0.0 for v in ms]
        summary["methods"][m] = {
            "false_alarms_healthy_half": int(sum(v["false_alarms_healthy_half"] for v in ms)),
            "bearings_without_first_half_alarm": int(sum(v["false_alarms_healthy_half"] == 0 for v in ms)),
            "bearings_alarmed_before_failure": int(sum(bool(v["alarmed_before_failure"]) for v in ms)),
            "median_lead_time_s": float(np.median(leads)),
        }
    return summary


FEEDBACK_EVENTS = (0, 1, 5, 10)


class _Appliance:
    """One stream through the product's own learning path, in a temporary state directory:
    scoring stage, learning loop (replay buffer, training, gate, registry), feedback (ring of
    recent windows, label book, labelled-window buffer). Used by the feedback curve and the
    simulated technician, so that what they measure is what the appliance does."""

    def __init__(self, d: str, encoder: Encoder, sha: str, cfg: ScorerConfig, stream: str) -> None:
        from pdm_edge.feedback import Feedback, LabelBook, LabelledWindowBuffer, RecentWindows
        from pdm_edge.learning import LearningLoop
        from pdm_edge.registry import Registry
        from pdm_edge.pipeline.scoring import ScoringStage

        self.stream = stream
        self.site, self.machine, self.sensor = stream.split("/")
        self.encoder, self.sha = encoder, sha
        self.registry = Registry(Path(d) / "registry")
        self.book, self.buffer = LabelBook.in_dir(d), LabelledWindowBuffer.in_dir(d, max_bytes=2 * 1024**3)
        self.feedback = Feedback(self.book, self.buffer, RecentWindows(10**7, 1024**3))
        self.loop = LearningLoop(self.registry, encoder, sha, d, scorer_config=lambda s, w=None: cfg, calibration_s=10**9,
                                 labels=self.book, label_windows=self.buffer)
        self.stage = ScoringStage.following(self.loop)
        self.feedback.subscribe(self.loop.take_label)

    def calibrate(self, windows: list) -> Any:
        """Collect ``windows`` and run the initial calibration; returns the job."""
        self.stage.handle_many(windows)
        self.loop.enqueue(self.stream, "initial")
        job = self.loop.run_pending()[0]
        if job.version is None:
            raise PdmEdgeError(f"{self.stream}: initial calibration failed: {job.detail}")
        return job

    def score(self, windows: list) -> np.ndarray:
        """Score windows with the active version (they also enter the ring and the replay buffer)."""
        self.feedback.observe_many(windows)
        return np.array([sc.score for _, sc in self.stage.handle_many(windows)])

    def label(self, start_ns: int, end_ns: int, kind: str, note: str) -> None:
        self.feedback.submit(site=self.site, machine=self.machine, sensor=self.sensor, start_ns=start_ns, end_ns=end_ns,
                             kind=kind, fault_type="other" if kind == "fault" else None, author="eval", note=note)
        self.feedback.sync()

    def retrain(self) -> Any:
        """A label-triggered retrain through the gate; returns the job (its version may be rejected)."""
        self.loop.enqueue(self.stream, "labels")
        return self.loop.run_pending()[0]

    def active(self) -> Scorer | None:
        rec = self.registry.active(self.site, self.machine, self.sensor)
        return self.registry.load(rec.id, self.encoder, self.sha) if rec else None

    def close(self) -> None:
        self.stage.close()
        self.loop.close()
        self.feedback.close()
        self.registry.close()


def _valve_windows(clip: tuple, t0_ns: int) -> list:
    from pdm_edge.types import Window
    from sample_data.loaders import load_wav

    x = _windows(load_wav(clip[0]).concatenated(), 16000, 8000)
    return [Window("dcase", "valve", "mic", "acoustic", t0_ns + i * 500_000_000, 16000.0, "Pa", x[i], i) for i in range(len(x))]


def eval_feedback_curve(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool = False) -> dict[str, Any]:
    """The feedback learning curve on DCASE 2023 valve (DESIGN.md section 5), through the
    product's own feedback path and training loop.

    Split (all labels from the calibration side, the clips with index < 25):

    - calibration: the 2 train normals and the test normals with index < 13 (the initial
      calibration, ``trigger = "initial"``);
    - live: the test normals with index 13-24 and the anomalies with index < 25, replayed
      through the scoring stage after calibration. A technician reviews them in the order the
      dashboard ranks them (highest clip score first, clip score = :func:`alert_statistic`) and
      labels each: a normal clip as ``normal`` (a false alarm), an anomaly as ``fault``
      (``other``);
    - test: the normals with index >= 25 against the anomalies with index >= 25, never labelled.

    For each number of labelled events in :data:`FEEDBACK_EVENTS` the labels are submitted
    through :meth:`pdm_edge.feedback.Feedback.submit`, a retrain runs in the learning loop
    (replay buffer + labelled windows, gate), and the trained candidate scores the test clips.
    Reported per step: ROC AUC and pAUC of the candidate, its gate decision, the share of the
    test clips that raise an alert, and of the labelled false-alarm clips' windows above
    threshold.
    """
    import tempfile

    from sample_data.loaders import dcase_clips

    clips = dcase_clips(data / "dcase2023_task2" / "valve")
    cal = [c for c in clips if c[1] == "train" or (c[2] == "normal" and c[3] < 13)]
    live = [c for c in clips if c[1] == "test" and c[3] < 25 and not (c[2] == "normal" and c[3] < 13)]
    test = [c for c in clips if c[1] == "test" and c[3] >= 25]
    if subset:
        cal, live, test = cal[:6], live[::3], test[::5]
    clip_gap_ns = 30 * 10**9
    cfg = product_config("acoustic", 16000.0, 0.5, train, min_windows=10)
    with tempfile.TemporaryDirectory(prefix="pdm-edge-feedback-") as d:
        app = _Appliance(d, encoder, sha, cfg, "dcase/valve/mic")
        try:
            first = app.calibrate([w for i, c in enumerate(cal) for w in _valve_windows(c, i * clip_gap_ns)])
            t_live = len(cal) * clip_gap_ns
            live_w = {c[0].name: _valve_windows(c, t_live + i * clip_gap_ns) for i, c in enumerate(live)}
            live_score = {name: alert_statistic(app.score(ws)) for name, ws in live_w.items()}
            order = sorted(live, key=lambda c: -live_score[c[0].name])
            test_w = [np.stack([w.samples for w in _valve_windows(c, 0)]) for c in test]
            y = np.array([1.0 if c[2] == "anomaly" else 0.0 for c in test])
            steps = []
            labelled: list[tuple] = []
            for n_events in FEEDBACK_EVENTS:
                for c in order[len(labelled):n_events]:
                    ws = live_w[c[0].name]
                    app.label(ws[0].start_ns, ws[-1].end_ns, "fault" if c[2] == "anomaly" else "normal", f"feedback curve: {c[0].name}")
                    labelled.append(c)
                job = first if n_events == 0 else app.retrain()
                rec = app.registry.get(job.version) if job.version else None
                scorer = app.registry.load(rec.id, encoder, sha) if rec else None
                if scorer is None:
                    steps.append({"labelled_events": n_events, "error": job.detail})
                    continue
                thr = float(scorer.threshold)  # type: ignore[arg-type]
                s_clip = np.array([alert_statistic(scorer.score_windows(w)) for w in test_w])
                fa_clips = [c for c in labelled if c[2] == "normal"]
                fa_above = (float(np.mean(np.concatenate([scorer.score_windows(np.stack([w.samples for w in live_w[c[0].name]]))
                                                          for c in fa_clips]) > thr)) if fa_clips else None)
                steps.append({
                    "labelled_events": n_events,
                    "labels": {"normal": sum(c[2] == "normal" for c in labelled), "fault": sum(c[2] == "anomaly" for c in labelled)},
                    "auc": _auc(y, s_clip), "pauc": _auc(y, s_clip, max_fpr=0.1),
                    "version": rec.id, "status": rec.status, "gate": rec.reason,
                    "test_normal_clips_alerting": float(np.mean(s_clip[y == 0] > thr)),
                    "test_anomaly_clips_alerting": float(np.mean(s_clip[y == 1] > thr)),
                    "labelled_false_alarm_windows_above_threshold": fa_above,
                    "train_seconds": (rec.training_summary or {}).get("train_seconds"),
                })
        finally:
            app.close()
    return {"dcase_valve_feedback": {"calibration_clips": len(cal), "live_clips": len(live), "test_clips": len(test),
                                     "test_anomalies": int(y.sum()), "steps": steps}}


MAX_TECHNICIAN_LABELS = 10
"""A simulated technician labels at most this many false alarms per stream (a safeguard; the
report says how many it used)."""
TECHNICIAN_DELAY_S = 600.0
"""How long after a FEMTO alert's raise the simulated technician labels it (stream time): the
label covers the alert's span so far, as a technician who looks at the dashboard some minutes
after an alert would mark it."""


def _technician_femto(data: Path, encoder: Encoder, sha: str, train: TrainConfig, name: str, subset: bool) -> dict[str, Any]:
    import tempfile

    from pdm_edge.types import Window

    x, t = femto_arrays(data, name, subset)
    end_s = float(t[-1])
    n_cal = int(np.sum(t <= 0.1 * end_s))
    cfg = product_config("vibration", 25600.0, 10.0, train, min_windows=min(20, n_cal))
    ws = [Window("femto", name.lower(), "h-accel", "vibration", int(t[i] * 1e9), 25600.0, "g", x[i], i) for i in range(len(x))]
    labels, events, raises = 0, [], []
    scores = np.full(len(ws), np.nan)
    thresholds = np.full(len(ws), np.nan)
    with tempfile.TemporaryDirectory(prefix="pdm-edge-technician-") as d:
        app = _Appliance(d, encoder, sha, cfg, f"femto/{name.lower()}/h-accel")
        try:
            app.calibrate(ws[:n_cal])
            deb = KOfN(ALERT_K, ALERT_N)
            scorer = app.active()
            raised_at: int | None = None
            for i in range(n_cal, len(ws)):
                s = float(app.score([ws[i]])[0])
                thr = float(scorer.threshold)  # type: ignore[union-attr]
                scores[i], thresholds[i] = s, thr
                ev = deb.update(s, thr, ws[i].start_ns, ws[i].end_ns)
                if ev is not None and ev.state == "raised":
                    raises.append(float(t[i]))
                    if t[i] <= 0.5 * end_s and raised_at is None:
                        raised_at = i
                if raised_at is None or t[i] - t[raised_at] < TECHNICIAN_DELAY_S:
                    continue
                # the technician looks at the first-half alert TECHNICIAN_DELAY_S after its raise
                # and labels its span so far as normal, once
                if labels < MAX_TECHNICIAN_LABELS:
                    labels += 1
                    app.label(ws[raised_at].start_ns, ws[i].end_ns, "normal", f"simulated technician: false alarm {labels}")
                    job = app.retrain()
                    rec = app.registry.get(job.version) if job.version else None
                    events.append({"at_s": float(t[i]), "raised_at_s": float(t[raised_at]), "version": rec.id if rec else None,
                                   "status": rec.status if rec else "failed", "gate": rec.reason if rec else job.detail,
                                   "covers_raises_s": [r for r in raises if t[raised_at] <= r <= t[i]]})
                    scorer = app.active()
                    deb = KOfN(ALERT_K, ALERT_N)  # the technician closed the labelled alert
                raised_at = None
        finally:
            app.close()
    live = ~np.isnan(scores)
    labelled_raises = {r for e in events for r in e["covers_raises_s"]}  # re-raises inside a labelled span too
    first_half_left = [r for r in raises if r <= 0.5 * end_s and r not in labelled_raises]
    after = [r for r in raises if r > 0.5 * end_s]
    return {"labels_used": labels, "retrains": events, "first_half_alarms_left": len(first_half_left),
            "first_alarm_after_half_s": after[0] if after else None,
            "lead_time_s": float(end_s - after[0]) if after else None, "alarmed_before_failure": bool(after),
            "series": {"t_s": t.tolist(), "score": np.where(live, scores, np.nan).tolist(), "threshold": thresholds.tolist()}}


def _technician_dcase(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool) -> dict[str, Any]:
    import tempfile

    cal_clips, test_clips = _dcase_split(data, subset)
    # the calibration side in time order: the first half calibrates, the rest is the live side
    # (normal clips only: the calibration side holds no anomaly)
    cut = max(2, len(cal_clips) // 2)
    cal, live = cal_clips[:cut], cal_clips[cut:]
    gap = 30 * 10**9
    cfg = product_config("acoustic", 16000.0, 0.5, train, min_windows=10)
    events = []
    with tempfile.TemporaryDirectory(prefix="pdm-edge-technician-") as d:
        app = _Appliance(d, encoder, sha, cfg, "dcase/valve/mic")
        try:
            app.calibrate([w for i, c in enumerate(cal) for w in _valve_windows(c, i * gap)])
            scorer = app.active()
            t0 = len(cal) * gap
            alerting_before = 0
            for i, c in enumerate(live):
                ws = _valve_windows(c, t0 + i * gap)
                sc = app.score(ws)
                if alert_statistic(sc) <= float(scorer.threshold) or len(events) >= MAX_TECHNICIAN_LABELS:  # type: ignore[union-attr]
                    continue
                alerting_before += 1
                app.label(ws[0].start_ns, ws[-1].end_ns, "normal", f"simulated technician: {c[0].name}")
                job = app.retrain()
                rec = app.registry.get(job.version) if job.version else None
                events.append({"clip": c[0].name, "version": rec.id if rec else None,
                               "status": rec.status if rec else "failed", "gate": rec.reason if rec else job.detail})
                scorer = app.active()
            test = [np.stack([w.samples for w in _valve_windows(c, 0)]) for c in test_clips]
            y = np.array([1.0 if c[2] == "anomaly" else 0.0 for c in test_clips])
            s = np.array([alert_statistic(scorer.score_windows(w)) for w in test])  # type: ignore[union-attr]
            thr = float(scorer.threshold)  # type: ignore[union-attr]
            live_left = sum(alert_statistic(scorer.score_windows(np.stack([w.samples for w in _valve_windows(c, 0)]))) > thr  # type: ignore[union-attr]
                            for c in live)
        finally:
            app.close()
    return {"calibration_clips": len(cal), "live_normal_clips": len(live), "labels_used": len(events), "retrains": events,
            "live_false_alarm_clips_left": int(live_left), "auc": _auc(y, s), "pauc": _auc(y, s, max_fpr=0.1),
            "test_normal_clips_alerting": float(np.mean(s[y == 0] > thr)), "test_anomaly_clips_alerting": float(np.mean(s[y == 1] > thr))}


def eval_technician(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool = False,
                    bearings: tuple[str, ...] = FEMTO_BEARINGS) -> dict[str, Any]:
    """The simulated technician on every FEMTO bearing and on DCASE valve; see the module
    docstring. FEMTO: the bearing is calibrated on its first 10 % of life through the learning
    loop, then replayed window by window; each sustained alarm raised in the first half is
    labelled ``normal`` once, :data:`TECHNICIAN_DELAY_S` after its raise (its span so far), the
    loop retrains, the gate decides, and the replay goes on with the version in force. DCASE: calibrated on the first half of the
    calibration side; every clip of the other half (all normal) that raises an alert is labelled
    ``normal`` once and the loop retrains; AUC on the never-labelled test clips."""
    rows = {f"technician_femto_{b.lower()}": _technician_femto(data, encoder, sha, train, b, subset) for b in bearings}
    per = list(rows.values())
    leads = [r["lead_time_s"] or 0.0 for r in per]
    rows["technician_femto"] = {
        "bearings": len(per), "labels_used": [r["labels_used"] for r in per],
        "bearings_without_first_half_alarm_left": int(sum(r["first_half_alarms_left"] == 0 for r in per)),
        "bearings_alarmed_before_failure": int(sum(r["alarmed_before_failure"] for r in per)),
        "median_lead_time_s": float(np.median(leads)) if leads else None,
    }
    rows["technician_dcase_valve"] = _technician_dcase(data, encoder, sha, train, subset)
    return rows


# -- plots ------------------------------------------------------------------------------------------
def _save(fig: Any, path: Path) -> str:
    """Lay out, write (PNG, 110 dpi) and close a figure; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, row in results.items():
        if "steps" in row:
            ok = [st for st in row["steps"] if "auc" in st]
            fig, ax = plt.subplots(figsize=(5.5, 4))
            ax.plot([st["labelled_events"] for st in ok], [st["auc"] for st in ok], "o-", label="ROC AUC")
            ax.plot([st["labelled_events"] for st in ok], [st["pauc"] for st in ok], "s--", label="pAUC (FPR <= 0.1)")
            ax.set(xlabel="labelled events (technician feedback)", ylabel="score on never-labelled clips",
                   title=f"{name}: feedback learning curve")
            ax.legend(fontsize=8)
            written.append(_save(fig, out / f"feedback_{name}.png"))
        if "roc" in row:
            fig, ax = plt.subplots(figsize=(5.5, 5))
            for m, (y, s) in row["roc"].items():
                fpr, tpr, _ = roc_curve(y, s)
                ax.plot(fpr, tpr, label=f"{m} (AUC {row['methods'][m]['auc']:.3f})", lw=2 if m == "pdm_edge" else 1)
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC: {name}")
            ax.legend(loc="lower right", fontsize=8)
            written.append(_save(fig, out / f"roc_{name}.png"))
        if "series" in row and "methods" not in row:  # a simulated technician's replay
            ser = row["series"]
            t = np.array(ser["t_s"]) / 60.0
            fig, ax = plt.subplots(figsize=(9, 2.6))
            ax.plot(t, ser["score"], lw=0.8, label="anomaly score (version in force)")
            ax.plot(t, ser["threshold"], color="r", lw=0.8, ls="--", label="threshold")
            for ev in row["retrains"]:
                ax.axvline(ev["at_s"] / 60, color="g" if ev["status"] == "active" else "0.5", lw=1.0)
            ax.axvline(t[-1] / 2, color="k", lw=0.6, ls=":")
            ax.set_yscale("symlog")
            ax.set(xlabel="time since start of test (min); green: label -> promoted, grey: label -> rejected", ylabel="score",
                   title=f"{name}: simulated technician, {row['labels_used']} label(s)")
            ax.legend(fontsize=7, loc="upper left")
            written.append(_save(fig, out / f"{name}.png"))  # name: technician_femto_...
        elif "series" in row:
            t = np.array(row["series"]["t_s"]) / 60.0
            ms = [m for m in row["methods"] if m in row["series"]]
            fig, axes = plt.subplots(len(ms), 1, figsize=(9, 2.0 * len(ms)), sharex=True)
            for ax, m in zip(np.atleast_1d(axes), ms):
                ser = row["series"][m]
                ax.plot(t, ser["score"], lw=0.8, label="anomaly score")
                ax.axhline(ser["threshold"], color="r", lw=0.8, ls="--", label="threshold")
                ax.axvspan(0, row["end_of_life_s"] * 0.1 / 60, color="g", alpha=0.1, label="calibration")
                ax.axvline(row["healthy_until_s"] / 60, color="k", lw=0.6, ls=":")
                for a in ser["alarms_s"]:
                    ax.axvline(a / 60, color="r", lw=1.2)
                ax.set_ylabel(m, fontsize=8)
                ax.set_yscale("symlog")
            np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
            np.atleast_1d(axes)[-1].set_xlabel("time since start of test (min); red lines: sustained alarms")
            fig.suptitle(f"{name}: score over life (end of life at {row['end_of_life_s'] / 60:.1f} min)")
            written.append(_save(fig, out / f"life_{name}.png"))
    return written


DATASETS = ("cwru", "dcase", "femto", "technician", "feedback")


def run_eval(data: Path, out: Path | None, encoder: Encoder, sha: str, *,
             datasets: tuple[str, ...] = DATASETS,
             subset: bool = False, train: TrainConfig | None = None, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the protocol and return the JSON-ready results; with ``out``, the plots and
    ``results.md`` (:func:`markdown_table`) and ``results.json`` are written there.

    Raises:
        PdmEdgeError: ``data`` does not hold the expected dataset folders, or an unknown dataset.
    """
    train = train or TrainConfig()
    runners = {"cwru": eval_cwru, "dcase": eval_dcase_valve, "femto": eval_femto, "technician": eval_technician,
               "feedback": eval_feedback_curve}
    results: dict[str, Any] = {}
    t_all = time.monotonic()
    for name in datasets:
        if name not in runners:
            raise PdmEdgeError(f"unknown dataset {name!r}; choose from {sorted(runners)}")
        t0 = time.monotonic()
        log(f"evaluating {name} ...")
        try:
            results.update(runners[name](data, encoder, sha, train, subset))
        except FileNotFoundError as exc:
            raise PdmEdgeError(f"{name}: recording not found under {data}: {exc}") from None
        log(f"{name} done in {time.monotonic() - t0:.1f} s")
    plots = _plots(results, out) if out is not None else []
    doc: dict[str, Any] = {"encoder_sha256": sha, "subset": subset, "wall_seconds": round(time.monotonic() - t_all, 1),
                           "plots": plots, "datasets": {}}
    for name, row in results.items():
        doc["datasets"][name] = {k: v for k, v in row.items() if k not in ("roc", "series")}
    if out is not None:
        (out / "results.md").write_text(markdown_table(doc))
        (out / "results.json").write_text(to_json(doc))
    return doc


def _fmt_lead(v: float | None) -> str:
    return "-" if v is None else f"{v / 60:.0f}"


def markdown_table(doc: dict[str, Any]) -> str:
    """One markdown table of an evaluation document: methods as columns, rows as in the module
    docstring (AUC for CWRU and DCASE; for FEMTO ``first-half alarms / lead time in min``, "-"
    = no raise after half-life), then the simulated technician and feedback-curve lines."""
    ds = doc["datasets"]
    rows_with_methods = [k for k in ds if "methods" in ds[k]]
    methods = [m for m in METHODS if any(m in ds[k]["methods"] for k in rows_with_methods)]
    lines = ["| row | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]

    def cells(row: dict[str, Any], fmt: Callable[[dict[str, Any]], str]) -> str:
        return " | ".join(fmt(row["methods"][m]) if m in row["methods"] else "" for m in methods)

    for k in rows_with_methods:
        row = ds[k]
        if k.startswith("cwru"):
            lines.append(f"| {k} AUC | " + cells(row, lambda v: f"{v['auc']:.3f}") + " |")
        elif k == "dcase_valve":
            lines.append("| DCASE valve AUC (pAUC) | " + cells(row, lambda v: f"{v['auc']:.3f} ({v['pauc']:.3f})") + " |")
        elif k == "femto":
            lines.append("| FEMTO total first-half alarms | " + cells(row, lambda v: str(v["false_alarms_healthy_half"])) + " |")
            lines.append("| FEMTO bearings without first-half alarm | "
                         + cells(row, lambda v: f"{v['bearings_without_first_half_alarm']} / {row['bearings']}") + " |")
            lines.append("| FEMTO bearings alarmed before failure | "
                         + cells(row, lambda v: f"{v['bearings_alarmed_before_failure']} / {row['bearings']}") + " |")
            lines.append("| FEMTO median lead time (min) | " + cells(row, lambda v: f"{v['median_lead_time_s'] / 60:.0f}") + " |")
        elif k.startswith("femto_"):
            lines.append(f"| {k[6:]}: first-half alarms / lead (min) | "
                         + cells(row, lambda v: f"{v['false_alarms_healthy_half']} / {_fmt_lead(v['lead_time_s'])}") + " |")
    extra = []
    for k, row in ds.items():
        if k.startswith("femto_") and "rms_by_tenth_of_life" in row:
            extra.append(f"- {k[6:]}: horizontal RMS per tenth of life, relative to the calibration tenth: "
                         + " ".join(f"{v:.2f}" for v in row["rms_by_tenth_of_life"]))
        if k.startswith("technician_femto_"):
            extra.append(f"- simulated technician, {k[17:]}: {row['labels_used']} label(s), first-half alarms left "
                         f"{row['first_half_alarms_left']}, lead time {_fmt_lead(row['lead_time_s'])} min, alarmed before "
                         f"failure: {'yes' if row['alarmed_before_failure'] else 'no'}")
        elif k == "technician_femto":
            extra.append(f"- simulated technician, FEMTO: {row['bearings_without_first_half_alarm_left']} / {row['bearings']} "
                         f"bearings without first-half alarm left, labels per bearing {row['labels_used']}, "
                         f"{row['bearings_alarmed_before_failure']} / {row['bearings']} alarmed before failure, "
                         f"median lead time {_fmt_lead(row['median_lead_time_s'])} min")
        elif k == "technician_dcase_valve":
            extra.append(f"- simulated technician, DCASE valve: {row['labels_used']} label(s), false-alarm clips left "
                         f"{row['live_false_alarm_clips_left']} of {row['live_normal_clips']}, AUC (pAUC) on never-labelled clips "
                         f"{row['auc']:.3f} ({row['pauc']:.3f})")
        elif k == "dcase_valve_feedback":
            pts = ", ".join(f"{st['labelled_events']}: {st['auc']:.3f} ({st['status']})" if "auc" in st else
                            f"{st['labelled_events']}: failed" for st in row["steps"])
            extra.append(f"- feedback curve, DCASE valve, AUC after labelled events (gate): {pts}")
    head = f"pdm-edge eval ({'subset' if doc.get('subset') else 'full'}), encoder {doc['encoder_sha256'][:12]}, wall time {doc.get('wall_seconds', 0):.0f} s\n\n"
    return head + "\n".join(lines) + ("\n\n" + "\n".join(extra) if extra else "") + "\n"


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
