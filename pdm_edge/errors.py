"""The one exception hierarchy of pdm-edge.

Every error the library raises on purpose derives from :class:`PdmEdgeError`, so a caller
(the CLI, the service loop) can catch one type and print a clear message instead of a
traceback. Every exception class of the package is defined here and nowhere else::

    PdmEdgeError
    +-- ConfigError             the configuration is invalid (key, message)
    +-- PayloadError            an MQTT payload is dead-lettered (reason, detail)
    +-- LabelError (ValueError) a label is invalid (field, message)
    +-- FeatureError (ValueError)
    |                           input features cannot be computed from
    +-- RecordingError          a recording file cannot be read
    +-- BrokerError             the MQTT broker cannot be reached
    +-- FleetError              a fleet (Flower) process or run failed
    +-- ModelError              a model or model version cannot be used
    |   +-- RegistryError       the registry refused an operation
    |   +-- NotCalibratedError  no baseline yet
    |   +-- TrainingInterrupted adapter training stopped on request, checkpoint written
    +-- StoreError              a store cannot take or return records
        +-- StoreUnavailableError   transient: unreachable, timeout, 5xx, locked (retried)
        +-- StoreAuthError          credentials refused (401/403)
        +-- StoreNotFoundError      database / bucket missing
        +-- StoreRejectedError      records refused for good (400), isolated by the spool

Public re-exports (part of their package's API): :mod:`pdm_edge.store` re-exports the
``Store*Error`` classes, :mod:`pdm_edge.feedback` ``LabelError``, :mod:`pdm_edge.features`
``FeatureError``.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "FeatureError",
    "FleetError",
    "LabelError",
    "ModelError",
    "NotCalibratedError",
    "PayloadError",
    "PdmEdgeError",
    "RecordingError",
    "RegistryError",
    "StoreAuthError",
    "StoreError",
    "StoreNotFoundError",
    "StoreRejectedError",
    "StoreUnavailableError",
    "TrainingInterrupted",
]


class PdmEdgeError(Exception):
    """Base class of every error raised on purpose by pdm-edge."""


class ConfigError(PdmEdgeError):
    """The configuration is invalid.

    Attributes:
        key: dotted path of the offending key (``"mqtt.broker"``,
            ``"sensors.plant1/pump-07/de.sample_rate_hz"``), or ``""`` for the file itself.
        message: what is wrong with it, in one line.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class PayloadError(PdmEdgeError):
    """An MQTT payload failed decoding or validation; it is dead-lettered with ``reason``.

    Attributes:
        reason: one of :data:`pdm_edge.ingest.chunk.DEADLETTER_REASONS`; it becomes the last
            level of the dead-letter topic ``pdm/v1/_deadletter/{reason}``.
        detail: a short human-readable explanation (which field, which value).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class LabelError(PdmEdgeError, ValueError):
    """A label is invalid (raised by :mod:`pdm_edge.feedback.labels`).

    Attributes:
        field: the offending field (``"kind"``, ``"start_ns"``, ``"payload"`` for a payload that
            is not a JSON object, ...).
        message: what is wrong with it, in one line.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class FeatureError(PdmEdgeError, ValueError):
    """Input that features cannot be computed from (non-finite, empty, too short, unknown kind...).

    A ``ValueError`` (so callers may catch either) and a :class:`PdmEdgeError`.
    """


class RecordingError(PdmEdgeError):
    """A recording file cannot be read: missing, unknown format, or missing channel/metadata."""


class BrokerError(PdmEdgeError):
    """The MQTT broker cannot be reached or refused the connection."""


class FleetError(PdmEdgeError):
    """A fleet process could not be started or a run failed."""


class ModelError(PdmEdgeError):
    """A model or model version cannot be used: wrong encoder, bad file, mismatched stream."""


class RegistryError(ModelError):
    """The model registry refused an operation: unknown version, a status change that is not
    allowed, or a package that failed verification (the message names the failed check)."""


class NotCalibratedError(ModelError):
    """The machine has no baseline yet: too few normal windows, or calibration has not run."""


class TrainingInterrupted(ModelError):
    """Adapter training was asked to stop (service shutdown); its checkpoint was written."""


class StoreError(PdmEdgeError):
    """The store (InfluxDB or SQLite) cannot take or return records: unreachable, refused,
    bad credentials, or a malformed answer. Writers retry; the message says which."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached now (connection refused, timeout, DNS, 5xx, locked file):
    transient, the spool retries with back-off."""


class StoreAuthError(StoreError):
    """The store refused the credentials (HTTP 401/403)."""


class StoreNotFoundError(StoreError):
    """The database (or retention policy / bucket mapping) does not exist and was not created."""


class StoreRejectedError(StoreError):
    """The store understood the request and refused (some of) its records for good (HTTP 400:
    field type conflict, unparsable point). Retrying the same records cannot succeed; the spool
    isolates and drops such records and counts them as ``rejected``."""
