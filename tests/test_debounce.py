"""Tests of pdm_edge.alerts.debounce: the k-of-n alert rule, hysteresis, span and peak."""

from __future__ import annotations

import itertools

import pytest

from pdm_edge.alerts.debounce import AlertEvent, KOfN

THR = 1.0
SEC = 1_000_000_000
HI, LO = 2.0, 0.0


def _span(i: int) -> tuple[int, int]:
    """Window ``i`` covers ``[i s, (i + 1) s)`` (ns); windows do not overlap."""
    return i * SEC, (i + 1) * SEC


def _feed(d: KOfN, scores: list[float], first: int = 0) -> list[tuple[int, AlertEvent]]:
    """Feed scores for windows ``first, first + 1, ...``; return ``(window index, event)`` pairs."""
    events = []
    for i, s in enumerate(scores, start=first):
        ev = d.update(s, THR, *_span(i))
        if ev is not None:
            events.append((i, ev))
    return events


def _reference(flags: tuple[bool, ...], k: int, n: int) -> list[tuple[int, str]]:
    """Straightforward statement of the rule: raise when >= k of the last n windows exceed (while
    not active); clear when none of the last n did (while active)."""
    active, out = False, []
    for i in range(len(flags)):
        last = flags[max(0, i - n + 1): i + 1]
        if not active and sum(last) >= k:
            active = True
            out.append((i, "raised"))
        elif active and len(last) == n and not any(last):
            active = False
            out.append((i, "cleared"))
    return out


# --------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize(("k", "n"), [(0, 5), (6, 5), (-1, 3), (1, 0), (0, 0), (2, 1)])
def test_invalid_k_n_raises(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        KOfN(k, n)


@pytest.mark.parametrize(("k", "n"), [(1, 1), (1, 5), (3, 5), (5, 5)])
def test_valid_k_n(k: int, n: int) -> None:
    d = KOfN(k, n)
    assert (d.k, d.n, d.active) == (k, n, False)


def test_defaults_are_3_of_5() -> None:
    d = KOfN()
    assert (d.k, d.n) == (3, 5)


# --------------------------------------------------------------------------------------------
# raising


def test_raises_exactly_when_k_of_last_n_exceed() -> None:
    d = KOfN(3, 5)
    # above, below, above, below, above: the 3rd exceedance within 5 windows raises (window 4)
    events = _feed(d, [HI, LO, HI, LO, HI])
    assert [(i, e.state) for i, e in events] == [(4, "raised")]
    assert d.active


def test_two_of_five_do_not_raise() -> None:
    d = KOfN(3, 5)
    assert _feed(d, [HI, LO, LO, LO, HI, LO, LO, LO, HI, LO]) == []
    assert not d.active


def test_exceedances_older_than_n_windows_do_not_count() -> None:
    d = KOfN(3, 5)
    # window 0 exceeds, then 4 below: when windows 5 and 6 exceed, window 0 has left the last 5
    events = _feed(d, [HI, LO, LO, LO, LO, HI, HI])
    assert events == []
    events = _feed(d, [HI], first=7)
    assert [(i, e.state) for i, e in events] == [(7, "raised")]
    # the span starts at the first exceeding window *among the last n* (5), not at window 0
    assert events[0][1].start_ns == _span(5)[0]


def test_single_spike_does_not_raise() -> None:
    d = KOfN(3, 5)
    assert _feed(d, [LO, LO, 1e9, LO, LO, LO, LO, LO]) == []
    assert not d.active


def test_single_spike_raises_with_k_1() -> None:
    d = KOfN(1, 1)
    events = _feed(d, [LO, 5.0, LO])
    assert [(i, e.state) for i, e in events] == [(1, "raised"), (2, "cleared")]
    assert events[1][1].start_ns == _span(1)[0] and events[1][1].end_ns == _span(1)[1]


def test_score_equal_to_threshold_is_not_above() -> None:
    d = KOfN(1, 1)
    assert _feed(d, [THR, THR, THR]) == []


def test_no_repeated_raise_while_active() -> None:
    d = KOfN(2, 3)
    events = _feed(d, [HI] * 20)
    assert [(i, e.state) for i, e in events] == [(1, "raised")]


# --------------------------------------------------------------------------------------------
# clearing (hysteresis)


@pytest.mark.parametrize(("k", "n"), [(1, 1), (2, 3), (3, 5), (5, 5)])
def test_clears_only_after_n_windows_below(k: int, n: int) -> None:
    d = KOfN(k, n)
    events = _feed(d, [HI] * k)
    assert [e.state for _, e in events] == ["raised"]
    # n - 1 windows below: still active
    assert _feed(d, [LO] * (n - 1), first=k) == []
    assert d.active
    # the n-th window below clears
    events = _feed(d, [LO], first=k + n - 1)
    assert [(i, e.state) for i, e in events] == [(k + n - 1, "cleared")]
    assert not d.active


def test_one_window_above_during_clearing_restarts_the_count() -> None:
    d = KOfN(3, 5)
    _feed(d, [HI, HI, HI])  # raised at window 2
    assert _feed(d, [LO, LO, LO, LO], first=3) == []  # windows 3-6 below
    assert _feed(d, [HI], first=7) == []  # one above: n below are needed again
    assert _feed(d, [LO, LO, LO, LO], first=8) == []  # windows 8-11: 4 below only
    assert d.active
    events = _feed(d, [LO], first=12)
    assert [(i, e.state) for i, e in events] == [(12, "cleared")]
    assert events[0][1].end_ns == _span(7)[1]  # end of the last exceeding window


# --------------------------------------------------------------------------------------------
# span and peak


def test_peak_and_span() -> None:
    d = KOfN(3, 5)
    #        0    1    2    3    4    5    6    7    8    9   10
    scores = [0.5, 2.0, 0.1, 3.5, 1.5, 5.0, 0.2, 0.3, 0.4, 0.9, 0.0]
    events = _feed(d, scores)
    assert [(i, e.state) for i, e in events] == [(4, "raised"), (10, "cleared")]
    raised, cleared = events[0][1], events[1][1]
    # raised at window 4 by windows 1, 3, 4: span starts at window 1, still open, peak so far 3.5
    assert raised == AlertEvent("raised", _span(1)[0], None, 3.5)
    # cleared after windows 6-10 are below: span ends at the end of window 5 (last above), peak 5.0
    assert cleared == AlertEvent("cleared", _span(1)[0], _span(5)[1], 5.0)


def test_peak_ignores_scores_below_threshold_and_resets_between_alerts() -> None:
    d = KOfN(2, 2)
    first = _feed(d, [9.0, 1.5, LO, LO])
    assert [(i, e.state, e.peak_score) for i, e in first] == [(1, "raised", 9.0), (3, "cleared", 9.0)]
    second = _feed(d, [1.2, 1.1, LO, LO], first=4)
    assert [(i, e.state, e.peak_score) for i, e in second] == [(5, "raised", 1.2), (7, "cleared", 1.2)]
    assert second[0][1].start_ns == _span(4)[0]
    assert second[1][1].end_ns == _span(5)[1]


def test_raised_event_has_no_end() -> None:
    d = KOfN(1, 3)
    (_, ev), = _feed(d, [HI])
    assert ev.state == "raised" and ev.end_ns is None and ev.start_ns == 0


# --------------------------------------------------------------------------------------------
# exhaustive check against the rule as stated


@pytest.mark.parametrize(("k", "n"), [(1, 1), (1, 3), (2, 3), (3, 3), (3, 5)])
def test_matches_reference_on_all_short_sequences(k: int, n: int) -> None:
    for flags in itertools.product((False, True), repeat=9):
        d = KOfN(k, n)
        got = [(i, e.state) for i, e in _feed(d, [HI if f else LO for f in flags])]
        assert got == _reference(flags, k, n), flags
