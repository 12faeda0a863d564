"""Operations: `pgmulti --check`, systemd notifications ($NOTIFY_SOCKET), log_format, syslog."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from support import client_port, line_of, run_cli, wait_for, write_config

from pgmulti import systemd
from pgmulti.cluster import find_free_port, is_listening

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
NOTIFY_TIMEOUT_S = 15.0
DB_PASSWORD = "Db-Pa55word-in-ini"
USER_PASSWORD = "User-Pa55word-in-userlist"


# --- helpers ---


def json_lines(text: str) -> list[dict]:
    """Every line of a log parsed as JSON (fails on the first line that is not)."""
    objects = []
    for line in text.splitlines():
        if line.strip():
            try:
                objects.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON line: {line!r}") from None
    return objects


# --- pgmulti --check ---


def test_check_good_config(tmp_path, base_config):
    text = base_config(
        databases={"forced": f"host=127.0.0.1 port={{pg_port}} user=md5user password={DB_PASSWORD}"},
        default_pool_size=7, server_lifetime=120, log_connections=0, unix_socket_mode="0700",
    ) + "dns_zone_check_period = 30\n"
    users = f'"postgres" ""\n"md5user" "{USER_PASSWORD}"\n"alice" "md5abc"\n'
    config = write_config(tmp_path, text, users)
    result = run_cli("--check", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    # Effective values that differ from PgBouncer's defaults, as key = value.
    for line in ("default_pool_size = 7", "server_lifetime = 120", "log_connections = 0",
                 "unix_socket_mode = 0700", "pool_mode = transaction", "auth_type = trust",
                 "listen_addr = 127.0.0.1", "dns_zone_check_period = 30"):
        assert line in out, result.stdout
    for key in ("listen_backlog", "pkt_buf", "server_reset_query", "conffile", "log_format"):
        assert not any(line.startswith(key + " ") for line in out), key
    # The userlist is counted, never shown; the [databases] password is masked.
    assert "3 users" in result.stdout
    forced = [line for line in out if line.startswith("forced = ")]
    assert forced and "password=***" in forced[0] and "user=md5user" in forced[0]
    everything = result.stdout + result.stderr
    assert DB_PASSWORD not in everything
    assert USER_PASSWORD not in everything and "md5abc" not in everything
    # An ignored key is a warning with its file:line; the start did not happen.
    assert f"{config}:{line_of(text, 'dns_zone_check_period')}: warning: dns_zone_check_period" in result.stderr
    assert "configuration OK" in result.stdout
    assert "error" not in result.stderr


def test_check_at_defaults_reports_nothing_changed(tmp_path):
    config = write_config(tmp_path, "[pgbouncer]\n")
    result = run_cli("--check", str(config))
    assert result.returncode == 0, result.stderr
    assert "all settings at their defaults" in result.stdout
    # md5 (the default) with neither auth_file nor auth_user: nobody could log in.
    assert result.stderr.splitlines() == [
        f"{config}: warning: auth_type = md5 without auth_file or auth_user: "
        "no client can log in"]


@pytest.mark.parametrize("bad_line, problem", [
    ("pool_mode = sometimes", "pool_mode"),
    ("log_format = xml", "log_format"),
    ("no_such_setting = 1", "no_such_setting"),
])
def test_check_bad_config_reports_file_and_line(tmp_path, base_config, bad_line, problem):
    text = base_config() + bad_line + "\n"
    config = write_config(tmp_path, text)
    result = run_cli("--check", str(config))
    assert result.returncode == 1
    assert f"{config}:{line_of(text, bad_line)}: error: " in result.stderr, result.stderr
    assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_check_syntax_error_does_not_echo_the_password(tmp_path, base_config):
    broken = f"broken host=127.0.0.1 password={DB_PASSWORD}"  # no '='
    text = base_config().replace("[databases]\n", f"[databases]\n{broken}\n")
    config = write_config(tmp_path, text)
    result = run_cli("--check", str(config))
    assert result.returncode == 1
    assert f"{config}:{line_of(text, broken)}:" in result.stderr
    assert DB_PASSWORD not in result.stdout + result.stderr


def test_check_bad_auth_file_line(tmp_path, base_config):
    users = f'"postgres" ""\nmd5user "{USER_PASSWORD}"\n'  # unquoted name
    config = write_config(tmp_path, base_config(), users)
    result = run_cli("--check", str(config))
    assert result.returncode == 1
    assert f"{tmp_path / 'userlist.txt'}:2: error: auth_file" in result.stderr, result.stderr
    assert USER_PASSWORD not in result.stdout + result.stderr


def test_check_missing_auth_file_and_tls_files(tmp_path, base_config):
    text = base_config(auth_file="{tmp}/missing.txt", client_tls_sslmode="require",
                       client_tls_cert_file="{tmp}/none.crt", client_tls_key_file="{tmp}/none.key")
    config = write_config(tmp_path, text)
    result = run_cli("--check", str(config))
    assert result.returncode == 1
    assert f"{config}:{line_of(text, 'auth_file')}: error: auth_file" in result.stderr
    assert "missing.txt" in result.stderr
    assert "TLS" in result.stderr
    assert "2 errors" in result.stdout


def test_check_unsupported_auth_type_is_an_error(tmp_path, base_config):
    text = base_config(auth_type="pam")
    config = write_config(tmp_path, text)
    result = run_cli("--check", str(config))
    assert result.returncode == 1
    assert f"{config}:{line_of(text, 'auth_type')}: error: auth_type = pam" in result.stderr


def test_check_does_not_start_the_pooler(tmp_path, base_config):
    port = find_free_port()
    config = write_config(tmp_path, base_config(listen_port=port))
    result = run_cli("--check", str(config))
    assert result.returncode == 0, result.stderr
    assert not is_listening(port)
    assert not list(tmp_path.glob(".s.PGSQL.*"))


# --- systemd notifications ---


@pytest.fixture
def notify_socket(monkeypatch) -> Iterator[socket.socket]:
    """A bound Unix datagram socket; NOTIFY_SOCKET points at it for processes we start.

    Set after the `pg` fixture started PostgreSQL (it is requested first), which would
    otherwise talk to it as well.
    """
    directory = tempfile.mkdtemp(prefix="pgmn")  # short: sun_path is about 108 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.settimeout(NOTIFY_TIMEOUT_S)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock
    finally:
        sock.close()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)


def receive(sock: socket.socket) -> dict[str, str]:
    """The next notification as a dict of its KEY=VALUE lines (bounded wait)."""
    try:
        data = sock.recv(4096)
    except TimeoutError:
        raise AssertionError(f"no notification within {NOTIFY_TIMEOUT_S} s") from None
    return dict(line.split("=", 1) for line in data.decode().split("\n") if line)


@pytest.mark.parametrize("workers", [1, 2])
def test_notify_ready_reloading_stopping(pg, notify_socket, pgmulti, workers):
    """With workers, the parent speaks to systemd (NotifyAccess=main) and the workers never do."""
    proc = pgmulti({"workers": workers})
    assert receive(notify_socket) == {"READY": "1"}
    assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proc.signal(signal.SIGHUP)
    reloading = receive(notify_socket)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading.pop("RELOADING") == "1"
    assert before <= int(reloading.pop("MONOTONIC_USEC")) <= after
    assert reloading == {}
    assert receive(notify_socket) == {"READY": "1"}
    assert "configuration reloaded" in proc.log_text()

    proc.signal(signal.SIGINT)
    assert receive(notify_socket) == {"STOPPING": "1"}
    assert proc.wait(10) == 0
    notify_socket.settimeout(0.5)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)  # nothing more, STOPPING=1 was sent once


def test_notify_failed_reload_still_ends_with_ready(pg, notify_socket, pgmulti, base_config):
    proc = pgmulti()
    assert receive(notify_socket) == {"READY": "1"}
    proc.config_path.write_text(base_config() + "pool_mode = sometimes\n")
    proc.signal(signal.SIGHUP)
    assert "RELOADING" in receive(notify_socket)
    assert receive(notify_socket) == {"READY": "1"}
    assert "reload failed" in proc.log_text()
    proc.signal(signal.SIGTERM)
    assert receive(notify_socket) == {"STOPPING": "1"}
    assert proc.wait(10) == 0


def test_notify_stopping_on_console_shutdown(pg, notify_socket, pgmulti):
    proc = pgmulti()
    assert receive(notify_socket) == {"READY": "1"}
    proc.psql("SHUTDOWN", db="pgbouncer")  # the connection drops: result not checked
    assert receive(notify_socket) == {"STOPPING": "1"}
    assert proc.wait(10) == 0


def test_notify_abstract_socket(monkeypatch):
    name = f"pgmulti-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        systemd.reset()
        try:
            systemd.ready()
            systemd.ready()  # already ready: dropped
            systemd.reloading()
            systemd.reloading()  # already reloading: dropped
            systemd.ready()
            systemd.stopping()
            systemd.ready()  # stopping: dropped
            systemd.stopping()
        finally:
            systemd.reset()
        received = []
        sock.settimeout(0.5)
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    assert received[0] == "READY=1"
    assert received[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert received[2:] == ["READY=1", "STOPPING=1"]


def test_notify_without_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/dir/notify")
    assert systemd.notify("READY=1") is False  # logged, never raised


def test_unit_file_is_type_notify():
    unit = (SRC_DIR.parent / "etc" / "pgmulti.service").read_text()
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1]
             for line in unit.splitlines() if "=" in line and not line.startswith("#")}
    assert lines["Type"] == "notify"
    assert lines["ExecStart"] == "/usr/local/bin/pgmulti /etc/pgbouncer/pgbouncer.ini"
    assert lines["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert lines["KillSignal"] == "SIGINT"
    assert "LimitNOFILE" in lines


# --- log_format, syslog ---


def check_json_log(objects: list[dict], pid: int) -> None:
    assert objects, "empty log"
    for obj in objects:
        assert {"ts", "pid", "level", "msg"} <= set(obj), obj
        assert set(obj) <= {"ts", "pid", "level", "msg", "conn", "exc"}, obj
        assert obj["pid"] == pid
        assert obj["level"] in ("DEBUG", "LOG", "WARNING", "ERROR", "FATAL")
        assert datetime.datetime.fromisoformat(obj["ts"]).tzinfo is not None
        if "conn" in obj:
            assert obj["msg"].startswith(obj["conn"] + ": ")
    messages = [obj["msg"] for obj in objects]
    assert any(msg.startswith("pgmulti ") and "started" in msg for msg in messages)
    logins = [obj for obj in objects if "login attempt" in obj["msg"]]
    assert logins and logins[0]["conn"].startswith("C-0x")
    assert any(obj.get("conn", "").startswith("S-0x") for obj in objects), messages


# PgBouncer's text line: time with milliseconds and zone, [pid], level word, message.
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+ \[\d+\] "
                       r"(LOG|DEBUG|WARNING|ERROR|FATAL) \S.*")


def session_from_port(proc) -> int:
    """Run one session through the proxy; the client's port."""
    with psycopg.connect(proc.dsn(db="testdb"), connect_timeout=5, autocommit=True) as conn:
        conn.execute("SELECT 1")
        return client_port(conn)


def connection_lines(text: str, port: int) -> tuple[list[str], list[str]]:
    """The log_connections and log_disconnections lines of the client on this port."""
    client = rf"C-0x[0-9a-f]+: testdb/postgres@127\.0\.0\.1:{port} "
    lines = text.splitlines()
    logins = [line for line in lines
              if re.search(client + "login attempt: db=testdb user=postgres tls=no$", line)]
    closings = [line for line in lines
                if re.search(client + r"closing because: client close request \(age=0s\)$", line)]
    return logins, closings


def test_connection_lines_are_pgbouncer_text_lines_on_stderr_and_logfile(pgmulti):
    """The codec writes the login and disconnection lines itself (to the descriptors of the
    log file and stderr): once each per destination, in PgBouncer's text format, between
    whole lines that logging writes."""
    proc = pgmulti({"logfile": "{tmp}/file.log", "log_connections": 1,
                    "log_disconnections": 1})
    logfile = proc.workdir / "file.log"
    ports = [session_from_port(proc) for _ in range(3)]
    for read in (logfile.read_text, proc.log_text):
        wait_for(lambda read=read: connection_lines(read(), ports[-1])[1], 5,
                 "the last disconnection")
        text = read()
        for port in ports:
            logins, closings = connection_lines(text, port)
            assert len(logins) == 1 and len(closings) == 1, text
        assert "started" in text and "new connection to server" in text  # logging's lines
        for line in text.splitlines():
            assert TEXT_LINE.fullmatch(line), line


def test_sighup_reopens_the_logfile_for_the_connection_lines(pgmulti):
    """After rotation the codec's lines go to the reopened file, none to the renamed one."""
    proc = pgmulti({"logfile": "{tmp}/file.log"})
    logfile = proc.workdir / "file.log"
    before = session_from_port(proc)
    wait_for(lambda: connection_lines(logfile.read_text(), before)[1], 5, "the disconnection")
    rotated = logfile.rename(proc.workdir / "file.log.1")
    proc.signal(signal.SIGHUP)
    wait_for(logfile.exists, 5, "the log file to be reopened")
    after = session_from_port(proc)
    wait_for(lambda: connection_lines(logfile.read_text(), after)[1], 5, "the new disconnection")
    assert connection_lines(logfile.read_text(), after)[0]
    assert connection_lines(rotated.read_text(), after) == ([], [])


def test_log_format_json_on_stderr_and_logfile(pgmulti):
    proc = pgmulti({"log_format": "json", "logfile": "{tmp}/file.log"})
    logfile = proc.workdir / "file.log"
    assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"
    wait_for(lambda: "login attempt" in logfile.read_text(), 5, "the login in the logfile")
    wait_for(lambda: "S-0x" in logfile.read_text(), 5, "a server line in the logfile")
    check_json_log(json_lines(logfile.read_text()), proc.pid)
    wait_for(lambda: "S-0x" in proc.log_text(), 5, "a server line on stderr")
    check_json_log(json_lines(proc.log_text()), proc.pid)


def test_sighup_reopens_the_logfile_and_applies_log_format(pgmulti, base_config):
    proc = pgmulti({"logfile": "{tmp}/file.log"})
    logfile = proc.workdir / "file.log"
    wait_for(lambda: "started" in logfile.read_text(), 5, "the start in the logfile")
    rotated = logfile.rename(proc.workdir / "file.log.1")
    proc.write_config(base_config(logfile="{tmp}/file.log", log_format="json"))
    proc.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in rotated.read_text(), 5, "the reload")
    wait_for(logfile.exists, 5, "the log file to be reopened")
    assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"
    wait_for(lambda: "login attempt" in logfile.read_text(), 5, "the login in the new file")
    objects = json_lines(logfile.read_text())
    assert any("login attempt" in obj["msg"] for obj in objects)
    assert "login attempt" not in rotated.read_text()
    assert " LOG " in rotated.read_text()  # the text lines from before the reload


def test_syslog_is_no_longer_reported_unsupported(pgmulti, base_config):
    proc = pgmulti(base_config() + "syslog = 1\nsyslog_ident = pgm\nsyslog_facility = local1\n")
    assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"
    warnings = [line for line in proc.log_text().splitlines() if " WARNING " in line]
    assert not any("not supported" in line for line in warnings), warnings
    if not os.path.exists("/dev/log"):
        assert any("/dev/log does not exist" in line for line in warnings), warnings
    else:
        assert warnings == []
