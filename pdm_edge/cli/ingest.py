"""``pdm-edge ingest``: run the ingestion stage alone and print every window that arrives."""

from __future__ import annotations

import json
import math
import queue
import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np

from pdm_edge._util.text import ingest_summary_lines, window_line
from pdm_edge.cli._common import BROKER_WAIT_S, Ctx, broker_options, handle_errors
from pdm_edge.errors import PdmEdgeError
from pdm_edge.types import Window


def consume(ingestor: Any, *, until: Callable[[], bool], emit: Callable[[Window], None], idle_s: float = 0.2) -> int:
    """Hand every window to ``emit`` until ``until()`` is true and the stage is drained."""
    n = 0
    while True:
        try:
            w = ingestor.windows.get(timeout=idle_s)
        except queue.Empty:
            if until() and ingestor.wait_idle(0.5) and ingestor.windows.empty():
                return n
            continue
        emit(w)
        n += 1


@click.command()
@broker_options
@click.option("--accept-unknown", is_flag=True, help="Window streams that have no [sensors] table (commissioning).")
@click.option("--count", type=int, default=0, help="Stop after this many windows (0 = run until Ctrl-C).")
@click.option("--duration", "duration_s", type=float, default=0.0, help="Stop after this many seconds (0 = no limit).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per window instead of a text line.")
@click.option("--wait-broker", "wait_broker_s", type=click.FloatRange(0.1, 3600), default=BROKER_WAIT_S, show_default=True,
              help="Seconds to wait for the broker before giving up with an error.")
@click.pass_obj
@handle_errors
def ingest(obj: Ctx, broker: str | None, protocol: str | None, accept_unknown: bool, count: int, duration_s: float, as_json: bool,
           wait_broker_s: float) -> None:
    """Run the ingestion stage and print every window that arrives."""
    from pdm_edge.ingest import Ingestor

    overrides: dict[str, Any] = {"mqtt": {k: v for k, v in (("broker", broker), ("protocol", protocol)) if v}}
    if accept_unknown:
        overrides["ingest"] = {"unknown_streams": "accept"}
    cfg = obj.config(overrides)
    ing = Ingestor(cfg)
    ing.start()
    if not ing.wait_ready(wait_broker_s):
        ing.stop(timeout=1.0)
        raise PdmEdgeError(f"cannot reach the MQTT broker at {cfg.mqtt.broker} (no connection within {wait_broker_s:g} s): "
                           "is it running? Set it with --broker HOST:PORT or [mqtt] broker")
    click.echo(f"ingesting from {cfg.mqtt.broker} (pdm/v1/+/+/+/waveform); Ctrl-C to stop", err=True)
    deadline = time.monotonic() + duration_s if duration_s > 0 else math.inf
    n = 0

    def emit(w: Window) -> None:
        nonlocal n
        n += 1
        if as_json:
            click.echo(json.dumps({"stream": w.stream, "start_ns": w.start_ns, "index": w.index, "kind": w.kind,
                                   "sample_rate_hz": w.sample_rate_hz, "n_samples": w.n_samples, "unit": w.unit,
                                   "rms": float(np.sqrt(np.mean(w.samples.astype(np.float64) ** 2)))}))
        else:
            click.echo(window_line(w))

    try:
        consume(ing, until=lambda: (count and n >= count) or time.monotonic() >= deadline, emit=emit)
    except KeyboardInterrupt:
        pass
    finally:
        ing.stop()
        if not as_json:
            for line in ingest_summary_lines(ing.stats()):
                click.echo(line)
