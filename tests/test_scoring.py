"""The scoring stage: collect -> calibrate in the background -> score, with the backlog kept."""

from __future__ import annotations

import numpy as np

from pdm_edge.model import load_encoder
from pdm_edge.model.scorer import TrainConfig
from pdm_edge.scoring import ScoringStage
from pdm_edge.types import Window
from sensors.simulator import FaultSpec, VibrationSimulator

FS = 12000.0
N = 3000  # 0.25 s windows, no overlap


def _windows(sim: VibrationSimulator, k: int, t0_ns: int = 0) -> list[Window]:
    x = sim.generate(N * k).reshape(k, N)
    return [Window("s", "m", "acc", "vibration", t0_ns + i * 250_000_000, FS, "g", x[i], i) for i in range(k)]


def test_collect_calibrate_score_and_backlog():
    enc, sha = load_encoder()
    events = []
    stage = ScoringStage(enc, sha, calibration_s=10.0, train=TrainConfig(max_epochs=2), hop_s=lambda w: 0.25,
                         on_event=lambda *e: events.append(e))
    normal = _windows(VibrationSimulator(sample_rate_hz=FS, seed=5, resonance_hz=2500), 80)
    out = []
    for w in normal[:40]:
        assert stage.handle(w) == []  # 40 x 0.25 s = 10 s collected: calibration starts on the last one
    assert stage.state("s/m/acc") in ("calibrating", "scoring")
    for w in normal[40:]:
        out += stage.handle(w)
    out += stage.drain()
    assert [e[1] for e in events] == ["calibrated"]
    assert [w.index for w, _ in out] == list(range(40, 80))  # every later window scored once, in order
    scores = np.array([s.score for _, s in out])
    assert all(s.threshold is not None and s.model_version and s.model_version.startswith("s/m/acc@") for _, s in out)
    # a developing fault on the same machine scores above the normal windows
    faulty = VibrationSimulator(sample_rate_hz=FS, seed=5, resonance_hz=2500, fault=FaultSpec(kind="outer", severity=0.5))
    fault_scores = np.array([s.score for _, s in stage.handle_many(_windows(faulty, 20, t0_ns=10**12))])
    assert fault_scores.min() > np.percentile(scores, 99)
    assert stage.state("s/m/other") == "unknown"
