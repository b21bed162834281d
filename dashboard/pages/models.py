"""Model versions: each stream's version history from the registry (trigger, gate metrics, size,
sha256, status and reason), with promote and roll back for engineers, each behind a
confirmation step. The dashboard calls :meth:`Registry.promote` / :meth:`Registry.rollback`;
the running appliance notices registry changes itself and swaps the model without a restart.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repository root, for `import dashboard`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import os

import pandas as pd
import streamlit as st

from dashboard import common, data

c = common.page_start()
PENDING = "pdm_pending_model_action"
ICONS = {"active": "●", "candidate": "◐", "rejected": "✕", "retired": "○"}

st.markdown("#### Model versions")
registry, reg_err = common.get_registry(c)
if reg_err:
    st.error(f"The model registry cannot be opened: {reg_err}")
    st.stop()
if registry is None:
    st.info(f"No model registry yet at `{os.path.abspath(c.cfg.registry.dir)}`: the appliance creates it when it calibrates "
            "its first machine.")
    st.stop()
versions = common.q_registry_versions(c.cfg_key, common.tick(c), c)
if not versions:
    st.info("The registry holds no model version yet.")
    st.stop()

streams = sorted({(v["site"], v["machine"], v["sensor"]) for v in versions})
machines = sorted({f"{s}/{m}" for s, m, _ in streams})
flt = st.selectbox("Machine", ["all machines", *machines], key="models_machine")
if c.read_only:
    st.caption(":material/lock: Promote and roll back need user accounts, and none are configured (see the banner).")
elif not c.can("manage_models"):
    st.caption(":material/lock: Engineers can promote or roll back versions here after signing in.")


def _metric(v: dict, name: str) -> float | None:
    x = v["metrics"].get(name)
    return float(x) if isinstance(x, (int, float)) else None


def _do(action: dict) -> None:
    """Run a confirmed action (role checked again here, on the server)."""
    if not c.can("manage_models"):
        st.error("Only a signed-in engineer may change model versions.")
        return
    who = c.user.name if c.user else "?"
    try:
        if action["action"] == "promote":
            rec = registry.promote(action["version"], f"promoted by {who} from the dashboard", force=action.get("force", False))
            common.flash(f"{common.md(rec.id)} is now the active version of {common.md(rec.stream)}.")
        else:
            rec = registry.rollback(*action["stream"])
            common.flash(f"Rolled back {common.md(rec.stream)}: {common.md(rec.id)} is active again.")
    except Exception as exc:  # RegistryError (rejected without force, nothing to roll back to, ...)
        common.flash(f"Not done: {common.md(str(exc))}", "error")
    st.session_state.pop(PENDING, None)
    common.clear_query_caches()
    st.rerun()


for site, machine, sensor in streams:
    if flt != "all machines" and flt != f"{site}/{machine}":
        continue
    sk = f"{site}/{machine}/{sensor}"
    vs = [v for v in versions if (v["site"], v["machine"], v["sensor"]) == (site, machine, sensor)]
    active = next((v for v in vs if v["status"] == "active"), None)
    with st.container(border=True):
        st.markdown(f"**{common.md(sk)}** · active: {common.md(active['id']) if active else '— none (not scoring)'} · {len(vs)} version(s)")
        df = pd.DataFrame({
            "version": [v["id"] for v in vs],
            "status": [f"{ICONS.get(v['status'], '')} {v['status']}" for v in vs],
            "reason": [v["reason"] or "" for v in vs],
            "trigger": [v["trigger"] for v in vs],
            "created": [data.fmt_time(v["created_ns"]) for v in vs],
            "false-alarm rate": [_metric(v, "candidate_far") for v in vs],
            "active's FAR": [_metric(v, "active_far") for v in vs],
            "fault detection": [_metric(v, "fault_detection") for v in vs],
            "gate windows": [f"{v['metrics'].get('n_normal', '')}/{v['metrics'].get('n_fault', '')}" if v["metrics"] else "" for v in vs],
        })
        st.dataframe(df.iloc[::-1], hide_index=True, placeholder="—", width="stretch", column_config={
            "false-alarm rate": st.column_config.NumberColumn(format="%.4f", help="fraction of held-back normal windows above threshold"),
            "active's FAR": st.column_config.NumberColumn(format="%.4f", help="the then-active version on the same windows"),
            "fault detection": st.column_config.NumberColumn(format="%.2f", help="fraction of labelled fault windows above threshold"),
            "gate windows": st.column_config.TextColumn(help="held-back normal / labelled fault windows of the gate"),
            "reason": st.column_config.TextColumn(width="large", help="why it was promoted, rejected or retired (full text in the details)"),
        })
        with st.expander("Details (training summary, metrics, origin)"):
            for v in reversed(vs):
                st.markdown(f"{common.md(v['id'])} · **{common.md(v['status'])}** · origin {common.md(v['origin'])} · trigger "
                            f"{common.md(v['trigger'])} · parent {common.md(v['parent']) or '—'} · {data.fmt_bytes(v['size_bytes'])} · "
                            f"encoder {common.md(v['encoder_sha256'][:16])}… · "
                            f"sha256 {common.md(v['sha256'])}" + (f"  \n{common.md(v['reason'])}" if v.get("reason") else ""))
                st.json({"metrics": v["metrics"], "training_summary": v["training_summary"]}, expanded=False)
        if not c.can("manage_models"):
            continue
        pending = st.session_state.get(PENDING)
        if pending and pending.get("key") == sk:
            if pending["action"] == "promote":
                msg = (f"Promote **{common.md(pending['version'])}** to active for {common.md(sk)}"
                       + (f", replacing {common.md(active['id'])}" if active else "")
                       + (" — **overriding the gate** (it was rejected)" if pending.get("force") else "") + "?")
            else:
                msg = f"Roll back {common.md(sk)} from **{common.md(active['id']) if active else '?'}** to the version that was active before it?"
            st.warning(msg + " The running appliance switches to it within seconds.")
            b1, b2, _ = st.columns([1, 1, 4])
            if b1.button("Confirm", type="primary", key=f"confirm-{sk}"):
                _do(pending)
            if b2.button("Cancel", key=f"cancel-{sk}"):
                st.session_state.pop(PENDING, None)
                st.rerun()
            continue
        others = [v for v in reversed(vs) if v["status"] != "active"]
        a1, a2, a3, a4 = st.columns([2.2, 1.2, 1, 1])
        options = [f"{v['id']} ({v['status']})" for v in others]
        choice = a1.selectbox("Version to promote", options, key=f"pick-{sk}") if others else None
        pick = choice.split(" (", 1)[0] if choice else None
        picked = next((v for v in vs if v["id"] == pick), None)
        force = a2.checkbox("override the gate", key=f"force-{sk}", disabled=not (picked and picked["status"] == "rejected"),
                            help="a rejected version can only be promoted by overriding the gate")
        if a3.button("Promote…", key=f"promote-{sk}", disabled=picked is None or (picked["status"] == "rejected" and not force)):
            st.session_state[PENDING] = {"key": sk, "action": "promote", "version": pick, "force": bool(force)}
            st.rerun()
        if a4.button("Roll back…", key=f"rollback-{sk}", disabled=active is None or not (active.get("previous_active") or active.get("parent"))):
            st.session_state[PENDING] = {"key": sk, "action": "rollback", "stream": (site, machine, sensor)}
            st.rerun()
from dashboard.fleet_rounds import render_fleet_rounds  # noqa: E402  fleet rounds (pdm_edge.fleet)

render_fleet_rounds(c, versions)
