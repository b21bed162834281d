"""Labelling queue (technicians): unlabelled alerts first, one form per alert; any time span can
be labelled too. Every label goes through :func:`pdm_edge.feedback.submit_label` into the label
book (``[feedback] state_dir``/labels.sqlite), from which the running appliance forwards it to
the store and to training. Below the queue: recent labels and what the model did after each
(model events from the store, registry versions created since).
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repository root, for `import dashboard`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import datetime as dt
import time

import streamlit as st

from dashboard import common, data
from pdm_edge.errors import StoreError
from pdm_edge.feedback import LabelError, LabelLimits, submit_label
from pdm_edge.types import FAULT_TYPES, Label

c = common.page_start()
NS = data.NS
# radio options; the label kind is the first word (plain strings, no format_func: AppTest maps values by their text)
KINDS = ["fault — confirmed fault", "normal — false alarm", "ignore — maintenance / not representative"]
UNKNOWN = "(unknown)"
HORIZONS = {"7 days": 7, "30 days": 30, "90 days": 90}

store, store_err = common.get_store(c)
book, book_err = common.get_book(c)
if store is None:
    st.error(f"The results store cannot be opened: {store_err}")
    st.stop()
tick = common.tick(c)
try:
    fleet = common.q_fleet(c.cfg_key, tick, c)
except StoreError as exc:
    st.error(f"The results store cannot be read: {exc}")
    st.stop()
may_label = c.can("label") and book is not None

head = st.columns([3, 1.2])
head[0].markdown("#### Labelling queue")
horizon = head[1].selectbox("Alerts of the last", list(HORIZONS), index=1, key="queue_horizon")
if book is None:
    st.error(f"The label book cannot be opened ({book_err}): labels cannot be saved.")
elif c.read_only:
    st.info("Labelling needs user accounts, and none are configured (see the banner): the queue is shown read-only.",
            icon=":material/lock:")
elif not c.can("label"):
    st.info("Sign in as a technician or engineer (sidebar) to label events. The queue is shown read-only.", icon=":material/lock:")

now_ns = time.time_ns()
t0 = now_ns - HORIZONS[horizon] * 86400 * NS
alerts, labels = [], []
for r in fleet:
    alerts += common.q_alerts(c.cfg_key, r.site, r.machine, t0, now_ns + NS, tick, c)
    labels += [lb for lb, _ in data.machine_labels(store, book, r.site, r.machine, t0, now_ns + 365 * 86400 * NS)]
queue = data.label_queue(alerts, labels)
unlabelled = [it for it in queue if not it.labelled]
limits = LabelLimits.from_config(c.cfg.feedback)


def _save(**fields: object) -> None:
    """Submit a label (role checked here, on the server) and report the outcome."""
    if not c.can("label") or book is None:
        st.error("Not saved: only a signed-in technician or engineer may label.")
        return
    if not fields.get("kind"):
        st.error("Not saved: choose a judgement (fault, normal or ignore).")
        return
    try:
        label, created = submit_label(book, author=c.user.name, limits=limits, **fields)  # type: ignore[union-attr, arg-type]
    except LabelError as exc:
        st.error(f"Not saved — {exc.field}: {exc.message}")
        return
    except StoreError as exc:
        st.error(f"Not saved — the label book cannot be written: {exc}")
        return
    what = label.kind + (f" ({label.fault_type})" if label.fault_type else "")
    where = common.md(f"{label.site}/{label.machine}" + (f"/{label.sensor}" if label.sensor else ""))
    if created:
        common.flash(f"Label saved: **{what}** on {where}, {data.fmt_time(label.start_ns)} → {data.fmt_time(label.end_ns)} "
                     f"by {common.md(label.author)} (id {label.id[:8]}). The appliance forwards it to the store and to training; "
                     "it shows on the machine page now.")
    else:
        common.flash(f"This label was already given by {common.md(label.author)} at {data.fmt_time(label.created_ns)} "
                     f"(id {label.id[:8]}): nothing changed.", "info")
    common.clear_query_caches()
    st.rerun()


def _label_fields(prefix: str) -> tuple[str | None, str | None, str]:
    """The judgement (nothing pre-selected: a label must be a decision), fault type and note."""
    choice = st.radio("Judgement", KINDS, index=None, horizontal=True, key=f"{prefix}-kind")
    kind = choice.split(" ", 1)[0] if choice else None
    ft = st.selectbox("Fault type (for a fault)", [UNKNOWN, *FAULT_TYPES], key=f"{prefix}-ft")
    note = st.text_area("Note", key=f"{prefix}-note", height=68, max_chars=limits.max_note_chars,
                        placeholder="what was found on site, work order, ...")
    return kind, (None if kind != "fault" or ft == UNKNOWN else ft), note


# -- unlabelled alerts ---------------------------------------------------------------------------
st.markdown(f"##### Unlabelled alerts ({len(unlabelled)})")
if not unlabelled:
    st.caption("Nothing to label: every alert of the period has a label.")
for it in unlabelled[:25]:
    a = it.alert
    peak = data.alert_peak(store, a, now_ns)
    with st.container(border=True):
        info, form = st.columns([1.1, 2])
        with info:
            st.markdown(f"**{':red[:material/error:] open' if a.state == 'raised' else ':gray[:material/check:] cleared'} alert · "
                        f"{common.md(a.site + '/' + a.machine)} · {common.md(a.sensor)}**")
            st.markdown(f"{data.fmt_time(a.start_ns)} → {'ongoing' if a.end_ns is None else data.fmt_time(a.end_ns)}  \n"
                        f"peak score **{peak:.2f}** (threshold {a.threshold:.2f}, {peak / a.threshold:.1f}×)"
                        + (" so far" if a.state == "raised" else "") + "  \n"
                        f"model {common.md(a.model_version)} · id {common.md(a.id[:8])}")
            if a.fault_match is not None:  # the version knows a confirmed fault that this alert resembles
                st.markdown(f":orange[:material/history:] **{common.md(a.fault_match.describe())}** "
                            f"(label {common.md(a.fault_match.label_id[:8])})")
            if st.button("Open machine", key=f"open-{a.id}"):
                st.session_state[common.MACHINE_KEY] = f"{a.site}/{a.machine}"
                st.switch_page("pages/machine.py")
        with form, st.form(f"label-{a.id}", border=False):
            kind, ft, note = _label_fields(f"q-{a.id}")
            if st.form_submit_button("Save label", type="primary", disabled=not may_label):
                s0, s1 = data.label_span_for_alert(a, time.time_ns())
                _save(site=a.site, machine=a.machine, sensor=a.sensor, alert_id=a.id, start_ns=s0,
                      end_ns=s1, kind=kind, fault_type=ft, note=note)
if len(unlabelled) > 25:
    st.caption(f"… and {len(unlabelled) - 25} more (oldest last).")

# -- any time span -----------------------------------------------------------------------------
with st.expander("Label a time span (maintenance, a fault found on inspection, ...)"):
    if not fleet:
        st.caption("No machines yet.")
    else:
        keys = [r.key for r in fleet]
        with st.form("label-span"):
            cols = st.columns(3)
            mkey = cols[0].selectbox("Machine", keys, key="span-machine")
            sensor = cols[1].text_input("Sensor (empty: every sensor)", key="span-sensor")
            today = dt.datetime.now(dt.timezone.utc)
            d0 = cols[2].date_input("Start date (UTC)", today.date(), key="span-d0")
            cols2 = st.columns(3)
            t_0 = cols2[0].time_input("Start time (UTC)", (today - dt.timedelta(hours=1)).time().replace(microsecond=0), key="span-t0")
            d1 = cols2[1].date_input("End date (UTC)", today.date(), key="span-d1")
            t_1 = cols2[2].time_input("End time (UTC)", today.time().replace(microsecond=0), key="span-t1")
            kind, ft, note = _label_fields("span")
            if st.form_submit_button("Save label", type="primary", disabled=not may_label):
                site, machine = mkey.split("/", 1)
                s0 = int(dt.datetime.combine(d0, t_0, dt.timezone.utc).timestamp()) * NS
                s1 = int(dt.datetime.combine(d1, t_1, dt.timezone.utc).timestamp()) * NS
                _save(site=site, machine=machine, sensor=sensor.strip() or None, start_ns=s0, end_ns=s1,
                      kind=kind, fault_type=ft, note=note)

# -- recent labels and what followed -------------------------------------------------------------
st.markdown("##### Recent labels and what the model did since")
recent: list[Label] = sorted({lb.id: lb for lb in labels}.values(), key=lambda lb: -lb.created_ns)[:15]
if not recent:
    st.caption("No labels in the period.")
versions = common.q_registry_versions(c.cfg_key, tick, c)
for lb in recent:
    events = common.q_model_events(c.cfg_key, lb.site, lb.machine, lb.created_ns, now_ns + NS, tick, c)
    ev, vs = data.after_label(lb, events, versions)
    head = (f"**{lb.kind}{' (' + lb.fault_type + ')' if lb.fault_type else ''}** · "
            f"{common.md(lb.site + '/' + lb.machine + ('/' + lb.sensor if lb.sensor else ''))} · {data.fmt_time(lb.start_ns)} → {data.fmt_time(lb.end_ns)} · "
            f"by {common.md(lb.author)}, {data.fmt_time(lb.created_ns)}")
    with st.container(border=True):
        st.markdown(head + (f"  \n_{common.md(lb.note)}_" if lb.note else ""))
        if not ev and not vs:
            st.caption("No model event and no new model version since this label (the appliance retrains after "
                       f"{c.cfg.learning.retrain_after_labels} new label{'' if c.cfg.learning.retrain_after_labels == 1 else 's'} "
                       "of a stream).")
        for e in ev:
            st.markdown(f"- {data.fmt_time(e.ts_ns)} — model event **{common.md(e.event)}** {common.md(e.version)}" + (f": {common.md(e.detail)}" if e.detail else ""))
        for v in vs:
            icon = {"active": ":green[:material/check_circle:]", "candidate": ":orange[:material/pending:]",
                    "rejected": ":red[:material/cancel:]", "retired": ":gray[:material/history:]"}.get(v["status"], "")
            st.markdown(f"- {data.fmt_time(v['created_ns'])} — version {common.md(v['id'])} ({common.md(v['trigger'])}): {icon} **{v['status']}**"
                        + (f" — {common.md(v['reason'])}" if v.get("reason") else ""))
