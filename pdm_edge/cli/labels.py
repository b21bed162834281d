"""``pdm-edge label add|list``: technician labels in the label book (:mod:`pdm_edge.feedback`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from pdm_edge._util.text import fmt_ns
from pdm_edge.cli._common import Ctx, default_site, handle_errors


@click.group("label")
def label_group() -> None:
    """Technician labels (the label book in the appliance's state directory).

    A label says a span of a machine was normal (a false alarm), a fault, or to be ignored
    (maintenance). Labels from here, the dashboard and MQTT go through the same validation and
    the same book; the same label given twice is one label. Invalid input exits with status 2.
    """


def _label_settings(obj: Ctx, state_dir: str | None) -> tuple[Any, Path]:
    """``(LabelLimits, state directory)`` from the configuration (defaults without a file)."""
    from pdm_edge.feedback import LabelLimits

    cfg = obj.config_or_defaults()
    return LabelLimits.from_config(cfg.feedback), Path(state_dir if state_dir else cfg.feedback.state_dir)


def _label_line(lb: Any) -> str:
    where = f"{lb.site}/{lb.machine}" + (f"/{lb.sensor}" if lb.sensor else "")
    kind = lb.kind + (f" ({lb.fault_type})" if lb.fault_type else "")
    alert = f" alert {lb.alert_id}" if lb.alert_id else ""
    note = f"  \"{lb.note}\"" if lb.note else ""
    return f"{lb.id}  {where}  {kind}  {fmt_ns(lb.start_ns)} .. {fmt_ns(lb.end_ns)}{alert}  by {lb.author}{note}"


@label_group.command("add")
@click.option("--site", default=None, help="Site [default: `site` from the config].")
@click.option("--machine", required=True, help="Machine.")
@click.option("--sensor", default=None, help="Restrict the label to one sensor [default: the whole machine].")
@click.option("--alert-id", default=None, help="The alert the label answers.")
@click.option("--start", required=True, metavar="TIME", help="Span start: ISO-8601 with a UTC offset (2026-11-21T08:00:00Z) or epoch ns.")
@click.option("--end", required=True, metavar="TIME", help="Span end (exclusive), as --start.")
@click.option("--kind", required=True, metavar="KIND", help="normal (false alarm), fault (confirmed) or ignore (maintenance).")
@click.option("--fault-type", default=None, metavar="TYPE",
              help="With --kind fault: bearing_outer_race, bearing_inner_race, bearing_ball, imbalance, misalignment, "
                   "looseness, cavitation or other.")
@click.option("--author", required=True, help="Who gives the label.")
@click.option("--note", default="", help="Free text.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="State directory holding labels.sqlite [default: [feedback] state_dir, else var].")
@click.option("--json", "as_json", is_flag=True, help="Print the stored label as JSON, with \"new\": true|false.")
@click.pass_obj
@handle_errors
def label_add(obj: Ctx, site: str | None, machine: str, sensor: str | None, alert_id: str | None, start: str, end: str,
              kind: str, fault_type: str | None, author: str, note: str, state_dir: str | None, as_json: bool) -> None:
    """Add a label (idempotent: the same label again is reported as already stored)."""
    from pdm_edge.feedback import LabelBook, LabelError, label_payload, parse_time, submit_label

    limits, state = _label_settings(obj, state_dir)
    try:
        fields = dict(site=site or default_site(obj), machine=machine, sensor=sensor, alert_id=alert_id,
                      start_ns=parse_time(start, "start"), end_ns=parse_time(end, "end"), kind=kind,
                      fault_type=fault_type, author=author, note=note)
        with LabelBook.in_dir(state) as book:
            label, created = submit_label(book, limits=limits, **fields)
    except LabelError as err:
        click.echo(f"label error: {err}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({**label_payload(label), "new": created}, ensure_ascii=False))
    else:
        click.echo(("stored label " if created else "already stored (unchanged): label ") + _label_line(label))


@label_group.command("list")
@click.option("--site", default=None, help="Only this site.")
@click.option("--machine", default=None, help="Only this machine.")
@click.option("--kind", default=None, help="Only this kind (normal, fault, ignore).")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="State directory holding labels.sqlite [default: [feedback] state_dir, else var].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per label.")
@click.pass_obj
@handle_errors
def label_list(obj: Ctx, site: str | None, machine: str | None, kind: str | None, state_dir: str | None, as_json: bool) -> None:
    """List the labels in the book, oldest span first."""
    from pdm_edge.feedback import LabelBook, label_payload

    _, state = _label_settings(obj, state_dir)
    path = state / LabelBook.FILENAME
    if not path.is_file():
        if not as_json:
            click.echo(f"no labels (no label book at {path})")
        return
    with LabelBook(path) as book:
        labels = book.list(site=site, machine=machine, kind=kind)
    for lb in labels:
        click.echo(json.dumps(label_payload(lb), ensure_ascii=False) if as_json else _label_line(lb))
    if not as_json:
        click.echo(f"{len(labels)} label(s) in {path}")
