"""Fleet rounds on the models page: the federated rounds this appliance took part in, the fleet
priors it holds, and which of its model versions were calibrated from a prior (and whether the
gate promoted them). Read from the appliance's fleet log and prior files
(``{state_dir}/fleet/``, :mod:`pdm_edge.fleet`); nothing here writes.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st


def _when(ns: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(int(ns) / 1e9, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def fleet_tables(state_dir: str | os.PathLike[str], versions: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """The three tables of the view: ``rounds`` (newest first: when, round, machine class,
    event, participants, prior version, what it changed), ``priors`` (per class: round,
    adapter sha256, participants, size, signature) and ``versions`` (model versions whose
    calibration started from a fleet prior, with the gate's outcome)."""
    from pdm_edge.errors import PdmEdgeError
    from pdm_edge.fleet.delta import DeltaPackage
    from pdm_edge.fleet.runner import read_rounds

    fdir = Path(state_dir) / "fleet"
    rows = []
    for e in reversed(read_rounds(fdir)):
        if e.get("event") == "prior":
            what = f"prior stored ({e.get('normal_windows', 0)} windows fleet-wide); the next calibration of the class starts from it"
        else:
            what = (f"update sent: {e.get('normal_windows', 0)} windows of {e.get('streams', '?')}, "
                    f"{float(e.get('cpu_s', 0)):.1f} CPU s, {int(e.get('bytes_out', 0)) / 1024:.0f} KiB out")
        rows.append({"when": _when(e.get("ts_ns")), "round": e.get("round"), "machine class": e.get("machine_class"),
                     "event": e.get("event"), "participants": ", ".join(e.get("participants") or []) or None,
                     "prior version": e.get("prior_version"), "what it changed": what})
    priors = []
    for p in sorted((fdir / "priors").glob("*.pdmdelta")):
        try:
            pkg, note = DeltaPackage.read(p)
            priors.append({"machine class": pkg.meta.machine_class, "round": pkg.meta.round,
                           "adapter sha256": pkg.meta.adapter_sha256[:12], "participants": ", ".join(pkg.meta.notes.get("participants", [])),
                           "size KiB": round(p.stat().st_size / 1024, 1), "signature": note, "created": _when(pkg.meta.created_ns)})
        except PdmEdgeError as exc:
            priors.append({"machine class": p.stem, "signature": f"unreadable: {exc}"})
    from_prior = [{"version": v["id"], "status": v["status"], "prior": v["training_summary"].get("fleet_prior"),
                   "gate": v.get("reason")} for v in versions if (v.get("training_summary") or {}).get("fleet_prior")]
    return {"rounds": pd.DataFrame(rows), "priors": pd.DataFrame(priors), "versions": pd.DataFrame(from_prior)}


def render_fleet_rounds(c: Any, versions: list[dict[str, Any]]) -> None:
    """Draw the fleet view at the end of the models page (``c``: the page's ``common.Ctx``)."""
    st.markdown("#### Fleet rounds")
    if not c.cfg.fleet.enabled:
        st.caption("Fleet learning is off on this appliance (`[fleet] enabled = false`): nothing leaves it.")
        return
    t = fleet_tables(c.cfg.feedback.state_dir, versions)
    st.caption(f"Fleet server `{c.cfg.fleet.server}`, machine class tag `{c.cfg.fleet.machine_class}`, "
               f"schedule {c.cfg.fleet.schedule} UTC" + (", only when idle" if c.cfg.fleet.only_when_idle else ""))
    if t["rounds"].empty:
        st.info("This appliance has not taken part in a fleet round yet (`pdm-edge fleet join`).")
    else:
        st.dataframe(t["rounds"], hide_index=True, placeholder="—", width="stretch")
    if not t["priors"].empty:
        st.markdown("Fleet priors held")
        st.dataframe(t["priors"], hide_index=True, placeholder="—", width="stretch")
    if not t["versions"].empty:
        st.markdown("Model versions calibrated from a fleet prior (the gate decided each)")
        st.dataframe(t["versions"], hide_index=True, placeholder="—", width="stretch")
