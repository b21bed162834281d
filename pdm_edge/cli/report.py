"""``pdm-edge report SITE/MACHINE``: a machine's printable HTML report and CSV exports
(built by the dashboard's :mod:`dashboard.report`)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import click

from pdm_edge._util.fs import atomic_write
from pdm_edge._util.repo import dashboard_importable
from pdm_edge.cli._common import Ctx, handle_errors
from pdm_edge.errors import PdmEdgeError


@click.command("report")
@click.argument("machine_key", metavar="SITE/MACHINE")
@click.option("--hours", type=click.FloatRange(min=0.001), default=None,
              help="The period: this many hours up to --end [default: the machine's data span, at most 30 days].")
@click.option("--end", "end", default=None, help="End of the period (ISO 8601 or epoch ns) [default: now].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for the report (HTML) and the CSV exports.")
@click.pass_obj
@handle_errors
def report_cmd(obj: Ctx, machine_key: str, hours: float | None, end: str | None, out_dir: str) -> None:
    """Write a machine's report: printable HTML (alerts, labels, score and ISO 20816-3 severity
    trends, spectra of the top alert, model versions) and CSV exports of its scores and alerts.

    Reads the configured store, registry and label book; writes
    OUT/report-SITE-MACHINE-<end>.html, scores-....csv and alerts-....csv. Print the HTML to PDF
    from a browser."""
    from pdm_edge.feedback import LabelBook, parse_time
    from pdm_edge.store.factory import open_store

    dashboard_importable()
    from dashboard import data
    from dashboard.report import build_report, data_period

    parts = machine_key.split("/")
    if len(parts) != 2 or not all(parts):
        raise click.UsageError(f"SITE/MACHINE expected, got {machine_key!r}")
    site, machine = parts
    cfg = obj.config()
    store = open_store(cfg.store, create_database=False)
    end_ns = parse_time(end, "--end") if end else time.time_ns()
    if hours is not None:
        start_ns = end_ns - round(hours * 3600e9)
    else:
        span = data_period(store, cfg, site, machine)
        if span is None:
            store.close()
            raise PdmEdgeError(f"{site}/{machine} has no scores in the store; give the period with --hours")
        start_ns, end_ns = span if not end else (span[0], end_ns)
    registry = data.open_registry(cfg.registry.dir)
    book_path = Path(cfg.feedback.state_dir) / LabelBook.FILENAME
    book = LabelBook(book_path) if book_path.is_file() else None
    try:
        rep = build_report(store, cfg, site, machine, start_ns, end_ns, registry=registry, book=book)
    finally:
        for x in (store, registry, book):
            if x is not None:
                x.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(end_ns / 1e9, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{site}-{machine}-{stamp}"
    for prefix, text in (("report", rep.html), ("scores", rep.scores_csv), ("alerts", rep.alerts_csv)):
        path = out / f"{prefix}-{name}.{'html' if prefix == 'report' else 'csv'}"
        atomic_write(path, text)
        click.echo(f"{prefix:<7} {path} ({len(text.encode()) / 1024:.0f} KiB)")
