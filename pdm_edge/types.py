"""Core records that move between the stages of pdm-edge.

Each is a frozen dataclass: a stage receives one, never mutates it, and hands a new record on.
Times are integer nanoseconds since the Unix epoch, UTC (``*_ns``), the precision InfluxDB
stores; sample rates are in Hz; waveforms are in the physical unit named by ``unit``:

- ``"g"``: acceleration in standard gravity (1 g = 9.80665 m/s^2),
- ``"m/s2"``: acceleration in m/s^2,
- ``"Pa"``: sound pressure in pascal,
- ``"FS"``: digital full scale (dimensionless, +-1.0 = full scale), for uncalibrated microphones.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

SensorKind = Literal["vibration", "acoustic"]
SENSOR_KINDS: tuple[str, ...] = ("vibration", "acoustic")

Unit = Literal["g", "m/s2", "Pa", "FS"]
UNITS: tuple[str, ...] = ("g", "m/s2", "Pa", "FS")

STANDARD_GRAVITY_M_S2 = 9.80665
"""1 g in m/s^2 (CGPM 1901, ISO 80000-3)."""

LabelKind = Literal["normal", "fault", "ignore"]
LABEL_KINDS: tuple[str, ...] = ("normal", "fault", "ignore")

FAULT_TYPES: tuple[str, ...] = (
    "bearing_outer_race",
    "bearing_inner_race",
    "bearing_ball",
    "imbalance",
    "misalignment",
    "looseness",
    "cavitation",
    "other",
)
"""Vocabulary of fault types a technician may attach to a ``fault`` label."""

ModelStatus = Literal["candidate", "active", "rejected", "retired"]
MODEL_STATUSES: tuple[str, ...] = ("candidate", "active", "rejected", "retired")


def stream_id(site: str, machine: str, sensor: str) -> str:
    """The key of one sensor stream, ``"{site}/{machine}/{sensor}"`` (as in the MQTT topic)."""
    return f"{site}/{machine}/{sensor}"


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


@dataclasses.dataclass(frozen=True, eq=False)
class Window:
    """One window of waveform samples from one sensor stream, ready for feature extraction.

    Attributes:
        site, machine, sensor: names from the MQTT topic, each ``[A-Za-z0-9_-]+``.
        kind: ``"vibration"`` or ``"acoustic"`` (from the sensor's configuration).
        start_ns: time of the first sample, ns since the Unix epoch (UTC).
        sample_rate_hz: sampling rate in Hz.
        unit: physical unit of ``samples`` (see module docstring).
        samples: shape ``(n,)``, ``float32``, read-only; ``n = window_s * sample_rate_hz``.
        index: position of this window in its stream since the stream last (re)started
            (0, 1, 2, ...); a gap or sample-rate change restarts the count.

    Two windows compare equal when they come from the same stream, start at the same instant
    and hold the same samples.
    """

    site: str
    machine: str
    sensor: str
    kind: SensorKind
    start_ns: int
    sample_rate_hz: float
    unit: Unit
    samples: np.ndarray
    index: int = 0

    def __post_init__(self) -> None:
        arr = np.asarray(self.samples, dtype=np.float32)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"Window.samples must be a non-empty 1-D array, got shape {arr.shape}")
        if not arr.flags.owndata or arr.flags.writeable:
            arr = arr.copy()
        arr.flags.writeable = False
        object.__setattr__(self, "samples", arr)

    @property
    def stream(self) -> str:
        """``"{site}/{machine}/{sensor}"``."""
        return stream_id(self.site, self.machine, self.sensor)

    @property
    def n_samples(self) -> int:
        """Number of samples in the window."""
        return int(self.samples.shape[0])

    @property
    def duration_s(self) -> float:
        """Window length in seconds."""
        return self.n_samples / self.sample_rate_hz

    @property
    def end_ns(self) -> int:
        """Time just after the last sample (start of the next, non-overlapping window), ns."""
        return self.start_ns + round(self.n_samples * 1e9 / self.sample_rate_hz)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Window):
            return NotImplemented
        return (
            self.stream == other.stream
            and self.start_ns == other.start_ns
            and self.sample_rate_hz == other.sample_rate_hz
            and np.array_equal(self.samples, other.samples)
        )

    def __hash__(self) -> int:
        return hash((self.stream, self.start_ns, self.n_samples))


@dataclasses.dataclass(frozen=True)
class FaultMatch:
    """The confirmed fault an anomalous window looks like: the nearest of the model version's
    fault prototypes (embeddings of windows a technician labelled ``fault``), when the window
    is nearer to it than to the machine's normal baseline (Mahalanobis metric of the baseline).

    Attributes:
        label_id: id of the ``fault`` label that confirmed the fault.
        fault_type: its fault type (one of :data:`FAULT_TYPES`), or ``None`` when not given.
        start_ns: start of the confirmed fault's labelled span (ns, UTC).
        similarity: ``d_normal / (d_normal + d_fault)`` in (0.5, 1]; 1 = on the prototype.

    >>> FaultMatch("lb-1", "bearing_outer_race", 1_762_128_000 * 10**9, 0.81).describe()
    'looks like the bearing outer race fault confirmed on 2025-11-03 (similarity 0.81)'
    """

    label_id: str
    fault_type: str | None
    start_ns: int
    similarity: float

    def describe(self) -> str:
        """One line for people: which confirmed fault, from when, how similar."""
        what = f"the {self.fault_type.replace('_', ' ')} fault" if self.fault_type else "the fault"
        day = datetime.datetime.fromtimestamp(self.start_ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%d")
        return f"looks like {what} confirmed on {day} (similarity {self.similarity:.2f})"


@dataclasses.dataclass(frozen=True)
class Score:
    """The anomaly score of one window.

    Attributes:
        site, machine, sensor: the window's stream.
        start_ns: the window's start (ns, UTC); the store's timestamp, so a retried write
            overwrites rather than duplicates.
        score: anomaly score, dimensionless, higher = more anomalous; standardised per machine
            so that the calibration windows have median 0 and unit spread.
        threshold: the alert threshold of the model version that scored it, or ``None`` while
            the machine is not calibrated.
        is_anomaly: ``score > threshold`` (always ``False`` while uncalibrated).
        model_version: id of the model version that produced the score, or ``None``.
        fault_match: for an anomalous window of a version that knows confirmed faults, the
            one it looks like (:class:`FaultMatch`), else ``None``; it travels to the alert and
            is not stored with the score.
    """

    site: str
    machine: str
    sensor: str
    start_ns: int
    score: float
    threshold: float | None
    is_anomaly: bool
    model_version: str | None
    fault_match: FaultMatch | None = None


@dataclasses.dataclass(frozen=True)
class Alert:
    """An alert: a span where k of the last n windows of a sensor scored above threshold.

    Attributes:
        id: stable identifier (unique per appliance).
        site, machine, sensor: where it was raised.
        state: ``"raised"`` while open, ``"cleared"`` once the scores fell back.
        start_ns: start of the first window of the span (ns, UTC).
        end_ns: end of the last anomalous window, or ``None`` while the alert is open.
        peak_score: highest anomaly score inside the span.
        threshold: the threshold in force when it was raised.
        model_version: the model version that raised it.
        fault_match: the confirmed fault the alert's windows look like most (the highest
            similarity over its anomalous windows), or ``None``: "looks like the outer-race
            fault confirmed on 11-03".
    """

    id: str
    site: str
    machine: str
    sensor: str
    state: Literal["raised", "cleared"]
    start_ns: int
    end_ns: int | None
    peak_score: float
    threshold: float
    model_version: str
    fault_match: FaultMatch | None = None


@dataclasses.dataclass(frozen=True)
class Label:
    """A technician's judgement of a time span on a machine.

    Attributes:
        id: stable identifier; the same label submitted twice has the same id.
        site, machine: the machine.
        sensor: optionally restricts the label to one sensor (``None`` = all sensors).
        alert_id: optionally the alert the label answers.
        start_ns, end_ns: the labelled span (ns, UTC), ``start_ns < end_ns``.
        kind: ``"normal"`` (a false alarm), ``"fault"`` (a confirmed fault) or ``"ignore"``
            (maintenance or otherwise not representative).
        fault_type: one of :data:`FAULT_TYPES`, only with ``kind == "fault"``.
        author: who gave the label.
        note: free text.
        created_ns: when the label was given (ns, UTC).

    Raises:
        ValueError: for an empty span, an unknown kind, or a fault type that is not in the
            vocabulary or is given on a non-fault label.
    """

    id: str
    site: str
    machine: str
    start_ns: int
    end_ns: int
    kind: LabelKind
    author: str
    created_ns: int
    sensor: str | None = None
    alert_id: str | None = None
    fault_type: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.end_ns <= self.start_ns:
            raise ValueError(f"label span is empty: start_ns={self.start_ns} end_ns={self.end_ns}")
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"label kind must be one of {LABEL_KINDS}, got {self.kind!r}")
        if self.fault_type is not None:
            if self.kind != "fault":
                raise ValueError("fault_type is only allowed on labels of kind 'fault'")
            if self.fault_type not in FAULT_TYPES:
                raise ValueError(f"fault_type must be one of {FAULT_TYPES}, got {self.fault_type!r}")


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One trained adapter of one machine, as kept by the registry.

    Attributes:
        id: version id (unique on the appliance).
        site, machine: the machine it was trained for.
        parent: id of the version it was trained from, or ``None`` for a first calibration.
        trigger: why it was trained (``"initial_calibration"``, ``"labels"``, ``"manual"``).
        created_ns: creation time (ns, UTC).
        encoder_sha256: sha256 of the frozen encoder weights it was trained on.
        sha256: sha256 of the version's files (adapter + config + standardisation + threshold).
        size_bytes: total size of those files.
        status: ``"candidate"``, ``"active"``, ``"rejected"`` or ``"retired"``.
        metrics: metrics on the gate set (e.g. ``{"false_alarm_rate_per_h": 0.1}``).
        training_summary: what it was trained on (windows, labels, span).
        reason: why it was rejected or retired, ``None`` otherwise.
    """

    id: str
    site: str
    machine: str
    parent: str | None
    trigger: str
    created_ns: int
    encoder_sha256: str
    sha256: str
    size_bytes: int
    status: ModelStatus
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    training_summary: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.status not in MODEL_STATUSES:
            raise ValueError(f"status must be one of {MODEL_STATUSES}, got {self.status!r}")
        object.__setattr__(self, "metrics", _frozen_mapping(self.metrics))
        object.__setattr__(self, "training_summary", _frozen_mapping(self.training_summary))
