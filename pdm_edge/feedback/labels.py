"""Technician labels: the one validation and submission function, and the durable label book.

Every label, whether it comes from the dashboard, from MQTT (``pdm/v1/{site}/{machine}/label``)
or from ``pdm-edge label add``, goes through :func:`submit_label`, which validates it with
:func:`make_label` and stores it in a :class:`LabelBook`.

Decisions:

- **Validation** (:func:`make_label`), every failure a :class:`LabelError` naming the field:
  ``site``, ``machine`` and, when given, ``sensor`` and ``alert_id`` match ``[A-Za-z0-9_-]+``
  (the MQTT topic-level rule; alert ids are UUID strings, at most 128 characters); times are
  integer ns since the epoch, UTC, ``0 <= start_ns < end_ns <= 2**63 - 1``, and the span is at
  most ``max_span_s`` (7 days by default; a longer span is almost always a typo in a date);
  ``kind`` is one of :data:`~pdm_edge.types.LABEL_KINDS` (exactly, lower case); ``fault_type``
  is allowed only with ``kind == "fault"`` and must be in :data:`~pdm_edge.types.FAULT_TYPES`
  (a fault without a type is allowed: the technician may not know it); ``author`` is required,
  at most ``max_author_chars`` (200) characters after stripping surrounding blanks, without
  control characters; ``note`` is at most ``max_note_chars`` (2000) characters and may hold
  newlines and tabs but no other control character. An empty string for ``sensor``,
  ``alert_id`` or ``fault_type`` means "not given" (forms send ``""``). Labels in the future are
  allowed (a planned maintenance window labelled ``ignore`` ahead of time).
- **Identity and idempotency**: a label's id is ``uuid5(LABEL_ID_NAMESPACE, json([site,
  machine, sensor, alert_id, start_ns, end_ns, kind, fault_type]))`` (:func:`label_id`): what
  the label says, not who said it, why, or when (author, note and created time are left out).
  The same label submitted twice (from the dashboard and from MQTT, or an MQTT redelivery) is
  therefore one label. The **first submission wins**: a repeat returns the stored label
  unchanged with ``created=False``; its author, note and creation time are not rewritten, so a
  redelivered old message can never undo anything and the result does not depend on how often
  a message was delivered. Changing a label's kind, span or fault type makes a different label
  (both are kept; conflicting labels are resolved by the learning loop, newest first). Editing a
  note or deleting a label is not offered yet.
- **The book** (:class:`LabelBook`) is SQLite in WAL mode with ``synchronous=FULL``: labels are
  rare and precious, so a label :meth:`LabelBook.add` has acknowledged survives a power cut (the
  MQTT listener stores a label before its QoS 1 PUBACK goes out). Several processes may open the
  same book (the appliance and ``pdm-edge label add``); SQLite's locking serialises writers.
  Each row carries an increasing ``seq`` (for :meth:`LabelBook.since`, how the appliance learns
  about labels written by another process) and an ``exported`` flag: the outbox from which the
  appliance forwards labels to the results store through its spool
  (:meth:`LabelBook.unexported` / :meth:`LabelBook.mark_exported`), so a label written while the
  appliance is down, or by the CLI, still reaches the store, exactly once as seen by a query
  (store writes are idempotent).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdm_edge._util import time as _time
from pdm_edge._util.sqlite import open_wal
from pdm_edge._util.time import MAX_NS, iso_utc
from pdm_edge.config import NAME_RE, FeedbackConfig
from pdm_edge.errors import LabelError, StoreError
from pdm_edge.types import FAULT_TYPES, LABEL_KINDS, Label

LABEL_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pdm-edge:label")
"""Namespace of :func:`label_id`; fixed forever (changing it would change every label id)."""

MAX_ALERT_ID_CHARS = 128
_NOTE_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""Control characters refused in a note (newline, carriage return and tab are allowed)."""
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class LabelLimits:
    """Bounds of :func:`make_label` (from ``[feedback]``): the longest span (s), note and author
    (characters)."""

    max_span_s: float = 7 * 24 * 3600.0
    max_note_chars: int = 2000
    max_author_chars: int = 200

    @classmethod
    def from_config(cls, cfg: FeedbackConfig) -> LabelLimits:
        return cls(cfg.max_span_s, cfg.max_note_chars, cfg.max_author_chars)


def label_id(site: str, machine: str, sensor: str | None, alert_id: str | None, start_ns: int, end_ns: int,
             kind: str, fault_type: str | None) -> str:
    """The deterministic id of a label with this content (a UUID-5 string); see the module
    docstring. ``None`` and ``""`` are the same for the optional names."""
    key = json.dumps([site, machine, sensor or None, alert_id or None, int(start_ns), int(end_ns), kind, fault_type or None],
                     separators=(",", ":"))
    return str(uuid.uuid5(LABEL_ID_NAMESPACE, key))


def parse_time(value: Any, field: str) -> int:
    """A label time: an int of ns since the epoch, an ISO-8601 string with a UTC offset
    (``2026-11-21T08:00:00Z``, ``...+01:00``), or a string of digits (epoch ns, for the CLI);
    surrounding blanks are ignored. Parsing is :func:`pdm_edge._util.time.parse_time`.

    Returns:
        ns since the epoch (UTC); ISO strings have microsecond resolution.

    Raises:
        LabelError: naming ``field``, for floats (seconds or ns?), booleans, strings without an
            offset (a local time cannot be placed on the time axis), or out-of-range values.
    """
    if isinstance(value, str):
        value = value.strip()
        if value.isdigit():
            value = int(value)
    try:
        return _time.parse_time(value)
    except ValueError as exc:
        raise LabelError(field, str(exc)) from None


def _name(value: Any, field: str, *, optional: bool, max_chars: int = 256) -> str | None:
    if value is None or value == "":
        if optional:
            return None
        raise LabelError(field, "is required")
    if not isinstance(value, str):
        raise LabelError(field, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise LabelError(field, f"is longer than {max_chars} characters")
    if not NAME_RE.match(value):
        raise LabelError(field, f"{value[:64]!r} must match [A-Za-z0-9_-]+")
    return value


def _ns(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LabelError(field, f"must be an integer of ns since the epoch, got {type(value).__name__}")
    if not 0 <= value <= MAX_NS:
        raise LabelError(field, f"{value} is outside 0..2**63-1 ns")
    return value


def make_label(*, site: str, machine: str, start_ns: int, end_ns: int, kind: str, author: str,
               fault_type: str | None = None, sensor: str | None = None, alert_id: str | None = None,
               note: str | None = "", created_ns: int | None = None, expected_id: str | None = None,
               limits: LabelLimits | None = None) -> Label:
    """Validate a label's fields and build the :class:`~pdm_edge.types.Label` (pure, no I/O).

    Args:
        site, machine: the machine, ``[A-Za-z0-9_-]+``.
        start_ns, end_ns: the labelled span, int ns since the epoch (UTC), ``start_ns < end_ns``,
            at most ``limits.max_span_s`` long.
        kind: ``"normal"`` (false alarm), ``"fault"`` (confirmed) or ``"ignore"`` (maintenance).
        author: who gives it (required).
        fault_type: one of :data:`~pdm_edge.types.FAULT_TYPES`, only with ``kind == "fault"``.
        sensor: restricts the label to one sensor (``None`` = every sensor of the machine).
        alert_id: the alert the label answers, if any.
        note: free text (``None`` is the same as ``""``).
        created_ns: when the label was given (ns); now when ``None``.
        expected_id: when given, the id the caller believes the label has (e.g. a dashboard
            re-sending a label it read back); it must equal the derived id.
        limits: bounds; :class:`LabelLimits` defaults when ``None``.

    Returns:
        the label, its id derived from its content (:func:`label_id`).

    Raises:
        LabelError: naming the first invalid field (see the module docstring).
    """
    lim = limits or LabelLimits()
    site = _name(site, "site", optional=False)  # type: ignore[assignment]
    machine = _name(machine, "machine", optional=False)  # type: ignore[assignment]
    sensor = _name(sensor, "sensor", optional=True)
    alert_id = _name(alert_id, "alert_id", optional=True, max_chars=MAX_ALERT_ID_CHARS)
    start_ns = _ns(start_ns, "start_ns")
    end_ns = _ns(end_ns, "end_ns")
    if end_ns <= start_ns:
        raise LabelError("end_ns", f"the span is empty or reversed: end {iso_utc(end_ns)} is not after start {iso_utc(start_ns)}")
    span_s = (end_ns - start_ns) / 1e9
    if span_s > lim.max_span_s:
        raise LabelError("end_ns", f"the span is {span_s / 3600:.1f} h, longer than the limit of {lim.max_span_s / 3600:g} h (feedback.max_span_s)")
    if not isinstance(kind, str) or kind not in LABEL_KINDS:
        raise LabelError("kind", f"must be one of {', '.join(LABEL_KINDS)}, got {str(kind)[:32]!r}")
    if fault_type == "":
        fault_type = None
    if fault_type is not None:
        if not isinstance(fault_type, str) or fault_type not in FAULT_TYPES:
            raise LabelError("fault_type", f"must be one of {', '.join(FAULT_TYPES)}, got {str(fault_type)[:48]!r}")
        if kind != "fault":
            raise LabelError("fault_type", f"is only allowed on labels of kind 'fault', not {kind!r}")
    if not isinstance(author, str):
        raise LabelError("author", f"must be a string, got {type(author).__name__}")
    author = author.strip()
    if not author:
        raise LabelError("author", "is required (who gives the label)")
    if len(author) > lim.max_author_chars:
        raise LabelError("author", f"is longer than {lim.max_author_chars} characters")
    if _CONTROL.search(author):
        raise LabelError("author", "contains a control character")
    if note is None:
        note = ""
    if not isinstance(note, str):
        raise LabelError("note", f"must be a string, got {type(note).__name__}")
    if len(note) > lim.max_note_chars:
        raise LabelError("note", f"is {len(note)} characters, longer than {lim.max_note_chars} (feedback.max_note_chars)")
    if _NOTE_CONTROL.search(note):
        raise LabelError("note", "contains a control character other than newline or tab")
    created_ns = time.time_ns() if created_ns is None else _ns(created_ns, "created_ns")
    lid = label_id(site, machine, sensor, alert_id, start_ns, end_ns, kind, fault_type)  # type: ignore[arg-type]
    if expected_id is not None and expected_id != lid:
        raise LabelError("id", f"{str(expected_id)[:64]!r} does not match the label's content (its id is {lid})")
    return Label(id=lid, site=site, machine=machine, start_ns=start_ns, end_ns=end_ns, kind=kind,  # type: ignore[arg-type]
                 author=author, created_ns=created_ns, sensor=sensor, alert_id=alert_id, fault_type=fault_type, note=note)


def submit_label(book: LabelBook, *, site: str, machine: str, start_ns: int, end_ns: int, kind: str, author: str,
                 fault_type: str | None = None, sensor: str | None = None, alert_id: str | None = None,
                 note: str | None = "", created_ns: int | None = None, expected_id: str | None = None,
                 limits: LabelLimits | None = None) -> tuple[Label, bool]:
    """The one way a label enters pdm-edge: validate (:func:`make_label`) and store it in ``book``.

    Arguments as :func:`make_label`.

    Returns:
        ``(label, created)``: ``created`` is False when the same label (same id) was already in
        the book; ``label`` is then the stored one (first submission wins: its author, note and
        created time).

    Raises:
        LabelError: an invalid field (nothing is stored).
        StoreError: the book cannot be written.
    """
    label = make_label(site=site, machine=machine, start_ns=start_ns, end_ns=end_ns, kind=kind, author=author,
                       fault_type=fault_type, sensor=sensor, alert_id=alert_id, note=note, created_ns=created_ns,
                       expected_id=expected_id, limits=limits)
    if book.add(label):
        return label, True
    stored = book.get(label.id)
    return (stored if stored is not None else label), False


def label_payload(label: Label) -> dict[str, Any]:
    """The JSON object of a label, as the dashboard writes it and the MQTT listener reads it
    (times twice: ISO-8601 UTC and exact ``*_ns``; absent optional names are ``null``)."""
    return {
        "id": label.id,
        "site": label.site,
        "machine": label.machine,
        "sensor": label.sensor,
        "alert_id": label.alert_id,
        "start": iso_utc(label.start_ns),
        "end": iso_utc(label.end_ns),
        "start_ns": int(label.start_ns),
        "end_ns": int(label.end_ns),
        "kind": label.kind,
        "fault_type": label.fault_type,
        "author": label.author,
        "note": label.note,
        "created": iso_utc(label.created_ns),
        "created_ns": int(label.created_ns),
    }


# -- the book --------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS label (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    label_id TEXT NOT NULL UNIQUE,
    site TEXT NOT NULL,
    machine TEXT NOT NULL,
    sensor TEXT,
    alert_id TEXT,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    fault_type TEXT,
    author TEXT NOT NULL,
    note TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    exported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS label_by_machine ON label (site, machine, start_ns);
CREATE INDEX IF NOT EXISTS label_unexported ON label (exported, seq);
"""
_COLUMNS = "label_id, site, machine, start_ns, end_ns, kind, author, created_ns, sensor, alert_id, fault_type, note"


def _row_label(r: Sequence[Any]) -> Label:
    return Label(id=r[0], site=r[1], machine=r[2], start_ns=int(r[3]), end_ns=int(r[4]), kind=r[5], author=r[6],
                 created_ns=int(r[7]), sensor=r[8], alert_id=r[9], fault_type=r[10], note=r[11])


class LabelBook:
    """The appliance's durable record of labels: one SQLite file (WAL), keyed by label id.

    Thread-safe (one connection behind a lock); several processes may share the file.

    Args:
        path: the book file (``{state_dir}/labels.sqlite``); its directory is created if missing.

    Raises:
        StoreError: the file cannot be created or opened (or is not a label book).
    """

    FILENAME = "labels.sqlite"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._con = open_wal(self.path, synchronous="FULL", schema=_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the label book {self.path}: {exc}") from None
        self._closed = False

    @classmethod
    def in_dir(cls, state_dir: str | os.PathLike[str]) -> LabelBook:
        """The book of a state directory (``{state_dir}/labels.sqlite``)."""
        return cls(Path(state_dir) / cls.FILENAME)

    def _run(self, what: str, fn: Any) -> Any:
        with self._lock:
            if self._closed:
                raise StoreError(f"the label book {self.path} is closed")
            try:
                return fn(self._con)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot {what} the label book {self.path}: {exc}") from None

    def add(self, label: Label) -> bool:
        """Store a label; ``True`` if it is new, ``False`` if a label with its id was already
        stored (that one is kept unchanged: first submission wins).

        Use :func:`submit_label` to validate first; ``add`` only checks that the id is the one
        derived from the content, which keeps the book idempotent.

        Raises:
            LabelError: ``label.id`` is not :func:`label_id` of its content.
            StoreError: the file cannot be written.
        """
        expected = label_id(label.site, label.machine, label.sensor, label.alert_id, label.start_ns, label.end_ns,
                            label.kind, label.fault_type)
        if label.id != expected:
            raise LabelError("id", f"{label.id!r} is not the id derived from the label's content ({expected})")
        row = (label.id, label.site, label.machine, label.sensor, label.alert_id, int(label.start_ns), int(label.end_ns),
               label.kind, label.fault_type, label.author, label.note or "", int(label.created_ns))
        cur = self._run("write", lambda con: con.execute(
            "INSERT INTO label (label_id, site, machine, sensor, alert_id, start_ns, end_ns, kind, fault_type, author, note, created_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (label_id) DO NOTHING", row))
        return cur.rowcount == 1

    def get(self, label_id: str) -> Label | None:
        """The stored label with this id, or ``None``."""
        row = self._run("read", lambda con: con.execute(f"SELECT {_COLUMNS} FROM label WHERE label_id = ?", (label_id,)).fetchone())
        return _row_label(row) if row else None

    def list(self, site: str | None = None, machine: str | None = None, start_ns: int | None = None,
             end_ns: int | None = None, kind: str | None = None) -> list[Label]:
        """Labels, filtered: of a site and/or machine, whose span overlaps ``[start_ns, end_ns)``
        (either bound may be ``None``), of one kind; sorted by (start, id)."""
        where, args = [], []
        for col, val in (("site", site), ("machine", machine), ("kind", kind)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if start_ns is not None:
            where.append("end_ns > ?")
            args.append(int(start_ns))
        if end_ns is not None:
            where.append("start_ns < ?")
            args.append(int(end_ns))
        sql = f"SELECT {_COLUMNS} FROM label" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY start_ns, label_id"
        return [_row_label(r) for r in self._run("read", lambda con: con.execute(sql, args).fetchall())]

    def since(self, seq: int, limit: int = 1000) -> list[tuple[int, Label]]:
        """``(seq, label)`` of the labels added after ``seq`` (0 = all), in the order they were
        added; how a process learns about labels another process wrote."""
        rows = self._run("read", lambda con: con.execute(
            f"SELECT seq, {_COLUMNS} FROM label WHERE seq > ? ORDER BY seq LIMIT ?", (int(seq), int(limit))).fetchall())
        return [(int(r[0]), _row_label(r[1:])) for r in rows]

    def unexported(self, limit: int = 1000) -> list[Label]:
        """Labels not yet forwarded to the results store (the outbox), oldest first."""
        rows = self._run("read", lambda con: con.execute(
            f"SELECT {_COLUMNS} FROM label WHERE exported = 0 ORDER BY seq LIMIT ?", (int(limit),)).fetchall())
        return [_row_label(r) for r in rows]

    def mark_exported(self, ids: Sequence[str]) -> None:
        """Note that these labels are in the spool (call after ``spool.put`` returned)."""
        if ids:
            self._run("write", lambda con: con.executemany("UPDATE label SET exported = 1 WHERE label_id = ?",
                                                           [(i,) for i in ids]))

    def count(self) -> int:
        """Number of labels in the book."""
        return int(self._run("read", lambda con: con.execute("SELECT count(*) FROM label").fetchone()[0]))

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._con.close()

    def __enter__(self) -> LabelBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
