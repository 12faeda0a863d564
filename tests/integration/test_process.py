"""The pgmulti process: command line, configuration errors, files it writes, signals, sockets."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgmulti.__version__ import __version__
from pgmulti.cluster import clean_env, is_listening, process_tree
from support import line_of, run_cli, wait_for, write_config

CONNECT_TIMEOUT = 10


# --- helpers ---


def refuses_connections(host: str, port: int, family=socket.AF_INET) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect((host, port))
    except ConnectionRefusedError:
        return True
    return False


def client(proc, db: str = "testdb", **kwargs) -> psycopg.Connection:
    return psycopg.connect(proc.dsn(db=db), connect_timeout=CONNECT_TIMEOUT, **kwargs)


def console(proc) -> psycopg.Connection:
    return psycopg.connect(proc.dsn(db="pgbouncer"), connect_timeout=CONNECT_TIMEOUT,
                           autocommit=True)


def show_config(proc) -> dict[str, str]:
    with console(proc) as admin:
        return {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}


def psql_args(proc, host: str, sql: str = "SELECT current_database()") -> subprocess.CompletedProcess:
    return subprocess.run(
        [proc.pg.bindir / "psql", "-X", "-A", "-t", "-w", "-h", host, "-p", str(proc.port),
         "-U", "postgres", "-d", "testdb", "-c", sql],
        env=clean_env(PGCONNECT_TIMEOUT="10"), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=30, check=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- command line ---


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag):
    result = run_cli(flag)
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout
    assert result.stdout.startswith("pgmulti ")


def test_reboot_flag_is_not_supported(tmp_path, base_config):
    config = write_config(tmp_path, base_config())
    result = run_cli("-R", str(config))
    assert result.returncode != 0
    assert "not supported" in result.stderr


def test_missing_config_file(tmp_path):
    result = run_cli(str(tmp_path / "nope.ini"))
    assert result.returncode != 0
    assert "nope.ini" in result.stderr


def test_daemon_without_logfile_is_refused(tmp_path, base_config):
    config = write_config(tmp_path, base_config(pidfile="{tmp}/p.pid"))
    result = run_cli("-d", str(config))
    assert result.returncode != 0
    assert "logfile" in result.stderr


# --- configuration errors ---


@pytest.mark.parametrize("bad_line, problem", [
    ("default_pool_size = lots", "default_pool_size"),
    ("pool_mode = sometimes", "pool_mode"),
    ("listen_port = 99999999999", "listen_port"),
    ("client_login_timeout = -1", "client_login_timeout"),
    ("no_such_setting = 1", "no_such_setting"),
    ("auth_type = kerberos", "auth_type"),
])
def test_bad_setting_reports_file_and_line(tmp_path, base_config, bad_line, problem):
    text = base_config() + bad_line + "\n"
    config = write_config(tmp_path, text)
    result = run_cli(str(config))
    assert result.returncode != 0
    assert f"{config}:{line_of(text, bad_line)}:" in result.stderr, result.stderr
    assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_database_entry_reports_file_and_line(tmp_path, base_config):
    text = base_config(databases={"broken": "host=127.0.0.1 port=notaport"})
    config = write_config(tmp_path, text)
    result = run_cli(str(config))
    assert result.returncode != 0
    assert f"{config}:{line_of(text, 'broken =')}:" in result.stderr, result.stderr


BROKEN_LINE = "broken host=127.0.0.1 user=md5user password=S3cret-in-ini"  # no '='


def test_syntax_error_reports_file_and_line(tmp_path, base_config):
    text = base_config().replace("[databases]\n", f"[databases]\n{BROKEN_LINE}\n")
    config = write_config(tmp_path, text)
    result = run_cli(str(config))
    assert result.returncode != 0
    assert f"{config}:{line_of(text, BROKEN_LINE)}:" in result.stderr, result.stderr
    assert "syntax error" in result.stderr


def test_syntax_error_does_not_echo_the_password(pgmulti, base_config, tmp_path):
    text = base_config().replace("[databases]\n", f"[databases]\n{BROKEN_LINE}\n")
    leaks = []
    proc = pgmulti()
    proc.config_path.write_text(proc.render(text))
    proc.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in proc.log_text(), 5, "the reload error in the log")
    if "S3cret-in-ini" in proc.log_text():
        leaks.append("log, on reload")
    result = run_cli(str(write_config(tmp_path, text)))
    assert result.returncode != 0
    if "S3cret-in-ini" in result.stderr:
        leaks.append("stderr, at start")
    assert leaks == []


def test_error_in_included_file_reports_its_file_and_line(tmp_path, base_config):
    included = tmp_path / "extra.ini"
    included.write_text("; settings\n\nmax_client_conn = many\n")
    config = write_config(tmp_path, base_config() + f"%include {included}\n")
    result = run_cli(str(config))
    assert result.returncode != 0
    assert f"{included}:3:" in result.stderr, result.stderr


def test_unimplemented_pgbouncer_keys_start_with_one_warning(pgmulti, base_config):
    proc = pgmulti(base_config() + "suspend_timeout = 5\ndns_zone_check_period = 30\nsbuf_loopcnt = 3\n")
    assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"
    warnings = [line for line in proc.log_text().splitlines() if " WARNING " in line]
    assert len(warnings) == 1, warnings
    for key in ("suspend_timeout", "dns_zone_check_period", "sbuf_loopcnt"):
        assert key in warnings[0]


def test_no_warning_without_unimplemented_keys(pgmulti):
    proc = pgmulti()
    assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"
    assert " WARNING " not in proc.log_text()


def test_include(pgmulti, base_config, tmp_path, pg):
    included = tmp_path / "included.ini"
    # No section header first: the setting continues the [pgbouncer] section of the includer.
    included.write_text("default_pool_size = 9\n"
                        "[databases]\n"
                        f"included = host=127.0.0.1 port={pg.port} dbname=testdb\n")
    proc = pgmulti(base_config() + f"%include {included}\n")
    assert show_config(proc)["default_pool_size"] == "9"
    result = proc.psql("SELECT current_database()", db="included")
    assert result.stdout.strip() == "testdb", result.stderr


# --- files ---


def test_pidfile_written_and_removed(pgmulti):
    proc = pgmulti({"pidfile": "{tmp}/pgmulti.pid"})
    pidfile = proc.workdir / "pgmulti.pid"
    assert pidfile.read_text().strip() == str(proc.pid)
    proc.signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert not pidfile.exists()


def test_logfile_receives_the_log(pgmulti):
    proc = pgmulti({"logfile": "{tmp}/file.log"})
    logfile = proc.workdir / "file.log"
    assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"
    wait_for(lambda: "login attempt" in logfile.read_text(), 5, "the login in the logfile")
    text = logfile.read_text()
    assert f"pgmulti {__version__} started, pid {proc.pid}" in text
    assert f"listening on 127.0.0.1:{proc.port}" in text


def test_unix_socket_accepts_psql(pgmulti):
    proc = pgmulti()
    socket_path = proc.workdir / f".s.PGSQL.{proc.port}"
    assert socket_path.is_socket()
    result = psql_args(proc, str(proc.workdir))
    assert (result.returncode, result.stdout.strip()) == (0, "testdb"), result.stderr
    proc.signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert not socket_path.exists()


def a_group_to_give() -> grp.struct_group:
    """A group other than ours if we may give files to any (root), else our own."""
    if os.geteuid() == 0:
        others = [g for g in grp.getgrall() if g.gr_gid != os.getegid()]
        if others:
            return others[0]
    return grp.getgrgid(os.getegid())


@pytest.mark.parametrize("workers", [1, 2])
def test_unix_socket_group(pgmulti, workers):
    group = a_group_to_give()
    proc = pgmulti({"unix_socket_group": group.gr_name, "unix_socket_mode": "0770",
                    "workers": workers})
    socket_path = proc.workdir / f".s.PGSQL.{proc.port}"
    assert socket_path.stat().st_gid == group.gr_gid
    assert socket_path.stat().st_mode & 0o777 == 0o770
    result = psql_args(proc, str(proc.workdir))
    assert (result.returncode, result.stdout.strip()) == (0, "testdb"), result.stderr


def test_unknown_unix_socket_group_stops_the_start(pgmulti):
    proc = pgmulti({"unix_socket_group": "no-such-group-here"}, wait=False)
    assert proc.wait(20) != 0
    assert "unix_socket_group: unknown group 'no-such-group-here'" in proc.log_text()


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_listen_on_ipv4_and_ipv6(pgmulti):
    if not ipv6_loopback_available():
        pytest.skip("IPv6 loopback is not available")
    proc = pgmulti({"listen_addr": "127.0.0.1,::1"})
    for host in ("127.0.0.1", "::1"):
        result = psql_args(proc, host, "SELECT host(inet_client_addr()) IS NOT NULL")
        assert (result.returncode, result.stdout.strip()) == (0, "t"), (host, result.stderr)
    log = proc.log_text()
    assert f"listening on 127.0.0.1:{proc.port}" in log
    assert f"listening on ::1:{proc.port}" in log


def test_listen_on_ipv4_only_refuses_ipv6(pgmulti):
    if not ipv6_loopback_available():
        pytest.skip("IPv6 loopback is not available")
    proc = pgmulti()
    assert refuses_connections("::1", proc.port, socket.AF_INET6)


@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_mode(pgmulti, workers):
    proc = pgmulti({"logfile": "{tmp}/daemon.log", "pidfile": "{tmp}/daemon.pid",
                    "workers": workers}, args=("-d",), wait=False)
    pidfile = proc.workdir / "daemon.pid"
    logfile = proc.workdir / "daemon.log"
    assert proc.wait(10) == 0  # the foreground process returns at once
    daemon_pid = None
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the pidfile")
        daemon_pid = int(pidfile.read_text())
        assert daemon_pid != proc.pid and pid_alive(daemon_pid)
        wait_for(lambda: is_listening(proc.port, process_tree(daemon_pid)), 10, "the listener")
        result = proc.psql("SELECT current_database()", db="testdb")
        assert (result.returncode, result.stdout.strip()) == (0, "testdb"), result.stderr
        # Detached: its own session, no controlling terminal, stdio on /dev/null.
        assert os.getsid(daemon_pid) != os.getsid(0)
        assert os.readlink(f"/proc/{daemon_pid}/fd/1") == os.devnull
        assert "started" in logfile.read_text()
        tree = process_tree(daemon_pid)
        assert len(tree) == (1 if workers == 1 else 1 + workers)
        os.kill(daemon_pid, signal.SIGTERM)
        wait_for(lambda: not any(pid_alive(pid) for pid in tree), 10, "the daemon to exit")
        assert not pidfile.exists()
        assert "pgmulti stopped" in logfile.read_text()
    finally:
        if daemon_pid is not None and pid_alive(daemon_pid):
            os.kill(daemon_pid, signal.SIGKILL)


# --- signals ---


def test_sighup_reloads(pgmulti, base_config):
    proc = pgmulti()
    with client(proc, autocommit=True) as conn:
        conn.execute("SELECT 1")
        proc.write_config(base_config(pool_mode="session", default_pool_size=3))
        proc.signal(signal.SIGHUP)
        wait_for(lambda: show_config(proc)["pool_mode"] == "session", 5, "pool_mode = session")
        assert show_config(proc)["default_pool_size"] == "3"
        with console(proc) as admin:
            cur = admin.execute("SHOW POOLS")
            names = [column.name for column in cur.description]
            pools = [dict(zip(names, row)) for row in cur.fetchall()]
        assert [row["pool_mode"] for row in pools if row["database"] == "testdb"] == ["session"]
        assert conn.execute("SELECT 2").fetchone() == (2,)  # the client keeps working
    assert "configuration reloaded" in proc.log_text()


def test_sighup_with_a_broken_config_keeps_the_old_one(pgmulti, base_config):
    proc = pgmulti()
    proc.config_path.write_text(base_config() + "pool_mode = sometimes\n")
    proc.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in proc.log_text(), 5, "the reload error in the log")
    assert show_config(proc)["pool_mode"] == "transaction"
    assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"


def test_sigint_waits_for_the_open_transaction(pgmulti):
    proc = pgmulti()
    conn = client(proc)
    try:
        conn.execute("CREATE TEMP TABLE t (x int)")  # a transaction is open
        proc.signal(signal.SIGINT)
        wait_for(lambda: refuses_connections(proc.host, proc.port), 5, "new connections refused")
        time.sleep(0.5)
        assert proc.popen.poll() is None, "exited with a transaction open"
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
        conn.commit()
        assert proc.wait(5) == 0
    finally:
        conn.close()


def test_sigterm_waits_for_clients_to_leave(pgmulti):
    proc = pgmulti()
    conn = client(proc, autocommit=True)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proc.signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(proc.host, proc.port), 5, "new connections refused")
        time.sleep(0.5)
        assert proc.popen.poll() is None, "exited while a client was connected"
        # The connected client carries on, transactions included.
        assert conn.execute("SELECT 2").fetchone() == (2,)
        with conn.transaction():
            conn.execute("SELECT 3")
    finally:
        conn.close()
    assert proc.wait(5) == 0


def test_second_sigterm_exits_at_once(pgmulti):
    proc = pgmulti()
    conn = client(proc, autocommit=True)
    try:
        conn.execute("SELECT 1")
        proc.signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(proc.host, proc.port), 5, "new connections refused")
        assert proc.popen.poll() is None
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 3
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 2")
    finally:
        conn.close()


def test_sigquit_exits_at_once(pgmulti):
    proc = pgmulti()
    conn = client(proc)
    try:
        conn.execute("SELECT 1")  # a transaction is open
        started = time.monotonic()
        proc.signal(signal.SIGQUIT)
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 3
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 2")
    finally:
        conn.close()


def test_sigusr1_pauses_and_sigusr2_resumes(pgmulti):
    proc = pgmulti()
    with client(proc, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proc.signal(signal.SIGUSR1)
        wait_for(lambda: show_state(proc)["paused"] == "yes", 5, "SHOW STATE paused")
        result: list = []
        worker = threading.Thread(target=lambda: result.append(
            conn.execute("SELECT 2").fetchone()))
        worker.start()
        worker.join(0.7)
        assert worker.is_alive(), "a query ran while the pooler was paused"
        proc.signal(signal.SIGUSR2)
        worker.join(5)
        assert result == [(2,)]
        assert show_state(proc)["paused"] == "no"


def show_state(proc) -> dict[str, str]:
    with console(proc) as admin:
        return {row[0]: row[1] for row in admin.execute("SHOW STATE").fetchall()}


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.parametrize("workers", [1, 2])
def test_dash_u_switches_to_the_given_user(pgmulti, workers):
    proc = pgmulti({"workers": workers}, args=("-u", "postgres"))
    for pid in process_tree(proc.pid):  # the parent and every worker
        uid = {line.split(":")[0]: line.split()[1] for line in
               Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid")}
        assert int(uid["Uid"]) == pwd.getpwnam("postgres").pw_uid
    for _ in range(4):  # whichever worker answers
        assert proc.psql("SELECT 1", db="testdb").stdout.strip() == "1"
    with console(proc) as admin:  # the workers reach each other's control sockets
        assert admin.execute("SHOW POOLS").fetchall()


@pytest.mark.parametrize("workers", [1, 2])
def test_so_reuseport_rolling_restart_loses_no_transaction(pgmulti, pg, workers):
    """A new pgmulti on the same port, then SIGTERM to the old one: the old one serves its
    clients to the end, new connections reach the new one, no transaction fails.

    (Connections that are in the old listener's accept queue at the very moment it closes
    are reset by Linux unless net.ipv4.tcp_migrate_req = 1, so pgbench keeps its
    connections here rather than reconnecting per transaction.)"""
    old = pgmulti({"so_reuseport": 1, "workers": workers})
    new = pgmulti({"so_reuseport": 1, "workers": workers}, port=old.port)  # both listen on one port
    env = clean_env()
    init = subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p",
                           str(pg.port), "-U", "postgres", "testdb"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert init.returncode == 0, init.stderr
    bench = subprocess.Popen(["pgbench", "-T", "4", "-c", "8", "-j", "2", "-S", "-h",
                              "127.0.0.1", "-p", str(old.port), "-U", "postgres", "testdb"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.5)
    old.signal(signal.SIGTERM)  # stop listening, finish with its clients, exit
    wait_for(lambda: "shutting down" in old.log_text(), 5, "the old process to stop listening")
    time.sleep(0.2)  # the listener closes right after that line is logged
    for _ in range(5):  # every new connection now reaches the new process
        assert old.psql("SELECT 1", db="testdb").stdout.strip() == "1"
    out, err = bench.communicate(timeout=30)
    assert bench.returncode == 0, out + err
    assert "number of failed transactions: 0" in out, out
    assert old.wait(10) == 0
    assert new.log_text().count("login attempt") >= 5
