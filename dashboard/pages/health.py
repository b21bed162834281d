"""System health: the running appliance's own report (``/healthz`` JSON and ``/metrics``
Prometheus text at ``[service] http``) when it answers, else a clear "service not reachable";
and what the dashboard can check itself: broker (TCP), store (:meth:`Store.server_info`), spool
depth (the spool file, read-only), labelled-window buffer, label book outbox, registry.

The service's document gives its own verdict (``ok`` / ``degraded`` / ``down`` with the
reasons), broker and store state, spool, every stream's state, model version and counts, and the
training loop's status; dead letters come from ``pdm_edge_deadletters_total``. Ingest rates are
differences between two successive documents read by this browser session (so the first view
shows counts only).
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repository root, for `import dashboard`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import os
import time

import pandas as pd
import streamlit as st

from dashboard import common, data

c = common.page_start()
PREV = "pdm_health_prev"

st.markdown("#### System health")


def _card(col: st.delta_generator.DeltaGenerator, title: str, ok: bool | str | None, detail: str) -> None:
    """A status line: ``ok`` True (green), False (red), ``"warn"`` (orange) or None (unknown, grey). ``title``
    and ``detail`` are text (they carry names, reasons and ids from the service and the registry): shown
    literally, never as Markdown or HTML."""
    icon = {True: ":green[:material/check_circle:]", False: ":red[:material/error:]", "warn": ":orange[:material/warning:]",
            None: ":gray[:material/help:]"}[ok]
    col.markdown(f"**{icon} {common.md(title)}**  \n:small[{common.md(detail)}]")


def _find_key(obj: object, *words: str) -> object:
    """The first value in a nested JSON object whose key contains one of ``words``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if any(w in str(k).lower() for w in words):
                return v
        for v in obj.values():
            found = _find_key(v, *words)
            if found is not None:
                return found
    return None


@st.fragment(run_every=max(c.cfg.dashboard.refresh_s, 5.0))
def health_view() -> None:
    sh = data.service_health(c.cfg)
    store, store_err = common.get_store(c)
    st_ok, st_detail = data.store_info(store) if store is not None else (False, store_err or "")
    broker_hz = _find_key(sh.healthz, "mqtt", "broker") if sh.healthz else None
    if isinstance(broker_hz, dict) and "connected" in broker_hz:
        b_ok = bool(broker_hz["connected"])
        b_detail = f"the service is {'connected' if b_ok else 'NOT connected'}"
    else:
        b_ok, b_detail = data.tcp_reachable(c.cfg.mqtt.broker, 1883)
        b_detail = f"TCP check from the dashboard: {b_detail}"
    depth, oldest, sp_err = data.spool_state(c.cfg.spool.path)
    cols = st.columns(4)
    if not sh.reachable:
        _card(cols[0], "Service", False, f"not reachable at {sh.base_url}: {sh.healthz_error}")
    elif sh.healthz is not None and "status" in sh.healthz:
        verdict = str(sh.healthz["status"])
        reasons = "; ".join(str(r) for r in sh.healthz.get("reasons") or [])
        up = sh.healthz.get("uptime_s")
        _card(cols[0], f"Service: {verdict}", True if verdict == "ok" else ("warn" if verdict == "degraded" else False),
              f"{sh.base_url}" + (f", up {data.fmt_duration(round(float(up)))}" if isinstance(up, (int, float)) else "")
              + (f", {mem}" if (mem := data.memory_text(sh.healthz)) else "")
              + (f" — {reasons}" if reasons else ""))
    else:
        _card(cols[0], "Service", True, f"{sh.base_url} answers")
    _card(cols[1], "Broker", b_ok, f"{c.cfg.mqtt.broker} — {b_detail}")
    svc_store = (sh.healthz or {}).get("store") if sh.reachable else None
    if isinstance(svc_store, dict) and "reachable" in svc_store:
        seen = svc_store["reachable"]
        st_detail += (" · the service: " + {True: "reachable", False: "UNREACHABLE", None: "not probed yet"}.get(seen, str(seen))
                      + (f" ({svc_store['error']})" if svc_store.get("error") else ""))
        st_ok = st_ok if seen is not False else False
    _card(cols[2], "Store", st_ok, f"{c.cfg.store.backend}: {st_detail}")
    if sp_err:
        _card(cols[3], "Spool", None, f"{sp_err} (the running appliance creates it)")
    else:
        age = f", oldest {data.fmt_age((time.time_ns() - oldest) / 1e9)}" if oldest else ""
        _card(cols[3], "Spool", depth is not None and depth < c.cfg.spool.max_records // 2,
              f"{depth} record(s) waiting for the store{age} (bound {c.cfg.spool.max_records})")

    if (cluster := data.cluster_text(sh.healthz)) is not None:
        st.caption(common.md(cluster) + " — this page shows this instance only (`[service] http`)")
    if not sh.reachable:
        st.error(f"**Service not reachable** at {common.md(sh.base_url)} ({common.md(sh.healthz_error)}). Ingest rates, dead letters and "
                 "training status come from the running appliance (`pdm-edge run`, `[service] http`). The checks above "
                 "are the dashboard's own.")
    else:
        counters = data.per_stream_counters(sh.metrics)
        prev = st.session_state.get(PREV)
        st.session_state[PREV] = (sh.healthz, counters, sh.fetched_ns)
        left, right = st.columns([3, 2])
        with left:
            st.markdown("##### Ingest per stream")
            rows = data.stream_rows(sh.healthz, prev[0] if prev else None, prev[2] if prev else None, sh.fetched_ns)
            if rows:
                st.dataframe(pd.DataFrame(rows), hide_index=True, placeholder="—", width="stretch")
                if not prev:
                    st.caption("Rates appear at the next refresh (difference of two readings).")
            elif counters:
                rates = data.rates(prev[1], prev[2], counters, sh.fetched_ns) if prev else {}
                rows = []
                for name, streams in sorted(counters.items()):
                    for stream, total in sorted(streams.items()):
                        rate = rates.get(name, {}).get(stream)
                        rows.append({"stream": stream, "counter": name, "total": total,
                                     "per second": None if rate is None else round(rate, 2)})
                st.dataframe(pd.DataFrame(rows), hide_index=True, placeholder="—", width="stretch")
                if not prev:
                    st.caption("Rates appear at the next refresh (difference of two readings).")
            else:
                st.caption("The service reports no streams yet.")
        with right:
            st.markdown("##### Dead letters by reason")
            dl = data.deadletters(sh.metrics)
            if dl:
                st.dataframe(pd.DataFrame({"reason": list(dl), "count": list(dl.values())}), hide_index=True, placeholder="—", width="stretch")
            else:
                st.caption("No dead letters reported.")
            st.markdown("##### Training")
            training = (sh.healthz or {}).get("training")
            if isinstance(training, dict) and "running" in training:
                run = training.get("running")
                st.markdown(("**training** " + common.md(f"{run.get('stream')} ({run.get('trigger')})") if isinstance(run, dict)
                             else "no training running")
                            + f"  \nqueued: {common.md(', '.join(map(str, training.get('queued') or []))) or 'none'}"
                            + "  \nruns: " + (common.md(", ".join(f"{k} {v}" for k, v in (training.get("runs") or {}).items()))
                                              or "none"))
            elif training is not None:
                st.json(training, expanded=False)
            else:
                st.caption("The service reports no training status (learning off, or not reported).")
        with st.expander("Raw /healthz and /metrics"):
            st.json(sh.healthz or {"error": sh.healthz_error}, expanded=False)
            if sh.metrics:
                st.dataframe(pd.DataFrame({"metric": [s.name for s in sh.metrics],
                                           "labels": [", ".join(f"{k}={v}" for k, v in s.labels.items()) for s in sh.metrics],
                                           "value": [s.value for s in sh.metrics]}), hide_index=True, placeholder="—", width="stretch")
            elif sh.metrics_error:
                st.caption(f"/metrics: {common.md(sh.metrics_error)}")

    st.markdown("##### On this appliance")
    cols = st.columns(3)
    buf = data.buffer_summary(c.cfg.feedback.state_dir)
    if buf is None:
        _card(cols[0], "Labelled-window buffer", None, "none yet (the appliance creates it)")
    else:
        _card(cols[0], "Labelled-window buffer", True,
              f"{buf['windows']} windows, {data.fmt_bytes(buf['bytes'])} of {data.fmt_bytes(c.cfg.feedback.buffer_max_bytes)}: "
              + ", ".join(f"{k} {v}" for k, v in buf["by_class"].items()))
    book, book_err = common.get_book(c)
    if book is None:
        _card(cols[1], "Label book", False, book_err or "")
    else:
        try:
            n, waiting = book.count(), len(book.unexported(limit=100_000))
            _card(cols[1], "Label book", waiting == 0 or sh.reachable,
                  f"{n} label(s); {waiting} not yet forwarded to the store" + (" (the service is not running)" if waiting and not sh.reachable else ""))
        except Exception as exc:
            _card(cols[1], "Label book", False, str(exc))
    versions = common.q_registry_versions(c.cfg_key, common.tick(c), c)
    if versions:
        newest = max(versions, key=lambda v: v["created_ns"])
        counts = {s: sum(v["status"] == s for v in versions) for s in ("active", "candidate", "rejected", "retired")}
        _card(cols[2], "Registry", True,
              ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"; newest {newest['id']} ({newest['trigger']}, {newest['status']}, {data.fmt_time(newest['created_ns'])})")
    else:
        _card(cols[2], "Registry", None, f"no versions yet ({os.path.abspath(c.cfg.registry.dir)})")
    st.caption(f"Checked {time.strftime('%H:%M:%S', time.gmtime())} UTC · refreshes every {max(c.cfg.dashboard.refresh_s, 5.0):g} s · "
               "ingest_stats points in the store are not read yet.")


health_view()
