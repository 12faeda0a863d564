"""Pool modes through a real pgmulti process: session, transaction and statement pooling.

Every test talks to the session PostgreSQL cluster through the proxy; statements that must not
go through the proxy (pg_terminate_backend, pgbench -i) go to PostgreSQL directly.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest
from psycopg import errors as pgerrors

from pgmulti.cluster import clean_env
from support import admin, direct_io_reaching, wait_for

MODES = ["session", "transaction", "statement"]
CONNECT_TIMEOUT_S = 5
BENCH_DB = "pgmulti_bench"


# --- helpers ---


def connect(proxy, *, db: str = "testdb", user: str = "postgres", autocommit: bool = True,
            **kwargs) -> psycopg.Connection:
    """A psycopg connection through the proxy; no prepared statements (transaction pooling)."""
    return psycopg.connect(proxy.dsn(user=user, db=db), connect_timeout=CONNECT_TIMEOUT_S,
                           autocommit=autocommit, prepare_threshold=None, **kwargs)


def scalar(conn: psycopg.Connection, sql: str, params=None):
    return conn.execute(sql, params).fetchone()[0]


def backend_pid(conn: psycopg.Connection) -> int:
    return scalar(conn, "SELECT pg_backend_pid()")


def pg_direct(pg) -> psycopg.Connection:
    """A direct (not proxied) superuser connection to PostgreSQL."""
    return psycopg.connect(pg.dsn(), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)


def terminate_backend(pg, pid: int) -> None:
    """pg_terminate_backend, then wait until the backend has exited."""
    with pg_direct(pg) as direct:
        assert scalar(direct, "SELECT pg_terminate_backend(%s)", [pid]) is True
        wait_for(lambda: not scalar(direct, "SELECT count(*) FROM pg_stat_activity "
                                            "WHERE pid = %s", [pid]),
                 5, what="backend exit")


# --- simple queries in every mode ---


@pytest.mark.parametrize("mode", MODES)
def test_psql_simple_queries_work_in_every_mode(pgmulti, mode):
    proxy = pgmulti({"pool_mode": mode})
    result = proxy.psql("SELECT 1 + 1", db="testdb")
    assert (result.returncode, result.stdout.strip()) == (0, "2"), result.stderr
    result = proxy.psql("SELECT current_database(), current_user", db="testdb")
    assert (result.returncode, result.stdout.strip()) == (0, "testdb|postgres"), result.stderr
    # Several statements in one Query message: an implicit transaction, fine in every mode.
    result = proxy.psql("SELECT 'a'; SELECT 'b'", db="testdb")
    assert (result.returncode, result.stdout.split()) == (0, ["a", "b"]), result.stderr


@pytest.mark.parametrize("mode", MODES)
def test_psycopg_autocommit_queries_in_every_mode(pgmulti, mode):
    proxy = pgmulti({"pool_mode": mode})
    with connect(proxy) as conn:
        for i in range(5):
            assert scalar(conn, "SELECT %s::int * 2", [i]) == i * 2


# --- server reuse and pinning ---


def test_transaction_mode_shares_one_server_between_clients(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    with connect(proxy) as first, connect(proxy) as second:
        pids = [backend_pid(first), backend_pid(first), backend_pid(second), backend_pid(second),
                backend_pid(first)]
    assert len(set(pids)) == 1, pids


def test_session_mode_pins_a_server_to_its_client(pgmulti):
    proxy = pgmulti({"pool_mode": "session", "default_pool_size": 2})
    with connect(proxy) as first, connect(proxy) as second:
        first_pids = {backend_pid(first)}
        second_pids = {backend_pid(second)}
        for _ in range(3):
            first_pids.add(backend_pid(first))
            with first.transaction():
                first_pids.add(backend_pid(first))
            second_pids.add(backend_pid(second))
    assert len(first_pids) == 1 and len(second_pids) == 1, (first_pids, second_pids)
    assert first_pids != second_pids


def test_transaction_mode_keeps_a_transaction_on_one_server(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 2})
    with connect(proxy, autocommit=False) as holder, connect(proxy) as other:
        seen = []
        with holder.transaction():
            holder.execute("CREATE TEMP TABLE xact_probe (n int) ON COMMIT DROP")
            for n in range(5):
                row = holder.execute(
                    "INSERT INTO xact_probe VALUES (%s) "
                    "RETURNING pg_backend_pid(), txid_current(), (SELECT count(*) FROM xact_probe)",
                    [n]).fetchone()
                seen.append(row)
                # Another client's transactions run in between, on the other server.
                assert backend_pid(other) != row[0]
    assert len({(pid, txid) for pid, txid, _ in seen}) == 1, seen
    # Each round trip saw the rows of the earlier ones: the same transaction throughout.
    assert [count for _, _, count in seen] == [0, 1, 2, 3, 4]


def test_transaction_mode_rollback_over_several_round_trips(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    with connect(proxy) as conn:
        conn.execute("DROP TABLE IF EXISTS pool_modes_rollback")
        conn.execute("CREATE TABLE pool_modes_rollback (n int)")
        try:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO pool_modes_rollback VALUES (1)")
            assert scalar(conn, "SELECT count(*) FROM pool_modes_rollback") == 1
            conn.execute("ROLLBACK")
            assert scalar(conn, "SELECT count(*) FROM pool_modes_rollback") == 0
        finally:
            conn.execute("DROP TABLE pool_modes_rollback")


def test_session_mode_keeps_session_state(pgmulti):
    proxy = pgmulti({"pool_mode": "session", "default_pool_size": 2})
    with connect(proxy) as conn, connect(proxy) as other:
        conn.execute("SET search_path TO pg_catalog, public")
        conn.execute("CREATE TEMP TABLE session_probe (n int)")
        for _ in range(3):
            other.execute("SELECT 1")
            with conn.transaction():
                assert scalar(conn, "SHOW search_path") == "pg_catalog, public"
            assert scalar(conn, "SELECT count(*) FROM session_probe") == 0
        assert scalar(other, "SHOW search_path") == '"$user", public'


# --- statement mode ---


def test_statement_mode_runs_autocommit_statements(pgmulti):
    proxy = pgmulti({"pool_mode": "statement", "default_pool_size": 1})
    with connect(proxy) as first, connect(proxy) as second:
        pids = {backend_pid(first), backend_pid(second), backend_pid(first)}
        assert scalar(first, "SELECT %s::text || %s::text", ["a", "b"]) == "ab"
    assert len(pids) == 1


def test_statement_mode_refuses_transaction_blocks(pgmulti):
    proxy = pgmulti({"pool_mode": "statement"})
    conn = connect(proxy)
    try:
        with pytest.raises(psycopg.Error) as excinfo:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")  # the error may only surface on the next round trip
        assert excinfo.value.sqlstate == "0A000", excinfo.value
        assert "transaction blocks not allowed" in str(excinfo.value)
        # The client connection is closed by the proxy.
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        assert conn.closed or conn.broken
    finally:
        conn.close()
    # The proxy still serves new clients.
    with connect(proxy) as conn:
        assert scalar(conn, "SELECT 42") == 42


def test_statement_mode_begin_error_is_the_answer_to_begin(pgmulti):
    """The refusal is the reply to BEGIN itself, as in PgBouncer, not a later surprise."""
    proxy = pgmulti({"pool_mode": "statement"})
    conn = connect(proxy)
    try:
        with pytest.raises(psycopg.Error) as excinfo:
            conn.execute("BEGIN")
        assert excinfo.value.sqlstate == "0A000", excinfo.value
    finally:
        conn.close()


def test_statement_mode_psql_begin_fails(pgmulti):
    proxy = pgmulti({"pool_mode": "statement"})
    result = proxy.psql("BEGIN", db="testdb")
    assert "transaction blocks not allowed in statement pooling mode" in result.stderr, result
    assert result.returncode != 0


# --- ParameterStatus tracking ---


def test_transaction_mode_keeps_each_clients_parameters(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    alpha = connect(proxy, application_name="alpha", options="-c TimeZone=Asia/Tokyo")
    beta = connect(proxy, application_name="beta", options="-c TimeZone=America/New_York")
    try:
        pids = set()
        for _ in range(4):
            for conn, name, zone in ((alpha, "alpha", "Asia/Tokyo"),
                                     (beta, "beta", "America/New_York")):
                row = conn.execute(
                    "SELECT current_setting('application_name'), current_setting('TimeZone'), "
                    "pg_backend_pid()").fetchone()
                assert row[:2] == (name, zone)
                assert scalar(conn, "SHOW application_name") == name
                assert scalar(conn, "SHOW TimeZone") == zone
                with conn.transaction():
                    assert scalar(conn, "SHOW TimeZone") == zone
                pids.add(row[2])
                # What the client library saw in ParameterStatus agrees.
                assert conn.info.parameter_status("application_name") == name
                assert conn.info.parameter_status("TimeZone") == zone
        assert len(pids) == 1, pids  # one server, switched between the two clients
    finally:
        alpha.close()
        beta.close()


def test_transaction_mode_follows_set_of_a_tracked_parameter(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    with connect(proxy, application_name="first") as first, connect(proxy) as second:
        first.execute("SET application_name = 'renamed'")
        second.execute("SET TimeZone = 'Europe/Helsinki'")
        for _ in range(3):
            assert scalar(first, "SHOW application_name") == "renamed"
            assert scalar(second, "SHOW TimeZone") == "Europe/Helsinki"
            assert scalar(first, "SHOW TimeZone") != "Europe/Helsinki"
            assert scalar(second, "SHOW application_name") != "renamed"
        # A SET undone by ROLLBACK, and a SET LOCAL, leave the client's value as it was.
        first.execute("BEGIN")
        first.execute("SET application_name = 'rolled back'")
        first.execute("ROLLBACK")
        with first.transaction():
            first.execute("SET LOCAL application_name = 'local only'")
            assert scalar(first, "SHOW application_name") == "local only"
        for _ in range(2):
            assert scalar(second, "SHOW application_name") != "renamed"
            assert scalar(first, "SHOW application_name") == "renamed"
            assert first.info.parameter_status("application_name") == "renamed"


def test_track_extra_parameters(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1,
                     "track_extra_parameters": "IntervalStyle, default_transaction_read_only"})
    read_only = connect(proxy, options="-c default_transaction_read_only=on "
                                       "-c IntervalStyle=iso_8601")
    plain = connect(proxy)
    try:
        for _ in range(3):  # one server, switched between the two clients
            assert scalar(read_only, "SHOW default_transaction_read_only") == "on"
            assert scalar(read_only, "SHOW IntervalStyle") == "iso_8601"
            assert scalar(plain, "SHOW default_transaction_read_only") == "off"
            assert scalar(plain, "SHOW IntervalStyle") == "postgres"
        plain.execute("SET default_transaction_read_only = on")  # followed too
        assert scalar(read_only, "SHOW IntervalStyle") == "iso_8601"
        assert scalar(plain, "SHOW default_transaction_read_only") == "on"
        assert read_only.info.parameter_status("default_transaction_read_only") == "on"
    finally:
        read_only.close()
        plain.close()


def test_untracked_parameters_are_refused_at_startup(pgmulti):
    # PgBouncer's default tracks IntervalStyle; without it, it is refused like any other.
    proxy = pgmulti({"track_extra_parameters": ""})
    for option in ("-c IntervalStyle=iso_8601", "-c default_transaction_read_only=on"):
        with pytest.raises(psycopg.OperationalError, match="unsupported options startup"):
            connect(proxy, options=option)
    with connect(proxy, options="-c TimeZone=UTC") as conn:  # always tracked
        assert scalar(conn, "SHOW TimeZone") == "UTC"


def test_transaction_mode_keeps_encoding_and_quoted_names_apart(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    latin = connect(proxy, client_encoding="LATIN1", application_name="it's \\ odd")
    utf8 = connect(proxy, client_encoding="UTF8", options="-c DateStyle=SQL,DMY")
    try:
        for _ in range(3):
            assert latin.execute(
                "SELECT current_setting('client_encoding'), 'é', "
                "current_setting('application_name'), current_setting('DateStyle')"
            ).fetchone() == ("LATIN1", "é", "it's \\ odd", "ISO, MDY")
            assert utf8.execute(
                "SELECT current_setting('client_encoding'), 'é', "
                "current_setting('application_name'), current_setting('DateStyle')"
            ).fetchone() == ("UTF8", "é", "", "SQL, DMY")
    finally:
        latin.close()
        utf8.close()


# --- a client leaving in the middle of a transaction ---


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_client_leaving_inside_a_transaction_does_not_leak_it(pgmulti, mode):
    proxy = pgmulti({"pool_mode": mode, "default_pool_size": 1})
    with connect(proxy) as setup:
        setup.execute("DROP TABLE IF EXISTS pool_modes_leak")
        setup.execute("CREATE TABLE pool_modes_leak (n int)")
    try:
        leaver = connect(proxy)
        leaver.execute("BEGIN")
        leaver.execute("INSERT INTO pool_modes_leak VALUES (1)")
        leaver.execute("SET LOCAL work_mem = '1234kB'")
        leaver.close()  # Terminate while the server is inside the transaction
        with connect(proxy) as next_client:
            row = next_client.execute(
                "SELECT (SELECT count(*) FROM pool_modes_leak), current_setting('work_mem'), "
                "now() = statement_timestamp()").fetchone()
            assert row[0] == 0 and row[1] != "1234kB", row
            assert row[2] is True, "the next client ran inside the old transaction"
    finally:
        with connect(proxy) as cleanup:
            cleanup.execute("DROP TABLE pool_modes_leak")


# --- server_reset_query ---


def test_session_mode_resets_the_server_between_clients(pgmulti, pg):
    with pg_direct(pg) as direct:
        default_work_mem = scalar(direct, "SHOW work_mem")
    assert default_work_mem != "1234kB"
    proxy = pgmulti({"pool_mode": "session", "default_pool_size": 1})
    with connect(proxy) as first:
        first.execute("SET work_mem = '1234kB'")
        first.execute("PREPARE leftover AS SELECT 1")
        assert scalar(first, "SHOW work_mem") == "1234kB"
        first_pid = backend_pid(first)
    with connect(proxy) as second:
        assert backend_pid(second) == first_pid  # the same server, reused
        assert scalar(second, "SHOW work_mem") == default_work_mem
        assert scalar(second, "SELECT count(*) FROM pg_prepared_statements") == 0


def test_session_mode_reset_query_is_configurable(pgmulti):
    proxy = pgmulti({"pool_mode": "session", "default_pool_size": 1,
                     "server_reset_query": "RESET work_mem"})
    with connect(proxy) as first:
        first.execute("SET work_mem = '1234kB'")
        first.execute("SET maintenance_work_mem = '2345kB'")
        first_pid = backend_pid(first)
    with connect(proxy) as second:
        assert backend_pid(second) == first_pid
        assert scalar(second, "SHOW work_mem") != "1234kB"
        # Only the configured reset ran: what it does not reset is still there.
        assert scalar(second, "SHOW maintenance_work_mem") == "2345kB"


@pytest.mark.parametrize("always", [False, True])
def test_transaction_mode_reset_query_only_when_always(pgmulti, always):
    """As PgBouncer: transaction pooling skips server_reset_query unless ..._always is set."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1,
                     "server_reset_query_always": always})
    with connect(proxy) as first, connect(proxy) as second:
        first.execute("SET work_mem = '1234kB'")
        seen = scalar(second, "SHOW work_mem")
    assert (seen != "1234kB") if always else (seen == "1234kB")


# --- pgbench ---


@pytest.fixture(scope="module")
def bench_db(pg):
    """A scratch database initialised by pgbench -i over a direct connection."""
    pg.psql(f"DROP DATABASE IF EXISTS {BENCH_DB}")
    pg.psql(f"CREATE DATABASE {BENCH_DB}")
    result = subprocess.run(
        [pg.bindir / "pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port),
         "-U", "postgres", BENCH_DB],
        env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 0, result.stderr
    yield BENCH_DB
    pg.psql(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_pgbench_through_the_proxy(pgmulti, pg, bench_db, base_config, mode):
    databases = {bench_db: f"host=127.0.0.1 port={{pg_port}} dbname={bench_db}"}
    proxy = pgmulti(base_config(databases=databases, pool_mode=mode, default_pool_size=4))
    result = subprocess.run(
        [pg.bindir / "pgbench", "-n", "-M", "simple", "-t", "50", "-c", "4", "-j", "2",
         "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", bench_db],
        env=clean_env(PGCONNECT_TIMEOUT="10"), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=25, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "number of transactions actually processed: 200/200" in result.stdout, result.stdout
    assert "number of failed transactions: 0 " in result.stdout, result.stdout


# --- a server dying under its client ---


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_terminated_server_fails_its_client_not_hangs(pgmulti, pg, mode):
    proxy = pgmulti({"pool_mode": mode, "default_pool_size": 1, "stats_period": 1, "verbose": 1})
    conn = connect(proxy)
    try:
        for i in range(5):
            assert scalar(conn, "SELECT %s::int", [i]) == i
        conn.execute("BEGIN")
        pid = backend_pid(conn)
        # The server's socket is direct (since its login), the client's the codec's.
        direct_io_reaching(proxy, sockets=1, clients=1)
        terminate_backend(pg, pid)
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        assert time.monotonic() - started < 5
    finally:
        conn.close()
    # The pool recovers: a new client gets a new server.
    with connect(proxy) as fresh:
        assert backend_pid(fresh) != pid
        assert scalar(fresh, "SELECT 1") == 1


def test_terminated_idle_server_is_replaced(pgmulti, pg):
    """A pooled server killed while idle in the pool is not handed to the next client."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    with connect(proxy) as conn:
        pid = backend_pid(conn)
        terminate_backend(pg, pid)
        time.sleep(0.2)  # the proxy reads the server's FATAL message and the close
        new_pid = backend_pid(conn)
        assert new_pid != pid


# --- cancel ---


def _sleep_sql(tag: str) -> str:
    """pg_sleep with a tag, so pg_stat_activity shows which test's sleep is which."""
    return f"SELECT /* {tag} */ pg_sleep(%s)"


def _run_sleep_in_thread(conn: psycopg.Connection, seconds: float, tag: str):
    outcome: dict[str, object] = {}

    def run():
        started = time.monotonic()
        try:
            conn.execute(_sleep_sql(tag), [seconds])
            outcome["result"] = "finished"
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _sleeping(direct: psycopg.Connection, tag: str) -> int:
    return scalar(direct, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                          "AND pid <> pg_backend_pid() AND query LIKE %s", [f"%/* {tag} */%"])


def _wait_until_sleeping(pg, tag: str, count: int = 1) -> None:
    with pg_direct(pg) as direct:
        wait_for(lambda: _sleeping(direct, tag) >= count, 5, what=f"{count} x {tag} running")


def _terminate_sleepers(pg, tag: str) -> None:
    """PostgreSQL does not notice a vanished client during pg_sleep: end such backends."""
    with pg_direct(pg) as direct:
        direct.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE pid <> pg_backend_pid() AND query LIKE %s", [f"%/* {tag} */%"])


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_stops_a_running_query(pgmulti, pg, mode, method):
    proxy = pgmulti({"pool_mode": mode})
    with connect(proxy) as conn:
        tag = f"cancel-{mode}-{method}"
        thread, outcome = _run_sleep_in_thread(conn, 10, tag)
        _wait_until_sleeping(pg, tag)
        if method == "cancel":
            conn.cancel()
        else:
            conn.cancel_safe(timeout=5)
        thread.join(8)
        assert not thread.is_alive(), "query still running after cancel"
        assert isinstance(outcome.get("error"), pgerrors.QueryCanceled), outcome
        assert outcome["error"].sqlstate == "57014"
        assert outcome["elapsed"] < 5
        # The connection stays usable.
        assert scalar(conn, "SELECT 7") == 7


class CancelSwallower:
    """A TCP port in front of PostgreSQL: the first connection is relayed to it, every later
    one (a forwarded cancel) is accepted and never answered."""

    def __init__(self, pg):
        self.pg = pg
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not first:
                self.held.append(conn)
                continue
            first = False
            upstream = socket.create_connection((self.pg.host, self.pg.port))
            for source, target in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_cancel_wait_timeout_gives_up_on_a_silent_server(pgmulti, pg, base_config):
    swallower = CancelSwallower(pg)
    proxy = pgmulti(base_config(
        databases={"slow": f"host=127.0.0.1 port={swallower.port} dbname=testdb"},
        pool_mode="session", cancel_wait_timeout=1))
    try:
        with connect(proxy, db="slow") as conn:
            tag = "cancel-swallowed"
            thread, outcome = _run_sleep_in_thread(conn, 3, tag)
            _wait_until_sleeping(pg, tag)
            conn.cancel()
            wait_for(lambda: "cancel request failed: cancel_wait_timeout" in proxy.log_text(),
                     2.5, "the cancel given up")
            thread.join(8)
            assert outcome.get("result") == "finished", outcome  # never cancelled
    finally:
        swallower.close()


def test_cancel_reaches_the_right_server(pgmulti, pg):
    """Two clients sleeping on two servers: a cancel stops only the one it was sent for."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 2})
    with connect(proxy) as victim, connect(proxy) as bystander:
        victim_thread, victim_outcome = _run_sleep_in_thread(victim, 10, "cancel-victim")
        bystander_thread, bystander_outcome = _run_sleep_in_thread(bystander, 1.5,
                                                                   "cancel-bystander")
        _wait_until_sleeping(pg, "cancel-victim")
        _wait_until_sleeping(pg, "cancel-bystander")
        victim.cancel_safe(timeout=5)
        victim_thread.join(8)
        bystander_thread.join(8)
        assert isinstance(victim_outcome.get("error"), pgerrors.QueryCanceled), victim_outcome
        assert bystander_outcome.get("result") == "finished", bystander_outcome


def test_late_cancel_does_not_hit_the_next_user_of_the_server(pgmulti, pg):
    """Transaction mode: a cancel from a client whose query is over must not cancel the query
    another client now runs on the same server."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    with connect(proxy) as early, connect(proxy) as runner:
        early_pid = backend_pid(early)
        thread, outcome = _run_sleep_in_thread(runner, 1, "late-cancel")
        _wait_until_sleeping(pg, "late-cancel")
        early.cancel_safe(timeout=5)
        thread.join(8)
        assert outcome.get("result") == "finished", outcome
        assert backend_pid(runner) == early_pid  # it was the same server


def show_pool(proxy, db: str = "testdb") -> dict:
    with connect(proxy, db="pgbouncer") as console:
        cursor = console.execute("SHOW POOLS")
        names = [column.name for column in cursor.description]
        return next(dict(zip(names, row)) for row in cursor.fetchall() if row[0] == db)


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_cancel_while_queued_for_a_server(pgmulti, pg, mode):
    """A client waiting for a server (the pool is busy) is cancelled at once: its query never
    reaches PostgreSQL, it gets 57014, and it can go on (PgBouncer leaves it waiting)."""
    proxy = pgmulti({"pool_mode": mode, "default_pool_size": 1})
    holder = connect(proxy)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # the only server is in holder's transaction
        with connect(proxy) as queued:
            thread, outcome = _run_sleep_in_thread(queued, 0, "queued-cancel")
            wait_for(lambda: show_pool(proxy)["cl_waiting"] == 1, 10, what="the client to queue")
            queued.cancel_safe(timeout=5)
            thread.join(8)
            assert not thread.is_alive(), "still queued after the cancel"
            assert isinstance(outcome.get("error"), pgerrors.QueryCanceled), outcome
            assert outcome["elapsed"] < 5
            assert show_pool(proxy)["cl_waiting"] == 0
            holder.execute("COMMIT")
            if mode == "session":
                holder.close()  # session pooling: the server is holder's until it leaves
            assert scalar(queued, "SELECT 8") == 8  # and it goes on normally
    finally:
        holder.close()


def test_psql_sigint_while_queued_cancels(pgmulti, pg):
    """psql's Ctrl-C path (simple protocol) for a query still waiting for a server."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    with connect(proxy) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        process = subprocess.Popen(
            [pg.bindir / "psql", "-X", "-w", "-h", proxy.host, "-p", str(proxy.port), "-U",
             "postgres", "-d", "testdb", "-c", "SELECT 'should not run'"],
            env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: show_pool(proxy)["cl_waiting"] == 1, 10, what="psql to queue")
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)
        assert "canceling statement due to user request" in err, err
        holder.execute("COMMIT")


def test_client_vanishing_mid_query_frees_its_pool_slot(pgmulti, pg):
    """A client that disconnects while its query runs: the next client is not stuck behind it."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    try:
        body = struct.pack("!i", 3 << 16) + b"user\0postgres\0database\0testdb\0\0"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        data = b""
        while not data.endswith(b"Z\0\0\0\x05I"):
            chunk = sock.recv(65536)
            assert chunk, "closed during login"
            data += chunk
        sql = (_sleep_sql("vanishing") % 5).encode() + b"\0"
        sock.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
        _wait_until_sleeping(pg, "vanishing")
    finally:
        sock.close()
    try:
        started = time.monotonic()
        with connect(proxy) as conn:
            assert scalar(conn, "SELECT 'served'") == "served"
        assert time.monotonic() - started < 3
    finally:
        _terminate_sleepers(pg, "vanishing")


def test_psql_sigint_cancels_through_the_proxy(pgmulti, pg):
    proxy = pgmulti({"pool_mode": "transaction"})
    process = subprocess.Popen(
        [pg.bindir / "psql", "-X", "-w", "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres",
         "-d", "testdb", "-c", _sleep_sql("psql-sigint") % 10],
        env=clean_env(PGCONNECT_TIMEOUT="10"), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_sleeping(pg, "psql-sigint")
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=8)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert time.monotonic() - started < 5
    assert "canceling statement due to user request" in stderr, (stdout, stderr)
    assert process.returncode != 0


# --- server_round_robin ---


def backend_pids_in_turn(proxy, mode: str, turns: int) -> list[int]:
    """The server process of each of `turns` transactions, one after another: in one
    session (transaction mode) or a new session each (session mode)."""
    if mode == "transaction":
        with connect(proxy) as conn:
            return [scalar(conn, "SELECT pg_backend_pid()") for _ in range(turns)]
    pids = []
    for _ in range(turns):
        with connect(proxy) as conn:
            pids.append(scalar(conn, "SELECT pg_backend_pid()"))
        # A closed session's server runs its reset query before it is idle again; a login
        # sooner would rightly be given another server.
        wait_for(lambda: all(row["state"] == "idle" for row in admin(proxy, "SHOW SERVERS")),
                 10, "every server idle")
    return pids


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("round_robin", [0, 1])
def test_server_round_robin(pgmulti, mode, round_robin):
    proxy = pgmulti({"pool_mode": mode, "default_pool_size": 3, "min_pool_size": 3,
                     "server_round_robin": round_robin})
    with connect(proxy):  # min_pool_size fills a pool that has a client
        wait_for(lambda: len(admin(proxy, "SHOW SERVERS")) == 3, 10, "3 servers")
    time.sleep(0.2)  # the servers' logins are done
    pids = backend_pids_in_turn(proxy, mode, 6)
    if round_robin:
        # Each turn takes the server idle longest: all three in a fixed rotation.
        assert len(set(pids)) == 3 and pids[:3] == pids[3:], pids
    else:
        assert len(set(pids)) == 1, pids  # the newest idle server, again and again


# --- server_fast_close ---


def session_closed_by_fast_close(conn: psycopg.Connection, timeout: float = 5.0) -> str:
    """Poll with queries until the session ends; the error it ended with."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            return str(exc)
        time.sleep(0.1)
    raise AssertionError("the session was not closed")


def test_server_fast_close_ends_sessions_between_transactions(pgmulti):
    proxy = pgmulti({"pool_mode": "session", "server_fast_close": 1})
    with connect(proxy) as idle_session, connect(proxy, autocommit=False) as in_transaction:
        assert scalar(idle_session, "SELECT 1") == 1
        assert scalar(in_transaction, "SELECT 2") == 2  # a transaction stays open
        admin(proxy, "RECONNECT testdb")
        assert "database configuration changed" in session_closed_by_fast_close(idle_session)
        # The open transaction is not interrupted; its session ends after the commit.
        assert scalar(in_transaction, "SELECT 3") == 3
        in_transaction.commit()
        in_transaction.autocommit = True
        assert "database configuration changed" in session_closed_by_fast_close(in_transaction)
    with connect(proxy) as fresh:
        assert scalar(fresh, "SELECT 4") == 4


def test_without_server_fast_close_sessions_outlive_reconnect(pgmulti):
    proxy = pgmulti({"pool_mode": "session"})
    with connect(proxy) as conn:
        pid = scalar(conn, "SELECT pg_backend_pid()")
        admin(proxy, "RECONNECT testdb")
        time.sleep(1)  # three janitor ticks
        assert scalar(conn, "SELECT pg_backend_pid()") == pid
