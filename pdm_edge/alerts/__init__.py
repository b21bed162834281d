"""Alerts: k-of-n debouncing of per-window anomaly decisions (``debounce``), and alerts, machine
status and scores published over MQTT (``publisher``)."""

from pdm_edge.alerts.debounce import AlertEvent, KOfN
from pdm_edge.alerts.publisher import (
    ALERT_ID_NAMESPACE,
    MACHINE_STATES,
    AlertTracker,
    PublisherStats,
    ResultPublisher,
    alert_id,
    alert_payload,
    alert_topic,
    score_payload,
    score_topic,
    status_topic,
)

__all__ = [
    "ALERT_ID_NAMESPACE",
    "MACHINE_STATES",
    "AlertEvent",
    "AlertTracker",
    "KOfN",
    "PublisherStats",
    "ResultPublisher",
    "alert_id",
    "alert_payload",
    "alert_topic",
    "score_payload",
    "score_topic",
    "status_topic",
]
