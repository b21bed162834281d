"""Recording loaders: the committed sample, the real datasets in ../shared/datasets, error cases.

Real-dataset tests use the ``datasets_dir`` fixture of ``tests/conftest.py`` and are skipped,
with the reason, when ``../shared/datasets`` (or one dataset's folder) is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat, wavfile

from pdm_edge.bearing import SKF_6205
from pdm_edge.errors import RecordingError
from sample_data import make_sample
from sample_data.loaders import (
    DEFAULT_SAMPLE_PATH,
    Recording,
    Segment,
    load_array,
    load_cwru,
    load_femto,
    load_recording,
    load_sample,
    load_wav,
)


def need(datasets_dir: Path, rel: str) -> Path:
    path = datasets_dir / rel
    if not path.exists():
        pytest.skip(f"../shared/datasets not found: {path} is absent")
    return path


# ---------------------------------------------------------------------------------- sample file


def test_sample_file_loads_and_is_small() -> None:
    assert DEFAULT_SAMPLE_PATH.is_file(), "run `python -m sample_data.make_sample`"
    assert DEFAULT_SAMPLE_PATH.stat().st_size < 5 * 1024 * 1024
    rec = load_sample()
    assert isinstance(rec, Recording)
    assert rec.sample_rate_hz == 25600.0 and rec.unit == "g" and rec.kind == "vibration"
    assert rec.is_continuous and rec.segments[0].start_ns == 0
    x = rec.concatenated()
    assert x.dtype == np.float32 and x.shape == (rec.n_samples,)
    assert rec.duration_s == pytest.approx(60.0)
    meta = rec.metadata
    assert meta["format_version"] == 1 and meta["seed"] == 0
    assert meta["onset_s"] == 30.0 and meta["fault"]["kind"] == "outer"
    assert meta["bpfo_hz"] == pytest.approx(SKF_6205.defect_frequencies(25.0).bpfo_hz)
    assert meta["generator"] == "sensors.simulator.VibrationSimulator"
    # healthy first half, clearly faulty at the end
    fs = int(rec.sample_rate_hz)
    rms_early = np.sqrt(np.mean(x[: 10 * fs].astype(np.float64) ** 2))
    rms_late = np.sqrt(np.mean(x[-5 * fs :].astype(np.float64) ** 2))
    assert rms_late > 3 * rms_early
    with np.load(DEFAULT_SAMPLE_PATH) as npz:
        assert npz["samples"].dtype == np.int16
        json.loads(str(npz["metadata_json"]))


def test_make_sample_regenerates_identical_samples(tmp_path: Path) -> None:
    out = make_sample.make_sample(tmp_path / "regen.npz")
    with np.load(out) as new, np.load(DEFAULT_SAMPLE_PATH) as old:
        assert np.array_equal(new["samples"], old["samples"])
        assert float(new["scale"]) == float(old["scale"])
        assert json.loads(str(new["metadata_json"])) == json.loads(str(old["metadata_json"]))


def test_make_sample_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "short.npz"
    assert make_sample.main(["--out", str(out), "--duration-s", "2"]) == 0
    rec = load_recording(out)
    assert rec.n_samples == 2 * 25600
    assert "wrote" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- CWRU


def test_cwru_12k_drive_end(datasets_dir: Path) -> None:
    path = need(datasets_dir, "cwru/de_12k/12k_Drive_End_OR021@6_0_234.mat")
    rec = load_cwru(path)
    assert rec.sample_rate_hz == 12000.0 and rec.unit == "g" and rec.kind == "vibration"
    assert rec.n_samples == 122426 and rec.segments[0].start_ns == 0
    m = rec.metadata
    assert m["variable"] == "X234_DE_time" and m["channel"] == "DE"
    assert m["rpm"] == 1796.0 and m["shaft_hz"] == pytest.approx(1796 / 60)
    assert (m["condition"], m["fault_type"], m["fault_size_in"], m["or_position"]) == (
        "outer_race",
        "bearing_outer_race",
        0.021,
        "6:00",
    )
    assert m["label"] == "anomaly" and m["load_hp"] == 0 and m["cwru_file_no"] == 234
    assert m["defect_frequencies_hz"]["bpfo_hz"] == pytest.approx(3.5848 * 1796 / 60, rel=1e-4)
    # FE and BA channels exist in 12 kHz fault files
    assert load_cwru(path, channel="BA").metadata["variable"] == "X234_BA_time"


def test_cwru_48k_and_normal(datasets_dir: Path) -> None:
    rec = load_recording(need(datasets_dir, "cwru/de_48k/48k_Drive_End_B007_0_122.mat"))
    assert rec.sample_rate_hz == 48000.0 and rec.metadata["variable"] == "X122_DE_time"
    assert rec.metadata["condition"] == "ball" and rec.metadata["fault_size_in"] == 0.007
    normal = load_recording(need(datasets_dir, "cwru/normal_48k/normal_0_97.mat"))
    assert normal.sample_rate_hz == 48000.0 and normal.n_samples == 243938
    assert normal.metadata["label"] == "normal" and normal.metadata["fault_type"] is None
    assert normal.metadata["sample_rate_source"] == "normal baseline"


def test_cwru_174_quirk(datasets_dir: Path) -> None:
    rec = load_cwru(need(datasets_dir, "cwru/de_48k/48k_Drive_End_IR014_0_174.mat"))
    assert rec.metadata["variable"] == "X173_DE_time"
    assert rec.metadata["cwru_file_no"] == 174 and rec.n_samples == 63788
    assert rec.sample_rate_hz == 48000.0


def test_cwru_sample_rate_override_and_folder_name(tmp_path: Path, datasets_dir: Path) -> None:
    src = need(datasets_dir, "cwru/de_12k/12k_Drive_End_IR007_0_105.mat")
    assert load_cwru(src, sample_rate_hz=11000).sample_rate_hz == 11000.0
    # a file renamed to CWRU's bare number: the rate comes from the folder name, else error
    folder = tmp_path / "12k_DE"
    folder.mkdir()
    (folder / "105.mat").write_bytes(src.read_bytes())
    rec = load_cwru(folder / "105.mat")
    assert rec.sample_rate_hz == 12000.0 and rec.metadata["sample_rate_source"] == "folder name"
    other = tmp_path / "misc"
    other.mkdir()
    (other / "105.mat").write_bytes(src.read_bytes())
    with pytest.raises(RecordingError, match="sample rate"):
        load_cwru(other / "105.mat")


def test_cwru_variable_matching_errors(tmp_path: Path) -> None:
    none = tmp_path / "12k_Drive_End_IR007_0_105.mat"
    savemat(none, {"X105_FE_time": np.zeros((10, 1))})
    with pytest.raises(RecordingError, match="_DE_time"):
        load_cwru(none)
    two = tmp_path / "12k_Drive_End_IR007_0_106.mat"
    savemat(two, {"X048_DE_time": np.zeros((10, 1)), "X049_DE_time": np.ones((10, 1))})
    with pytest.raises(RecordingError, match="2 variables"):
        load_cwru(two)
    assert load_cwru(two, variable="X049_DE_time").concatenated()[0] == 1.0
    # with several candidates the one numbered like the file wins (CWRU 99.mat holds X098 and X099)
    pick = tmp_path / "12k_Drive_End_IR007_0_099.mat"
    savemat(pick, {"X098_DE_time": np.zeros((10, 1)), "X099_DE_time": np.ones((10, 1)), "X099RPM": 1772})
    rec = load_cwru(pick)
    assert rec.metadata["variable"] == "X099_DE_time" and rec.metadata["rpm"] == 1772.0


# ---------------------------------------------------------------------------------- FEMTO


def test_femto_bearing3_1(datasets_dir: Path) -> None:
    folder = need(datasets_dir, "femto_pronostia/Learning_set/Bearing3_1")
    rec = load_recording(folder, date="2011-04-07")
    assert rec.sample_rate_hz == 25600.0 and rec.unit == "g" and rec.kind == "vibration"
    assert len(rec.segments) == 515 and rec.metadata["snapshot_count"] == 515
    assert all(s.n_samples == 2560 for s in rec.segments)
    starts = np.array([s.start_ns for s in rec.segments], dtype=np.int64)
    gaps_s = np.diff(starts) / 1e9
    assert np.all(gaps_s > 0) and np.allclose(gaps_s, 10.0, atol=0.5)
    assert rec.metadata["snapshot_period_s"] == pytest.approx(10.0, abs=0.1)
    assert rec.metadata["files"][0] == "acc_00001.csv" and rec.metadata["files"][-1] == "acc_00515.csv"
    # first snapshot at 09:10:39 (+0.11879 s) on 2011-04-07, UTC
    t0 = np.datetime64("2011-04-07T09:10:39", "ns").astype(np.int64)
    assert 0 <= starts[0] - t0 < 10**9
    assert rec.metadata["shaft_hz"] == 25.0 and rec.metadata["bearing"]["n_elements"] == 13
    first = np.loadtxt(folder / "acc_00001.csv", delimiter=",")
    np.testing.assert_allclose(rec.segments[0].samples, first[:, 4].astype(np.float32))
    vertical = load_femto(folder, channel="vertical")
    np.testing.assert_allclose(vertical.segments[0].samples, first[:, 5].astype(np.float32))


def _write_snapshot(path: Path, h: int, m: int, s: int, delimiter: str = ",", decimal: str = ".") -> None:
    rows = []
    for i in range(4):
        vals = [str(h), str(m), str(s), f"{1000.0 + 39 * i:.1f}", f"{0.1 * i:.3f}", f"{-0.2 * i:.3f}"]
        rows.append(delimiter.join(v.replace(".", decimal) for v in vals))
    path.write_text("\n".join(rows) + "\n")


def test_femto_semicolons_order_and_midnight_rollover(tmp_path: Path) -> None:
    _write_snapshot(tmp_path / "acc_00010.csv", 0, 0, 5)  # after midnight: next day
    _write_snapshot(tmp_path / "acc_00009.csv", 23, 59, 55, delimiter=";")
    _write_snapshot(tmp_path / "acc_00002.csv", 23, 59, 45, delimiter=";", decimal=",")
    (tmp_path / "temp_00001.csv").write_text("23;59;45;1;50.0\n")
    rec = load_femto(tmp_path, date="2020-01-01")
    assert rec.metadata["files"] == ("acc_00002.csv", "acc_00009.csv", "acc_00010.csv")
    day = np.datetime64("2020-01-01T00:00:00", "ns").astype(np.int64)
    expected = [day + (86385 * 10**9) + 10**6, day + 86395 * 10**9 + 10**6, day + 86405 * 10**9 + 10**6]
    assert [s.start_ns for s in rec.segments] == expected
    np.testing.assert_allclose(rec.segments[0].samples, [0.0, 0.1, 0.2, 0.3], atol=1e-6)


def test_femto_errors(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="no acc_"):
        load_femto(tmp_path)
    _write_snapshot(tmp_path / "acc_00001.csv", 1, 2, 3)
    with pytest.raises(RecordingError, match="channel"):
        load_femto(tmp_path, channel="axial")  # type: ignore[arg-type]
    with pytest.raises(RecordingError, match="date"):
        load_femto(tmp_path, date="07/04/2011")
    (tmp_path / "acc_00002.csv").write_text("1,2,3\n")
    with pytest.raises(RecordingError, match="6 columns"):
        load_femto(tmp_path)


# ---------------------------------------------------------------------------------- WAV


def test_dcase_valve_wav(datasets_dir: Path) -> None:
    path = need(datasets_dir, "dcase2023_task2/valve/test/section_00_source_test_anomaly_0000_pat_00.wav")
    rec = load_recording(path)
    assert rec.sample_rate_hz == 16000.0 and rec.unit == "FS" and rec.kind == "acoustic"
    assert rec.n_samples == 160000
    x = rec.concatenated()
    assert x.dtype == np.float32 and np.max(np.abs(x)) <= 1.0
    _, raw = wavfile.read(path)
    np.testing.assert_array_equal(x, raw.astype(np.float32) / 32768.0)
    m = rec.metadata
    assert (m["machine_type"], m["domain"], m["split"], m["label"], m["clip_index"], m["attributes"]) == (
        "valve",
        "source",
        "test",
        "anomaly",
        0,
        "pat_00",
    )


def test_mimii_8_channel_wav(datasets_dir: Path) -> None:
    path = need(datasets_dir, "mimii/pump/abnormal/brmdv_pump_abnormal.wav")
    first = load_wav(path)
    last = load_wav(path, channel=7)
    assert first.metadata["channels"] == 8 and first.n_samples == 160000
    assert first.sample_rate_hz == 16000.0
    assert not np.array_equal(first.concatenated(), last.concatenated())
    assert first.metadata["label"] == "anomaly" and first.metadata["machine_type"] == "pump"
    with pytest.raises(RecordingError, match="channel"):
        load_wav(path, channel=8)


def test_wav_formats(tmp_path: Path) -> None:
    u8 = tmp_path / "u8.wav"
    wavfile.write(u8, 8000, np.array([0, 128, 255], dtype=np.uint8))
    np.testing.assert_allclose(load_wav(u8).concatenated(), [-1.0, 0.0, 127 / 128])
    i32 = tmp_path / "i32.wav"
    wavfile.write(i32, 8000, np.array([-(2**31), 2**30], dtype=np.int32))
    np.testing.assert_allclose(load_wav(i32).concatenated(), [-1.0, 0.5])
    (tmp_path / "junk.wav").write_bytes(b"RIFF....not a wav")
    with pytest.raises(RecordingError, match="WAV"):
        load_wav(tmp_path / "junk.wav")


# ---------------------------------------------------------------------------------- arrays


def test_csv_and_npy_arrays(tmp_path: Path) -> None:
    one = tmp_path / "one.csv"
    one.write_text("0.5\n-0.25\n1.0\n")
    rec = load_array(one, sample_rate_hz=1000)
    np.testing.assert_allclose(rec.concatenated(), [0.5, -0.25, 1.0])
    assert rec.sample_rate_hz == 1000.0 and rec.unit == "g" and rec.kind == "vibration"

    table = tmp_path / "table.csv"
    table.write_text("time,accel_x,accel_y\n0,1.5,2\n1,2.5,3\n")
    np.testing.assert_allclose(load_recording(table, sample_rate_hz=10, column=2).concatenated(), [2.0, 3.0])

    npy = tmp_path / "x.npy"
    np.save(npy, np.arange(6, dtype=np.float64).reshape(3, 2))
    rec = load_recording(npy, sample_rate_hz=16000, unit="Pa", kind="acoustic", column=1)
    np.testing.assert_allclose(rec.concatenated(), [1.0, 3.0, 5.0])
    assert rec.unit == "Pa" and rec.kind == "acoustic"


def test_array_errors(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("1\n2\n")
    with pytest.raises(RecordingError, match="sample_rate_hz"):
        load_array(f)
    with pytest.raises(RecordingError, match="sample_rate_hz"):
        load_recording(f)
    with pytest.raises(RecordingError):
        load_array(f, sample_rate_hz=-5)
    with pytest.raises(RecordingError, match="column"):
        load_array(f, sample_rate_hz=10, column=3)
    with pytest.raises(RecordingError, match="unit"):
        load_array(f, sample_rate_hz=10, unit="V")  # type: ignore[arg-type]
    nan = tmp_path / "nan.csv"
    nan.write_text("1\nnan\n")
    with pytest.raises(RecordingError, match="NaN"):
        load_array(nan, sample_rate_hz=10)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array(["a", "b"]))
    with pytest.raises(RecordingError):
        load_array(bad, sample_rate_hz=10)


# ---------------------------------------------------------------------------------- dispatch


def test_dispatch_errors(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="not found"):
        load_recording(tmp_path / "missing.wav")
    (tmp_path / "notes.xyz").write_text("hello")
    with pytest.raises(RecordingError, match="unknown recording format"):
        load_recording(tmp_path / "notes.xyz")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(RecordingError, match="acc_"):
        load_recording(empty)
    with pytest.raises(RecordingError, match="does not accept"):
        load_recording(DEFAULT_SAMPLE_PATH, channel=3)
    (tmp_path / "broken.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(RecordingError):
        load_recording(tmp_path / "broken.mat")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(RecordingError):
        load_recording(tmp_path / "broken.npz")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(RecordingError, match="missing"):
        load_sample(other)


def test_segment_and_recording_validation() -> None:
    seg = Segment(5, np.array([1.0, 2.0]))
    assert seg.samples.dtype == np.float32 and not seg.samples.flags.writeable
    with pytest.raises(ValueError):
        Segment(0, np.zeros(0))
    with pytest.raises(ValueError):
        Recording("x", 0.0, "g", "vibration", (seg,))
    with pytest.raises(ValueError):
        Recording("x", 10.0, "volt", "vibration", (seg,))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Recording("x", 10.0, "g", "vibration", ())
    rec = Recording("x", 10.0, "g", "vibration", (seg, Segment(10**9, np.array([3.0]))), {"a": 1})
    assert rec.n_samples == 3 and rec.duration_s == pytest.approx(0.3) and not rec.is_continuous
    np.testing.assert_array_equal(rec.concatenated(), [1.0, 2.0, 3.0])
    with pytest.raises(TypeError):
        rec.metadata["a"] = 2  # type: ignore[index]


def test_dcase_clips_lists_the_valve_split(datasets_dir: Path, tmp_path: Path) -> None:
    from sample_data.loaders import dcase_clips

    clips = dcase_clips(datasets_dir / "dcase2023_task2" / "valve")
    assert {(c.split, c.label) for c in clips} == {("train", "normal"), ("test", "normal"), ("test", "anomaly")}
    assert sum(c.split == "test" and c.label == "anomaly" for c in clips) == 50
    assert clips[0].path.suffix == ".wav" and isinstance(clips[0].index, int)
    with pytest.raises(FileNotFoundError):
        dcase_clips(tmp_path)
