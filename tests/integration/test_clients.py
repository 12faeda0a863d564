"""Real client libraries through pgmulti: psycopg 3, asyncpg and psql.

Transaction pooling is the interesting case: every test that runs in transaction mode has a
small pool and a second client using the same server between the first client's transactions.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import socket
import struct
import subprocess
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from pgmulti.cluster import clean_env, process_tree
from support import wait_for

CONNECT_TIMEOUT_S = 5
COPY_ROWS = 10_000
BIG_VALUE_BYTES = 10 * 1024 * 1024


# --- helpers ---


def connect(proxy, *, db: str = "testdb", user: str = "postgres", autocommit: bool = True,
            **kwargs) -> psycopg.Connection:
    """psycopg through the proxy; prepare_threshold=None: no named prepared statements."""
    return psycopg.connect(proxy.dsn(user=user, db=db), connect_timeout=CONNECT_TIMEOUT_S,
                           autocommit=autocommit, prepare_threshold=None, **kwargs)


def scalar(conn: psycopg.Connection, sql: str, params=None):
    return conn.execute(sql, params).fetchone()[0]


def table_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def run_psql_script(proxy, script: str, db: str = "testdb", cwd=None,
                    extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """psql -X -A -t -f - through the proxy, the script on stdin."""
    return subprocess.run(
        [proxy.pg.bindir / "psql", "-X", "-A", "-t", "-w", "-h", proxy.host, "-p", str(proxy.port),
         "-U", "postgres", "-d", db, *extra, "-f", "-"],
        input=script, env=clean_env(PGCONNECT_TIMEOUT="10"), capture_output=True, text=True,
        timeout=20, check=False, cwd=cwd)


def run_async(coro, timeout: float = 20):
    """Run a coroutine with a hard bound, so a hang fails the test instead of the timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def tx_proxy(pgmulti):
    """Transaction pooling with a single server: every client shares it."""
    return pgmulti({"pool_mode": "transaction", "default_pool_size": 1})


@pytest.fixture
def scratch_table(pg):
    """A unique table name in testdb, dropped (directly) at teardown."""
    names: list[str] = []

    def make(prefix: str = "clients") -> str:
        name = table_name(prefix)
        names.append(name)
        return name

    yield make
    for name in names:
        pg.psql(f"DROP TABLE IF EXISTS {name}", db="testdb")


# --- psycopg 3 ---


def test_psycopg_server_side_parameters_without_prepare(tx_proxy):
    with connect(tx_proxy) as conn, connect(tx_proxy) as other:
        for i in range(5):
            row = conn.execute("SELECT %s::int + 1, %s::text, %s::numeric * 2, %s::bool IS NULL",
                               [i, f"v{i}", 1.5, None], prepare=False).fetchone()
            assert row == (i + 1, f"v{i}", 3, True)
            assert scalar(other, "SELECT %s::text", ["other"]) == "other"
        # The same statement text many times: still never prepared, in transaction mode.
        for i in range(10):
            assert conn.execute("SELECT %s::int", [i], prepare=False).fetchone() == (i,)
        assert scalar(conn, "SELECT count(*) FROM pg_prepared_statements") == 0


def test_psycopg_client_side_binding(tx_proxy):
    with connect(tx_proxy, cursor_factory=psycopg.ClientCursor) as conn, \
            connect(tx_proxy) as other:
        for value in ["plain", "it's quoted", "back\\slash", "ünïcödé", ""]:
            assert scalar(conn, "SELECT %s", [value]) == value
            assert scalar(other, "SELECT 1") == 1
        row = conn.execute("SELECT %(a)s::int + %(b)s::int, %(a)s", {"a": 40, "b": 2}).fetchone()
        assert row == (42, 40)
        # Several statements in one simple query (only possible with client-side binding).
        cur = conn.execute("SELECT %s::int; SELECT %s::int", [1, 2])
        assert cur.fetchone() == (1,)
        assert cur.nextset() and cur.fetchone() == (2,)


def test_psycopg_copy_in_and_out(tx_proxy, scratch_table):
    table = scratch_table("copy")
    rows = [(i, f"row {i}\twith tab", None if i % 7 == 0 else i * 0.5) for i in range(COPY_ROWS)]
    with connect(tx_proxy) as conn, connect(tx_proxy) as other:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, label text, value float8)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, label, value) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        assert scalar(other, f"SELECT count(*) FROM {table}") == COPY_ROWS
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT id, label, value FROM {table} ORDER BY id) "
                          "TO STDOUT") as copy:
                copy.set_types(["int4", "text", "float8"])
                back = list(copy.rows())
        assert back == rows
        # Raw COPY data, in a transaction that also writes.
        with conn.transaction():
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (id, label) FROM STDIN") as copy:
                    copy.write(b"".join(f"{i}\traw {i}\n".encode()
                                        for i in range(COPY_ROWS, COPY_ROWS + 100)))
        assert scalar(other, f"SELECT count(*) FROM {table}") == COPY_ROWS + 100
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} TO STDOUT") as copy:
                size = sum(len(chunk) for chunk in copy)
        assert size > COPY_ROWS * 10


def test_psycopg_copy_binary(tx_proxy, scratch_table):
    table = scratch_table("copybin")
    rows = [(i, os.urandom(i % 50)) for i in range(2000)]
    with connect(tx_proxy) as conn:
        conn.execute(f"CREATE TABLE {table} (id int, data bytea)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "bytea"])
                for row in rows:
                    copy.write_row(row)
            with cur.copy(f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT (FORMAT BINARY)") \
                    as copy:
                copy.set_types(["int4", "bytea"])
                assert list(copy.rows()) == rows


def test_psycopg_copy_error_leaves_the_connection_usable(tx_proxy, scratch_table):
    table = scratch_table("copyerr")
    with connect(tx_proxy) as conn, connect(tx_proxy) as other:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        with pytest.raises(pgerrors.UniqueViolation):
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} FROM STDIN") as copy:
                    for i in [1, 2, 2]:
                        copy.write_row((i,))
        assert scalar(conn, f"SELECT count(*) FROM {table}") == 0
        assert scalar(other, "SELECT 1") == 1
        # A COPY the client aborts itself (CopyFail).
        with pytest.raises(psycopg.errors.QueryCanceled):
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} FROM STDIN") as copy:
                    copy.write_row((10,))
                    raise psycopg.errors.QueryCanceled("client gave up")
        assert scalar(conn, f"SELECT count(*) FROM {table}") == 0
        assert scalar(other, "SELECT 2") == 2


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_big_bytea_round_trip(tx_proxy, scratch_table, binary):
    table = scratch_table("bytea")
    value = os.urandom(BIG_VALUE_BYTES)
    with connect(tx_proxy) as conn, connect(tx_proxy) as other:
        conn.execute(f"CREATE TABLE {table} (id int, data bytea)")
        conn.execute(f"INSERT INTO {table} VALUES (1, %b)", [value])
        assert scalar(other, f"SELECT md5(data) FROM {table}") == hashlib.md5(value).hexdigest()
        with conn.cursor(binary=binary) as cur:
            back = cur.execute(f"SELECT data FROM {table} WHERE id = 1").fetchone()[0]
        assert len(back) == len(value) and bytes(back) == value
        # The parameter itself echoed back: 10 MB each way in one round trip.
        with conn.cursor(binary=binary) as cur:
            echoed = cur.execute("SELECT %b::bytea", [value]).fetchone()[0]
        assert bytes(echoed) == value
        assert scalar(other, "SELECT 'still fine'") == "still fine"


def test_psycopg_transactions_commit_and_rollback(tx_proxy, scratch_table):
    table = scratch_table("xact")
    with connect(tx_proxy) as conn, connect(tx_proxy) as other:
        conn.execute(f"CREATE TABLE {table} (n int)")
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            conn.execute(f"INSERT INTO {table} VALUES (2)")
        assert scalar(other, f"SELECT sum(n) FROM {table}") == 3

        class Abort(Exception):
            pass

        with pytest.raises(Abort):
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (100)")
                raise Abort
        assert scalar(other, f"SELECT sum(n) FROM {table}") == 3

        # A failed statement rolls the transaction back; the connection is fine afterwards.
        with pytest.raises(pgerrors.DivisionByZero):
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (1000)")
                conn.execute("SELECT 1 / 0")
        assert scalar(conn, f"SELECT sum(n) FROM {table}") == 3

        # Savepoints in a transaction.
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (10)")
            with pytest.raises(Abort):
                with conn.transaction():
                    conn.execute(f"INSERT INTO {table} VALUES (20)")
                    raise Abort
        assert scalar(other, f"SELECT sum(n) FROM {table}") == 13


def test_psycopg_non_autocommit_connection(tx_proxy, scratch_table):
    table = scratch_table("implicit")
    with connect(tx_proxy) as other:
        other.execute(f"CREATE TABLE {table} (n int)")
        with connect(tx_proxy, autocommit=False) as conn:
            conn.execute(f"INSERT INTO {table} VALUES (5)")
            conn.commit()
            conn.execute(f"INSERT INTO {table} VALUES (6)")
            conn.rollback()
        assert scalar(other, f"SELECT array_agg(n) FROM {table}") == [5]


def test_psycopg_async_connections_share_the_pool(tx_proxy):
    async def client(index: int) -> list[int]:
        conn = await psycopg.AsyncConnection.connect(
            tx_proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True,
            prepare_threshold=None)
        try:
            values = []
            for i in range(10):
                cur = await conn.execute("SELECT %s::int * 100 + %s::int", [index, i])
                values.append((await cur.fetchone())[0])
            return values
        finally:
            await conn.close()

    async def main():
        return await asyncio.gather(*(client(n) for n in range(5)))

    results = run_async(main())
    assert results == [[n * 100 + i for i in range(10)] for n in range(5)]


def test_psycopg_notices_and_errors_pass_through(tx_proxy):
    notices = []
    with connect(tx_proxy) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        conn.execute("DO $$BEGIN RAISE NOTICE 'hello from plpgsql'; END$$")
        with pytest.raises(pgerrors.UndefinedTable) as excinfo:
            conn.execute("SELECT * FROM no_such_table_here")
        assert excinfo.value.diag.sqlstate == "42P01"
        with pytest.raises(pgerrors.RaiseException, match="custom failure"):
            conn.execute("DO $$BEGIN RAISE EXCEPTION 'custom failure'; END$$")
        assert scalar(conn, "SELECT 1") == 1
    assert notices == ["hello from plpgsql"]


def test_psycopg_pipeline_mode(tx_proxy, scratch_table):
    """Several Syncs in flight: the server goes back to the pool only when all are answered."""
    table = scratch_table("pipe")
    with connect(tx_proxy) as conn, connect(tx_proxy) as other:
        conn.execute(f"CREATE TABLE {table} (n int)")
        with conn.pipeline() as pipeline:
            cursors = [conn.execute("SELECT %s::int, pg_backend_pid()", [i], prepare=False)
                       for i in range(20)]
            for i in range(20):
                conn.execute(f"INSERT INTO {table} VALUES (%s)", [i], prepare=False)
            pipeline.sync()
            values = [cur.fetchone()[0] for cur in cursors]
        assert values == list(range(20))
        assert scalar(other, f"SELECT count(*) FROM {table}") == 20
        with pytest.raises(pgerrors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SELECT 1", prepare=False)
                conn.execute("SELECT 1 / 0", prepare=False)
                conn.execute("SELECT 2", prepare=False)
        assert scalar(conn, "SELECT 3") == 3
        assert scalar(other, "SELECT 4") == 4


def test_psycopg_server_side_cursor_and_big_result(tx_proxy):
    with connect(tx_proxy, autocommit=False) as conn, connect(tx_proxy) as other:
        with conn.cursor(name="stream") as cur:
            cur.itersize = 1000
            cur.execute("SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g")
            total = sum(g for g, _ in cur)
            assert total == sum(range(1, 20001))
        conn.commit()
        assert scalar(other, "SELECT 'after'") == "after"
        # A large result in one go: ~30 MB through the relay.
        with conn.cursor() as cur:
            cur.execute("SELECT repeat(md5(g::text), 100) FROM generate_series(1, 10000) g")
            rows = cur.fetchall()
        conn.commit()
        assert len(rows) == 10000 and all(len(r[0]) == 3200 for r in rows)


def test_psycopg_listen_notify_in_session_mode(pgmulti):
    proxy = pgmulti({"pool_mode": "session", "default_pool_size": 2})
    with connect(proxy) as listener, connect(proxy) as sender:
        listener.execute("LISTEN pgmulti_channel")
        sender.execute("NOTIFY pgmulti_channel, 'payload one'")
        sender.execute("SELECT pg_notify('pgmulti_channel', 'payload two')")
        received = []
        for notify in listener.notifies(timeout=5, stop_after=2):
            received.append(notify.payload)
        assert received == ["payload one", "payload two"]


def test_session_mode_keeps_advisory_locks_temp_tables_and_settings(pgmulti):
    """Session pooling: the server is the client's for its whole session, so session-level
    features behave as on PostgreSQL directly (README: session-level features)."""
    proxy = pgmulti({"pool_mode": "session", "default_pool_size": 2})
    with connect(proxy) as owner, connect(proxy) as other:
        assert scalar(owner, "SELECT pg_try_advisory_lock(4242)") is True
        assert scalar(other, "SELECT pg_try_advisory_lock(4242)") is False
        owner.execute("CREATE TEMP TABLE session_scratch (x int)")
        owner.execute("INSERT INTO session_scratch VALUES (1), (2)")
        owner.execute("SET work_mem = '1234kB'")
        owner.execute("PREPARE two AS SELECT 2")
        for _ in range(3):  # later statements see the same session
            assert scalar(owner, "SELECT count(*) FROM session_scratch") == 2
            assert scalar(owner, "SHOW work_mem") == "1234kB"
            assert scalar(owner, "EXECUTE two") == 2
        assert scalar(other, "SELECT to_regclass('pg_temp.session_scratch')") is None
    with connect(proxy) as after:  # DISCARD ALL reset the server for the next client
        assert scalar(after, "SELECT pg_try_advisory_lock(4242)") is True
        assert scalar(after, "SELECT to_regclass('pg_temp.session_scratch')") is None


def test_transaction_mode_session_features_as_documented(tx_proxy):
    """Transaction pooling: what README's table says works does (ON COMMIT DROP temp tables,
    transaction-level advisory locks, SET LOCAL, tracked parameters)."""
    with connect(tx_proxy, autocommit=False) as conn:
        conn.execute("CREATE TEMP TABLE tx_scratch (x int) ON COMMIT DROP")
        conn.execute("INSERT INTO tx_scratch VALUES (1)")
        assert scalar(conn, "SELECT pg_try_advisory_xact_lock(4343)") is True
        conn.execute("SET LOCAL work_mem = '2345kB'")
        assert scalar(conn, "SHOW work_mem") == "2345kB"
        assert scalar(conn, "SELECT count(*) FROM tx_scratch") == 1
        conn.commit()
    with connect(tx_proxy) as conn:
        conn.execute("SET application_name = 'tracked'")
        for _ in range(3):
            assert scalar(conn, "SHOW application_name") == "tracked"


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _raw_login(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = struct.pack("!i", 3 << 16) + b"user\0postgres\0database\0testdb\0\0"
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    data = b""
    while not data.endswith(b"Z\0\0\0\x05I"):
        chunk = sock.recv(65536)
        assert chunk, "closed during login"
        data += chunk
    return sock


def test_slow_reader_is_flow_controlled(pgmulti):
    """A client that stops reading a 50 MB result: the proxy does not buffer it all."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 2})
    baseline = _rss_bytes(proxy.pid)
    sock = _raw_login(proxy.port)
    try:
        sql = b"SELECT repeat('x', 1000000) FROM generate_series(1, 50)\0"
        sock.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
        time.sleep(1.0)  # not reading: the server is paused behind the client
        growth = _rss_bytes(proxy.pid) - baseline
        assert growth < 25 * 1024 * 1024, f"proxy grew by {growth / 1e6:.1f} MB"
        # Other clients are served meanwhile.
        with connect(proxy) as other:
            assert scalar(other, "SELECT 'other'") == "other"
        total, tail = 0, b""
        deadline = time.monotonic() + 10
        while not tail.endswith(b"Z\0\0\0\x05I"):
            assert time.monotonic() < deadline, f"stalled after {total} bytes"
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {total} bytes"
            total += len(chunk)
            tail = (tail + chunk)[-16:]
        assert total > 50 * 1_000_000
    finally:
        sock.close()


# --- asyncpg ---


async def _asyncpg_connect(proxy, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(db="testdb"), timeout=CONNECT_TIMEOUT_S, **kwargs)


def test_asyncpg_transaction_mode_without_statement_cache(tx_proxy, scratch_table):
    table = scratch_table("apg")

    async def main():
        conn = await _asyncpg_connect(tx_proxy, statement_cache_size=0)
        other = await _asyncpg_connect(tx_proxy, statement_cache_size=0)
        try:
            assert await conn.fetchval("SELECT $1::int + $2::int", 40, 2) == 42
            assert await other.fetchval("SELECT $1::text", "other") == "other"
            rows = await conn.fetch("SELECT g, g * 2 AS double FROM generate_series(1, $1) g", 5)
            assert [(r["g"], r["double"]) for r in rows] == [(i, i * 2) for i in range(1, 6)]
            assert await conn.fetchrow("SELECT $1::text AS t, $2::bytea AS b", "x", b"\x00\x01") \
                == ("x", b"\x00\x01")
            await conn.execute(f"CREATE TABLE {table} (id int, name text, at timestamptz)")
            await conn.executemany(f"INSERT INTO {table} (id, name) VALUES ($1, $2)",
                                   [(i, f"name {i}") for i in range(200)])
            assert await other.fetchval(f"SELECT count(*) FROM {table}") == 200
            async with conn.transaction():
                await conn.execute(f"DELETE FROM {table} WHERE id < $1", 100)
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 100
            assert await other.fetchval(f"SELECT count(*) FROM {table}") == 100
            with pytest.raises(asyncpg.DivisionByZeroError):
                async with conn.transaction():
                    await conn.execute(f"DELETE FROM {table}")
                    await conn.execute("SELECT 1 / 0")
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 100
            # Types the codec must introspect (arrays, jsonb, records of a custom type).
            assert await conn.fetchval("SELECT $1::int[]", [1, 2, 3]) == [1, 2, 3]
            assert await conn.fetchval("SELECT '{\"a\": 1}'::jsonb") == '{"a": 1}'
        finally:
            await conn.close()
            await other.close()

    run_async(main())


def test_asyncpg_session_mode_with_prepared_statements(pgmulti):
    proxy = pgmulti({"pool_mode": "session", "default_pool_size": 2})

    async def main():
        conn = await _asyncpg_connect(proxy)  # default statement cache: named statements
        try:
            for i in range(5):
                assert await conn.fetchval("SELECT $1::int * 3", i) == i * 3
            statement = await conn.prepare("SELECT $1::text || '!'")
            assert await statement.fetchval("hi") == "hi!"
            assert await statement.fetchval("again") == "again!"
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql") >= 2
            async with conn.transaction():
                assert await conn.fetchval("SELECT txid_current() > 0") is True
                await conn.executemany("SELECT $1::int", [(i,) for i in range(10)])
        finally:
            await conn.close()

    run_async(main())


def test_asyncpg_query_timeout_cancels_and_connection_survives(tx_proxy):
    async def main():
        conn = await _asyncpg_connect(tx_proxy, statement_cache_size=0)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(10)", timeout=0.5)
            assert loop.time() - started < 3
            # asyncpg sent a cancel request and waited for the query to end.
            assert await conn.fetchval("SELECT 5", timeout=5) == 5
        finally:
            await conn.close()

    run_async(main())


def test_asyncpg_copy(tx_proxy, scratch_table):
    table = scratch_table("apgcopy")

    async def main():
        conn = await _asyncpg_connect(tx_proxy, statement_cache_size=0)
        try:
            await conn.execute(f"CREATE TABLE {table} (id int, label text)")
            records = [(i, f"label {i}") for i in range(COPY_ROWS)]
            await conn.copy_records_to_table(table, records=records)
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == COPY_ROWS
            back = await conn.fetch(f"SELECT id, label FROM {table} ORDER BY id")
            assert [tuple(r) for r in back] == records
        finally:
            await conn.close()

    run_async(main())


# --- psql ---


def test_psql_copy_in_and_out(tx_proxy, scratch_table, tmp_path):
    table = scratch_table("psqlcopy")
    source = tmp_path / "in.csv"
    source.write_text("".join(f"{i},\"text, {i}\"\n" for i in range(COPY_ROWS)))
    target = tmp_path / "out.csv"
    script = (
        f"CREATE TABLE {table} (id int, label text);\n"
        f"\\copy {table} FROM '{source}' WITH (FORMAT csv)\n"
        f"SELECT count(*), sum(id) FROM {table};\n"
        f"\\copy (SELECT * FROM {table} ORDER BY id) TO '{target}' WITH (FORMAT csv)\n"
    )
    result = run_psql_script(tx_proxy, script, extra=("-v", "ON_ERROR_STOP=1"))
    assert result.returncode == 0, result.stderr
    assert f"{COPY_ROWS}|{sum(range(COPY_ROWS))}" in result.stdout.splitlines()
    assert target.read_text() == source.read_text()


def test_psql_multi_statement_query_string(tx_proxy):
    result = tx_proxy.psql("select 1; select 2;", db="testdb")
    assert (result.returncode, result.stdout.split()) == (0, ["1", "2"]), result.stderr
    # A multi-statement string is one implicit transaction: a failure rolls back all of it.
    result = tx_proxy.psql("select 1; select 1/0; select 3;", db="testdb")
    assert result.returncode != 0 and "division by zero" in result.stderr
    assert "3" not in result.stdout.split()


def test_psql_error_in_transaction_then_rollback(tx_proxy, scratch_table):
    table = scratch_table("psqlerr")
    script = (
        "BEGIN;\n"
        f"CREATE TABLE {table} (n int);\n"
        f"INSERT INTO {table} VALUES (1);\n"
        "SELECT 1 / 0;\n"
        "SELECT 'unreached';\n"
        "ROLLBACK;\n"
        f"SELECT to_regclass('{table}') IS NULL AS rolled_back;\n"
    )
    result = run_psql_script(tx_proxy, script)
    assert "division by zero" in result.stderr, result
    assert "current transaction is aborted" in result.stderr, result
    assert result.stdout.splitlines()[-1] == "t", result.stdout
    # The one server went back to the pool in a clean state.
    followup = tx_proxy.psql("SELECT 'next client'", db="testdb")
    assert followup.stdout.strip() == "next client", followup.stderr


def test_out_of_descriptors_a_new_client_waits_and_the_others_go_on(pgmulti):
    """With no descriptor left, accept() fails: as PgBouncer, pgmulti stops accepting for 5
    seconds at a time (logged each time, not a busy loop), its clients go on, and the waiting
    client is let in once descriptors are free again."""
    proxy = pgmulti({"pool_mode": "transaction"})
    with connect(proxy) as first:
        assert scalar(first, "SELECT 1") == 1
        soft, hard = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
        # New descriptors take the lowest free number: a limit at it leaves none.
        in_use = {int(fd) for fd in os.listdir(f"/proc/{proxy.pid}/fd")}
        lowest_free = min(set(range(len(in_use) + 1)) - in_use)
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        waiting = {}

        def late_client():
            try:
                with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=20,
                                     autocommit=True) as conn:
                    waiting["answer"] = scalar(conn, "SELECT 'let in'")
            except Exception as exc:  # reported by the assertion below
                waiting["error"] = exc
        thread = threading.Thread(target=late_client)
        started = time.monotonic()
        thread.start()
        try:
            wait_for(lambda: "Too many open files" in proxy.log_text(), 10, "the accept failure")
            for i in range(20):
                assert scalar(first, "SELECT %s::int", [i]) == i
            time.sleep(1.5)
        finally:
            resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (soft, hard))
        thread.join(20)
        assert waiting == {"answer": "let in"}
        failures = proxy.log_text().count("accept() failed")
        assert 1 <= failures <= (time.monotonic() - started) / 5 + 1, "one try per 5 seconds"
