"""Per-machine standardisation fitted and applied chunk by chunk (issue 14: no stacked raw copy
and no float64 copy of a calibration's windows)."""

from __future__ import annotations

import numpy as np
import pytest

from pdm_edge.model.standardize import Standardizer


def _windows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # bands with different levels and spreads; one constant band (spread floor)
    x = rng.normal(0.0, 1.0, (n, 2, 64, 32)) * rng.uniform(0.5, 6.0, (1, 2, 64, 1)) + rng.uniform(-80, 0, (1, 2, 64, 1))
    x[:, 1, 5] = -40.0
    return x.astype(np.float32)


def _reference(x: np.ndarray, one_sided: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The textbook formula on the whole array, in float64."""
    d = x.astype(np.float64)
    mean = d.mean(axis=(0, 3), keepdims=True)[0]
    std = np.maximum(np.sqrt(((d - mean) ** 2).mean(axis=(0, 3), keepdims=True)[0]), 1.0)
    z = (d - mean) / std
    return mean, std, np.arcsinh(np.maximum(z, 0.0) if one_sided else z)


@pytest.mark.parametrize("one_sided", [False, True])
def test_chunked_fit_and_transform_match_the_whole_array(one_sided: bool) -> None:
    x = _windows(301)
    mean, std, ref = _reference(x, one_sided)
    s = Standardizer.fit(list(x), one_sided=one_sided, chunk=64)  # 301 = 4 * 64 + 45: a partial last chunk
    np.testing.assert_allclose(s.mean, mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(s.std, std, rtol=1e-6)
    assert s.std[1, 5, 0] == 1.0  # the constant band sits on the spread floor
    out = s.transform_many(list(x), chunk=64)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # the array and the sequence give the same statistics and the same images, bit for bit
    s2 = Standardizer.fit(x, one_sided=one_sided, chunk=64)
    assert np.array_equal(s.mean, s2.mean) and np.array_equal(s.std, s2.std)
    assert np.array_equal(out, s.transform(x))


def test_transform_writes_into_out() -> None:
    x = _windows(10)
    s = Standardizer.fit(x)
    out = np.full(x.shape, np.nan, np.float32)
    got = s.transform(x, out=out)
    assert got is out and np.isfinite(out).all()


def test_fit_errors() -> None:
    x = _windows(5)
    with pytest.raises(ValueError, match="at least 2 windows"):
        Standardizer.fit(x[:1])
    with pytest.raises(ValueError, match="at least 2 windows"):
        Standardizer.fit(x[:, 0])  # (N, F, T): not windows of (C, F, T)
    bad = x.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        Standardizer.fit(list(bad), chunk=2)
    with pytest.raises(ValueError, match="every window must have shape"):
        Standardizer.fit([x[0], x[1], x[2, :, :32]])
