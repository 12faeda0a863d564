"""Protocol-level prepared statements through transaction pooling (max_prepared_statements)."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import time

import asyncpg
import psycopg
import pytest

from pgmulti.cluster import clean_env
from support import Raw, startup_packet
from support import message as raw_message

CONNECT_TIMEOUT_S = 5


def connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user="postgres", db="testdb"),
                           connect_timeout=CONNECT_TIMEOUT_S, autocommit=True, **kwargs)


@pytest.fixture
def proxy(pgmulti):
    # Two servers and several clients, so statements must follow clients across servers.
    return pgmulti({"pool_mode": "transaction", "default_pool_size": 2})


def test_psycopg_prepared_statements_follow_the_client_across_servers(proxy, pg):
    clients = [connect(proxy, prepare_threshold=0) for _ in range(3)]
    try:
        pids = []
        for phase in range(2):
            used = set()
            for index, conn in enumerate(clients):
                row = conn.execute("SELECT %s::int + 1, pg_backend_pid()",
                                   [index * 10 + phase]).fetchone()
                assert row[0] == index * 10 + phase + 1
                used.add(row[1])
            pids.append(used)
            if phase == 0:
                # Kill the server the statements were prepared on: the next one lacks them.
                with psycopg.connect(pg.dsn(db="testdb"), autocommit=True) as direct:
                    for pid in used:
                        direct.execute("SELECT pg_terminate_backend(%s)", [pid])
                time.sleep(0.5)
        assert pids[0].isdisjoint(pids[1]), pids
    finally:
        for conn in clients:
            conn.close()


def test_same_statement_prepared_twice_by_one_client(proxy):
    with connect(proxy) as conn:
        conn.pgconn.prepare(b"stmt", b"SELECT $1::text")
        conn.pgconn.prepare(b"again", b"SELECT $1::text")  # same definition, second name
        for name in (b"stmt", b"again"):
            result = conn.pgconn.exec_prepared(name, [b"x"])
            assert result.get_value(0, 0) == b"x"
        # Closing the client's name keeps the statement usable under the other name.
        conn.pgconn.close_prepared(b"stmt")
        assert conn.pgconn.exec_prepared(b"again", [b"y"]).get_value(0, 0) == b"y"


def test_unknown_statement_name_gives_the_servers_error(proxy):
    with connect(proxy) as conn:
        result = conn.pgconn.exec_prepared(b"never_prepared", [])
        assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session continues


def test_error_in_a_pipeline_does_not_confuse_later_statements(proxy):
    with connect(proxy, prepare_threshold=0) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SELECT %s::int", [1])
                conn.execute("SELECT 1 / %s::int", [0])
                conn.execute("SELECT %s::text", ["skipped"])
        for value in range(3):
            assert conn.execute("SELECT %s::int * 2", [value]).fetchone() == (value * 2,)


def test_asyncpg_default_statement_cache_in_transaction_mode(proxy):
    async def scenario():
        conns = [await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres",
                                       database="testdb", timeout=CONNECT_TIMEOUT_S)
                 for _ in range(3)]
        try:
            for round_number in range(4):
                for conn in conns:
                    assert await conn.fetchval("SELECT $1::int * 3", round_number) == \
                        round_number * 3
                    async with conn.transaction():
                        rows = await conn.fetch("SELECT generate_series(1, $1::int)", 3)
                        assert [r[0] for r in rows] == [1, 2, 3]
        finally:
            for conn in conns:
                await conn.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_pgbench_extended_and_prepared_protocols(proxy, pg, mode):
    env = clean_env()
    init = subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p",
                           str(pg.port), "-U", "postgres", "testdb"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert init.returncode == 0, init.stderr
    run = subprocess.run(["pgbench", "-M", mode, "-S", "-t", "50", "-c", "4", "-j", "2",
                          "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres", "testdb"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "number of failed transactions: 0" in run.stdout


def test_max_prepared_statements_evicts_on_the_server(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1,
                     "max_prepared_statements": 3})
    with connect(proxy, prepare_threshold=0) as conn:
        for value in range(10):  # ten distinct statements through a limit of three
            sql = f"SELECT {value} + %s::int"
            assert conn.execute(sql, [1]).fetchone() == (value + 1,)
        count = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
        assert count <= 3
        assert conn.execute("SELECT 0 + %s::int", [5]).fetchone() == (5,)  # re-prepared


def test_admin_console_shows_prepared_statements_and_counts(proxy):
    with connect(proxy, prepare_threshold=0) as conn:
        for value in range(5):
            conn.execute("SELECT %s::int AS counted", [value])
    with psycopg.connect(proxy.dsn(user="postgres", db="pgbouncer"), autocommit=True) as admin:
        cursor = admin.execute("SHOW PREPARED_STATEMENTS")
        columns = [c.name for c in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
        stats = admin.execute("SHOW STATS_TOTALS")
        stat_columns = [c.name for c in stats.description]
        totals = {row[0]: dict(zip(stat_columns, row)) for row in stats.fetchall()}
    assert columns == ["name", "query", "parameter_types", "uses", "servers"]
    mine = [row for row in rows if "counted" in row["query"]]
    assert len(mine) == 1 and mine[0]["uses"] >= 4 and mine[0]["servers"] >= 1
    assert totals["testdb"]["client_parse_count"] >= 1
    assert totals["testdb"]["bind_count"] >= 5


@pytest.mark.parametrize("command", ["DEALLOCATE ALL", "DISCARD ALL", "SELECT 1; DEALLOCATE ALL"])
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_deallocate_all_by_one_client_leaves_others_statements_working(pgmulti, command, protocol):
    # One server shared by both clients: A's command drops every statement on it.
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    if protocol == "extended" and ";" in command:
        pytest.skip("the extended protocol runs one statement per Parse")
    with connect(proxy) as a, connect(proxy) as b:
        a.pgconn.prepare(b"a_stmt", b"SELECT $1::int + 1")
        b.pgconn.prepare(b"b_stmt", b"SELECT $1::text || 'b'")
        pid = b.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert a.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        if protocol == "simple":
            a.pgconn.exec_(command.encode())
        else:
            a.pgconn.exec_params(command.encode(), [])  # Parse/Bind/Execute/Sync
        # B's statement is prepared again on demand on the same server.
        assert b.pgconn.exec_prepared(b"b_stmt", [b"x"]).get_value(0, 0) == b"xb"
        # A's own names are gone, as after DEALLOCATE ALL on a direct connection ...
        result = a.pgconn.exec_prepared(b"a_stmt", [b"1"])
        assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        # ... and preparing them again works.
        a.pgconn.prepare(b"a_stmt", b"SELECT $1::int + 1")
        assert a.pgconn.exec_prepared(b"a_stmt", [b"1"]).get_value(0, 0) == b"2"
        assert b.pgconn.exec_prepared(b"b_stmt", [b"y"]).get_value(0, 0) == b"yb"
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid


def test_psycopg_prepared_cache_after_discard_all(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    with connect(proxy, prepare_threshold=0) as a, connect(proxy, prepare_threshold=0) as b:
        for value in range(2):
            assert a.execute("SELECT %s::int * 3", [value]).fetchone() == (value * 3,)
            assert b.execute("SELECT %s::int * 5", [value]).fetchone() == (value * 5,)
        a.execute("DISCARD ALL")  # psycopg forgets its statements too and prepares again
        for value in range(2, 4):
            assert b.execute("SELECT %s::int * 5", [value]).fetchone() == (value * 5,)
            assert a.execute("SELECT %s::int * 3", [value]).fetchone() == (value * 3,)


def test_unnamed_and_named_statements_mixed_in_pipelines_on_one_server(pgmulti):
    """The codec forwards unnamed Parse/Bind/Describe/Close/Sync and the replies the client
    expects itself, Python the named ones: in one queue of expected replies, in order. Two
    clients share one server; pipelines mix statements psycopg prepares (after one use) with
    unnamed ones and an error, so every ParseComplete must reach the right client or none."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1})
    clients = [connect(proxy, prepare_threshold=1) for _ in range(2)]
    try:
        for round_number in range(6):
            for index, conn in enumerate(clients):
                fails = round_number % 3 == 2
                unique = f"SELECT {round_number * 10 + index}::int AS u{round_number}"
                try:
                    with conn.pipeline():
                        named = conn.execute("SELECT %s::int + 1", [round_number])
                        unnamed = conn.execute(unique)
                        if fails:
                            conn.execute("SELECT 1 / %s::int", [0])
                        again = conn.execute("SELECT %s::int + 1", [round_number + 100])
                except psycopg.errors.DivisionByZero:
                    assert fails
                else:
                    assert not fails
                    assert named.fetchone() == (round_number + 1,)
                    assert unnamed.fetchone() == (round_number * 10 + index,)
                    assert again.fetchone() == (round_number + 101,)
                # After each pipeline, plain statements on the same connection still line up.
                assert conn.execute("SELECT %s::text", [f"r{round_number}"]).fetchone() == \
                    (f"r{round_number}",)
    finally:
        for conn in clients:
            conn.close()


def _parse(name: bytes, sql: bytes) -> bytes:
    return raw_message(b"P", name + b"\0" + sql + b"\0" + struct.pack("!H", 0))


def _bind(statement: bytes) -> bytes:
    # Unnamed portal, no parameters, text results.
    return raw_message(b"B", b"\0" + statement + b"\0" + struct.pack("!HHH", 0, 0, 0))


EXECUTE = raw_message(b"E", b"\0" + struct.pack("!I", 0))
SYNC = raw_message(b"S")


def test_replies_to_unnamed_and_added_statements_arrive_exactly_in_order(pgmulti):
    """The exact replies a client gets when unnamed statements (forwarded by the codec) and
    named ones (rewritten in Python, with Parse and Close the pooler adds and whose replies it
    swallows) share pipelines, an eviction and an error: nothing extra, nothing missing."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1,
                     "max_prepared_statements": 2})
    with Raw(proxy) as raw:
        raw.send(startup_packet({"user": "postgres", "database": "testdb"}))
        assert raw.read_until(b"Z")[-1][0] == b"Z"

        raw.send(_parse(b"s1", b"SELECT 1") + _parse(b"", b"SELECT 2") + _bind(b"") + EXECUTE
                 + _parse(b"s2", b"SELECT 3")
                 + _parse(b"s3", b"SELECT 4")      # the server keeps 2: s1 is closed
                 + _bind(b"s1") + EXECUTE          # so s1 is parsed again first (swallowed)
                 + raw_message(b"C", b"S\0")       # Close of the unnamed statement
                 + SYNC)
        replies = raw.read_until(b"Z")
        assert [t for t, _ in replies] == [b"1", b"1", b"2", b"D", b"C", b"1", b"1", b"2", b"D",
                                           b"C", b"3", b"Z"]
        assert replies[3][1].endswith(b"2") and replies[8][1].endswith(b"1")

        # An error: the server skips to Sync, so the named Parse after it never happens.
        raw.send(_parse(b"", b"SELECT 1 / (random() * 0)::int") + _bind(b"") + EXECUTE
                 + _parse(b"s4", b"SELECT 5")
                 + SYNC)
        replies = raw.read_until(b"Z", timeout=5)
        if replies[-1][0] == b"E":
            replies += raw.read_until(b"Z")
        assert [t for t, _ in replies] == [b"1", b"2", b"E", b"Z"]

        # Afterwards unnamed and named statements line up again.
        raw.send(_parse(b"", b"SELECT 6") + _bind(b"") + raw_message(b"D", b"P\0") + EXECUTE
                 + _bind(b"s3") + EXECUTE + SYNC)
        replies = raw.read_until(b"Z")
        assert [t for t, _ in replies] == [b"1", b"2", b"T", b"D", b"C", b"2", b"D", b"C", b"Z"]
        assert replies[3][1].endswith(b"6") and replies[6][1].endswith(b"4")
