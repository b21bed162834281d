#!/usr/bin/env python3
"""``pdm-edge eval`` rows with the scorer variants of issue 14 beside the default.

For each variant the product's scorer configuration (:func:`pdm_edge.evaluation.product_config`,
what ``pdm-edge run`` builds for a sensor) is replaced by the variant's, and the chosen rows of
the evaluation protocol run again (:func:`pdm_edge.evaluation.run_eval`; peers are recomputed
in the same run, so every table is complete):

- ``default``: the configuration as shipped (float32 scoring, ``TrainConfig()`` training);
- ``int8``: ``inference = "int8"`` (the encoder's linear layers quantised dynamically; the
  threshold is calibrated on the int8 path);
- ``memory``: the ``[learning]`` memory options (gradient checkpointing of the adapted blocks,
  micro-batches of 8).

Usage::

    .venv/bin/python benchmarks/eval_variants.py [--datasets cwru,femto] [--variants default,int8,memory]

Prints one markdown table per variant (:func:`pdm_edge.evaluation.markdown_table`) and the wall
time of each; ``--json`` prints every variant's evaluation document instead. The rows are
``pdm-edge eval``'s: nothing here is chosen by looking at them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

VARIANTS = ("default", "int8", "memory")


def variant_config(name: str, cfg):  # type: ignore[no-untyped-def]
    """The product's :class:`~pdm_edge.model.scorer.ScorerConfig` ``cfg`` as variant ``name``."""
    if name == "int8":
        return dataclasses.replace(cfg, inference="int8")
    if name == "memory":
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch=8, grad_checkpointing=True))
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="cwru,femto", help="pdm-edge eval rows (default cwru,femto)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--data", default=os.environ.get("PDM_EDGE_DATASETS", str(Path(__file__).resolve().parents[1].parent / "shared" / "datasets")))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {VARIANTS}")

    import torch

    from pdm_edge import evaluation
    from pdm_edge.model import load_encoder

    torch.set_num_threads(1)
    encoder, sha = load_encoder()
    shipped = evaluation.product_config
    docs = {}
    for name in names:
        evaluation.product_config = lambda *a, _n=name, **k: variant_config(_n, shipped(*a, **k))  # type: ignore[misc]
        t0 = time.monotonic()
        try:
            docs[name] = evaluation.run_eval(Path(args.data), None, encoder, sha, datasets=tuple(args.datasets.split(",")))
        finally:
            evaluation.product_config = shipped
        docs[name]["variant_seconds"] = round(time.monotonic() - t0, 1)
        print(f"{name}: {docs[name]['variant_seconds']:.0f} s", file=sys.stderr)
    if args.json:
        print(evaluation.to_json(docs))
    else:
        for name, doc in docs.items():
            print(f"## variant {name} ({doc['variant_seconds']:.0f} s)\n\n{evaluation.markdown_table(doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
