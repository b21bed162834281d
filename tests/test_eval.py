"""`pdm-edge eval` end to end on a small subset of the real recordings (skipped without them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdm_edge.evaluation import METHODS, run_eval
from pdm_edge.model import load_encoder
from pdm_edge.model.scorer import TrainConfig
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_eval_subset_end_to_end(datasets_dir, encoder, tmp_path):
    enc, sha = encoder
    doc = run_eval(datasets_dir, tmp_path, enc, sha, datasets=("cwru", "dcase", "femto"), subset=True,
                   train=TrainConfig(max_epochs=2, max_seconds=20))
    json.dumps(doc)  # JSON-ready
    ds = doc["datasets"]
    assert set(ds) == {"cwru_12k", "cwru_48k", "dcase_valve", "femto_bearing3_1"}
    for name in ("cwru_12k", "cwru_48k", "dcase_valve"):
        assert set(ds[name]["methods"]) == set(METHODS)
        for m in ds[name]["methods"].values():
            assert 0.0 <= m["auc"] <= 1.0
    assert "pauc" in ds["dcase_valve"]["methods"]["pdm_edge"]
    femto = ds["femto_bearing3_1"]
    assert femto["calibration_snapshots"] >= 10
    for m in femto["methods"].values():
        assert m["false_alarms_healthy_half"] >= 0 and (m["lead_time_s"] is None or 0 <= m["lead_time_s"] <= femto["end_of_life_s"])
    # the sanity dataset must be easy for the product: seeded faults vs. one healthy recording
    assert ds["cwru_48k"]["methods"]["pdm_edge"]["auc"] > 0.95
    assert sorted(p.rsplit("/", 1)[1] for p in doc["plots"]) == [
        "life_femto_bearing3_1.png", "roc_cwru_12k.png", "roc_cwru_48k.png", "roc_dcase_valve.png"]
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 10_000 for p in doc["plots"])
    assert np.isfinite(ds["cwru_12k"]["methods"]["mahalanobis"]["auc"])


def test_eval_cli_missing_data_is_a_clear_error(tmp_path):
    r = run_cli("eval", "--data", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_feedback_curve_subset_goes_through_the_feedback_path(datasets_dir, encoder, tmp_path, one_torch_thread):
    enc, sha = encoder
    doc = run_eval(datasets_dir, tmp_path, enc, sha, datasets=("feedback",), subset=True,
                   train=TrainConfig(max_epochs=1, max_seconds=20))
    row = doc["datasets"]["dcase_valve_feedback"]
    steps = row["steps"]
    assert [s["labelled_events"] for s in steps] == [0, 1, 5, 10]
    assert steps[0]["labels"] == {"normal": 0, "fault": 0} and steps[0]["status"] == "active"
    n_live = row["live_clips"]
    for s in steps[1:]:
        assert sum(s["labels"].values()) == min(s["labelled_events"], n_live)
        assert s["status"] in ("active", "rejected") and s["gate"]
        assert 0.0 <= s["auc"] <= 1.0
    assert [p.rsplit("/", 1)[1] for p in doc["plots"]] == ["feedback_dcase_valve_feedback.png"]
