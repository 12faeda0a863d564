"""Admin console commands beyond the basics: SET, KILL_CLIENT, WAIT_CLOSE, SUSPEND."""

from __future__ import annotations

import signal
import threading
import time

import psycopg
import pytest

from pgmulti import admin_columns as ref
from support import Raw, client_port, error_fields, parse_messages, wait_for

CONNECT_TIMEOUT = 10


def console(proxy, user: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user=user, db="pgbouncer"), autocommit=True,
                           connect_timeout=CONNECT_TIMEOUT)


def connect(proxy, db: str = "testdb", **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(db=db), connect_timeout=CONNECT_TIMEOUT, **kwargs)


def show_dicts(conn: psycopg.Connection, what: str) -> list[dict]:
    cursor = conn.execute(f"SHOW {what}")
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def config_value(conn: psycopg.Connection, key: str) -> str:
    return {row["key"]: row["value"] for row in show_dicts(conn, "config")}[key]


def failure(conn: psycopg.Connection, command: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(command)
    return info.value


def answer(conn: psycopg.Connection, command: str):
    """(sqlstate, message) of a refused command, or ("ok", command tag)."""
    try:
        return "ok", conn.execute(command).statusmessage
    except psycopg.Error as exc:
        return exc.sqlstate, exc.diag.message_primary


def servers_of_testdb(admin: psycopg.Connection) -> list[dict]:
    return [row for row in show_dicts(admin, "servers") if row["database"] == "testdb"]


def pool_of_testdb(admin: psycopg.Connection) -> dict:
    (pool,) = [row for row in show_dicts(admin, "pools") if row["database"] == "testdb"]
    return pool


SET_FAILED = ("08P01", "SET failed")


@pytest.fixture
def proxy(pgmulti):
    return pgmulti()


# --- SET ---


def test_set_default_pool_size_resizes_the_pools(proxy):
    """SET default_pool_size shows in SHOW CONFIG and DATABASES and bounds the pool at once;
    raising it gives a client waiting on the full pool its server."""
    clients = [connect(proxy) for _ in range(3)]
    try:
        with console(proxy) as admin:
            assert admin.execute("SET default_pool_size = 2").statusmessage == \
                "SET default_pool_size=2"
            assert config_value(admin, "default_pool_size") == "2"
            databases = {row["name"]: row for row in show_dicts(admin, "databases")}
            assert databases["testdb"]["pool_size"] == 2
            for client in clients[:2]:
                client.execute("SELECT 1")  # a transaction stays open: the server is taken
            third = threading.Thread(target=lambda: clients[2].execute("SELECT 3"))
            third.start()
            try:
                wait_for(lambda: pool_of_testdb(admin)["cl_waiting"] == 1, 5, "a waiting client")
                assert len(servers_of_testdb(admin)) == 2
                admin.execute("SET default_pool_size = 3")
                third.join(5)
                assert not third.is_alive(), "the waiting client got no server"
            finally:
                third.join(5)
            assert len(servers_of_testdb(admin)) == 3
    finally:
        for client in clients:
            client.close()


def test_reload_rereads_the_file_after_set(proxy):
    """PgBouncer: the file wins at the next RELOAD."""
    with console(proxy) as admin:
        admin.execute("SET default_pool_size = 9")
        assert config_value(admin, "default_pool_size") == "9"
        admin.execute("RELOAD")
        assert config_value(admin, "default_pool_size") == "5"


def test_set_value_forms(proxy):
    """Quoted strings, double-quoted words, TO instead of =, a trailing semicolon."""
    with console(proxy) as admin:
        assert admin.execute("SET server_check_query = 'select ''x'''").statusmessage == \
            "SET server_check_query=select 'x'"
        assert config_value(admin, "server_check_query") == "select 'x'"
        assert admin.execute('set "log_connections" TO 0;').statusmessage == \
            "SET log_connections=0"
        assert config_value(admin, "log_connections") == "0"
        admin.execute("SET stats_period = '0x1e'")  # the loader's base-0 integers
        assert config_value(admin, "stats_period") == "30"
        admin.execute("SET server_idle_timeout = '2.5'")
        assert config_value(admin, "server_idle_timeout") == "2.5"


def test_set_pool_mode_changes_new_pools_and_old(proxy):
    with console(proxy) as admin, connect(proxy, autocommit=True) as client:
        client.execute("SELECT 1")
        assert pool_of_testdb(admin)["pool_mode"] == "transaction"
        admin.execute("SET pool_mode = session")
        assert pool_of_testdb(admin)["pool_mode"] == "session"
        client.execute("SELECT 1")
        # Session pooling: the client keeps its server after the statement.
        assert [row["state"] for row in servers_of_testdb(admin)] == ["active"]


def test_set_admin_users_takes_effect(proxy):
    with console(proxy) as admin:
        admin.execute("SET admin_users = 'postgres,stats'")
        with console(proxy, "stats") as stats:
            assert answer(stats, "RECONNECT") == ("ok", "RECONNECT")
        admin.execute("SET admin_users = postgres")
        with console(proxy, "stats") as stats:
            assert answer(stats, "RECONNECT") == ("08P01", "admin access needed")


def test_set_refusals(proxy):
    with console(proxy) as admin:
        for command, detail in [
            ("SET no_such_key = 1", "unknown parameter: no_such_key"),
            ("SET DEFAULT_POOL_SIZE = 3", "unknown parameter: DEFAULT_POOL_SIZE"),
            ("SET default_pool_size = abc", "invalid integer"),
            ("SET default_pool_size = '99999999999'", "out of range"),
            ("SET pool_mode = bogus", "expected one of: session, transaction, statement"),
            ("SET server_idle_timeout = '-1'", "must not be negative"),
            ("SET auth_type = ldap", "not supported"),
            ("SET listen_port = 7777", "cannot be changed while running"),
            ("SET unix_socket_dir = '/tmp'", "cannot be changed while running"),
            ("SET logfile = '/nonexistent/dir/pgmulti.log'", "cannot open the log file"),
            ("SET auth_query = 'a\nb'", "one line"),
        ]:
            error = failure(admin, command)
            assert (error.sqlstate, error.diag.message_primary) == SET_FAILED, command
            assert detail in (error.diag.message_detail or ""), (command, error.diag.message_detail)
        # Nothing changed, and the console still answers.
        config = {row["key"]: row["value"] for row in show_dicts(admin, "config")}
        assert (config["default_pool_size"], config["pool_mode"], config["listen_port"]) == \
            ("5", "transaction", str(proxy.port))
        assert (config["auth_type"], config["logfile"]) == ("trust", "")
        # PgBouncer's size limits and grammar.
        assert answer(admin, "SET auth_query = '" + "x" * 300 + "'") == \
            ("08P01", "bad arguments")
        assert answer(admin, 'SET "" = 1') == ("08P01", "bad arguments")
        for command in ("SET default_pool_size = -1", "SET default_pool_size", "SET = 1"):
            assert answer(admin, command) == \
                ("08P01", ref.ADMIN_ERRORS["invalid_command"][0] % command)
    with console(proxy, "stats") as stats:
        assert answer(stats, "SET default_pool_size = 3") == ("08P01", "admin access needed")


def test_set_fake_parameters_are_ignored(proxy):
    """What drivers send on connect (SET client_encoding ...) is answered NOTICE "SET
    ignored", for stats users too."""
    for user in ("postgres", "stats"):
        notices = []
        with console(proxy, user) as admin:
            admin.add_notice_handler(lambda diag: notices.append(
                (diag.severity, diag.message_primary)))
            assert admin.execute("SET client_encoding = 'UTF8'").statusmessage == "SET"
        assert notices == [("NOTICE", "SET ignored")]


def test_set_tls_that_cannot_apply_keeps_the_old_tls(proxy):
    """PgBouncer: the value is taken, a NOTICE says the TLS setup stays as it was."""
    notices = []
    with console(proxy) as admin:
        admin.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        # require without a certificate cannot be set up.
        assert admin.execute("SET client_tls_sslmode = require").statusmessage == \
            "SET client_tls_sslmode=require"
        assert notices == ["TLS settings could not be applied, still using old configuration"]
        assert config_value(admin, "client_tls_sslmode") == "require"
    with connect(proxy, sslmode="disable") as client:  # still plain text, as before
        assert client.execute("SELECT 1").fetchone() == (1,)


def test_set_logfile_and_verbose_apply_at_once(proxy):
    new_log = proxy.workdir / "new.log"
    with console(proxy) as admin:
        admin.execute(f"SET logfile = '{new_log}'")
        admin.execute("SET verbose = 1")
        with connect(proxy) as client:
            client.execute("SELECT 1")
        admin.execute("SHOW VERSION")  # logged only with verbose
        text = wait_for(lambda: new_log.exists() and "admin query: SHOW VERSION" in
                        new_log.read_text() and new_log.read_text(), 5, "lines in the new log")
        assert "login attempt" in text and "DEBUG" in text
        assert "DEBUG" in proxy.log_text()  # stderr stays a destination (no -q given)
        admin.execute("SET logfile = ''")


@pytest.mark.parametrize("before, change", [
    ({"max_prepared_statements": 0}, "SET max_prepared_statements = 100"),
    ({"pool_mode": "session"}, "SET pool_mode = transaction"),
])
def test_set_that_turns_statement_mapping_on(pgmulti, before, change):
    """Servers opened without prepared-statement mapping must not serve with it: they close
    as they come back, and clients using prepared statements go on working."""
    proxy = pgmulti(before)
    with console(proxy) as admin:
        with connect(proxy, autocommit=True) as early:
            early.execute("SELECT 1")  # a server opened under the old setting
            admin.execute(change)
            assert early.execute("SELECT 2").fetchone() == (2,)
        for _ in range(2):
            with connect(proxy, autocommit=True) as client:
                for i in range(3):
                    assert client.execute("SELECT %s::int", [i], prepare=True).fetchone() == (i,)


# --- KILL_CLIENT ---


def test_kill_client_closes_exactly_that_client(proxy):
    # The victim speaks the protocol by hand: what it receives before the close is checked
    # whole (libpq may report only the closed socket, depending on when it reads).
    with console(proxy) as admin, Raw(proxy) as victim, connect(proxy) as other:
        victim.login()
        # In a transaction: its server must be closed, not reused.
        assert victim.simple_query("BEGIN; SELECT 1")[-1] == (b"Z", b"T")
        other.execute("SELECT 2")
        other.commit()
        clients = {row["port"]: row for row in show_dicts(admin, "clients")}
        victim_id = clients[victim.sock.getsockname()[1]]["id"]
        servers_before = len(servers_of_testdb(admin))
        assert admin.execute(f"KILL_CLIENT {victim_id}").statusmessage == "KILL_CLIENT"
        received = parse_messages(victim.read_until_closed())
        errors = [error_fields(body) for msg_type, body in received if msg_type == b"E"]
        assert [(e["S"], e["M"]) for e in errors] == [("FATAL", "admin forced disconnect")]
        assert other.execute("SELECT 3").fetchone() == (3,)
        ids = [row["id"] for row in show_dicts(admin, "clients")]
        assert victim_id not in ids and clients[client_port(other)]["id"] in ids
        # The victim's server was inside a transaction: closed rather than given back.
        wait_for(lambda: len(servers_of_testdb(admin)) == servers_before - 1, 5,
                 "the victim's server to close")
        assert answer(admin, f"KILL_CLIENT {victim_id}") == ("08P01", "client not found")


def test_kill_client_errors(proxy):
    with console(proxy) as admin:
        assert answer(admin, "KILL_CLIENT abc") == ("08P01", "invalid client pointer supplied")
        assert answer(admin, "KILL_CLIENT") == ("08P01", "invalid client pointer supplied")
        assert answer(admin, "KILL_CLIENT 987654321") == ("08P01", "client not found")
    with console(proxy, "stats") as stats:
        own_id = show_dicts(stats, "clients")[0]["id"]
        assert answer(stats, f"KILL_CLIENT {own_id}") == ("08P01", "admin access needed")


def test_kill_client_can_end_another_console(proxy):
    with console(proxy) as admin, console(proxy, "stats") as stats:
        (row,) = [row for row in show_dicts(admin, "clients") if row["user"] == "stats"]
        admin.execute(f"KILL_CLIENT {row['id']}")
        with pytest.raises(psycopg.OperationalError):
            stats.execute("SHOW VERSION")


# --- WAIT_CLOSE ---


def test_wait_close_answers_once_reconnected_servers_closed(proxy):
    with console(proxy) as admin, connect(proxy) as client:
        client.execute("SELECT 1")  # transaction open: the server cannot close yet
        assert admin.execute("WAIT_CLOSE testdb").statusmessage == "WAIT_CLOSE"  # none marked
        admin.execute("RECONNECT testdb")
        assert [row["close_needed"] for row in servers_of_testdb(admin)] == [1]
        answered: list = []
        waiter = threading.Thread(target=lambda: answered.append(
            admin.execute("WAIT_CLOSE testdb").statusmessage))
        waiter.start()
        try:
            time.sleep(0.5)
            assert waiter.is_alive() and not answered, "WAIT_CLOSE answered too early"
            client.commit()  # the server comes back, is closed, WAIT_CLOSE answers
        finally:
            waiter.join(5)
        assert answered == ["WAIT_CLOSE"]
        assert servers_of_testdb(admin) == []
        assert client.execute("SELECT 2").fetchone() == (2,)  # a fresh server
        assert [row["close_needed"] for row in servers_of_testdb(admin)] == [0]


def test_wait_close_for_all_databases(proxy):
    with console(proxy) as admin, connect(proxy) as client:
        client.execute("SELECT 1")
        admin.execute("RECONNECT")
        answered: list = []
        waiter = threading.Thread(target=lambda: answered.append(
            admin.execute("WAIT_CLOSE").statusmessage))
        waiter.start()
        try:
            time.sleep(0.3)
            assert not answered
            client.rollback()
        finally:
            waiter.join(5)
        assert answered == ["WAIT_CLOSE"]


def test_wait_close_after_reload_of_a_changed_database(proxy, base_config):
    """RELOAD with a new connection string for testdb marks its busy server too."""
    with console(proxy) as admin, connect(proxy) as client:
        client.execute("SELECT 1")
        proxy.write_config(base_config(databases={
            "testdb": "host=127.0.0.1 port={pg_port} dbname=testdb application_name=moved"}))
        admin.execute("RELOAD")
        assert [row["close_needed"] for row in servers_of_testdb(admin)] == [1]
        answered: list = []
        waiter = threading.Thread(target=lambda: answered.append(
            admin.execute("WAIT_CLOSE testdb").statusmessage))
        waiter.start()
        try:
            time.sleep(0.3)
            assert not answered
            client.commit()
        finally:
            waiter.join(5)
        assert answered == ["WAIT_CLOSE"]


def test_reload_of_a_changed_database_reaches_the_new_destination(proxy, base_config):
    with console(proxy) as admin, connect(proxy, autocommit=True) as client:
        assert client.execute("SELECT current_database()").fetchone() == ("testdb",)
        proxy.write_config(base_config(databases={
            "testdb": "host=127.0.0.1 port={pg_port} dbname=postgres"}))
        admin.execute("RELOAD")
        assert client.execute("SELECT current_database()").fetchone() == ("postgres",)


def test_wait_close_errors(proxy):
    with console(proxy) as admin:
        assert answer(admin, "WAIT_CLOSE pgbouncer") == \
            ("08P01", "cannot wait in admin db: pgbouncer")
        assert answer(admin, "WAIT_CLOSE nosuch") == ("08P01", "no such database: nosuch")
    with console(proxy, "stats") as stats:
        assert answer(stats, "WAIT_CLOSE") == ("08P01", "admin access needed")


# --- SUSPEND ---


def test_suspend_explains_the_rolling_restart(proxy):
    with console(proxy) as admin:
        error = failure(admin, "SUSPEND")
        assert error.sqlstate == "0A000"
        assert "online restart" in error.diag.message_primary
        assert "so_reuseport" in error.diag.message_hint
        assert answer(admin, "SUSPEND now") == \
            ("08P01", ref.ADMIN_ERRORS["invalid_command"][0] % "SUSPEND now")
        assert show_dicts(admin, "state")[0] == {"key": "active", "value": "yes"}
    with console(proxy, "stats") as stats:
        assert answer(stats, "SUSPEND") == ("08P01", "admin access needed")


# --- several workers ---


def test_set_and_kill_client_reach_every_worker(pgmulti, base_config):
    proxy = pgmulti(base_config(workers=2))
    with console(proxy) as admin:
        admin.execute("SET default_pool_size = 7")
    # Each console connection lands on some worker; SHOW CONFIG answers from that one.
    for _ in range(6):
        with console(proxy) as admin:
            assert config_value(admin, "default_pool_size") == "7"
    clients = [connect(proxy, autocommit=True) for _ in range(4)]
    try:
        with console(proxy) as admin:
            ids = [row["id"] for row in show_dicts(admin, "clients")
                   if row["database"] == "testdb"]
            assert len(ids) == 4
            for client_id in ids:  # in whichever worker owns it
                assert admin.execute(f"KILL_CLIENT {client_id}").statusmessage == "KILL_CLIENT"
            wait_for(lambda: not [row for row in show_dicts(admin, "clients")
                                  if row["database"] == "testdb"], 5, "every client closed")
    finally:
        for client in clients:
            client.close()


def test_reload_switching_prepared_statements_on_keeps_clients_working(pgmulti, base_config):
    """Servers opened without statement mapping must not serve once it is on (and back)."""
    proxy = pgmulti(base_config(max_prepared_statements=0))
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=10, autocommit=True) as conn:
        conn.execute("SELECT 1")
    for reloads, limit in enumerate((100, 0, 100), start=1):
        proxy.write_config(base_config(max_prepared_statements=limit))
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while proxy.log_text().count("configuration reloaded") < reloads:
            assert time.monotonic() < deadline, "no reload in the log"
            time.sleep(0.05)
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=10, autocommit=True) as conn:
            for _ in range(3):
                assert conn.execute("SELECT %s::int", [limit], prepare=True).fetchone() == (limit,)
