"""Technician feedback: labels from the dashboard, MQTT and the CLI, and the windows they cover.

A label says that a time span of a machine (optionally one sensor, optionally answering one
alert) was ``normal`` (a false alarm), a ``fault`` (with an optional fault type from
:data:`~pdm_edge.types.FAULT_TYPES`) or to ``ignore`` (maintenance, not representative).

- :mod:`.labels`: :func:`submit_label`, the one function every label goes through (validation,
  deterministic id, idempotent storage), and :class:`LabelBook`, the durable SQLite book;
- :mod:`.windows`: :class:`RecentWindows` (in-memory ring per stream) and
  :class:`LabelledWindowBuffer` (bounded on-disk buffer of labelled windows, with its retention
  policy), and :func:`covers`;
- :mod:`.listener`: :class:`LabelListener`, labels over MQTT (``pdm/v1/{site}/{machine}/label``)
  with dead letters to ``pdm/v1/_deadletter/bad_label``;
- :mod:`.service`: :class:`Feedback`, the above tied together in a running appliance
  (windows captured, labels forwarded to the results store through the spool).

The command line is ``pdm-edge label add|list`` (:mod:`pdm_edge.cli.labels`).
"""

from pdm_edge.errors import LabelError
from pdm_edge.feedback.labels import (
    LABEL_ID_NAMESPACE,
    LabelBook,
    LabelLimits,
    label_id,
    label_payload,
    make_label,
    parse_time,
    submit_label,
)
from pdm_edge.feedback.listener import (
    BAD_LABEL,
    LABEL_TOPIC_FILTER,
    LabelListener,
    ListenerStats,
    decode_label_payload,
    label_topic,
)
from pdm_edge.feedback.service import Feedback
from pdm_edge.feedback.windows import CLASSES, BufferStats, LabelledWindowBuffer, RecentWindows, covers, span_covers

__all__ = [
    "BAD_LABEL",
    "CLASSES",
    "LABEL_ID_NAMESPACE",
    "LABEL_TOPIC_FILTER",
    "BufferStats",
    "Feedback",
    "LabelBook",
    "LabelError",
    "LabelLimits",
    "LabelListener",
    "LabelledWindowBuffer",
    "ListenerStats",
    "RecentWindows",
    "covers",
    "decode_label_payload",
    "label_id",
    "label_payload",
    "label_topic",
    "make_label",
    "parse_time",
    "span_covers",
    "submit_label",
]
