"""The one exception hierarchy of pdm-edge.

Every error the library raises on purpose derives from :class:`PdmEdgeError`, so a caller
(the CLI, the service loop) can catch one type and print a clear message instead of a
traceback.
"""

from __future__ import annotations


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


class RecordingError(PdmEdgeError):
    """A recording file cannot be read: missing, unknown format, or missing channel/metadata."""


class BrokerError(PdmEdgeError):
    """The MQTT broker cannot be reached or refused the connection."""


class ModelError(PdmEdgeError):
    """A model or model version cannot be used: wrong encoder, bad file, mismatched stream."""


class RegistryError(ModelError):
    """The model registry refused an operation: unknown version, a status change that is not
    allowed, or a package that failed verification (the message names the failed check)."""


class NotCalibratedError(ModelError):
    """The machine has no baseline yet: too few normal windows, or calibration has not run."""


class StoreError(PdmEdgeError):
    """The store (InfluxDB or SQLite) cannot take or return records: unreachable, refused,
    bad credentials, or a malformed answer. Writers retry; the message says which."""
