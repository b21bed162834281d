"""The waveform chunk of the MQTT contract (DESIGN.md section 2): encode, decode, validate.

A chunk is JSON on ``pdm/v1/{site}/{machine}/{sensor}/waveform``::

    {"ts": "2026-11-21T08:00:00.000000Z" | 1763712000000000000,   # first sample, ISO-8601 with
                                                                  # offset, or epoch ns (int)
     "fs": 25600,            # sample rate, Hz
     "unit": "g",            # "g" | "m/s2" | "Pa" | "FS"
     "seq": 42,              # per-stream sequence number, +1 per chunk
     "dtype": "float32",     # "float32" | "int16"
     "scale": 0.001,         # physical units per count; required for int16, optional for float32
     "data": "<base64 of little-endian samples>"}

``"values": [0.01, -0.02, ...]`` may replace ``dtype``/``scale``/``data`` for light integrations.

This module is the one codec: the publishers in ``sensors/`` encode with :func:`encode_chunk`
and the ingestion stage decodes with :func:`decode_chunk`. Decoding is pure (no I/O) and cheap
enough to run in the MQTT network thread; every failure raises
:class:`~pdm_edge.errors.PayloadError` with one of :data:`DEADLETTER_REASONS`.

Physical plausibility (issue 15): a hostile or broken publisher must not be able to make the
appliance allocate without bound or fail later in a worker thread, so decoding refuses

- names (topic levels) longer than :data:`~pdm_edge.config.MAX_NAME_CHARS` (``name_too_long``);
- a sample rate outside ``[min_sample_rate_hz, max_sample_rate_hz]`` (``implausible_sample_rate``;
  a window buffer is sized from it);
- integers that do not fit a signed 64-bit integer in ``seq``, ``fs``, ``scale`` or ``values``
  (a 400-digit integer is valid JSON; ``bad_schema``), timestamps outside int64
  (``bad_timestamp``).

Checks that need the configuration or the clock (configured rate, the plausible time range)
are made by :mod:`pdm_edge.ingest.service`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from pdm_edge._util.time import parse_time
from pdm_edge.config import MAX_NAME_CHARS, NAME_RE
from pdm_edge.errors import PayloadError
from pdm_edge.types import UNITS

WAVEFORM_TOPIC_FILTER = "pdm/v1/+/+/+/waveform"
DEADLETTER_TOPIC = "pdm/v1/_deadletter/{reason}"

DEADLETTER_REASONS: dict[str, str] = {
    "bad_topic": "topic is not pdm/v1/{site}/{machine}/{sensor}/waveform with names [A-Za-z0-9_-]+",
    "name_too_long": f"a site, machine or sensor name longer than {MAX_NAME_CHARS} characters",
    "too_large": "payload bytes or sample count above the configured limit",
    "bad_encoding": "payload is not UTF-8",
    "bad_json": "payload is not a JSON object",
    "bad_schema": "a field is missing, of the wrong type, or unknown",
    "bad_timestamp": "ts is neither epoch ns nor ISO-8601 with a UTC offset",
    "bad_dtype": "dtype is not float32 or int16, or scale is missing/invalid for int16",
    "bad_base64": "data is not valid base64",
    "bad_length": "no samples, or data length not a multiple of the sample size",
    "non_finite": "a sample (or the scale) is NaN or infinite",
    "unit_mismatch": "unit differs from the configured unit and cannot be converted",
    "sample_rate_mismatch": "fs differs from the configured sample rate",
    "implausible_sample_rate": "fs outside ingest.min_sample_rate_hz .. ingest.max_sample_rate_hz",
    "implausible_time": "ts before ingest.min_timestamp or more than ingest.max_future_s ahead of the appliance clock",
    "unknown_stream": "no [sensors] table for this stream and unknown_streams = reject",
    "stream_limit": "a new unconfigured stream beyond ingest.max_streams",
    "queue_full": "the ingestion chunk queue was full (overload)",
    "internal_error": "an unexpected error while decoding (a bug; logged with its traceback)",
    "bad_label": "a technician label on pdm/v1/{site}/{machine}/label failed validation (pdm_edge.feedback)",
}
"""Every reason an incoming payload (waveform chunk or label) can be rejected for, with what it
means. The reason is the last level of the dead-letter topic and the label of the dead-letter
counter."""

_DTYPES = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}
_KNOWN_FIELDS = frozenset({"ts", "fs", "unit", "seq", "dtype", "scale", "data", "values"})
_MAX_INT = 2**63 - 1
DEFAULT_MIN_SAMPLE_RATE_HZ = 1.0
DEFAULT_MAX_SAMPLE_RATE_HZ = 1_000_000.0


@dataclasses.dataclass(frozen=True, eq=False)
class Chunk:
    """A decoded, validated waveform chunk.

    Attributes:
        site, machine, sensor: from the topic.
        ts_ns: time of the first sample, ns since the Unix epoch (UTC).
        sample_rate_hz: the declared sample rate, Hz.
        unit: the declared unit (one of ``"g"``, ``"m/s2"``, ``"Pa"``, ``"FS"``).
        seq: the per-stream sequence number.
        samples: shape ``(n,)``, ``float32``, in ``unit`` (int16 already multiplied by scale).
        payload_bytes: size of the MQTT payload it came from.

    :attr:`digest` identifies the chunk's content (timestamp, seq, rate, samples): an MQTT QoS 1
    redelivery has the same digest, a restarted publisher's new chunk with a reused ``seq``
    does not.
    """

    site: str
    machine: str
    sensor: str
    ts_ns: int
    sample_rate_hz: float
    unit: str
    seq: int
    samples: np.ndarray
    payload_bytes: int = 0

    @property
    def stream(self) -> str:
        return f"{self.site}/{self.machine}/{self.sensor}"

    @functools.cached_property
    def digest(self) -> bytes:
        """16-byte BLAKE2b of ``(ts_ns, seq, sample_rate_hz, samples)``."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.ts_ns}/{self.seq}/{self.sample_rate_hz!r}/".encode())
        h.update(np.ascontiguousarray(self.samples).tobytes())
        return h.digest()


def waveform_topic(site: str, machine: str, sensor: str) -> str:
    """``pdm/v1/{site}/{machine}/{sensor}/waveform``."""
    return f"pdm/v1/{site}/{machine}/{sensor}/waveform"


def parse_waveform_topic(topic: str) -> tuple[str, str, str]:
    """Split a waveform topic into ``(site, machine, sensor)``.

    Raises:
        PayloadError: ``bad_topic`` when the topic does not match the contract.
    """
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != "pdm" or parts[1] != "v1" or parts[5] != "waveform":
        raise PayloadError("bad_topic", f"unexpected topic {topic[:200]!r}")
    site, machine, sensor = parts[2:5]
    for name in (site, machine, sensor):
        if len(name) > MAX_NAME_CHARS:
            raise PayloadError("name_too_long", f"topic level of {len(name)} characters > {MAX_NAME_CHARS}: {name[:32]!r}...")
        if not NAME_RE.match(name):
            raise PayloadError("bad_topic", f"topic level {name[:64]!r} is not [A-Za-z0-9_-]+")
    return site, machine, sensor


def parse_timestamp(ts: Any) -> int:
    """Read a chunk timestamp: an int of epoch ns, or an ISO-8601 string with a UTC offset
    (:func:`pdm_edge._util.time.parse_time`).

    Returns:
        epoch ns (UTC).

    Raises:
        PayloadError: ``bad_timestamp`` for floats (ambiguous seconds/ns), negative or
            out-of-range ints, unparsable strings, or ISO strings without an offset (a local
            time without zone cannot be placed on the time axis).
    """
    try:
        return parse_time(ts)
    except ValueError as exc:
        raise PayloadError("bad_timestamp", str(exc)) from None


def _number(obj: dict[str, Any], key: str) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PayloadError("bad_schema", f"{key} must be a number, got {type(v).__name__}")
    if isinstance(v, int) and not -_MAX_INT <= v <= _MAX_INT:
        raise PayloadError("bad_schema", f"{key} is an integer of {len(str(abs(v)))} digits, beyond int64")
    return float(v)


def decode_chunk(topic: str, payload: bytes, *, max_payload_bytes: int, max_samples: int,
                 min_sample_rate_hz: float = DEFAULT_MIN_SAMPLE_RATE_HZ,
                 max_sample_rate_hz: float = DEFAULT_MAX_SAMPLE_RATE_HZ) -> Chunk:
    """Decode and validate one waveform payload (everything that needs no configuration).

    Args:
        topic: the MQTT topic it arrived on.
        payload: the raw MQTT payload.
        max_payload_bytes: payloads above this are rejected before parsing.
        max_samples: chunks with more samples are rejected.
        min_sample_rate_hz, max_sample_rate_hz: the plausible range of ``fs``, Hz (whatever
            the configuration says for a stream; ``ingest.min/max_sample_rate_hz``).

    Returns:
        the :class:`Chunk`, samples as ``float32`` of shape ``(n,)``.

    Raises:
        PayloadError: with one of :data:`DEADLETTER_REASONS` (all but the configuration-
            dependent ``unit_mismatch``, ``sample_rate_mismatch``, ``unknown_stream`` and
            ``queue_full``, which :mod:`pdm_edge.ingest.service` decides).
    """
    site, machine, sensor = parse_waveform_topic(topic)
    size = len(payload)
    if size > max_payload_bytes:
        raise PayloadError("too_large", f"payload of {size} bytes > max_payload_bytes {max_payload_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("bad_encoding", f"invalid UTF-8 at byte {exc.start}") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError("bad_json", f"{exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise PayloadError("bad_json", f"payload is a JSON {type(obj).__name__}, not an object")
    unknown = set(obj) - _KNOWN_FIELDS
    if unknown:
        raise PayloadError("bad_schema", f"unknown field(s) {sorted(unknown)[:5]}")
    for key in ("ts", "fs", "unit", "seq"):
        if key not in obj:
            raise PayloadError("bad_schema", f"missing field {key!r}")
    ts_ns = parse_timestamp(obj["ts"])
    fs = _number(obj, "fs")
    if not math.isfinite(fs) or fs <= 0:
        raise PayloadError("bad_schema", f"fs must be a positive finite number of Hz, got {str(obj['fs'])[:32]!r}")
    if not min_sample_rate_hz <= fs <= max_sample_rate_hz:
        raise PayloadError("implausible_sample_rate",
                           f"fs {fs:g} Hz outside {min_sample_rate_hz:g} .. {max_sample_rate_hz:g} Hz")
    unit = obj["unit"]
    if unit not in UNITS:
        raise PayloadError("bad_schema", f"unit must be one of {UNITS}, got {str(unit)[:32]!r}")
    seq = obj["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= _MAX_INT:
        raise PayloadError("bad_schema", f"seq must be an integer in 0 .. 2**63-1, got {str(seq)[:32]!r}")

    if "values" in obj:
        if any(k in obj for k in ("data", "dtype", "scale")):
            raise PayloadError("bad_schema", "values cannot be combined with data/dtype/scale")
        values = obj["values"]
        if not isinstance(values, list):
            raise PayloadError("bad_schema", f"values must be a list, got {type(values).__name__}")
        if len(values) > max_samples:
            raise PayloadError("too_large", f"{len(values)} samples > max_samples_per_chunk {max_samples}")
        if not values:
            raise PayloadError("bad_length", "values is empty")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise PayloadError("bad_schema", "values must all be numbers")
        try:
            samples = np.asarray(values, dtype=np.float64)
        except OverflowError:  # an integer beyond float64 (valid JSON)
            raise PayloadError("non_finite", "values hold an integer beyond float64") from None
        if not np.isfinite(samples).all():
            raise PayloadError("non_finite", "values contain NaN or infinity")
        with np.errstate(over="ignore"):
            samples = samples.astype(np.float32)
        if not np.isfinite(samples).all():
            raise PayloadError("non_finite", "values overflow float32")
    else:
        if "data" not in obj or "dtype" not in obj:
            raise PayloadError("bad_schema", "need either values, or data with dtype")
        dtype = _DTYPES.get(obj["dtype"]) if isinstance(obj["dtype"], str) else None
        if dtype is None:
            raise PayloadError("bad_dtype", f"dtype must be float32 or int16, got {str(obj['dtype'])[:32]!r}")
        scale = 1.0
        if "scale" in obj:
            scale = _number(obj, "scale")
            if not math.isfinite(scale):
                raise PayloadError("non_finite", "scale is NaN or infinite")
            if scale <= 0:
                raise PayloadError("bad_dtype", f"scale must be > 0, got {scale!r}")
        elif obj["dtype"] == "int16":
            raise PayloadError("bad_dtype", "int16 data needs a scale (physical units per count)")
        data = obj["data"]
        if not isinstance(data, str):
            raise PayloadError("bad_schema", f"data must be a base64 string, got {type(data).__name__}")
        if len(data) * 3 // 4 > max_samples * dtype.itemsize:
            raise PayloadError("too_large", f"data holds more than max_samples_per_chunk {max_samples} samples")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PayloadError("bad_base64", str(exc)[:200]) from None
        if not raw or len(raw) % dtype.itemsize:
            raise PayloadError("bad_length", f"{len(raw)} data bytes is not a positive multiple of {dtype.itemsize}")
        samples = np.frombuffer(raw, dtype=dtype)
        if dtype.kind == "f" and not np.isfinite(samples).all():
            raise PayloadError("non_finite", "data contains NaN or infinity")
        with np.errstate(over="ignore"):
            if scale == 1.0:
                samples = samples.astype(np.float32)
            else:
                samples = (samples.astype(np.float32) * np.float32(scale)).astype(np.float32)
        if not np.isfinite(samples).all():
            raise PayloadError("non_finite", "samples overflow float32 after scaling")
    return Chunk(site, machine, sensor, ts_ns, fs, unit, seq, samples, size)


def encode_chunk(
    samples: np.ndarray | Sequence[float],
    *,
    ts_ns: int,
    sample_rate_hz: float,
    unit: str,
    seq: int,
    encoding: Literal["float32", "int16", "values"] = "float32",
    scale: float | None = None,
) -> bytes:
    """Encode samples as a waveform chunk (the inverse of :func:`decode_chunk`).

    Args:
        samples: shape ``(n,)`` in ``unit``.
        ts_ns: time of the first sample, epoch ns.
        sample_rate_hz: Hz.
        unit: ``"g"``, ``"m/s2"``, ``"Pa"`` or ``"FS"``.
        seq: per-stream sequence number.
        encoding: ``float32`` (base64), ``int16`` (base64 with ``scale``) or ``values`` (JSON list).
        scale: units per count for int16; when None, chosen so the peak uses ~90 % of the range.

    Returns:
        the UTF-8 JSON payload.
    """
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    obj: dict[str, Any] = {"ts": int(ts_ns), "fs": sample_rate_hz, "unit": unit, "seq": int(seq)}
    if encoding == "values":
        obj["values"] = x.tolist()
    elif encoding == "float32":
        obj["dtype"] = "float32"
        obj["data"] = base64.b64encode(x.astype("<f4").tobytes()).decode("ascii")
    elif encoding == "int16":
        if scale is None:
            peak = float(np.max(np.abs(x))) if x.size else 0.0
            scale = peak / (0.9 * 32767) if peak > 0 else 1.0
        counts = np.clip(np.rint(x / scale), -32768, 32767).astype("<i2")
        obj["dtype"] = "int16"
        obj["scale"] = scale
        obj["data"] = base64.b64encode(counts.tobytes()).decode("ascii")
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def deadletter_payload(topic: str, payload: bytes, error: PayloadError, head_bytes: int = 256, *,
                       size: int | None = None) -> bytes:
    """The JSON published on ``pdm/v1/_deadletter/{reason}`` for a rejected payload.

    Holds the original topic, the reason and detail, the payload size (``size``, when
    ``payload`` is only the payload's head), the first ``head_bytes`` bytes (base64, so binary
    garbage survives) and the receive time (epoch ns).
    """
    return json.dumps(
        {
            "topic": topic[:512],
            "reason": error.reason,
            "detail": error.detail,
            "bytes": len(payload) if size is None else int(size),
            "head_b64": base64.b64encode(payload[:head_bytes]).decode("ascii"),
            "received_ns": time.time_ns(),
        },
        separators=(",", ":"),
    ).encode("utf-8")
