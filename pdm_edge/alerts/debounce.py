"""k-of-n debouncing: turn per-window threshold crossings into alert spans.

An alert is **raised** when at least ``k`` of the last ``n`` windows of a stream scored above
the threshold, and **cleared** when none of the last ``n`` did (hysteresis: a single window
back under the threshold does not end an alert, a single spike does not start one). The span
runs from the first exceeding window among those that raised it to the end of the last
exceeding window. This is the usual "k out of n" (m-of-n) confirmation rule of alarm management
(cf. ISA-18.2 alarm on-delay / deadband practice).

This module is the one implementation of the rule: :class:`KOfN` follows one stream window by
window (the appliance's alerts, the replay buffer's "quiet stream" test), :func:`raises_alert`
and :func:`alert_statistic` judge a whole sequence at once (the registry's gate, the
evaluation). The one source of ``k`` and ``n`` is ``[alerts] k``/``n``
(:class:`pdm_edge.config.AlertsConfig`, defaults :data:`DEFAULT_K` and :data:`DEFAULT_N`);
the model's threshold is calibrated for the same pair (``ScorerConfig.alert_k``/``alert_n`` are
set from it).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

import numpy as np

from pdm_edge.config import DEFAULT_ALERT_K, DEFAULT_ALERT_N

__all__ = ["DEFAULT_K", "DEFAULT_N", "AlertEvent", "KOfN", "alert_statistic", "raises_alert"]

DEFAULT_K, DEFAULT_N = DEFAULT_ALERT_K, DEFAULT_ALERT_N
"""The default rule (``[alerts]``'s defaults): an alert needs 3 of the last 5 windows above the threshold."""


def _check(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k} n={n}")


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

    def __init__(self, k: int = DEFAULT_K, n: int = DEFAULT_N) -> None:
        _check(k, n)
        self.k, self.n = k, n
        self._recent: collections.deque[tuple[bool, int, int, float]] = collections.deque(maxlen=n)
        self._n_above = 0
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
        above = bool(score > threshold)
        if len(self._recent) == self.n and self._recent[0][0]:
            self._n_above -= 1
        self._recent.append((above, start_ns, end_ns, score))
        self._n_above += above
        n_above = self._n_above
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

    @property
    def quiet(self) -> bool:
        """No window among the last ``n`` fed was above its threshold (also before any window):
        the stream's recent windows are normal by the rule's own measure."""
        return self._n_above == 0


def raises_alert(above: np.ndarray, k: int = DEFAULT_K, n: int = DEFAULT_N) -> bool:
    """Whether consecutive windows of one stream (``above``: ``(T,)`` bool, True = above the
    threshold) raise a k-of-n alert, as :class:`KOfN` fed with them would. An event shorter than
    ``n`` windows needs ``min(k, its length)`` of them above (a short labelled fault event is
    judged on what it has). Raises ValueError for invalid ``k``/``n``."""
    _check(k, n)
    a = np.asarray(above, dtype=bool)
    if len(a) < n:
        return int(a.sum()) >= min(k, len(a)) if len(a) else False
    c = np.convolve(a.astype(int), np.ones(n, int), mode="valid")
    return bool(c.max() >= k)


def alert_statistic(scores: np.ndarray, k: int = DEFAULT_K, n: int = DEFAULT_N) -> float:
    """The score a k-of-n alert rule sees in a sequence of window scores ``(T,)``: the largest,
    over every run of ``n`` consecutive windows (the whole sequence if shorter), of the ``k``-th
    highest score in the run. The sequence raises an alert at threshold ``h`` exactly when this
    statistic exceeds ``h``. Returns a float (``-inf`` for an empty sequence).

    >>> alert_statistic(np.array([0.0, 5.0, 0.0, 4.0, 3.0, 0.0, 0.0]))
    3.0
    """
    _check(k, n)
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return float("-inf")
    if s.size < n:
        return float(np.sort(s)[::-1][min(k, s.size) - 1])
    runs = np.lib.stride_tricks.sliding_window_view(s, n)
    return float(np.sort(runs, axis=1)[:, n - k].max())
