"""``pdm-edge bench``: run the benchmarks and print the summary table (:mod:`pdm_edge.bench`)."""

from __future__ import annotations

import json
import sys

import click

from pdm_edge.cli._common import handle_errors


@click.command("bench")
@click.option("--quick", is_flag=True, help="Short versions; the ingestion and end-to-end channel searches (minutes) are left out.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (every benchmark's full result) instead of the table.")
@click.option("--only", default=None, metavar="NAMES",
              help="Comma-separated subset of score, train, ingest, e2e, search [default: all].")
@handle_errors
def bench_cmd(quick: bool, as_json: bool, only: str | None) -> None:
    """Run the benchmarks (each in its own process) and print a summary table.

    Scoring throughput per core, adapter training time and peak memory versus full fine-tuning,
    the most 25.6 kHz channels ingested and kept up with end to end (not with --quick),
    publish-to-stored latency p50/p99 through a real broker and the running service's memory,
    with the targets met or not.
    Progress goes to stderr. See benchmarks/README.md.
    """
    from pdm_edge.bench import render_table, run_suite

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    doc = run_suite(names, quick=quick, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(doc, indent=2) if as_json else render_table(doc))
    if any(b.get("status") == "failed" for b in doc["benchmarks"].values()):
        sys.exit(1)
