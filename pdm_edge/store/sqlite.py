"""SQLite store: the embedded default (DESIGN.md section 4), used when no InfluxDB is configured.

Decisions:

- **One table per measurement**, with the InfluxDB schema's columns (see
  :mod:`pdm_edge.store.base`) and a primary key that is the record's natural key, so that every
  write is an idempotent upsert (``INSERT ... ON CONFLICT DO UPDATE``): a retried or replayed
  write overwrites the row instead of adding one.

  ============== ==================================================
  table          primary key
  ============== ==================================================
  anomaly_score  (site, machine, sensor, start_ns)
  alert          (site, machine, sensor, alert_id, start_ns)
  label          (label_id)
  model_event    (site, machine, ts_ns, event, version)
  ============== ==================================================

  Secondary indexes on ``(site, machine, start_ns)`` (``ts_ns`` for model events) serve the
  machine-wide range queries and :meth:`SQLiteStore.machines`.
- An open alert's ``end_ns`` is stored as 0 (as in InfluxDB, where a field keeps one type) and
  read back as ``None``; a label's optional ``sensor`` / ``alert_id`` / ``fault_type`` are NULL
  when absent; an uncalibrated score's ``threshold`` is NULL.
- **WAL journal, ``synchronous=NORMAL``**: readers (the dashboard) never block the writer and
  a committed write survives a crash of the process; a power cut may lose the last few
  transactions (the spool in front of the store has already acknowledged them by then, which
  is the same guarantee InfluxDB's WAL gives).
- **Threads**: each thread gets its own connection (``threading.local``), so queries from the
  dashboard run beside the spool writer; SQLite's own locking plus a busy timeout serialise the
  writers. :meth:`SQLiteStore.close` closes every connection it opened.
- **Downsampling** is done in SQL: buckets are ``floor(start_ns / every) * every`` (aligned to
  the epoch, as InfluxQL's ``GROUP BY time()``); per bucket the maximum score, the threshold of
  the row holding it (the earliest such row on a tie, as InfluxQL's ``max()`` selector), the
  window count and whether any window was anomalous.
- Every ``sqlite3`` error is raised as :class:`~pdm_edge.errors.StoreError` naming the file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pdm_edge.condition import Condition
from pdm_edge._util.sqlite import open_wal, tx
from pdm_edge.errors import StoreError
from pdm_edge.store.base import MachineState, ModelEvent, ScoreBucket
from pdm_edge.store.records import check_records
from pdm_edge.types import Alert, FaultMatch, Label, Score

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS anomaly_score (
    site TEXT NOT NULL, machine TEXT NOT NULL, sensor TEXT NOT NULL, start_ns INTEGER NOT NULL,
    score REAL NOT NULL, threshold REAL, is_anomaly INTEGER NOT NULL, model_version TEXT,
    PRIMARY KEY (site, machine, sensor, start_ns)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS anomaly_score_by_machine ON anomaly_score (site, machine, start_ns);

CREATE TABLE IF NOT EXISTS alert (
    site TEXT NOT NULL, machine TEXT NOT NULL, sensor TEXT NOT NULL, alert_id TEXT NOT NULL,
    start_ns INTEGER NOT NULL, state TEXT NOT NULL, end_ns INTEGER NOT NULL,
    peak_score REAL NOT NULL, threshold REAL NOT NULL, model_version TEXT NOT NULL,
    match_label_id TEXT, match_fault_type TEXT, match_start_ns INTEGER, match_similarity REAL,
    PRIMARY KEY (site, machine, sensor, alert_id, start_ns)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alert_by_machine ON alert (site, machine, start_ns);

CREATE TABLE IF NOT EXISTS label (
    label_id TEXT NOT NULL PRIMARY KEY, site TEXT NOT NULL, machine TEXT NOT NULL,
    start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, kind TEXT NOT NULL, sensor TEXT,
    alert_id TEXT, fault_type TEXT, author TEXT NOT NULL, note TEXT NOT NULL, created_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS label_by_machine ON label (site, machine, start_ns);

CREATE TABLE IF NOT EXISTS condition (
    site TEXT NOT NULL, machine TEXT NOT NULL, sensor TEXT NOT NULL, start_ns INTEGER NOT NULL, unit TEXT NOT NULL,
    rms REAL NOT NULL, peak REAL NOT NULL, crest_factor REAL NOT NULL, kurtosis REAL NOT NULL,
    band_10_1k REAL NOT NULL, band_1k_5k REAL NOT NULL, band_5k_up REAL NOT NULL,
    velocity_rms_mm_s REAL, zone TEXT,
    PRIMARY KEY (site, machine, sensor, start_ns)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS model_event (
    site TEXT NOT NULL, machine TEXT NOT NULL, ts_ns INTEGER NOT NULL, event TEXT NOT NULL,
    version TEXT NOT NULL, detail TEXT NOT NULL,
    PRIMARY KEY (site, machine, ts_ns, event, version)
) WITHOUT ROWID;
"""


_CONDITION_COLS = ("site", "machine", "sensor", "start_ns", "unit", "rms", "peak", "crest_factor", "kurtosis",
                   "band_10_1k", "band_1k_5k", "band_5k_up", "velocity_rms_mm_s", "zone")
"""The ``condition`` table's columns, in :class:`~pdm_edge.condition.Condition` field order."""


_ALERT_V2_COLUMNS = (("match_label_id", "TEXT"), ("match_fault_type", "TEXT"), ("match_start_ns", "INTEGER"),
                     ("match_similarity", "REAL"))
"""Columns schema 2 added to ``alert`` (:attr:`pdm_edge.types.Alert.fault_match`); NULL = none."""


def _match_columns(m: FaultMatch | None) -> tuple[Any, Any, Any, Any]:
    return (None, None, None, None) if m is None else (m.label_id, m.fault_type, int(m.start_ns), float(m.similarity))


class SQLiteStore:
    """The embedded store: one SQLite file in WAL mode (see the module docstring).

    Args:
        path: the database file; its parent directory is created if missing.
        timeout_s: how long a writer waits for another writer's lock, seconds.

    Raises:
        StoreError: the file cannot be created or opened, or is not a pdm-edge store.
    """

    kind = "sqlite"

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of the SQLite store {self.path}: {exc.strerror}") from None
        try:
            con = self._conn()
            con.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); executescript commits itself
            have = {r[1] for r in con.execute("PRAGMA table_info(alert)")}
            for col, typ in _ALERT_V2_COLUMNS:  # schema 1 -> 2: the alert's nearest confirmed fault
                if col not in have:
                    con.execute(f"ALTER TABLE alert ADD COLUMN {col} {typ}")
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open the SQLite store {self.path}: {exc}") from None

    # -- connections -------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"SQLite store {self.path} is closed")
        con = getattr(self._local, "con", None)
        if con is None:
            try:
                con = open_wal(self.path, timeout_s=self.timeout_s)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the SQLite store {self.path}: {exc}") from None
            self._local.con = con
            with self._conns_lock:
                self._conns.append(con)
        return con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        con = self._conn()
        try:
            with tx(con):
                yield con
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from None

    def _query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from None

    # -- writes ------------------------------------------------------------------------------
    def write_scores(self, scores: Sequence[Score]) -> None:
        """Upsert scores, keyed by (site, machine, sensor, window start).

        Raises:
            ValueError, TypeError: a record the store cannot take (see :mod:`.records`).
            StoreError: the file cannot be written (disk full, locked longer than ``timeout_s``).
        """
        rows = [(s.site, s.machine, s.sensor, s.start_ns, s.score, s.threshold, int(s.is_anomaly), s.model_version)
                for s in check_records("score", scores)]
        if not rows:
            return
        with self._tx() as con:
            con.executemany(
                "INSERT INTO anomaly_score (site, machine, sensor, start_ns, score, threshold, is_anomaly, model_version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, machine, sensor, start_ns) DO UPDATE SET "
                "score = excluded.score, threshold = excluded.threshold, is_anomaly = excluded.is_anomaly, "
                "model_version = excluded.model_version", rows)

    def write_alerts(self, alerts: Sequence[Alert]) -> None:
        """Upsert alerts, keyed by (site, machine, sensor, id, start); "cleared" overwrites "raised".

        Raises:
            ValueError, TypeError: a record the store cannot take.
            StoreError: the file cannot be written.
        """
        rows = [(a.site, a.machine, a.sensor, a.id, a.start_ns, a.state, a.end_ns or 0, a.peak_score, a.threshold,
                 a.model_version, *_match_columns(a.fault_match)) for a in check_records("alert", alerts)]
        if not rows:
            return
        with self._tx() as con:
            con.executemany(
                "INSERT INTO alert (site, machine, sensor, alert_id, start_ns, state, end_ns, peak_score, threshold, model_version, "
                "match_label_id, match_fault_type, match_start_ns, match_similarity) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, machine, sensor, alert_id, start_ns) DO UPDATE SET "
                "state = excluded.state, end_ns = excluded.end_ns, peak_score = excluded.peak_score, "
                "threshold = excluded.threshold, model_version = excluded.model_version, "
                "match_label_id = excluded.match_label_id, match_fault_type = excluded.match_fault_type, "
                "match_start_ns = excluded.match_start_ns, match_similarity = excluded.match_similarity", rows)

    def write_labels(self, labels: Sequence[Label]) -> None:
        """Upsert labels, keyed by label id (a resubmitted or edited label replaces the old one).

        Raises:
            ValueError, TypeError: a record the store cannot take.
            StoreError: the file cannot be written.
        """
        rows = [(lb.id, lb.site, lb.machine, lb.start_ns, lb.end_ns, lb.kind, lb.sensor, lb.alert_id, lb.fault_type,
                 lb.author, lb.note, lb.created_ns) for lb in check_records("label", labels)]
        if not rows:
            return
        with self._tx() as con:
            con.executemany(
                "INSERT INTO label (label_id, site, machine, start_ns, end_ns, kind, sensor, alert_id, fault_type, author, note, created_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (label_id) DO UPDATE SET "
                "site = excluded.site, machine = excluded.machine, start_ns = excluded.start_ns, end_ns = excluded.end_ns, "
                "kind = excluded.kind, sensor = excluded.sensor, alert_id = excluded.alert_id, "
                "fault_type = excluded.fault_type, author = excluded.author, note = excluded.note, "
                "created_ns = excluded.created_ns", rows)

    def write_model_events(self, events: Sequence[ModelEvent]) -> None:
        """Upsert model events, keyed by (site, machine, time, event, version).

        Raises:
            ValueError, TypeError: a record the store cannot take.
            StoreError: the file cannot be written.
        """
        rows = [(e.site, e.machine, e.ts_ns, e.event, e.version, e.detail) for e in check_records("model_event", events)]
        if not rows:
            return
        with self._tx() as con:
            con.executemany(
                "INSERT INTO model_event (site, machine, ts_ns, event, version, detail) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (site, machine, ts_ns, event, version) DO UPDATE SET detail = excluded.detail", rows)

    def write_conditions(self, conditions: Sequence[Condition]) -> None:
        """Upsert condition indicators, keyed by (site, machine, sensor, window start).

        Raises:
            ValueError, TypeError: a record the store cannot take.
            StoreError: the file cannot be written.
        """
        rows = [tuple(getattr(c, f) for f in _CONDITION_COLS) for c in check_records("condition", conditions)]
        if not rows:
            return
        cols = ", ".join(_CONDITION_COLS)
        update = ", ".join(f"{c} = excluded.{c}" for c in _CONDITION_COLS[4:])
        with self._tx() as con:
            con.executemany(f"INSERT INTO condition ({cols}) VALUES ({', '.join('?' * len(_CONDITION_COLS))}) "
                            f"ON CONFLICT (site, machine, sensor, start_ns) DO UPDATE SET {update}", rows)

    # -- queries -----------------------------------------------------------------------------
    def query_conditions(self, site: str, machine: str, start_ns: int, end_ns: int,
                         sensor: str | None = None) -> list[Condition]:
        """Condition indicators of a machine (optionally one sensor) with window start in
        ``[start_ns, end_ns)``, sorted by (start, sensor).

        Raises:
            StoreError: the file cannot be read.
        """
        sql = (f"SELECT {', '.join(_CONDITION_COLS)} FROM condition "
               "WHERE site = ? AND machine = ? AND start_ns >= ? AND start_ns < ?")
        params: list[Any] = [site, machine, int(start_ns), int(end_ns)]
        if sensor is not None:
            sql += " AND sensor = ?"
            params.append(sensor)
        return [Condition(*r) for r in self._query(sql + " ORDER BY start_ns, sensor", params)]

    def query_condition_buckets(self, site: str, machine: str, sensor: str, start_ns: int, end_ns: int,
                                every_s: float) -> list[Condition]:
        """One sensor's condition indicators in ``[start_ns, end_ns)``, per epoch-aligned bucket
        of ``every_s`` seconds: the maximum of each value and the worst zone
        (see :meth:`Store.query_condition_buckets`).

        Raises:
            ValueError: ``every_s`` rounds to less than 1 ns.
            StoreError: the file cannot be read.
        """
        every_ns = round(every_s * 1e9)
        if every_ns < 1:
            raise ValueError(f"every_s must be positive, got {every_s!r}")
        values = ", ".join(f"max({c})" for c in _CONDITION_COLS[5:12])
        rows = self._query(
            f"""
            SELECT start_ns - (((start_ns % :e) + :e) % :e) AS bucket, max(unit), {values}, max(velocity_rms_mm_s), max(zone)
            FROM condition
            WHERE site = :site AND machine = :machine AND sensor = :sensor AND start_ns >= :t0 AND start_ns < :t1
            GROUP BY bucket ORDER BY bucket
            """,
            {"e": every_ns, "site": site, "machine": machine, "sensor": sensor, "t0": int(start_ns), "t1": int(end_ns)},
        )
        return [Condition(site, machine, sensor, int(r[0]), *r[1:]) for r in rows]

    def query_scores(self, site: str, machine: str, start_ns: int, end_ns: int, sensor: str | None = None) -> list[Score]:
        """Scores of a machine (optionally one sensor) with window start in ``[start_ns, end_ns)``,
        sorted by (start, sensor).

        Raises:
            StoreError: the file cannot be read.
        """
        sql = ("SELECT site, machine, sensor, start_ns, score, threshold, is_anomaly, model_version FROM anomaly_score "
               "WHERE site = ? AND machine = ? AND start_ns >= ? AND start_ns < ?")
        params: list[Any] = [site, machine, int(start_ns), int(end_ns)]
        if sensor is not None:
            sql += " AND sensor = ?"
            params.append(sensor)
        sql += " ORDER BY start_ns, sensor"
        return [Score(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in self._query(sql, params)]

    def query_score_buckets(self, site: str, machine: str, sensor: str, start_ns: int, end_ns: int,
                            every_s: float) -> list[ScoreBucket]:
        """One sensor's scores in ``[start_ns, end_ns)`` downsampled to buckets of ``every_s``
        seconds (epoch-aligned); empty buckets are omitted.

        Raises:
            ValueError: ``every_s`` rounds to less than 1 ns.
            StoreError: the file cannot be read.
        """
        every_ns = round(every_s * 1e9)
        if every_ns < 1:
            raise ValueError(f"every_s must be positive, got {every_s!r}")
        rows = self._query(
            """
            WITH b AS (
                SELECT start_ns - (((start_ns % :e) + :e) % :e) AS bucket, start_ns, score, threshold, is_anomaly
                FROM anomaly_score
                WHERE site = :site AND machine = :machine AND sensor = :sensor AND start_ns >= :t0 AND start_ns < :t1
            ), r AS (
                SELECT bucket, score, threshold,
                       row_number() OVER (PARTITION BY bucket ORDER BY score DESC, start_ns ASC) AS rn,
                       count(*) OVER (PARTITION BY bucket) AS n,
                       max(is_anomaly) OVER (PARTITION BY bucket) AS anyan
                FROM b
            )
            SELECT bucket, score, threshold, anyan, n FROM r WHERE rn = 1 ORDER BY bucket
            """,
            {"e": every_ns, "site": site, "machine": machine, "sensor": sensor, "t0": int(start_ns), "t1": int(end_ns)},
        )
        return [ScoreBucket(int(r[0]), float(r[1]), r[2], bool(r[3]), int(r[4])) for r in rows]

    def query_alerts(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[Alert]:
        """Alerts of a machine that started in ``[start_ns, end_ns)``, in their latest state,
        sorted by (start, id).

        Raises:
            StoreError: the file cannot be read.
        """
        rows = self._query(
            "SELECT alert_id, site, machine, sensor, state, start_ns, end_ns, peak_score, threshold, model_version, "
            "match_label_id, match_fault_type, match_start_ns, match_similarity "
            "FROM alert WHERE site = ? AND machine = ? AND start_ns >= ? AND start_ns < ? ORDER BY start_ns, alert_id, sensor",
            (site, machine, int(start_ns), int(end_ns)))
        return [Alert(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or None, r[7], r[8], r[9],
                      FaultMatch(r[10], r[11], int(r[12]), float(r[13])) if r[10] is not None else None) for r in rows]

    def query_labels(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[Label]:
        """Labels of a machine whose span starts in ``[start_ns, end_ns)``, sorted by (start, id).

        Raises:
            StoreError: the file cannot be read.
        """
        rows = self._query(
            "SELECT label_id, site, machine, start_ns, end_ns, kind, author, created_ns, sensor, alert_id, fault_type, note "
            "FROM label WHERE site = ? AND machine = ? AND start_ns >= ? AND start_ns < ? ORDER BY start_ns, label_id",
            (site, machine, int(start_ns), int(end_ns)))
        return [Label(id=r[0], site=r[1], machine=r[2], start_ns=r[3], end_ns=r[4], kind=r[5], author=r[6],
                      created_ns=r[7], sensor=r[8], alert_id=r[9], fault_type=r[10], note=r[11]) for r in rows]

    def query_model_events(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[ModelEvent]:
        """Model events of a machine in ``[start_ns, end_ns)``, sorted by (time, event, version).

        Raises:
            StoreError: the file cannot be read.
        """
        rows = self._query(
            "SELECT site, machine, ts_ns, event, version, detail FROM model_event "
            "WHERE site = ? AND machine = ? AND ts_ns >= ? AND ts_ns < ? ORDER BY ts_ns, event, version",
            (site, machine, int(start_ns), int(end_ns)))
        return [ModelEvent(*r) for r in rows]

    def machines(self) -> list[MachineState]:
        """Every machine that has scores or alerts, sorted by (site, machine), with its newest
        score (any sensor; on a tie the first sensor by name) and its number of open alerts
        (alert ids whose latest state is "raised").

        Raises:
            StoreError: the file cannot be read.
        """
        latest = self._query(
            """
            SELECT s.site, s.machine, s.start_ns, s.score, s.threshold, s.model_version
            FROM anomaly_score s
            JOIN (SELECT site, machine, max(start_ns) AS t FROM anomaly_score GROUP BY site, machine) l
              ON s.site = l.site AND s.machine = l.machine AND s.start_ns = l.t
            ORDER BY s.site, s.machine, s.sensor DESC
            """)
        open_alerts = self._query(
            """
            SELECT site, machine, sum(state = 'raised') FROM (
                SELECT site, machine, state,
                       row_number() OVER (PARTITION BY site, machine, alert_id ORDER BY start_ns DESC, sensor) AS rn
                FROM alert)
            WHERE rn = 1 GROUP BY site, machine
            """)
        state: dict[tuple[str, str], list[Any]] = {}
        for site, machine, t, score, thr, mv in latest:  # later rows (smaller sensor name) win
            state[(site, machine)] = [t, score, thr, mv, 0]
        for site, machine, n in open_alerts:
            state.setdefault((site, machine), [None, None, None, None, 0])[4] = int(n or 0)
        return [MachineState(site, machine, v[0], v[1], v[2], v[3], v[4]) for (site, machine), v in sorted(state.items())]

    # -- misc --------------------------------------------------------------------------------
    def server_info(self) -> dict[str, str]:
        """``{"type": "sqlite", "version": <SQLite library version>, "path": <file>}``."""
        return {"type": "sqlite", "version": sqlite3.sqlite_version, "path": str(self.path)}

    def close(self) -> None:
        """Close every connection this store opened (from any thread); idempotent."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for con in conns:
            try:
                con.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
