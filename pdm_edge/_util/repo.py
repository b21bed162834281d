"""The source checkout beside the installed package: the dashboard and benchmarks live there."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["REPO", "dashboard_importable"]

REPO = Path(__file__).resolve().parents[2]
"""The directory holding ``pdm_edge/`` (with an editable install: the checkout)."""


def dashboard_importable() -> None:
    """Make ``import dashboard`` work: the dashboard is not an installed package, it is the
    checkout's ``dashboard/`` beside ``pdm_edge/``."""
    root = str(REPO)
    if root not in sys.path:
        sys.path.append(root)
