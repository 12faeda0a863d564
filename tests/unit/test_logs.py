"""Tests for pgmulti.logs: PgBouncer text lines, JSON lines, syslog, handler setup."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from pgmulti import logs

TEXT_LINE = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\S+) \[(\d+)\] (\w+) (.*)", re.DOTALL)


def record(msg: str, *args, level: int = logging.INFO, exc_info=None,
           name: str = "pgmulti") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def exc_info():
    try:
        raise ValueError("boom")
    except ValueError:
        return sys.exc_info()


@pytest.fixture
def root_logger():
    """configure() replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def short_tmp():
    """A short directory for Unix socket paths (sun_path is about 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="pgm") as path:
        yield Path(path)


# --------------------------------------------------------------------------- text


def test_text_line_has_pgbouncer_shape():
    rec = record("listening on %s:%d", "127.0.0.1", 6432)
    line = logs.PgBouncerFormatter().format(rec)
    match = TEXT_LINE.fullmatch(line)
    assert match, line
    stamp, _zone, pid, level, message = match.groups()
    assert int(pid) == rec.process == os.getpid()
    assert level == "LOG"
    assert message == "listening on 127.0.0.1:6432"
    expected = datetime.datetime.fromtimestamp(rec.created).strftime("%Y-%m-%d %H:%M:%S")
    assert stamp == f"{expected}.{int(rec.msecs):03d}"


@pytest.mark.parametrize("level, word", [
    (logging.DEBUG, "DEBUG"), (logging.INFO, "LOG"), (logging.WARNING, "WARNING"),
    (logging.ERROR, "ERROR"), (logging.CRITICAL, "FATAL"),
])
def test_level_words_are_pgbouncer_s(level, word):
    assert TEXT_LINE.fullmatch(logs.PgBouncerFormatter().format(record("x", level=level)))[4] == word
    assert json.loads(logs.JsonFormatter().format(record("x", level=level)))["level"] == word


def test_text_line_appends_the_traceback():
    line = logs.PgBouncerFormatter().format(record("failed", level=logging.ERROR,
                                                   exc_info=exc_info()))
    first, rest = line.split("\n", 1)
    assert first.endswith(" ERROR failed")
    assert "Traceback" in rest and "ValueError: boom" in rest


def test_stamp_follows_the_clock_across_seconds():
    """The local time of a second is kept: the next second, and an earlier one, get theirs."""
    stamp = logs._Stamp()
    for created in (1_700_000_000.123, 1_700_000_000.999, 1_700_000_001.004, 1_600_000_000.5):
        local = datetime.datetime.fromtimestamp(created)
        expected = local.strftime("%Y-%m-%d %H:%M:%S") + f".{int(created % 1 * 1000):03d}"
        assert stamp(created).startswith(expected + " "), (created, stamp(created))


def test_a_record_is_formatted_once_for_the_handlers_that_share_a_formatter(monkeypatch):
    formatter = logs.PgBouncerFormatter()
    calls = []
    monkeypatch.setattr(formatter, "line", lambda rec: calls.append(rec) or "the line")
    rec = record("x")
    assert formatter.format(rec) == formatter.format(rec) == "the line"
    assert calls == [rec]
    assert formatter.format(record("y")) == "the line" and len(calls) == 2


def test_cli_still_exports_the_formatter():
    from pgmulti import cli
    assert cli.PgBouncerFormatter is logs.PgBouncerFormatter


# --------------------------------------------------------------------------- json


def test_json_line_fields():
    rec = record("pgmulti %s started, pid %d", "1.0", 42)
    line = logs.JsonFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert list(obj) == ["ts", "pid", "level", "msg"]
    assert obj["pid"] == rec.process
    assert obj["level"] == "LOG"
    assert obj["msg"] == "pgmulti 1.0 started, pid 42"
    stamp = datetime.datetime.fromisoformat(obj["ts"])
    assert stamp.tzinfo is not None
    assert abs(stamp.timestamp() - rec.created) < 0.001
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", obj["ts"])


@pytest.mark.parametrize("message, conn", [
    ("C-0x1a: testdb/alice@127.0.0.1:5555 login attempt: db=testdb", "C-0x1a"),
    ("S-0x2b: testdb/alice@127.0.0.1:5432 new connection to server", "S-0x2b"),
    ("C-0xdeadbeef: (nodb)/(nouser)@unix(1):6432 closing because: x", "C-0xdeadbeef"),
    ("listening on 127.0.0.1:6432", None),
    ("see C-0x1a: not a prefix", None),
    ("X-0x1a: not a connection", None),
])
def test_json_conn_field_only_for_connection_messages(message, conn):
    obj = json.loads(logs.JsonFormatter().format(record("%s", message)))
    assert obj["msg"] == message  # the text is unchanged
    assert obj.get("conn") == conn
    if conn is None:
        assert "conn" not in obj


def test_json_escapes_and_keeps_one_line():
    message = 'quote " backslash \\ newline \n tab \t unicode é ✓'
    line = logs.JsonFormatter().format(record("%s", message))
    assert "\n" not in line
    assert json.loads(line)["msg"] == message


def test_json_exception_goes_to_exc():
    obj = json.loads(logs.JsonFormatter().format(
        record("failed", level=logging.ERROR, exc_info=exc_info())))
    assert obj["msg"] == "failed"
    assert "ValueError: boom" in obj["exc"]


# --------------------------------------------------------------------------- syslog


def test_syslog_formatter_text_and_json():
    rec = record("C-0x1: db/u@h:1 login attempt")
    text = logs.SyslogFormatter("pgbouncer").format(rec)
    assert text == f"pgbouncer[{rec.process}]: LOG C-0x1: db/u@h:1 login attempt"
    as_json = logs.SyslogFormatter("pgmulti", "json").format(rec)
    prefix = f"pgmulti[{rec.process}]: "
    assert as_json.startswith(prefix)
    assert json.loads(as_json[len(prefix):])["conn"] == "C-0x1"


def test_syslog_handler_without_socket_is_skipped_with_a_warning(tmp_path):
    handler, warnings = logs.syslog_handler("pgbouncer", "daemon",
                                            address=str(tmp_path / "no-log"))
    assert handler is None
    assert len(warnings) == 1 and "does not exist" in warnings[0]


def receive_syslog(short_tmp: Path, facility: str, level: int, message: str,
                   ident: str = "pgbouncer") -> tuple[bytes, list[str]]:
    address = str(short_tmp / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(5)
        handler, warnings = logs.syslog_handler(ident, facility, address=address)
        assert handler is not None
        try:
            handler.handle(record("%s", message, level=level))
        finally:
            handler.close()
        return server.recv(65536), warnings


@pytest.mark.parametrize("facility, code", [("daemon", 3), ("local3", 19), ("AUTH", 4),
                                            ("authpriv", 10), ("user", 1)])
def test_syslog_handler_sends_priority_ident_and_message(short_tmp, facility, code):
    data, warnings = receive_syslog(short_tmp, facility, logging.WARNING, "pool is full")
    assert warnings == []
    priority = code * 8 + 4  # LOG_WARNING
    assert data.rstrip(b"\0") == f"<{priority}>pgbouncer[{os.getpid()}]: WARNING pool is full".encode()


def test_syslog_unknown_facility_falls_back_to_daemon(short_tmp):
    data, warnings = receive_syslog(short_tmp, "kern", logging.INFO, "hello", ident="pgm")
    assert len(warnings) == 1 and "syslog_facility = kern" in warnings[0]
    assert data.startswith(f"<{3 * 8 + 6}>pgm[".encode())  # daemon.info


# --------------------------------------------------------------------------- configure


def test_configure_logfile_json(root_logger, tmp_path):
    path = tmp_path / "pgmulti.log"
    warnings = logs.configure(logfile=str(path), stderr=False, log_format="json")
    assert warnings == []
    logging.getLogger("pgmulti").info("hello %s", "json")
    logging.getLogger("pgmulti").debug("not at INFO")
    lines = path.read_text().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["hello json"]


def test_configure_again_reopens_the_logfile(root_logger, tmp_path):
    path = tmp_path / "pgmulti.log"
    logs.configure(logfile=str(path), stderr=False)
    log = logging.getLogger("pgmulti")
    log.info("before rotation")
    path.rename(tmp_path / "pgmulti.log.1")
    logs.configure(logfile=str(path), stderr=False, level=logging.DEBUG)
    log.debug("after rotation")
    assert "before rotation" in (tmp_path / "pgmulti.log.1").read_text()
    assert "after rotation" not in (tmp_path / "pgmulti.log.1").read_text()
    assert TEXT_LINE.fullmatch(path.read_text().rstrip("\n"))[5] == "after rotation"


def test_configure_keeps_old_handlers_when_the_logfile_cannot_be_opened(root_logger, tmp_path):
    good = tmp_path / "good.log"
    logs.configure(logfile=str(good), stderr=False)
    with pytest.raises(OSError):
        logs.configure(logfile=str(tmp_path / "missing-dir" / "x.log"), stderr=False)
    logging.getLogger("pgmulti").info("still here")
    assert "still here" in good.read_text()


def test_configure_syslog_missing_socket_warns_and_keeps_other_handlers(root_logger, tmp_path):
    path = tmp_path / "pgmulti.log"
    warnings = logs.configure(logfile=str(path), stderr=False, syslog=True,
                              syslog_address=str(tmp_path / "nolog"))
    assert len(warnings) == 1
    logging.getLogger("pgmulti").info("to the file")
    assert "to the file" in path.read_text()


def test_configure_syslog_to_a_socket(root_logger, short_tmp):
    address = str(short_tmp / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(5)
        logs.configure(stderr=False, syslog=True, syslog_ident="pgmulti",
                       syslog_facility="local0", log_format="json", syslog_address=address)
        logging.getLogger("pgmulti").error("S-0x5: db/u@h:1 closing")
        data = server.recv(65536).rstrip(b"\0").decode()
    prefix = f"<{16 * 8 + 3}>pgmulti[{os.getpid()}]: "
    assert data.startswith(prefix), data
    obj = json.loads(data[len(prefix):])
    assert (obj["level"], obj["conn"]) == ("ERROR", "S-0x5")
