"""Structured logs of the running appliance: one line per event, ``event=NAME key=value ...``.

:func:`log_event` logs an event with its fields (also attached to the record as
``pdm_fields``); :func:`configure_logging` makes stdlib :mod:`logging` write every record as
logfmt (:class:`LogfmtFormatter`) or JSON (:class:`JsonFormatter`) to stderr
(``pdm-edge run --log-format``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["JsonFormatter", "LogfmtFormatter", "configure_logging", "log_event"]

def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log one event as ``event=NAME key=value ...`` (values quoted when needed); the fields
    also travel as the record's ``pdm_fields`` for :class:`JsonFormatter`."""
    if not logger.isEnabledFor(level):
        return
    logger.log(level, "%s", _logfmt({"event": event, **fields}), extra={"pdm_fields": {"event": event, **fields}})


_BARE = re.compile(r"^[A-Za-z0-9_./:@+-]+$")


def _logfmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s if s and _BARE.match(s) else json.dumps(s, ensure_ascii=False)


def _logfmt(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


def _ts(record: logging.LogRecord) -> str:
    return _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=... event=... k=v`` for service events, ``msg="..."`` for
    every other record (exceptions appended as ``exc="..."``)."""

    def format(self, record: logging.LogRecord) -> str:
        head = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "pdm_fields", None)
        body = dict(fields) if fields else {"msg": record.getMessage()}
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return _logfmt({**head, **body})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``{ts, level, logger, event?, ..., msg?}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "pdm_fields", None)
        if fields:
            doc.update(fields)
        else:
            doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Send every record to stderr in ``fmt`` (``"logfmt"`` or ``"json"``) at ``level``,
    replacing the root logger's handlers. Third-party chatter (amqtt, transitions) is kept at
    WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("amqtt", "transitions", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
