"""The admin console (virtual database `pgbouncer`), also side by side with PgBouncer 1.18."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgmulti import admin_columns as ref
from pgmulti.cluster import (
    clean_env,
    find_free_port,
    give_to_server_user,
    server_user_popen_kwargs,
    stop_process,
    wait_until_listening,
)
from support import wait_for

CONNECT_TIMEOUT = 10
PGBOUNCER = "/usr/sbin/pgbouncer"

# The SHOW commands the console must answer, with their column lists in admin_columns.COLUMNS.
SHOW_COMMANDS = ["pools", "stats", "clients", "servers", "databases", "config", "version",
                 "lists", "users", "totals", "stats_totals", "stats_averages", "state", "mem",
                 "sockets"]

# 1.18 columns that a later release renamed (1.18 name -> 1.25 name).
RENAMED_SINCE_1_18 = {("databases", "reserve_pool"): "reserve_pool_size"}


# --- helpers ---


def console(proc_or_port, user: str = "postgres", **kwargs) -> psycopg.Connection:
    port = proc_or_port if isinstance(proc_or_port, int) else proc_or_port.port
    return psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="pgbouncer",
                           autocommit=True, connect_timeout=CONNECT_TIMEOUT, **kwargs)


def show(conn: psycopg.Connection, what: str):
    """(column names, type OIDs, rows) of SHOW <what>; names None when no RowDescription."""
    cur = conn.execute(f"SHOW {what}")
    if cur.description is None:
        return None, None, []
    names = [column.name for column in cur.description]
    oids = [column.type_code for column in cur.description]
    return names, oids, cur.fetchall()


def show_dicts(conn: psycopg.Connection, what: str) -> list[dict]:
    names, _, rows = show(conn, what)
    return [dict(zip(names, row)) for row in rows]


def config_value(conn: psycopg.Connection, key: str) -> str:
    return {row["key"]: row["value"] for row in show_dicts(conn, "config")}[key]


def names_of(columns) -> list[str]:
    return [name for name, _ in columns]


def oids_of(columns) -> list[int]:
    return [ref.TYPE_OIDS[kind] for _, kind in columns]


def is_subsequence(short: list[str], long: list[str]) -> bool:
    rest = iter(long)
    return all(name in rest for name in short)


def admin_error(conn: psycopg.Connection, command: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(command)
    return info.value


def login_error(port: int, user: str, db: str = "pgbouncer"):
    async def attempt():
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, database=db,
                                         ssl=False, timeout=CONNECT_TIMEOUT)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, exc.args[0] if exc.args else str(exc)
        await conn.close()
        return None

    return asyncio.run(asyncio.wait_for(attempt(), CONNECT_TIMEOUT + 5))


@pytest.fixture
def proxy(pgmulti, base_config):
    # A [users] entry so SHOW USERS has a row.
    return pgmulti(base_config() + "\n[users]\nmd5user = pool_mode=session\n")


@pytest.fixture
def busy(proxy):
    """A client in a transaction on testdb: pools, clients and servers all have rows."""
    conn = psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT)
    conn.execute("SELECT 1")
    yield conn
    conn.close()


# --- SHOW ---


@pytest.mark.parametrize("user", ["postgres", "stats"])
def test_show_columns(proxy, busy, user):
    with console(proxy, user) as admin:
        for what in SHOW_COMMANDS:
            names, oids, rows = show(admin, what)
            assert names == names_of(ref.COLUMNS[what]), what
            assert oids == oids_of(ref.COLUMNS[what]), what
            assert rows, f"SHOW {what.upper()} returned no rows"
            assert all(len(row) == len(names) for row in rows), what


def show_help(port: int):
    """(column names, rows, notice texts) of SHOW HELP."""
    notices = []
    with console(port) as admin:
        # A Diagnostic is only valid during the callback.
        admin.add_notice_handler(lambda diag: notices.append((diag.severity, diag.message_primary)))
        names, _, rows = show(admin, "help")
    return names, rows, notices


def test_show_help(proxy):
    assert ref.COLUMNS["help"] == ()
    assert show_help(proxy.port) == (None, [], [("NOTICE", "Console usage")])


def test_show_values(proxy, busy):
    with console(proxy) as admin:
        pools = {(row["database"], row["user"]): row for row in show_dicts(admin, "pools")}
        testdb = pools[("testdb", "postgres")]
        assert (testdb["cl_active"], testdb["sv_active"], testdb["pool_mode"]) == \
            (1, 1, "transaction")
        clients = [row for row in show_dicts(admin, "clients") if row["database"] == "testdb"]
        assert [(row["type"], row["user"], row["state"]) for row in clients] == \
            [("C", "postgres", "active")]
        servers = [row for row in show_dicts(admin, "servers") if row["database"] == "testdb"]
        assert [(row["type"], row["state"], row["link"]) for row in servers] == \
            [("S", "active", clients[0]["ptr"])]
        databases = {row["name"]: row for row in show_dicts(admin, "databases")}
        assert {"testdb", "postgres", "pgbouncer"} <= set(databases)
        assert databases["testdb"]["pool_size"] == 5
        lists = [row["list"] for row in show_dicts(admin, "lists")]
        assert lists == list(ref.LISTS_ROWS)
        totals = [row["name"] for row in show_dicts(admin, "totals")]
        assert totals == list(ref.TOTALS_ROWS)
        assert [row["key"] for row in show_dicts(admin, "state")] == list(ref.STATE_ROWS)
        assert [row["key"] for row in show_dicts(admin, "config")] == \
            [key for key, _, _ in ref.CONFIG_KEYS]
        assert config_value(admin, "default_pool_size") == "5"
        (version,), = show(admin, "version")[2]
        assert version.startswith("PgBouncer ")
        users = {row["name"]: row for row in show_dicts(admin, "users")}
        assert users["md5user"]["pool_mode"] == "session"


def test_stats_counters_move(proxy):
    def testdb_stats(admin):
        return {row["database"]: row for row in show_dicts(admin, "stats")}["testdb"]

    with console(proxy) as admin, psycopg.connect(
            proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT, autocommit=True) as client:
        client.execute("SELECT 1")
        before = testdb_stats(admin)
        for i in range(5):
            client.execute("SELECT %s::int", [i])
        with client.transaction():
            client.execute("SELECT 1")
            client.execute("SELECT 2")
        after = testdb_stats(admin)
    assert after["total_xact_count"] - before["total_xact_count"] >= 6
    assert after["total_query_count"] - before["total_query_count"] >= 8
    for counter in ("total_server_assignment_count", "total_received", "total_sent",
                    "total_xact_time", "total_query_time"):
        assert after[counter] > before[counter], counter


def test_show_pools_lists_the_admin_pool(proxy):
    with console(proxy) as admin:
        pools = {(row["database"], row["user"]): row for row in show_dicts(admin, "pools")}
    assert pools[("pgbouncer", "pgbouncer")]["pool_mode"] == "statement"
    assert pools[("pgbouncer", "pgbouncer")]["cl_active"] == 1


def test_show_databases_nulls(proxy):
    with console(proxy) as admin:
        databases = {row["name"]: row for row in show_dicts(admin, "databases")}
    assert (databases["testdb"]["force_user"], databases["testdb"]["pool_mode"]) == (None, None)
    assert databases["pgbouncer"]["host"] is None


# --- commands ---


def test_pause_and_resume(proxy):
    with console(proxy) as admin, psycopg.connect(
            proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT, autocommit=True) as client:
        assert client.execute("SELECT 1").fetchone() == (1,)
        assert admin.execute("PAUSE").statusmessage == "PAUSE"
        assert show_dicts(admin, "state")[1] == {"key": "paused", "value": "yes"}
        result: list = []
        worker = threading.Thread(
            target=lambda: result.append(client.execute("SELECT 42").fetchone()[0]))
        worker.start()
        try:
            wait_for(lambda: any(row["database"] == "testdb" and row["cl_waiting"] == 1
                                 for row in show_dicts(admin, "pools")), 5, "a waiting client")
            time.sleep(0.3)
            assert worker.is_alive() and result == []
            assert admin.execute("RESUME").statusmessage == "RESUME"
        finally:
            worker.join(5)
        assert result == [42]
        assert show_dicts(admin, "state")[0] == {"key": "active", "value": "yes"}


def test_pause_disconnects_servers(proxy):
    def testdb_servers(admin):
        return [row for row in show_dicts(admin, "servers") if row["database"] == "testdb"]

    with console(proxy) as admin, psycopg.connect(
            proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT, autocommit=True) as client:
        client.execute("SELECT 1")
        assert len(testdb_servers(admin)) == 1
        admin.execute("PAUSE")
        worker = threading.Thread(target=lambda: client.execute("SELECT 1"))
        worker.start()
        try:
            time.sleep(1.0)  # a few janitor ticks with a client waiting
            servers = testdb_servers(admin)
        finally:
            admin.execute("RESUME")
            worker.join(5)
        assert servers == []


def test_pause_waits_for_a_transaction_to_end(proxy):
    with console(proxy) as admin, psycopg.connect(
            proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT) as client:
        client.execute("SELECT 1")  # transaction open: the server is in use
        answered: list = []
        worker = threading.Thread(target=lambda: answered.append(admin.execute("PAUSE")))
        worker.start()
        try:
            time.sleep(0.5)
            assert worker.is_alive(), "PAUSE answered while a server was still in use"
            client.commit()
        finally:
            worker.join(5)
        assert len(answered) == 1 and answered[0].statusmessage == "PAUSE"
        admin.execute("RESUME")


def test_reload_picks_up_changes(proxy, base_config):
    with console(proxy) as admin:
        assert config_value(admin, "default_pool_size") == "5"
        proxy.write_config(base_config(default_pool_size=7, databases={
            "newdb": "host=127.0.0.1 port={pg_port} dbname=testdb"}))
        assert admin.execute("RELOAD").statusmessage == "RELOAD"
        assert config_value(admin, "default_pool_size") == "7"
        databases = {row["name"]: row for row in show_dicts(admin, "databases")}
        assert "newdb" in databases and databases["newdb"]["pool_size"] == 7
    with psycopg.connect(proxy.dsn(db="newdb"), connect_timeout=CONNECT_TIMEOUT) as client:
        assert client.execute("SELECT current_database()").fetchone() == ("testdb",)


def test_shutdown_ends_the_process(proxy):
    admin = console(proxy)
    with pytest.raises(psycopg.OperationalError):
        admin.execute("SHUTDOWN")
    admin.close()
    assert proxy.wait(5) == 0


def test_stats_user_is_refused_admin_commands(proxy):
    with console(proxy, "stats") as stats:
        assert show(stats, "pools")[0] == names_of(ref.COLUMNS["pools"])
        for command in ("PAUSE", "RESUME", "RELOAD", "SHUTDOWN", "KILL testdb",
                        "DISABLE testdb", "RECONNECT"):
            error = admin_error(stats, command)
            assert (error.sqlstate, error.diag.message_primary) == \
                ("08P01", "admin access needed"), command
    assert login_error(proxy.port, "postgres", "testdb") is None  # still running, not paused


def test_auth_type_any_gives_admin_rights_only_to_admin_users(pgmulti):
    proc = pgmulti({"auth_type": "any"})
    with console(proc, "postgres") as admin:
        assert admin.execute("PAUSE").statusmessage == "PAUSE"
        assert admin.execute("RESUME").statusmessage == "RESUME"
    refused = {}
    for user in ("stats", "md5user", "no_such_user"):
        with console(proc, user) as other:
            assert show(other, "version")[2]
            try:
                refused[user] = other.execute("PAUSE").statusmessage
                other.execute("RESUME")
            except psycopg.Error as exc:
                refused[user] = (exc.sqlstate, exc.diag.message_primary)
    assert refused == dict.fromkeys(refused, ("08P01", "admin access needed"))


def test_non_admin_user_cannot_log_in_to_console(proxy):
    for user in ("md5user", "plainuser"):
        with pytest.raises(psycopg.OperationalError, match="not allowed"):
            console(proxy, user)
        error = login_error(proxy.port, user)
        assert error is not None and error[1] == "not allowed"


def test_non_admin_console_refusal_sqlstate(proxy):
    message, sqlstate, _ = ref.ADMIN_ERRORS["not_allowed"]
    assert login_error(proxy.port, "md5user") == (sqlstate, message)


def test_extended_protocol_on_console_fails(proxy):
    with console(proxy) as admin:
        with pytest.raises(psycopg.Error) as info:
            admin.execute("SHOW %s", ["POOLS"])
        assert info.value.sqlstate == "08P01"
    with console(proxy) as admin:  # the console itself keeps working
        assert show(admin, "version")[2]


def test_extended_protocol_on_console_message(proxy):
    message, sqlstate, severity = ref.ADMIN_ERRORS["extended_protocol"]
    with console(proxy) as admin:
        with pytest.raises(psycopg.Error) as info:
            admin.execute("SHOW %s", ["POOLS"])
    diag = info.value.diag
    assert (diag.severity, diag.sqlstate, diag.message_primary) == (severity, sqlstate, message)


def test_invalid_command(proxy):
    with console(proxy) as admin:
        for command in ("FOO", "SHOW NOSUCHTHING", "SELECT 1", "SHOW POOLS extra", "SHOW"):
            error = admin_error(admin, command)
            assert (error.sqlstate, error.diag.message_primary) == \
                ("08P01", f"invalid command '{command}', use SHOW HELP;"), command
        assert show(admin, "version")[2]  # the connection stays usable


# Console commands with argument errors; the expected answers are PgBouncer's
# (checked against the 1.18 binary by test_pgbouncer_1_18_console_answers, and the same in
# 1.25 according to admin_columns.ADMIN_ERRORS).
def _invalid(command: str) -> tuple[str, str]:
    return ("08P01", ref.ADMIN_ERRORS["invalid_command"][0] % command)


MISPARSED_COMMANDS = [
    pytest.param("PAUSE a b c d", _invalid("PAUSE a b c d")),
    pytest.param("RELOAD x", _invalid("RELOAD x")),
    pytest.param("SHUTDOWN foo", _invalid("SHUTDOWN foo")),
    pytest.param("", _invalid("")),
    pytest.param("RESUME testdb", ("08P01", ref.ADMIN_ERRORS["database_not_paused"][0] % "testdb")),
]


@pytest.mark.parametrize("command, expected", MISPARSED_COMMANDS)
def test_console_command_errors_like_pgbouncer(proxy, command, expected):
    with console(proxy) as admin:
        error = admin_error(admin, command)
        assert (error.sqlstate, error.diag.message_primary) == expected


# --- side by side with PgBouncer 1.18 ---


@pytest.fixture
def pgbouncer_1_18(pg):
    """PgBouncer 1.18 in the foreground as the postgres OS user, in front of the same cluster."""
    if not Path(PGBOUNCER).exists():
        pytest.skip("PgBouncer is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-1.18-"))
    give_to_server_user(workdir)
    port = find_free_port()
    (workdir / "userlist.txt").write_text('"postgres" ""\n"stats" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"testdb = host=127.0.0.1 port={pg.port} dbname=testdb\n"
        "[users]\n"
        "md5user = pool_mode=session\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir}/userlist.txt\n"
        "admin_users = postgres\nstats_users = stats\npool_mode = transaction\n"
        "default_pool_size = 5\n")
    for path in workdir.iterdir():
        give_to_server_user(path)
    log = open(workdir / "pgbouncer.log", "wb")
    process = subprocess.Popen([PGBOUNCER, str(workdir / "pgbouncer.ini")], cwd=workdir,
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               env=clean_env(), start_new_session=True,
                               **server_user_popen_kwargs())
    try:
        wait_until_listening(process, port, 15)
        yield port
    finally:
        stop_process(process, 5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def expected_1_18_columns(what: str) -> list[str]:
    """PgBouncer 1.18's columns of SHOW <what>, under their 1.25 names."""
    return [RENAMED_SINCE_1_18.get((what, name), name) for name in names_of(ref.COLUMNS_1_18[what])]


def test_reference_column_lists_are_consistent():
    """1.25 only renames (RENAMED_SINCE_1_18) and inserts columns; it never drops or reorders."""
    for what in ref.COLUMNS_1_18:
        old = expected_1_18_columns(what)
        new = names_of(ref.COLUMNS[what])
        assert is_subsequence(old, new), what
    for what, name in RENAMED_SINCE_1_18:
        assert name in names_of(ref.COLUMNS_1_18[what])
        assert name not in names_of(ref.COLUMNS[what])


def test_side_by_side_with_pgbouncer_1_18(proxy, pgbouncer_1_18):
    clients = [psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="testdb",
                               connect_timeout=CONNECT_TIMEOUT)
               for port in (proxy.port, pgbouncer_1_18)]
    try:
        for client in clients:
            client.execute("SELECT 1")  # both have a pool, a client and a server
        with console(proxy) as ours, console(pgbouncer_1_18) as theirs:
            compared = []
            for what in ref.COLUMNS_1_18:
                if what == "help":
                    continue  # no result set at all in PgBouncer: see test_show_help
                try:
                    their_names, their_oids, _ = show(theirs, what)
                except psycopg.Error as exc:
                    raise AssertionError(f"PgBouncer 1.18 refused SHOW {what}: {exc}") from None
                try:
                    our_names, our_oids, _ = show(ours, what)
                except psycopg.errors.ProtocolViolation:
                    continue  # a command pgmulti does not have
                compared.append(what)
                # The 1.18 binary matches COLUMNS_1_18, pgmulti matches the 1.25 list.
                assert their_names == (names_of(ref.COLUMNS_1_18[what]) or None), what
                assert our_names == (names_of(ref.COLUMNS[what]) or None), what
                if their_names is None:
                    continue
                assert their_oids == oids_of(ref.COLUMNS_1_18[what]), what
                # pgmulti's columns hold 1.18's in order, apart from renames and insertions...
                old = expected_1_18_columns(what)
                assert is_subsequence(old, our_names), (what, old, our_names)
                # ...and what it inserted is exactly what 1.25 added.
                inserted = [name for name in our_names if name not in old]
                assert inserted == [name for name in names_of(ref.COLUMNS[what])
                                    if name not in old], what
                # Columns both have carry the same types.
                their_types = dict(zip(expected_1_18_columns(what), their_oids))
                for name, oid in zip(our_names, our_oids):
                    if name in their_types:
                        assert oid == their_types[name], (what, name)
            # pgmulti answers every SHOW that 1.18 has.
            assert compared == [what for what in ref.COLUMNS_1_18 if what != "help"]
            assert show_help(pgbouncer_1_18) == (None, [], [("NOTICE", "Console usage")])
            # Row names of the name/value style commands.
            assert [r["list"] for r in show_dicts(theirs, "lists")] == list(ref.LISTS_ROWS_1_18)
            assert [r["name"] for r in show_dicts(theirs, "totals")] == list(ref.TOTALS_ROWS_1_18)
            assert [r["key"] for r in show_dicts(theirs, "config")] == \
                [key for key, _, _ in ref.CONFIG_KEYS_1_18]
            # SHOW STATE is new since 1.19.
            assert admin_error(theirs, "SHOW STATE").sqlstate == "08P01"
            assert show(ours, "state")[0] == names_of(ref.COLUMNS["state"])
    finally:
        for client in clients:
            client.close()


def console_answers(port: int, user: str, commands) -> list:
    answers = []
    with console(port, user) as admin:
        for command in commands:
            try:
                answers.append(("ok", admin.execute(command).statusmessage))
            except psycopg.Error as exc:
                answers.append((exc.sqlstate, exc.diag.message_primary))
    return answers


# Commands whose answers 1.18 and 1.25 share (1.25 changed KILL without a database).
SHARED_ERRORS = ["FOO", "SHOW NOSUCHTHING", "SHOW POOLS extra", "SHOW", "SELECT 1",
                 "PAUSE nosuch", "RESUME", "DISABLE", "ENABLE nosuch", "RECONNECT pgbouncer",
                 "PAUSE pgbouncer", "KILL pgbouncer", "DISABLE pgbouncer", "SHOW client_encoding",
                 'RESUME "testdb"', "ABCDEFGHIJKLMNOPQRST", "SUSPEND now",
                 "WAIT_CLOSE pgbouncer", "WAIT_CLOSE nosuch", "WAIT_CLOSE testdb", "WAIT_CLOSE",
                 "SET nosuch = 1", "SET default_pool_size = abc", "SET pool_mode = bogus",
                 "SET default_pool_size = -1", "SET x", "SET client_encoding = 'UTF8'",
                 "SET default_pool_size = 7", "SET server_check_query = 'select ''x'''",
                 "SET auth_query = '" + "x" * 300 + "'"]
# A stats user may look but not act.
STATS_USER_REFUSALS = ["PAUSE", "RELOAD", "SHOW FDS", "SUSPEND", "WAIT_CLOSE",
                       "SET default_pool_size = 3"]


def test_side_by_side_console_errors(proxy, pgbouncer_1_18):
    """Console errors and refusals: pgmulti answers as PgBouncer 1.18 does."""
    for user, commands in (("postgres", SHARED_ERRORS), ("stats", STATS_USER_REFUSALS)):
        ours = console_answers(proxy.port, user, commands)
        theirs = console_answers(pgbouncer_1_18, user, commands)
        assert list(zip(commands, ours)) == list(zip(commands, theirs))
    # The extended protocol is refused by both with 08P01.
    for port in (proxy.port, pgbouncer_1_18):
        with console(port) as admin, pytest.raises(psycopg.Error) as info:
            admin.execute("SHOW %s", ["POOLS"])
        assert info.value.sqlstate == "08P01"


def test_pgbouncer_1_18_console_answers(pgbouncer_1_18):
    """What test_console_command_errors_like_pgbouncer and the login refusal expect is what
    PgBouncer does."""
    commands = [param.values[0] for param in MISPARSED_COMMANDS]
    answers = console_answers(pgbouncer_1_18, "postgres", commands)
    assert answers == [param.values[1] for param in MISPARSED_COMMANDS]
    message, sqlstate, _ = ref.ADMIN_ERRORS["not_allowed"]
    assert login_error(pgbouncer_1_18, "md5user") == (sqlstate, message)
    with console(pgbouncer_1_18) as admin, pytest.raises(psycopg.Error) as info:
        admin.execute("SHOW %s", ["POOLS"])
    message, sqlstate, severity = ref.ADMIN_ERRORS["extended_protocol"]
    diag = info.value.diag
    assert (diag.severity, diag.sqlstate, diag.message_primary) == (severity, sqlstate, message)
