"""``pdm-edge store check``: reach the store, time a write + read round trip, report the spool."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import click

from pdm_edge import __version__
from pdm_edge._util.text import fmt_ns
from pdm_edge.cli._common import DEFAULT_BROKER, Ctx, handle_errors
from pdm_edge.errors import PdmEdgeError


@click.group("store")
def store_group() -> None:
    """Check the store (InfluxDB or SQLite) and the spool."""


@store_group.command("check")
@click.option("--influx-url", default=None, metavar="URL",
              help="Check the InfluxDB at this URL instead of the configured store (e.g. http://127.0.0.1:8086).")
@click.option("--database", default=None, help="InfluxDB database (1.x) or DBRP-mapped name (2.x/3) [default: from config, else pdm_edge].")
@click.option("--retention-policy", default=None, help="InfluxDB retention policy [default: the database's default].")
@click.option("--username", default=None, help="InfluxDB 1.x user (sent as u/p).")
@click.option("--password", default=None, help="InfluxDB 1.x password; prefer PDM_EDGE__STORE__PASSWORD.")
@click.option("--token", default=None, help="InfluxDB 2.x/3 token; prefer PDM_EDGE__STORE__TOKEN.")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Seconds per request [default: from config, else 10].")
@click.pass_obj
@handle_errors
def store_check(obj: Ctx, influx_url: str | None, database: str | None, retention_policy: str | None,
                username: str | None, password: str | None, token: str | None, timeout_s: float | None) -> None:
    """Connect to the store, report its type and version, time a write + read round trip of a
    marker (a model_event of machine ``_check``), and report the spool's depth.

    Exits 1 with one line when the store is unreachable, refuses the credentials or lacks the
    database (a check creates nothing but the marker).
    """
    from pdm_edge.store import ModelEvent, open_store
    from pdm_edge.store.spool import spool_depth

    store_over: dict[str, Any] = {}
    if influx_url:
        store_over.update(backend="influxdb", url=influx_url)
    for key, value in (("database", database), ("retention_policy", retention_policy), ("username", username),
                       ("password", password), ("token", token), ("timeout_s", timeout_s)):
        if value is not None:
            store_over[key] = value
    if username is not None and token is None:
        store_over["token"] = None
    if token is not None and username is None:
        store_over["username"] = None
    overrides: dict[str, Any] = {"store": store_over} if store_over else {}
    if obj.config_path is None:  # no file: defaults plus PDM_EDGE__* environment overrides
        overrides.setdefault("mqtt", {"broker": DEFAULT_BROKER})
    cfg = obj.config(overrides)
    sc = cfg.store
    store = open_store(sc, create_database=False)
    try:
        info = store.server_info()
        where = f"{sc.url}, database {sc.database!r}" + (f", retention policy {sc.retention_policy!r}" if sc.retention_policy else "") \
            if sc.backend == "influxdb" else f"{sc.sqlite_path}"
        build = f" ({info['build']})" if info.get("build") else ""
        click.echo(f"store: {info['type']} {info['version']}{build} at {where}")
        marker = ModelEvent(cfg.appliance_id, "_check", time.time_ns(), "store_check", __version__,
                            f"pdm-edge store check from {platform.node()}")
        t0 = time.perf_counter()
        store.write_model_events([marker])
        back = store.query_model_events(marker.site, marker.machine, marker.ts_ns, marker.ts_ns + 1)
        rtt_ms = (time.perf_counter() - t0) * 1e3
        if marker not in back:
            raise PdmEdgeError(f"wrote a marker to the {info['type']} store but could not read it back")
        click.echo(f"write + read round trip: {rtt_ms:.1f} ms (model_event {marker.site}/_check at {fmt_ns(marker.ts_ns)})")
    finally:
        store.close()
    spool_path = Path(cfg.spool.path)
    if spool_path.is_file():
        depth, oldest_ns = spool_depth(spool_path)
        age = f", oldest {(time.time_ns() - oldest_ns) / 1e9:.1f} s old" if oldest_ns is not None else ""
        click.echo(f"spool: {depth} records waiting{age} ({spool_path}, bound {cfg.spool.max_records})")
    else:
        click.echo(f"spool: none at {spool_path}")
