"""Windowing with hop, across chunk boundaries, and the stream events (gap, duplicate, ...)."""

from __future__ import annotations

import numpy as np
import pytest

from pdm_edge.ingest.chunk import Chunk
from pdm_edge.ingest.windowing import StreamSettings, StreamWindower

FS = 1000.0
T0 = 1_700_000_000_000_000_000


def _windower(window: int, hop: int, fs: float = FS) -> StreamWindower:
    return StreamWindower("s", "m", "x", StreamSettings("vibration", fs, "g", window, hop, max_time_jitter_s=0.002))


def _chunks(x: np.ndarray, sizes: list[int], fs: float = FS, t0: int = T0, seq0: int = 0) -> list[Chunk]:
    out, i, seq = [], 0, seq0
    for n in sizes:
        out.append(Chunk("s", "m", "x", t0 + round(i * 1e9 / fs), fs, "g", seq, x[i:i + n]))
        i += n
        seq += 1
    return out


@pytest.mark.parametrize("window, hop", [(100, 50), (100, 100), (100, 30), (64, 100), (1, 1)])
@pytest.mark.parametrize("sizes", [[1000], [7] * 142 + [6], [333, 1, 1, 665], [100] * 10])
def test_windows_match_direct_slicing(window, hop, sizes):
    x = np.arange(1000, dtype=np.float32)
    w = _windower(window, hop)
    got = [win for c in _chunks(x, sizes) for win in w.push(c).windows]
    starts = list(range(0, 1000 - window + 1, hop))
    assert [g.index for g in got] == list(range(len(starts)))
    for g, s in zip(got, starts):
        np.testing.assert_array_equal(g.samples, x[s:s + window])
        assert g.start_ns == T0 + s * 1_000_000  # 1 ms per sample at 1 kHz
        assert g.samples.dtype == np.float32 and g.n_samples == window
    assert w.buffered_samples <= window + hop


def test_exact_timestamps_at_non_integer_rate():
    fs = 25600.0 / 3  # 8533.33 Hz: sample period is not a whole number of ns
    w = _windower(3, 3, fs=fs)
    x = np.zeros(3 * 100_000, dtype=np.float32)
    wins = [win for c in _chunks(x, [3000] * 100, fs=fs) for win in w.push(c).windows]
    last = wins[-1]
    # exact: index * 3 samples / (25600/3 Hz) = index * 9/25600 s
    assert last.start_ns == T0 + (last.index * 9 * 10**9) // 25600


def test_window_is_read_only_copy():
    x = np.arange(200, dtype=np.float32)
    w = _windower(100, 100)
    win = w.push(_chunks(x, [200])[0]).windows[0]
    with pytest.raises(ValueError):
        win.samples[0] = 1.0


def test_duplicate_is_dropped_once_windowed():
    x = np.arange(400, dtype=np.float32)
    w = _windower(100, 100)
    c = _chunks(x, [100, 100, 100, 100])
    got = []
    for chunk in [c[0], c[1], c[1], c[0], c[2], c[3], c[3]]:
        r = w.push(chunk)
        got += r.windows
        if chunk is c[1] and len(got) > 2:
            assert r.event == "duplicate"
    assert len(got) == 4
    np.testing.assert_array_equal(np.concatenate([g.samples for g in got]), x)


def test_seq_gap_discards_partial_window_and_restarts():
    x = np.arange(1000, dtype=np.float32)
    w = _windower(100, 100)
    c = _chunks(x, [150, 150, 150, 150])
    r0, r1 = w.push(c[0]), w.push(c[1])
    assert len(r0.windows) == 1 and len(r1.windows) == 2
    r3 = w.push(c[3])  # seq 3 after seq 1: c[2] is missing
    assert r3.event == "gap_seq"
    assert len(r3.windows) == 1 and r3.windows[0].index == 0
    assert r3.windows[0].start_ns == c[3].ts_ns
    np.testing.assert_array_equal(r3.windows[0].samples, x[450:550])


def test_time_gap_snapshot_sensor_gives_one_window_per_snapshot():
    # FEMTO-like: 0.1 s snapshots every 10 s with consecutive seq
    w = _windower(100, 100)
    wins = []
    for k in range(5):
        r = w.push(Chunk("s", "m", "x", T0 + k * 10_000_000_000, FS, "g", k, np.full(100, k, np.float32)))
        assert r.event == (None if k == 0 else "gap_time")
        wins += r.windows
    assert [int(v.samples[0]) for v in wins] == [0, 1, 2, 3, 4]
    assert [v.start_ns for v in wins] == [T0 + k * 10_000_000_000 for k in range(5)]


def test_jitter_within_tolerance_is_not_a_gap():
    x = np.arange(300, dtype=np.float32)
    w = _windower(100, 100)
    c = _chunks(x, [100, 100, 100])
    jittered = Chunk("s", "m", "x", c[1].ts_ns + 1_500_000, FS, "g", 1, c[1].samples)  # 1.5 ms late < 2 ms
    assert w.push(c[0]).event is None
    r = w.push(jittered)
    assert r.event is None
    assert r.windows[0].start_ns == c[1].ts_ns  # the sample clock, not the jittered stamp


def test_publisher_restart_with_seq_zero_restarts_stream():
    x = np.arange(200, dtype=np.float32)
    w = _windower(100, 100)
    w.push(_chunks(x, [100])[0])
    later = Chunk("s", "m", "x", T0 + 60_000_000_000, FS, "g", 0, x[100:])
    r = w.push(later)
    assert r.event == "restart" and len(r.windows) == 1 and r.windows[0].index == 0


def test_rate_change_restarts_with_scaled_window():
    w = _windower(100, 50)
    w.push(Chunk("s", "m", "x", T0, FS, "g", 0, np.zeros(150, np.float32)))
    r = w.push(Chunk("s", "m", "x", T0 + 150_000_000, 2 * FS, "g", 1, np.zeros(400, np.float32)))
    assert r.event == "rate_change"
    assert w.settings.window_samples == 200 and w.settings.hop_samples == 100
    assert len(r.windows) == 3 and all(v.sample_rate_hz == 2 * FS for v in r.windows)
