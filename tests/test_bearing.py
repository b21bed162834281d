"""Bearing geometry and kinematic defect frequencies (Randall & Antoni 2011)."""

from __future__ import annotations

import dataclasses

import pytest

from pdm_edge.bearing import FEMTO_PRONOSTIA, SKF_6205, BearingGeometry, DefectFrequencies


def test_skf_6205_orders_match_cwru_table() -> None:
    # CWRU bearing-specification page, drive end SKF 6205 (multiples of shaft speed).
    orders = SKF_6205.orders()
    assert orders.bpfo_hz == pytest.approx(3.5848, abs=1e-4)
    assert orders.bpfi_hz == pytest.approx(5.4152, abs=1e-4)
    assert orders.ftf_hz == pytest.approx(0.39828, abs=1e-4)
    # bsf_hz is the ball *spin* frequency; CWRU lists 2 x BSF = 4.7135.
    assert orders.bsf_hz == pytest.approx(2.357, abs=1e-3)
    assert 2 * orders.bsf_hz == pytest.approx(4.7135, abs=1e-3)


def test_frequencies_scale_with_shaft_speed() -> None:
    fr = 1797 / 60.0
    f = SKF_6205.defect_frequencies(fr)
    assert isinstance(f, DefectFrequencies)
    assert f.bpfo_hz == pytest.approx(3.5848 * fr, rel=1e-4)
    assert f.bpfi_hz == pytest.approx(5.4152 * fr, rel=1e-4)
    # identities of the kinematic formulas
    assert f.bpfo_hz + f.bpfi_hz == pytest.approx(SKF_6205.n_elements * fr)
    assert f.bpfo_hz == pytest.approx(SKF_6205.n_elements * f.ftf_hz)
    assert SKF_6205.defect_frequencies(0.0).bpfo_hz == 0.0
    assert set(f.as_dict()) == {"bpfo_hz", "bpfi_hz", "bsf_hz", "ftf_hz"}


def test_femto_geometry() -> None:
    assert (FEMTO_PRONOSTIA.n_elements, FEMTO_PRONOSTIA.element_diameter_mm, FEMTO_PRONOSTIA.pitch_diameter_mm) == (
        13,
        3.5,
        25.6,
    )
    f = FEMTO_PRONOSTIA.defect_frequencies(25.0)  # condition 3: 1500 rpm
    assert f.bpfo_hz == pytest.approx(13 * 25 / 2 * (1 - 3.5 / 25.6))


def test_contact_angle_reduces_ratio() -> None:
    angled = BearingGeometry(9, 7.94, 39.04, contact_angle_deg=40.0)
    assert angled.orders().bpfo_hz > SKF_6205.orders().bpfo_hz
    assert angled.orders().bpfi_hz < SKF_6205.orders().bpfi_hz


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SKF_6205.n_elements = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_elements": 0, "element_diameter_mm": 7.94, "pitch_diameter_mm": 39.04},
        {"n_elements": 9.0, "element_diameter_mm": 7.94, "pitch_diameter_mm": 39.04},
        {"n_elements": True, "element_diameter_mm": 7.94, "pitch_diameter_mm": 39.04},
        {"n_elements": 9, "element_diameter_mm": 0.0, "pitch_diameter_mm": 39.04},
        {"n_elements": 9, "element_diameter_mm": -1.0, "pitch_diameter_mm": 39.04},
        {"n_elements": 9, "element_diameter_mm": 40.0, "pitch_diameter_mm": 39.04},
        {"n_elements": 9, "element_diameter_mm": float("nan"), "pitch_diameter_mm": 39.04},
        {"n_elements": 9, "element_diameter_mm": 7.94, "pitch_diameter_mm": float("inf")},
        {"n_elements": 9, "element_diameter_mm": 7.94, "pitch_diameter_mm": 39.04, "contact_angle_deg": 90.0},
        {"n_elements": 9, "element_diameter_mm": 7.94, "pitch_diameter_mm": 39.04, "contact_angle_deg": -1.0},
        {"n_elements": 9, "element_diameter_mm": "7.94", "pitch_diameter_mm": 39.04},
    ],
)
def test_invalid_geometry(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BearingGeometry(**kwargs)


@pytest.mark.parametrize("shaft_hz", [-1.0, float("nan"), float("inf"), "25"])
def test_invalid_shaft_speed(shaft_hz: object) -> None:
    with pytest.raises(ValueError):
        SKF_6205.defect_frequencies(shaft_hz)  # type: ignore[arg-type]
