"""pdm-edge dashboard: ``streamlit run dashboard/app.py [-- --config PATH]``.

The entry script: page setup, configuration and sign-in (:mod:`dashboard.common`), then the
multipage navigation (``st.navigation``) over the scripts in ``dashboard/pages/``:

- Fleet overview (default): which machines need attention, live;
- Machine detail: score history with alerts, labels and model events; spectra of alerts;
- Labelling queue: technicians label alerts and time spans;
- Model versions: registry history; promote / roll back (engineers);
- System health: service, broker, store, spool, buffers.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(_REPO))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="pdm-edge", page_icon=":material/precision_manufacturing:", layout="wide",
                   initial_sidebar_state="auto")
st.set_option("client.toolbarMode", "viewer")  # no "Deploy" button on an appliance

_PAGES = Path(__file__).resolve().parent / "pages"
pages = [
    st.Page(_PAGES / "fleet.py", title="Fleet overview", icon=":material/factory:", url_path="overview", default=True),
    # the same page at /fleet (the default page itself is served at /): a link or bookmark to /fleet works
    st.Page(_PAGES / "fleet.py", title="Fleet overview", icon=":material/factory:", url_path="fleet", visibility="hidden"),
    st.Page(_PAGES / "machine.py", title="Machine detail", icon=":material/monitoring:", url_path="machine"),
    st.Page(_PAGES / "labels.py", title="Labelling queue", icon=":material/label:", url_path="labels"),
    st.Page(_PAGES / "models.py", title="Model versions", icon=":material/model_training:", url_path="models"),
    st.Page(_PAGES / "health.py", title="System health", icon=":material/health_and_safety:", url_path="health"),
]
pg = st.navigation(pages, position="top")
pg.run()  # each page starts with common.page_start(): sign-in, the access banner, the last write's confirmation
