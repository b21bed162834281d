"""The scoring stage's batch over many streams (pdm_edge/pipeline/scoring.py): one feature
transform per batch for every stream that shares it, and the same scores as one stream at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pdm_edge.model import load_encoder
from pdm_edge.model.scorer import Scorer, ScorerConfig
from pdm_edge.pipeline import StreamTable
from pdm_edge.pipeline.scoring import ScoringStage
from pdm_edge.registry import Registry
from pdm_edge.types import Window
from sensors.simulator import FaultSpec, VibrationSimulator

FS = 12000.0
N = 3000  # 0.25 s windows
MACHINES = ("a", "b", "c")


def _windows(machine: str, k: int, seed: int, fault: FaultSpec | None = None) -> list[Window]:
    x = VibrationSimulator(sample_rate_hz=FS, seed=seed, fault=fault).generate(N * k).reshape(k, N)
    return [Window("s", machine, "acc", "vibration", i * 250_000_000, FS, "g", x[i], i) for i in range(k)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    enc, sha = load_encoder()
    s = Scorer(enc, sha, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=0.25, train_adapter=False, min_windows=10))
    s.learn_many(_windows("a", 30, seed=1))
    s.calibrate()
    reg = Registry(Path(tmp_path_factory.mktemp("scoring")) / "registry")
    for m in MACHINES:
        reg.promote(reg.add_candidate(s, site="s", machine=m, sensor="acc").id)
    yield reg
    reg.close()


def _stage(registry: Registry) -> ScoringStage:
    enc, sha = load_encoder()
    return ScoringStage(registry, enc, sha, lambda stream, window=None: None, StreamTable(), calibration_s=10.0)


def test_a_batch_of_many_streams_scores_as_each_stream_alone(registry: Registry, one_torch_thread: None) -> None:
    per_machine = {m: _windows(m, 4, seed=10 + i, fault=FaultSpec("outer", onset_s=0.0, severity=0.5) if m == "b" else None)
                   for i, m in enumerate(MACHINES)}
    interleaved = [per_machine[m][k] for k in range(4) for m in MACHINES]
    together = _stage(registry)
    pairs = together.handle_many(interleaved)
    assert sorted((w.machine, w.index) for w, _ in pairs) == sorted((w.machine, w.index) for w in interleaved)
    for m in MACHINES:  # per stream in time order
        assert [w.index for w, _ in pairs if w.machine == m] == [0, 1, 2, 3]
    alone = _stage(registry)
    for m in MACHINES:
        want = alone.handle_many(per_machine[m])
        got = [sc for w, sc in pairs if w.machine == m]
        assert [s.score for s in got] == pytest.approx([s.score for _, s in want], rel=1e-9, abs=1e-9)
        assert [(s.model_version, s.is_anomaly, s.threshold) for s in got] == \
            [(s.model_version, s.is_anomaly, s.threshold) for _, s in want]
    together.close()
    alone.close()


def test_features_are_computed_once_per_transform_for_all_streams(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage(registry)
    windows = [w for m in MACHINES for w in _windows(m, 2, seed=3)]
    calls: list[int] = []
    orig = Scorer.features

    def counting(self: Scorer, ws: list[Window]) -> np.ndarray:
        calls.append(len(ws))
        return orig(self, ws)

    monkeypatch.setattr(Scorer, "features", counting)
    assert len(stage.handle_many(windows)) == 6
    assert calls == [6]
    stage.close()
