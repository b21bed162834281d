"""A process that runs the queued training jobs of a state directory (for the crash test):
``python tests/learning_app.py STATE_DIR MAX_EPOCHS``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdm_edge.learning import LearningLoop  # noqa: E402
from pdm_edge.model import load_encoder  # noqa: E402
from pdm_edge.model.scorer import ScorerConfig, TrainConfig  # noqa: E402
from pdm_edge.registry import Registry  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    d, epochs = Path(sys.argv[1]), int(sys.argv[2])
    enc, sha = load_encoder()
    cfg = ScorerConfig(kind="vibration", sample_rate_hz=12000.0, hop_s=0.25,
                       train=TrainConfig(max_epochs=epochs, max_seconds=600, patience=epochs), min_windows=10)
    loop = LearningLoop(Registry(d / "registry"), enc, sha, d, scorer_config=lambda s, w=None: cfg, calibration_s=10.0)
    print("running", flush=True)
    loop.run_pending()
