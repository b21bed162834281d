"""`pdm-edge eval` end to end on a small subset of the real recordings (skipped without them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdm_edge.evaluation import FEMTO_BEARINGS, methods_for, run_eval
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
    femto_rows = {f"femto_{b.lower()}" for b in FEMTO_BEARINGS}
    assert set(ds) == {"cwru_12k", "cwru_48k", "dcase_valve", "femto"} | femto_rows
    for name in ("cwru_12k", "cwru_48k"):
        assert set(ds[name]["methods"]) == set(methods_for("vibration"))
    assert set(ds["dcase_valve"]["methods"]) == set(methods_for("acoustic"))
    for name in ("cwru_12k", "cwru_48k", "dcase_valve"):
        for m in ds[name]["methods"].values():
            assert 0.0 <= m["auc"] <= 1.0
    assert "pauc" in ds["dcase_valve"]["methods"]["pdm_edge"] and "auc_mean" in ds["dcase_valve"]["methods"]["pdm_edge"]
    for row in femto_rows:
        femto = ds[row]
        assert femto["calibration_snapshots"] >= 10
        for m in femto["methods"].values():
            assert m["false_alarms_healthy_half"] >= 0 and (m["lead_time_s"] is None or 0 <= m["lead_time_s"] <= femto["end_of_life_s"])
    summary = ds["femto"]["methods"]["pdm_edge"]
    assert summary["false_alarms_healthy_half"] == sum(ds[r]["methods"]["pdm_edge"]["false_alarms_healthy_half"] for r in femto_rows)
    # the sanity dataset must be easy for the product: seeded faults vs. one healthy recording
    assert ds["cwru_48k"]["methods"]["pdm_edge"]["auc"] > 0.95
    assert sorted(p.rsplit("/", 1)[1] for p in doc["plots"]) == sorted(
        ["roc_cwru_12k.png", "roc_cwru_48k.png", "roc_dcase_valve.png"] + [f"life_{r}.png" for r in femto_rows])
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 10_000 for p in doc["plots"])
    table = (tmp_path / "results.md").read_text()
    assert "| DCASE valve AUC (pAUC) |" in table and "FEMTO median lead time (min)" in table
    assert json.loads((tmp_path / "results.json").read_text())["datasets"].keys() == ds.keys()
    assert np.isfinite(ds["cwru_12k"]["methods"]["mahalanobis"]["auc"])


def test_eval_cli_missing_data_is_a_clear_error(tmp_path):
    r = run_cli("eval", "--data", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_feedback_curve_subset_goes_through_the_feedback_path(datasets_dir, encoder, tmp_path, one_torch_thread):
    enc, sha = encoder
    doc = run_eval(datasets_dir, tmp_path, enc, sha, datasets=("feedback",), subset=True,
                   train=TrainConfig(max_epochs=3, max_seconds=20))
    row = doc["datasets"]["dcase_valve_feedback"]
    steps = row["steps"]
    assert [s["labelled_events"] for s in steps] == [0, 1, 5, 10]
    assert steps[0]["labels"] == {"normal": 0, "fault": 0} and steps[0]["status"] == "active"
    n_live = row["live_clips"]
    for s in steps[1:]:
        assert sum(s["labels"].values()) == min(s["labelled_events"], n_live)
        assert s["gate"]
    # correct labels give candidates the gate promotes, and labelled false alarms stop alarming
    assert steps[-1]["status"] == "active", steps[-1]["gate"]
    if steps[-1]["labelled_false_alarm_windows_above_threshold"] is not None:
        assert steps[-1]["labelled_false_alarm_windows_above_threshold"] <= 0.2
    assert steps[-1]["auc"] >= steps[0]["auc"] - 0.05
    assert [p.rsplit("/", 1)[1] for p in doc["plots"]] == ["feedback_dcase_valve_feedback.png"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_simulated_technician_clears_a_femto_false_alarm_through_the_loop(datasets_dir, encoder, one_torch_thread):
    from pdm_edge.evaluation import _technician_femto

    enc, sha = encoder
    row = _technician_femto(datasets_dir, enc, sha, TrainConfig(max_epochs=3, max_seconds=20), "Bearing2_1", subset=True)
    assert row["labels_used"] >= 1, "Bearing2_1 raises a first-half alarm after calibration on 10 % of life"
    assert all(ev["status"] in ("active", "rejected") and ev["gate"] for ev in row["retrains"])
    assert row["labels_used"] <= 3 and row["first_half_alarms_left"] == 0
