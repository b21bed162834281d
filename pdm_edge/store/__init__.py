"""Storage of scores, alerts, labels and model events (InfluxDB or SQLite), with a durable spool."""

from pdm_edge.store.base import MachineState, ModelEvent, ScoreBucket, Store

__all__ = ["MachineState", "ModelEvent", "ScoreBucket", "Store"]
