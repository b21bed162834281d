"""Each stream's lifecycle in one owner (pdm_edge/pipeline/streams.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pdm_edge.pipeline import StreamEvent, StreamTable
from pdm_edge.types import Window

S = "s/m/acc"


def _w(i: int, n: int = 1000) -> Window:
    return Window("s", "m", "acc", "vibration", i * 500_000_000, 1000.0, "g", np.zeros(n, np.float32), i)


def test_learning_events_drive_the_lifecycle_and_one_event_stream_reports_it() -> None:
    table = StreamTable()
    events: list[StreamEvent] = []
    table.subscribe(events.append)
    assert table.state(S) == "unknown"
    assert table.ensure(S) == "collecting"
    table.on_learning_event(S, "queued", "", "initial: 41 windows over 20 s collected")
    assert table.state(S) == "calibrating" and table.calibrating() == [S]
    table.on_learning_event(S, "training", "", "job 1 (initial), attempt 1")  # no change, no event
    table.on_learning_event(S, "failed", "", "loss is not finite")
    assert table.state(S) == "failed" and table.error(S) == "loss is not finite"
    table.on_learning_event(S, "training", "", "job 2 (manual), attempt 1")  # pdm-edge models train retries it
    table.on_learning_event(S, "rejected", "v1", "gate failed")
    assert table.state(S) == "collecting" and table.error(S) is None
    table.set_state(S, "scoring", "s-m-acc-v2")
    table.on_learning_event(S, "queued", "", "labels: 5 new labels")  # a retrain leaves a scoring stream scoring
    table.on_learning_event(S, "failed", "", "out of memory")
    assert table.state(S) == "scoring"
    assert [(e.previous, e.state) for e in events] == [
        (None, "collecting"), ("collecting", "calibrating"), ("calibrating", "failed"), ("failed", "calibrating"),
        ("calibrating", "collecting"), ("collecting", "scoring")]
    with pytest.raises(ValueError):
        table.set_state(S, "sleeping")


def test_seed_from_the_job_table_once() -> None:
    table = StreamTable()
    table.seed(pending=["a/b/c"], failed=[("a/b/d", "too few windows")])
    assert table.states() == {"a/b/d": "failed", "a/b/c": "calibrating"}
    assert table.error("a/b/d") == "too few windows"


def test_backlog_is_bounded_in_windows_and_bytes_and_counted() -> None:
    table = StreamTable(max_backlog=5, max_backlog_bytes=3 * 4000)
    table.set_state(S, "calibrating")
    assert table.hold(S, [_w(i) for i in range(4)]) == 1  # 4 x 4000 bytes > 12000: the oldest goes
    assert table.backlog_bytes == 12000 and table.busy() == [S]
    assert table.hold("s/m/other", [_w(9)]) == 1  # over the shared byte bound: the stream being added to pays
    assert [w.index for w in table.take_backlog(S)] == [1, 2, 3]
    assert table.backlog_bytes == 0 and table.dropped_backlog == 2
    table.hold(S, [_w(10)])
    assert table.drop_backlog(S) == 1 and table.dropped_backlog == 3 and table.backlogged() == {}
