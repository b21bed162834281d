"""Configuration: one TOML file, environment-variable overrides, validated at start-up.

The file (example: ``deploy/pdm-edge.toml``) is read with :mod:`tomllib` and validated with
pydantic models that forbid unknown keys and coerce nothing (strict mode), so a typo or a
wrong type is caught at start-up as one :class:`~pdm_edge.errors.ConfigError` naming the key,
never later as a traceback.

Environment overrides: ``PDM_EDGE__SECTION__KEY=value`` sets ``[section] key``; the double
underscore separates levels and names are case-insensitive (``PDM_EDGE__MQTT__BROKER=
10.0.0.5:1883``). The value is read as a TOML value when it parses as one (``30``, ``true``,
``"x"``) and as a plain string otherwise. Per-sensor tables, whose names contain ``/``, cannot be
overridden this way. ``PDM_EDGE_CONFIG`` names the file when ``--config`` is not given.

Per-sensor settings live in ``[sensors."site/machine/sensor"]`` tables: kind (vibration or
acoustic), sample rate (Hz), unit, window and hop (s).

**One state directory for every process** (issue 15): ``state_dir`` (top level) is where
relative paths of the configuration resolve (``[store] sqlite_path``, ``[spool] path``,
``[feedback] state_dir``, ``[registry] dir`` and ``verify_key`` files, ``[dashboard]
users_file``, ``ca_file`` keys), never the working directory, so the appliance, the dashboard and
the CLI started from different directories open the same files. ``state_dir`` itself, when
relative or unset (``"."``), resolves against the directory of the configuration file (the
working directory only for a configuration built from the environment alone). Every path of a
loaded :class:`AppConfig` is absolute.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdm_edge.errors import ConfigError
from pdm_edge.types import SensorKind, Unit

DEFAULT_ALERT_K, DEFAULT_ALERT_N = 3, 5
"""The default alert rule (``[alerts] k``/``n``): 3 of the last 5 windows above the threshold."""

PRIVATE_UMASK = 0o077
"""The process umask of every ``pdm-edge`` command (and of the systemd units' ``UMask=``): the
state files it creates (spool, store, label book, registry, the demo's configuration, which may
hold passwords) are 0600 and its directories 0700, readable by the service user alone."""
ENV_PREFIX = "PDM_EDGE__"
ENV_CONFIG_PATH = "PDM_EDGE_CONFIG"
MAX_NAME_CHARS = 64
"""Longest site, machine, sensor or appliance name (a topic level), in characters: bounds the
size of every per-stream line of ``/metrics`` and ``/healthz`` and of every stored tag."""
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,%d}$" % MAX_NAME_CHARS)
"""Site, machine, sensor and appliance names: the characters allowed in a topic level, at most
:data:`MAX_NAME_CHARS` of them."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def parse_host_port(value: str, default_port: int = 1883) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"host"``, or ``"[v6addr]:port"``) into its parts.

    Raises:
        ValueError: for an empty host or a port outside 1..65535.
    """
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    else:
        host, port_s = value, ""
    if not host:
        raise ValueError(f"no host in {value!r}; expected HOST:PORT")
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise ValueError(f"port in {value!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    return host, port


class MqttConfig(_Strict):
    """How pdm-edge reaches the MQTT broker."""

    broker: str
    """``HOST:PORT`` of the broker (required)."""
    protocol: Literal["5", "3.1.1"] = "5"
    """MQTT protocol version. The embedded demo broker speaks 3.1.1 only."""
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    """CA bundle for TLS; the system trust store when unset. Verification is always on."""
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)
    """How long the broker keeps the appliance's persistent session (queued QoS 1 chunks)
    while it is offline (MQTT 5; on 3.1.1 the broker's own setting applies)."""
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    qos: Literal[0, 1] = 1
    """QoS of the waveform subscription."""

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @property
    def host(self) -> str:
        return parse_host_port(self.broker)[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.broker)[1]


class DefaultSensorConfig(_Strict):
    """Window settings for streams accepted without their own ``[sensors]`` table."""

    window_s: float = Field(1.0, gt=0)
    hop_s: float = Field(0.5, gt=0)


class IngestConfig(_Strict):
    """Limits and policies of the ingestion stage."""

    queue_size: int = Field(2000, ge=1)
    """Bounded queue of decoded chunks between the MQTT callback and the windowing worker."""
    window_queue_size: int = Field(2000, ge=1)
    """Bounded queue of windows handed to the next stage."""
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_samples_per_chunk: int = Field(1_048_576, ge=1)
    max_time_jitter_s: float = Field(0.002, ge=0)
    """A chunk whose timestamp differs from the one implied by the previous chunk and the sample
    rate by more than this (or by more than one sample period, whichever is larger) is a gap."""
    unknown_streams: Literal["reject", "accept"] = "reject"
    """``reject``: chunks of a stream without a ``[sensors]`` table are dead-lettered as
    ``unknown_stream``. ``accept`` (commissioning): they are windowed with ``[ingest.default_sensor]``
    at the sample rate the chunk declares; a later change of that rate resets the stream."""
    default_sensor: DefaultSensorConfig = Field(default_factory=DefaultSensorConfig)
    max_streams: int = Field(1024, ge=1)
    """Most streams accepted without configuration (bounds memory against topic floods)."""
    deadletter: bool = True
    """Publish rejected payloads to ``pdm/v1/_deadletter/{reason}`` (they are counted either way)."""
    min_sample_rate_hz: float = Field(1.0, gt=0)
    max_sample_rate_hz: float = Field(1_000_000.0, gt=0, le=10_000_000)
    """Plausible sample rates, Hz, whatever a stream's configuration says: a chunk outside is
    dead-lettered as ``implausible_sample_rate`` (buffers are sized from the rate)."""
    min_timestamp_ns: int = Field(0, ge=0)
    """Earliest plausible chunk timestamp, ns since the epoch (0: any; recordings replayed with
    their own clock may start at 0)."""
    max_future_s: float = Field(86_400.0, gt=0)
    """A chunk stamped more than this ahead of the appliance clock is dead-lettered as
    ``implausible_time`` (a sensor clock in the year 2200 must not freeze its machine's state).
    The default, one day, lets ``pdm-edge replay --speed max`` replay a day of recording stamped
    from now; on a plant whose sensors keep time (NTP/PTP), 300 s is a tighter choice. Windows
    of a stream never go back in time (``time_backwards``), so a stream whose clock ran ahead
    loses, counted, the windows until its clock passes the newest one: at most this long."""
    window_queue_max_bytes: int = Field(32 * 1024 * 1024, ge=1024 * 1024)
    """Bound of the window queue in bytes of samples (besides ``window_queue_size`` windows)."""
    chunk_queue_max_bytes: int = Field(32 * 1024 * 1024, ge=1024 * 1024)
    """Bound of the chunk queue in bytes of samples (besides ``queue_size`` chunks)."""


class BearingConfig(_Strict):
    """A rolling-element bearing's geometry: ``[sensors."..".bearing]`` (see :mod:`pdm_edge.bearing`)."""

    n_elements: int = Field(ge=1)
    element_diameter_mm: float = Field(gt=0)
    pitch_diameter_mm: float = Field(gt=0)
    contact_angle_deg: float = Field(0.0, ge=0, lt=90)
    name: str = ""

    @model_validator(mode="after")
    def _geometry(self) -> BearingConfig:
        self.geometry()  # raises ValueError with the reason
        return self

    def geometry(self) -> Any:
        """The :class:`pdm_edge.bearing.BearingGeometry`."""
        from pdm_edge.bearing import BearingGeometry

        return BearingGeometry(self.n_elements, self.element_diameter_mm, self.pitch_diameter_mm,
                               self.contact_angle_deg, self.name)


class SensorConfig(_Strict):
    """One sensor stream: ``[sensors."site/machine/sensor"]``."""

    kind: SensorKind
    sample_rate_hz: float = Field(gt=0, le=1_000_000)
    unit: Unit
    window_s: float = Field(1.0, gt=0, le=60)
    hop_s: float = Field(0.5, gt=0, le=600)
    shaft_hz: float | None = Field(None, gt=0, le=1000)
    """Shaft speed, Hz (rev/s), when it is constant and known: with ``bearing`` it places the
    defect frequencies (BPFO/BPFI/BSF/FTF) on the dashboard's envelope spectrum."""
    bearing: BearingConfig | None = None
    """The monitored bearing's geometry (vibration sensors)."""
    severity_zones_mm_s: list[float] = Field(default_factory=lambda: [1.4, 2.8, 4.5])
    """ISO 20816-3 zone boundaries A/B, B/C, C/D, velocity RMS 10-1000 Hz in mm/s, for the
    machine's group and support (default: group 2, rigid; see :mod:`pdm_edge.condition`)."""

    @model_validator(mode="after")
    def _zones(self) -> SensorConfig:
        from pdm_edge.condition import check_boundaries

        check_boundaries(self.severity_zones_mm_s)  # ValueError with the reason
        return self

    @model_validator(mode="after")
    def _whole_samples(self) -> SensorConfig:
        for name in ("window_s", "hop_s"):
            n = getattr(self, name) * self.sample_rate_hz
            if abs(n - round(n)) > 1e-6 * max(1.0, n) or round(n) < 1:
                raise ValueError(f"{name} * sample_rate_hz = {n:g} is not a whole number of samples")
        return self

    @property
    def window_samples(self) -> int:
        return round(self.window_s * self.sample_rate_hz)

    @property
    def hop_samples(self) -> int:
        return round(self.hop_s * self.sample_rate_hz)

    @property
    def rate(self) -> Fraction:
        """The sample rate as an exact fraction (Hz), for exact timestamp arithmetic."""
        return Fraction(self.sample_rate_hz)


class StoreConfig(_Strict):
    """Where results go: ``[store]``. SQLite (embedded, default) or InfluxDB (v1 HTTP API)."""

    backend: Literal["sqlite", "influxdb"] = "sqlite"
    sqlite_path: str = "var/pdm-edge.sqlite"
    """SQLite store file (backend = "sqlite"); a relative path resolves against ``state_dir``."""
    url: str | None = None
    """InfluxDB base URL, e.g. ``http://127.0.0.1:8086`` (backend = "influxdb")."""
    database: str = "pdm_edge"
    """InfluxDB 1.x database; on 2.x / 3 the database name mapped to the bucket (DBRP)."""
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None
    """InfluxDB 2.x / 3 API token (sent as ``Authorization: Token ...``); prefer an environment
    override (``PDM_EDGE__STORE__TOKEN``) to writing it here."""
    verify_tls: bool = True
    ca_file: str | None = None
    timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _influx_needs_url(self) -> StoreConfig:
        if self.backend == "influxdb" and not self.url:
            raise ValueError("backend = \"influxdb\" needs url")
        return self


class SpoolConfig(_Strict):
    """The durable local spool between the pipeline and the store: ``[spool]``."""

    path: str = "var/spool.sqlite"
    max_records: int = Field(5_000_000, ge=100)
    """Bound of the spool; when it is reached the oldest *scores* are dropped first (alerts,
    labels and model events are kept) and ``spool_dropped`` is counted."""
    batch_size: int = Field(5000, ge=1)
    backoff_min_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)


class AlertsConfig(_Strict):
    """Alerts and status over MQTT: ``[alerts]``."""

    publish_scores: bool = True
    """Publish every score on ``pdm/v1/{site}/{machine}/{sensor}/score`` (QoS 0)."""
    no_score_sites: list[str] = Field(default_factory=list)
    """Sites for which scores are not published (alerts and status still are)."""
    k: int = Field(DEFAULT_ALERT_K, ge=1)
    n: int = Field(DEFAULT_ALERT_N, ge=1)
    """The alert rule: raise when ``k`` of the last ``n`` windows are above the threshold. The
    one source of ``k`` and ``n`` (:mod:`pdm_edge.alerts.debounce`): the alerts, the scoring
    stage's quiet-window test and the model's threshold calibration all take them from here."""
    stale_after_s: float = Field(60.0, gt=0)
    """A machine whose newest score is older than this is reported as stale."""

    @model_validator(mode="after")
    def _k_of_n(self) -> AlertsConfig:
        if self.k > self.n:
            raise ValueError(f"k = {self.k} must not exceed n = {self.n} (an alert needs k of the last n windows)")
        return self


class FeedbackConfig(_Strict):
    """Technician labels and the windows they cover: ``[feedback]`` (see :mod:`pdm_edge.feedback`)."""

    state_dir: str = "var"
    """The label book ``labels.sqlite`` and the labelled-window buffer ``label_windows.sqlite``
    live here (a relative path resolves against the top-level ``state_dir``)."""
    max_span_s: float = Field(7 * 24 * 3600.0, gt=0)
    """Longest span a label may cover, seconds (a longer one is refused as a likely typo)."""
    max_note_chars: int = Field(2000, ge=0)
    """Longest note, in characters."""
    max_author_chars: int = Field(200, ge=1)
    """Longest author, in characters."""
    mqtt_label_identity: bool = True
    """Labels over MQTT must be published on ``pdm/v1/{site}/{machine}/label/{user}``; ``{user}``,
    checked by the broker's ACL, is the label's author (see :mod:`pdm_edge.feedback.listener`).
    False also accepts the old topic without the user level, with the payload's author."""
    buffer_max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    """Bound of the labelled-window buffer (sum of the stored samples, bytes); beyond it windows
    are evicted: unlabelled (held) first, then ``ignore``, then ``normal``, ``fault`` last,
    oldest first within each class."""
    buffer_max_age_s: float = Field(30 * 24 * 3600.0, gt=0)
    """Windows of ``normal`` and ``ignore`` labels are dropped this long after they were stored;
    ``fault`` windows are exempt (only the byte bound evicts them)."""
    buffer_hold_max_age_s: float = Field(7 * 24 * 3600.0, gt=0)
    """Unlabelled windows held for a possible label (e.g. an alert's span) are dropped this long
    after they were stored unless a label claims them."""
    recent_s: float = Field(30.0, gt=0, le=3600)
    """Horizon of the in-memory ring of recent windows per stream, seconds of stream time: a label
    that arrives within this time of the windows it covers can still capture them (an alert's
    windows are held on disk when it is raised, so a label on an alert can come any time)."""
    recent_max_bytes_per_stream: int = Field(8 * 1024 * 1024, ge=1024 * 1024)
    """Memory bound of that ring per stream, bytes of samples (the older windows go first)."""


class LearningConfig(_Strict):
    """The on-device training loop: ``[learning]`` (see :mod:`pdm_edge.learning`)."""

    calibration_s: float = Field(600.0, gt=0)
    """Seconds of a new stream's windows taken as its normal baseline before the first
    calibration (the appliance is commissioned on a healthy machine)."""
    retrain_after_labels: int = Field(5, ge=1)
    """A retrain is triggered when this many new labels (normal or fault) covering a stream's
    windows have arrived since its last training."""
    replay_normal_windows: int = Field(2000, ge=20)
    """Size of the reservoir of normal windows per stream (the replay buffer)."""
    gate_fraction: float = Field(0.2, gt=0, lt=0.5)
    """Fraction of the replay buffer's normal windows held back for the gate."""
    gate_margin: float = Field(0.01, ge=0, le=1)
    """How much higher (absolute fraction of held-back normal windows) a candidate's false-alarm
    rate may be than the active version's."""
    confirm_far_above: float = Field(3.0, ge=0)
    """Label rule of the gate (issue 15 row 16): a retrain whose ``normal`` labels cover windows
    the active version scores above this many times its threshold needs an engineer's
    confirmation (``pdm-edge models promote``) instead of being promoted. 0 turns it off."""
    confirm_silenced_alerts: bool = True
    """Label rule of the gate: a retrain that would stop alerting on a labelled ``normal`` span
    the active version alerts on needs an engineer's confirmation."""
    max_train_steps: int = Field(48, ge=1)
    """Optimiser steps (batches of 32 windows) of one adapter training, checked before every
    batch (an epoch cut short by it is validated and kept): the budget that decides how much a
    large calibration trains, the same on every machine. 48 steps are 1.6 epochs of a 10 min
    calibration (959 training windows); on the development data they detect as well as the
    earlier 120 s budget's 7-8 epochs (``models/README.md``, "Calibration time")."""
    max_train_seconds: float = Field(120.0, gt=0)
    """Wall-time budget of one adapter training, checked before every batch like
    ``max_train_steps``: the safety net of a slow or loaded machine."""
    lora_rank: int = Field(4, ge=1, le=64)
    """Rank of the LoRA modules."""
    target_false_alerts_per_h: float = Field(0.1, gt=0)
    """False alerts per hour the threshold aims at."""
    nice: int = Field(10, ge=0, le=19)
    """OS niceness added to the training thread (Linux; ignored elsewhere)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Adapter optimiser: ``adamw``, or ``sgd`` (no momentum: no optimiser state). 8-bit
    optimiser states are not offered (see :mod:`pdm_edge.learning.trainer`)."""
    micro_batch: int = Field(8, ge=0)
    """Windows per forward/backward pass, gradients accumulated over a batch of 32 (the same
    update to float rounding, ``tests/test_trainer.py``); 0: the whole batch in one pass. The
    default keeps training memory more than 5x below full fine-tuning's
    (``benchmarks/train_memory.py``)."""
    grad_checkpointing: bool = False
    """Recompute the adapted blocks' activations in the backward pass instead of keeping them
    (the same gradients; with micro-batches of 8 about 4 MB less training memory for about 1.5x
    the training time, ``benchmarks/train_memory.py``: off by default)."""
    prefix_cache: bool = False
    """Run the frozen blocks below the first LoRA block once per window per training job and
    keep their outputs (only matters when LoRA is not in every block; saves time, costs memory)."""
    max_memory_mb: float = Field(0.0, ge=0)
    """Memory envelope of a training job, MiB: the loop picks the micro-batch and moves the
    frozen-prefix cache to a file to fit, and fails the job with the reason when it cannot.
    0: no envelope."""
    aug_gain_db: float = Field(0.0, ge=0)
    """Augmentation of replay windows in training (:mod:`pdm_edge.learning.augment`): gain,
    uniform in +- this many dB; 0: off."""
    aug_noise_snr_db: float = Field(0.0, ge=0)
    """Augmentation: noise added at this signal-to-noise ratio, dB; 0: off."""
    aug_shift_frames: int = Field(0, ge=0, le=31)
    """Augmentation: time shift, uniform in +- this many frames of the 32; 0: off."""
    aug_speed_pct: float = Field(0.0, ge=0, le=20)
    """Augmentation: speed change, uniform in +- this many percent; 0: off."""
    inference: Literal["float32", "int8"] = "float32"
    """Scoring path of the models this appliance calibrates: ``int8`` scores (and calibrates,
    so the threshold fits) with the frozen encoder's linear layers dynamically quantised
    (:mod:`pdm_edge.model.quantize`; faster on CPUs, scores differ slightly) and trains the
    adapter quantisation-aware on that path's forward pass; each model version records its path."""
    max_load_start: float = Field(0.0, ge=0)
    """A training job starts only while the 1-minute load average per CPU is below this (psutil);
    0: not checked (the default: the appliance's own scoring is load, so the right value depends
    on the box; 0.5 suits a box that only scores)."""
    max_load_pause: float = Field(0.0, ge=0)
    """A running job pauses (checkpoint, back to the queue) above this load per CPU; keep it
    above ``max_load_start`` by at least 1 / CPUs (the job's own thread). 0: not checked."""
    max_cpu_temp_c: float = Field(85.0, ge=0)
    """No start, and a pause, at or above this CPU temperature (deg C, psutil); 0: not checked."""
    min_battery_percent: float = Field(20.0, ge=0, le=100)
    """On battery power: no start, and a pause, below this charge."""
    train_on_battery: bool = True
    """False: no training while on battery power."""
    when_sensor_absent: Literal["ignore", "block"] = "ignore"
    """A limit whose sensor this machine lacks (no temperature sensor, no load average) is not
    checked (``ignore``) or keeps training from running (``block``)."""


class RegistryConfig(_Strict):
    """Model versions: ``[registry]`` (see :mod:`pdm_edge.registry`)."""

    dir: str = "var/registry"
    """The registry directory (index and version files); relative to the top-level ``state_dir``."""
    verify_key: str | list[str] | None = None
    """Ed25519 public key(s) that imported packages must be signed with: a PEM file path or the
    PEM text, or a list of them. When set, ``pdm-edge models import`` (and every import through
    :meth:`pdm_edge.registry.Registry.from_config`) refuses unsigned, tampered and foreign-signed
    packages."""


class ServiceConfig(_Strict):
    """The running appliance (``pdm-edge run``): ``[service]``."""

    http: str = "127.0.0.1:9108"
    """HOST:PORT of the health endpoint (``/healthz``) and Prometheus metrics (``/metrics``)."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads of the scoring worker; numpy's and scipy's BLAS / OpenMP pools are
    capped to the same number (threadpoolctl): the feature step's matrix products otherwise
    start one BLAS thread per core, which on a small, busy appliance spin against the
    service's own threads (measured: the 1 s window's band spectrogram 3x slower on 2 cores)."""
    score_batch: int = Field(64, ge=1)
    """Most windows scored in one batch."""
    backlog_max_bytes: int = Field(32 * 1024 * 1024, ge=1024 * 1024)
    """Bytes of samples held, over all streams, in the backlogs of streams that wait for their
    calibration (the oldest windows beyond it are dropped and counted as
    ``pdm_edge_records_dropped_total{kind="window",reason="calibration_backlog"}``)."""
    min_free_bytes: int = Field(64 * 1024 * 1024, ge=0)
    """Below this many free bytes in a state directory (spool, store, registry, labels)
    ``/healthz`` is degraded and says which directory."""


class DashboardConfig(_Strict):
    """The Streamlit dashboard: ``[dashboard]``."""

    address: str = "127.0.0.1"
    port: int = Field(8501, ge=1, le=65535)
    users_file: str | None = None
    """TOML file of users with hashed passwords and roles (engineer / technician); without it
    the dashboard is read-only and says so."""
    refresh_s: float = Field(5.0, gt=0)
    """How often the live views refresh, seconds."""


class FleetConfig(_Strict):
    """Fleet learning through Flower (opt-in): ``[fleet]`` (see :mod:`pdm_edge.fleet`)."""

    enabled: bool = False
    """Opt-in: the appliance joins federated rounds (``pdm-edge fleet join``) and its new streams
    calibrate from the fleet prior of their class. Off: nothing leaves the appliance."""
    server: str = "127.0.0.1:8000"
    """``HOST:PORT`` of the Flower SuperLink's fleet API (``pdm-edge fleet server``)."""
    machine_class: str = "default"
    """The configured part of a stream's machine class (sensor kind and sample-rate band are the
    others, :func:`pdm_edge.fleet.classes.machine_class`): machines of one kind, e.g. ``pump-a``."""
    schedule: str = "00:00-24:00"
    """UTC window ``HH:MM-HH:MM`` in which the appliance takes part in rounds (may wrap midnight)."""
    only_when_idle: bool = True
    """Skip rounds while the appliance's own training loop has a job running."""
    use_prior: bool = True
    """Calibrate streams starting from the fleet prior of their class when one is stored."""
    insecure: bool = False
    """Talk to the SuperLink without TLS (loopback tests only)."""
    root_certificates: str | None = None
    """PEM CA bundle that the SuperLink's TLS certificate must chain to."""
    auth_private_key: str | None = None
    """SuperNode authentication private key (Flower's ``--auth-supernode-private-key``: an EC
    P-384 key in OpenSSH format, ``pdm_edge.fleet.runner.generate_node_key``); the operator
    registers the public key beside it (``.pub``) with the SuperLink."""
    verify_key: str | None = None
    """Ed25519 public key (PEM) that fleet priors and imported delta packages must be signed with;
    unsigned ones are refused when set (``[registry] verify_key`` when unset)."""
    max_train_seconds: float = Field(60.0, gt=0)
    """Wall-time budget of one round's local training."""

    @field_validator("machine_class")
    @classmethod
    def _class(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} must match [A-Za-z0-9_-]+")
        return v

    @field_validator("server")
    @classmethod
    def _server(cls, v: str) -> str:
        parse_host_port(v, 8000)
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        from pdm_edge.fleet.classes import parse_schedule

        parse_schedule(v)
        return v


class ClusterConfig(_Strict):
    """Several ``pdm-edge run`` instances sharing one site's configured streams: ``[cluster]``
    (see :mod:`pdm_edge.runtime.cluster` and deploy/README.md section 11).

    Every instance of a group has the same ``[sensors]`` tables and its own ``appliance_id``,
    state directory and registry; each stream is owned by exactly one live instance
    (rendezvous hashing over the members the broker reports), which alone subscribes to its
    waveform topic, scores it and acts on its machine's labels."""

    enabled: bool = False
    """Off (default): this instance serves every stream it receives, as a lone appliance."""
    group: str = "default"
    """The site group: instances with the same group (and broker) share its streams; membership
    topics ``pdm/v1/_cluster/{group}/members/{instance}``."""
    instance: str | None = None
    """This instance's id in the group (a topic level); ``appliance_id`` when unset (the
    appliance id already has to differ between instances: it names their MQTT clients)."""
    heartbeat_s: int = Field(5, ge=2, le=600)
    """Keep-alive of the membership connection, s: the broker declares a silent instance gone
    after 1.5 times this."""
    takeover_delay_s: int = Field(2, ge=0, le=3600)
    """MQTT 5 Will Delay Interval (and session expiry) of the membership connection, s: a crashed
    or disconnected instance's streams move after ``1.5 * heartbeat_s + takeover_delay_s``; a
    reconnect within this delay moves nothing. A clean stop moves them at once."""
    share_models: bool = True
    """The owner of a stream publishes every version it makes active (a signed model package,
    retained, on ``pdm/v1/_cluster/{group}/models/{site}/{machine}/{sensor}``); every other
    instance verifies it (sha256, signature against ``[registry] verify_key`` when set) and makes
    it active in its own registry, so a new owner scores at once instead of calibrating."""
    signing_key: str | None = None
    """Ed25519 private key (PEM, ``pdm-edge models keygen``) the packages are signed with;
    unsigned when unset (then ``[registry] verify_key`` must be unset on the others)."""

    @field_validator("group", "instance")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError(f"{v!r} must match [A-Za-z0-9_-]+")
        return v


class AppConfig(_Strict):
    """The whole appliance configuration (the TOML file's top level)."""

    state_dir: str = "."
    """Where relative paths of this file resolve (see the module docstring); absolute once
    loaded. The shipped configuration sets ``/var/lib/pdm-edge``."""

    appliance_id: str = "pdm-edge"
    """Names the appliance: MQTT client ids and ``pdm/v1/_appliance/{id}/status``."""
    site: str = "site"
    """Default site for the command-line publishers."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mqtt: MqttConfig
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    learning: LearningConfig = Field(default_factory=LearningConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sensors: dict[str, SensorConfig] = Field(default_factory=dict)

    @field_validator("appliance_id", "site")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} must match [A-Za-z0-9_-]+")
        return v

    @field_validator("sensors")
    @classmethod
    def _stream_keys(cls, v: dict[str, SensorConfig]) -> dict[str, SensorConfig]:
        for key in v:
            parts = key.split("/")
            if len(parts) != 3 or not all(NAME_RE.match(p) for p in parts):
                raise ValueError(f"sensor key {key!r} must be \"site/machine/sensor\" with names [A-Za-z0-9_-]+")
        return v

    @model_validator(mode="after")
    def _cluster(self) -> AppConfig:
        if self.cluster.enabled:
            if self.mqtt.protocol != "5":
                raise ValueError("[cluster] enabled needs [mqtt] protocol = \"5\" (will delay, session expiry)")
            if self.ingest.unknown_streams == "accept":
                raise ValueError("[cluster] enabled serves configured streams only: set [ingest] unknown_streams = "
                                 "\"reject\" (an unconfigured stream has no owner)")
            if not self.sensors:
                raise ValueError("[cluster] enabled needs the group's [sensors] tables (the streams to share)")
        return self

    @property
    def cluster_instance(self) -> str:
        """This instance's id in its cluster group (``[cluster] instance`` or ``appliance_id``)."""
        return self.cluster.instance or self.appliance_id

    def sensor(self, site: str, machine: str, sensor: str) -> SensorConfig | None:
        """The configured settings of one stream, or ``None`` when it has no table."""
        return self.sensors.get(f"{site}/{machine}/{sensor}")


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path), f"cannot override inside non-table key (from ${name})")
            node = child
        node[path[-1]] = _parse_env_value(raw)
    return data


def _format_errors(err: ValidationError) -> ConfigError:
    first = None
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"].endswith("_type"):
                msg += f" (got {type(e['input']).__name__} {e['input']!r})"
        lines.append(f"{key}: {msg}")
        if first is None:
            first = (key, msg)
    assert first is not None
    extra = f" (and {len(lines) - 1} more: {'; '.join(lines[1:])})" if len(lines) > 1 else ""
    return ConfigError(first[0], first[1] + extra)


def config_from_dict(data: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                     base_dir: str | os.PathLike[str] | None = None) -> AppConfig:
    """Validate a configuration mapping (as parsed from TOML), after environment overrides, and
    make every path absolute (see the module docstring).

    Args:
        data: the parsed TOML document.
        environ: environment to read ``PDM_EDGE__*`` overrides from (``os.environ`` if None).
        base_dir: where a relative ``state_dir`` resolves (the configuration file's directory;
            the working directory when None).

    Raises:
        ConfigError: naming the first offending key (unknown key, wrong type, missing broker).
    """
    merged = _apply_env(_deep_copy(data), os.environ if environ is None else environ)
    try:
        cfg = AppConfig.model_validate(merged)
    except ValidationError as err:
        raise _format_errors(err) from None
    return resolve_paths(cfg, base_dir)


def resolve_paths(cfg: AppConfig, base_dir: str | os.PathLike[str] | None = None) -> AppConfig:
    """``cfg`` with ``state_dir`` absolute (relative: against ``base_dir``, else the working
    directory) and every relative path of the configuration resolved against it."""
    state = Path(cfg.state_dir)
    if not state.is_absolute():
        state = Path(os.path.abspath(Path(base_dir) if base_dir is not None else Path.cwd())) / state
    state = Path(os.path.normpath(state))

    def r(p: str | None) -> str | None:
        return p if p is None or os.path.isabs(p) else os.path.normpath(state / p)

    vk = cfg.registry.verify_key
    if isinstance(vk, str):
        vk = vk if vk.lstrip().startswith("-----BEGIN") else r(vk)
    elif vk is not None:
        vk = [k if k.lstrip().startswith("-----BEGIN") else r(k) for k in vk]
    return cfg.model_copy(update={
        "state_dir": str(state),
        "mqtt": cfg.mqtt.model_copy(update={"ca_file": r(cfg.mqtt.ca_file)}),
        "store": cfg.store.model_copy(update={"sqlite_path": r(cfg.store.sqlite_path), "ca_file": r(cfg.store.ca_file)}),
        "spool": cfg.spool.model_copy(update={"path": r(cfg.spool.path)}),
        "feedback": cfg.feedback.model_copy(update={"state_dir": r(cfg.feedback.state_dir)}),
        "registry": cfg.registry.model_copy(update={"dir": r(cfg.registry.dir), "verify_key": vk}),
        "dashboard": cfg.dashboard.model_copy(update={"users_file": r(cfg.dashboard.users_file)}),
        "cluster": cfg.cluster.model_copy(update={"signing_key": r(cfg.cluster.signing_key)}),
    })


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Read, override and validate the configuration file.

    Args:
        path: the TOML file; when None, ``$PDM_EDGE_CONFIG``; when that is unset too, the
            configuration is built from environment overrides alone.
        environ: environment for overrides (``os.environ`` if None).

    Raises:
        ConfigError: unreadable file (key ``""``), TOML syntax error, or invalid content.
    """
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get(ENV_CONFIG_PATH) or None
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("", f"configuration file not found: {p}") from None
        except OSError as exc:
            raise ConfigError("", f"cannot read configuration file {p}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"{p} is not valid TOML: {exc}") from None
        return config_from_dict(data, env, base_dir=Path(os.path.abspath(p)).parent)
    return config_from_dict(data, env)


# ---------------------------------------------------------------------------------------------
# configuration as TOML (the demo writes its configuration for the dashboard); tomllib reads only

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """A TOML document for a nested mapping of str/int/float/bool/lists (``None`` values are
    left out; nested mappings become tables). ``load_config`` reads it back unchanged.

    Raises:
        TypeError: a value of another type.
    """
    lines: list[str] = []

    def table(prefix: list[str], d: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in d.items() if v is not None and not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in d.items() if isinstance(v, Mapping)]
        if prefix and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables:
            table([*prefix, k], v)

    table([], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def config_toml(cfg: AppConfig) -> str:
    """``cfg`` as a TOML file that :func:`pdm_edge.config.load_config` reads back to ``cfg``."""
    return dump_toml(cfg.model_dump(mode="python", exclude_none=True))
