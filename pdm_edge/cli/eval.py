"""``pdm-edge eval``: the evaluation protocol (:mod:`pdm_edge.evaluation`)."""

from __future__ import annotations

from pathlib import Path

import click

from pdm_edge.cli._common import handle_errors
from pdm_edge.errors import PdmEdgeError


@click.command("eval")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the real recordings [default: $PDM_EDGE_DATASETS or ../shared/datasets].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write results.md (the table), results.json and the plots (ROC, score over life, technician, feedback curve) here.")
@click.option("--encoder", "encoder_path", type=click.Path(dir_okay=False), default=None, help="Encoder weights [default: models/encoder.pt].")
@click.option("--datasets", default="cwru,dcase,femto,technician,feedback", show_default=True,
              help="Comma-separated subset of cwru, dcase, femto (the five set-A bearings), technician (the simulated "
                   "technician on FEMTO and DCASE), feedback (the DCASE feedback learning curve).")
@click.option("--subset", is_flag=True, help="A small subset of every split (a quick smoke test; figures are not comparable).")
@click.option("--threads", type=int, default=None, help="torch threads [default: all cores].")
@handle_errors
def eval_cmd(data_dir: str | None, out_dir: str | None, encoder_path: str | None, datasets: str, subset: bool, threads: int | None) -> None:
    """Run the evaluation protocol v2 (CWRU, DCASE valve, FEMTO set A, simulated technician,
    feedback curve) and print one JSON document; with --out, also the markdown table."""
    import torch

    from pdm_edge.evaluation import run_eval, to_json
    from pdm_edge.model import load_encoder
    from sample_data.loaders import default_datasets_dir

    if threads:
        torch.set_num_threads(threads)
    data = Path(data_dir) if data_dir else default_datasets_dir()
    if not data.is_dir():
        raise PdmEdgeError(f"dataset folder {data} not found (pass --data DIR)")
    encoder, sha = load_encoder(encoder_path)
    doc = run_eval(data, Path(out_dir) if out_dir else None, encoder, sha,
                   datasets=tuple(d.strip() for d in datasets.split(",") if d.strip()), subset=subset,
                   log=lambda m: click.echo(m, err=True))
    click.echo(to_json(doc))
