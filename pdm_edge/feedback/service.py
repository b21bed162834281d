"""The feedback stage of a running appliance: book, window buffer, recent windows and spool, tied.

:class:`Feedback` is what the appliance holds (one per process):

- :meth:`Feedback.submit` is :func:`~pdm_edge.feedback.labels.submit_label` on its book (give
  it to the :class:`~pdm_edge.feedback.listener.LabelListener` and the dashboard), followed by
  :meth:`Feedback.sync`.
- :meth:`Feedback.observe_many` is called by the scoring worker once per batch: it remembers the
  windows in the :class:`~pdm_edge.feedback.windows.RecentWindows` ring and stores each in the
  buffer when a known label covers it (a label whose span is still running, say an ``ignore``
  for a maintenance that has just begun, or one given ahead of time). It never reads the book.
- :meth:`Feedback.sync` picks up labels added to the book since the last call, by this process
  or another one (``pdm-edge label add`` writes the book directly), captures the windows they
  cover from the ring, links the windows already stored or held in the buffer
  (:meth:`~pdm_edge.feedback.windows.LabelledWindowBuffer.adopt`), and forwards every label not
  yet exported to the results store through the spool (``spool.put("label", ...)``, then
  :meth:`~pdm_edge.feedback.labels.LabelBook.mark_exported`). It keeps **one cursor** (the
  book's sequence number) and emits every label it took in to the listeners
  (:meth:`Feedback.subscribe`: ``fn(seq, label)``, after the label's windows were captured).
  :meth:`Feedback.start` runs it on its own timer (thread ``label-sync``, every
  ``sync_interval_s``, 0.5 s by default), so a label from the dashboard or the CLI, which write
  the book directly, reaches the store within about a second whether or not windows flow.
- :meth:`Feedback.hold_span` keeps the ring's windows of a span (an alert's) in the buffer as
  unlabelled, so that a label given after the ring has moved on still finds them.

Failures of the buffer or the spool are logged and counted, never raised into the scoring
thread: losing a training window is better than falling behind. A label that could not be
forwarded stays in the book's outbox and is retried at the next sync.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any

from pdm_edge.config import FeedbackConfig
from pdm_edge.errors import StoreError
from pdm_edge.feedback.labels import LabelBook, LabelLimits, submit_label
from pdm_edge.feedback.windows import LabelledWindowBuffer, RecentWindows, covers
from pdm_edge.types import Label, Window

log = logging.getLogger(__name__)


class Feedback:
    """Labels and their windows in a running appliance (see the module docstring). Thread-safe.

    Args:
        book: the label book.
        buffer: the labelled-window buffer (``None``: windows are not kept).
        recent: the ring of recent windows (``None``: labels capture only what is stored).
        spool: the results store's spool; labels are forwarded to it (``None``: not forwarded;
            they stay in the book's outbox).
        limits: label bounds for :meth:`submit`.
        sync_interval_s: how often the sync thread (:meth:`start`) looks for new labels in the
            book, seconds.
    """

    def __init__(self, book: LabelBook, buffer: LabelledWindowBuffer | None = None, recent: RecentWindows | None = None,
                 *, spool: Any = None, limits: LabelLimits | None = None, sync_interval_s: float = 0.5) -> None:
        self.book = book
        self.buffer = buffer
        self.recent = recent
        self.spool = spool
        self.limits = limits or LabelLimits()
        self.sync_interval_s = sync_interval_s
        self._lock = threading.RLock()
        self._cursor = 0
        self._listeners: list[Callable[[int, Label], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active: dict[tuple[str, str], list[Label]] = {}
        self._margin_ns = recent.horizon_ns if recent is not None else 60_000_000_000
        self.errors = 0

    @classmethod
    def from_config(cls, cfg: FeedbackConfig, *, spool: Any = None, state_dir: str | Path | None = None) -> Feedback:
        """Open the book and the buffer in ``state_dir`` (default ``cfg.state_dir``) and make the
        ring, all bounded by ``cfg``."""
        d = Path(state_dir if state_dir is not None else cfg.state_dir)
        book = LabelBook.in_dir(d)
        buffer = LabelledWindowBuffer.in_dir(d, max_bytes=cfg.buffer_max_bytes, max_age_s=cfg.buffer_max_age_s,
                                             hold_max_age_s=cfg.buffer_hold_max_age_s)
        recent = RecentWindows(cfg.recent_s, cfg.recent_max_bytes_per_stream)
        return cls(book, buffer, recent, spool=spool, limits=LabelLimits.from_config(cfg))

    def submit(self, **fields: Any) -> tuple[Label, bool]:
        """:func:`~pdm_edge.feedback.labels.submit_label` on this book with these limits, then
        :meth:`sync`. Returns ``(label, created)``; raises ``LabelError`` for an invalid label."""
        fields.setdefault("limits", self.limits)
        label, created = submit_label(self.book, **fields)
        try:
            self.sync()
        except StoreError as exc:  # the label is in the book; the next sync takes it in
            self._error("label %s stored, but the book could not be synced: %s", label.id, exc)
        return label, created

    def sync(self) -> int:
        """Take in the labels added to the book since the last call (capture and adopt their
        windows) and forward unexported labels to the spool; returns how many labels were new."""
        taken: list[tuple[int, Label]] = []
        with self._lock:
            while True:
                batch = self.book.since(self._cursor)
                if not batch:
                    break
                for seq, label in batch:
                    self._take_in(label)
                    self._cursor = seq
                    taken.append((seq, label))
            self._forward()
        for seq, label in taken:
            for fn in list(self._listeners):
                try:
                    fn(seq, label)
                except Exception:
                    log.exception("label listener failed on label %s", label.id)
        return len(taken)

    def subscribe(self, fn: Callable[[int, Label], None]) -> Callable[[], None]:
        """Call ``fn(seq, label)`` for every label :meth:`sync` takes in (book order, after its
        windows were captured; in the syncing thread). Returns a function that unsubscribes."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def start(self) -> Feedback:
        """Run :meth:`sync` every ``sync_interval_s`` seconds in a thread (``label-sync``) until
        :meth:`stop`; a failing sync is logged and counted and retried at the next tick."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sync_loop, name="label-sync", daemon=True)
            self._thread.start()
        return self

    def _sync_loop(self) -> None:
        while True:
            try:
                self.sync()
            except Exception as exc:  # the book or the spool failed: the next tick retries
                self._error("label sync failed: %s", exc)
            if self._stop.wait(self.sync_interval_s):
                try:  # one last sync: a label written just before the stop is forwarded
                    self.sync()
                except Exception as exc:
                    self._error("label sync failed: %s", exc)
                return

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sync thread (after one last sync, so that nothing written before is left)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _take_in(self, label: Label) -> None:
        self._active.setdefault((label.site, label.machine), []).append(label)
        if self.buffer is None:
            return
        try:
            if self.recent is not None:
                for w in self.recent.capture(label):
                    self.buffer.offer(w, [label])
            self.buffer.adopt(label)
        except StoreError as exc:
            self._error("could not keep the windows of label %s: %s", label.id, exc)

    def _forward(self) -> None:
        if self.spool is None:
            return
        while True:
            labels = self.book.unexported()
            if not labels:
                return
            try:
                self.spool.put("label", labels)
                self.book.mark_exported([lb.id for lb in labels])
            except (StoreError, ValueError, TypeError) as exc:
                self._error("could not forward %d labels to the spool (kept for the next sync): %s", len(labels), exc)
                return

    def observe_many(self, windows: list[Window]) -> int:
        """Remember a batch of windows in the ring; store each one for every known label that
        covers it. Returns how many (window, label) links were stored. Never raises for a
        buffer failure (logged and counted); never reads the book (:meth:`sync` does)."""
        stored = 0
        for window in windows:
            if self.recent is not None:
                self.recent.add(window)
            with self._lock:
                labels = self._active.get((window.site, window.machine))
                if not labels:
                    continue
                labels[:] = [lb for lb in labels if lb.end_ns + self._margin_ns > window.start_ns]
                covering = [lb for lb in labels if covers(lb, window)]
            if not covering or self.buffer is None:
                continue
            try:
                stored += self.buffer.offer(window, covering)
            except StoreError as exc:
                self._error("could not keep a window of %s: %s", window.stream, exc)
        return stored

    def hold_span(self, site: str, machine: str, sensor: str | None, start_ns: int, end_ns: int) -> int:
        """Keep the ring's windows of ``[start_ns, end_ns)`` (an alert's span) in the buffer as
        unlabelled, for a label that may come later; returns how many are held."""
        if self.recent is None or self.buffer is None:
            return 0
        n = 0
        try:
            for w in self.recent.capture_span(site, machine, sensor, start_ns, end_ns):
                n += bool(self.buffer.hold(w))
        except StoreError as exc:
            self._error("could not hold windows of %s/%s: %s", site, machine, exc)
        return n

    def _error(self, msg: str, *args: Any) -> None:
        self.errors += 1
        if self.errors <= 10 or self.errors % 1000 == 0:
            log.error(msg, *args)

    def close(self) -> None:
        """Stop the sync thread; close the book and the buffer."""
        self.stop()
        self.book.close()
        if self.buffer is not None:
            self.buffer.close()
