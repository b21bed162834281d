"""Storage of scores, alerts, labels and model events (InfluxDB or SQLite), with a durable spool.

- :mod:`.base`: the :class:`Store` interface, the schema, the records (the error classes are in
  :mod:`pdm_edge.errors`, re-exported here);
- :mod:`.sqlite`: :class:`~.sqlite.SQLiteStore`, the embedded default;
- :mod:`.influx`: :class:`~.influx.InfluxStore`, InfluxDB 1.x / 2.x / 3 over the v1 HTTP API;
- :mod:`.factory`: :func:`open_store` from the ``[store]`` configuration;
- :mod:`.records`: checking and JSON (de)serialisation of the records;
- :mod:`.spool`: :class:`~.spool.Spool` and :class:`~.spool.SpoolWriter`, the durable queue
  in front of the store.
"""

from pdm_edge.errors import StoreAuthError, StoreNotFoundError, StoreRejectedError, StoreUnavailableError
from pdm_edge.store.base import MachineState, ModelEvent, ScoreBucket, Store
from pdm_edge.store.factory import open_store

__all__ = [
    "MachineState",
    "ModelEvent",
    "ScoreBucket",
    "Store",
    "StoreAuthError",
    "StoreNotFoundError",
    "StoreRejectedError",
    "StoreUnavailableError",
    "open_store",
]
