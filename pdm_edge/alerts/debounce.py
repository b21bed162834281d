"""k-of-n debouncing: turn per-window threshold crossings into alert spans.

An alert is **raised** when at least ``k`` of the last ``n`` windows of a stream scored above
the threshold, and **cleared** when none of the last ``n`` did (hysteresis: a single window
back under the threshold does not end an alert, a single spike does not start one). The span
runs from the first exceeding window among those that raised it to the end of the last
exceeding window. This is the usual "k out of n" (m-of-n) confirmation rule of alarm management
(cf. ISA-18.2 alarm on-delay / deadband practice).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class AlertEvent:
    """A change of alert state of one stream.

    Attributes:
        state: ``"raised"`` or ``"cleared"``.
        start_ns: start of the first exceeding window of the span (ns, UTC).
        end_ns: end of the last exceeding window (ns), set on ``"cleared"``; ``None`` when raised.
        peak_score: highest score inside the span so far.
    """

    state: Literal["raised", "cleared"]
    start_ns: int
    end_ns: int | None
    peak_score: float


class KOfN:
    """Debouncer for one stream.

    Args:
        k, n: raise when ``k`` of the last ``n`` windows exceed; ``1 <= k <= n``.

    Raises:
        ValueError: for invalid ``k``/``n``.
    """

    def __init__(self, k: int = 3, n: int = 5) -> None:
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k} n={n}")
        self.k, self.n = k, n
        self._recent: collections.deque[tuple[bool, int, int, float]] = collections.deque(maxlen=n)
        self.active = False
        self._start_ns = 0
        self._end_ns = 0
        self._peak = float("-inf")

    def update(self, score: float, threshold: float, start_ns: int, end_ns: int) -> AlertEvent | None:
        """Feed one window's score; returns an event when the alert state changes.

        Args:
            score: the window's anomaly score.
            threshold: the threshold in force.
            start_ns, end_ns: the window's span (ns).
        """
        above = score > threshold
        self._recent.append((above, start_ns, end_ns, score))
        n_above = sum(1 for a, *_ in self._recent if a)
        if not self.active:
            if n_above >= self.k:
                first = next(r for r in self._recent if r[0])
                self.active = True
                self._start_ns = first[1]
                self._end_ns = max(r[2] for r in self._recent if r[0])
                self._peak = max(r[3] for r in self._recent if r[0])
                return AlertEvent("raised", self._start_ns, None, self._peak)
            return None
        if above:
            self._end_ns = end_ns
            self._peak = max(self._peak, score)
        if n_above == 0 and len(self._recent) == self.n:
            self.active = False
            return AlertEvent("cleared", self._start_ns, self._end_ns, self._peak)
        return None
