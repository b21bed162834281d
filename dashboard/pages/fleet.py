"""Fleet overview: every machine, most urgent first, refreshed live.

Status per machine (see :func:`dashboard.data.fleet_status`): alarm (open alert), warning
(latest window above threshold), stale (newest score older than ``[alerts] stale_after_s``:
never shown as healthy), uncalibrated (no threshold yet, or never scored), normal. Clicking a
row opens the machine's detail page.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repository root, for `import dashboard`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import time

import pandas as pd
import streamlit as st

from dashboard import common, data
from pdm_edge.errors import StoreError

c = common.page_start()

_BG = {"alarm": "background-color: rgba(228, 26, 28, 0.22); font-weight: 600",
       "warning": "background-color: rgba(255, 127, 0, 0.22)",
       "stale": "background-color: rgba(152, 78, 163, 0.20)",
       "uncalibrated": "background-color: rgba(128, 128, 128, 0.12)",
       "normal": ""}


def _sensors_text(row: data.FleetRow) -> str:
    parts = [f"{s.sensor}: {s.state}" for s in row.sensors]
    if row.silent_sensors:
        parts.append("silent: " + ", ".join(row.silent_sensors))
    return "; ".join(parts) or "—"


def _model_text(row: data.FleetRow) -> str:
    active = ", ".join(a.split(": ", 1)[1] for a in row.registry_active)
    if row.model_version and active and row.model_version not in active:
        return f"{row.model_version} (registry: {active})"
    return row.model_version or active or "—"


def fleet_frame(rows: list[data.FleetRow]) -> pd.DataFrame:
    """The table shown: one row per machine, in urgency order."""
    return pd.DataFrame({
        "status": [data.status_text(r) for r in rows],
        "machine": [r.machine for r in rows],
        "site": [r.site for r in rows],
        "score / threshold": [r.ratio for r in rows],
        "score": [r.last_score for r in rows],
        "threshold": [r.last_threshold for r in rows],
        "open alerts": [r.open_alerts for r in rows],
        "ISO 20816-3": [data.zone_text(r.zone, r.velocity_rms_mm_s) for r in rows],
        "last data": [data.fmt_age(r.age_s) for r in rows],
        "model version": [_model_text(r) for r in rows],
        "sensors": [_sensors_text(r) for r in rows],
    })


@st.fragment(run_every=c.cfg.dashboard.refresh_s)
def fleet_view() -> None:
    try:
        rows = common.q_fleet(c.cfg_key, common.tick(c), c)
    except StoreError as exc:
        st.error(f"The results store cannot be read: {exc}")
        return
    counts = data.status_counts(rows)
    cols = st.columns(len(data.STATUSES))
    stale_alarms = sum(1 for r in rows if data.stale_alarm(r))
    for col, s in zip(cols, data.STATUSES):
        extra = {"delta": f"+{stale_alarms} alarm(s) with stale data", "delta_color": "off", "delta_arrow": "off"} \
            if s == "stale" and stale_alarms else {}
        col.metric(f"{data.STATUS_ICONS[s]} {s}", counts[s], border=False, **extra)
    if not rows:
        st.info("**No machines yet.** A machine appears here as soon as it is configured in `[sensors]` or its first "
                "window is scored by the appliance (`pdm-edge run`).")
        return
    df = fleet_frame(rows)
    styled = df.style.apply(lambda _: [_BG[r.status] for r in rows], subset=["status"], axis=0)
    event = st.dataframe(
        styled, hide_index=True, placeholder="—", width="stretch", on_select="rerun", selection_mode="single-row", key="fleet_table",
        height=min(35 * (len(df) + 1) + 3, 35 * 26 + 3),
        column_config={
            "status": st.column_config.TextColumn(width=120, help="alarm > warning > stale > uncalibrated > normal"),
            "machine": st.column_config.TextColumn(width="small"),
            "site": st.column_config.TextColumn(width="small"),
            "score / threshold": st.column_config.ProgressColumn(
                min_value=0.0, max_value=2.0, format="%.2f×", width="medium", color="blue",
                help="newest score divided by its threshold: above 1× the window was anomalous"),
            "score": st.column_config.NumberColumn(format="%.2f", help="newest anomaly score (dimensionless)"),
            "threshold": st.column_config.NumberColumn(format="%.2f", help="threshold of the model version that scored it"),
            "open alerts": st.column_config.NumberColumn(format="%d", width="small"),
            "ISO 20816-3": st.column_config.TextColumn(
                help="vibration severity of the newest window: zone A (new) / B (long-term operation) / C (restricted) / "
                     "D (damage possible), velocity RMS 10-1000 Hz; the worst sensor of the machine"),
            "last data": st.column_config.TextColumn(help="age of the newest scored window"),
            "model version": st.column_config.TextColumn(help="version that scored the newest window"),
        },
    )
    st.caption(f"Updated {time.strftime('%H:%M:%S', time.gmtime())} UTC · refreshes every {c.cfg.dashboard.refresh_s:g} s · "
               f"stale when the newest score is older than {data.fmt_duration(c.cfg.alerts.stale_after_s)} "
               "(an alarm stays an alarm, marked stale) · "
               "select a row to open the machine")
    sel = getattr(getattr(event, "selection", None), "rows", None)
    if sel:
        st.session_state[common.MACHINE_KEY] = rows[sel[0]].key
        st.switch_page("pages/machine.py")


st.markdown("#### Fleet overview")
fleet_view()
