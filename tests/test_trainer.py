"""The adapter's training loop (pdm_edge.learning.trainer): resumable bit for bit, frozen-prefix
cache, low-memory options and the memory envelope."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from pdm_edge.errors import ModelError
from pdm_edge.learning.trainer import plan_memory
from pdm_edge.model import load_encoder
from pdm_edge.model.adapter import AdapterConfig
from pdm_edge.model.scorer import Scorer, ScorerConfig, TrainConfig, TrainingInterrupted
from sensors.simulator import FaultSpec, VibrationSimulator

FS = 12000.0
N = 3000


@pytest.fixture(scope="module")
def env(one_torch_thread) -> Any:
    enc, sha = load_encoder()
    sim = VibrationSimulator(sample_rate_hz=FS, seed=3, resonance_hz=2500)
    normal = sim.generate(N * 50).reshape(50, N)
    fault = VibrationSimulator(sample_rate_hz=FS, seed=3, fault=FaultSpec(kind="outer", severity=0.5)).generate(N * 6).reshape(6, N)
    tmpl = Scorer(enc, sha, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=0.25, min_windows=10))
    return dataclasses.make_dataclass("Env", ["enc", "sha", "normal", "fault"])(enc, sha, tmpl.features(normal), tmpl.features(fault))


def _scorer(env: Any, layers: int | None = None, **train: Any) -> Scorer:
    """A scorer on the module's data; with ``layers``, LoRA in the top blocks and the prefix cache."""
    tc = TrainConfig(**{"max_epochs": 3, "batch": 8, "patience": 10, "max_seconds": 1e9, "prefix_cache": layers is not None, **train})
    s = Scorer(env.enc, env.sha, ScorerConfig(kind="vibration", sample_rate_hz=FS, hop_s=0.25, min_windows=10,
                                              adapter=AdapterConfig(layers=layers), train=tc))
    s.learn_features(env.normal, replay=True)
    s.learn_features(env.fault, "fault")
    return s


AUG = {"aug_gain_db": 3.0, "aug_noise_snr_db": 20.0, "aug_shift_frames": 4, "aug_speed_pct": 5.0}


def _adapter(s: Scorer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in s.adapter.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layers,aug", [(None, {}), (1, {}), (None, AUG)], ids=["every_block", "cached_prefix", "augmented"])
def test_interrupted_and_resumed_training_ends_with_the_same_adapter(env: Any, layers: int | None, aug: dict) -> None:
    """Stopped in the middle of epoch 2 and resumed from the checkpoint: the adapter, the
    history and the threshold are those of an uninterrupted run (torch's and numpy's generator
    states travel with the checkpoint; masks and synthetic anomalies are drawn from them)."""
    ref = _scorer(env, layers, **aug)
    ref_info = ref.calibrate()
    ckpts: list[dict[str, Any]] = []
    polls = iter(range(1000))
    stop_at = 5 + 3  # 5 batches an epoch (40 training windows / 8): the 4th batch of epoch 2
    s = _scorer(env, layers, **aug)
    with pytest.raises(TrainingInterrupted):
        s.calibrate(checkpoint=ckpts.append, should_stop=lambda: next(polls) >= stop_at)
    assert ckpts[-1]["epoch"] == 1 and {"torch_rng", "numpy_rng"} <= set(ckpts[-1])
    resumed = _scorer(env, layers, **aug)
    info = resumed.calibrate(resume=ckpts[-1])
    _assert_same(_adapter(resumed), _adapter(ref))
    assert info["threshold"] == ref_info["threshold"]
    assert [h["val_loss"] for h in info["adapter_history"]] == [h["val_loss"] for h in ref_info["adapter_history"]]


def test_prefix_cache_spilled_to_a_file_trains_the_same_adapter(env: Any, tmp_path) -> None:
    """LoRA in the last block: the three frozen blocks run once per window; a cache moved to a
    file by a small memory envelope gives exactly the adapter of the in-memory cache, and the
    encoder's tensors are untouched."""
    before = {k: v.clone() for k, v in env.enc.state_dict().items()}
    mem = _scorer(env, 1, micro_batch=2)
    info = mem.calibrate()
    plan = info["memory_plan"]
    assert plan["cache_rows"] == 40 * (1 + 2 * 2) + 6 and plan["cache_in_memory"]
    small = plan["cache_bytes"] / 2**20 + 1.0  # the cache does not fit half of it: spilled
    spilled = _scorer(env, 1, micro_batch=2, max_memory_mb=small)
    info2 = spilled.calibrate(work_dir=tmp_path)
    assert not info2["memory_plan"]["cache_in_memory"] and info2["memory_plan"]["micro_batch"] == 2
    assert not list(tmp_path.iterdir())  # the spill file is removed at the end
    _assert_same(_adapter(spilled), _adapter(mem))
    for k, v in env.enc.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert mem.adapter.first == 3 and sum(1 for k in mem.adapter.lora_a) == 2  # qkv, fc1 of block 3


def test_micro_batches_and_gradient_checkpointing_train_the_same_adapter(env: Any) -> None:
    """Gradient accumulation over micro-batches and recomputed activations are memory options,
    not a different training: the adapter matches the plain run to float rounding."""
    ref = _adapter((s := _scorer(env, max_epochs=2)).calibrate() and s)
    for opts in ({"micro_batch": 3}, {"grad_checkpointing": True}):
        got = _adapter((s := _scorer(env, max_epochs=2, **opts)).calibrate() and s)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k, o=opts: f"{o} {k}: {m}")


def test_sgd_keeps_no_optimiser_state_and_trains(env: Any) -> None:
    ckpts: list[dict[str, Any]] = []
    s = _scorer(env, max_epochs=2, optimizer="sgd", lr=0.05)
    fresh = _adapter(_scorer(env))
    s.calibrate(checkpoint=ckpts.append)
    assert ckpts and not ckpts[-1]["optimizer"]["state"]
    assert any(not torch.equal(v, fresh[k]) for k, v in _adapter(s).items())
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam8bit")


def test_memory_envelope_refuses_with_the_reason() -> None:
    kw = dict(depth=4, first=0, decoder_depth=1, n_tokens=64, dim=128, heads=4, n_train=1000, n_faults=0)
    with pytest.raises(ModelError, match=r"max_memory_mb = 0.5.*grad_checkpointing"):
        plan_memory(TrainConfig(max_memory_mb=0.5), **kw)
    plain = plan_memory(TrainConfig(max_memory_mb=64), **kw)
    ckpt = plan_memory(TrainConfig(max_memory_mb=64, grad_checkpointing=True), **kw)
    assert ckpt.pass_bytes_per_window < plain.pass_bytes_per_window
    assert 1 <= plain.micro_batch <= ckpt.micro_batch <= 32
    # no envelope: the configured micro-batch (or the batch), the cache in memory
    free = plan_memory(TrainConfig(micro_batch=4, prefix_cache=True), **{**kw, "first": 3})
    assert free.micro_batch == 4 and free.cache_in_memory and free.cache_rows == 1000 * 5


def test_int8_inference_path_is_recorded_and_reloads_bit_for_bit(env: Any, tmp_path) -> None:
    """``inference = "int8"``: the frozen encoder's linear layers are dynamically quantised for
    calibration and scoring; the version records the path, and reloading it scores the same.
    The int8 scores follow the float32 ones closely (same adapter training, same data) and the
    encoder itself is not modified."""
    from pdm_edge.model.version import load_version, save_version

    before = {k: v.clone() for k, v in env.enc.state_dict().items()}
    f32, i8 = _scorer(env, 1, max_epochs=2), _scorer(env, 1, max_epochs=2)
    i8 = Scorer(env.enc, env.sha, dataclasses.replace(i8.config, inference="int8")).learn_features(env.normal)
    i8.learn_features(env.fault, "fault")
    f32.calibrate()
    i8.calibrate()
    assert i8.infer_encoder is not env.enc and f32.infer_encoder is env.enc
    x = np.concatenate([env.normal[-10:], env.fault])
    s32, s8 = f32.score_features(x), i8.score_features(x)
    assert not np.array_equal(s32, s8)
    assert np.corrcoef(s32, s8)[0, 1] > 0.9
    save_version(tmp_path / "v.pt", i8)
    r = load_version(tmp_path / "v.pt", env.enc, env.sha)
    assert r.config.inference == "int8"
    np.testing.assert_array_equal(r.score_features(x), s8)
    for k, v in env.enc.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_augmentations_change_the_image_as_their_waveform_counterparts_would() -> None:
    from pdm_edge.learning.augment import augment_features

    img = np.full((1, 2, 64, 32), -40.0, np.float32)
    img[0, :, 20, :] = 0.0  # a tone in band 20 (and a line in bin 20 of the envelope spectrum)
    img[0, 0, :, 5] += 10.0  # an event in frame 5
    rng = np.random.default_rng(0)
    g = augment_features(img, "vibration", rng, gain_db=6.0)
    shift = float(g[0, 0, 0, 0] - img[0, 0, 0, 0])
    assert 0 < abs(shift) <= 6.0 and np.allclose(g - img, shift, atol=1e-5)  # one gain, both channels
    n = augment_features(img, "vibration", rng, noise_snr_db=10.0)
    assert (n[0, 0] >= img[0, 0] - 1e-4).all() and n[0, 0, 0, 0] > img[0, 0, 0, 0] + 1.0  # quiet bands rise
    assert abs(n[0, 0, 20, 0] - img[0, 0, 20, 0]) < 0.5 and np.array_equal(n[0, 1], img[0, 1])
    t = augment_features(img, "vibration", np.random.default_rng(3), shift_frames=4)
    k = int(np.argmax(t[0, 0, 0])) - 5
    assert 1 <= abs(k) <= 4 and np.array_equal(t[0, 1], img[0, 1])  # rolled (k = 0 has no chance with this seed)
    sp = augment_features(img, "vibration", np.random.default_rng(4), speed_pct=10.0)
    r = 1.0 + np.random.default_rng(4).uniform(-10.0, 10.0) / 100.0  # the same draw
    assert round(20 * r) != 20 and int(np.argmax(sp[0, 1, :, 0])) == round(20 * r) == int(np.argmax(sp[0, 0, :, 0]))
    a = augment_features(img, "acoustic", rng, shift_frames=4)
    np.testing.assert_allclose(a[0, 1], np.gradient(a[0, 0], axis=-1))  # acoustic channel 1 follows channel 0


def test_only_replay_windows_are_augmented_and_training_changes(env: Any) -> None:
    from pdm_edge.learning.augment import Augmenter

    f = env.normal[:6]
    replay = np.array([True, False, True, False, True, False])
    aug = Augmenter(f, replay, lambda z: z, "vibration", gain_db=3.0, shift_frames=2)
    out = aug(np.arange(6), torch.from_numpy(f), np.random.default_rng(0)).numpy()
    assert np.array_equal(out[~replay], f[~replay]) and not np.array_equal(out[replay], f[replay])
    plain, augmented = _scorer(env, max_epochs=2), _scorer(env, max_epochs=2, **AUG)
    plain.calibrate()
    augmented.calibrate()
    assert any(not torch.equal(v, _adapter(plain)[k]) for k, v in _adapter(augmented).items())
    labelled = Scorer(env.enc, env.sha, augmented.config).learn_features(env.normal)  # not from the replay buffer
    labelled.learn_features(env.fault, "fault")
    labelled.calibrate()
    _assert_same(_adapter(labelled), _adapter(plain))


def test_wall_time_budget_ends_the_epoch_at_the_next_batch(env: Any) -> None:
    """The budget is checked before every batch, not only between epochs: a spent budget ends
    the running epoch after its current batch, the epoch is validated and kept, and training
    stops (a calibration overruns its budget by one batch, not by one epoch)."""
    polls: list[int] = []
    s = _scorer(env, max_epochs=5, batch=4, max_seconds=1e-9)
    info = s.calibrate(should_stop=lambda: polls.append(1) and False)
    n_train = info["train_windows"]
    assert n_train > 8  # an epoch has several batches
    assert len(polls) == 1  # only batch 0 of epoch 1 ran (should_stop is polled before each batch)
    assert [h["epoch"] for h in info["adapter_history"]] == [0, 1]
    assert np.isfinite(info["adapter_history"][1]["train_loss"])


def test_step_budget_ends_training_after_that_many_steps_also_across_a_resume(env: Any) -> None:
    """``max_steps`` counts optimiser steps over the whole job: 7 steps of 5 an epoch are
    epoch 1 and two batches of epoch 2 (validated and kept); a job interrupted in epoch 2 and
    resumed from its checkpoint counts the steps it had done and ends with the same adapter."""
    polls: list[int] = []
    ref = _scorer(env, max_epochs=5, max_steps=7)
    info = ref.calibrate(should_stop=lambda: polls.append(1) and False)
    assert info["train_windows"] == 40  # 5 batches of 8 an epoch
    assert len(polls) == 7 and [h["epoch"] for h in info["adapter_history"]] == [0, 1, 2]
    ckpts: list[dict[str, Any]] = []
    calls = iter(range(1000))
    with pytest.raises(TrainingInterrupted):
        _scorer(env, max_epochs=5, max_steps=7).calibrate(checkpoint=ckpts.append, should_stop=lambda: next(calls) >= 6)
    assert ckpts[-1]["epoch"] == 1 and ckpts[-1]["steps"] == 5
    resumed = _scorer(env, max_epochs=5, max_steps=7)
    info2 = resumed.calibrate(resume=ckpts[-1])
    _assert_same(_adapter(resumed), _adapter(ref))
    assert [h["val_loss"] for h in info2["adapter_history"]] == [h["val_loss"] for h in info["adapter_history"]]


def test_int8_path_trains_quantisation_aware(env: Any) -> None:
    """On the int8 path the adapter trains through the fake-quantised encoder: its forward pass
    is the int8 path's to float rounding (much nearer than the float encoder's), gradients reach
    the adapter, the update differs from float training's, and no encoder tensor changes."""
    from pdm_edge.model.quantize import fake_int8_encoder, int8_encoder

    from pdm_edge.model.standardize import Standardizer

    x = torch.from_numpy(Standardizer.fit(env.normal, one_sided=True).transform(np.concatenate([env.normal[-8:], env.fault])))
    with torch.no_grad():
        t8, tf, t32 = int8_encoder(env.enc).tokens(x, 0), fake_int8_encoder(env.enc).tokens(x, 0), env.enc.tokens(x, 0)
    assert (tf - t8).abs().mean() < 0.3 * (t32 - t8).abs().mean()
    before = {k: v.clone() for k, v in env.enc.state_dict().items()}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for path in ("float32", "int8"):
        s = _scorer(env, max_epochs=1)
        s = Scorer(env.enc, env.sha, dataclasses.replace(s.config, inference=path)).learn_features(env.normal, replay=True)
        fresh = _adapter(s)
        ckpts: list[dict[str, Any]] = []
        s.calibrate(checkpoint=ckpts.append)
        states[path] = ckpts[-1]["adapter"]
        assert any(not torch.equal(v, fresh[k]) for k, v in states[path].items())
    assert any(not torch.equal(states["int8"][k], states["float32"][k]) for k in states["int8"])
    for k, v in env.enc.state_dict().items():
        assert torch.equal(v, before[k]), k
