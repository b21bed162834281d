"""SQLite files of the appliance: one way to open them (WAL) and one transaction helper.

Every state file (label book, labelled-window buffer, spool, SQLite store, replay buffer, job
table, registry) is opened by :func:`open_wal`: autocommit mode (``isolation_level=None``, so
transactions are explicit through :func:`tx`), usable from any thread (callers hold their own
lock), WAL journal, and a busy timeout. Read-only openers (CLI status, fleet client) use a
``mode=ro`` URI and never create or change the file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

__all__ = ["open_wal", "tx"]


def open_wal(path: str | os.PathLike[str], *, readonly: bool = False, timeout_s: float = 30.0,
             synchronous: Literal["NORMAL", "FULL"] = "NORMAL", schema: str | None = None,
             foreign_keys: bool = False, row_factory: type | None = None) -> sqlite3.Connection:
    """Open (and for writing create) a SQLite file in WAL mode.

    Args:
        path: the database file; for writing its parent directories are created.
        readonly: open with a ``mode=ro`` URI: never creates the file, never writes, and
            ``schema``, ``synchronous`` and the journal mode are left as they are.
        timeout_s: how long a statement waits for another connection's lock (s).
        synchronous: ``"FULL"`` for files whose last commit must survive a power loss (label
            book, registry, job table), ``"NORMAL"`` where losing the last commits on power loss
            is acceptable (WAL stays consistent either way).
        schema: a script run once after opening (``CREATE TABLE IF NOT EXISTS ...``).
        foreign_keys: enforce foreign keys.
        row_factory: e.g. :class:`sqlite3.Row`.

    Returns:
        an autocommit connection (``isolation_level=None``, ``check_same_thread=False``).

    Raises:
        sqlite3.Error: the file is not a database, is locked past the timeout, or (read-only)
            does not exist. OSError: the directory cannot be created. Callers turn these into
            their own error (:class:`~pdm_edge.errors.StoreError`,
            :class:`~pdm_edge.errors.RegistryError`) naming the file.
    """
    p = Path(path)
    if readonly:
        con = sqlite3.connect(p.absolute().as_uri() + "?mode=ro", uri=True, timeout=timeout_s,
                              isolation_level=None, check_same_thread=False)
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(p, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    try:
        if row_factory is not None:
            con.row_factory = row_factory
        if foreign_keys:
            con.execute("PRAGMA foreign_keys=ON")
        if not readonly:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA synchronous={synchronous}")
            if schema:
                con.executescript(schema)
    except BaseException:
        con.close()
        raise
    return con


@contextlib.contextmanager
def tx(con: sqlite3.Connection, *, write: bool = True) -> Iterator[sqlite3.Connection]:
    """One transaction on an autocommit connection from :func:`open_wal`.

    ``BEGIN IMMEDIATE`` for writes (takes the write lock up front, so two writers never
    deadlock on a lock upgrade), ``BEGIN`` for consistent reads. Whatever fails inside the
    block or at ``COMMIT`` (a full disk fails there) is rolled back, so a failed write never
    lands later with the next one. Callers hold their own lock around it.

    Raises:
        sqlite3.Error: from ``BEGIN``/``COMMIT``; anything raised in the block, unchanged.
    """
    con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
        raise
