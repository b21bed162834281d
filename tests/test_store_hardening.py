"""Issue 15 rows 5 and 7 at the store level: a poison record never blocks the spool. Real SQLite
files (store and spool) and a real influxd."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from pdm_edge.config import SpoolConfig
from pdm_edge.store.influx import InfluxStore
from pdm_edge.store.records import to_json
from pdm_edge.store.spool import Spool, SpoolWriter
from pdm_edge.store.sqlite import SQLiteStore
from pdm_edge.types import Label, Score

S = 1_000_000_000
T0 = 1_795_000_000 * S
FAST = SpoolConfig(batch_size=50, backoff_min_s=0.05, backoff_max_s=0.4)


def _scores(n: int) -> list[Score]:
    return [Score("plant1", "pump-07", "de", T0 + i * S, float(i), 50.0, False, "v1") for i in range(n)]


def test_int64_overflow_is_refused_before_the_spool() -> None:
    with pytest.raises(ValueError, match="int64"):
        to_json("label", Label("l1", "p", "m", T0, 2**64, "normal", "tech", T0))


def test_a_record_beyond_int64_in_the_spool_is_dead_lettered_and_the_rest_is_stored(tmp_path: Path) -> None:
    """Row 5: a label whose end is beyond int64 (written to the spool file by an older version,
    which did not check the range) made SQLite raise "Python int too large to convert" on every
    attempt, so the writer backed off forever and every later score waited. Now the record goes
    to the dead-letter table with its reason and the 120 scores behind it are stored, also after
    a restart of the writer."""
    spool = Spool(tmp_path / "spool.sqlite")
    spool.put("score", _scores(60))
    poison = json.loads(to_json("label", Label("l1", "plant1", "pump-07", T0, T0 + S, "normal", "tech", T0)))
    poison["end_ns"] = 2**64 + 5
    con = sqlite3.connect(tmp_path / "spool.sqlite")  # as an older version left it
    con.execute("INSERT INTO spool (kind, payload, enqueued_ns) VALUES ('label', ?, ?)", (json.dumps(poison), time.time_ns()))
    con.commit()
    con.close()
    spool.close()
    spool = Spool(tmp_path / "spool.sqlite")
    spool.put("score", _scores(120)[60:])
    store = SQLiteStore(tmp_path / "store.sqlite")
    writer = SpoolWriter(spool, store, FAST).start()
    assert writer.wait_empty(20), writer.stats()
    writer.stop(5)
    st = writer.stats()
    assert st.rejected == 1 and st.deadletter_depth == 1 and "int" in (st.last_rejected or "")
    assert len(store.query_scores("plant1", "pump-07", T0, T0 + 1000 * S)) == 120
    (kind, payload, reason, _), = spool.deadletters()
    assert kind == "label" and json.loads(payload)["end_ns"] == 2**64 + 5 and reason
    spool.close()
    assert Spool(tmp_path / "spool.sqlite").rejected == 1  # the count survives a restart
    store.close()


def test_influxdb_field_type_conflict_goes_to_the_dead_letter_table(influxd, tmp_path: Path) -> None:
    """Row 7: InfluxDB refuses points (a field-type conflict in an existing shard): every refused
    point is kept in the dead-letter table with the server's reason, the others are stored."""
    influxd.query('CREATE DATABASE "conf"', method="POST")
    requests.post(influxd.url + "/write", params={"db": "conf", "precision": "ns"},
                  data=f'anomaly_score,site=plant1,machine=pump-07,sensor=de score="text" {T0 - S}'.encode()).raise_for_status()
    spool = Spool(tmp_path / "spool.sqlite")
    spool.put("score", _scores(20))
    spool.put("score", [Score("plant1", "pump-08", "de", T0 + 30 * 24 * 3600 * S, 1.0, 2.0, False, "v1")])  # another shard
    writer = SpoolWriter(spool, InfluxStore(influxd.url, "conf"), FAST).start()
    assert writer.wait_empty(20)
    writer.stop(5)
    st = writer.stats()
    assert st.rejected == 20 and st.deadletter_depth == 20 and st.drained == 21
    assert "field type conflict" in (st.last_rejected or "")
    assert influxd.values('SELECT count(score) FROM anomaly_score WHERE machine = \'pump-08\'', "conf")[0][1] == 1
    spool.close()
