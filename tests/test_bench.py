"""``pdm-edge bench``'s summary of a training-memory result (no benchmark is run here)."""

from __future__ import annotations

from pdm_edge.bench import summarise


def test_training_summary_shows_the_defaults_ratio_the_memory_target_is_about() -> None:
    def variant(mb: float, params: int = 22_817) -> dict:
        return {"train_s": 10.0, "peak_training_mb": mb, "trainable_params": params}

    doc = {"workload": {"windows": 119, "epochs": 2}, "adapter": variant(200.0), "full_finetune": variant(250.0, 710_881),
           "ratio_full_over_adapter": {"training_time": 1.0, "peak_training_memory": 1.25, "trainable_params": 31.2},
           "variants": {"adapter": variant(200.0), "full": variant(250.0, 710_881), "adapter_gc_micro8": variant(43.0)},
           "ratio_full_over": {"adapter": {"peak_training_memory": 1.25}, "adapter_gc_micro8": {"peak_training_memory": 5.81}}}
    rows, _ = summarise({"train": {"status": "ok", "result": doc}})
    defaults = [r for r in rows if r["figure"].startswith("calibration, adapter with the [learning] defaults")]
    assert len(defaults) == 1 and "peak training memory 43.0 MB" in defaults[0]["value"]
    assert defaults[0]["value"].endswith("full / this: peak training memory 5.81x")
    assert not any(r["figure"].startswith("calibration as the appliance runs it") for r in rows)  # not in this result
