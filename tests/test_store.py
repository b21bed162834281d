"""One suite, two stores: every test runs against SQLite and against a real influxd (1.6.7).

The InfluxDB side shares one server for the session (``influxd_session``) and gives every test
its own database, created by the store's first write.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdm_edge.condition import Condition
from pdm_edge.store import MachineState, ModelEvent, ScoreBucket, StoreNotFoundError
from pdm_edge.store.influx import InfluxStore, quote_ident, quote_literal
from pdm_edge.store.sqlite import SQLiteStore
from pdm_edge.types import Alert, FaultMatch, Label, Score

S = 1_000_000_000
T0 = 1_795_000_000 * S  # 2026-11-18, a whole multiple of 10 s


@pytest.fixture(params=["sqlite", "influxdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    if request.param == "sqlite":
        s: object = SQLiteStore(tmp_path / "store.sqlite")
    else:
        srv = request.getfixturevalue("influxd_session")
        s = InfluxStore(srv.url, f"test_{uuid.uuid4().hex[:12]}")
    yield s
    s.close()  # type: ignore[attr-defined]


def score(t: int, value: float = 1.0, *, site: str = "plant1", machine: str = "pump-07", sensor: str = "de",
          threshold: float | None = 3.0, mv: str | None = "v1") -> Score:
    return Score(site, machine, sensor, t, value, threshold, threshold is not None and value > threshold, mv)


def alert(aid: str, t: int, state: str = "raised", *, machine: str = "pump-07", sensor: str = "de", end: int | None = None,
          site: str = "plant1") -> Alert:
    return Alert(aid, site, machine, sensor, state, t, end, 7.5, 3.0, "v1")  # type: ignore[arg-type]


# -- round trips -------------------------------------------------------------------------------
def test_round_trip_every_record_type(store) -> None:
    scores = [score(T0 + i * S, 0.5 + i) for i in range(5)] + [score(T0 + 9 * S, 0.25, threshold=None, mv=None)]
    store.write_scores(scores)
    alerts = [alert("a1", T0 + 2 * S), alert("a2", T0 + 3 * S, "cleared", end=T0 + 4 * S)]
    store.write_alerts(alerts)
    labels = [
        Label("l1", "plant1", "pump-07", T0, T0 + 5 * S, "fault", "alice", T0 + 100 * S, sensor="de", alert_id="a1",
              fault_type="bearing_outer_race", note='outer race, "spalling"\nsecond line \\ backslash'),
        Label("l2", "plant1", "pump-07", T0 + 6 * S, T0 + 7 * S, "normal", "bob", T0 + 101 * S),
    ]
    store.write_labels(labels)
    events = [ModelEvent("plant1", "pump-07", T0 + S, "calibrated", "v1", "120 windows"),
              ModelEvent("plant1", "pump-07", T0 + 8 * S, "rejected", "v2", "gate: FAR 0.4/h > 0.2/h")]
    store.write_model_events(events)

    assert store.query_scores("plant1", "pump-07", T0, T0 + 10 * S) == scores
    assert store.query_alerts("plant1", "pump-07", T0, T0 + 10 * S) == alerts
    assert store.query_labels("plant1", "pump-07", T0, T0 + 10 * S) == labels
    assert store.query_model_events("plant1", "pump-07", T0, T0 + 10 * S) == events
    # other machine / site: nothing
    assert store.query_scores("plant2", "pump-07", T0, T0 + 10 * S) == []
    assert store.query_alerts("plant1", "pump-08", T0, T0 + 10 * S) == []
    info = store.server_info()
    assert info["type"] == store.kind and info["version"]


def cond(t: int, v: float | None, zone: str | None, *, sensor: str = "de", rms: float = 0.5) -> Condition:
    return Condition("plant1", "pump-07", sensor, t, "g", rms, 2.0 * rms, 2.0, 3.1, 0.01, 0.02, 0.003, v, zone)


def test_condition_round_trip_and_buckets_keep_the_maximum(store) -> None:
    rows = [cond(T0 + i * S, 1.0 + i, "ABCDDA"[i], rms=0.1 * (i + 1)) for i in range(6)]
    rows.append(cond(T0 + 3 * S, None, None, sensor="mic", rms=0.2))  # acoustic: no velocity, no zone
    store.write_conditions(rows)
    got = store.query_conditions("plant1", "pump-07", T0, T0 + 10 * S)
    assert got == sorted(rows, key=lambda c: (c.start_ns, c.sensor))
    assert store.query_conditions("plant1", "pump-07", T0, T0 + 10 * S, sensor="mic") == [rows[-1]]
    b = store.query_condition_buckets("plant1", "pump-07", "de", T0, T0 + 10 * S, 3.0)
    # epoch-aligned 3 s buckets: T0 is a multiple of 10 s, so T0-1 s, T0+2 s, T0+5 s start buckets
    assert [(x.start_ns - T0) // S for x in b] == [-1, 2, 5]
    assert [x.velocity_rms_mm_s for x in b] == [2.0, 5.0, 6.0] and [x.zone for x in b] == ["B", "D", "A"]
    assert [round(x.rms, 6) for x in b] == [0.2, 0.5, 0.6] and all(x.unit == "g" for x in b)
    with pytest.raises(ValueError, match="zone"):
        store.write_conditions([cond(T0, 1.0, "E")])


def test_int_values_are_stored_as_floats(store) -> None:
    """InfluxDB keeps one type per field: an int score must not create an integer field."""
    store.write_scores([Score("p", "m", "s", T0, 2, 3, False, "v1")])  # type: ignore[arg-type]
    store.write_scores([Score("p", "m", "s", T0 + S, 2.5, 3.0, False, "v1")])
    got = store.query_scores("p", "m", T0, T0 + 2 * S)
    assert [(g.score, g.threshold) for g in got] == [(2.0, 3.0), (2.5, 3.0)]
    assert isinstance(got[0].score, float)


# -- escaping ----------------------------------------------------------------------------------
NASTY = [
    "Pumpe Süd 7 — Ø",
    "pump 07",
    "a,b",
    "k=v",
    'say "hi"',
    "it's",
    "back\\slash",
    "x\\ y",
    "x\\,y=z\\=",
    "\\leading",
    "all ,=\"'\\ of them ünïcödé 日本",
    "emoji 🛠",
]


@pytest.mark.parametrize("name", NASTY, ids=range(len(NASTY)))
def test_names_round_trip(store, name: str) -> None:
    site, machine, sensor = f"site {name}", name, f"sensor {name}"
    s = Score(site, machine, sensor, T0, 4.5, 3.0, True, f"v {name}")
    store.write_scores([s])
    a = Alert(f"id {name}", site, machine, sensor, "raised", T0, None, 4.5, 3.0, f"v {name}")
    store.write_alerts([a])
    lb = Label(f"label {name}", site, machine, T0, T0 + S, "normal", f"author {name}", T0 + 2 * S, sensor=sensor,
               alert_id=a.id, note=name)
    store.write_labels([lb])
    e = ModelEvent(site, machine, T0, f"ev {name}", f"v {name}", name)
    store.write_model_events([e])
    assert store.query_scores(site, machine, T0, T0 + S) == [s]
    assert store.query_scores(site, machine, T0, T0 + S, sensor=sensor) == [s]
    assert store.query_alerts(site, machine, T0, T0 + S) == [a]
    assert store.query_labels(site, machine, T0, T0 + S) == [lb]
    assert store.query_model_events(site, machine, T0, T0 + S) == [e]
    assert store.query_score_buckets(site, machine, sensor, T0, T0 + S, 1.0) == [ScoreBucket(T0, 4.5, 3.0, True, 1)]
    assert store.machines() == [MachineState(site, machine, T0, 4.5, 3.0, f"v {name}", 1)]


def test_similar_names_do_not_match(store) -> None:
    """A quote or backslash must not turn the WHERE clause into a wider match."""
    for m in ["a'b", "a\\'b", "a", "b", "a\\b"]:
        store.write_scores([score(T0, 1.0, machine=m)])
    for m in ["a'b", "a\\'b", "a", "b", "a\\b"]:
        got = store.query_scores("plant1", m, T0, T0 + S)
        assert [g.machine for g in got] == [m]
    assert store.query_scores("plant1", "a' OR machine = 'b", T0, T0 + S) == []


@pytest.mark.parametrize("bad", ["trailing\\", "tab\there", "new\nline", ""])
def test_unstorable_names_are_refused(store, bad: str) -> None:
    with pytest.raises(ValueError):
        store.write_scores([score(T0, machine=bad)])


def test_quoting_helpers() -> None:
    assert quote_literal("it's a \\ test") == "'it\\'s a \\\\ test'"
    assert quote_ident('my "db"') == '"my \\"db\\""'


# -- idempotence -------------------------------------------------------------------------------
def test_rewrite_of_the_same_window_overwrites(store) -> None:
    store.write_scores([score(T0, 1.0), score(T0 + S, 2.0)])
    store.write_scores([score(T0, 5.0)])  # a retry with an updated value
    store.write_scores([score(T0, 5.0), score(T0 + S, 2.0)])  # a replayed batch
    got = store.query_scores("plant1", "pump-07", T0, T0 + 2 * S)
    assert [(g.start_ns, g.score, g.is_anomaly) for g in got] == [(T0, 5.0, True), (T0 + S, 2.0, False)]
    # alerts, labels and model events alike
    for _ in range(2):
        store.write_alerts([alert("a1", T0)])
        store.write_labels([Label("l1", "plant1", "pump-07", T0, T0 + S, "ignore", "eve", T0)])
        store.write_model_events([ModelEvent("plant1", "pump-07", T0, "promoted", "v3")])
    assert len(store.query_alerts("plant1", "pump-07", T0, T0 + S)) == 1
    assert len(store.query_labels("plant1", "pump-07", T0, T0 + S)) == 1
    assert len(store.query_model_events("plant1", "pump-07", T0, T0 + S)) == 1


def test_alert_raised_then_cleared_is_one_alert(store) -> None:
    store.write_alerts([alert("a1", T0 + 5 * S)])
    assert store.machines()[0].open_alerts == 1
    cleared = alert("a1", T0 + 5 * S, "cleared", end=T0 + 9 * S)
    store.write_alerts([cleared])
    assert store.query_alerts("plant1", "pump-07", T0, T0 + 60 * S) == [cleared]
    assert store.machines()[0].open_alerts == 0


def test_label_edit_replaces_the_label(store) -> None:
    store.write_labels([Label("l1", "plant1", "pump-07", T0, T0 + S, "fault", "al", T0, sensor="de",
                              fault_type="imbalance", note="first")])
    edited = Label("l1", "plant1", "pump-07", T0, T0 + S, "normal", "al", T0 + S)
    store.write_labels([edited])  # optional fields removed: they must not survive the rewrite
    assert store.query_labels("plant1", "pump-07", T0, T0 + S) == [edited]


# -- ranges and downsampling -------------------------------------------------------------------
def test_range_queries_are_half_open(store) -> None:
    store.write_scores([score(T0 + i * S, float(i), sensor=sen) for i in range(10) for sen in ("de", "nde")])
    got = store.query_scores("plant1", "pump-07", T0 + 2 * S, T0 + 5 * S)
    assert [(g.start_ns, g.sensor) for g in got] == [(T0 + i * S, sen) for i in (2, 3, 4) for sen in ("de", "nde")]
    got = store.query_scores("plant1", "pump-07", T0 + 2 * S, T0 + 5 * S, sensor="nde")
    assert [g.start_ns for g in got] == [T0 + 2 * S, T0 + 3 * S, T0 + 4 * S]
    assert store.query_scores("plant1", "pump-07", T0 + 10 * S, T0 + 20 * S) == []
    assert store.query_scores("plant1", "pump-07", T0 + 3 * S, T0 + 3 * S) == []
    store.write_alerts([alert("a", T0 + 1 * S), alert("b", T0 + 2 * S)])
    assert [a.id for a in store.query_alerts("plant1", "pump-07", T0 + S, T0 + 2 * S)] == ["a"]
    store.write_model_events([ModelEvent("plant1", "pump-07", T0 + 4 * S, "x", "v")])
    assert store.query_model_events("plant1", "pump-07", T0, T0 + 4 * S) == []
    assert len(store.query_model_events("plant1", "pump-07", T0 + 4 * S, T0 + 5 * S)) == 1


def test_downsampling_max_per_bucket(store) -> None:
    half = S // 2
    rows = [
        # bucket [T0, T0+10s): max 6.0 with threshold 5.0 (anomalous), 4 windows
        score(T0, 1.0, threshold=4.0), score(T0 + 3 * S + half, 6.0, threshold=5.0),
        score(T0 + 5 * S, 6.0, threshold=7.0), score(T0 + 9 * S, 2.0, threshold=4.0),
        # bucket [T0+10s, T0+20s): empty
        # bucket [T0+20s, T0+30s): max 2.5, no anomaly, uncalibrated threshold at the max
        score(T0 + 20 * S, 2.5, threshold=None), score(T0 + 29 * S, 1.0, threshold=3.0),
        # outside the range
        score(T0 + 30 * S, 99.0),
        # another sensor: ignored
        score(T0 + S, 50.0, sensor="nde"),
    ]
    store.write_scores(rows)
    got = store.query_score_buckets("plant1", "pump-07", "de", T0, T0 + 30 * S, 10.0)
    assert got == [ScoreBucket(T0, 6.0, 5.0, True, 4), ScoreBucket(T0 + 20 * S, 2.5, None, False, 2)]
    # buckets are aligned to the epoch, not to the range's start
    got = store.query_score_buckets("plant1", "pump-07", "de", T0 + 4 * S, T0 + 30 * S, 10.0)
    assert got == [ScoreBucket(T0, 6.0, 7.0, False, 2), ScoreBucket(T0 + 20 * S, 2.5, None, False, 2)]
    # a fractional interval
    got = store.query_score_buckets("plant1", "pump-07", "de", T0, T0 + 10 * S, 2.5)
    assert got == [ScoreBucket(T0, 1.0, 4.0, False, 1), ScoreBucket(T0 + 2 * S + half, 6.0, 5.0, True, 1),
                   ScoreBucket(T0 + 5 * S, 6.0, 7.0, False, 1), ScoreBucket(T0 + 7 * S + half, 2.0, 4.0, False, 1)]
    assert store.query_score_buckets("plant1", "pump-07", "de", T0 + 10 * S, T0 + 20 * S, 10.0) == []
    with pytest.raises(ValueError):
        store.query_score_buckets("plant1", "pump-07", "de", T0, T0 + S, 0.0)


# -- fleet view --------------------------------------------------------------------------------
def test_machines_latest_state_and_open_alerts(store) -> None:
    store.write_scores([score(T0, 1.0, machine="m1", sensor="a", mv="v1"),
                        score(T0 + 5 * S, 4.0, machine="m1", sensor="b", mv="v2", threshold=3.5),
                        score(T0 + 2 * S, 0.5, machine="m1", sensor="a", mv="v1"),
                        score(T0 + S, 0.1, site="other", machine="m1", threshold=None, mv=None)])
    store.write_alerts([alert("x1", T0, machine="m1"), alert("x2", T0 + S, machine="m1"),
                        alert("x2", T0 + S, "cleared", machine="m1", end=T0 + 3 * S),
                        alert("y1", T0, machine="m2")])
    assert store.machines() == [
        MachineState("other", "m1", T0 + S, 0.1, None, None, 0),
        MachineState("plant1", "m1", T0 + 5 * S, 4.0, 3.5, "v2", 1),
        MachineState("plant1", "m2", None, None, None, None, 1),
    ]


def test_empty_store(store) -> None:
    if isinstance(store, InfluxStore):
        store.ensure_database()
    assert store.machines() == []
    assert store.query_scores("plant1", "pump-07", T0, T0 + S) == []
    assert store.query_score_buckets("plant1", "pump-07", "de", T0, T0 + S, 1.0) == []


def test_influx_missing_database_without_create(influxd_session) -> None:
    s = InfluxStore(influxd_session.url, "never_created", create_database=False)
    with pytest.raises(StoreNotFoundError, match="never_created.*not found"):
        s.write_scores([score(T0)])
    with pytest.raises(StoreNotFoundError, match="not found"):
        s.query_scores("plant1", "pump-07", T0, T0 + S)
    s.close()


def test_influx_retention_policy(influxd_session) -> None:
    db = f"rp_{uuid.uuid4().hex[:8]}"
    influxd_session.query(f'CREATE DATABASE "{db}"', method="POST")
    influxd_session.query(f'CREATE RETENTION POLICY "one week" ON "{db}" DURATION 10000d REPLICATION 1', method="POST")
    s = InfluxStore(influxd_session.url, db, retention_policy="one week")
    s.write_scores([score(T0, 2.0)])
    assert [g.score for g in s.query_scores("plant1", "pump-07", T0, T0 + S)] == [2.0]
    # the point is in that retention policy, not in the default one
    assert influxd_session.values('SELECT count(score) FROM "one week".anomaly_score', db)[0][1] == 1
    assert influxd_session.values("SELECT count(score) FROM anomaly_score", db) == []
    s.close()


def test_an_alert_keeps_its_nearest_confirmed_fault(store) -> None:
    match = FaultMatch("lbl-7", "bearing_outer_race", T0 - 86400 * S, 0.81)
    raised = dataclasses.replace(alert("a1", T0 + 5 * S), fault_match=match)
    store.write_alerts([raised])
    assert store.query_alerts("plant1", "pump-07", T0, T0 + 60 * S) == [raised]
    # the clear may carry a better match, or none: the latest record wins
    cleared = dataclasses.replace(raised, state="cleared", end_ns=T0 + 9 * S, fault_match=None)
    store.write_alerts([cleared])
    assert store.query_alerts("plant1", "pump-07", T0, T0 + 60 * S) == [cleared]


def test_a_schema_1_sqlite_store_gains_the_fault_match_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE alert (site TEXT NOT NULL, machine TEXT NOT NULL, sensor TEXT NOT NULL, alert_id TEXT NOT NULL,"
        " start_ns INTEGER NOT NULL, state TEXT NOT NULL, end_ns INTEGER NOT NULL, peak_score REAL NOT NULL,"
        " threshold REAL NOT NULL, model_version TEXT NOT NULL, PRIMARY KEY (site, machine, sensor, alert_id, start_ns))"
        " WITHOUT ROWID; PRAGMA user_version = 1;")
    con.execute("INSERT INTO alert VALUES ('plant1', 'pump-07', 'de', 'old', ?, 'raised', 0, 7.5, 3.0, 'v1')", (T0,))
    con.commit()
    con.close()
    s = SQLiteStore(path)
    try:
        assert s.query_alerts("plant1", "pump-07", T0, T0 + S) == [alert("old", T0)]
        new = dataclasses.replace(alert("new", T0 + S), fault_match=FaultMatch("lbl-1", None, T0 - S, 0.7))
        s.write_alerts([new])
        assert s.query_alerts("plant1", "pump-07", T0 + S, T0 + 2 * S) == [new]
    finally:
        s.close()
