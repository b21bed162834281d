"""Rolling-element bearing geometry and kinematic defect frequencies.

A localised defect on a rolling-element bearing produces a train of impacts whose repetition
rate is fixed by the bearing geometry and the shaft speed. The four characteristic
frequencies, for a stationary outer race and a rotating inner race (shaft speed ``fr`` in Hz,
``n`` rolling elements of diameter ``d``, pitch diameter ``D``, contact angle ``phi``), are
the standard kinematic formulas of R. B. Randall and J. Antoni, "Rolling element bearing
diagnostics—A tutorial", Mechanical Systems and Signal Processing 25(2) (2011) 485-520:

- BPFO, ball-pass frequency, outer race: ``n*fr/2 * (1 - d/D*cos(phi))``
- BPFI, ball-pass frequency, inner race: ``n*fr/2 * (1 + d/D*cos(phi))``
- FTF, fundamental train (cage) frequency: ``fr/2 * (1 - d/D*cos(phi))``
- BSF, ball (rolling-element) spin frequency: ``D/(2*d) * fr * (1 - (d/D*cos(phi))**2)``

BSF here is the *spin* frequency of one ball. A spall on a ball strikes the inner and the outer
race once each per spin revolution, so a ball fault shows impacts at **2 x BSF**; some tables
(among them the CWRU Bearing Data Center's page for the SKF 6205, which lists the "rolling
element" frequency as 4.7135 x fr) give that 2 x BSF figure under the name BSF. This module
always returns the spin frequency (2.357 x fr for the SKF 6205); double it where the impact
rate is wanted.

The formulas assume no slip; real bearings run 1-2 % off these values (Randall & Antoni 2011),
which is why diagnosis looks for peaks *near* them in the envelope spectrum.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = [
    "BearingGeometry",
    "DefectFrequencies",
    "FEMTO_PRONOSTIA",
    "SKF_6205",
]


@dataclasses.dataclass(frozen=True)
class DefectFrequencies:
    """The four kinematic defect frequencies of a bearing at one shaft speed, all in Hz.

    Attributes:
        bpfo_hz: ball-pass frequency, outer race (impact rate of an outer-race defect).
        bpfi_hz: ball-pass frequency, inner race (impact rate of an inner-race defect).
        bsf_hz: ball spin frequency (a ball defect impacts at ``2 * bsf_hz``).
        ftf_hz: fundamental train (cage) frequency.
    """

    bpfo_hz: float
    bpfi_hz: float
    bsf_hz: float
    ftf_hz: float

    def as_dict(self) -> dict[str, float]:
        """The four frequencies as ``{"bpfo_hz": ..., "bpfi_hz": ..., "bsf_hz": ..., "ftf_hz": ...}``."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BearingGeometry:
    """Geometry of a rolling-element bearing (outer race stationary, inner race on the shaft).

    Attributes:
        n_elements: number of rolling elements (balls or rollers), an ``int >= 1``.
        element_diameter_mm: rolling-element diameter ``d`` in mm, ``> 0``.
        pitch_diameter_mm: pitch diameter ``D`` in mm (diameter of the circle through the
            element centres), ``> element_diameter_mm``.
        contact_angle_deg: contact angle ``phi`` in degrees, ``0 <= phi < 90`` (0 for a deep
            groove ball bearing under radial load).
        name: optional designation (e.g. ``"SKF 6205-2RS JEM"``); informational only.

    Raises:
        ValueError: if ``n_elements`` is not a positive integer, a diameter is not a positive
            finite number, ``element_diameter_mm >= pitch_diameter_mm``, or the contact angle
            is outside ``[0, 90)`` degrees.
    """

    n_elements: int
    element_diameter_mm: float
    pitch_diameter_mm: float
    contact_angle_deg: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        n = self.n_elements
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n_elements must be an integer >= 1, got {n!r}")
        for field in ("element_diameter_mm", "pitch_diameter_mm", "contact_angle_deg"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{field} must be a finite number, got {value!r}")
            object.__setattr__(self, field, float(value))
        if self.element_diameter_mm <= 0.0:
            raise ValueError(f"element_diameter_mm must be > 0, got {self.element_diameter_mm}")
        if self.pitch_diameter_mm <= self.element_diameter_mm:
            raise ValueError(
                "pitch_diameter_mm must be greater than element_diameter_mm, got "
                f"D={self.pitch_diameter_mm} mm, d={self.element_diameter_mm} mm"
            )
        if not 0.0 <= self.contact_angle_deg < 90.0:
            raise ValueError(f"contact_angle_deg must be in [0, 90), got {self.contact_angle_deg}")

    @property
    def diameter_ratio(self) -> float:
        """``d/D * cos(phi)``, dimensionless, in ``(0, 1)``."""
        return (
            self.element_diameter_mm
            / self.pitch_diameter_mm
            * math.cos(math.radians(self.contact_angle_deg))
        )

    def defect_frequencies(self, shaft_hz: float) -> DefectFrequencies:
        """BPFO, BPFI, BSF and FTF in Hz at shaft speed ``shaft_hz`` (Hz, i.e. rpm / 60).

        Kinematic formulas of Randall & Antoni (2011), no slip; ``bsf_hz`` is the
        ball spin frequency (see the module docstring for the 2 x BSF convention).

        Raises:
            ValueError: if ``shaft_hz`` is negative or not finite.
        """
        if isinstance(shaft_hz, bool) or not isinstance(shaft_hz, (int, float)):
            raise ValueError(f"shaft_hz must be a number, got {shaft_hz!r}")
        if not math.isfinite(shaft_hz) or shaft_hz < 0.0:
            raise ValueError(f"shaft_hz must be a finite number >= 0, got {shaft_hz}")
        fr = float(shaft_hz)
        r = self.diameter_ratio
        n = self.n_elements
        return DefectFrequencies(
            bpfo_hz=n * fr / 2.0 * (1.0 - r),
            bpfi_hz=n * fr / 2.0 * (1.0 + r),
            bsf_hz=self.pitch_diameter_mm / (2.0 * self.element_diameter_mm) * fr * (1.0 - r * r),
            ftf_hz=fr / 2.0 * (1.0 - r),
        )

    def orders(self) -> DefectFrequencies:
        """The defect frequencies as multiples of shaft speed (``defect_frequencies(1.0)``)."""
        return self.defect_frequencies(1.0)

    def as_dict(self) -> dict[str, Any]:
        """The geometry as a JSON-serialisable dict (field name -> value)."""
        return dataclasses.asdict(self)


SKF_6205 = BearingGeometry(
    n_elements=9,
    element_diameter_mm=7.94,
    pitch_diameter_mm=39.04,
    contact_angle_deg=0.0,
    name="SKF 6205-2RS JEM",
)
"""CWRU drive-end bearing, SKF 6205-2RS JEM deep groove ball bearing (CWRU Bearing Data Center):
9 balls of 7.94 mm (0.3126 in), pitch diameter 39.04 mm (1.537 in). Orders: BPFO 3.5848,
BPFI 5.4152, FTF 0.3983, BSF 2.3568 (CWRU lists 2 x BSF = 4.7135)."""

FEMTO_PRONOSTIA = BearingGeometry(
    n_elements=13,
    element_diameter_mm=3.5,
    pitch_diameter_mm=25.6,
    contact_angle_deg=0.0,
    name="FEMTO-ST PRONOSTIA test bearing",
)
"""Test bearing of the FEMTO-ST PRONOSTIA platform (IEEE PHM 2012 challenge; Nectoux et al. 2012):
13 balls of 3.5 mm, pitch diameter 25.6 mm, 32 mm outer / 20 mm inner diameter."""
