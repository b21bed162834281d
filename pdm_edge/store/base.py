"""The store interface: what pdm-edge writes (scores, alerts, labels, model events) and reads back.

Two implementations sit behind :class:`Store` (DESIGN.md section 4): InfluxDB over its
v1-compatible HTTP API (:mod:`pdm_edge.store.influx`) and SQLite as the embedded default
(:mod:`pdm_edge.store.sqlite`). Both give the same answers to the same queries; one parametrised
test suite runs against both.

Schema (InfluxDB names; SQLite uses one table per measurement with the same columns):

============== ============================================ ======================================== ==================
measurement    tags                                         fields                                   timestamp
============== ============================================ ======================================== ==================
anomaly_score  site, machine, sensor, model_version         score (float), threshold (float),        window start
                                                            is_anomaly (bool)
alert          site, machine, sensor, alert_id              state ("raised"/"cleared"), end_ns (int, alert start
                                                            0 while open), peak_score, threshold,
                                                            model_version (str)
label          site, machine, label_id                      kind, sensor, alert_id, fault_type,      label start
                                                            author, note (str), end_ns, created_ns
model_event    site, machine                                event, version, detail (str)             event time
condition      site, machine, sensor                        unit, zone (str; no zone: absent),       window start
                                                            rms, peak, crest_factor, kurtosis,
                                                            band_10_1k, band_1k_5k, band_5k_up,
                                                            velocity_rms_mm_s (float; absent: None)
============== ============================================ ======================================== ==================

``condition`` (:class:`pdm_edge.condition.Condition`: ISO 20816-3 velocity and zone, and the trend
values of each scored window) was added after the first four; a store file or database written
before it simply has none.

Timestamps are the natural key of each record, so writing the same record twice (a retry after
a timeout, a replayed spool) overwrites it instead of duplicating it: a score is keyed by its
window start, an alert by its start and id (its "cleared" update overwrites the "raised" point),
a label by its start and id. ``threshold`` is stored as NaN-free: an uncalibrated score has no
threshold field (InfluxDB) / NULL (SQLite).

Errors: every store failure is a :class:`~pdm_edge.errors.StoreError`; its subclasses (in
:mod:`pdm_edge.errors`) say which kind (unreachable, credentials, missing database, records refused for good), so that the
spool can retry the first three and isolate the last. Records are checked the same way by both
stores before writing (:mod:`pdm_edge.store.records`: finite numbers, names without control
characters or a trailing backslash), which raises ``ValueError`` / ``TypeError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from pdm_edge.condition import Condition
from pdm_edge.types import Alert, Label, Score


@dataclasses.dataclass(frozen=True)
class ModelEvent:
    """Something that happened to a machine's model: ``event`` is e.g. ``"calibrated"``,
    ``"promoted"``, ``"rejected"``, ``"rolled_back"``; ``version`` the model version id;
    ``detail`` free text (the gate's reason, say); ``ts_ns`` when it happened (ns, UTC)."""

    site: str
    machine: str
    ts_ns: int
    event: str
    version: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class ScoreBucket:
    """One bucket of a downsampled score series: the **maximum** score in
    ``[start_ns, start_ns + every)`` (a spike must not be averaged away), the threshold in force
    at that maximum, whether any window in the bucket was anomalous, and how many windows it has."""

    start_ns: int
    max_score: float
    threshold: float | None
    any_anomaly: bool
    count: int


@dataclasses.dataclass(frozen=True)
class MachineState:
    """Latest state of a machine for the fleet view.

    Attributes:
        site, machine: the machine.
        last_score_ns: start of the newest scored window (any sensor), ``None`` if never scored.
        last_score, last_threshold: that window's score and threshold.
        model_version: the model version of the newest score.
        open_alerts: alerts of the machine whose latest state is ``"raised"``.
    """

    site: str
    machine: str
    last_score_ns: int | None
    last_score: float | None
    last_threshold: float | None
    model_version: str | None
    open_alerts: int


class Store(Protocol):
    """Where scores, alerts, labels and model events are kept.

    Every ``write_*`` is idempotent (see the module docstring) and raises
    :class:`~pdm_edge.errors.StoreError` when the store cannot take the records (unreachable,
    refused, bad credentials); the caller (the spool) retries. Queries take a half-open time
    range ``[start_ns, end_ns)`` in ns since the epoch (UTC) and return records sorted by time.
    """

    kind: str
    """``"influxdb"`` or ``"sqlite"``."""

    def write_scores(self, scores: Sequence[Score]) -> None: ...
    def write_alerts(self, alerts: Sequence[Alert]) -> None: ...
    def write_labels(self, labels: Sequence[Label]) -> None: ...
    def write_model_events(self, events: Sequence[ModelEvent]) -> None: ...
    def write_conditions(self, conditions: Sequence[Condition]) -> None: ...

    def query_scores(self, site: str, machine: str, start_ns: int, end_ns: int, sensor: str | None = None) -> list[Score]: ...
    def query_score_buckets(self, site: str, machine: str, sensor: str, start_ns: int, end_ns: int, every_s: float) -> list[ScoreBucket]: ...
    def query_alerts(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[Alert]: ...
    def query_labels(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[Label]: ...
    def query_model_events(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[ModelEvent]: ...
    def query_conditions(self, site: str, machine: str, start_ns: int, end_ns: int, sensor: str | None = None) -> list[Condition]: ...
    def query_condition_buckets(self, site: str, machine: str, sensor: str, start_ns: int, end_ns: int,
                                every_s: float) -> list[Condition]:
        """Downsampled like the score: per epoch-aligned bucket of ``every_s`` seconds, the
        **maximum** of each value (a spike is never averaged away) and the worst zone (the one of
        the highest velocity), as a :class:`Condition` stamped with the bucket start; empty buckets omitted."""
        ...
    def machines(self) -> list[MachineState]: ...

    def server_info(self) -> dict[str, str]:
        """``{"type": ..., "version": ...}`` of the backing server or library."""
        ...

    def close(self) -> None: ...
