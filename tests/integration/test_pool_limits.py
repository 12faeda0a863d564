"""Pool limits and timeouts of a real pgmulti process in front of the session PostgreSQL cluster.

Errors the proxy sends on its own (login refusals, timeouts of idle clients) are read with a
minimal protocol client, so their SQLSTATE is checked exactly; client libraries only show the
message text for errors at connect time.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from pgmulti.cluster import find_free_port
from support import admin, wait_for

CONNECT_TIMEOUT_S = 5


# --- helpers ---


def connect(proxy, *, db: str = "testdb", user: str = "postgres", autocommit: bool = True,
            **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user=user, db=db), connect_timeout=CONNECT_TIMEOUT_S,
                           autocommit=autocommit, prepare_threshold=None, **kwargs)


def scalar(conn: psycopg.Connection, sql: str, params=None):
    return conn.execute(sql, params).fetchone()[0]


def backend_pid(conn: psycopg.Connection) -> int:
    return scalar(conn, "SELECT pg_backend_pid()")


class RawClient:
    """Just enough of the frontend protocol (trust auth, simple queries) to see every message."""

    def __init__(self, port: int, user: str = "postgres", database: str = "testdb",
                 timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        params = b"".join(key.encode() + b"\0" + value.encode() + b"\0"
                          for key, value in (("user", user), ("database", database)))
        body = struct.pack("!i", 3 << 16) + params + b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _read_exact(self, size: int, deadline: float) -> bytes | None:
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the proxy in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def read_message(self, timeout: float = 5.0) -> tuple[str, bytes] | None:
        """(type, body), or None when the proxy closed the connection."""
        deadline = time.monotonic() + timeout
        header = self._read_exact(5, deadline)
        if header is None:
            return None
        kind, length = header[:1].decode(), struct.unpack("!i", header[1:])[0]
        body = self._read_exact(length - 4, deadline)
        if body is None:
            return None
        return kind, body

    def read_until(self, kinds: str, timeout: float = 5.0) -> tuple[str, bytes] | None:
        """Messages until one of `kinds` (returned) or the end of the connection (None)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.read_message(max(0.0, deadline - time.monotonic()))
            if message is None or message[0] in kinds:
                return message

    def login(self, timeout: float = 5.0) -> dict[str, str] | None:
        """None when logged in (ReadyForQuery), else the ErrorResponse fields."""
        message = self.read_until("ZE", timeout)
        assert message is not None, "connection closed during login"
        return None if message[0] == "Z" else error_fields(message[1])

    def query(self, sql: str, timeout: float = 5.0) -> tuple[list[list[str | None]], dict | None]:
        """Rows and the error fields (or None) of one simple query.

        A FATAL error may end the connection instead of ReadyForQuery.
        """
        self.sock.sendall(b"Q" + struct.pack("!i", len(sql.encode()) + 5) + sql.encode() + b"\0")
        rows, error = [], None
        deadline = time.monotonic() + timeout
        while True:
            message = self.read_message(max(0.0, deadline - time.monotonic()))
            if message is None:
                assert error is not None and error["S"] == "FATAL", f"closed during {sql!r}"
                return rows, error
            kind, body = message
            if kind == "D":
                rows.append(data_row(body))
            elif kind == "E":
                error = error_fields(body)
            elif kind == "Z":
                return rows, error

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True when the proxy closes the connection within `timeout` (messages are skipped)."""
        try:
            return self.read_until("", timeout) is None
        except TimeoutError:
            return False


def error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1].decode()] = part[1:].decode(errors="replace")
    return fields


def data_row(body: bytes) -> list[str | None]:
    count = struct.unpack("!h", body[:2])[0]
    values, pos = [], 2
    for _ in range(count):
        length = struct.unpack("!i", body[pos:pos + 4])[0]
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length].decode())
            pos += length
    return values


POOL_SERVER_COLUMNS = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")


def pool_servers(proxy, database: str = "testdb", user: str = "postgres") -> int:
    for row in admin(proxy, "SHOW POOLS"):
        if row["database"] == database and row["user"] == user:
            return sum(int(row[column]) for column in POOL_SERVER_COLUMNS)
    return 0


class Background:
    """Run fn() in a thread; .result / .error / .elapsed once done."""

    def __init__(self, fn: Callable[[], object]):
        self.result: object = None
        self.error: BaseException | None = None
        self.elapsed: float | None = None
        self._fn = fn
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        self.elapsed = time.monotonic() - started

    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout:g} s"
        if self.error is not None:
            raise self.error


# --- max_client_conn ---


def test_max_client_conn_refuses_the_next_client(pgmulti):
    proxy = pgmulti({"max_client_conn": 2})
    with connect(proxy) as first, connect(proxy) as second:
        assert scalar(first, "SELECT 1") == scalar(second, "SELECT 1") == 1
        with RawClient(proxy.port) as third:
            error = third.login()
            assert error is not None and error["C"] == "53300", error
            assert error["S"] == "FATAL"
            assert third.is_closed()
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            connect(proxy)
    # Once the others left there is room again.
    with connect(proxy) as conn:
        assert scalar(conn, "SELECT 2") == 2


# --- waiting for a server ---


def test_query_wait_timeout(pgmulti):
    proxy = pgmulti({"default_pool_size": 1, "query_wait_timeout": 1})
    with connect(proxy) as holder, connect(proxy) as waiter, RawClient(proxy.port) as raw:
        holder.execute("BEGIN")
        holder_pid = backend_pid(holder)
        assert raw.login() is None
        started = time.monotonic()
        # Both wait at the same time: psycopg in a thread, the raw client here.
        job = Background(lambda: waiter.execute("SELECT 1"))
        _, error = raw.query("SELECT 1")
        assert error is not None and (error["S"], error["C"]) == ("FATAL", "53300"), error
        assert error["M"] == "query_wait_timeout"
        assert 0.8 <= time.monotonic() - started <= 3.0
        assert raw.is_closed()
        with pytest.raises(psycopg.OperationalError) as excinfo:
            job.join(3)
        assert excinfo.value.sqlstate == "53300", excinfo.value
        assert "query_wait_timeout" in str(excinfo.value)
        assert 0.8 <= job.elapsed <= 3.0, job.elapsed
        # The holder is unaffected.
        assert backend_pid(holder) == holder_pid
        holder.execute("COMMIT")


def test_reserve_pool_serves_a_waiting_client(pgmulti):
    proxy = pgmulti({"default_pool_size": 1, "reserve_pool_size": 1,
                     "reserve_pool_timeout": 0.5})
    with connect(proxy) as holder, connect(proxy) as waiter:
        holder.execute("BEGIN")
        holder_pid = backend_pid(holder)
        started = time.monotonic()
        waiter_pid = backend_pid(waiter)
        elapsed = time.monotonic() - started
        assert waiter_pid != holder_pid
        assert 0.4 <= elapsed <= 2.0, elapsed
        holder.execute("COMMIT")
        assert pool_servers(proxy) == 2


def test_without_reserve_pool_a_client_waits(pgmulti):
    proxy = pgmulti({"default_pool_size": 1})
    with connect(proxy) as holder, connect(proxy) as waiter:
        holder.execute("BEGIN")
        holder_pid = backend_pid(holder)
        job = Background(lambda: backend_pid(waiter))
        time.sleep(0.7)
        assert not job.done(), "a second server was opened beyond default_pool_size"
        holder.execute("COMMIT")
        job.join(3)
        assert job.result == holder_pid


LIMIT_PAIRS = {
    # limit -> connect() arguments of two clients in different pools sharing that limit
    "max_db_connections": ({"user": "postgres"}, {"user": "plainuser"}),  # same database
    "max_user_connections": ({"db": "testdb"}, {"db": "postgres"}),  # same user
}


def total_servers(proxy) -> int:
    return sum(int(row[column]) for row in admin(proxy, "SHOW POOLS")
               for column in POOL_SERVER_COLUMNS)


@pytest.mark.parametrize("limit", list(LIMIT_PAIRS))
def test_login_of_a_new_pool_respects_the_limit(pgmulti, limit):
    proxy = pgmulti({"default_pool_size": 5, limit: 1})
    first_kw, second_kw = LIMIT_PAIRS[limit]
    with connect(proxy, **first_kw) as first:
        assert scalar(first, "SELECT 1") == 1
        with connect(proxy, **second_kw) as second:
            assert scalar(second, "SELECT 2") == 2
            assert total_servers(proxy) <= 1


@pytest.mark.parametrize("limit", list(LIMIT_PAIRS))
def test_connection_limit_across_pools(pgmulti, limit):
    """Two pools sharing a limit of 1: the second waits until the first releases its server."""
    proxy = pgmulti({"default_pool_size": 5, limit: 1})
    first_kw, second_kw = LIMIT_PAIRS[limit]
    with connect(proxy, **first_kw) as first, connect(proxy, **second_kw) as second:
        first.execute("BEGIN")
        backend_pid(first)
        job = Background(lambda: (scalar(second, "SELECT current_user || '@' || "
                                                 "current_database()"), time.monotonic()))
        time.sleep(0.7)
        assert not job.done(), f"{limit}=1 let a second server open"
        committed = time.monotonic()
        first.execute("COMMIT")
        job.join(5)
        who, finished = job.result
        assert finished >= committed
        expected_user = second_kw.get("user", "postgres")
        expected_db = second_kw.get("db", "testdb")
        assert who == f"{expected_user}@{expected_db}"
        assert total_servers(proxy) <= 1


@pytest.mark.parametrize("limit", list(LIMIT_PAIRS))
def test_connection_limit_within_one_pool(pgmulti, limit):
    """Same database and user: the limit of 1 holds below default_pool_size=5."""
    proxy = pgmulti({"default_pool_size": 5, limit: 1})
    with connect(proxy) as first, connect(proxy) as second:
        first.execute("BEGIN")
        first_pid = backend_pid(first)
        job = Background(lambda: backend_pid(second))
        time.sleep(0.7)
        assert not job.done()
        first.execute("COMMIT")
        job.join(3)
        assert job.result == first_pid


# --- pool growth and shrinkage ---


def test_min_pool_size_opens_servers_in_advance(pgmulti):
    proxy = pgmulti({"min_pool_size": 2, "default_pool_size": 5})
    with connect(proxy) as conn:
        started = time.monotonic()
        wait_for(lambda: pool_servers(proxy) >= 2, 3, interval=0.1, what="2 servers in the pool")
        assert time.monotonic() - started <= 2.5
        time.sleep(0.5)
        assert pool_servers(proxy) == 2  # not more than asked for
        assert scalar(conn, "SELECT 1") == 1


def test_server_idle_timeout_closes_idle_servers(pgmulti, pg):
    proxy = pgmulti({"server_idle_timeout": 1})
    with connect(proxy) as conn:
        pid = backend_pid(conn)
    servers = admin(proxy, "SHOW SERVERS")
    assert [int(row["remote_pid"]) for row in servers] == [pid]
    started = time.monotonic()
    wait_for(lambda: not admin(proxy, "SHOW SERVERS"), 4, interval=0.1, what="no servers")
    assert 0.5 <= time.monotonic() - started <= 3.0
    # PostgreSQL saw the backend go.
    with psycopg.connect(pg.dsn(), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as direct:
        wait_for(lambda: not scalar(direct, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                    [pid]), 3, what="backend exit")
    # And a new client gets a fresh server.
    with connect(proxy) as conn:
        assert backend_pid(conn) != pid


def test_server_lifetime_replaces_old_servers_when_released(pgmulti):
    proxy = pgmulti({"server_lifetime": 1, "default_pool_size": 1})
    with connect(proxy) as conn:
        conn.execute("BEGIN")
        first_pid = backend_pid(conn)
        time.sleep(1.5)
        # Older than server_lifetime, but in use: it is not closed under the client.
        assert backend_pid(conn) == first_pid
        conn.execute("COMMIT")
        second_pid = backend_pid(conn)
        assert second_pid != first_pid
        # A young server is reused.
        assert backend_pid(conn) == second_pid


def test_server_lifetime_closes_idle_servers(pgmulti):
    proxy = pgmulti({"server_lifetime": 1})
    with connect(proxy) as conn:
        first_pid = backend_pid(conn)
    wait_for(lambda: not admin(proxy, "SHOW SERVERS"), 4, interval=0.1, what="no servers")
    with connect(proxy) as conn:
        assert backend_pid(conn) != first_pid


# --- client timeouts ---


def test_client_idle_timeout(pgmulti):
    proxy = pgmulti({"client_idle_timeout": 1})
    lib_client = connect(proxy)
    try:
        with RawClient(proxy.port) as idle, RawClient(proxy.port) as busy:
            assert idle.login() is None and busy.login() is None
            assert scalar(lib_client, "SELECT 1") == 1
            started = time.monotonic()
            # The busy client keeps talking and is left alone.
            while time.monotonic() - started < 2.0:
                rows, error = busy.query("SELECT 1")
                assert error is None and rows == [["1"]]
                time.sleep(0.2)
            message = idle.read_until("E", timeout=3)
            assert message is not None, "closed without an error message"
            error = error_fields(message[1])
            assert (error["S"], error["C"]) == ("FATAL", "57P05"), error
            assert idle.is_closed()
            rows, error = busy.query("SELECT 2")
            assert error is None and rows == [["2"]]
        # psycopg, idle as long, finds its connection closed.
        with pytest.raises(psycopg.OperationalError):
            lib_client.execute("SELECT 1")
    finally:
        lib_client.close()


def test_idle_transaction_timeout(pgmulti):
    proxy = pgmulti({"idle_transaction_timeout": 1, "default_pool_size": 1})
    with RawClient(proxy.port) as in_xact, RawClient(proxy.port) as idle:
        assert in_xact.login() is None and idle.login() is None
        rows, error = in_xact.query("BEGIN; SELECT pg_backend_pid()")
        assert error is None
        server_pid = rows[0][0]
        started = time.monotonic()
        message = in_xact.read_until("E", timeout=3)
        assert message is not None, "closed without an error message"
        error = error_fields(message[1])
        assert (error["S"], error["C"]) == ("FATAL", "25P03"), error
        assert 0.8 <= time.monotonic() - started <= 2.5
        assert in_xact.is_closed()
        # A client idle outside a transaction is not affected; the server that was left inside
        # a transaction is not reused.
        rows, error = idle.query("SELECT pg_backend_pid(), now() = statement_timestamp()")
        assert error is None
        assert rows[0][0] != server_pid and rows[0][1] == "t"


def test_query_timeout_closes_a_long_query(pgmulti):
    proxy = pgmulti({"query_timeout": 1})
    with RawClient(proxy.port) as client:
        assert client.login() is None
        started = time.monotonic()
        _, error = client.query("SELECT pg_sleep(10)", timeout=5)
        assert error is not None and (error["S"], error["C"]) == ("FATAL", "57014"), error
        assert 0.8 <= time.monotonic() - started <= 2.5
    with connect(proxy) as conn:  # the pool recovers
        assert scalar(conn, "SELECT 1") == 1


def test_transaction_timeout_closes_a_long_transaction(pgmulti):
    proxy = pgmulti({"transaction_timeout": 1})
    with RawClient(proxy.port) as client:
        assert client.login() is None
        _, error = client.query("BEGIN")
        assert error is None
        message = client.read_until("E", timeout=3)
        assert message is not None
        error = error_fields(message[1])
        assert (error["S"], error["C"]) == ("FATAL", "25P04"), error


@pytest.mark.parametrize("limit", ["max_db_client_connections", "max_user_client_connections"])
def test_client_connection_limits(pgmulti, limit):
    proxy = pgmulti({limit: 1})
    with connect(proxy) as first:
        assert scalar(first, "SELECT 1") == 1
        with RawClient(proxy.port) as second:
            error = second.login()
            assert error is not None and error["C"] == "53300" and limit in error["M"], error


# --- failures reaching PostgreSQL ---


def test_unknown_database(pgmulti):
    proxy = pgmulti()
    with RawClient(proxy.port, database="no_such_db") as client:
        error = client.login()
        assert error is not None and (error["S"], error["C"]) == ("FATAL", "3D000"), error
        assert client.is_closed()
    with pytest.raises(psycopg.OperationalError, match="no_such_db"):
        connect(proxy, db="no_such_db")


def test_postgres_down_gives_connection_failure(pgmulti, base_config):
    closed_port = find_free_port()
    config = base_config(server_connect_timeout=3, server_login_retry=1,
                         databases={"downdb": f"host=127.0.0.1 port={closed_port} dbname=testdb"})
    proxy = pgmulti(config)
    for _ in range(2):  # the first attempt, then one inside server_login_retry
        started = time.monotonic()
        with RawClient(proxy.port, database="downdb") as client:
            error = client.login()
            assert error is not None and (error["S"], error["C"]) == ("FATAL", "08006"), error
            assert client.is_closed()
        assert time.monotonic() - started < 3.0
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, db="downdb")
    # Other databases are unaffected.
    with connect(proxy) as conn:
        assert scalar(conn, "SELECT 1") == 1


def test_server_connect_timeout_on_a_silent_server(pgmulti, base_config):
    """A port that accepts TCP connections but never answers the startup packet."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        config = base_config(server_connect_timeout=1,
                             databases={"silentdb": f"host=127.0.0.1 port={port} dbname=testdb"})
        proxy = pgmulti(config)
        started = time.monotonic()
        with RawClient(proxy.port, database="silentdb") as client:
            error = client.login(timeout=5)
            elapsed = time.monotonic() - started
            assert error is not None and (error["S"], error["C"]) == ("FATAL", "08006"), error
        assert 0.8 <= elapsed <= 3.0, elapsed
    finally:
        silent.close()


# --- many clients ---


def test_many_clients_share_a_small_pool(pgmulti):
    clients, transactions, pool_size = 50, 20, 5
    proxy = pgmulti({"default_pool_size": pool_size, "max_client_conn": 100})
    barrier = threading.Barrier(clients, timeout=15)
    pids: set[int] = set()
    lock = threading.Lock()

    def client(index: int) -> int:
        with connect(proxy) as conn:
            barrier.wait()
            seen = set()
            for n in range(transactions):
                with conn.transaction():
                    row = conn.execute("SELECT %s::int, %s::int, pg_backend_pid()",
                                       [index, n]).fetchone()
                    assert row[:2] == (index, n)
                    seen.add(row[2])
                    conn.execute("SELECT 1")
            with lock:
                pids.update(seen)
            return transactions

    # The pool's first server comes from one login; concurrent first logins are covered by
    # test_concurrent_first_logins_respect_pool_size.
    with connect(proxy) as warm:
        assert scalar(warm, "SELECT 1") == 1
    jobs = [Background(lambda i=i: client(i)) for i in range(clients)]
    deadline = time.monotonic() + 25
    for job in jobs:
        job.join(max(0.1, deadline - time.monotonic()))
    assert sum(job.result for job in jobs) == clients * transactions
    assert 1 <= len(pids) <= pool_size, pids
    assert pool_servers(proxy) <= pool_size


def test_concurrent_first_logins_respect_pool_size(pgmulti, pg):
    proxy = pgmulti({"default_pool_size": 1})

    async def login_all(count: int) -> list[int]:
        async def one() -> psycopg.AsyncConnection:
            return await psycopg.AsyncConnection.connect(
                proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True,
                prepare_threshold=None)

        conns = await asyncio.gather(*(one() for _ in range(count)))
        try:
            pids = []
            for conn in conns:
                cur = await conn.execute("SELECT pg_backend_pid()")
                pids.append((await cur.fetchone())[0])
            return pids
        finally:
            for conn in conns:
                await conn.close()

    pids = asyncio.run(asyncio.wait_for(login_all(20), 20))
    servers = admin(proxy, "SHOW SERVERS")
    assert len(servers) <= 1, [row["remote_pid"] for row in servers]
    assert len(set(pids)) == 1, pids
