"""The raw windows that labels cover, kept on the device so that they can be trained on.

Two stores:

- :class:`RecentWindows`, in memory: a ring of the newest windows of every stream, so that a
  label given shortly after the fact (an answer to an alert, an automated label) can still
  capture the windows it covers (:meth:`RecentWindows.capture`).
- :class:`LabelledWindowBuffer`, on disk (SQLite, WAL): the windows of labelled spans, as
  float32 BLOBs with their metadata (stream, sensor kind, start, sample rate, unit), linked to
  the labels that cover them; bounded in bytes and age. It also *holds* unlabelled windows that
  may receive a label later (an alert's span, which a technician may call a false alarm hours
  afterwards, long after the ring has moved on): :meth:`LabelledWindowBuffer.hold`, then
  :meth:`LabelledWindowBuffer.adopt` when the label arrives.

Decisions:

- **Which windows a label covers** (:func:`covers`): same site and machine, the label's sensor
  if it names one (every sensor of the machine otherwise), and the window overlaps the span by
  at least half of the window's length, or contains the whole span (a label shorter than a
  window). Half-overlap keeps a ``normal`` label from pulling in windows that are mostly outside
  its span (say, the fault right after it) while a window split evenly by the span's edge
  still counts.
- **Ring horizon** (:class:`RecentWindows`): per stream, windows ending within ``max_seconds``
  of stream time (the sample clock) of the stream's newest window, and at most
  ``max_bytes_per_stream`` bytes of samples (older windows go first). The default
  (``[feedback] recent_s = 30`` s, 8 MiB) keeps half a minute of a 25.6 kHz stream cut into
  1 s windows every 0.5 s (205 kB of samples a second, about 6 MiB per stream; 120 s made a
  16-channel appliance grow by about 380 MB in ``benchmarks/e2e_latency.py``), of which
  overlapping windows hold each sample once (about 3 MiB per stream with the 50 % hop). A label
  arriving later than that finds only what was stored or held in the buffer. Windows are
  shared, not copied (their samples are read-only). A stream whose clock goes backwards (a replay restarted with original
  timestamps) starts a new ring.
- **Retention classes** of a stored window, from the labels that cover it (the highest wins):
  ``held`` (0, no label yet) < ``ignore`` (1) < ``normal`` (2) < ``fault`` (3). A window
  stored for two labels is stored once, linked to both.
- **Byte bound** (``buffer_max_bytes``, 256 MiB by default, counting samples only): when an
  addition takes the buffer above it, windows are evicted lowest class first (held, then
  ``ignore`` -- not representative, kept only for audit --, then ``normal``, and ``fault`` last:
  confirmed faults are rare, are what the adapter learns to push away from normal and what
  the gate checks a candidate against), oldest window start first within a class. The window
  just added can itself be the one evicted (a buffer full of fault windows refuses an
  ``ignore`` window). Evictions are counted per class.
- **Age bound**: ``normal`` and ``ignore`` windows are dropped ``buffer_max_age_s`` (30 days)
  after they were stored, held windows after ``buffer_hold_max_age_s`` (7 days); ``fault``
  windows never age out (only the byte bound evicts them). Age is measured from when the
  window was stored (wall clock), so replayed recordings with old timestamps are not dropped at
  once. Expiry runs on additions (at most once a minute) and on :meth:`LabelledWindowBuffer.expire`.
- One process (the appliance) writes the buffer; ``synchronous=NORMAL``: a power cut may lose
  the last windows, never corrupt the file.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdm_edge._util.sqlite import open_wal, tx
from pdm_edge.errors import StoreError
from pdm_edge.types import Label, Window

CLASSES: tuple[str, ...] = ("held", "ignore", "normal", "fault")
"""Retention classes, lowest (evicted first) to highest."""
_CLASS_OF_KIND = {"ignore": 1, "normal": 2, "fault": 3}
_EXPIRE_EVERY_S = 60.0


def span_covers(site: str, machine: str, sensor: str | None, start_ns: int, end_ns: int, window: Window) -> bool:
    """Whether the span ``[start_ns, end_ns)`` of ``site/machine`` (one ``sensor``, or every sensor
    when ``None``) covers ``window`` (see the module docstring: half-overlap, or the window holds
    the whole span)."""
    if window.site != site or window.machine != machine or (sensor is not None and window.sensor != sensor):
        return False
    return _times_cover(start_ns, end_ns, window.start_ns, window.end_ns)


def _times_cover(start_ns: int, end_ns: int, w_start: int, w_end: int) -> bool:
    overlap = min(end_ns, w_end) - max(start_ns, w_start)
    if overlap <= 0:
        return False
    return 2 * overlap >= w_end - w_start or overlap >= end_ns - start_ns


def covers(label: Label, window: Window) -> bool:
    """Whether ``label`` covers ``window`` (:func:`span_covers` with the label's span)."""
    return span_covers(label.site, label.machine, label.sensor, label.start_ns, label.end_ns, window)


# -- in memory -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class _Overlap:
    """A remembered window whose samples are a slice of its two non-overlapping neighbours in
    the ring (``left`` ends where ``right`` starts): the window's fields without its samples
    (which are freed). :meth:`window` rebuilds it, equal to the original."""

    site: str
    machine: str
    sensor: str
    kind: str
    start_ns: int
    sample_rate_hz: float
    unit: str
    index: int
    n_samples: int
    left: Window
    right: Window
    offset: int

    @classmethod
    def of(cls, w: Window, left: Window, right: Window, offset: int) -> _Overlap:
        return cls(w.site, w.machine, w.sensor, w.kind, w.start_ns, w.sample_rate_hz, w.unit, w.index, w.n_samples,
                   left, right, offset)

    @property
    def end_ns(self) -> int:
        return self.start_ns + round(self.n_samples * 1e9 / self.sample_rate_hz)  # as Window.end_ns

    def window(self) -> Window:
        samples = np.concatenate([self.left.samples, self.right.samples])[self.offset:self.offset + self.n_samples]
        return Window(self.site, self.machine, self.sensor, self.kind, self.start_ns,  # type: ignore[arg-type]
                      self.sample_rate_hz, self.unit, samples, self.index)  # type: ignore[arg-type]


class RecentWindows:
    """The newest windows of every stream, in memory (see the module docstring for the horizon).

    Overlapping windows (a hop shorter than the window) hold each sample once: a window that
    lies between two remembered windows which do not overlap each other, the later starting
    where the earlier ends, is kept as a slice of them (checked sample for sample before its own
    copy is dropped) and rebuilt on capture. With the usual 50 % hop this halves the ring's
    memory; every captured window equals the one that was added.

    Thread-safe.

    Args:
        max_seconds: horizon per stream, seconds of stream time (> 0).
        max_bytes_per_stream: bound of the samples kept per stream, bytes (``None``: no bound
            beyond the horizon).
    """

    def __init__(self, max_seconds: float, max_bytes_per_stream: int | None = None) -> None:
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        self.horizon_ns = round(max_seconds * 1e9)
        self.max_bytes_per_stream = max_bytes_per_stream
        self._lock = threading.Lock()
        self._streams: dict[str, collections.deque[Window | _Overlap]] = {}
        self._bytes: dict[str, int] = {}
        self._anchor: dict[str, Window] = {}  # the newest window that does not overlap the one before
        self._between: dict[str, list[Window]] = {}  # windows since the anchor, overlapping it

    def add(self, window: Window) -> None:
        """Remember a window (the scoring stage calls this for every window)."""
        name = window.stream
        with self._lock:
            ring = self._streams.get(name)
            if ring is None or (ring and window.start_ns < ring[-1].start_ns):
                ring = self._streams[name] = collections.deque()
                self._bytes[name] = 0
                self._anchor.pop(name, None)
                self._between[name] = []
            ring.append(window)
            self._bytes[name] += window.samples.nbytes
            anchor = self._anchor.get(name)
            if anchor is None or window.start_ns > anchor.end_ns or window.sample_rate_hz != anchor.sample_rate_hz:
                self._anchor[name], self._between[name] = window, []  # a gap: nothing to share with
            elif window.start_ns == anchor.end_ns:
                self._share(name, ring, anchor, window)
                self._anchor[name], self._between[name] = window, []
            else:
                self._between[name].append(window)
            newest_end = window.end_ns
            while len(ring) > 1 and (ring[0].end_ns <= newest_end - self.horizon_ns or (
                    self.max_bytes_per_stream is not None and self._bytes[name] > self.max_bytes_per_stream)):
                old = ring.popleft()
                if isinstance(old, Window):
                    self._bytes[name] -= old.samples.nbytes

    def _share(self, name: str, ring: collections.deque[Window | _Overlap], left: Window, right: Window) -> None:
        """Replace the windows between ``left`` and ``right`` (which starts where ``left`` ends) by
        slices of them, where their samples are exactly those."""
        both = np.concatenate([left.samples, right.samples])
        fs = left.sample_rate_hz
        for w in self._between.get(name, []):
            offset = (w.start_ns - left.start_ns) * fs / 1e9
            k = round(offset)
            if abs(offset - k) > 1e-6 or k + w.n_samples > len(both) or not np.array_equal(both[k:k + w.n_samples], w.samples):
                continue
            for i in range(len(ring) - 1, -1, -1):
                if ring[i] is w:
                    ring[i] = _Overlap.of(w, left, right, k)
                    self._bytes[name] -= w.samples.nbytes
                    break

    def capture_span(self, site: str, machine: str, sensor: str | None, start_ns: int, end_ns: int) -> list[Window]:
        """The remembered windows that the span covers (:func:`span_covers`), by stream and time."""
        prefix = f"{site}/{machine}/"
        with self._lock:
            rings = [(k, list(v)) for k, v in self._streams.items()
                     if k.startswith(prefix) and (sensor is None or k == prefix + sensor)]
        return [w.window() if isinstance(w, _Overlap) else w for _, ring in sorted(rings, key=lambda kv: kv[0]) for w in ring
                if span_covers(site, machine, sensor, start_ns, end_ns, w)]  # type: ignore[arg-type]

    def capture(self, label: Label) -> list[Window]:
        """The remembered windows that ``label`` covers, sorted by stream and start time."""
        return self.capture_span(label.site, label.machine, label.sensor, label.start_ns, label.end_ns)

    def stats(self) -> dict[str, int]:
        """``{"streams", "windows", "bytes"}`` held in memory (bytes of samples, each held once)."""
        with self._lock:
            return {"streams": len(self._streams), "windows": sum(len(r) for r in self._streams.values()),
                    "bytes": sum(self._bytes.values())}


# -- on disk ---------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS window (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    machine TEXT NOT NULL,
    sensor TEXT NOT NULL,
    kind TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    sample_rate_hz REAL NOT NULL,
    unit TEXT NOT NULL,
    idx INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    samples BLOB NOT NULL,
    klass INTEGER NOT NULL,
    added_ns INTEGER NOT NULL,
    UNIQUE (site, machine, sensor, start_ns)
);
CREATE INDEX IF NOT EXISTS window_evict ON window (klass, start_ns, id);
CREATE INDEX IF NOT EXISTS window_added ON window (klass, added_ns);
CREATE INDEX IF NOT EXISTS window_time ON window (site, machine, start_ns);
CREATE TABLE IF NOT EXISTS window_label (
    label_id TEXT NOT NULL,
    window_id INTEGER NOT NULL REFERENCES window (id) ON DELETE CASCADE,
    PRIMARY KEY (label_id, window_id)
);
CREATE INDEX IF NOT EXISTS window_label_by_window ON window_label (window_id);
CREATE TABLE IF NOT EXISTS buffer_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_WINDOW_COLUMNS = "site, machine, sensor, kind, start_ns, sample_rate_hz, unit, samples, idx"


@dataclasses.dataclass(frozen=True)
class BufferStats:
    """What the labelled-window buffer holds.

    Attributes:
        windows, bytes: stored windows and their sample bytes.
        max_bytes: the bound.
        labels: labels with at least one stored window.
        by_class: ``{class: {"windows": n, "bytes": b}}`` for ``held``, ``ignore``, ``normal``,
            ``fault``.
        evicted: windows evicted by the byte bound per class, over the file's life.
        expired: windows dropped by the age bound per class, over the file's life.
    """

    windows: int
    bytes: int
    max_bytes: int
    labels: int
    by_class: Mapping[str, Mapping[str, int]]
    evicted: Mapping[str, int]
    expired: Mapping[str, int]


class LabelledWindowBuffer:
    """Raw windows of labelled spans, bounded, on disk (see the module docstring).

    Thread-safe.

    Args:
        path: the buffer file (``{state_dir}/label_windows.sqlite``); its folder is created.
        max_bytes: bound of the stored samples, bytes.
        max_age_s: age after which ``normal`` / ``ignore`` windows are dropped, seconds.
        hold_max_age_s: age after which held (unlabelled) windows are dropped, seconds.
        clock_ns: wall clock for ages (ns since the epoch); ``time.time_ns`` by default.
        readonly: open an existing buffer for reading only (the dashboard, in another process);
            every write then raises ``StoreError``.

    Raises:
        StoreError: the file cannot be created or opened (read-only: does not exist).
    """

    FILENAME = "label_windows.sqlite"

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 256 * 1024 * 1024,
                 max_age_s: float = 30 * 24 * 3600.0, hold_max_age_s: float = 7 * 24 * 3600.0,
                 clock_ns: Any = time.time_ns, readonly: bool = False) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.max_age_ns = round(max_age_s * 1e9)
        self.hold_max_age_ns = round(hold_max_age_s * 1e9)
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._last_expire = -float("inf")
        try:
            if readonly:
                self._con = open_wal(self.path, readonly=True, timeout_s=5.0)
                self._con.execute("SELECT 1 FROM window LIMIT 1")
            else:
                self._con = open_wal(self.path, foreign_keys=True, schema=_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the labelled-window buffer {self.path}: {exc}") from None
        self._closed = False

    @classmethod
    def in_dir(cls, state_dir: str | os.PathLike[str], **kwargs: Any) -> LabelledWindowBuffer:
        """The buffer of a state directory (``{state_dir}/label_windows.sqlite``)."""
        return cls(Path(state_dir) / cls.FILENAME, **kwargs)

    # -- transactions ----------------------------------------------------------------------------
    def _tx(self, what: str, fn: Any) -> Any:
        with self._lock:
            if self._closed:
                raise StoreError(f"the labelled-window buffer {self.path} is closed")
            try:
                with tx(self._con, write=what == "write"):
                    return fn(self._con)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot {what} the labelled-window buffer {self.path}: {exc}") from None

    @staticmethod
    def _bump(con: sqlite3.Connection, key: str, n: int) -> None:
        if n:
            con.execute("INSERT INTO buffer_meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value", (key, int(n)))

    @staticmethod
    def _meta(con: sqlite3.Connection, key: str) -> int:
        row = con.execute("SELECT value FROM buffer_meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _store(self, con: sqlite3.Connection, window: Window, klass: int) -> int:
        """Insert ``window`` (or find it); raise its class to at least ``klass``; its row id."""
        row = con.execute("SELECT id, klass FROM window WHERE site = ? AND machine = ? AND sensor = ? AND start_ns = ?",
                          (window.site, window.machine, window.sensor, int(window.start_ns))).fetchone()
        if row is not None:
            if klass > row[1]:
                con.execute("UPDATE window SET klass = ? WHERE id = ?", (klass, row[0]))
            return int(row[0])
        blob = np.ascontiguousarray(window.samples, dtype="<f4").tobytes()
        cur = con.execute(
            "INSERT INTO window (site, machine, sensor, kind, start_ns, end_ns, sample_rate_hz, unit, idx, n_samples, nbytes, "
            "samples, klass, added_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (window.site, window.machine, window.sensor, window.kind, int(window.start_ns), int(window.end_ns),
             float(window.sample_rate_hz), window.unit, int(window.index), window.n_samples, len(blob), blob, klass,
             int(self._clock_ns())))
        self._bump(con, "bytes", len(blob))
        return int(cur.lastrowid)

    def _delete(self, con: sqlite3.Connection, where: str, args: Sequence[Any], counter: str) -> int:
        rows = con.execute(f"SELECT klass, count(*), coalesce(sum(nbytes), 0) FROM window WHERE {where} GROUP BY klass", args).fetchall()
        if not rows:
            return 0
        con.execute(f"DELETE FROM window WHERE {where}", args)
        for klass, n, nbytes in rows:
            self._bump(con, f"{counter}:{CLASSES[klass]}", n)
            self._bump(con, "bytes", -int(nbytes))
        return sum(int(r[1]) for r in rows)

    def _expire(self, con: sqlite3.Connection, now_ns: int) -> int:
        n = self._delete(con, "klass = 0 AND added_ns < ?", (now_ns - self.hold_max_age_ns,), "expired")
        n += self._delete(con, "klass IN (1, 2) AND added_ns < ?", (now_ns - self.max_age_ns,), "expired")
        return n

    def _evict(self, con: sqlite3.Connection) -> int:
        over = self._meta(con, "bytes") - self.max_bytes
        n = 0
        while over > 0:
            victims = con.execute("SELECT id, nbytes FROM window ORDER BY klass, start_ns, id LIMIT 256").fetchall()
            if not victims:
                break
            ids = []
            for vid, nbytes in victims:
                ids.append(vid)
                over -= nbytes
                if over <= 0:
                    break
            marks = ",".join("?" * len(ids))
            n += self._delete(con, f"id IN ({marks})", ids, "evicted")
        return n

    def _after_add(self, con: sqlite3.Connection) -> None:
        now = time.monotonic()
        if now - self._last_expire >= _EXPIRE_EVERY_S:
            self._last_expire = now
            self._expire(con, int(self._clock_ns()))
        self._evict(con)

    @staticmethod
    def _exists(con: sqlite3.Connection, wid: int) -> bool:
        return con.execute("SELECT 1 FROM window WHERE id = ?", (wid,)).fetchone() is not None

    # -- public API ------------------------------------------------------------------------------
    def add(self, label: Label, window: Window) -> bool:
        """Store ``window`` as covered by ``label`` (once, however often it is added).

        Returns:
            True if the window is in the buffer afterwards (False: the byte bound evicted it at
            once, the buffer being full of windows of higher classes).

        Raises:
            ValueError: ``label`` does not cover ``window`` (:func:`covers`).
            StoreError: the file cannot be written.
        """
        if not covers(label, window):
            raise ValueError(f"label {label.id} does not cover the window of {window.stream} at {window.start_ns}")
        return self._link([label], window) > 0

    def offer(self, window: Window, labels: Iterable[Label]) -> int:
        """Store ``window`` for those of ``labels`` that cover it; the number of labels it was
        linked to (0 when none covers it, or when it was evicted at once)."""
        covering = [lb for lb in labels if covers(lb, window)]
        return self._link(covering, window) if covering else 0

    def _link(self, labels: Sequence[Label], window: Window) -> int:
        klass = max(_CLASS_OF_KIND[lb.kind] for lb in labels)

        def tx(con: sqlite3.Connection) -> int:
            wid = self._store(con, window, klass)
            con.executemany("INSERT OR IGNORE INTO window_label (label_id, window_id) VALUES (?, ?)",
                            [(lb.id, wid) for lb in labels])
            self._after_add(con)
            return len(labels) if self._exists(con, wid) else 0

        return int(self._tx("write", tx))

    def hold(self, window: Window) -> bool:
        """Keep an unlabelled window that may receive a label later (e.g. one of an alert's span);
        it is the first to go (class ``held``) and ages out after ``hold_max_age_s``. True if it
        is in the buffer afterwards."""
        def tx(con: sqlite3.Connection) -> bool:
            wid = self._store(con, window, 0)
            self._after_add(con)
            return self._exists(con, wid)

        return bool(self._tx("write", tx))

    def adopt(self, label: Label) -> int:
        """Link ``label`` to every stored window it covers (held windows, or windows stored for
        other labels) and raise their class; returns how many windows it is linked to now."""
        def tx(con: sqlite3.Connection) -> int:
            args: list[Any] = [label.site, label.machine, int(label.end_ns), int(label.start_ns)]
            sql = ("SELECT id, start_ns, end_ns FROM window WHERE site = ? AND machine = ? AND start_ns < ? AND end_ns > ?"
                   + (" AND sensor = ?" if label.sensor is not None else ""))
            if label.sensor is not None:
                args.append(label.sensor)
            ids = [int(r[0]) for r in con.execute(sql, args).fetchall()
                   if _times_cover(label.start_ns, label.end_ns, int(r[1]), int(r[2]))]
            klass = _CLASS_OF_KIND[label.kind]
            for wid in ids:
                con.execute("UPDATE window SET klass = max(klass, ?) WHERE id = ?", (klass, wid))
            con.executemany("INSERT OR IGNORE INTO window_label (label_id, window_id) VALUES (?, ?)", [(label.id, w) for w in ids])
            return len(ids)

        return int(self._tx("write", tx))

    def windows_for(self, label_id: str) -> list[Window]:
        """The stored windows of a label, sorted by sensor and start time."""
        def tx(con: sqlite3.Connection) -> list[Window]:
            rows = con.execute(
                f"SELECT {_WINDOW_COLUMNS} FROM window JOIN window_label ON window_label.window_id = window.id "
                "WHERE window_label.label_id = ? ORDER BY sensor, start_ns", (label_id,)).fetchall()
            return [_row_window(r) for r in rows]

        return self._tx("read", tx)

    def label_ids(self) -> list[str]:
        """Labels with at least one stored window."""
        return self._tx("read", lambda con: [r[0] for r in con.execute(
            "SELECT DISTINCT label_id FROM window_label ORDER BY label_id").fetchall()])

    def expire(self) -> int:
        """Drop the windows past their age bound now; returns how many."""
        return int(self._tx("write", lambda con: self._expire(con, int(self._clock_ns()))))

    def windows_between(self, site: str, machine: str, sensor: str | None, start_ns: int, end_ns: int,
                        limit: int = 64) -> list[Window]:
        """Stored windows (any class) of a machine (one sensor, or all when ``None``) that overlap
        ``[start_ns, end_ns)``, sorted by (sensor, start); at most ``limit``, evenly spread over
        the span when there are more."""
        def tx(con: sqlite3.Connection) -> list[Window]:
            sql = "SELECT id FROM window WHERE site = ? AND machine = ? AND start_ns < ? AND end_ns > ?"
            args: list[Any] = [site, machine, int(end_ns), int(start_ns)]
            if sensor is not None:
                sql += " AND sensor = ?"
                args.append(sensor)
            ids = [r[0] for r in con.execute(sql + " ORDER BY sensor, start_ns", args)]
            if len(ids) > limit:
                ids = [ids[i] for i in np.linspace(0, len(ids) - 1, limit).round().astype(int)]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = con.execute(f"SELECT {_WINDOW_COLUMNS} FROM window WHERE id IN ({marks}) ORDER BY sensor, start_ns", ids)
            return [_row_window(r) for r in rows]

        return self._tx("read", tx)

    def normal_windows(self, site: str, machine: str, sensor: str, limit: int = 64,
                       before_ns: int | None = None) -> list[Window]:
        """A stream's windows whose strongest label is ``normal`` (the reference for a baseline
        spectrum), newest first, at most ``limit``, only those starting before ``before_ns``
        when given."""
        def tx(con: sqlite3.Connection) -> list[Window]:
            sql = f"SELECT {_WINDOW_COLUMNS} FROM window WHERE site = ? AND machine = ? AND sensor = ? AND klass = ?"
            args: list[Any] = [site, machine, sensor, CLASSES.index("normal")]
            if before_ns is not None:
                sql += " AND start_ns < ?"
                args.append(int(before_ns))
            return [_row_window(r) for r in con.execute(sql + " ORDER BY start_ns DESC LIMIT ?", [*args, int(limit)])]

        return self._tx("read", tx)

    def stats(self) -> BufferStats:
        """A consistent snapshot of what the buffer holds and has dropped."""
        def tx(con: sqlite3.Connection) -> BufferStats:
            by = {c: {"windows": 0, "bytes": 0} for c in CLASSES}
            for klass, n, nbytes in con.execute("SELECT klass, count(*), coalesce(sum(nbytes), 0) FROM window GROUP BY klass"):
                by[CLASSES[klass]] = {"windows": int(n), "bytes": int(nbytes)}
            labels = int(con.execute("SELECT count(DISTINCT label_id) FROM window_label").fetchone()[0])
            return BufferStats(
                windows=sum(v["windows"] for v in by.values()),
                bytes=sum(v["bytes"] for v in by.values()),
                max_bytes=self.max_bytes,
                labels=labels,
                by_class=by,
                evicted={c: self._meta(con, f"evicted:{c}") for c in CLASSES},
                expired={c: self._meta(con, f"expired:{c}") for c in CLASSES},
            )

        return self._tx("read", tx)

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._con.close()

    def __enter__(self) -> LabelledWindowBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _row_window(r: Sequence[Any]) -> Window:
    site, machine, sensor, kind, start_ns, fs, unit, blob, idx = r
    return Window(site=site, machine=machine, sensor=sensor, kind=kind, start_ns=int(start_ns), sample_rate_hz=float(fs),
                  unit=unit, samples=np.frombuffer(blob, dtype="<f4"), index=int(idx))
