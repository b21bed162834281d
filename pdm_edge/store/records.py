"""The one place where store records are checked and (de)serialised as JSON.

The spool keeps every record as ``(kind, payload)`` with ``payload`` a JSON object; the four
kinds and their record types are:

============== ============================================ ==============================
kind           record                                       written by
============== ============================================ ==============================
``score``      :class:`pdm_edge.types.Score`                :meth:`Store.write_scores`
``alert``      :class:`pdm_edge.types.Alert`                :meth:`Store.write_alerts`
``label``      :class:`pdm_edge.types.Label`                :meth:`Store.write_labels`
``model_event`` :class:`pdm_edge.store.base.ModelEvent`     :meth:`Store.write_model_events`
============== ============================================ ==============================

The JSON object is the dataclass's fields by name (``dataclasses.asdict``); times stay integer
nanoseconds (JSON integers are exact in Python), floats are finite.

Decisions:

- **Names are checked before a record enters the spool** (:func:`check_record`), with the same
  rule for both stores, so that a record the store could never take does not block the spool
  behind it. A name (site, machine, sensor, model version, alert id, label id) may be any
  Unicode text (spaces, commas, ``=``, quotes, backslashes, "Pumpe Süd 7 — Ø") except: empty,
  containing a control character (tab, newline, ...), or ending in a backslash. The last two
  cannot be written losslessly as InfluxDB line-protocol tag values (a trailing backslash
  escapes the separator that follows it; control characters have no escape), so both stores
  refuse them. MQTT topic names (``[A-Za-z0-9_-]+``) always pass.
- **Times must fit int64** (ns): SQLite and InfluxDB hold 64-bit integers; a bigger one
  would otherwise fail inside the store and (before issue 15) block the spool.
- **Numbers must be finite**: InfluxDB cannot store NaN or infinity, and a NaN score is a bug
  upstream, not a measurement. ``threshold`` may be ``None`` (uncalibrated).
- Field types are fixed (InfluxDB keeps one type per field): scores, thresholds and peak scores
  are floats, times are ints, ``is_anomaly`` is a bool; :func:`check_record` coerces an int
  score to float and refuses a bool or a string.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from pdm_edge.condition import Condition
from pdm_edge.store.base import ModelEvent
from pdm_edge.types import Alert, FaultMatch, Label, Score

KINDS: dict[str, type] = {"score": Score, "alert": Alert, "label": Label, "model_event": ModelEvent, "condition": Condition}
"""Record kind -> record type, in the spool and in :func:`write_records`."""

WRITERS: dict[str, str] = {
    "score": "write_scores",
    "alert": "write_alerts",
    "label": "write_labels",
    "model_event": "write_model_events",
    "condition": "write_conditions",
}
"""Record kind -> the :class:`~pdm_edge.store.base.Store` method that writes it."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Unicode category Cc (C0 and C1 control characters)."""

_FIELD_NAMES: dict[str, tuple[str, ...]] = {k: tuple(f.name for f in dataclasses.fields(c)) for k, c in KINDS.items()}

_NAME_FIELDS: dict[str, tuple[tuple[str, bool], ...]] = {
    # (field, may be None)
    "score": (("site", False), ("machine", False), ("sensor", False), ("model_version", True)),
    "alert": (("id", False), ("site", False), ("machine", False), ("sensor", False), ("model_version", False)),
    "label": (("id", False), ("site", False), ("machine", False), ("sensor", True), ("alert_id", True)),
    "model_event": (("site", False), ("machine", False), ("event", False), ("version", False)),
    "condition": (("site", False), ("machine", False), ("sensor", False)),
}
_FLOAT_FIELDS: dict[str, tuple[tuple[str, bool], ...]] = {
    "score": (("score", False), ("threshold", True)),
    "alert": (("peak_score", False), ("threshold", False)),
    "label": (),
    "model_event": (),
    "condition": (("rms", False), ("peak", False), ("crest_factor", False), ("kurtosis", False), ("band_10_1k", False),
                  ("band_1k_5k", False), ("band_5k_up", False), ("velocity_rms_mm_s", True)),
}
_INT_FIELDS: dict[str, tuple[tuple[str, bool], ...]] = {
    "score": (("start_ns", False),),
    "alert": (("start_ns", False), ("end_ns", True)),
    "label": (("start_ns", False), ("end_ns", False), ("created_ns", False)),
    "model_event": (("ts_ns", False),),
    "condition": (("start_ns", False),),
}


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it can be stored as a name (tag value) in both stores.

    Raises:
        ValueError: empty, not a string, containing a control character, or ending in a
            backslash (see the module docstring).
    """
    if not isinstance(value, str) or value == "":
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if _CONTROL.search(value):
        raise ValueError(f"{what} {value!r} contains a control character; names may not")
    if value.endswith("\\"):
        raise ValueError(f"{what} {value!r} ends in a backslash, which InfluxDB line protocol cannot carry in a tag")
    return value


def kind_of(record: object) -> str:
    """The kind (``"score"``, ``"alert"``, ``"label"``, ``"model_event"``) of a record.

    Raises:
        TypeError: not one of the four record types.
    """
    for kind, cls in KINDS.items():
        if type(record) is cls:
            return kind
    raise TypeError(f"not a store record: {type(record).__name__}")


def check_record(kind: str, record: Any) -> Any:
    """Check one record for the store and return it (an int score or threshold becomes a float).

    Args:
        kind: one of :data:`KINDS`.
        record: an instance of ``KINDS[kind]``.

    Raises:
        ValueError: unknown kind, or a name / number that the stores cannot take.
        TypeError: the record is not of the kind's type, or a field has the wrong type.
    """
    cls = KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown record kind {kind!r}; one of {sorted(KINDS)}")
    if type(record) is not cls:
        raise TypeError(f"a {kind!r} record must be a {cls.__name__}, got {type(record).__name__}")
    changes: dict[str, Any] = {}
    for field, optional in _NAME_FIELDS[kind]:
        v = getattr(record, field)
        if v is None and optional:
            continue
        if kind == "model_event" and field in ("event", "version"):
            if not isinstance(v, str):
                raise TypeError(f"{kind}.{field} must be a string, got {type(v).__name__}")
            continue  # fields, not tags: any text
        check_name(v, f"{kind}.{field}")
    for field, optional in _FLOAT_FIELDS[kind]:
        v = getattr(record, field)
        if v is None and optional:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{kind}.{field} must be a number, got {type(v).__name__} {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"{kind}.{field} must be finite, got {v!r}")
        if type(v) is not float:
            changes[field] = float(v)
    for field, optional in _INT_FIELDS[kind]:
        v = getattr(record, field)
        if v is None and optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{kind}.{field} must be an int (ns), got {type(v).__name__} {v!r}")
        if not -(2**63) <= v < 2**63:
            raise ValueError(f"{kind}.{field} = {str(v)[:40]} is beyond int64 (ns); no store can hold it")
    if kind == "score" and not isinstance(record.is_anomaly, bool):
        changes["is_anomaly"] = bool(record.is_anomaly)
    if kind == "condition" and (record.zone not in (None, "A", "B", "C", "D") or not isinstance(record.unit, str)):
        raise ValueError(f"condition.zone must be A, B, C, D or None, got {record.zone!r}")
    if kind == "alert" and record.state not in ("raised", "cleared"):
        raise ValueError(f"alert.state must be 'raised' or 'cleared', got {record.state!r}")
    if kind in ("score", "alert") and record.fault_match is not None:
        _check_fault_match(kind, record.fault_match)
    for field in ("author", "note", "kind", "fault_type") if kind == "label" else ():
        v = getattr(record, field)
        if v is not None and not isinstance(v, str):
            raise TypeError(f"label.{field} must be a string, got {type(v).__name__}")
    return dataclasses.replace(record, **changes) if changes else record


def _check_fault_match(kind: str, m: Any) -> None:
    if type(m) is not FaultMatch:
        raise TypeError(f"{kind}.fault_match must be a FaultMatch or None, got {type(m).__name__}")
    check_name(m.label_id, f"{kind}.fault_match.label_id")
    if m.fault_type is not None and not isinstance(m.fault_type, str):
        raise TypeError(f"{kind}.fault_match.fault_type must be a string, got {type(m.fault_type).__name__}")
    if isinstance(m.start_ns, bool) or not isinstance(m.start_ns, int) or not -(2**63) <= m.start_ns < 2**63:
        raise ValueError(f"{kind}.fault_match.start_ns must be an int64 (ns), got {m.start_ns!r}")
    if isinstance(m.similarity, bool) or not isinstance(m.similarity, (int, float)) or not math.isfinite(m.similarity):
        raise ValueError(f"{kind}.fault_match.similarity must be a finite number, got {m.similarity!r}")


def check_records(kind: str, records: Sequence[Any]) -> list[Any]:
    """:func:`check_record` over a sequence; returns the (possibly coerced) records."""
    return [check_record(kind, r) for r in records]


def to_json(kind: str, record: Any) -> str:
    """Serialise one (checked) record to a compact JSON object.

    Raises:
        ValueError, TypeError: as :func:`check_record`.
    """
    record = check_record(kind, record)
    data = {name: getattr(record, name) for name in _FIELD_NAMES[kind]}  # flat records but fault_match
    if data.get("fault_match") is not None:
        data["fault_match"] = dataclasses.asdict(data["fault_match"])
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def from_json(kind: str, payload: str) -> Any:
    """Rebuild a record of ``kind`` from :func:`to_json`'s output.

    Raises:
        ValueError: unknown kind or malformed payload (not JSON, missing or unknown fields).
    """
    cls = KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown record kind {kind!r}")
    try:
        data = json.loads(payload)
        if isinstance(data.get("fault_match"), dict):
            data["fault_match"] = FaultMatch(**data["fault_match"])
        return cls(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"malformed {kind} payload: {exc}") from None


def write_records(store: Any, kind: str, records: Sequence[Any]) -> None:
    """Write records of one kind through the matching ``Store.write_*`` method.

    Raises:
        ValueError: unknown kind.
        StoreError: as the store's write method.
    """
    if kind not in WRITERS:
        raise ValueError(f"unknown record kind {kind!r}")
    getattr(store, WRITERS[kind])(records)
