"""Alerts: k-of-n debouncing of per-window anomaly decisions (``debounce``); publishing alerts and
machine status over MQTT follows in this package."""

from pdm_edge.alerts.debounce import AlertEvent, KOfN

__all__ = ["AlertEvent", "KOfN"]
