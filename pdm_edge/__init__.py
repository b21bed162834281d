"""pdm-edge: a predictive-maintenance appliance for rotating machines.

The flow (see ``DESIGN.md`` of the team and README): sensors publish waveform chunks over
MQTT -> :mod:`pdm_edge.ingest` cuts them into :class:`~pdm_edge.types.Window` objects ->
features -> frozen encoder + adapter -> anomaly score -> alerts and storage.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pdm-edge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
