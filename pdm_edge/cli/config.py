"""``pdm-edge config check``: validate the configuration and summarise it."""

from __future__ import annotations


import click

from pdm_edge.cli._common import Ctx, handle_errors


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@click.pass_obj
@handle_errors
def config_check(obj: Ctx) -> None:
    """Validate the configuration file (with environment overrides) and summarise it."""
    cfg = obj.config()
    click.echo(f"{obj.config_path}: OK")
    click.echo(f"  appliance {cfg.appliance_id}, broker {cfg.mqtt.broker} (MQTT {cfg.mqtt.protocol}), "
               f"unknown streams: {cfg.ingest.unknown_streams}")
    where = cfg.store.sqlite_path if cfg.store.backend == "sqlite" else f"{cfg.store.url}, database {cfg.store.database}"
    click.echo(f"  store {cfg.store.backend} ({where}), spool {cfg.spool.path}, alerts {cfg.alerts.k} of {cfg.alerts.n}")
    for key, s in sorted(cfg.sensors.items()):
        click.echo(f"  sensor {key}: {s.kind}, {s.sample_rate_hz:g} Hz, {s.unit}, window {s.window_s:g} s, hop {s.hop_s:g} s")
