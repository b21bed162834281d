"""The shared helpers of pdm_edge._util: times, SQLite files, atomic writes."""

from __future__ import annotations

import sqlite3

import pytest

from pdm_edge._util.fs import atomic_write
from pdm_edge._util.sqlite import open_wal, tx
from pdm_edge._util.time import MAX_NS, iso_utc, parse_time

T0 = 1_795_248_000_000_000_000  # 2026-11-21T08:00:00Z


def test_iso_utc_and_parse_time_round_trip():
    assert iso_utc(T0) == "2026-11-21T08:00:00.000000Z"
    assert iso_utc(T0 + 123_456_789) == "2026-11-21T08:00:00.123456Z"  # truncated towards the past
    assert iso_utc(None) is None
    assert parse_time(iso_utc(T0 + 123_456_000)) == T0 + 123_456_000
    assert parse_time("2026-11-21T09:00:00+01:00") == T0
    assert parse_time(0) == 0 and parse_time(MAX_NS) == MAX_NS


@pytest.mark.parametrize("bad, message", [
    ("2026-11-21T08:00:00", "without a UTC offset"),
    ("yesterday", "not ISO-8601"),
    ("1969-12-31T23:59:59Z", "out of range"),
    (1.7e18, "got float"),
    (True, "boolean"),
    (None, "got NoneType"),
    (-1, "out of range"),
    (2**64, "out of range"),
    (str(T0), "not ISO-8601"),  # digit strings are the label CLI's business, not the wire's
])
def test_parse_time_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_time(bad)


def test_open_wal_creates_a_wal_file_and_tx_commits_or_rolls_back(tmp_path):
    path = tmp_path / "deep" / "dir" / "x.sqlite"
    con = open_wal(path, synchronous="FULL", schema="CREATE TABLE IF NOT EXISTS t (v INTEGER)")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with tx(con):
        con.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError), tx(con):
        con.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("boom")
    assert not con.in_transaction
    with pytest.raises(sqlite3.IntegrityError), tx(con):
        con.execute("CREATE TABLE u (v INTEGER UNIQUE)")
        con.execute("INSERT INTO u VALUES (1)")
        con.execute("INSERT INTO u VALUES (1)")
    assert [r[0] for r in con.execute("SELECT v FROM t")] == [1]
    assert con.execute("SELECT name FROM sqlite_master WHERE name = 'u'").fetchone() is None
    con.close()


def test_open_wal_readonly_never_writes_or_creates(tmp_path):
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(sqlite3.OperationalError):
        open_wal(missing, readonly=True)
    assert not missing.exists()
    odd = tmp_path / "a dir?#%" / "x.sqlite"  # URI-special characters in the path
    rw = open_wal(odd, schema="CREATE TABLE t (v INTEGER)", row_factory=sqlite3.Row)
    with tx(rw):
        rw.execute("INSERT INTO t VALUES (7)")
    ro = open_wal(odd, readonly=True, timeout_s=1.0, row_factory=sqlite3.Row)
    assert ro.execute("SELECT v FROM t").fetchone()["v"] == 7
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("INSERT INTO t VALUES (8)")
    ro.close()
    rw.close()


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    assert atomic_write(target, b"old") == target
    atomic_write(target, "néw")
    assert target.read_bytes() == "néw".encode()
    # a failed rename (the target is a directory) leaves the directory as it was and no temp file
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "keep").write_text("x")
    with pytest.raises(OSError):
        atomic_write(blocker, b"data")
    assert (blocker / "keep").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "sub"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_every_exception_class_of_the_package_is_in_errors():
    """One exception tree: no module but pdm_edge.errors defines an exception class."""
    import importlib
    import inspect
    import pkgutil

    import pdm_edge
    from pdm_edge import errors

    outside = []
    for info in pkgutil.walk_packages(pdm_edge.__path__, "pdm_edge."):
        if ".flwr_app" in info.name or info.name.endswith(".__main__"):  # flwr's own project; `python -m` entry points
            continue
        mod = importlib.import_module(info.name)
        outside += [f"{info.name}.{name}" for name, obj in vars(mod).items()
                    if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name
                    and info.name != "pdm_edge.errors"]
    assert outside == []
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.PdmEdgeError) and cls.__doc__, name
        assert name in errors.__doc__, f"{name} is missing from the tree in errors' docstring"
