"""Machine detail: score over time with threshold, alerts, labels and model events; the spectrum
of a selected alert or labelled span against the machine's baseline; for vibration the envelope
spectrum with the bearing's defect frequencies.

Time ranges end now; a machine without data in the range is shown up to its newest score
instead. Long ranges are downsampled in the store (:meth:`Store.query_score_buckets`, maximum
per bucket, at most :data:`dashboard.data.DEFAULT_MAX_POINTS` buckets), so a month loads as fast
as an hour.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repository root, for `import dashboard`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import time

import pandas as pd
import streamlit as st

from dashboard import charts, common, data
from pdm_edge.errors import StoreError

c = common.page_start()
NS = data.NS
# time ranges of the charts; the default, "data span", fits the sensor's scores of the last 30 days
DATA_SPAN = "data span"
RANGES: dict[str, int | None] = {DATA_SPAN: None, "1 h": 3600, "6 h": 6 * 3600, "24 h": 86400, "7 d": 7 * 86400,
                                 "30 d": 30 * 86400}

store, store_err = common.get_store(c)
if store is None:
    st.error(f"The results store cannot be opened: {store_err}")
    st.stop()
book, book_err = common.get_book(c)
registry, _ = common.get_registry(c)
tick = common.tick(c)
try:
    fleet = common.q_fleet(c.cfg_key, tick, c)
except StoreError as exc:
    st.error(f"The results store cannot be read: {exc}")
    st.stop()
if not fleet:
    st.markdown("#### Machine detail")
    st.info("No machines yet: nothing has been scored and no sensor is configured.")
    st.stop()

by_key = {r.key: r for r in fleet}
keys = [r.key for r in fleet]
if "machine" in st.query_params:  # a link such as /machine?machine=plant1/pump-3: taken once
    st.session_state[common.MACHINE_KEY] = st.query_params["machine"]
    del st.query_params["machine"]
wanted = st.session_state.get(common.MACHINE_KEY)
if wanted not in by_key:
    wanted = keys[0]

top = st.columns([2.0, 1.3, 3.6, 2.6])
key = top[0].selectbox("Machine", keys, index=keys.index(wanted), key="machine_select",
                       help="most urgent first, as in the fleet overview")
st.session_state[common.MACHINE_KEY] = key
row = by_key[key]
versions = common.q_registry_versions(c.cfg_key, tick, c)
sensors = data.sensors_of(store, c.cfg, row.site, row.machine, row.last_score_ns, versions)
if not sensors:
    st.info(f"**{common.md(key)}** has no sensors with scores or configuration yet.")
    st.stop()
sensor = top[1].selectbox("Sensor", sensors, key="sensor_select")
range_label = top[2].segmented_control("Time range", list(RANGES), default=DATA_SPAN, key="range_select") or DATA_SPAN
span_s = RANGES[range_label]

with top[3]:
    ratio = f" ({row.ratio:.2f}× threshold)" if row.ratio is not None else ""
    st.markdown(f"**{common.status_badge(row.status)}** · {row.open_alerts} open alert(s)  \n"
                f"newest score {row.last_score if row.last_score is None else round(row.last_score, 2)}{ratio}, "
                f"{data.fmt_age(row.age_s)}  \nmodel {common.md(row.model_version) or '—'}"
                + (f"  \nISO 20816-3: **zone {row.zone}**, {row.velocity_rms_mm_s:.2f} mm/s "
                   f"({data.ZONE_MEANING[row.zone]})" if row.zone and row.velocity_rms_mm_s is not None else ""))

# -- the range ---------------------------------------------------------------------------------
now_ns = time.time_ns()
span = data.score_span(store, row.site, row.machine, sensor, row.last_score_ns) if row.last_score_ns is not None else None
start_ns, end_ns, note = data.chart_range(span, now_ns, span_s, row.last_score_ns)

buckets, every = common.q_buckets(c.cfg_key, row.site, row.machine, sensor, start_ns, end_ns, data.DEFAULT_MAX_POINTS, tick, c)
pre_ns = 7 * 86400 * NS  # alerts that began before the range and still overlap it
alerts_all = common.q_alerts(c.cfg_key, row.site, row.machine, start_ns - pre_ns, end_ns, tick, c)
alerts = [a for a in alerts_all if a.sensor == sensor and (a.end_ns is None or a.end_ns > start_ns)]
labels = [(lb, src) for lb, src in data.machine_labels(store, book, row.site, row.machine, start_ns, end_ns)
          if lb.sensor in (None, sensor)]
events = common.q_model_events(c.cfg_key, row.site, row.machine, start_ns, end_ns, tick, c)

# -- score chart -------------------------------------------------------------------------------
if note:
    st.caption(note)
if buckets:
    st.altair_chart(charts.score_chart(buckets, every, start_ns, end_ns, alerts=alerts, labels=labels, events=events),
                    width="stretch")
    n_windows = sum(b.count for b in buckets)
    st.caption(f"{sensor}: maximum score per {data.fmt_duration(every)} bucket ({len(buckets)} buckets, {n_windows} windows) · "
               "blue: score · dashed red: threshold · red dots: anomalous windows · shaded red: alerts · "
               "top strip: labels (red fault, green normal, grey ignore) · purple dashed: model events")
else:
    st.info(f"No scores of {common.md(key + '/' + sensor)} between {data.fmt_time(start_ns)} and {data.fmt_time(end_ns)}"
            + (" — this machine has never been scored (uncalibrated)." if row.last_score_ns is None else "."))

row_scores = {s.sensor: s.score for s in row.sensors}
# -- report and exports --------------------------------------------------------------------------
REPORT = "pdm_report"
rep_cols = st.columns([1.3, 1, 1, 4])
if rep_cols[0].button("Make report", icon=":material/description:", key="make_report",
                      help="a printable HTML report of this machine over the range shown (alerts, labels, score and "
                           "severity trends, spectra of the top alert, model versions), and CSV exports"):
    from dashboard.report import build_report

    with st.spinner("Making the report…"):
        st.session_state[REPORT] = (key, start_ns, end_ns, build_report(store, c.cfg, row.site, row.machine, start_ns, end_ns,
                                                                        registry=registry, book=book))
made = st.session_state.get(REPORT)
if made and made[0] == key:
    _, r0, r1, rep = made
    stem = f"{row.site}-{row.machine}-{data.ns_to_datetime(r1).strftime('%Y%m%dT%H%M%SZ')}"
    rep_cols[1].download_button("Report (HTML)", rep.html, file_name=f"report-{stem}.html", mime="text/html", key="dl_report")
    rep_cols[2].download_button("Scores (CSV)", rep.scores_csv, file_name=f"scores-{stem}.csv", mime="text/csv", key="dl_scores")
    rep_cols[3].download_button("Alerts (CSV)", rep.alerts_csv, file_name=f"alerts-{stem}.csv", mime="text/csv", key="dl_alerts")
    st.caption(f"Report of {data.fmt_time(r0)} → {data.fmt_time(r1)}: open the HTML in a browser and print it to PDF.")

# -- severity and condition trends ----------------------------------------------------------------
cond_rows = common.q_condition_buckets(c.cfg_key, row.site, row.machine, sensor, start_ns, end_ns, every, tick, c) if buckets else []
if cond_rows:
    scfg_zones = c.cfg.sensor(row.site, row.machine, sensor)
    zones = scfg_zones.severity_zones_mm_s if scfg_zones is not None else list(data.GROUP2_RIGID_MM_S)
    with st.expander("Vibration severity (ISO 20816-3) and condition trends", expanded=True):
        if any(r.velocity_rms_mm_s is not None for r in cond_rows):
            st.altair_chart(charts.severity_chart(cond_rows, start_ns, end_ns, zones), width="stretch")
            st.caption(f"Velocity RMS 10-1000 Hz (from acceleration, integrated in the frequency domain), maximum per "
                       f"{data.fmt_duration(every)} bucket · zone boundaries {zones[0]:g} / {zones[1]:g} / {zones[2]:g} mm/s "
                       "(`severity_zones_mm_s`; default ISO 20816-3 group 2, rigid support)")
        cols = st.columns(4)
        for i, chart in enumerate(charts.trend_charts(cond_rows, start_ns, end_ns, cond_rows[0].unit)):
            cols[i % 4].altair_chart(chart, width="stretch")
        st.caption(f"Maximum per {data.fmt_duration(every)} bucket, as the score · crest factor = peak / RMS · kurtosis "
                   "3 for Gaussian noise (impacts raise it) · band energies are mean squares in the band")

tab_a, tab_l, tab_e = st.tabs([f"Alerts ({len(alerts)})", f"Labels ({len(labels)})", f"Model events ({len(events)})"])
with tab_a:
    if alerts:
        st.dataframe(pd.DataFrame({
            "state": [("OPEN" if a.state == "raised" else "cleared") for a in alerts],
            "start": [data.fmt_time(a.start_ns) for a in alerts],
            "end": [data.fmt_time(a.end_ns) if a.end_ns else "ongoing" for a in alerts],
            "peak score": [data.alert_peak(store, a, now_ns) for a in alerts],
            "newest score": [row_scores.get(a.sensor) if a.state == "raised" else None for a in alerts],
            "threshold": [a.threshold for a in alerts],
            "model version": [a.model_version for a in alerts],
            "labelled": [", ".join(lb.kind for lb in data.labels_answering(a, [x for x, _ in labels])) or "—" for a in alerts],
            "looks like": [a.fault_match.describe() if a.fault_match else "—" for a in alerts],
            "alert id": [a.id for a in alerts],
        }), hide_index=True, placeholder="—", width="stretch",
            column_config={"peak score": st.column_config.NumberColumn(format="%.2f", help="highest score of the alert so far"),
                           "newest score": st.column_config.NumberColumn(format="%.2f", help="the sensor's newest score (open alerts)"),
                           "threshold": st.column_config.NumberColumn(format="%.2f"),
                           "looks like": st.column_config.TextColumn(
                               help="the confirmed fault (a technician's fault label) this alert's windows resemble most, "
                                    "from the model version's fault prototypes")})
    else:
        st.caption("No alerts of this sensor in the range.")
with tab_l:
    if book_err:
        st.warning(f"The label book cannot be read ({book_err}); labels shown come from the store only.")
    if labels:
        colour = {"fault": "red", "normal": "green", "ignore": "gray"}
        lines = []
        for lb, src in sorted(labels, key=lambda t: -t[0].start_ns)[:50]:
            what = f":{colour[lb.kind]}[**{lb.kind}**]" + (f" ({lb.fault_type})" if lb.fault_type else "")
            pending = " · _in the label book, not yet in the store_" if src == "label book" else ""
            lines.append(f"- {what} · {data.fmt_time(lb.start_ns)} → {data.fmt_time(lb.end_ns)} · sensor {common.md(lb.sensor) or 'all'} · "
                         f"by {common.md(lb.author)} at {data.fmt_time(lb.created_ns)}{pending}"
                         + (f"  \n  _{common.md(lb.note)}_" if lb.note else ""))
        st.markdown("\n".join(lines))
        if len(labels) > 50:
            st.caption(f"… {len(labels) - 50} older labels not shown.")
    else:
        st.caption("No labels in the range.")
with tab_e:
    if events:
        st.dataframe(pd.DataFrame({
            "time": [data.fmt_time(e.ts_ns) for e in events], "event": [e.event for e in events],
            "version": [e.version for e in events], "detail": [e.detail for e in events],
        }), hide_index=True, placeholder="—", width="stretch")
    else:
        st.caption("No model events in the range.")

# -- spectra -----------------------------------------------------------------------------------
st.markdown("##### Spectrum of an alert or labelled span")
choices: list[tuple[str, int, int, str | None]] = []
for a in sorted(alerts, key=lambda a: -a.start_ns):
    end = a.end_ns if a.end_ns is not None else now_ns
    choices.append((f"alert {data.fmt_time(a.start_ns)} → {'ongoing' if a.end_ns is None else data.fmt_time(a.end_ns)} "
                    f"(peak {data.alert_peak(store, a, now_ns):.1f})", a.start_ns, end, a.model_version))
for lb, _ in sorted(labels, key=lambda t: -t[0].start_ns):
    choices.append((f"label {lb.kind}{' ' + lb.fault_type if lb.fault_type else ''} {data.fmt_time(lb.start_ns)} → "
                    f"{data.fmt_time(lb.end_ns)}", lb.start_ns, lb.end_ns, None))
if not choices:
    st.caption("No alert or label in the range to show a spectrum for.")
    st.stop()
titles = [f"{t} #{i + 1}" if [c[0] for c in choices].count(t) > 1 else t for i, (t, *_) in enumerate(choices)]
pick = st.selectbox("Alert or span", titles, key="spectrum_pick")
title, s0, s1, version = choices[titles.index(pick)]
state_dir = c.cfg.feedback.state_dir
windows = data.buffer_windows(state_dir, row.site, row.machine, sensor, s0, s1)
if not windows:
    st.warning("**No raw window is available for this span.** The appliance keeps raw waveforms only for alerts and "
               "labels, in the labelled-window buffer (`[feedback] state_dir`/label_windows.sqlite); these may not have "
               "been captured (the appliance was not running the feedback stage), or have expired or been evicted.")
    st.stop()

unit = windows[0].unit
kind = windows[0].kind
selected_psd = data.psd_spectrum(windows, f"selected: {len(windows)} window(s)")
spectra = [selected_psd]
base_w = data.baseline_windows(state_dir, row.site, row.machine, sensor)
base_note = ""
if base_w:
    spectra.append(data.psd_spectrum(base_w, f"baseline: {len(base_w)} window(s) labelled normal"))
else:
    cal = data.calibration_baseline_psd(registry, row.site, row.machine, sensor, version)
    if cal is not None:
        spectra.append(cal[0])
        base_note = ("No windows labelled normal are stored for this sensor; the baseline is the model version's "
                     "calibration band levels (approximate).")
    else:
        base_note = ("No baseline available: no windows labelled normal in the buffer and no readable model version "
                     "in the registry for this sensor.")
left, right = st.columns(2)
with left:
    st.altair_chart(charts.spectrum_chart([s for s in spectra if s is not None],
                                          title=f"Power spectral density (Welch), {sensor}"), width="stretch")
    if base_note:
        st.caption(base_note)
    st.caption(f"{len(windows)} window(s) of {windows[0].duration_s:g} s at {windows[0].sample_rate_hz:g} Hz, unit {unit}.")
with right:
    if kind == "vibration":
        scfg = c.cfg.sensor(row.site, row.machine, sensor)
        marks = data.defect_frequencies(scfg)
        fmax = data.envelope_fmax_hz(windows[0].sample_rate_hz, marks)
        env = [data.envelope_spectrum(windows, f"selected: {len(windows)} window(s)", fmax)]
        if base_w:
            env.append(data.envelope_spectrum(base_w, f"baseline: {len(base_w)} window(s) labelled normal", fmax))
        st.altair_chart(charts.spectrum_chart([e for e in env if e is not None], title=f"Envelope spectrum (squared envelope), {sensor}",
                                              markers=marks), width="stretch")
        if marks:
            sh = scfg.shaft_hz if scfg else None
            st.caption(f"Defect frequencies at shaft {sh:g} Hz ({sh * 60:.0f} rpm), bearing "
                       f"{scfg.bearing.name or 'configured'}: " + ", ".join(f"{k} {v:.1f} Hz" for k, v in marks.items())
                       + " (a ball defect shows at 2×BSF).")
        else:
            st.caption(f"Set `bearing` and `shaft_hz` in `[sensors.\"{row.site}/{row.machine}/{sensor}\"]` to mark the "
                       "bearing defect frequencies (BPFO, BPFI, BSF, FTF).")
    else:
        st.caption("Envelope spectrum: vibration sensors only.")
