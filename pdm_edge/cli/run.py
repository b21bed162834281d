"""``pdm-edge run``: the appliance (:mod:`pdm_edge.runtime.service`) until SIGTERM or SIGINT."""

from __future__ import annotations

import os
import sys

import click

from pdm_edge.cli._common import Ctx, handle_errors


@click.command("run")
@click.option("--log-format", type=click.Choice(["logfmt", "json"]), default="logfmt", show_default=True,
              help="One line per log record: logfmt (key=value) or JSON.")
@click.option("--stop-timeout", "stop_timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds allowed for a clean stop on SIGTERM/SIGINT (score queued windows, flush the spool).")
@click.pass_context
@handle_errors
def run_cmd(ctx: click.Context, log_format: str, stop_timeout_s: float) -> None:
    """Run the appliance: ingestion, scoring, alerts, store, labels, /healthz and /metrics.

    Reads the configuration (--config, $PDM_EDGE_CONFIG, ./pdm-edge.toml,
    /etc/pdm-edge/pdm-edge.toml) and runs until SIGTERM or SIGINT, then stops cleanly and exits
    0. Under systemd (Type=notify) it reports READY=1 and, with WatchdogSec, feeds the watchdog
    while the scoring worker is alive. Log level: --log-level, else $PDM_EDGE_LOG_LEVEL, else
    log_level from the configuration.
    """
    from pdm_edge.runtime.logging import configure_logging
    from pdm_edge.runtime.service import Service, run_forever

    obj: Ctx = ctx.obj
    cfg = obj.config()
    level = (ctx.parent.params.get("log_level") if ctx.parent else None) or os.environ.get("PDM_EDGE_LOG_LEVEL") or cfg.log_level
    configure_logging(level, log_format)
    sys.exit(run_forever(Service(cfg), stop_timeout=stop_timeout_s))
