"""Scoring throughput and latency on one core: features + frozen encoder + adapter + distance.

Measures, for a calibrated scorer (shipped encoder, adapter trained on simulated normal data):

- 1 s vibration windows at 25.6 kHz and 10 s acoustic clips at 16 kHz (scored as 1 s windows
  with 0.5 s hop, 19 per clip, as the appliance and ``pdm-edge eval`` do);
- batch 1 (one window at a time: latency p50 / p99) and batched (64 windows);
- resident memory (RSS) of this process after loading the encoder and scoring;
- the int8 inference path (``ScorerConfig.inference = "int8"``: the encoder's linear layers
  dynamically quantised, :mod:`pdm_edge.model.quantize`) beside float32 on the same windows,
  end to end and for the model alone (``score_features`` on precomputed feature images), with
  the int8 / float32 ratios of batched windows per second.

torch and the BLAS libraries are restricted to one thread, so the figures are per core.

    .venv/bin/python benchmarks/score_throughput.py [--json] [--encoder PATH] [--seconds S]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdm_edge.model import load_encoder  # noqa: E402
from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig  # noqa: E402
from sensors.simulator import AcousticSimulator, VibrationSimulator  # noqa: E402


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _bench(scorer: Scorer, windows: np.ndarray, seconds: float) -> dict[str, float]:
    # batch 1: latency per window
    lat = []
    t_end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < t_end:
        w = windows[i % len(windows)][None]
        t0 = time.perf_counter()
        scorer.score_windows(w)
        lat.append(time.perf_counter() - t0)
        i += 1
    lat_ms = np.array(lat) * 1e3
    # batched
    batch = windows[:64]
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        scorer.score_windows(batch)
        n += len(batch)
    batched = n / (time.perf_counter() - t0)
    return {"batch1_windows_per_s": float(1e3 / lat_ms.mean()), "batch1_p50_ms": float(np.percentile(lat_ms, 50)),
            "batch1_p99_ms": float(np.percentile(lat_ms, 99)), "batch64_windows_per_s": float(batched)}


def _bench_model(scorer: Scorer, feats: np.ndarray, seconds: float) -> float:
    """Windows per second of ``score_features`` on 64 precomputed feature images (no features step)."""
    scorer.score_features(feats)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        scorer.score_features(feats)
        n += len(feats)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per case")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rss0 = _rss_mb()
    encoder, sha = load_encoder(a.encoder)
    quick = TrainConfig(max_epochs=5)
    results: dict[str, dict[str, float]] = {}

    fs = 25600.0
    sim = VibrationSimulator(sample_rate_hz=fs, seed=3)
    vib = sim.generate(int(fs) * 200).reshape(200, int(fs))
    s = Scorer(encoder, sha, ScorerConfig(kind="vibration", sample_rate_hz=fs, hop_s=0.5, train=quick)).learn_many(vib[:100])
    s.calibrate()
    results["vibration 1 s @ 25.6 kHz"] = _bench(s, vib[100:], a.seconds)
    s8 = Scorer(encoder, sha, dataclasses.replace(s.config, inference="int8")).learn_many(vib[:100])
    s8.calibrate()
    results["vibration 1 s @ 25.6 kHz, int8 encoder"] = _bench(s8, vib[100:], a.seconds)
    feats = s.features(vib[100:164])
    model_only = {"float32": _bench_model(s, feats, a.seconds), "int8": _bench_model(s8, feats, a.seconds)}

    fs = 16000.0
    asim = AcousticSimulator(sample_rate_hz=fs, seed=3)
    clip = asim.generate(int(fs) * 200)
    acu = np.stack([clip[i:i + 16000] for i in range(0, clip.size - 16000 + 1, 8000)])
    s2 = Scorer(encoder, sha, ScorerConfig(kind="acoustic", sample_rate_hz=fs, hop_s=0.5, train=quick)).learn_many(acu[:100])
    s2.calibrate()
    r = _bench(s2, acu[100:], a.seconds)
    r["clips_10s_per_s"] = r["batch64_windows_per_s"] / 19.0
    results["acoustic 1 s windows @ 16 kHz (10 s clip = 19 windows)"] = r
    s28 = Scorer(encoder, sha, dataclasses.replace(s2.config, inference="int8")).learn_many(acu[:100])
    s28.calibrate()
    results["acoustic 1 s windows @ 16 kHz, int8 encoder"] = _bench(s28, acu[100:], a.seconds)
    names = list(results)
    int8_ratio = {"vibration": round(results[names[1]]["batch64_windows_per_s"] / results[names[0]]["batch64_windows_per_s"], 2),
                  "acoustic": round(results[names[3]]["batch64_windows_per_s"] / results[names[2]]["batch64_windows_per_s"], 2),
                  "model_only": round(model_only["int8"] / model_only["float32"], 2)}
    doc = {"threads": 1, "encoder_sha256": sha, "results": results, "model_only_windows_per_s": model_only,
           "int8_over_float32_batch64": int8_ratio, "rss_mb_before_load": round(rss0, 1), "rss_mb": round(_rss_mb(), 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if a.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{'case':<55} {'b1 win/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'b64 win/s':>10}")
    for name, r in results.items():
        print(f"{name:<55} {r['batch1_windows_per_s']:9.1f} {r['batch1_p50_ms']:8.2f} {r['batch1_p99_ms']:8.2f} {r['batch64_windows_per_s']:10.1f}")
    print(f"10 s acoustic clips per second (batched): {results[names[2]]['clips_10s_per_s']:.1f}")
    print(f"model only (score_features, batch 64): float32 {model_only['float32']:.1f}, int8 {model_only['int8']:.1f} windows/s")
    print(f"int8 / float32 windows/s (batch 64): vibration {int8_ratio['vibration']}x, acoustic {int8_ratio['acoustic']}x, "
          f"model only {int8_ratio['model_only']}x")
    print(f"resident memory: {doc['rss_mb']} MB now, {doc['peak_rss_mb']} MB peak (one thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
