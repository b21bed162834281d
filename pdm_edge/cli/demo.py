"""``pdm-edge demo``: the end-to-end demo (:func:`pdm_edge.runtime.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from pdm_edge.cli._common import handle_errors, parse_speed


@click.command()
@click.option("--speed", default="4", show_default=True, help="Replay speed of the sample recording (max = as fast as possible).")
@click.option("--recording", type=click.Path(exists=True), default=None, help="Recording to replay [default: the bundled sample].")
@click.option("--calibration-s", type=float, default=20.0, show_default=True, help="Seconds of the recording used as the machine's normal baseline.")
@click.option("--state-dir", type=click.Path(file_okay=False), default="var/demo", show_default=True,
              help="Where the demo's SQLite store and spool are written (emptied first).")
@click.option("--quiet", is_flag=True, help="Print only calibration, alerts and the summary.")
@click.option("--dashboard/--no-dashboard", default=False, show_default=True,
              help="Also start the Streamlit dashboard (dashboard/app.py) on the demo's store; after the replay the "
                   "demo keeps running until Ctrl-C.")
@click.option("--dashboard-port", type=click.IntRange(1, 65535), default=8501, show_default=True, help="Port of the dashboard.")
@handle_errors
def demo(speed: str, recording: str | None, calibration_s: float, state_dir: str, quiet: bool, dashboard: bool,
         dashboard_port: int) -> None:
    """End-to-end demo on the embedded default: broker, replay, ingestion, scoring, alerts, store.

    Starts an in-process MQTT broker and the appliance itself (the service of `pdm-edge run`,
    with a SQLite store, spool, label book and registry in --state-dir and /healthz and
    /metrics on a free port), replays the bundled simulator recording (healthy, then a growing
    outer-race fault from 30 s) through the broker, calibrates the machine on its first
    ``--calibration-s`` seconds with the shipped encoder and an adapter trained on the spot,
    scores every later window, raises and clears alerts (3 of 5 windows), and writes scores and
    alerts through the durable spool into the SQLite store. The demo's configuration is written
    to STATE_DIR/pdm-edge.toml (the dashboard reads it).
    """
    from pdm_edge.runtime.demo import DemoOptions, run_demo

    run_demo(DemoOptions(speed=parse_speed(speed), recording=recording, calibration_s=calibration_s, state_dir=Path(state_dir),
                         quiet=quiet, dashboard=dashboard, dashboard_port=dashboard_port),
             out=click.echo, warn=lambda m: click.echo(m, err=True))
