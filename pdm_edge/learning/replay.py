"""The replay buffer: a bounded, durable reservoir of each stream's normal windows.

Training an adapter on the device needs the machine's normal behaviour over its whole history,
not only its last minutes, or every retrain forgets last month (catastrophic forgetting). The
buffer keeps, per stream, a uniform random sample of the normal windows seen so far
(reservoir sampling, Algorithm R: J. S. Vitter, "Random sampling with a reservoir", ACM TOMS
11(1), 1985): the first ``capacity`` windows fill it; the ``i``-th window after that replaces a
random slot with probability ``capacity / i``.

What is kept is the window's feature image (``(2, 64, 32)`` float32, 16 KiB, before the
per-machine standardisation; :func:`pdm_edge.features.encoder_input`), not its samples
(100 KiB for 1 s at 25.6 kHz): 2000 windows take 32 MiB per stream on disk and nothing in
memory.

**Gate split.** Slot ``j`` is a *gate* slot when ``j % gate_every == 0``
(``gate_every = round(1 / gate_fraction)``). A window lands in exactly one slot for its
lifetime, so windows in gate slots are never trained on by any version built from this buffer:
they are the held-back normal windows the registry's gate judges every candidate on.

**Storage.** SQLite in ``replay.sqlite`` of the state directory, WAL with
``synchronous=NORMAL``: every batch of offers is one transaction, so a crash keeps the buffer
consistent, and the scoring worker that offers windows does not wait for an fsync per batch (a
power loss may forget the last few offers of a random sample, which costs nothing). Which windows
count as normal is the caller's decision (:mod:`pdm_edge.learning.loop`: all windows until the
first calibration, then only windows below threshold and outside alerts).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pdm_edge import features
from pdm_edge._util.sqlite import open_wal, tx
from pdm_edge.errors import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservoir (
    stream TEXT NOT NULL,
    slot INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    features BLOB NOT NULL,
    PRIMARY KEY (stream, slot)
);
CREATE TABLE IF NOT EXISTS stream (
    stream TEXT PRIMARY KEY,
    seen INTEGER NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL
);
"""

_FEATURE_BYTES = int(np.prod(features.INPUT_SHAPE)) * 4


class ReplayBuffer:
    """Per-stream reservoir of normal windows' feature images (see the module docstring).

    Args:
        path: the SQLite file (created with its directory).
        capacity: windows kept per stream, ``>= 20``.
        gate_fraction: share of the slots held back for the gate, in ``(0, 0.5)``.
        seed: seeds the replacement draws (one generator per stream, advanced by its count).

    Raises:
        StoreError: the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], *, capacity: int = 2000, gate_fraction: float = 0.2, seed: int = 0) -> None:
        if capacity < 20:
            raise ValueError(f"capacity must be >= 20, got {capacity}")
        if not 0 < gate_fraction < 0.5:
            raise ValueError(f"gate_fraction must be in (0, 0.5), got {gate_fraction}")
        self.path = Path(path)
        self.capacity = capacity
        self.gate_every = max(2, round(1 / gate_fraction))
        self.seed = seed
        self._lock = threading.Lock()
        try:
            self._con = open_wal(self.path, schema=_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the replay buffer {self.path}: {exc}") from exc

    @classmethod
    def in_dir(cls, state_dir: str | os.PathLike[str], **kwargs: object) -> ReplayBuffer:
        """The buffer at ``state_dir/replay.sqlite``."""
        return cls(Path(state_dir) / "replay.sqlite", **kwargs)  # type: ignore[arg-type]

    def _rng(self, stream: str, seen: int) -> np.random.Generator:
        # one reproducible draw per (stream, count): independent of how offers were batched
        return np.random.default_rng([self.seed, seen, *stream.encode()])

    def offer(self, stream: str, start_ns: Sequence[int], feats: np.ndarray) -> int:
        """Offer normal windows of one stream, in time order: ``start_ns`` (ns since the epoch,
        UTC) and their feature images ``feats`` of shape ``(B, 2, 64, 32)``. Returns how many
        were stored (all while the reservoir fills, then about ``capacity / seen`` of them).

        Raises:
            ValueError: shapes do not match or a feature value is not finite.
            StoreError: the database refused the write (nothing of the batch is stored).
        """
        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim != 4 or tuple(feats.shape[1:]) != features.INPUT_SHAPE or len(feats) != len(start_ns):
            raise ValueError(f"need {len(start_ns)} feature images of shape {features.INPUT_SHAPE}, got {feats.shape}")
        if not np.isfinite(feats).all():
            raise ValueError("feature images must be finite")
        if not len(feats):
            return 0
        with self._lock:
            try:
                with tx(self._con):
                    row = self._con.execute("SELECT seen, first_ns FROM stream WHERE stream = ?", (stream,)).fetchone()
                    seen, first_ns = (int(row[0]), int(row[1])) if row else (0, int(start_ns[0]))
                    stored = 0
                    for t, f in zip(start_ns, feats):
                        slot = seen if seen < self.capacity else int(self._rng(stream, seen).integers(0, seen + 1))
                        seen += 1
                        if slot < self.capacity:
                            self._con.execute("INSERT OR REPLACE INTO reservoir (stream, slot, start_ns, features) VALUES (?, ?, ?, ?)",
                                              (stream, slot, int(t), f.tobytes()))
                            stored += 1
                    self._con.execute("INSERT OR REPLACE INTO stream (stream, seen, first_ns, last_ns) VALUES (?, ?, ?, ?)",
                                      (stream, seen, first_ns, int(start_ns[-1])))
                return stored
            except sqlite3.Error as exc:
                raise StoreError(f"replay buffer write failed: {exc}") from exc

    def _read(self, stream: str, gate: bool) -> tuple[np.ndarray, np.ndarray]:
        op = "=" if gate else "!="
        with self._lock:
            try:
                rows = self._con.execute(
                    f"SELECT start_ns, features FROM reservoir WHERE stream = ? AND slot % ? {op} 0 ORDER BY start_ns, slot",
                    (stream, self.gate_every)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"replay buffer read failed: {exc}") from exc
        t = np.array([r[0] for r in rows], dtype=np.int64)
        f = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), *features.INPUT_SHAPE)
        return t, f.copy()

    def training(self, stream: str) -> tuple[np.ndarray, np.ndarray]:
        """The stream's training windows: ``(start_ns (M,) int64, features (M, 2, 64, 32) float32)``
        in time order."""
        return self._read(stream, gate=False)

    def gate_set(self, stream: str) -> tuple[np.ndarray, np.ndarray]:
        """The stream's held-back normal windows for the gate, same layout as :meth:`training`."""
        return self._read(stream, gate=True)

    def span(self, stream: str) -> tuple[int, int, int] | None:
        """``(windows seen, first start_ns, last start_ns)`` of the stream, or ``None``."""
        with self._lock:
            row = self._con.execute("SELECT seen, first_ns, last_ns FROM stream WHERE stream = ?", (stream,)).fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else None

    def streams(self) -> list[str]:
        """Streams with windows in the buffer."""
        with self._lock:
            return [r[0] for r in self._con.execute("SELECT stream FROM stream ORDER BY stream").fetchall()]

    def counts(self, stream: str) -> tuple[int, int]:
        """``(training windows, gate windows)`` kept for ``stream``."""
        with self._lock:
            row = self._con.execute("SELECT SUM(slot % ? != 0), SUM(slot % ? = 0) FROM reservoir WHERE stream = ?",
                                    (self.gate_every, self.gate_every, stream)).fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def size(self, stream: str) -> int:
        """Windows kept for ``stream`` (training and gate slots)."""
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM reservoir WHERE stream = ?", (stream,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._con.close()
