"""Loaders for every recording format pdm-edge replays or evaluates on, with one return type.

Every loader returns a :class:`Recording`: a name, a sample rate in Hz, a physical unit
(``"g"``, ``"m/s2"``, ``"Pa"`` or ``"FS"``, as in :mod:`pdm_edge.types`), a sensor kind
(``"vibration"`` or ``"acoustic"``), one or more :class:`Segment` s of ``float32`` samples with
their start time in ns since the Unix epoch (UTC), and a read-only metadata mapping.
A continuous file gives one segment; a snapshot dataset (FEMTO PRONOSTIA: 0.1 s every 10 s)
gives one segment per snapshot, so consumers see the gaps instead of a silently spliced signal.

Formats (see ``sample_data/README.md`` and each dataset folder's README for provenance):

============================  =====================  ===========  ===========================
loader                        format                 unit, kind   start_ns
============================  =====================  ===========  ===========================
:func:`load_cwru`             CWRU Bearing Data       g,           0 (no wall clock in files)
                              Center ``.mat``         vibration
:func:`load_femto`            FEMTO PRONOSTIA folder  g,           time of day of each
                              of ``acc_*.csv``        vibration    snapshot on ``date``
:func:`load_femto_compact`    FEMTO compact ``.npz``  g,           elapsed time of each
                              (int32 milli-g)         vibration    snapshot
:func:`load_wav`              ``.wav`` (PCM / float,  FS,          0
                              incl. WAVE_FORMAT_      acoustic
                              EXTENSIBLE 8-channel)
:func:`load_array`            ``.csv`` / ``.npy``     given        0
:func:`load_sample`           project ``.npz``        from file    0
============================  =====================  ===========  ===========================

:func:`load_recording` dispatches on the path (a folder holding ``acc_*.csv`` -> FEMTO,
``.mat`` -> CWRU, ``.wav`` -> WAV, ``.csv`` / ``.npy`` / ``.txt`` -> array, ``.npz`` -> sample).

Decisions written down here:

- Every failure to read a recording (missing path, unknown format, unreadable or malformed
  file, missing channel, missing sample rate, non-finite samples) raises
  :class:`pdm_edge.errors.RecordingError` with the path and the reason.
- Samples are converted to ``float32`` (the dtype of :class:`pdm_edge.types.Window`);
  integer PCM is scaled to digital full scale (``int16 / 32768``, ``int32 / 2**31``,
  ``(uint8 - 128) / 128``), so +-1.0 = full scale.
- CWRU's unit is not stated by CWRU; the literature treats the values as g, and so do we.
- Metadata always has ``"format"``, ``"source_path"``, ``"channel"`` and ``"label"``
  (``"normal"``, ``"anomaly"`` or ``None`` where the file carries no such label); the other
  keys depend on the format and are listed in each loader's docstring.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import inspect
import json
import os
import re
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from pdm_edge.bearing import FEMTO_PRONOSTIA, SKF_6205
from pdm_edge.errors import RecordingError
from pdm_edge.types import SENSOR_KINDS, UNITS

__all__ = [
    "DEFAULT_DATASETS_DIR",
    "DEFAULT_SAMPLE_PATH",
    "SAMPLE_FORMAT_VERSION",
    "Recording",
    "DcaseClip",
    "Segment",
    "dcase_clips",
    "default_datasets_dir",
    "load_array",
    "load_cwru",
    "load_femto",
    "load_recording",
    "load_sample",
    "load_wav",
]

PathLike = str | os.PathLike[str]


def default_datasets_dir() -> Path:
    """The real-dataset folder: ``$PDM_EDGE_DATASETS`` if set, else ``<repo>/../shared/datasets``.

    ``<repo>`` is the checkout holding this file (``sample_data/..``); the environment
    variable is read at each call (:data:`DEFAULT_DATASETS_DIR` is its value at import time).
    The folder may not exist (the datasets are not shipped with the project).
    """
    env = os.environ.get("PDM_EDGE_DATASETS")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


DEFAULT_DATASETS_DIR: Path = default_datasets_dir()
"""Where the real datasets live (see :func:`default_datasets_dir`), resolved at import."""

DEFAULT_SAMPLE_PATH: Path = Path(__file__).resolve().with_name("sim_outer_race.npz")
"""The project's committed sample recording (made by :mod:`sample_data.make_sample`)."""

SAMPLE_FORMAT_VERSION = 1
"""Version of the sample ``.npz`` layout that :func:`load_sample` reads."""


# --------------------------------------------------------------------------------------------
# Return types


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """A run of contiguous samples.

    Attributes:
        start_ns: time of the first sample, ns since the Unix epoch (UTC); 0 for files
            without a wall clock.
        samples: shape ``(n,)``, ``float32``, read-only, ``n >= 1``, in the recording's unit.

    Raises:
        ValueError: if ``samples`` is not a non-empty 1-D array.
    """

    start_ns: int
    samples: np.ndarray

    def __post_init__(self) -> None:
        arr = np.asarray(self.samples, dtype=np.float32)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"Segment.samples must be a non-empty 1-D array, got shape {arr.shape}")
        if arr.flags.writeable or not arr.flags.owndata:
            arr = arr.copy()
            arr.flags.writeable = False
        object.__setattr__(self, "samples", arr)
        object.__setattr__(self, "start_ns", int(self.start_ns))

    @property
    def n_samples(self) -> int:
        """Number of samples in the segment."""
        return int(self.samples.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Recording:
    """A recording from one sensor channel, as one or more timed segments.

    Attributes:
        name: short name (file stem, or folder name for FEMTO).
        sample_rate_hz: sample rate in Hz, ``> 0``.
        unit: ``"g"``, ``"m/s2"``, ``"Pa"`` or ``"FS"`` (see :mod:`pdm_edge.types`).
        kind: ``"vibration"`` or ``"acoustic"``.
        segments: one or more :class:`Segment`, in time order.
        metadata: read-only mapping (see the loader that made it for the keys).

    Raises:
        ValueError: for a non-positive sample rate, an unknown unit or kind, or no segments.
    """

    name: str
    sample_rate_hz: float
    unit: Literal["g", "m/s2", "Pa", "FS"]
    kind: Literal["vibration", "acoustic"]
    segments: tuple[Segment, ...]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        fs = float(self.sample_rate_hz)
        if not np.isfinite(fs) or fs <= 0.0:
            raise ValueError(f"sample_rate_hz must be a positive finite number, got {self.sample_rate_hz}")
        object.__setattr__(self, "sample_rate_hz", fs)
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.kind not in SENSOR_KINDS:
            raise ValueError(f"kind must be one of {SENSOR_KINDS}, got {self.kind!r}")
        segments = tuple(self.segments)
        if not segments or not all(isinstance(s, Segment) for s in segments):
            raise ValueError("a Recording needs at least one Segment")
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "metadata", types.MappingProxyType(dict(self.metadata)))

    @property
    def n_samples(self) -> int:
        """Total number of samples over all segments."""
        return sum(s.n_samples for s in self.segments)

    @property
    def duration_s(self) -> float:
        """Total duration of the samples in seconds (``n_samples / sample_rate_hz``; gaps between
        segments are not counted)."""
        return self.n_samples / self.sample_rate_hz

    @property
    def is_continuous(self) -> bool:
        """True for a recording of a single segment."""
        return len(self.segments) == 1

    def concatenated(self) -> np.ndarray:
        """All samples, segment after segment, shape ``(n_samples,)``, ``float32``, read-only.

        Gaps between segments are *not* represented: for snapshot data the result splices
        snapshots end to end, which is only right for features computed within a snapshot.
        """
        if len(self.segments) == 1:
            return self.segments[0].samples
        out = np.concatenate([s.samples for s in self.segments])
        out.flags.writeable = False
        return out


# --------------------------------------------------------------------------------------------
# Helpers


def _existing(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise RecordingError(f"{what} not found: {p}")
    return p


def _segment(samples: np.ndarray, start_ns: int, where: Path) -> Segment:
    arr = np.asarray(samples, dtype=np.float32).reshape(-1)
    if arr.size == 0:
        raise RecordingError(f"{where}: no samples")
    if not np.all(np.isfinite(arr)):
        raise RecordingError(f"{where}: {int(np.sum(~np.isfinite(arr)))} samples are NaN or infinite")
    return Segment(start_ns=start_ns, samples=arr)


def _positive_rate(value: Any, where: Path) -> float:
    try:
        fs = float(value)
    except (TypeError, ValueError):
        raise RecordingError(f"{where}: sample_rate_hz must be a number, got {value!r}") from None
    if not np.isfinite(fs) or fs <= 0.0:
        raise RecordingError(f"{where}: sample_rate_hz must be > 0, got {value!r}")
    return fs


# --------------------------------------------------------------------------------------------
# CWRU


_CWRU_FAULT_RE = re.compile(
    r"^(?:(?P<rate>12|48)k_)?(?P<end>Drive|Fan)_End_(?P<fault>IR|OR|B)(?P<size>\d{3})"
    r"(?:@(?P<pos>\d+))?_(?P<load>\d)_(?P<no>\d+)$",
    re.IGNORECASE,
)
_CWRU_NORMAL_RE = re.compile(r"^normal_(?P<load>\d)_(?P<no>\d+)$", re.IGNORECASE)
_CWRU_FOLDER_RATE_RE = re.compile(r"(?<![0-9])(12|48)k(?![a-z0-9])", re.IGNORECASE)
_CWRU_CONDITIONS = {"IR": "inner_race", "OR": "outer_race", "B": "ball"}
_CWRU_FAULT_TYPES = {
    "inner_race": "bearing_inner_race",
    "outer_race": "bearing_outer_race",
    "ball": "bearing_ball",
}
_CWRU_CHANNELS = {"DE": "drive_end", "FE": "fan_end", "BA": "base"}


def load_cwru(
    path: PathLike,
    channel: Literal["DE", "FE", "BA"] = "DE",
    sample_rate_hz: float | None = None,
    variable: str | None = None,
) -> Recording:
    """Load one accelerometer channel of a CWRU Bearing Data Center ``.mat`` file.

    The channel is the variable whose name ends in ``_{channel}_time`` (``X105_DE_time``):
    matching by suffix copes with CWRU's numbering quirks (``48k_Drive_End_IR014_0_174.mat``
    holds ``X173_*``; the 0.028 in files hold ``X0NN_*`` numbers unrelated to the file number).
    If several variables match, the one whose number equals the file number in the name wins;
    otherwise pass ``variable=`` explicitly.

    The sample rate comes from, in order: the ``sample_rate_hz`` argument; the file-name
    prefix ``12k_`` / ``48k_``; 48 kHz for ``normal_*`` baseline files (CWRU recorded the
    normal baseline at 48 kHz); a ``12k`` / ``48k`` token in the parent folder's name
    (``de_12k``, ``12k_DE``). CWRU files carry no wall clock, so ``start_ns = 0``.

    Args:
        path: the ``.mat`` file (MATLAB 5 format, read with ``scipy.io.loadmat``).
        channel: ``"DE"`` (drive-end accelerometer, the one to score), ``"FE"`` (fan end) or
            ``"BA"`` (base; 12 kHz drive-end fault files only).
        sample_rate_hz: overrides the sample rate inferred from the names, Hz.
        variable: exact variable name to read, bypassing the suffix match.

    Returns:
        A one-segment :class:`Recording`, unit ``"g"``, kind ``"vibration"``, samples
        ``float32`` of shape ``(n,)``. Metadata: ``format="cwru"``, ``source_path``,
        ``channel``, ``variable``, ``sensor_location`` (``drive_end`` / ``fan_end`` /
        ``base``), ``sample_rate_source`` (``argument`` / ``file name`` / ``normal baseline``
        / ``folder name``), ``rpm`` (from ``X...RPM``, or ``None``), ``shaft_hz``
        (``rpm / 60`` or ``None``), and, when the name follows CWRU's convention,
        ``condition`` (``normal`` / ``inner_race`` / ``outer_race`` / ``ball``),
        ``label`` (``normal`` / ``anomaly``), ``fault_type`` (a :data:`pdm_edge.types.FAULT_TYPES`
        value or ``None``), ``fault_size_in`` (0.007 ... 0.028; 0.0 for normal),
        ``or_position`` (``"6:00"``, ``"3:00"``, ``"12:00"`` or ``None``), ``load_hp``,
        ``cwru_file_no``, ``fault_end`` (``drive_end`` / ``fan_end``: which bearing is seeded),
        and for the drive-end SKF 6205 (fault sizes below 0.028 in) ``bearing`` (geometry dict)
        and ``defect_frequencies_hz`` at the recorded speed.

    Raises:
        RecordingError: if the file is missing or not a readable MAT-file, no variable (or
            more than one, unresolved) ends in ``_{channel}_time``, or the sample rate
            cannot be determined.
    """
    p = _existing(path, "CWRU file")
    ch = str(channel).upper()
    if ch not in _CWRU_CHANNELS:
        raise RecordingError(f"{p}: channel must be one of {tuple(_CWRU_CHANNELS)}, got {channel!r}")
    try:
        from scipy.io import loadmat

        mat = loadmat(str(p))
    except Exception as exc:  # scipy raises many types on malformed input (IndexError, MatReadError, ...)
        raise RecordingError(f"{p}: not a readable MATLAB 5 .mat file ({exc})") from exc
    names = sorted(k for k in mat if not k.startswith("__"))

    stem = p.stem
    m_fault = _CWRU_FAULT_RE.match(stem)
    m_normal = _CWRU_NORMAL_RE.match(stem)
    m_name = m_fault or m_normal
    file_no = int(m_name.group("no")) if m_name else None

    if variable is not None:
        if variable not in mat:
            raise RecordingError(f"{p}: no variable {variable!r}; variables: {names}")
        var = variable
    else:
        suffix = f"_{ch}_time"
        matches = [k for k in names if k.endswith(suffix)]
        if len(matches) > 1 and file_no is not None:
            same_no = [k for k in matches if re.match(rf"^X0*{file_no}_", k)]
            if len(same_no) == 1:
                matches = same_no
        if not matches:
            raise RecordingError(f"{p}: no variable ending in {suffix!r} (channel {ch}); variables: {names}")
        if len(matches) > 1:
            raise RecordingError(
                f"{p}: {len(matches)} variables end in {suffix!r} ({matches}); pass variable= to choose"
            )
        var = matches[0]

    data = np.asarray(mat[var])
    if data.dtype.kind not in "fiu" or data.size == 0 or (data.ndim == 2 and min(data.shape) != 1) or data.ndim > 2:
        raise RecordingError(f"{p}: variable {var!r} is not a numeric vector (shape {data.shape})")

    if sample_rate_hz is not None:
        fs, fs_source = _positive_rate(sample_rate_hz, p), "argument"
    elif m_fault and m_fault.group("rate"):
        fs, fs_source = float(m_fault.group("rate")) * 1000.0, "file name"
    elif m_normal:
        fs, fs_source = 48000.0, "normal baseline"
    elif (m_folder := _CWRU_FOLDER_RATE_RE.search(p.parent.name)) is not None:
        fs, fs_source = float(m_folder.group(1)) * 1000.0, "folder name"
    else:
        raise RecordingError(
            f"{p}: cannot tell the sample rate (no 12k_/48k_ prefix, not a normal_* file, no "
            "12k/48k in the folder name); pass sample_rate_hz="
        )

    var_no = re.match(r"^X(\d+)_", var)
    rpm_key = f"X{var_no.group(1)}RPM" if var_no else None
    rpm: float | None = None
    if rpm_key and rpm_key in mat:
        rpm = float(np.asarray(mat[rpm_key]).reshape(-1)[0])
    else:
        rpm_keys = [k for k in names if re.match(r"^X\d+RPM$", k)]
        if len(rpm_keys) == 1:
            rpm = float(np.asarray(mat[rpm_keys[0]]).reshape(-1)[0])
    shaft_hz = rpm / 60.0 if rpm else None

    meta: dict[str, Any] = {
        "format": "cwru",
        "source_path": str(p),
        "channel": ch,
        "variable": var,
        "sensor_location": _CWRU_CHANNELS[ch],
        "sample_rate_source": fs_source,
        "rpm": rpm,
        "shaft_hz": shaft_hz,
        "label": None,
    }
    if m_fault:
        condition = _CWRU_CONDITIONS[m_fault.group("fault").upper()]
        size_in = int(m_fault.group("size")) / 1000.0
        pos = m_fault.group("pos")
        fault_end = "drive_end" if m_fault.group("end").lower() == "drive" else "fan_end"
        meta.update(
            condition=condition,
            label="anomaly",
            fault_type=_CWRU_FAULT_TYPES[condition],
            fault_size_in=size_in,
            or_position=f"{int(pos)}:00" if pos else None,
            load_hp=int(m_fault.group("load")),
            cwru_file_no=int(m_fault.group("no")),
            fault_end=fault_end,
        )
        skf = fault_end == "drive_end" and size_in < 0.028
    elif m_normal:
        meta.update(
            condition="normal",
            label="normal",
            fault_type=None,
            fault_size_in=0.0,
            or_position=None,
            load_hp=int(m_normal.group("load")),
            cwru_file_no=int(m_normal.group("no")),
            fault_end=None,
        )
        skf = True
    else:
        skf = False
    if skf and ch == "DE":
        meta["bearing"] = SKF_6205.as_dict()
        if shaft_hz:
            meta["defect_frequencies_hz"] = SKF_6205.defect_frequencies(shaft_hz).as_dict()

    return Recording(
        name=stem,
        sample_rate_hz=fs,
        unit="g",
        kind="vibration",
        segments=(_segment(data.astype(np.float64).reshape(-1), 0, p),),
        metadata=meta,
    )


# --------------------------------------------------------------------------------------------
# FEMTO PRONOSTIA


_FEMTO_ACC_RE = re.compile(r"^acc_(\d+)\.csv$")
_FEMTO_SAMPLE_RATE_HZ = 25600.0
_FEMTO_CHANNELS = {"horizontal": 4, "vertical": 5}
_FEMTO_CONDITIONS = {1: (1800.0, 4000.0), 2: (1650.0, 4200.0), 3: (1500.0, 5000.0)}
_NS_PER_DAY = 86_400 * 10**9


def _femto_files(folder: Path) -> list[Path]:
    found = []
    for child in folder.iterdir():
        m = _FEMTO_ACC_RE.match(child.name)
        if m and child.is_file():
            found.append((int(m.group(1)), child))
    return [c for _, c in sorted(found)]


def _read_femto_csv(path: Path) -> np.ndarray:
    try:
        text = path.read_text(encoding="ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordingError(f"{path}: cannot read ({exc})") from exc
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if ";" in first:
        delimiter = ";"
        if "," in first:  # decimal comma (seen in some PRONOSTIA exports)
            lines = [ln.replace(",", ".") for ln in lines]
    else:
        delimiter = ","
    try:
        table = np.loadtxt(lines, delimiter=delimiter, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise RecordingError(f"{path}: not a FEMTO acc_ CSV ({exc})") from exc
    if table.shape[0] == 0 or table.shape[1] < 6:
        raise RecordingError(
            f"{path}: expected 6 columns (hour, minute, second, microsecond, horizontal g, "
            f"vertical g), got shape {table.shape}"
        )
    return table


def load_femto(
    folder: PathLike,
    channel: Literal["horizontal", "vertical"] = "horizontal",
    date: str | _dt.date = "1970-01-01",
) -> Recording:
    """Load a FEMTO-ST PRONOSTIA (IEEE PHM 2012) bearing folder: one segment per ``acc_*.csv``.

    Each ``acc_NNNNN.csv`` is a 0.1 s snapshot (2560 samples at 25.6 kHz) taken every 10 s;
    its columns are hour, minute, second, microsecond, horizontal acceleration (g), vertical
    acceleration (g), comma separated without header (semicolon-separated files, with or
    without decimal commas, are also read). Files are taken in numeric order of ``NNNNN``;
    ``temp_*.csv`` (temperature) files are ignored.

    A snapshot's ``start_ns`` is the time of day of its first row on ``date`` (UTC), rolling
    over to the next day whenever the time of day decreases. The files hold no date; the
    challenge documentation gives the experiment dates (Bearing3_1: 2011-04-07).

    Args:
        folder: the bearing's folder (e.g. ``.../Learning_set/Bearing3_1``).
        channel: ``"horizontal"`` (column 5) or ``"vertical"`` (column 6).
        date: calendar date of the first snapshot, ``"YYYY-MM-DD"`` or a ``datetime.date``.

    Returns:
        A :class:`Recording` at 25 600 Hz, unit ``"g"``, kind ``"vibration"``, one
        :class:`Segment` per snapshot in file order (``float32``, shape ``(2560,)`` each).
        Metadata: ``format="femto"``, ``source_path``, ``channel``, ``label=None`` (run to
        failure; the last snapshot is the failure), ``test_name`` (folder name),
        ``snapshot_count``, ``samples_per_snapshot`` (tuple, one per snapshot),
        ``snapshot_period_s`` (median spacing of the snapshots), ``files`` (tuple of file
        names), ``date``, ``bearing`` (geometry dict of :data:`pdm_edge.bearing.FEMTO_PRONOSTIA`),
        and, for folders named ``BearingC_N``, ``operating_condition`` (C), ``rpm``,
        ``shaft_hz``, ``radial_load_n`` and ``defect_frequencies_hz``.

    Raises:
        RecordingError: if the folder is missing, holds no ``acc_*.csv``, a file is malformed,
            or ``channel`` / ``date`` is invalid.
    """
    root = _existing(folder, "FEMTO folder")
    if not root.is_dir():
        raise RecordingError(f"{root}: a FEMTO recording is a folder of acc_*.csv files")
    if channel not in _FEMTO_CHANNELS:
        raise RecordingError(f"{root}: channel must be one of {tuple(_FEMTO_CHANNELS)}, got {channel!r}")
    col = _FEMTO_CHANNELS[channel]
    try:
        day0 = date if isinstance(date, _dt.date) else _dt.date.fromisoformat(str(date))
    except ValueError as exc:
        raise RecordingError(f"date must be 'YYYY-MM-DD', got {date!r}") from exc
    if isinstance(day0, _dt.datetime):
        day0 = day0.date()
    epoch_day0_ns = (day0 - _dt.date(1970, 1, 1)).days * _NS_PER_DAY

    files = _femto_files(root)
    if not files:
        raise RecordingError(f"{root}: no acc_*.csv files (FEMTO PRONOSTIA layout)")

    segments: list[Segment] = []
    day = 0
    prev_tod: int | None = None
    for f in files:
        table = _read_femto_csv(f)
        h, mi, s, us = table[0, :4]
        tod_ns = int(round(((h * 60.0 + mi) * 60.0 + s) * 1e9 + us * 1e3))
        if prev_tod is not None and tod_ns < prev_tod:
            day += 1
        prev_tod = tod_ns
        segments.append(_segment(table[:, col], epoch_day0_ns + day * _NS_PER_DAY + tod_ns, f))

    starts = np.array([s.start_ns for s in segments], dtype=np.int64)
    period = float(np.median(np.diff(starts))) / 1e9 if len(starts) > 1 else None
    meta: dict[str, Any] = {
        "format": "femto",
        "source_path": str(root),
        "channel": channel,
        "label": None,
        "test_name": root.name,
        "snapshot_count": len(segments),
        "samples_per_snapshot": tuple(s.n_samples for s in segments),
        "snapshot_period_s": period,
        "files": tuple(f.name for f in files),
        "date": day0.isoformat(),
        "bearing": FEMTO_PRONOSTIA.as_dict(),
    }
    meta.update(_femto_condition(root.name))
    return Recording(
        name=root.name,
        sample_rate_hz=_FEMTO_SAMPLE_RATE_HZ,
        unit="g",
        kind="vibration",
        segments=tuple(segments),
        metadata=meta,
    )


def _femto_condition(test_name: str) -> dict[str, Any]:
    """Operating condition, speed, load and defect frequencies of a ``BearingC_N`` test."""
    m = re.match(r"^Bearing(\d)_(\d+)$", test_name)
    if not (m and int(m.group(1)) in _FEMTO_CONDITIONS):
        return {}
    rpm, load_n = _FEMTO_CONDITIONS[int(m.group(1))]
    return {"operating_condition": int(m.group(1)), "rpm": rpm, "shaft_hz": rpm / 60.0, "radial_load_n": load_n,
            "defect_frequencies_hz": FEMTO_PRONOSTIA.defect_frequencies(rpm / 60.0).as_dict()}


_FEMTO_COMPACT_KEYS = ("acc_mg", "elapsed_s", "fs_hz")


def load_femto_compact(
    path: PathLike,
    channel: Literal["horizontal", "vertical"] = "horizontal",
) -> Recording:
    """Load a compact FEMTO-ST PRONOSTIA run-to-failure file (``femto_pronostia/compact/*.npz``).

    The archive (see that folder's README) holds ``acc_mg`` (int32, ``(N, 2560, 2)``, milli-g;
    ``[..., 0]`` horizontal, ``[..., 1]`` vertical), ``elapsed_s`` (float64 ``(N,)``, s since
    the first snapshot, 10 s spacing, bad clock values already interpolated) and ``fs_hz``
    (25 600). The values are the exact CSV values, so a compact file and its CSV folder load to
    the same samples.

    Args:
        path: the ``BearingC_N.npz`` file.
        channel: ``"horizontal"`` or ``"vertical"``.

    Returns:
        A :class:`Recording` at 25 600 Hz, unit ``"g"``, kind ``"vibration"``, one
        :class:`Segment` per snapshot (``float32``, ``(2560,)``), ``start_ns`` = elapsed time
        (the files carry no date). Metadata as :func:`load_femto` (``format="femto_compact"``;
        ``files`` is omitted) plus ``source_folder``.

    Raises:
        RecordingError: the file is missing, not an ``.npz`` archive, lacks a key, has a wrong
            shape, or ``channel`` is invalid.
    """
    p = _existing(path, "FEMTO compact file")
    if channel not in _FEMTO_CHANNELS:
        raise RecordingError(f"{p}: channel must be one of {tuple(_FEMTO_CHANNELS)}, got {channel!r}")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in _FEMTO_COMPACT_KEYS if k not in z.files]
            if missing:
                raise RecordingError(f"{p}: not a compact FEMTO file (missing {missing})")
            acc = z["acc_mg"][..., 0 if channel == "horizontal" else 1]
            elapsed = np.asarray(z["elapsed_s"], dtype=np.float64)
            fs = float(z["fs_hz"])
            folder = str(z["source_folder"]) if "source_folder" in z.files else p.stem
    except RecordingError:
        raise
    except Exception as exc:  # BadZipFile, ValueError, IndexError (wrong shape), ...
        raise RecordingError(f"{p}: not a readable compact FEMTO file ({exc})") from exc
    if acc.ndim != 2 or len(acc) != len(elapsed) or len(acc) == 0:
        raise RecordingError(f"{p}: acc_mg {acc.shape} does not match elapsed_s {elapsed.shape}")
    x = acc.astype(np.float32) / np.float32(1000.0)
    segments = tuple(_segment(x[i], int(round(elapsed[i] * 1e9)), p) for i in range(len(x)))
    meta: dict[str, Any] = {
        "format": "femto_compact", "source_path": str(p), "source_folder": folder, "channel": channel, "label": None,
        "test_name": p.stem, "snapshot_count": len(segments), "samples_per_snapshot": tuple(s.n_samples for s in segments),
        "snapshot_period_s": float(np.median(np.diff(elapsed))) if len(elapsed) > 1 else None,
        "bearing": FEMTO_PRONOSTIA.as_dict(), **_femto_condition(p.stem),
    }
    return Recording(name=p.stem, sample_rate_hz=_positive_rate(fs, p), unit="g", kind="vibration", segments=segments, metadata=meta)


# --------------------------------------------------------------------------------------------
# WAV


_DCASE_RE = re.compile(
    r"^section_(?P<section>\d+)_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_(?P<clip>\d+)(?:_(?P<attributes>.*))?$"
)


def _wav_labels(p: Path) -> dict[str, Any]:
    m = _DCASE_RE.match(p.stem)
    if m:
        machine = p.parent.parent.name if p.parent.name in ("train", "test") else None
        return {
            "dataset": "dcase2023_task2",
            "machine_type": machine,
            "section": m.group("section"),
            "domain": m.group("domain"),
            "split": m.group("split"),
            "label": m.group("label"),
            "clip_index": int(m.group("clip")),
            "attributes": m.group("attributes"),
        }
    parts = {p.parent.name.lower(), *re.split(r"[_\-.]", p.stem.lower())}
    label = "anomaly" if {"abnormal", "anomaly"} & parts else "normal" if "normal" in parts else None
    out: dict[str, Any] = {"label": label}
    if p.parent.name.lower() in ("normal", "abnormal"):
        out["machine_type"] = p.parent.parent.name
    return out


class DcaseClip(NamedTuple):
    """One DCASE 2023 Task 2 clip: its file, ``split`` (``train``/``test``), ``label``
    (``normal``/``anomaly``) and clip ``index`` (the number in its file name)."""

    path: Path
    split: str
    label: str
    index: int


def dcase_clips(folder: PathLike, domain: str = "source") -> list[DcaseClip]:
    """The clips of one DCASE 2023 Task 2 machine folder (``.../valve``, holding ``train/`` and
    ``test/``) of one domain, sorted by file path.

    Raises:
        FileNotFoundError: the folder holds no clip of that domain.
    """
    root = Path(folder)
    clips = []
    for p in sorted(root.glob("*/*.wav")):
        m = _DCASE_RE.match(p.stem)
        if m and m.group("domain") == domain:
            clips.append(DcaseClip(p, m.group("split"), m.group("label"), int(m.group("clip"))))
    if not clips:
        raise FileNotFoundError(f"no DCASE {domain}-domain clips under {root}")
    return clips


def load_wav(
    path: PathLike,
    channel: int = 0,
    kind: Literal["vibration", "acoustic"] = "acoustic",
) -> Recording:
    """Load one channel of a ``.wav`` file (``scipy.io.wavfile``, incl. WAVE_FORMAT_EXTENSIBLE).

    Integer PCM is scaled to digital full scale (``int16 / 32768``, ``int32 / 2**31`` — scipy
    returns 24-bit PCM left-justified in ``int32`` — and ``(uint8 - 128) / 128``); float WAV
    data are taken as they are. The unit is ``"FS"``: microphones in these datasets are not
    calibrated, so there is no conversion to Pa.

    Args:
        path: the ``.wav`` file (mono, or multichannel such as the 8-channel MIMII clips).
        channel: 0-based channel index for multichannel files (must be 0 for mono files).
        kind: sensor kind recorded in the :class:`Recording` (``"acoustic"`` by default).

    Returns:
        A one-segment :class:`Recording`, unit ``"FS"``, samples ``float32`` in [-1, 1),
        ``start_ns = 0``. Metadata: ``format="wav"``, ``source_path``, ``channel``,
        ``channels`` (count in the file), ``source_dtype`` (e.g. ``"int16"``), ``label``
        (``normal`` / ``anomaly`` from a DCASE file name or a MIMII ``normal`` / ``abnormal``
        folder, else ``None``), ``machine_type`` where the folder layout tells it, and for
        DCASE 2023 file names ``section_SS_<domain>_<split>_<label>_NNNN_<attributes>``:
        ``dataset``, ``section``, ``domain``, ``split``, ``clip_index`` (int), ``attributes``.

    Raises:
        RecordingError: if the file is missing or not a readable WAV file, the channel does
            not exist, or the sample format is unsupported.
    """
    p = _existing(path, "WAV file")
    if kind not in SENSOR_KINDS:
        raise RecordingError(f"{p}: kind must be one of {SENSOR_KINDS}, got {kind!r}")
    try:
        from scipy.io import wavfile

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown chunks (LIST, ...) are skipped with a warning
            rate, data = wavfile.read(str(p), mmap=False)
    except Exception as exc:  # malformed input raises ValueError, struct.error, IndexError, ...
        raise RecordingError(f"{p}: not a readable WAV file ({exc})") from exc
    n_channels = 1 if data.ndim == 1 else int(data.shape[1])
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= channel < n_channels:
        raise RecordingError(f"{p}: channel must be an integer in [0, {n_channels - 1}], got {channel!r}")
    x = data if data.ndim == 1 else data[:, int(channel)]
    if x.dtype == np.int16:
        y = x.astype(np.float32) / np.float32(32768.0)
    elif x.dtype == np.int32:
        y = (x.astype(np.float64) / 2.0**31).astype(np.float32)
    elif x.dtype == np.uint8:
        y = (x.astype(np.float32) - np.float32(128.0)) / np.float32(128.0)
    elif x.dtype.kind == "f":
        y = x.astype(np.float32)
    else:
        raise RecordingError(f"{p}: unsupported WAV sample format {x.dtype}")
    meta: dict[str, Any] = {
        "format": "wav",
        "source_path": str(p),
        "channel": int(channel),
        "channels": n_channels,
        "source_dtype": str(x.dtype),
    }
    meta.update(_wav_labels(p))
    return Recording(
        name=p.stem,
        sample_rate_hz=_positive_rate(rate, p),
        unit="FS",
        kind=kind,
        segments=(_segment(y, 0, p),),
        metadata=meta,
    )


# --------------------------------------------------------------------------------------------
# Plain arrays


def _sniff_csv(p: Path) -> tuple[str | None, int]:
    """(delimiter, rows to skip) of a numeric text file with an optional header row."""
    try:
        with p.open("r", encoding="utf-8", errors="replace") as fh:
            first = ""
            for line in fh:
                if line.strip() and not line.lstrip().startswith("#"):
                    first = line.strip()
                    break
    except OSError as exc:
        raise RecordingError(f"{p}: cannot read ({exc})") from exc
    if not first:
        raise RecordingError(f"{p}: no data rows")
    delimiter = next((d for d in (",", ";", "\t") if d in first), None)
    fields = first.split(delimiter) if delimiter else first.split()
    try:
        [float(f) for f in fields]
        header = 0
    except ValueError:
        header = 1
    return delimiter, header


def load_array(
    path: PathLike,
    sample_rate_hz: float | None = None,
    unit: Literal["g", "m/s2", "Pa", "FS"] = "g",
    kind: Literal["vibration", "acoustic"] = "vibration",
    column: int = 0,
) -> Recording:
    """Load a plain array of samples: ``.csv`` / ``.txt`` text or ``.npy`` (NumPy).

    Text files hold one value per row, or several delimited columns (``,``, ``;``, tab or
    whitespace) of which ``column`` is taken; a non-numeric first row is a header and is
    skipped, and ``#`` starts a comment. ``.npy`` files hold a 1-D array, or a 2-D array of
    shape ``(n, channels)`` of which column ``column`` is taken (no pickles are loaded).
    Neither format stores the sample rate, so it must be given.

    Args:
        path: the file.
        sample_rate_hz: sample rate in Hz (required).
        unit: physical unit of the values: ``"g"``, ``"m/s2"``, ``"Pa"`` or ``"FS"``.
        kind: ``"vibration"`` or ``"acoustic"``.
        column: 0-based column to read.

    Returns:
        A one-segment :class:`Recording` (``float32`` samples, ``start_ns = 0``). Metadata:
        ``format="array"``, ``source_path``, ``channel`` (= ``column``), ``label=None``.

    Raises:
        RecordingError: if the file is missing or unreadable, ``sample_rate_hz`` is missing
            or not positive, ``unit`` / ``kind`` is unknown, the column does not exist, the
            array is empty or holds NaN / infinite values, or the suffix is not
            ``.csv`` / ``.txt`` / ``.npy``.
    """
    p = _existing(path, "array file")
    if sample_rate_hz is None:
        raise RecordingError(f"{p}: sample_rate_hz is required for .csv/.npy arrays (they do not store it)")
    fs = _positive_rate(sample_rate_hz, p)
    if unit not in UNITS:
        raise RecordingError(f"{p}: unit must be one of {UNITS}, got {unit!r}")
    if kind not in SENSOR_KINDS:
        raise RecordingError(f"{p}: kind must be one of {SENSOR_KINDS}, got {kind!r}")
    if isinstance(column, bool) or not isinstance(column, (int, np.integer)) or column < 0:
        raise RecordingError(f"{p}: column must be a non-negative integer, got {column!r}")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:  # malformed .npy: ValueError, EOFError, OSError, ...
            raise RecordingError(f"{p}: not a readable .npy array ({exc})") from exc
        if arr.dtype.kind not in "fiu":
            raise RecordingError(f"{p}: expected a numeric array, got dtype {arr.dtype}")
        if arr.ndim == 1:
            if column != 0:
                raise RecordingError(f"{p}: 1-D array has only column 0, got column={column}")
            values = arr
        elif arr.ndim == 2:
            if column >= arr.shape[1]:
                raise RecordingError(f"{p}: array has {arr.shape[1]} columns, got column={column}")
            values = arr[:, column]
        else:
            raise RecordingError(f"{p}: expected a 1-D or 2-D array, got shape {arr.shape}")
    elif suffix in (".csv", ".txt"):
        delimiter, skip = _sniff_csv(p)
        try:
            table = np.loadtxt(p, delimiter=delimiter, skiprows=skip, dtype=np.float64, ndmin=2, comments="#")
        except ValueError as exc:
            raise RecordingError(f"{p}: not a numeric table ({exc})") from exc
        if table.size == 0:
            raise RecordingError(f"{p}: no data rows")
        if column >= table.shape[1]:
            raise RecordingError(f"{p}: file has {table.shape[1]} columns, got column={column}")
        values = table[:, column]
    else:
        raise RecordingError(f"{p}: load_array reads .csv, .txt or .npy, not {p.suffix!r}")
    return Recording(
        name=p.stem,
        sample_rate_hz=fs,
        unit=unit,
        kind=kind,
        segments=(_segment(values, 0, p),),
        metadata={"format": "array", "source_path": str(p), "channel": int(column), "label": None},
    )


# --------------------------------------------------------------------------------------------
# The project's sample recording


_SAMPLE_KEYS = ("samples", "scale", "sample_rate_hz", "unit", "kind", "metadata_json")


def load_sample(path: PathLike = DEFAULT_SAMPLE_PATH) -> Recording:
    """Load the project's sample recording (``.npz`` written by :mod:`sample_data.make_sample`).

    The file holds ``samples`` (``int16``, shape ``(n,)``), ``scale`` (unit per count),
    ``sample_rate_hz``, ``unit``, ``kind`` and ``metadata_json`` (see ``sample_data/README.md``).
    Samples are returned as ``samples * scale`` in ``float32``.

    Args:
        path: the ``.npz`` file; default :data:`DEFAULT_SAMPLE_PATH`.

    Returns:
        A one-segment :class:`Recording` (``start_ns = 0``). Metadata: the decoded
        ``metadata_json`` (``format_version``, ``generator``, ``generator_params``, ``seed``,
        ``fault``, ``onset_s``, ``bearing``, ``shaft_hz``, ``defect_frequencies_hz``,
        ``bpfo_hz``, ... ) plus ``format="pdm-edge-sample"``, ``source_path``, ``channel=0``,
        ``scale`` and ``label=None`` (the file holds a healthy and a faulty part; see
        ``onset_s``).

    Raises:
        RecordingError: if the file is missing, not an ``.npz`` archive, lacks a field,
            or has an unsupported ``format_version``.
    """
    p = _existing(path, "sample recording")
    try:
        with np.load(p, allow_pickle=False) as npz:
            missing = [k for k in _SAMPLE_KEYS if k not in npz.files]
            if missing:
                raise RecordingError(f"{p}: not a pdm-edge sample recording (missing {missing})")
            counts = npz["samples"]
            scale = float(npz["scale"])
            fs = float(npz["sample_rate_hz"])
            unit = str(npz["unit"].item())
            kind = str(npz["kind"].item())
            meta_json = str(npz["metadata_json"].item())
    except RecordingError:
        raise
    except Exception as exc:  # malformed archive: BadZipFile, ValueError, EOFError, ...
        raise RecordingError(f"{p}: not a readable .npz archive ({exc})") from exc
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as exc:
        raise RecordingError(f"{p}: metadata_json is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise RecordingError(f"{p}: metadata_json must hold a JSON object")
    version = meta.get("format_version")
    if version != SAMPLE_FORMAT_VERSION:
        raise RecordingError(
            f"{p}: sample format_version {version!r} is not supported (expected {SAMPLE_FORMAT_VERSION})"
        )
    if counts.dtype != np.int16 or counts.ndim != 1:
        raise RecordingError(f"{p}: samples must be a 1-D int16 array, got {counts.dtype} {counts.shape}")
    if unit not in UNITS or kind not in SENSOR_KINDS:
        raise RecordingError(f"{p}: bad unit {unit!r} or kind {kind!r}")
    meta.update(format="pdm-edge-sample", source_path=str(p), channel=0, scale=scale, label=None)
    return Recording(
        name=p.stem,
        sample_rate_hz=_positive_rate(fs, p),
        unit=unit,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        segments=(_segment(counts.astype(np.float64) * scale, 0, p),),
        metadata=meta,
    )


# --------------------------------------------------------------------------------------------
# Dispatch


_SUFFIX_LOADERS = {
    ".mat": load_cwru,
    ".wav": load_wav,
    ".npz": load_sample,
    ".csv": load_array,
    ".txt": load_array,
    ".npy": load_array,
}


def _is_femto_compact(p: Path) -> bool:
    try:
        with np.load(p, allow_pickle=False) as z:
            return "acc_mg" in z.files
    except Exception:  # not an archive: load_sample says why
        return False


def load_recording(path: PathLike, **overrides: Any) -> Recording:
    """Load any supported recording, choosing the loader from the path.

    - a folder holding ``acc_*.csv`` -> :func:`load_femto`
    - ``.mat`` -> :func:`load_cwru`
    - ``.wav`` -> :func:`load_wav`
    - ``.npz`` -> :func:`load_femto_compact` when it holds ``acc_mg``, else :func:`load_sample`
    - ``.csv`` / ``.txt`` / ``.npy`` -> :func:`load_array` (needs ``sample_rate_hz=``)

    Args:
        path: file or folder.
        **overrides: keyword arguments passed to the chosen loader (``channel=``,
            ``sample_rate_hz=``, ``date=``, ``unit=`` ...).

    Returns:
        The loader's :class:`Recording`.

    Raises:
        RecordingError: if the path does not exist, its format is not recognised, an
            override is not accepted by the chosen loader, or the loader fails.
    """
    p = _existing(path, "recording")
    if p.is_dir():
        if not _femto_files(p):
            raise RecordingError(
                f"{p}: a folder is read only as FEMTO PRONOSTIA (acc_*.csv snapshots), and it holds none"
            )
        loader = load_femto
    else:
        loader = _SUFFIX_LOADERS.get(p.suffix.lower())  # type: ignore[assignment]
        if loader is load_sample and _is_femto_compact(p):
            loader = load_femto_compact
        if loader is None:
            raise RecordingError(
                f"{p}: unknown recording format {p.suffix or '(no suffix)'!r}; supported: "
                f"{', '.join(sorted(_SUFFIX_LOADERS))} or a FEMTO folder of acc_*.csv"
            )
    try:
        inspect.signature(loader).bind(p, **overrides)
    except TypeError as exc:
        raise RecordingError(f"{p}: {loader.__name__} does not accept {sorted(overrides)} ({exc})") from None
    return loader(p, **overrides)
