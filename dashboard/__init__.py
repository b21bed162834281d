"""The pdm-edge dashboard (Streamlit): ``streamlit run dashboard/app.py``.

- :mod:`dashboard.data`: every read and write the dashboard does (store, registry, label book,
  labelled-window buffer, service endpoints) and the pure computations on top (fleet status,
  downsampling, spectra), free of Streamlit so that it can be tested alone;
- :mod:`dashboard.auth` / :mod:`dashboard.users`: roles and the users file;
- :mod:`dashboard.charts`: the Altair charts;
- :mod:`dashboard.common`: the Streamlit glue (configuration, cached resources and queries,
  the signed-in user);
- ``dashboard/pages/``: one script per page; ``dashboard/app.py``: the entry point.

See ``dashboard/README.md``.
"""
