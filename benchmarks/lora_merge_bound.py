#!/usr/bin/env python3
"""What merging LoRA into the frozen weights (PEFT's ``merge``) could gain at most, on one core.

Merged weights make the adapted linear layers cost what the frozen ones cost, so the embedding
throughput with the LoRA path *skipped* (``Adapter.delta`` returning 0, which scores nonsense
but costs what a merged model would) bounds a merge's gain from above. Measured on 64 windows of
1 s vibration at 25.6 kHz (the simulator), feature images standardised, best of 5 passes of
``Scorer._embed`` (encoder + adapter, no grad), one torch thread.

Usage::

    .venv/bin/python benchmarks/lora_merge_bound.py
"""

from __future__ import annotations

import time

import numpy as np
import torch


def main() -> int:
    from pdm_edge.model import load_encoder
    from pdm_edge.model.adapter import Adapter
    from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig
    from sensors.simulator import VibrationSimulator

    torch.set_num_threads(1)
    enc, sha = load_encoder()
    fs = 25600.0
    x = VibrationSimulator(sample_rate_hz=fs, seed=1).generate(int(fs) * 264).reshape(264, int(fs)).astype(np.float32)
    s = Scorer(enc, sha, ScorerConfig(kind="vibration", sample_rate_hz=fs, hop_s=0.5, train=TrainConfig(max_epochs=2)))
    s.learn_many(x[:200])
    s.calibrate()
    xs = s.standardizer.transform(s.features(x[200:]))  # type: ignore[union-attr]

    def rate() -> float:
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            s._embed(xs)
            best = max(best, len(xs) / (time.perf_counter() - t0))
        return best

    with_lora = rate()
    delta = Adapter.delta
    Adapter.delta = lambda self, layer, name, h: 0.0  # type: ignore[method-assign,assignment]
    try:
        skipped = rate()
    finally:
        Adapter.delta = delta  # type: ignore[method-assign]
    print(f"embedding windows/s, one core: with LoRA {with_lora:.0f}, LoRA path skipped {skipped:.0f}; "
          f"a merge gains at most {skipped / with_lora:.2f}x on the model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
