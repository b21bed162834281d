"""The durable spool: every record goes to a local SQLite queue first, a writer thread drains it.

The pipeline calls :meth:`Spool.put` (scores, alerts, labels, model events); that only appends
to a local SQLite file and never waits for the store. A :class:`SpoolWriter` thread drains the
queue in batches into the configured :class:`~pdm_edge.store.base.Store` (InfluxDB or SQLite).

Decisions:

- **Queue**: one table ``spool(seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT, payload TEXT,
  enqueued_ns INTEGER)``, ``payload`` the record as JSON (:mod:`pdm_edge.store.records`). WAL
  journal with ``synchronous=NORMAL``: a record acknowledged by :meth:`Spool.put` survives a
  crash or ``kill -9`` of the appliance (it is in the WAL file); a power cut may lose the last
  transactions. ``AUTOINCREMENT`` keeps ``seq`` strictly increasing, so "older" is "smaller seq"
  even after the queue was emptied.
- **Draining, in order**: the writer takes the oldest ``batch_size`` rows, writes them grouped
  by kind (in seq order within each kind; the kinds are separate measurements, so their relative
  order does not matter), and deletes them (``seq <= last``) only after the store accepted every
  group. A crash between the store's acceptance and the delete replays the batch, which is
  harmless: every store write is idempotent (timestamps are natural keys). So points arrive
  exactly once as seen by a query, in order, after any outage or restart.
- **Outages**: a :class:`~pdm_edge.errors.StoreError` (unreachable, 5xx, auth, database missing)
  leaves the batch in the spool and the writer waits with exponential back-off, doubling from
  ``backoff_min_s`` to ``backoff_max_s``, then retries the same batch; one success resets it.
- **Poison records never block the spool**: a :class:`~pdm_edge.errors.StoreRejectedError`
  (HTTP 400: the server refuses the points themselves), a ``ValueError`` / ``TypeError`` /
  ``OverflowError`` from the store (a number the store cannot hold, e.g. an integer beyond
  int64 in SQLite) or a row that fails to decode would block the queue forever, so the writer
  bisects the group until the offending records are isolated and moves each one, with its
  reason, to the **dead-letter table** ``spool_deadletter(id, kind, payload, reason,
  rejected_ns)`` in the same transaction that deletes the batch; the rest is written. They are
  counted as ``rejected`` (persisted), logged (rate-limited), and reported by
  :meth:`SpoolWriter.stats` (``rejected``, ``deadletter_depth``, ``last_rejected_age_s``), so
  ``/healthz`` is degraded after a rejection and ``/metrics`` counts them. A record that
  :meth:`Spool.put` refuses (it could never be stored) goes to the same table through
  :meth:`Spool.deadletter`. ``pdm-edge store deadletters`` is not provided; the table is
  plain SQLite (``sqlite3 spool.sqlite 'SELECT * FROM spool_deadletter'``).
- **Bound**: at most ``max_records`` rows. When a ``put`` would exceed it, the **oldest score
  rows** are deleted first (the newest data is the most useful after a long outage) and counted
  as ``dropped`` (persisted in the spool file, reported by :meth:`SpoolWriter.stats`, logged).
  Alerts, labels and model events are never dropped: if the spool holds nothing but those, it
  grows past the bound rather than lose one. A row being written at that moment may be dropped
  and still reach the store; it is counted as dropped all the same.
- **Restart**: the rows are in the file; a new :class:`SpoolWriter` on the same spool resumes
  from the oldest.
- **Stop**: :meth:`SpoolWriter.stop` keeps draining until the spool is empty or the timeout has
  passed (during an outage it waits out the back-off no longer than the timeout), then ends the
  thread; what is left stays on disk for the next start.
- One process owns a spool file (the appliance); ``pdm-edge store check`` only reads its depth
  (:func:`spool_depth`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pdm_edge.config import SpoolConfig
from pdm_edge._util.sqlite import open_wal, tx
from pdm_edge.errors import StoreError, StoreRejectedError
from pdm_edge.store.records import KINDS, from_json, to_json, write_records
from pdm_edge.supervision import RateLimitedLog, StageErrors, run_supervised

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    enqueued_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_by_kind ON spool (kind, seq);
CREATE TABLE IF NOT EXISTS spool_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS spool_deadletter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    reason TEXT NOT NULL,
    rejected_ns INTEGER NOT NULL
);
"""

MAX_DEADLETTER_ROWS = 100_000
"""Bound of the dead-letter table: beyond it the oldest dead letters are deleted (they stay
counted in ``rejected``)."""


@dataclasses.dataclass(frozen=True)
class SpoolRow:
    """One queued record: ``seq`` (order), ``kind``, JSON ``payload``, ``enqueued_ns`` (wall clock)."""

    seq: int
    kind: str
    payload: str
    enqueued_ns: int


class Spool:
    """A durable FIFO of store records in a local SQLite file (WAL).

    Args:
        path: the spool file; its directory is created if missing.
        max_records: the bound (see the module docstring), >= 1.

    Raises:
        StoreError: the file cannot be created or opened.
    """

    def __init__(self, path: str | os.PathLike[str], max_records: int = 5_000_000) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.path = Path(path)
        self.max_records = int(max_records)
        self._lock = threading.Lock()
        self._data = threading.Condition(self._lock)
        try:
            self._con = open_wal(self.path, schema=_SCHEMA)
            self._depth = int(self._con.execute("SELECT count(*) FROM spool").fetchone()[0])
            self._dropped = self._meta("dropped")
            self._rejected = self._meta("rejected")
            self._dl_depth = int(self._con.execute("SELECT count(*) FROM spool_deadletter").fetchone()[0])
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the spool {self.path}: {exc}") from None
        self._closed = False

    def _meta(self, key: str) -> int:
        row = self._con.execute("SELECT value FROM spool_meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _bump_meta(self, key: str, n: int) -> None:
        self._con.execute("INSERT INTO spool_meta (key, value) VALUES (?, ?) "
                          "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value", (key, n))

    # -- producer side ---------------------------------------------------------------------------
    def put(self, kind: str, records: Sequence[Any]) -> int:
        """Append records of one kind; returns how many older score rows the bound dropped.

        Never waits for the store (only for the local file). All records are checked and
        serialised first, so a bad record adds nothing.

        Args:
            kind: ``"score"``, ``"alert"``, ``"label"`` or ``"model_event"``.
            records: records of that kind (:data:`pdm_edge.store.records.KINDS`).

        Raises:
            ValueError, TypeError: a record that no store could take (see :mod:`.records`).
            StoreError: the spool file cannot be written (disk full, closed).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; one of {sorted(KINDS)}")
        payloads = [to_json(kind, r) for r in records]
        if not payloads:
            return 0
        now = time.time_ns()
        dropped = 0
        with self._lock:
            self._check_open()
            with self._write_tx():
                self._con.executemany("INSERT INTO spool (kind, payload, enqueued_ns) VALUES (?, ?, ?)",
                                      [(kind, p, now) for p in payloads])
                excess = self._depth + len(payloads) - self.max_records
                if excess > 0:
                    cur = self._con.execute(
                        "DELETE FROM spool WHERE seq IN (SELECT seq FROM spool WHERE kind = 'score' ORDER BY seq LIMIT ?)",
                        (excess,))
                    dropped = max(cur.rowcount, 0)
                    if dropped:
                        self._bump_meta("dropped", dropped)
            self._depth += len(payloads) - dropped
            self._dropped += dropped
            self._data.notify_all()
        if dropped:
            log.warning("spool %s full (%d records): dropped the %d oldest scores (%d dropped in all)",
                        self.path, self.max_records, dropped, self._dropped)
        return dropped

    # -- consumer side ---------------------------------------------------------------------------
    def peek(self, n: int) -> list[SpoolRow]:
        """The oldest ``n`` rows, in seq order (they stay until :meth:`ack`).

        Raises:
            StoreError: the spool file cannot be read.
        """
        with self._lock:
            self._check_open()
            try:
                rows = self._con.execute("SELECT seq, kind, payload, enqueued_ns FROM spool ORDER BY seq LIMIT ?",
                                         (int(n),)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the spool {self.path}: {exc}") from None
        return [SpoolRow(*r) for r in rows]

    def ack(self, last_seq: int, rejected: Sequence[tuple[SpoolRow, str]] = ()) -> int:
        """Delete every row with ``seq <= last_seq`` (a drained batch); returns how many.

        Args:
            last_seq: the batch's highest seq.
            rejected: the rows of the batch the store refused for good, each with the reason:
                moved to the dead-letter table and counted, in the same transaction.

        Raises:
            StoreError: the spool file cannot be written.
        """
        with self._lock:
            self._check_open()
            dead = 0
            with self._write_tx():
                n = self._con.execute("DELETE FROM spool WHERE seq <= ?", (int(last_seq),)).rowcount
                if rejected:
                    dead = self._insert_deadletters([(r.kind, r.payload, reason[:2000]) for r, reason in rejected])
            self._depth -= max(n, 0)
            self._counted_deadletters(len(rejected), dead)
            return max(n, 0)

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[None]:
        """One write transaction (caller holds the lock). Whatever fails, COMMIT included (a full
        disk fails at COMMIT), is rolled back, so a failed write never lands later with the next
        one; sqlite errors become :class:`StoreError`."""
        try:
            with tx(self._con):
                yield
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the spool {self.path}: {exc}") from None

    def _counted_deadletters(self, added: int, deleted: int) -> None:
        self._rejected += added
        self._dl_depth += added - deleted

    def _insert_deadletters(self, rows: Sequence[tuple[str, str, str]]) -> int:
        """Inside a transaction: add dead letters ``(kind, payload, reason)`` and count them in
        the file; returns how many old ones the bound deleted (the caller updates the in-memory
        counters with :meth:`_counted_deadletters` after the commit)."""
        now = time.time_ns()
        self._con.executemany("INSERT INTO spool_deadletter (kind, payload, reason, rejected_ns) VALUES (?, ?, ?, ?)",
                              [(k, p, r, now) for k, p, r in rows])
        self._bump_meta("rejected", len(rows))
        excess = self._dl_depth + len(rows) - MAX_DEADLETTER_ROWS
        if excess > 0:
            self._con.execute("DELETE FROM spool_deadletter WHERE id IN (SELECT id FROM spool_deadletter ORDER BY id LIMIT ?)",
                              (excess,))
            return excess
        return 0

    def deadletter(self, kind: str, payload: str, reason: str) -> None:
        """Put a record that can never be stored (``payload``: its JSON or ``repr``) in the
        dead-letter table with ``reason``, and count it as rejected.

        Raises:
            StoreError: the spool file cannot be written.
        """
        with self._lock:
            self._check_open()
            with self._write_tx():
                dead = self._insert_deadletters([(str(kind)[:64], str(payload)[:100_000], str(reason)[:2000])])
            self._counted_deadletters(1, dead)

    def deadletters(self, limit: int = 100) -> list[tuple[str, str, str, int]]:
        """The newest dead letters, newest first: ``(kind, payload, reason, rejected_ns)``.

        Raises:
            StoreError: the spool file cannot be read.
        """
        with self._lock:
            self._check_open()
            try:
                rows = self._con.execute("SELECT kind, payload, reason, rejected_ns FROM spool_deadletter "
                                         "ORDER BY id DESC LIMIT ?", (int(limit),)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the spool {self.path}: {exc}") from None
        return [(str(k), str(p), str(r), int(t)) for k, p, r, t in rows]

    def deadletter_depth(self) -> int:
        """Rows in the dead-letter table."""
        with self._lock:
            return self._dl_depth

    def wait_for_data(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the spool is not empty; True if it is not."""
        with self._data:
            if self._depth == 0:
                self._data.wait(timeout)
            return self._depth > 0

    def wake(self) -> None:
        """Wake a writer blocked in :meth:`wait_for_data` (used by :meth:`SpoolWriter.stop`)."""
        with self._data:
            self._data.notify_all()

    # -- state -----------------------------------------------------------------------------------
    def depth(self) -> int:
        """Rows waiting in the spool."""
        with self._lock:
            return self._depth

    @property
    def dropped(self) -> int:
        """Score rows dropped by the bound, over the spool file's life."""
        with self._lock:
            return self._dropped

    @property
    def rejected(self) -> int:
        """Rows the store refused for good (see the module docstring), over the file's life."""
        with self._lock:
            return self._rejected

    def oldest_enqueued_ns(self) -> int | None:
        """Wall-clock time (ns) at which the oldest waiting row was put, ``None`` when empty."""
        with self._lock:
            self._check_open()
            try:
                row = self._con.execute("SELECT enqueued_ns FROM spool ORDER BY seq LIMIT 1").fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the spool {self.path}: {exc}") from None
        return int(row[0]) if row else None

    def count_by_kind(self) -> dict[str, int]:
        """Rows waiting per kind."""
        with self._lock:
            self._check_open()
            rows = self._con.execute("SELECT kind, count(*) FROM spool GROUP BY kind").fetchall()
        return {k: int(n) for k, n in rows}

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the spool {self.path} is closed")

    def close(self) -> None:
        """Close the file (idempotent); the rows stay for the next open."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._con.close()
            self._data.notify_all()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spool_depth(path: str | os.PathLike[str]) -> tuple[int, int | None]:
    """``(rows waiting, oldest enqueue time in ns or None)`` of a spool file, read-only (for
    ``pdm-edge store check`` while the appliance owns the spool).

    Raises:
        StoreError: the file is missing or is not a spool.
    """
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"no spool at {p}")
    try:
        con = open_wal(p, readonly=True, timeout_s=5.0)
        try:
            n = int(con.execute("SELECT count(*) FROM spool").fetchone()[0])
            row = con.execute("SELECT enqueued_ns FROM spool ORDER BY seq LIMIT 1").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the spool {p}: {exc}") from None
    return n, (int(row[0]) if row else None)


@dataclasses.dataclass(frozen=True)
class SpoolStats:
    """Health of the spool and its writer (for the health view and ``store check``).

    Attributes:
        depth: rows waiting in the spool.
        oldest_age_s: age of the oldest waiting row, seconds (``None`` when empty).
        drained: rows written to the store since this writer started.
        drain_rate: rows/s written over the last ``rate_window_s`` seconds (10 s).
        dropped: score rows dropped by the bound (over the spool file's life).
        rejected: rows the store refused for good (over the spool file's life), all of them
            moved to the dead-letter table.
        deadletter_depth: rows in the dead-letter table now.
        last_rejected_age_s: seconds since this writer last dead-lettered a row (``None``
            if it has not).
        last_rejected: the reason of that rejection.
        state: ``"idle"`` (empty, connected), ``"draining"``, ``"backoff"`` (store failing,
            waiting to retry), ``"stopped"``.
        connected: whether the last store write succeeded (``None`` before the first one).
        backoff_s: the current back-off wait, seconds (0 when not backing off).
        last_error: the last store error's message (``None`` if none since start).
        last_error_age_s: seconds since that error.
        failures: consecutive failed attempts (0 when connected).
    """

    depth: int
    oldest_age_s: float | None
    drained: int
    drain_rate: float
    dropped: int
    rejected: int
    state: str
    connected: bool | None
    backoff_s: float
    last_error: str | None
    last_error_age_s: float | None
    failures: int
    deadletter_depth: int = 0
    last_rejected_age_s: float | None = None
    last_rejected: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stats as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


class SpoolWriter:
    """The thread that drains a :class:`Spool` into a store (see the module docstring).

    Args:
        spool: the spool to drain.
        store: the destination (any :class:`~pdm_edge.store.base.Store`).
        cfg: ``[spool]`` settings: ``batch_size``, ``backoff_min_s``, ``backoff_max_s``
            (``max_records`` and ``path`` belong to the :class:`Spool`).
        rate_window_s: the window of :attr:`SpoolStats.drain_rate`, seconds.
    """

    def __init__(self, spool: Spool, store: Any, cfg: SpoolConfig | None = None, *, rate_window_s: float = 10.0) -> None:
        cfg = cfg or SpoolConfig()
        self.spool = spool
        self.store = store
        self.batch_size = int(cfg.batch_size)
        self.backoff_min_s = float(cfg.backoff_min_s)
        self.backoff_max_s = max(float(cfg.backoff_max_s), self.backoff_min_s)
        self.rate_window_s = float(rate_window_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._drained = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._started_at = time.monotonic()
        self._state = "stopped"
        self._connected: bool | None = None
        self._backoff_s = 0.0
        self._failures = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_rejected: str | None = None
        self._last_rejected_at: float | None = None
        self.errors = StageErrors(log)
        """Unexpected errors of the writer loop (stage ``spool-writer``)."""
        self._log_limited = RateLimitedLog(log, 60.0)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> SpoolWriter:
        """Start the writer thread (once); returns self."""
        if self._thread is not None:
            raise RuntimeError("SpoolWriter already started")
        self._started_at = time.monotonic()
        self._state = "idle"
        self._thread = threading.Thread(
            target=lambda: run_supervised("spool-writer", self._run, self.errors, stopped=self._stopping_done),
            name="spool-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Drain what can be drained within ``timeout`` seconds, then stop the thread.

        Returns:
            True if the spool was empty when the writer stopped.
        """
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._stop.set()
        self.spool.wake()
        if self._thread is not None:
            self._thread.join(max(0.0, timeout) + 5.0)
        with self._lock:
            self._state = "stopped"
        return self.spool.depth() == 0

    def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every row has been drained; True if so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.spool.depth() == 0:
                return True
            time.sleep(0.02)
        return self.spool.depth() == 0

    @property
    def running(self) -> bool:
        """Whether the writer thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # -- the loop --------------------------------------------------------------------------------
    def _stopping_done(self) -> bool:
        return self._stop.is_set() and (time.monotonic() >= self._deadline or self.spool.depth() == 0)

    def _run(self) -> None:
        delay = self.backoff_min_s
        while not self._stopping_done():
            try:
                rows = self.spool.peek(self.batch_size)
            except StoreError as exc:  # the spool file itself failed: report and retry slowly
                self._failed(exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            if not rows:
                with self._lock:
                    self._state = "idle"
                if self._stop.is_set():
                    break
                self.spool.wait_for_data(0.5)
                continue
            with self._lock:
                if self._state != "backoff":
                    self._state = "draining"
            try:
                rejected = self._write_batch(rows)
                self.spool.ack(rows[-1].seq, rejected)
            except StoreError as exc:
                self._failed(exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            except Exception as exc:  # a bug must not kill the writer silently; back off and retry
                self.errors.record("spool-writer", exc)
                self._failed(exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            delay = self.backoff_min_s
            now = time.monotonic()
            with self._lock:
                if self._connected is False:
                    log.info("spool writer: store is back (%s), draining %d waiting records",
                             getattr(self.store, "kind", "store"), self.spool.depth())
                self._connected = True
                self._failures = 0
                self._backoff_s = 0.0
                self._state = "draining"
                self._drained += len(rows)
                self._recent.append((now, len(rows)))
                while self._recent and self._recent[0][0] < now - self.rate_window_s:
                    self._recent.popleft()

    def _sleep(self, delay: float) -> None:
        """Back-off wait; stop() cuts it short, and after stop() it never passes the deadline."""
        if self._stop.is_set():
            time.sleep(min(delay, max(0.0, self._deadline - time.monotonic())))
        else:
            self._stop.wait(delay)

    def _failed(self, exc: BaseException, delay: float) -> None:
        msg = str(exc) or type(exc).__name__
        with self._lock:
            first = self._connected is not False or self._last_error != msg
            self._connected = False
            self._failures += 1
            self._backoff_s = delay
            self._state = "backoff"
            self._last_error = msg
            self._last_error_at = time.monotonic()
        if first:
            log.warning("spool writer: %s; keeping %d records in the spool, retrying with back-off", msg, self.spool.depth())

    def _write_batch(self, rows: Sequence[SpoolRow]) -> list[tuple[SpoolRow, str]]:
        """Write one batch grouped by kind (seq order kept within a kind); returns the rows
        refused for good, each with its reason. Raises StoreError for anything worth retrying."""
        groups: dict[str, list[tuple[SpoolRow, Any]]] = {}
        rejected: list[tuple[SpoolRow, str]] = []
        for row in rows:
            try:
                groups.setdefault(row.kind, []).append((row, from_json(row.kind, row.payload)))
            except (ValueError, TypeError) as exc:
                rejected.append((row, self._note_rejected(row, f"cannot be decoded: {exc}")))
        for kind, items in groups.items():
            rejected += self._write_group(kind, items)
        return rejected

    def _write_group(self, kind: str, items: list[tuple[SpoolRow, Any]]) -> list[tuple[SpoolRow, str]]:
        try:
            write_records(self.store, kind, [rec for _, rec in items])
            return []
        except (StoreRejectedError, ValueError, TypeError, OverflowError) as exc:
            if len(items) == 1:
                return [(items[0][0], self._note_rejected(items[0][0], f"{type(exc).__name__}: {exc}"))]
        mid = len(items) // 2
        return self._write_group(kind, items[:mid]) + self._write_group(kind, items[mid:])

    def _note_rejected(self, row: SpoolRow, reason: str) -> str:
        reason = reason[:1000]
        self._log_limited.log(logging.ERROR, "rejected", "event=spool_rejected kind=%s seq=%d reason=%r "
                              "(moved to the dead-letter table)", row.kind, row.seq, reason)
        with self._lock:
            self._last_rejected = reason
            self._last_rejected_at = time.monotonic()
        return reason

    # -- health ----------------------------------------------------------------------------------
    def stats(self) -> SpoolStats:
        """A snapshot of the spool's and the writer's health."""
        try:
            oldest = self.spool.oldest_enqueued_ns()
        except StoreError:  # closed or unreadable spool: no age to report
            oldest = None
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.rate_window_s:
                self._recent.popleft()
            span = min(self.rate_window_s, max(now - self._started_at, 1e-3))
            rate = sum(n for _, n in self._recent) / span
            return SpoolStats(
                depth=self.spool.depth(),
                oldest_age_s=None if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9),
                drained=self._drained,
                drain_rate=rate,
                dropped=self.spool.dropped,
                rejected=self.spool.rejected,
                state=self._state if self.running or self._state == "stopped" else "stopped",
                connected=self._connected,
                backoff_s=self._backoff_s,
                last_error=self._last_error,
                last_error_age_s=None if self._last_error_at is None else now - self._last_error_at,
                failures=self._failures,
                deadletter_depth=self.spool.deadletter_depth(),
                last_rejected_age_s=None if self._last_rejected_at is None else now - self._last_rejected_at,
                last_rejected=self._last_rejected,
            )
