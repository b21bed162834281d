"""What every command group shares: the configuration context, the error handler, options.

Configuration: ``--config``, else ``$PDM_EDGE_CONFIG``, else ``./pdm-edge.toml``, else
``/etc/pdm-edge/pdm-edge.toml`` (:class:`Ctx`, the click context object of every command).
Errors that pdm-edge raises on purpose (:class:`~pdm_edge.errors.PdmEdgeError`) are printed as
one line and exit with status 2 (configuration) or 1 (anything else), never as a traceback
(:func:`handle_errors`).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pdm_edge.config import AppConfig, MqttConfig, config_from_dict, load_config
from pdm_edge.errors import ConfigError, PdmEdgeError

__all__ = ["BROKER_WAIT_S", "CONFIG_SEARCH", "DEFAULT_BROKER", "Ctx", "broker_options", "default_site", "handle_errors", "parse_speed",
           "stream_options"]

CONFIG_SEARCH = ("pdm-edge.toml", "/etc/pdm-edge/pdm-edge.toml")
DEFAULT_BROKER = "127.0.0.1:1883"
"""The broker of commands run without a configuration file."""
BROKER_WAIT_S = 10.0
"""How long ``pdm-edge ingest`` waits for the broker before saying it cannot be reached."""


def _find_config(path: str | None) -> str | None:
    if path:
        return path
    if os.environ.get("PDM_EDGE_CONFIG"):
        return os.environ["PDM_EDGE_CONFIG"]
    for candidate in CONFIG_SEARCH:
        if Path(candidate).is_file():
            return candidate
    return None


class Ctx:
    """The click context object: where the configuration is, and how to read it with overrides."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = _find_config(config_path)

    def config(self, overrides: dict[str, Any] | None = None, *, required: bool = True) -> AppConfig:
        """The configuration with command-line overrides applied (nested dict, like the TOML)."""
        overrides = overrides or {}
        if self.config_path is None:
            if required and "mqtt" not in overrides:
                raise ConfigError("", "no configuration file: pass --config PATH or set PDM_EDGE_CONFIG")
            return config_from_dict(overrides)
        base = load_config(self.config_path)
        data = base.model_dump(exclude_unset=True)
        for section, values in overrides.items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
            else:
                data[section] = values
        return config_from_dict(data, environ={})

    def config_or_defaults(self) -> AppConfig:
        """The configuration file's settings; without a file the defaults (broker
        ``DEFAULT_BROKER``) plus ``PDM_EDGE__*`` environment overrides."""
        if self.config_path is not None:
            return self.config()
        return config_from_dict({"mqtt": {"broker": DEFAULT_BROKER}})

    def mqtt(self, broker: str | None, protocol: str | None) -> MqttConfig:
        """Broker settings: flags first, then the configuration file, then 127.0.0.1:1883."""
        overrides: dict[str, Any] = {}
        if broker:
            overrides["broker"] = broker
        if protocol:
            overrides["protocol"] = protocol
        if self.config_path is not None:
            return self.config({"mqtt": overrides}).mqtt
        overrides.setdefault("broker", DEFAULT_BROKER)
        return config_from_dict({"mqtt": overrides}).mqtt


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One line on stderr and exit status 2 for a :class:`ConfigError`, 1 for any other
    :class:`PdmEdgeError`, 130 on Ctrl-C."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            click.echo(f"configuration error: {err}", err=True)
            sys.exit(2)
        except PdmEdgeError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker HOST:PORT`` and ``--protocol`` (read with :meth:`Ctx.mqtt`)."""
    fn = click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default=None,
                      help="MQTT protocol version [default: from config, else 5].")(fn)
    fn = click.option("--broker", metavar="HOST:PORT", default=None,
                      help="MQTT broker [default: from the config file, else 127.0.0.1:1883].")(fn)
    return fn


def stream_options(default_sensor: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--site``, ``--machine`` and ``--sensor`` (topic levels)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option("--sensor", default=default_sensor, help="Sensor name (topic level).")(fn)
        fn = click.option("--machine", default=None, help="Machine name (topic level).")(fn)
        fn = click.option("--site", default=None, help="Site name [default: `site` from config].")(fn)
        return fn
    return deco


def parse_speed(value: str) -> float:
    """A replay speed: a positive number (1 = real time) or ``max`` (as fast as possible: inf)."""
    if value.lower() in ("max", "inf"):
        return math.inf
    try:
        speed = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'max'") from None
    if not speed > 0:
        raise click.BadParameter("speed must be > 0")
    return speed


def default_site(obj: Ctx) -> str:
    """``site`` of the configuration, else ``"site"``."""
    return obj.config(required=False).site if obj.config_path else "site"
