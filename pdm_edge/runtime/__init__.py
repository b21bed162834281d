"""The runtime shell of ``pdm-edge run``, apart from the pipeline: wiring and lifecycle
(``service``), the scoring worker (``worker``), ``/healthz`` (``health``), logs (``logging``),
systemd notification (``systemd``) and the end-to-end demo (``demo``). ``/metrics`` is
:mod:`pdm_edge.metrics`."""

from pdm_edge.runtime.service import Service, ServiceHooks, StopReport, run_forever

__all__ = ["Service", "ServiceHooks", "StopReport", "run_forever"]
