"""Build the configured store from ``[store]`` (:class:`~pdm_edge.config.StoreConfig`).

``backend = "sqlite"`` (the default) opens :class:`~pdm_edge.store.sqlite.SQLiteStore` at
``sqlite_path``; ``backend = "influxdb"`` builds :class:`~pdm_edge.store.influx.InfluxStore`
from ``url``, ``database``, ``retention_policy``, ``username``/``password`` or ``token``,
``verify_tls``, ``ca_file`` and ``timeout_s``. Opening an InfluxDB store makes no request, so
the appliance starts while the database is down (the spool holds the records meanwhile).
"""

from __future__ import annotations

from pdm_edge.config import StoreConfig
from pdm_edge.store.base import Store


def open_store(cfg: StoreConfig, *, create_database: bool = True) -> Store:
    """Open the store that ``cfg`` describes.

    Args:
        cfg: the ``[store]`` section.
        create_database: InfluxDB only: send ``CREATE DATABASE`` when a write finds the
            database missing (``pdm-edge store check`` passes False: a check creates nothing).

    Raises:
        StoreError: the SQLite file cannot be opened, or the InfluxDB settings are unusable
            (malformed URL, both username and token).
    """
    if cfg.backend == "influxdb":
        from pdm_edge.store.influx import InfluxStore

        assert cfg.url is not None  # StoreConfig's validator guarantees it
        return InfluxStore(cfg.url, cfg.database, retention_policy=cfg.retention_policy, username=cfg.username,
                           password=cfg.password, token=cfg.token, verify_tls=cfg.verify_tls, ca_file=cfg.ca_file,
                           timeout_s=cfg.timeout_s, create_database=create_database)
    from pdm_edge.store.sqlite import SQLiteStore

    return SQLiteStore(cfg.sqlite_path, timeout_s=cfg.timeout_s)
