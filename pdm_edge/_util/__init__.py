"""Private helpers shared across pdm-edge (not a public API; import the submodules).

- :mod:`.time`: :func:`~pdm_edge._util.time.iso_utc`, :func:`~pdm_edge._util.time.parse_time`
- :mod:`.sqlite`: :func:`~pdm_edge._util.sqlite.open_wal`, :func:`~pdm_edge._util.sqlite.tx`
- :mod:`.fs`: :func:`~pdm_edge._util.fs.atomic_write`
- :mod:`.procs`: Mosquitto and InfluxDB processes for benchmarks and tests
"""
