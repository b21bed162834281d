"""InfluxDB store over the v1-compatible HTTP API (DESIGN.md section 4).

Only three endpoints are used, all of which exist unchanged on InfluxDB 1.x, on 2.x (through
the database/retention-policy -> bucket mapping, "DBRP") and on InfluxDB 3 Core:

- ``POST /write?db=&rp=&precision=ns`` with line protocol, serialised by
  :class:`influxdb_client.Point` (``Point(m).tag().field().time(ns, WritePrecision.NS)``), which
  escapes measurement, tag keys/values, field keys and string fields; at most
  :data:`MAX_LINES_PER_REQUEST` lines per request;
- ``GET /query`` (``POST`` for ``CREATE DATABASE``) with InfluxQL, ``db``, ``rp`` and
  ``epoch=ns`` (integer ns timestamps in the answer);
- ``GET /ping`` for the server's version (``X-Influxdb-Version`` header; InfluxDB 3 also puts it
  in a JSON body).

No Flux, no ``/api/v2``: ``influxdb_client``'s write and query APIs need ``/api/v2`` (1.8+),
the appliance must also talk to Debian's 1.6.

Decisions:

- **Auth**: ``username``/``password`` are sent as the ``u``/``p`` query parameters (1.x; on 2.x
  the v1 API also takes a token as ``p``); ``token`` is sent as ``Authorization: Token ...``
  (2.x, 3). Giving both is refused (ambiguous). TLS certificates are verified unless
  ``verify_tls=False``; ``ca_file`` names a private CA bundle.
- **Database creation**: the constructor does not touch the network (the appliance must start
  while InfluxDB is down). The first write that meets "database not found" sends
  ``CREATE DATABASE`` through ``/query`` when ``create_database`` is true (default), and
  retries the write (so a database dropped later is created again on the next write). On 1.x that needs an admin user when auth is on; on 2.x the v1 API cannot
  create databases (map the bucket with a DBRP instead), on 3 Core writes create the database
  themselves. When creation is not possible, the write fails with
  :class:`~pdm_edge.errors.StoreNotFoundError` saying so.
- **Names**: tag values go through ``Point``. Line protocol cannot carry a tag value that ends in
  a backslash or holds a control character, so those names are refused before writing, by both
  stores alike (:func:`pdm_edge.store.records.check_name`). In InfluxQL, identifiers are
  double-quoted (``\\`` and ``"`` escaped) and string literals single-quoted (``\\``, ``'`` and
  newline escaped), so machine names with spaces, commas, ``=``, quotes, backslashes and any
  Unicode round-trip (tested on 1.6.7).
- **Field types** are fixed (a field keeps one type per shard): ``score``, ``threshold``,
  ``peak_score`` are floats, ``end_ns``/``created_ns`` ints (``end_ns`` is 0 while an alert is
  open), ``is_anomaly`` a bool, the rest strings. Optional label strings are written as ``""``
  (read back as ``None``) so that a rewrite always replaces every field: InfluxDB merges the
  fields of two writes of the same point. An uncalibrated score has no ``threshold`` field.
  An alert's nearest confirmed fault is four fields (``match_label_id``, ``match_fault_type``,
  ``match_start_ns``, ``match_similarity``), ``""`` / 0 when it has none.
- **Idempotence** comes from the timestamps (window start, alert start, label start, event
  time) together with the tags: a retry overwrites the same point. Two consequences, unlike
  SQLite: a window rescored under a *different* model version is a second point (the model
  version is a tag); a label whose start is edited leaves its old point, so
  :meth:`InfluxStore.query_labels` keeps one label per id (the newest ``created_ns``); two
  model events of one machine at the same nanosecond overwrite each other.
- **Downsampling** uses ``SELECT max(score), threshold ... GROUP BY time(<every>ns) fill(none)``:
  ``max()`` is a selector, so ``threshold`` comes from the same point (the earliest one on a tie,
  verified on 1.6.7); the window count and the anomaly flag come from two ``count(score)``
  queries (all windows, and ``WHERE is_anomaly = true``), separate requests because a single
  statement cannot mix a selector with other fields and aggregates.
- **Errors**: every failure is a :class:`~pdm_edge.errors.StoreError` subclass with one clear
  line: "cannot reach InfluxDB at URL" (connection refused, timeout, DNS, TLS), "authentication
  failed" (401/403), database not found (404 or the query's error), the server's own error text
  for other 4xx/5xx. A 400 on write (type conflict, unparsable point) is
  :class:`~pdm_edge.errors.StoreRejectedError`; "points beyond retention policy" is logged
  and treated as written (the server dropped them deliberately).
- A query answer flagged ``partial`` (the server's ``max-row-limit``) raises rather than
  returning a silently truncated series.
- **Threads**: one ``requests.Session`` per thread, so queries from the dashboard and the spool
  writer do not share a connection pool's state.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from influxdb_client import Point, WritePrecision

from pdm_edge import __version__
from pdm_edge.condition import Condition
from pdm_edge.errors import StoreAuthError, StoreError, StoreNotFoundError, StoreRejectedError, StoreUnavailableError
from pdm_edge.store.base import MachineState, ModelEvent, ScoreBucket
from pdm_edge.store.records import check_records
from pdm_edge.types import Alert, FaultMatch, Label, Score

log = logging.getLogger(__name__)

MAX_LINES_PER_REQUEST = 5000
"""Lines per ``/write`` request (InfluxData's recommended batch size); larger writes are split."""


def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes (``"my \\"db\\""``), with ``\\`` and ``"`` escaped.

    Raises:
        ValueError: the name contains a control character (no escape exists for it).
    """
    if re.search("[\x00-\x1f\x7f-\x9f]", name):
        raise ValueError(f"identifier {name!r} contains a control character")
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_literal(value: str) -> str:
    """An InfluxQL string literal in single quotes, with ``\\``, ``'`` and newline escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _error_text(resp: requests.Response) -> str:
    """The server's error message: 1.x/3 ``{"error": ...}``, 2.x ``{"code", "message"}``, or text."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message"):
            if body.get(key):
                return str(body[key]).strip()
    text = (resp.text or "").strip()
    return text[:300] if text else (resp.reason or f"HTTP {resp.status_code}")


class InfluxStore:
    """Scores, alerts, labels and model events in InfluxDB (1.x, 2.x via DBRP, 3 Core).

    Args:
        url: base URL, ``http(s)://host:port`` (a path prefix behind a proxy is kept).
        database: the database (1.x), or the database name mapped to a bucket (2.x DBRP, 3).
        retention_policy: written with ``rp=``; ``None`` = the database's default.
        username, password: 1.x credentials (query parameters ``u``/``p``).
        token: 2.x/3 API token (``Authorization: Token ...``); not together with ``username``.
        verify_tls: verify the server's certificate (https) - keep on outside a lab.
        ca_file: CA bundle to verify against instead of the system's.
        timeout_s: connect and read timeout of every request, seconds.
        create_database: send ``CREATE DATABASE`` when a write finds the database missing.

    Raises:
        StoreError: a malformed URL, both a username and a token, or a name with control
            characters. The constructor makes no request.
    """

    kind = "influxdb"

    def __init__(self, url: str, database: str, retention_policy: str | None = None, username: str | None = None,
                 password: str | None = None, token: str | None = None, verify_tls: bool = True,
                 ca_file: str | None = None, timeout_s: float = 10, create_database: bool = True) -> None:
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StoreError(f"InfluxDB URL must look like http(s)://host:port, got {url!r}")
        if token and username:
            raise StoreError("InfluxDB: give either username/password (1.x) or token (2.x/3), not both")
        if not database:
            raise StoreError("InfluxDB: database must not be empty")
        try:
            db_ident = quote_ident(database)
            # with a retention policy, measurements are fully qualified: "db"."rp"."measurement"
            self._from_prefix = f"{db_ident}.{quote_ident(retention_policy)}." if retention_policy else ""
        except ValueError as exc:
            raise StoreError(f"InfluxDB: {exc}") from None
        self.url = url.rstrip("/")
        self.database = database
        self.retention_policy = retention_policy
        self.username = username
        self.password = password
        self.token = token
        self.verify: bool | str = (ca_file or True) if verify_tls else False
        self.timeout_s = float(timeout_s)
        self.create_database = create_database
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    # -- HTTP ------------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.verify = self.verify
            s.headers["User-Agent"] = f"pdm-edge/{__version__}"
            if self.token:
                s.headers["Authorization"] = f"Token {self.token}"
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _auth_params(self) -> dict[str, str]:
        if self.username:
            return {"u": self.username, "p": self.password or ""}
        return {}

    def _request(self, method: str, path: str, params: dict[str, str] | None = None,
                 data: bytes | dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> requests.Response:
        """One HTTP request; transport failures and 401/403 become StoreErrors, other statuses
        are returned for the caller to interpret."""
        try:
            resp = self._session().request(method, self.url + path, params={**(params or {}), **self._auth_params()},
                                           data=data, headers=headers, timeout=(self.timeout_s, self.timeout_s))
        except requests.exceptions.SSLError as exc:
            raise StoreUnavailableError(f"cannot reach InfluxDB at {self.url}: TLS error ({_short(exc)})") from None
        except requests.exceptions.Timeout:
            raise StoreUnavailableError(f"cannot reach InfluxDB at {self.url}: no answer within {self.timeout_s:g} s") from None
        except requests.exceptions.ConnectionError as exc:
            raise StoreUnavailableError(f"cannot reach InfluxDB at {self.url}: {_short(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise StoreUnavailableError(f"cannot reach InfluxDB at {self.url}: {_short(exc)}") from None
        if resp.status_code in (401, 403):
            who = f"user {self.username!r}" if self.username else ("the token" if self.token else "no credentials")
            if resp.status_code == 401:
                raise StoreAuthError(f"authentication failed at InfluxDB {self.url} with {who} "
                                     f"(HTTP 401: {_error_text(resp)})")
            raise StoreAuthError(f"authentication failed at InfluxDB {self.url}: {who} is not authorized for this "
                                 f"(HTTP 403: {_error_text(resp)})")
        return resp

    def _write_lines(self, lines: list[str]) -> None:
        for i in range(0, len(lines), MAX_LINES_PER_REQUEST):
            self._write_chunk("\n".join(lines[i:i + MAX_LINES_PER_REQUEST]).encode("utf-8"))

    def _write_chunk(self, body: bytes) -> None:
        params = {"db": self.database, "precision": "ns"}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        resp = self._request("POST", "/write", params=params, data=body,
                             headers={"Content-Type": "text/plain; charset=utf-8"})
        if resp.status_code == 404 and self.create_database:
            reason = self._try_create_database()
            if reason is None:
                resp = self._request("POST", "/write", params=params, data=body,
                                     headers={"Content-Type": "text/plain; charset=utf-8"})
            else:
                raise StoreNotFoundError(self._not_found_message(_error_text(resp), reason))
        if resp.status_code in (200, 204):
            return
        text = _error_text(resp)
        if resp.status_code == 404:
            raise StoreNotFoundError(self._not_found_message(text, None))
        if "retention policy not found" in text:  # 1.6 answers 500, later versions 4xx
            raise StoreNotFoundError(f"retention policy {self.retention_policy!r} not found in database "
                                     f"{self.database!r} on InfluxDB at {self.url} ({text})")
        if resp.status_code == 400 and "beyond retention policy" in text and "field type conflict" not in text:
            log.warning("InfluxDB at %s dropped points outside the retention policy: %s", self.url, text)
            return
        if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
            raise StoreRejectedError(f"InfluxDB at {self.url} refused the write (HTTP {resp.status_code}): {text}")
        raise StoreUnavailableError(f"InfluxDB at {self.url} failed the write (HTTP {resp.status_code}): {text}")

    def _not_found_message(self, text: str, create_error: str | None) -> str:
        msg = f"database {self.database!r} not found on InfluxDB at {self.url} ({text})"
        if create_error:
            msg += f"; creating it failed: {create_error}"
        return msg + "; create it (1.x: CREATE DATABASE) or map it to a bucket (2.x/3: DBRP)"

    def _try_create_database(self) -> str | None:
        """``CREATE DATABASE``; None on success, else why not (a string)."""
        try:
            self._query_raw(f"CREATE DATABASE {quote_ident(self.database)}", method="POST", with_db=False)
        except StoreError as exc:
            return str(exc)
        log.info("created database %r on InfluxDB at %s", self.database, self.url)
        return None

    def _query_raw(self, q: str, method: str = "GET", with_db: bool = True) -> list[dict[str, Any]]:
        """Run one InfluxQL statement; return its series (``[]`` for none).

        Raises:
            StoreError: transport, auth, database not found, a query error or a partial answer.
        """
        params = {"q": q, "epoch": "ns"}
        if with_db:
            params["db"] = self.database
            if self.retention_policy:
                params["rp"] = self.retention_policy
        if method == "GET":
            resp = self._request("GET", "/query", params=params)
        else:  # the statement goes in the form-encoded body, as the 1.x docs ask for writes
            form = {"q": params.pop("q")}
            resp = self._request("POST", "/query", params=params, data=form)
        if resp.status_code == 404:
            raise StoreNotFoundError(self._not_found_message(_error_text(resp), None))
        if resp.status_code >= 500:
            raise StoreUnavailableError(f"InfluxDB at {self.url} failed the query (HTTP {resp.status_code}): {_error_text(resp)}")
        if resp.status_code != 200:
            raise StoreError(f"InfluxDB at {self.url} refused the query (HTTP {resp.status_code}): {_error_text(resp)}")
        try:
            body = resp.json()
        except ValueError:
            raise StoreError(f"InfluxDB at {self.url} sent a malformed query answer: {resp.text[:200]!r}") from None
        if isinstance(body, dict) and body.get("error"):
            raise StoreError(f"InfluxDB at {self.url}: query failed: {body['error']}")
        try:
            result = body["results"][0]
        except (KeyError, IndexError, TypeError):
            raise StoreError(f"InfluxDB at {self.url} sent a malformed query answer: {resp.text[:200]!r}") from None
        err = result.get("error")
        if err:
            if "database not found" in err:
                raise StoreNotFoundError(self._not_found_message(err, None))
            if "authoriz" in err or "not authorized" in err:
                raise StoreAuthError(f"authentication failed at InfluxDB {self.url}: {err}")
            raise StoreError(f"InfluxDB at {self.url}: query failed: {err}")
        if result.get("partial"):
            raise StoreError(f"InfluxDB at {self.url} truncated the answer (max-row-limit); query a shorter range")
        return list(result.get("series") or [])

    def _from(self, measurement: str) -> str:
        return self._from_prefix + quote_ident(measurement)

    def _where(self, site: str, machine: str, start_ns: int, end_ns: int, **tags: str | None) -> str:
        parts = [f'"site" = {quote_literal(site)}', f'"machine" = {quote_literal(machine)}']
        parts += [f"{quote_ident(k)} = {quote_literal(v)}" for k, v in tags.items() if v is not None]
        parts += [f"time >= {int(start_ns)}", f"time < {int(end_ns)}"]
        return " AND ".join(parts)

    def _select(self, q: str) -> list[dict[str, Any]]:
        """Rows of every series as dicts (column -> value), series tags merged in."""
        rows: list[dict[str, Any]] = []
        for series in self._query_raw(q):
            cols = series.get("columns", [])
            tags = series.get("tags") or {}
            for values in series.get("values", []):
                row = dict(tags)
                row.update(zip(cols, values))
                rows.append(row)
        return rows

    # -- writes ----------------------------------------------------------------------------------
    def write_scores(self, scores: Sequence[Score]) -> None:
        """Write scores (measurement ``anomaly_score``, timestamp = window start, ns).

        Raises:
            ValueError, TypeError: a record the store cannot take (see :mod:`.records`).
            StoreError: unreachable, auth, database missing, or the server refused the points.
        """
        lines = []
        for s in check_records("score", scores):
            p = (Point("anomaly_score").tag("site", s.site).tag("machine", s.machine).tag("sensor", s.sensor)
                 .field("score", float(s.score)).field("is_anomaly", bool(s.is_anomaly)))
            if s.model_version:
                p.tag("model_version", s.model_version)
            if s.threshold is not None:
                p.field("threshold", float(s.threshold))
            lines.append(p.time(s.start_ns, WritePrecision.NS).to_line_protocol())
        self._write_lines(lines)

    def write_alerts(self, alerts: Sequence[Alert]) -> None:
        """Write alerts (measurement ``alert``, timestamp = alert start); "cleared" overwrites "raised".

        Raises:
            ValueError, TypeError: a record the store cannot take.
            StoreError: as :meth:`write_scores`.
        """
        lines = []
        for a in check_records("alert", alerts):
            p = (Point("alert").tag("site", a.site).tag("machine", a.machine).tag("sensor", a.sensor).tag("alert_id", a.id)
                 .field("state", a.state).field("end_ns", int(a.end_ns or 0)).field("peak_score", float(a.peak_score))
                 .field("threshold", float(a.threshold)).field("model_version", a.model_version))
            m = a.fault_match  # "" / 0 = none (a later write must be able to overwrite a match)
            p = (p.field("match_label_id", m.label_id if m else "").field("match_fault_type", (m.fault_type or "") if m else "")
                 .field("match_start_ns", int(m.start_ns) if m else 0).field("match_similarity", float(m.similarity) if m else 0.0))
            lines.append(p.time(a.start_ns, WritePrecision.NS).to_line_protocol())
        self._write_lines(lines)

    def write_labels(self, labels: Sequence[Label]) -> None:
        """Write labels (measurement ``label``, timestamp = label start).

        Raises:
            ValueError, TypeError: a record the store cannot take.
            StoreError: as :meth:`write_scores`.
        """
        lines = []
        for lb in check_records("label", labels):
            p = (Point("label").tag("site", lb.site).tag("machine", lb.machine).tag("label_id", lb.id)
                 .field("kind", lb.kind).field("sensor", lb.sensor or "").field("alert_id", lb.alert_id or "")
                 .field("fault_type", lb.fault_type or "").field("author", lb.author).field("note", lb.note or "")
                 .field("end_ns", int(lb.end_ns)).field("created_ns", int(lb.created_ns)))
            lines.append(p.time(lb.start_ns, WritePrecision.NS).to_line_protocol())
        self._write_lines(lines)

    def write_model_events(self, events: Sequence[ModelEvent]) -> None:
        """Write model events (measurement ``model_event``, timestamp = event time).

        Raises:
            ValueError, TypeError: a record the store cannot take.
            StoreError: as :meth:`write_scores`.
        """
        lines = []
        for e in check_records("model_event", events):
            p = (Point("model_event").tag("site", e.site).tag("machine", e.machine)
                 .field("event", e.event).field("version", e.version).field("detail", e.detail))
            lines.append(p.time(e.ts_ns, WritePrecision.NS).to_line_protocol())
        self._write_lines(lines)

    def write_conditions(self, conditions: Sequence[Condition]) -> None:
        """Write condition indicators (measurement ``condition``, timestamp = window start);
        ``velocity_rms_mm_s`` and ``zone`` are absent when ``None``.

        Raises:
            ValueError, TypeError: a record the store cannot take.
            StoreError: as :meth:`write_scores`.
        """
        lines = []
        for c in check_records("condition", conditions):
            p = Point("condition").tag("site", c.site).tag("machine", c.machine).tag("sensor", c.sensor).field("unit", c.unit)
            for name in _CONDITION_VALUES:
                p.field(name, float(getattr(c, name)))
            if c.velocity_rms_mm_s is not None:
                p.field("velocity_rms_mm_s", float(c.velocity_rms_mm_s))
            if c.zone is not None:
                p.field("zone", c.zone)
            lines.append(p.time(c.start_ns, WritePrecision.NS).to_line_protocol())
        self._write_lines(lines)

    # -- queries ---------------------------------------------------------------------------------
    def query_conditions(self, site: str, machine: str, start_ns: int, end_ns: int,
                         sensor: str | None = None) -> list[Condition]:
        """Condition indicators of a machine (optionally one sensor) with window start in
        ``[start_ns, end_ns)``, sorted by (start, sensor).

        Raises:
            StoreError: as :meth:`_query_raw`.
        """
        cols = ", ".join(quote_ident(c) for c in ("sensor", "unit", *_CONDITION_VALUES, "velocity_rms_mm_s", "zone"))
        rows = self._select(f"SELECT {cols} FROM {self._from('condition')} WHERE {self._where(site, machine, start_ns, end_ns, sensor=sensor)}")
        out = [Condition(site, machine, r.get("sensor") or "", int(r["time"]), r.get("unit") or "",
                         *(float(r[c]) for c in _CONDITION_VALUES),
                         None if r.get("velocity_rms_mm_s") is None else float(r["velocity_rms_mm_s"]), r.get("zone") or None)
               for r in rows if r.get("rms") is not None]
        out.sort(key=lambda c: (c.start_ns, c.sensor))
        return out

    def query_condition_buckets(self, site: str, machine: str, sensor: str, start_ns: int, end_ns: int,
                                every_s: float) -> list[Condition]:
        """One sensor's condition indicators in ``[start_ns, end_ns)``, per epoch-aligned bucket
        of ``every_s`` seconds: the maximum of each value and the worst zone (see
        :meth:`Store.query_condition_buckets`).

        Raises:
            ValueError: ``every_s`` rounds to less than 1 ns.
            StoreError: as :meth:`_query_raw`.
        """
        every_ns = round(every_s * 1e9)
        if every_ns < 1:
            raise ValueError(f"every_s must be positive, got {every_s!r}")
        src = self._from("condition")
        where = self._where(site, machine, start_ns, end_ns, sensor=sensor)
        group = f"GROUP BY time({every_ns}ns) fill(none)"
        maxes = self._select(f"SELECT {', '.join(f'max({quote_ident(c)}) AS {quote_ident(c)}' for c in _CONDITION_VALUES)} "
                             f"FROM {src} WHERE {where} {group}")
        # a selector with other fields: the zone and unit of each bucket's highest velocity
        vel = {int(r["time"]): r for r in self._select(
            f'SELECT max("velocity_rms_mm_s"), "zone", "unit" FROM {src} WHERE {where} {group}') if r.get("max") is not None}
        units = {int(r["time"]): r.get("unit") for r in self._select(
            f'SELECT last("unit") AS "unit" FROM {src} WHERE {where} {group}')}
        out = []
        for r in maxes:
            if r.get("rms") is None:
                continue
            t = int(r["time"])
            v = vel.get(t)
            out.append(Condition(site, machine, sensor, t, units.get(t) or "", *(float(r[c]) for c in _CONDITION_VALUES),
                                 None if v is None else float(v["max"]), None if v is None else (v.get("zone") or None)))
        out.sort(key=lambda c: c.start_ns)
        return out

    def query_scores(self, site: str, machine: str, start_ns: int, end_ns: int, sensor: str | None = None) -> list[Score]:
        """Scores of a machine (optionally one sensor) with window start in ``[start_ns, end_ns)``,
        sorted by (start, sensor).

        Raises:
            StoreError: as :meth:`_query_raw`.
        """
        rows = self._select(
            f'SELECT "score", "threshold", "is_anomaly", "sensor", "model_version" FROM {self._from("anomaly_score")} '
            f"WHERE {self._where(site, machine, start_ns, end_ns, sensor=sensor)}")
        out = [Score(site, machine, r.get("sensor") or "", int(r["time"]), float(r["score"]),
                     None if r.get("threshold") is None else float(r["threshold"]), bool(r.get("is_anomaly")),
                     r.get("model_version") or None)
               for r in rows if r.get("score") is not None]
        out.sort(key=lambda s: (s.start_ns, s.sensor))
        return out

    def query_score_buckets(self, site: str, machine: str, sensor: str, start_ns: int, end_ns: int,
                            every_s: float) -> list[ScoreBucket]:
        """One sensor's scores in ``[start_ns, end_ns)`` in epoch-aligned buckets of ``every_s``
        seconds: max score, the threshold at that max, any anomaly, window count; empty buckets
        are omitted.

        Raises:
            ValueError: ``every_s`` rounds to less than 1 ns.
            StoreError: as :meth:`_query_raw`.
        """
        every_ns = round(every_s * 1e9)
        if every_ns < 1:
            raise ValueError(f"every_s must be positive, got {every_s!r}")
        src = self._from("anomaly_score")
        where = self._where(site, machine, start_ns, end_ns, sensor=sensor)
        group = f"GROUP BY time({every_ns}ns) fill(none)"
        maxes = self._select(f'SELECT max("score"), "threshold" FROM {src} WHERE {where} {group}')
        counts = {int(r["time"]): int(r["count"]) for r in self._select(f'SELECT count("score") FROM {src} WHERE {where} {group}')}
        anomalous = {int(r["time"]) for r in self._select(
            f'SELECT count("score") FROM {src} WHERE {where} AND "is_anomaly" = true {group}') if r.get("count")}
        out = []
        for r in maxes:
            if r.get("max") is None:
                continue
            t = int(r["time"])
            out.append(ScoreBucket(t, float(r["max"]), None if r.get("threshold") is None else float(r["threshold"]),
                                   t in anomalous, counts.get(t, 0)))
        out.sort(key=lambda b: b.start_ns)
        return out

    def query_alerts(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[Alert]:
        """Alerts of a machine that started in ``[start_ns, end_ns)``, in their latest state,
        sorted by (start, id).

        Raises:
            StoreError: as :meth:`_query_raw`.
        """
        rows = self._select(
            f'SELECT "state", "end_ns", "peak_score", "threshold", "model_version", "alert_id", "sensor", '
            f'"match_label_id", "match_fault_type", "match_start_ns", "match_similarity" '
            f'FROM {self._from("alert")} WHERE {self._where(site, machine, start_ns, end_ns)}')
        out = [Alert(id=r.get("alert_id") or "", site=site, machine=machine, sensor=r.get("sensor") or "",
                     state=r["state"], start_ns=int(r["time"]), end_ns=int(r.get("end_ns") or 0) or None,
                     peak_score=float(r["peak_score"]), threshold=float(r["threshold"]),
                     model_version=r.get("model_version") or "",
                     fault_match=FaultMatch(r["match_label_id"], r.get("match_fault_type") or None,
                                            int(r.get("match_start_ns") or 0), float(r.get("match_similarity") or 0.0))
                     if r.get("match_label_id") else None)
               for r in rows if r.get("state") is not None]
        out.sort(key=lambda a: (a.start_ns, a.id, a.sensor))
        return out

    def query_labels(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[Label]:
        """Labels of a machine whose span starts in ``[start_ns, end_ns)``, sorted by (start, id);
        one per label id (the newest ``created_ns``, see the module docstring).

        Raises:
            StoreError: as :meth:`_query_raw`.
        """
        rows = self._select(
            f'SELECT "kind", "sensor", "alert_id", "fault_type", "author", "note", "end_ns", "created_ns", "label_id" '
            f'FROM {self._from("label")} WHERE {self._where(site, machine, start_ns, end_ns)}')
        by_id: dict[str, Label] = {}
        for r in rows:
            if r.get("kind") is None:
                continue
            lb = Label(id=r.get("label_id") or "", site=site, machine=machine, start_ns=int(r["time"]),
                       end_ns=int(r["end_ns"]), kind=r["kind"], author=r.get("author") or "",
                       created_ns=int(r["created_ns"]), sensor=r.get("sensor") or None,
                       alert_id=r.get("alert_id") or None, fault_type=r.get("fault_type") or None,
                       note=r.get("note") or "")
            old = by_id.get(lb.id)
            if old is None or (lb.created_ns, lb.start_ns) >= (old.created_ns, old.start_ns):
                by_id[lb.id] = lb
        return sorted(by_id.values(), key=lambda lb: (lb.start_ns, lb.id))

    def query_model_events(self, site: str, machine: str, start_ns: int, end_ns: int) -> list[ModelEvent]:
        """Model events of a machine in ``[start_ns, end_ns)``, sorted by (time, event, version).

        Raises:
            StoreError: as :meth:`_query_raw`.
        """
        rows = self._select(
            f'SELECT "event", "version", "detail" FROM {self._from("model_event")} '
            f"WHERE {self._where(site, machine, start_ns, end_ns)}")
        out = [ModelEvent(site, machine, int(r["time"]), r["event"], r.get("version") or "", r.get("detail") or "")
               for r in rows if r.get("event") is not None]
        out.sort(key=lambda e: (e.ts_ns, e.event, e.version))
        return out

    def machines(self) -> list[MachineState]:
        """Every machine that has scores or alerts, sorted by (site, machine), with its newest
        score (``last(score)`` per site/machine) and its number of open alerts (alert ids whose
        ``last(state)`` is "raised").

        Raises:
            StoreError: as :meth:`_query_raw`.
        """
        state: dict[tuple[str, str], list[Any]] = {}
        for r in self._select(f'SELECT last("score"), "threshold", "model_version" FROM {self._from("anomaly_score")} '
                              f'GROUP BY "site", "machine"'):
            if r.get("last") is None:
                continue
            state[(r.get("site", ""), r.get("machine", ""))] = [
                int(r["time"]), float(r["last"]), None if r.get("threshold") is None else float(r["threshold"]),
                r.get("model_version") or None, 0]
        for r in self._select(f'SELECT last("state") FROM {self._from("alert")} GROUP BY "site", "machine", "alert_id"'):
            entry = state.setdefault((r.get("site", ""), r.get("machine", "")), [None, None, None, None, 0])
            if r.get("last") == "raised":
                entry[4] += 1
        return [MachineState(site, machine, v[0], v[1], v[2], v[3], v[4]) for (site, machine), v in sorted(state.items())]

    # -- misc ------------------------------------------------------------------------------------
    def ping(self) -> dict[str, str]:
        """``GET /ping``: ``{"version": ..., "build": ...}`` (needs no credentials on 1.x/2.x).

        Raises:
            StoreError: unreachable, or the server is not InfluxDB.
        """
        resp = self._request("GET", "/ping")
        if resp.status_code not in (200, 204):
            raise StoreError(f"{self.url} answered /ping with HTTP {resp.status_code}: {_error_text(resp)} - is it InfluxDB?")
        version = resp.headers.get("X-Influxdb-Version", "")
        build = resp.headers.get("X-Influxdb-Build", "")
        if not version and resp.content:
            try:
                body = resp.json()
                version = str(body.get("version", ""))
            except (ValueError, AttributeError):
                pass
        if not version:
            raise StoreError(f"{self.url} answered /ping without an InfluxDB version - is it InfluxDB?")
        return {"version": version, "build": build}

    def server_info(self) -> dict[str, str]:
        """``{"type": "influxdb", "version": ..., "build": ..., "url": ..., "database": ...}``.

        Raises:
            StoreError: as :meth:`ping`.
        """
        info = self.ping()
        return {"type": "influxdb", "version": info["version"], "build": info["build"], "url": self.url,
                "database": self.database}

    def ensure_database(self) -> None:
        """Create the database now if it is missing (``CREATE DATABASE`` is a no-op when it exists).

        Raises:
            StoreError: unreachable, not allowed (no admin rights, or 2.x where DBRP mapping is
                needed instead).
        """
        reason = self._try_create_database()
        if reason is not None:
            raise StoreError(f"cannot create database {self.database!r} on InfluxDB at {self.url}: {reason}")

    def close(self) -> None:
        """Close the HTTP sessions of every thread; idempotent."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()

    def __enter__(self) -> InfluxStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CONDITION_VALUES = ("rms", "peak", "crest_factor", "kurtosis", "band_10_1k", "band_1k_5k", "band_5k_up")
"""The float fields of the ``condition`` measurement that are always present."""


def _short(exc: BaseException) -> str:
    """A one-line reason from a requests/urllib3 exception (e.g. "connection refused")."""
    text = str(exc)
    low = text.lower()
    m = re.search(r"\[SSL: [A-Z_]+\] ([^(\]'\"]+)", text)
    if m:
        reason = m.group(1).strip().rstrip(":")
        if "wrong version number" in reason:
            reason += " - does the server speak TLS (https) at all?"
        return reason
    if "connection refused" in low or "errno 111" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low or "failed to resolve" in low:
        return "host name not found"
    if "timed out" in low:
        return "timed out"
    if "certificate verify failed" in low:
        return "certificate verify failed"
    return text.splitlines()[0][:200] if text else type(exc).__name__
