"""Log formats and destinations: PgBouncer's text lines, JSON lines, syslog.

Destinations follow PgBouncer: stderr (unless ``-q`` or ``-d``), ``logfile``, and syslog when
``syslog = 1``, all at once.  ``log_format`` (pgmulti-specific) chooses the line format for
all of them:

``text`` (default)
    PgBouncer's line: ``2025-01-31 12:00:00.123 UTC [4242] LOG message``.
``json``
    One compact JSON object per line (msgspec), keys in this order::

        {"ts":"2025-01-31T12:00:00.123+00:00","pid":4242,"level":"LOG","msg":"C-0x1a: db/user@127.0.0.1:5555 login attempt: db=db user=user tls=no","conn":"C-0x1a"}

    ``ts`` is ISO 8601 local time with milliseconds and UTC offset; ``level`` is PgBouncer's
    word (DEBUG, LOG, WARNING, ERROR, FATAL); ``msg`` is the same text as in the text
    format.  ``conn`` is present only when the message is about one client (``C-0x..``) or
    server (``S-0x..``) connection, as PgBouncer prefixes those; it is that id, so
    ``jq 'select(.conn == "C-0x1a")'`` follows one connection.  ``exc`` holds a traceback
    when there is one.

Syslog messages carry ``ident[pid]: `` (``syslog_ident``) followed by ``LEVEL message`` in
text mode (syslog adds its own time stamp) or the JSON object in json mode, at the priority
matching the level, under ``syslog_facility``.
"""

from __future__ import annotations

import codecs
import datetime
import logging
import logging.handlers
import os
import re
import sys
import time

import msgspec

from . import _codec

__all__ = [
    "FACILITIES",
    "JsonFormatter",
    "PgBouncerFormatter",
    "SyslogFormatter",
    "configure",
    "level_word",
    "syslog_handler",
]

SYSLOG_SOCKET = "/dev/log"

LEVELS = {"INFO": "LOG", "WARNING": "WARNING", "ERROR": "ERROR", "DEBUG": "DEBUG",
          "CRITICAL": "FATAL"}

# The facilities PgBouncer documents for syslog_facility.
FACILITIES = {
    "auth": logging.handlers.SysLogHandler.LOG_AUTH,
    "authpriv": logging.handlers.SysLogHandler.LOG_AUTHPRIV,
    "daemon": logging.handlers.SysLogHandler.LOG_DAEMON,
    "user": logging.handlers.SysLogHandler.LOG_USER,
    **{f"local{n}": getattr(logging.handlers.SysLogHandler, f"LOG_LOCAL{n}") for n in range(8)},
}

# PgBouncer's connection prefix: "C-0x1a: db/user@addr ..." or "S-0x2b: ...".
_CONN_PREFIX = re.compile(r"([CS]-0x[0-9a-f]+):")


def level_word(record: logging.LogRecord) -> str:
    """PgBouncer's name for the record's level (INFO is LOG, CRITICAL is FATAL)."""
    return LEVELS.get(record.levelname, record.levelname)


class _Stamp:
    """PgBouncer's time stamp, ``2025-01-31 12:00:00.123 UTC``, with the local time of a
    second worked out once: two strftime calls were a third of a line's cost."""

    __slots__ = ("_second", "_template")

    def __init__(self):
        self._second = -1
        self._template = ""  # "2025-01-31 12:00:00.%03d UTC" for _second

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._template = time.strftime("%Y-%m-%d %H:%M:%S.%%03d %Z", time.localtime(second))
            self._second = second
        return self._template % int((created - second) * 1000)


_stamp = _Stamp()


class _OncePerRecord(logging.Formatter):
    """Formats a record once for all the handlers that share the formatter (logfile and
    stderr), keeping the line on the record as logging keeps a traceback's text."""

    _attribute = ""  # the record attribute a subclass keeps its line in

    def format(self, record: logging.LogRecord) -> str:
        line = record.__dict__.get(self._attribute)
        if line is None:
            line = self.line(record)
            setattr(record, self._attribute, line)
        return line

    def line(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class PgBouncerFormatter(_OncePerRecord):
    """PgBouncer's log line: time with milliseconds and zone, [pid], level word."""

    LEVELS = LEVELS
    _attribute = "pgmulti_text_line"

    def line(self, record: logging.LogRecord) -> str:
        text = (f"{_stamp(record.created)} [{record.process}] {level_word(record)} "
                f"{record.getMessage()}")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _JsonLine(msgspec.Struct, omit_defaults=True):
    ts: str
    pid: int
    level: str
    msg: str
    conn: str | None = None
    exc: str | None = None


_encoder = msgspec.json.Encoder()


class JsonFormatter(_OncePerRecord):
    """One JSON object per record: ts, pid, level, msg, and conn / exc when they apply."""

    _attribute = "pgmulti_json_line"

    def line(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        match = _CONN_PREFIX.match(message)
        stamp = datetime.datetime.fromtimestamp(record.created).astimezone()
        line = _JsonLine(
            ts=stamp.isoformat(timespec="milliseconds"),
            pid=record.process or os.getpid(),
            level=level_word(record),
            msg=message,
            conn=match.group(1) if match else None,
            exc=self.formatException(record.exc_info) if record.exc_info else None,
        )
        return _encoder.encode(line).decode()


class SyslogFormatter(logging.Formatter):
    """``ident[pid]: `` then ``LEVEL message`` (text) or the JSON object (json).

    The pid is the record's, so it stays right after ``-d`` forks.
    """

    def __init__(self, ident: str, log_format: str = "text"):
        super().__init__()
        self.ident = ident
        self.json = JsonFormatter() if log_format == "json" else None

    def format(self, record: logging.LogRecord) -> str:
        if self.json is not None:
            body = self.json.format(record)
        else:
            body = f"{level_word(record)} {record.getMessage()}"
            if record.exc_info:
                body += "\n" + self.formatException(record.exc_info)
        return f"{self.ident}[{record.process}]: {body}"


def line_formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else PgBouncerFormatter()


def syslog_handler(ident: str, facility: str, log_format: str = "text",
                   address: str = SYSLOG_SOCKET) -> tuple[logging.Handler | None, list[str]]:
    """A handler sending to the local syslog socket, and warnings for the caller to log.

    None (with a warning) when the socket does not exist or cannot be reached; an unknown
    facility falls back to daemon with a warning.
    """
    warnings = []
    code = FACILITIES.get(facility.lower())
    if code is None:
        warnings.append(f"syslog_facility = {facility} is not one of "
                        f"{', '.join(FACILITIES)}; using daemon")
        code = FACILITIES["daemon"]
    if not os.path.exists(address):
        warnings.append(f"syslog = 1 but {address} does not exist; not logging to syslog")
        return None, warnings
    try:
        handler = logging.handlers.SysLogHandler(address=address, facility=code)
    except OSError as exc:
        warnings.append(f"syslog = 1 but {address} cannot be reached ({exc}); "
                        "not logging to syslog")
        return None, warnings
    handler.setFormatter(SyslogFormatter(ident, log_format))
    return handler, warnings


def _utf8_descriptor(handler: logging.Handler) -> int | None:
    """The descriptor under a handler's stream when it is a UTF-8 text stream, else None."""
    stream = getattr(handler, "stream", None)
    try:
        fd = stream.fileno()
        encoding = codecs.lookup(stream.encoding or "").name
    except (AttributeError, LookupError, OSError, ValueError):
        return None
    return fd if encoding == "utf-8" else None


def _hand_descriptors_to_codec(handlers: list[logging.Handler], log_format: str) -> None:
    """The codec writes the log_connections and log_disconnections lines itself (through
    logging they cost more than the rest of a short connection) when every destination
    is a UTF-8 text stream in PgBouncer's format: it is given their descriptors."""
    fds = [_utf8_descriptor(handler) for handler in handlers]  # None: not such a stream
    if log_format == "text" and None not in fds:
        _codec.set_log_descriptors(fds)


def configure(*, logfile: str | None = None, stderr: bool = True, level: int = logging.INFO,
              log_format: str = "text", syslog: bool = False, syslog_ident: str = "pgbouncer",
              syslog_facility: str = "daemon",
              syslog_address: str = SYSLOG_SOCKET) -> list[str]:
    """Replace the root logger's handlers; returns warnings for the caller to log.

    The new handlers are built first: if the log file cannot be opened, OSError propagates
    and the old handlers stay (a reload with a bad ``logfile`` keeps logging).  Re-running it
    reopens the log file, which is what log rotation needs after ``kill -HUP``.

    In the text format the codec writes the per-connection lines (log_connections,
    log_disconnections) to the new destinations' descriptors itself, not through a
    handler added to the root logger later.
    """
    formatter = line_formatter(log_format)
    handlers: list[logging.Handler] = []
    warnings: list[str] = []
    if logfile:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(formatter)
        handlers.append(handler)
    if stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        handlers.append(stream)
    if syslog:
        handler, warnings = syslog_handler(syslog_ident, syslog_facility, log_format,
                                           syslog_address)
        if handler is not None:
            handlers.append(handler)
    # Records need no caller, thread or process name: no format shows them, and finding
    # the caller walks the stack (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    _codec.set_log_descriptors(())  # before the old streams close
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    _hand_descriptors_to_codec(handlers, log_format)
    return warnings
