"""The edge training loop: when to train, on what, how, and what becomes of the result.

Read top to bottom, one training job goes through these steps:

1. **Triggers** (:meth:`LearningLoop.offer`, :meth:`LearningLoop.check_labels`,
   :func:`request_training`):

   - ``initial``: a stream without an active model version has collected
     ``[learning] calibration_s`` seconds of windows (the appliance is commissioned on a healthy
     machine, so they are its normal baseline);
   - ``labels``: ``[learning] retrain_after_labels`` new ``normal`` or ``fault`` labels cover
     the stream since its last training (every label path writes the label book; the feedback
     stage's sync, one cursor over the book, sends each label to :meth:`LearningLoop.take_label`
     once its windows are captured);
   - ``manual``: ``pdm-edge models train STREAM`` (from another process: the request is a row
     in the job table, which the loop polls).

   A trigger queues a job in ``learning.sqlite`` (at most one queued or running job per stream).
2. **Data** (:meth:`LearningLoop._dataset`): the stream's replay buffer
   (:class:`~pdm_edge.learning.replay.ReplayBuffer`: a reservoir of normal windows over the
   machine's whole history, minus the slots held back for the gate) plus every labelled window
   of the stream from the labelled-window buffer: ``normal`` labels (false alarms) join the
   normal set, ``fault`` labels become known-fault examples, and replay windows inside a
   ``fault`` or ``ignore`` span are dropped.
3. **Training** (:meth:`pdm_edge.model.scorer.Scorer.calibrate`, whose training loop is
   :func:`pdm_edge.learning.trainer.train_adapter`): adapter parameters only (the encoder is
   frozen), early stopping on a validation split, a wall-time budget (``max_train_seconds``),
   the memory options and envelope of ``[learning]`` (frozen-prefix cache, gradient
   checkpointing, micro-batches, optimiser, ``max_memory_mb``) and augmentation of the replay
   windows (:mod:`pdm_edge.learning.augment`). The worker thread runs at a lower OS priority (``nice``) than the
   scorer, so scoring does not fall behind while it trains (``benchmarks/train_vs_score.py``
   measures it).
   **Schedule** (:class:`~pdm_edge.learning.resources.ResourceGuard`, ``[learning]`` load,
   temperature and battery limits read through psutil): a queued job starts only when the
   machine is idle, cool and powered enough; a running one checks before every batch and, when
   a limit is crossed, pauses: it writes its checkpoint, goes back to the queue (event
   ``paused``) and resumes from the checkpoint when the limits clear. Scoring never waits.
4. **Checkpoints**: after every epoch the training state (adapter, optimiser, best state,
   history, torch and numpy generator states) is written atomically (temporary file, fsync, rename, fsync of the directory) to
   ``learning/ckpt-{job}.pt``. A job that was running when the process died (crash, power loss,
   SIGKILL) is queued again at the next start and resumes from its last checkpoint; a stop
   request (SIGTERM) writes a final checkpoint and leaves the job queued. The active model
   version is never touched by training: only step 5 changes it, in one registry transaction.
5. **Gate and registry** (:meth:`pdm_edge.registry.Registry.submit`): the candidate becomes a
   model version; it is promoted only if its false-alarm rate on the held-back normal windows
   is not worse than the active version's by more than ``gate_margin`` and it scores every
   labelled fault window above its threshold; otherwise it is kept as ``rejected`` with the
   reason. Registry listeners (the scoring stage) hot-swap the promoted version in.

Every step is reported through ``on_event(stream, event, version, detail)`` (``queued``,
``training``, ``promoted``, ``rejected``, ``failed``, ``interrupted``, ``paused``) and kept in the job table
(:meth:`LearningLoop.jobs`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdm_edge._util.sqlite import open_wal
from pdm_edge.errors import ModelError, PdmEdgeError, StoreError, TrainingInterrupted
from pdm_edge.feedback.labels import LabelBook
from pdm_edge.feedback.windows import LabelledWindowBuffer
from pdm_edge.learning.replay import ReplayBuffer
from pdm_edge.learning.resources import ResourceGuard
from pdm_edge.model.encoder import Encoder
from pdm_edge.model.scorer import Scorer, ScorerConfig
from pdm_edge._util.fs import atomic_write
from pdm_edge.registry import GateInputs, Registry
from pdm_edge.types import Label, Window

log = logging.getLogger(__name__)

TRIGGERS = ("initial", "labels", "manual")
JOB_STATES = ("queued", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    requested_ns INTEGER NOT NULL,
    started_ns INTEGER,
    finished_ns INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    version TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS job_one_pending ON job(stream) WHERE status IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS watermark (
    stream TEXT PRIMARY KEY,
    label_seq INTEGER NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class Job:
    """One training job as the job table keeps it (times in ns since the epoch, UTC)."""

    id: int
    stream: str
    trigger: str
    status: str
    requested_ns: int
    started_ns: int | None
    finished_ns: int | None
    attempts: int
    version: str | None
    detail: str


def _open_jobs(path: Path) -> sqlite3.Connection:
    return open_wal(path, synchronous="FULL", schema=_SCHEMA)


def _enqueue(con: sqlite3.Connection, stream: str, trigger: str, detail: str = "") -> int | None:
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    try:
        cur = con.execute("INSERT INTO job (stream, trigger, status, requested_ns, detail) VALUES (?, ?, 'queued', ?, ?)",
                          (stream, trigger, time.time_ns(), detail))
        return int(cur.lastrowid)  # type: ignore[arg-type]
    except sqlite3.IntegrityError:  # a job of this stream is already queued or running
        return None


def request_training(state_dir: str | os.PathLike[str], stream: str, trigger: str = "manual") -> int | None:
    """Queue a training job for ``stream`` (``"site/machine/sensor"``) in the job table of
    ``state_dir`` (what ``pdm-edge models train`` does; the running appliance picks it up within
    seconds). Returns the job id, or ``None`` when the stream already has a queued or running job.

    Raises:
        StoreError: the job table cannot be written.
    """
    try:
        con = _open_jobs(Path(state_dir) / "learning.sqlite")
        try:
            return _enqueue(con, stream, trigger, "requested from the command line")
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot queue a training job in {state_dir}: {exc}") from exc


def _release_memory() -> None:
    """Give the heap that a training freed back to the OS (glibc ``malloc_trim``): without it
    the appliance's resident memory stays at the training's peak for good. A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _label_applies(label: Label, stream: str) -> bool:
    site, machine, sensor = stream.split("/")
    return label.site == site and label.machine == machine and (label.sensor is None or label.sensor == sensor)


def stream_dataset(replay: ReplayBuffer, labels: LabelBook | None, label_windows: LabelledWindowBuffer | None,
                   stream: str, tmpl: Scorer) -> dict[str, Any]:
    """A stream's training data (step 2 of the module docstring), feature images in time order.

    Returns:
        ``t_normal`` (start ns), ``normal`` ``(N, 2, 64, 32)``, ``replay`` ``(N,)`` bool (True
        for the normal windows from the replay buffer, False for labelled ones), ``fault`` ``(F, 2, 64, 32)``,
        ``fault_events`` (label id per fault window), ``fault_info`` (per fault window: label id,
        fault type, span start), ``gate`` (held-back normal windows), ``labelled_normal_windows``
        and ``labels`` (counts per kind), ``labelled_normal`` (the windows labelled normal, time
        order, for the gate's label rule).
    """
    t_norm, f_norm = replay.training(stream)
    t_gate, f_gate = replay.gate_set(stream)
    labelled: dict[str, list[tuple[int, np.ndarray, str]]] = {"normal": [], "fault": []}
    drop_spans: list[tuple[int, int]] = []
    n_labels = {"normal": 0, "fault": 0, "ignore": 0}
    fault_info: dict[str, dict[str, Any]] = {}
    if labels is not None:
        site, machine, _ = stream.split("/")
        for label in labels.list(site=site, machine=machine):
            if not _label_applies(label, stream):
                continue
            n_labels[label.kind] += 1
            if label.kind in ("fault", "ignore"):
                drop_spans.append((label.start_ns, label.end_ns))
            if label.kind == "ignore" or label_windows is None:
                continue
            ws = [w for w in label_windows.windows_for(label.id) if w.stream == stream]
            if ws:
                f = tmpl.features(ws)
                labelled[label.kind] += [(w.start_ns, x, label.id) for w, x in zip(ws, f)]
                if label.kind == "fault":
                    fault_info[label.id] = {"label": label.id, "fault_type": label.fault_type, "start_ns": int(label.start_ns)}

    def keep(t: np.ndarray) -> np.ndarray:
        m = np.ones(len(t), bool)
        for a, b in drop_spans:
            m &= ~((t >= a) & (t < b))
        return m

    k, kg = keep(t_norm), keep(t_gate)
    t_norm, f_norm, t_gate, f_gate = t_norm[k], f_norm[k], t_gate[kg], f_gate[kg]
    from_replay = np.ones(len(t_norm), bool)
    if labelled["normal"]:
        t_all = np.r_[t_norm, [t for t, _, _ in labelled["normal"]]]
        f_all = np.concatenate([f_norm, np.stack([x for _, x, _ in labelled["normal"]])])
        order = np.argsort(t_all, kind="stable")
        t_norm, f_norm = t_all[order], f_all[order]
        from_replay = np.r_[from_replay, np.zeros(len(labelled["normal"]), bool)][order]
    faults = sorted(labelled["fault"], key=lambda p: (p[2], p[0]))  # by event, each in time order
    f_fault = np.stack([x for _, x, _ in faults]) if faults else np.zeros((0, *f_norm.shape[1:]), np.float32)
    lab_sorted = sorted(labelled["normal"], key=lambda p: p[0])
    f_lab = np.stack([x for _, x, _ in lab_sorted]) if lab_sorted else np.zeros((0, *f_norm.shape[1:]), np.float32)
    return {"t_normal": t_norm, "normal": f_norm, "replay": from_replay, "fault": f_fault, "fault_events": [ev for _, _, ev in faults],
            "fault_info": [fault_info[ev] for _, _, ev in faults], "gate": f_gate,
            "labelled_normal_windows": len(labelled["normal"]), "labels": n_labels, "labelled_normal": f_lab}


class LearningLoop:
    """The on-device training loop of every stream (see the module docstring).

    Args:
        registry: where model versions go; its active versions are what the scorer uses.
        encoder, encoder_sha256: the frozen encoder.
        state_dir: the appliance's state directory (``replay.sqlite``, ``learning.sqlite``,
            ``learning/`` checkpoints).
        scorer_config: the :class:`~pdm_edge.model.scorer.ScorerConfig` of a stream (kind,
            sample rate, hop, training settings) from ``("site/machine/sensor", one of its
            windows or None)``; ``None`` for a stream that cannot be trained.
        calibration_s: seconds of windows before the initial calibration of a stream.
        retrain_after_labels: new labels of a stream that trigger a retrain.
        replay_capacity, gate_fraction: the replay buffer's size per stream and held-back share.
        gate_margin: the gate's false-alarm-rate margin.
        confirm_far_above, confirm_silenced_alerts: the label rule of the gate
            (:func:`pdm_edge.registry.label_rule`; off by default here, on in ``pdm-edge run``).
        labels, label_windows: the label book and the labelled-window buffer (``None``: labels
            are not used).
        nice: niceness added to the worker thread (Linux).
        on_event: ``(stream, event, version, detail)`` for every job step.
        poll_s: how often the worker looks for queued jobs and new labels, seconds.
        prior_for: ``(stream, scorer config) -> (adapter state_dict, description)`` or ``None``:
            the fleet prior a calibration of the stream starts from (:mod:`pdm_edge.fleet.priors`).
        resources: when jobs may start and must pause (``None``: always run).
    """

    def __init__(self, registry: Registry, encoder: Encoder, encoder_sha256: str, state_dir: str | os.PathLike[str], *,
                 scorer_config: Callable[[str, Window | None], ScorerConfig | None], calibration_s: float = 600.0,
                 retrain_after_labels: int = 5, replay_capacity: int = 2000, gate_fraction: float = 0.2,
                 gate_margin: float = 0.01, labels: LabelBook | None = None,
                 label_windows: LabelledWindowBuffer | None = None, nice: int = 10,
                 on_event: Callable[[str, str, str, str], None] | None = None, poll_s: float = 2.0,
                 confirm_far_above: float | None = None,
                 confirm_silenced_alerts: bool = False,
                 prior_for: Callable[[str, ScorerConfig], tuple[dict[str, Any], str] | None] | None = None,
                 resources: ResourceGuard | None = None) -> None:
        self.registry = registry
        self.encoder, self.sha = encoder, encoder_sha256
        self.state_dir = Path(state_dir)
        self.scorer_config = scorer_config
        self.calibration_s = calibration_s
        self.retrain_after_labels = retrain_after_labels
        self.gate_margin = gate_margin
        self.confirm_far_above = confirm_far_above
        self.confirm_silenced_alerts = confirm_silenced_alerts
        self.labels, self.label_windows = labels, label_windows
        self.nice = nice
        self.on_event = on_event
        self.poll_s = poll_s
        self.prior_for = prior_for
        self.resources = resources
        self._pause_why: str | None = None
        self._deferred_why: str | None = None
        self.replay = ReplayBuffer.in_dir(self.state_dir, capacity=replay_capacity, gate_fraction=gate_fraction)
        self.ckpt_dir = self.state_dir / "learning"
        self._con = _open_jobs(self.state_dir / "learning.sqlite")
        self._db = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._label_cursor = 0  # the newest label sequence number taken (Feedback's cursor)
        self._label_events: list[tuple[int, Label]] = []
        self._label_lock = threading.Lock()
        self._pending_labels: dict[str, list[int]] = {}  # stream -> sequence numbers of its new labels
        self._templates: dict[str, Scorer] = {}
        self.running_job: Job | None = None
        self.replay_refused = 0
        self._listeners: list[Callable[[str, str, str, str], None]] = []
        self.runs = {"done": 0, "failed": 0, "promoted": 0, "rejected": 0, "interrupted": 0, "paused": 0}
        with self._db:  # jobs that were running when the process died: run them again (they resume)
            n = self._con.execute("UPDATE job SET status = 'queued', detail = 'interrupted by a restart; resumes from its "
                                  "last checkpoint' WHERE status = 'running'").rowcount
        if n:
            log.warning("%d training job(s) were interrupted by a restart; queued again", n)

    # -- 1. triggers ---------------------------------------------------------------------------
    def template(self, stream: str, like: Window | None = None) -> Scorer | None:
        """An uncalibrated scorer of the stream's configuration (computes feature images);
        ``like`` is one of its windows, for streams known only from their data."""
        t = self._templates.get(stream)
        if t is None:
            cfg = self.scorer_config(stream, like)
            if cfg is None:
                return None
            t = self._templates[stream] = Scorer(self.encoder, self.sha, cfg)
        return t

    def offer(self, stream: str, start_ns: list[int], feats: np.ndarray, *, collecting: bool = False) -> None:
        """Give the loop a stream's normal windows (start ns, ``(B, 2, 64, 32)`` feature images,
        time order): they go to the replay buffer. With ``collecting`` (the stream has no active
        version yet) the initial calibration is queued once the stream has ``calibration_s``
        seconds of them and at least the scorer's ``min_windows`` training windows (besides the
        gate's share); a scoring stream pays only the replay write.

        Raises:
            StoreError: the replay buffer refused the write.
        """
        if not len(start_ns):
            return
        self.replay.offer(stream, start_ns, feats)
        if not collecting:
            return
        span = self.replay.span(stream)
        if span is None or (span[2] - span[1]) / 1e9 < self.calibration_s:
            return
        site, machine, sensor = stream.split("/")
        if self.registry.active(site, machine, sensor) is None and not self.has_job(stream, ("queued", "running", "failed"), "initial"):
            tmpl = self.template(stream)
            if tmpl is not None and self.replay.counts(stream)[0] >= tmpl.config.min_windows:
                self.enqueue(stream, "initial", f"{span[0]} windows over {(span[2] - span[1]) / 1e9:.0f} s collected")

    def take_replay(self, candidates: list[Any]) -> int:
        """Consume the scoring stage's replay candidates
        (:class:`~pdm_edge.pipeline.scoring.ReplayCandidates`: ``stream``, ``start_ns``,
        ``features``, ``collecting``), one :meth:`offer` each, once per batch. A write the
        replay buffer refuses is logged (rate-limited) and counted, never raised: the replay
        buffer is for later trainings, a full disk must not cost the scores. Returns how many
        candidate sets were refused."""
        refused = 0
        for c in candidates:
            try:
                self.offer(c.stream, c.start_ns, c.features, collecting=c.collecting)
            except (StoreError, ValueError) as exc:
                refused += 1
                self.replay_refused += 1
                if self.replay_refused <= 10 or self.replay_refused % 1000 == 0:
                    log.warning("event=replay_offer_failed stream=%s windows=%d refused=%d error=%r", c.stream,
                                len(c.start_ns), self.replay_refused, str(exc)[:200])
        return refused

    def subscribe(self, fn: Callable[[str, str, str, str], None]) -> Callable[[], None]:
        """Also call ``fn(stream, event, version, detail)`` for every event (as ``on_event``;
        the stream table consumes them). Returns a function that unsubscribes."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def enqueue(self, stream: str, trigger: str, detail: str = "") -> int | None:
        """Queue a job (``None`` when the stream already has one queued or running)."""
        with self._db:
            jid = _enqueue(self._con, stream, trigger, detail)
        if jid is not None:
            log.info("training job %d queued: stream=%s trigger=%s %s", jid, stream, trigger, detail)
            self._event(stream, "queued", "", f"{trigger}: {detail}".rstrip(": "))
            self._wake.set()
        return jid

    def has_job(self, stream: str, states: tuple[str, ...], trigger: str | None = None) -> bool:
        """Whether the stream has a job in one of ``states`` (of ``trigger``, when given)."""
        q = f"SELECT 1 FROM job WHERE stream = ? AND status IN ({','.join('?' * len(states))})"
        args: list[Any] = [stream, *states]
        if trigger is not None:
            q += " AND trigger = ?"
            args.append(trigger)
        with self._db:
            return self._con.execute(q, args).fetchone() is not None

    def take_label(self, seq: int, label: Label) -> None:
        """Consume one label event of the feedback stage (``Feedback.subscribe``: its one
        cursor over the label book; sent once the label's windows were captured). Quick: the
        label is counted at the next :meth:`check_labels`."""
        with self._label_lock:
            self._label_events.append((seq, label))
            self._label_cursor = max(self._label_cursor, seq)

    def check_labels(self) -> None:
        """Count the new ``normal`` / ``fault`` labels (:meth:`take_label`) per calibrated stream
        and queue a ``labels`` retrain where ``retrain_after_labels`` of them are in."""
        if self.labels is None:
            return
        with self._label_lock:
            events, self._label_events = self._label_events, []
        if events:
            streams = [s for s in self.replay.streams() if self.registry.active(*s.split("/")) is not None]
            for seq, label in events:
                if label.kind not in ("normal", "fault"):
                    continue
                for s in streams:
                    if _label_applies(label, s) and seq > self._watermark(s):
                        self._pending_labels.setdefault(s, []).append(seq)
        for s, pending in self._pending_labels.items():
            if len(pending) >= self.retrain_after_labels and not self.has_job(s, ("queued", "running")):
                self.enqueue(s, "labels", f"{len(pending)} new labels")

    def _watermark(self, stream: str) -> int:
        with self._db:
            row = self._con.execute("SELECT label_seq FROM watermark WHERE stream = ?", (stream,)).fetchone()
        return int(row[0]) if row else 0

    # -- the worker ------------------------------------------------------------------------------
    def start(self) -> LearningLoop:
        """Start the worker thread (low priority)."""
        self._thread = threading.Thread(target=self._run, name="learning", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Ask a running training to stop (it writes a checkpoint and stays queued) and join."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        if self.nice and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.nice))
            except OSError as exc:  # not permitted in some containers
                log.warning("could not lower the training thread's priority: %s", exc)
        while not self._stop.is_set():
            try:
                self.check_labels()
                self.run_pending()
            except (PdmEdgeError, sqlite3.Error, OSError) as exc:
                log.error("training loop error (retried in %.0f s): %s", self.poll_s, exc)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def run_pending(self, max_jobs: int | None = None) -> list[Job]:
        """Run queued jobs one after the other in this thread (the worker calls it; so does
        ``pdm-edge models train --now``). Returns the jobs as they ended."""
        out: list[Job] = []
        while not self._stop.is_set() and (max_jobs is None or len(out) < max_jobs):
            if self._deferred():
                break
            with self._db:
                row = self._con.execute("SELECT id FROM job WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
                if row is None:
                    break
                self._con.execute("UPDATE job SET status = 'running', started_ns = ?, attempts = attempts + 1 WHERE id = ?",
                                  (time.time_ns(), row[0]))
            job = self.job(int(row[0]))
            self.running_job = job
            try:
                out.append(self._execute(job))
            finally:
                self.running_job = None
                _release_memory()
        return out

    def _deferred(self) -> bool:
        """Whether the resource limits hold queued jobs back now (logged once per reason)."""
        why = self.resources.why_not_start() if self.resources is not None else None
        if why is not None and why != self._deferred_why:
            with self._db:
                queued = self._con.execute("SELECT COUNT(*) FROM job WHERE status = 'queued'").fetchone()[0]
            if queued:
                log.info("training deferred (%d job(s) queued): %s", queued, why)
        self._deferred_why = why
        return why is not None

    def _should_stop(self) -> bool:
        """Polled by the trainer before every batch: a stop request, or a resource limit."""
        if self._stop.is_set():
            return True
        self._pause_why = self.resources.why_pause() if self.resources is not None else None
        return self._pause_why is not None

    def job(self, job_id: int) -> Job:
        with self._db:
            row = self._con.execute("SELECT id, stream, trigger, status, requested_ns, started_ns, finished_ns, attempts, "
                                    "version, detail FROM job WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return Job(*row)

    def jobs(self, stream: str | None = None, limit: int = 100) -> list[Job]:
        """The newest jobs first (of one stream, or all)."""
        q = "SELECT id, stream, trigger, status, requested_ns, started_ns, finished_ns, attempts, version, detail FROM job"
        args: list[Any] = []
        if stream is not None:
            q += " WHERE stream = ?"
            args.append(stream)
        with self._db:
            return [Job(*r) for r in self._con.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()]

    def _finish(self, job: Job, status: str, version: str | None, detail: str) -> Job:
        with self._db:
            self._con.execute("UPDATE job SET status = ?, finished_ns = ?, version = ?, detail = ? WHERE id = ?",
                              (status, time.time_ns(), version, detail, job.id))
        self.runs["done" if status == "done" else "failed"] += 1
        return self.job(job.id)

    def _execute(self, job: Job) -> Job:
        stream = job.stream
        self._event(stream, "training", "", f"job {job.id} ({job.trigger}), attempt {job.attempts}")
        label_seq = self._label_cursor_now()
        try:
            cand, summary, gate_inputs = self._train(job)
        except TrainingInterrupted as exc:
            paused = not self._stop.is_set() and self._pause_why is not None
            detail = f"paused ({self._pause_why}): {exc}" if paused else str(exc)
            with self._db:
                self._con.execute("UPDATE job SET status = 'queued', detail = ? WHERE id = ?", (detail, job.id))
            self.runs["paused" if paused else "interrupted"] += 1
            log.info("training job %d of %s %s", job.id, stream, detail)
            self._event(stream, "paused" if paused else "interrupted", "", detail)
            return self.job(job.id)
        except (PdmEdgeError, ValueError) as exc:
            log.error("training job %d of %s failed: %s", job.id, stream, exc)
            self._event(stream, "failed", "", str(exc))
            self._checkpoint_path(job).unlink(missing_ok=True)
            return self._finish(job, "failed", None, str(exc))
        site, machine, sensor = stream.split("/")
        rec, metrics, reason = self.registry.submit(cand, site=site, machine=machine, sensor=sensor, gate_inputs=gate_inputs,
                                                    trigger=job.trigger, training_summary=summary)
        self._checkpoint_path(job).unlink(missing_ok=True)
        with self._db:
            self._con.execute("INSERT OR REPLACE INTO watermark (stream, label_seq) VALUES (?, ?)", (stream, label_seq))
        # labels that arrived while it trained still count towards the next retrain
        self._pending_labels[stream] = [p for p in self._pending_labels.get(stream, []) if p > label_seq]
        event = {"active": "promoted", "candidate": "awaiting_confirmation"}.get(rec.status, "rejected")
        self.runs[event] += 1
        log.info("training job %d of %s: %s %s (%s)", job.id, stream, rec.id, event, reason)
        self._event(stream, event, rec.id, reason)
        return self._finish(job, "done", rec.id, f"{event}: {reason}")

    def _label_cursor_now(self) -> int:
        with self._label_lock:
            return self._label_cursor

    # -- 2. data -----------------------------------------------------------------------------------
    def _dataset(self, stream: str, tmpl: Scorer) -> dict[str, Any]:
        """Normal and fault windows (feature images, time order) of a stream and its gate set."""
        return stream_dataset(self.replay, self.labels, self.label_windows, stream, tmpl)

    # -- 3. training and 4. checkpoints -------------------------------------------------------------
    def _checkpoint_path(self, job: Job) -> Path:
        return self.ckpt_dir / f"ckpt-{job.id}.pt"

    def _write_checkpoint(self, job: Job, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({"job": job.id, "stream": job.stream, "state": state}, buf)
        atomic_write(self._checkpoint_path(job), buf.getvalue())

    def _read_checkpoint(self, job: Job) -> dict[str, Any] | None:
        path = self._checkpoint_path(job)
        if not path.exists():
            return None
        try:
            obj = torch.load(path, weights_only=True)
        except Exception as exc:  # a damaged checkpoint restarts the job instead of failing it
            log.warning("checkpoint %s unreadable (%s): training restarts from scratch", path, exc)
            return None
        return obj["state"] if obj.get("job") == job.id else None

    def _train(self, job: Job) -> tuple[Scorer, dict[str, Any], GateInputs]:
        tmpl = self.template(job.stream)
        if tmpl is None:
            raise ModelError(f"{job.stream} is not a configured sensor stream")
        data = self._dataset(job.stream, tmpl)
        cand = Scorer(self.encoder, self.sha, tmpl.config)
        prior = self.prior_for(job.stream, tmpl.config) if self.prior_for is not None else None
        if prior is not None:
            cand.prior_adapter = prior[0]
        cand.learn_features(data["normal"], replay=data["replay"])
        if len(data["fault"]):
            cand.learn_features(data["fault"], "fault", events=data["fault_info"])
        resume = self._read_checkpoint(job)
        t0 = time.monotonic()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        info = cand.calibrate(checkpoint=lambda st: self._write_checkpoint(job, st), resume=resume,
                              should_stop=self._should_stop, work_dir=self.ckpt_dir)
        t = data["t_normal"]
        summary = {
            "job": job.id, "normal_windows": int(len(data["normal"])), "fault_windows": int(len(data["fault"])),
            "labelled_normal_windows": data["labelled_normal_windows"], "labels": data["labels"],
            "gate_windows": int(len(data["gate"])),
            "span_ns": [int(t[0]), int(t[-1])] if len(t) else None,
            "adapter_epochs": info["adapter_epochs"], "train_seconds": round(time.monotonic() - t0, 2),
            "resumed_from_epoch": int(resume["epoch"]) if resume else None, "threshold": info["threshold"],
            "fleet_prior": prior[1] if prior is not None else None,
        }
        return cand, summary, GateInputs(normal_windows=data["gate"], fault_windows=data["fault"], margin=self.gate_margin,
                                         fault_events=data["fault_events"], labelled_normal_windows=data["labelled_normal"],
                                         confirm_far_above=self.confirm_far_above,
                                         confirm_silenced_alerts=self.confirm_silenced_alerts)

    # -- events --------------------------------------------------------------------------------------
    def _event(self, stream: str, event: str, version: str, detail: str) -> None:
        for fn in [*self._listeners, self.on_event]:
            if fn is None:
                continue
            try:
                fn(stream, event, version, detail)
            except Exception:  # a failing listener must not stop training
                log.exception("learning event listener failed")

    def status(self) -> dict[str, Any]:
        """What the loop is doing: the running job, counts of runs, queued jobs."""
        with self._db:
            queued = [r[0] for r in self._con.execute("SELECT stream FROM job WHERE status = 'queued' ORDER BY id").fetchall()]
        rj = self.running_job
        return {"running": None if rj is None else {"job": rj.id, "stream": rj.stream, "trigger": rj.trigger},
                "queued": queued, "runs": dict(self.runs)}

    def close(self) -> None:
        self.stop()
        with self._db:
            self._con.close()
        self.replay.close()

