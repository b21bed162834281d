"""``pdm-edge eval``: the evaluation protocol of DESIGN.md section 5 on real recordings.

Every dataset row reports pdm-edge's figure beside peer baselines computed in the same run on
the same windows, and two ablations:

- ``pdm_edge``: the product's scorer (frozen encoder + adapter trained on the calibration side).
- ``pdm_edge_frozen``: ablation, the same scorer without adapter training (frozen encoder,
  untrained LoRA/head = identity).
- ``mahalanobis``: Ledoit-Wolf Mahalanobis distance on the hand-crafted spectral features
  (:func:`pdm_edge.features.handcrafted_features`); this is also the ablation "hand-crafted
  features alone".
- ``iforest``: scikit-learn IsolationForest on the same features (200 trees, seed 0).
- ``rms_z``: RMS z-score, ``(RMS - mean) / std`` of the calibration windows (one-sided: a
  fault adds energy).

Every method is calibrated only on the calibration side of each split and gets its threshold by
the same rule as the product (:func:`pdm_edge.model.scorer.threshold_from_held_out`: fit on the
first 80 % of the calibration windows, Gaussian quantile of the last 20 %'s scores at the
per-window exceedance probability of the k-of-n alert rule, then refit on all of them).

Splits (nothing is tuned on the test side):

- **CWRU** (sanity): 0.25 s windows, 50 % hop. Calibrate on the first half of
  ``normal_0_97.mat``; test its second half against every fault file at the same rate. The
  12 kHz row resamples the 48 kHz normal recording to 12 kHz (anti-aliased) first. ROC AUC
  over windows.
- **DCASE 2023 valve** (acoustic, hard): 1 s windows, 50 % hop; calibrate on the 2 train
  normals and the test normals with clip index < 25; test the other normals against all
  anomalies. A clip's score is the mean of its windows' scores. ROC AUC and pAUC (FPR <= 0.1,
  scikit-learn's McClish-standardised partial AUC, as the DCASE evaluator computes it).
- **FEMTO Bearing3_1** (run to failure): one window per 0.1 s snapshot (one every 10 s);
  calibrate on the first 10 % of life; the first 50 % counts as healthy. A *sustained alarm* is
  an alert of the k-of-n rule (3 of 5). Reported: sustained alarms in the healthy half (false
  alarms), time of the first sustained alarm, and its lead time before the end of life.
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
from pdm_edge.alerts.debounce import KOfN
from pdm_edge.errors import PdmEdgeError
from pdm_edge.model.encoder import Encoder
from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig, exceedance_probability, threshold_from_held_out

METHODS = ("pdm_edge", "pdm_edge_frozen", "mahalanobis", "iforest", "rms_z")


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


def _feature_method(name: str, cal: np.ndarray, fs: float, kind: str, p: float) -> Calibrated:
    from sklearn.covariance import LedoitWolf
    from sklearn.ensemble import IsolationForest

    t0 = time.monotonic()

    def fit(w: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        if name == "rms_z":
            r = np.log(features.rms(w).astype(np.float64))
            mu, sd = r.mean(), max(r.std(ddof=1), 1e-9)
            return lambda x: (np.log(features.rms(x).astype(np.float64)) - mu) / sd
        f = features.handcrafted_features(w, fs, kind).astype(np.float64)
        mu, sd = f.mean(axis=0), np.maximum(f.std(axis=0), 1e-6)

        def feats(x: np.ndarray) -> np.ndarray:
            return (features.handcrafted_features(x, fs, kind).astype(np.float64) - mu) / sd

        if name == "mahalanobis":
            lw = LedoitWolf().fit((f - mu) / sd)
            return lambda x: np.sqrt(np.maximum(lw.mahalanobis(feats(x)), 0.0))
        if name == "iforest":
            forest = IsolationForest(n_estimators=200, random_state=0).fit((f - mu) / sd)
            return lambda x: -forest.score_samples(feats(x))
        raise ValueError(name)

    k = _split(len(cal))
    held = fit(cal[:k])(cal[k:])
    threshold = threshold_from_held_out(held, p)
    return Calibrated(fit(cal), threshold, time.monotonic() - t0)


def _pdm_method(encoder: Encoder, sha: str, cal: np.ndarray, fs: float, kind: str, hop_s: float,
                train_adapter: bool, train: TrainConfig) -> Calibrated:
    t0 = time.monotonic()
    cfg = ScorerConfig(kind=kind, sample_rate_hz=fs, hop_s=hop_s, train_adapter=train_adapter, train=train,
                       min_windows=min(20, len(cal)))
    s = Scorer(encoder, sha, cfg).learn_many(cal)
    s.calibrate()
    return Calibrated(lambda x: np.concatenate([s.score_many(x[i:i + 128]) for i in range(0, len(x), 128)]) if len(x) else np.zeros(0),
                      float(s.threshold), time.monotonic() - t0)  # type: ignore[arg-type]


def calibrate_all(encoder: Encoder, sha: str, cal: np.ndarray, fs: float, kind: str, hop_s: float,
                  train: TrainConfig, methods: tuple[str, ...] = METHODS) -> dict[str, Calibrated]:
    """Fit every method on the same calibration windows ``cal`` of shape ``(N, n)``."""
    p = exceedance_probability(0.1, hop_s, 3, 5)
    out = {}
    for m in methods:
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


def eval_dcase_valve(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool = False) -> dict[str, Any]:
    """DCASE 2023 valve, source domain; see the module docstring."""
    from sample_data.loaders import dcase_clips, load_wav

    clips = dcase_clips(data / "dcase2023_task2" / "valve")
    cal_clips = [c for c in clips if c[1] == "train" or (c[2] == "normal" and c[3] < 25)]
    test_clips = [c for c in clips if c[1] == "test" and not (c[2] == "normal" and c[3] < 25)]
    if subset:
        cal_clips, test_clips = cal_clips[:8], test_clips[::8]
    fs = 16000.0
    n, hop = 16000, 8000

    def clip_windows(c: tuple) -> np.ndarray:
        return _windows(load_wav(c[0]).concatenated(), n, hop)

    cal = np.concatenate([clip_windows(c) for c in cal_clips])
    test = [clip_windows(c) for c in test_clips]
    y = np.array([1.0 if c[2] == "anomaly" else 0.0 for c in test_clips])
    methods = calibrate_all(encoder, sha, cal, fs, "acoustic", 0.5, train)
    row: dict[str, Any] = {"calibration_clips": len(cal_clips), "calibration_windows": len(cal), "test_clips": len(test_clips),
                           "test_anomalies": int(y.sum()), "methods": {}, "roc": {}}
    for m, c in methods.items():
        s = np.array([float(np.mean(c.score(w))) for w in test])
        row["methods"][m] = {"auc": _auc(y, s), "pauc": _auc(y, s, max_fpr=0.1), "fit_seconds": round(c.fit_seconds, 2)}
        row["roc"][m] = (y, s)
    return {"dcase_valve": row}


def eval_femto(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool = False) -> dict[str, Any]:
    """FEMTO Bearing3_1 run to failure; see the module docstring."""
    from sample_data.loaders import load_femto

    rec = load_femto(data / "femto_pronostia" / "Learning_set" / "Bearing3_1")
    segs = rec.segments
    t = np.array([(s.start_ns - segs[0].start_ns) / 1e9 for s in segs])
    x = np.stack([s.samples for s in segs])
    if subset:
        keep = np.r_[np.arange(0, len(x) // 10 + 1), np.arange(len(x) // 10 + 1, len(x), 4)]
        x, t = x[keep], t[keep]
    end_s = t[-1]
    n_cal = int(np.sum(t <= 0.1 * end_s))
    methods = calibrate_all(encoder, sha, x[:n_cal], rec.sample_rate_hz, "vibration", 10.0, train)
    row: dict[str, Any] = {"snapshots": len(x), "calibration_snapshots": n_cal, "end_of_life_s": float(end_s),
                           "healthy_until_s": float(0.5 * end_s), "methods": {}, "series": {"t_s": t.tolist()}}
    for m, c in methods.items():
        s = c.score(x)
        deb = KOfN(3, 5)
        alarms = []
        for i, v in enumerate(s):
            ev = deb.update(float(v), c.threshold, int(t[i] * 1e9), int((t[i] + 0.1) * 1e9))
            if ev is not None and ev.state == "raised":
                alarms.append(ev.start_ns / 1e9)
        false_alarms = [a for a in alarms if a <= 0.5 * end_s]
        after = [a for a in alarms if a > 0.5 * end_s]
        first = after[0] if after else None
        row["methods"][m] = {
            "false_alarms_healthy_half": len(false_alarms),
            "sustained_alarms": len(alarms),
            "first_alarm_after_healthy_half_s": first,
            "lead_time_s": None if first is None else float(end_s - first),
            "threshold": c.threshold,
            "fit_seconds": round(c.fit_seconds, 2),
        }
        row["series"][m] = {"score": s.tolist(), "threshold": c.threshold, "alarms_s": alarms}
    return {"femto_bearing3_1": row}


FEEDBACK_EVENTS = (0, 1, 5, 10)


def eval_feedback_curve(data: Path, encoder: Encoder, sha: str, train: TrainConfig, subset: bool = False) -> dict[str, Any]:
    """The feedback learning curve on DCASE 2023 valve (DESIGN.md section 5), through the
    product's own feedback path and training loop.

    Split (all labels from the calibration side, the clips with index < 25):

    - calibration: the 2 train normals and the test normals with index < 13 (the initial
      calibration, ``trigger = "initial"``);
    - live: the test normals with index 13-24 and the anomalies with index < 25, replayed
      through the scoring stage after calibration. A technician reviews them in the order the
      dashboard ranks them (highest clip score first, clip score = mean window score) and labels
      each: a normal clip as ``normal`` (a false alarm), an anomaly as ``fault``
      (``bearing_outer_race`` is not meaningful here; ``other``);
    - test: the normals with index >= 25 against the anomalies with index >= 25, never labelled.

    For each number of labelled events in :data:`FEEDBACK_EVENTS` the labels are submitted
    through :meth:`pdm_edge.feedback.Feedback.submit` (windows captured from the ring of recent
    windows into the labelled-window buffer), a retrain runs in the learning loop (replay buffer
    + labelled windows, gate), and the trained candidate scores the test clips. Reported per
    step: ROC AUC and pAUC (FPR <= 0.1) of the candidate, its gate decision, and the share of
    the never-labelled test normals that raise an alert (k-of-n over their windows) and of the
    labelled false-alarm clips' windows above threshold, before and after.
    """
    import tempfile

    from pdm_edge.feedback import Feedback, LabelBook, LabelledWindowBuffer, RecentWindows
    from pdm_edge.learning import LearningLoop
    from pdm_edge.scoring import ScoringStage
    from pdm_edge.registry import Registry
    from pdm_edge.types import Window
    from sample_data.loaders import dcase_clips, load_wav

    clips = dcase_clips(data / "dcase2023_task2" / "valve")
    cal = [c for c in clips if c[1] == "train" or (c[2] == "normal" and c[3] < 13)]
    live = [c for c in clips if c[1] == "test" and c[3] < 25 and not (c[2] == "normal" and c[3] < 13)]
    test = [c for c in clips if c[1] == "test" and c[3] >= 25]
    if subset:
        cal, live, test = cal[:6], live[::3], test[::5]
    fs, n, hop = 16000.0, 16000, 8000
    clip_gap_ns = 30 * 10**9
    t_next = [0]

    def clip_windows(c: tuple) -> list[Window]:
        x = _windows(load_wav(c[0]).concatenated(), n, hop)
        t0 = t_next[0]
        t_next[0] += clip_gap_ns
        return [Window("dcase", "valve", "mic", "acoustic", t0 + i * 500_000_000, fs, "Pa", x[i], i) for i in range(len(x))]

    cfg = ScorerConfig(kind="acoustic", sample_rate_hz=fs, hop_s=0.5, train=train, min_windows=10)
    k_, n_ = cfg.alert_k, cfg.alert_n

    def alerts(scores: np.ndarray, thr: float) -> bool:
        c = np.convolve((scores > thr).astype(int), np.ones(n_, int), mode="valid")
        return bool(len(c) and c.max() >= k_)

    with tempfile.TemporaryDirectory(prefix="pdm-edge-feedback-") as d:
        registry = Registry(Path(d) / "registry")
        book, buffer = LabelBook.in_dir(d), LabelledWindowBuffer.in_dir(d, max_bytes=2 * 1024**3)
        feedback = Feedback(book, buffer, RecentWindows(10**7, 1024**3))
        loop = LearningLoop(registry, encoder, sha, d, scorer_config=lambda s, w=None: cfg, calibration_s=10**9,
                            labels=book, label_windows=buffer, label_settle_s=0.0)
        stage = ScoringStage(loop)
        try:
            for c in cal:
                stage.handle_many(clip_windows(c))
            loop.enqueue("dcase/valve/mic", "initial")
            first = loop.run_pending()[0]
            if first.version is None:
                raise PdmEdgeError(f"feedback curve: initial calibration failed: {first.detail}")
            live_w = {}
            live_score = {}
            for c in live:
                ws = clip_windows(c)
                for w in ws:
                    feedback.observe(w)
                live_w[c[0].name] = ws
                live_score[c[0].name] = float(np.mean([s.score for _, s in stage.handle_many(ws)]))
            order = sorted(live, key=lambda c: -live_score[c[0].name])
            test_w = [np.stack([w.samples for w in clip_windows(c)]) for c in test]
            y = np.array([1.0 if c[2] == "anomaly" else 0.0 for c in test])
            steps = []
            labelled: list[tuple] = []
            for n_events in FEEDBACK_EVENTS:
                for c in order[len(labelled):n_events]:
                    ws = live_w[c[0].name]
                    kind = "fault" if c[2] == "anomaly" else "normal"
                    feedback.submit(site="dcase", machine="valve", sensor="mic", start_ns=ws[0].start_ns, end_ns=ws[-1].end_ns,
                                    kind=kind, fault_type="other" if kind == "fault" else None, author="eval",
                                    note=f"feedback curve: {c[0].name}")
                    labelled.append(c)
                feedback.sync()
                if n_events == 0:
                    job = first
                else:
                    loop.enqueue("dcase/valve/mic", "labels")
                    job = loop.run_pending()[0]
                rec = registry.get(job.version) if job.version else None
                scorer = registry.load(rec.id, encoder, sha) if rec else None
                if scorer is None:
                    steps.append({"labelled_events": n_events, "error": job.detail})
                    continue
                thr = float(scorer.threshold)  # type: ignore[arg-type]
                per_clip = [scorer.score_many(w) for w in test_w]
                s_clip = np.array([float(np.mean(v)) for v in per_clip])
                fa_clips = [c for c in labelled if c[2] == "normal"]
                fa_above = (float(np.mean(np.concatenate([scorer.score_many(live_w[c[0].name]) for c in fa_clips]) > thr))
                            if fa_clips else None)
                steps.append({
                    "labelled_events": n_events,
                    "labels": {"normal": sum(c[2] == "normal" for c in labelled), "fault": sum(c[2] == "anomaly" for c in labelled)},
                    "auc": _auc(y, s_clip), "pauc": _auc(y, s_clip, max_fpr=0.1),
                    "version": rec.id, "status": rec.status, "gate": rec.reason,
                    "test_normal_clips_alerting": float(np.mean([alerts(v, thr) for v, t in zip(per_clip, y) if t == 0])),
                    "test_anomaly_clips_alerting": float(np.mean([alerts(v, thr) for v, t in zip(per_clip, y) if t == 1])),
                    "labelled_false_alarm_windows_above_threshold": fa_above,
                    "train_seconds": (rec.training_summary or {}).get("train_seconds"),
                })
        finally:
            stage.close()
            loop.close()
            feedback.close()
            registry.close()
    return {"dcase_valve_feedback": {"calibration_clips": len(cal), "live_clips": len(live), "test_clips": len(test),
                                     "test_anomalies": int(y.sum()), "steps": steps}}


# -- plots ------------------------------------------------------------------------------------------
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
            fig.tight_layout()
            p = out / f"feedback_{name}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(str(p))
        if "roc" in row:
            fig, ax = plt.subplots(figsize=(5.5, 5))
            for m, (y, s) in row["roc"].items():
                fpr, tpr, _ = roc_curve(y, s)
                ax.plot(fpr, tpr, label=f"{m} (AUC {row['methods'][m]['auc']:.3f})", lw=2 if m == "pdm_edge" else 1)
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC: {name}")
            ax.legend(loc="lower right", fontsize=8)
            fig.tight_layout()
            p = out / f"roc_{name}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(str(p))
        if "series" in row:
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
            fig.tight_layout()
            p = out / f"life_{name}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(str(p))
    return written


def run_eval(data: Path, out: Path | None, encoder: Encoder, sha: str, *,
             datasets: tuple[str, ...] = ("cwru", "dcase", "femto", "feedback"),
             subset: bool = False, train: TrainConfig | None = None, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the protocol and return the JSON-ready results (plots written into ``out``).

    Raises:
        PdmEdgeError: ``data`` does not hold the expected dataset folders.
    """
    train = train or TrainConfig()
    runners = {"cwru": eval_cwru, "dcase": eval_dcase_valve, "femto": eval_femto, "feedback": eval_feedback_curve}
    results: dict[str, Any] = {}
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
    doc: dict[str, Any] = {"encoder_sha256": sha, "subset": subset, "plots": plots, "datasets": {}}
    for name, row in results.items():
        doc["datasets"][name] = {k: v for k, v in row.items() if k not in ("roc", "series")}
    return doc


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
