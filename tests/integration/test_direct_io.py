"""Direct I/O: once a plain connection is busy, the codec reads and writes its socket itself
(pgmulti._codec.DirectIO). These tests drive connections into that mode and then through
what it hands back to the transport: a socket too full to take a whole write (a slow client,
a slow server), a client that vanishes (a server terminated under a direct client is in
test_pool_modes). Every result is checked in full, so a byte dropped, changed, duplicated or
sent out of order, or sent to the wrong connection, fails the test.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from support import Raw, direct_io_counters, direct_io_reaching, query_message, wait_for
from test_pool_modes import CONNECT_TIMEOUT_S, connect, scalar

VERBOSE = {"stats_period": 1, "verbose": 1}
WARM_UP_QUERIES = 5   # more than the reads a client makes through uvloop before going direct


def take_turns_on_servers(open_connection, clients: int = 6) -> None:
    """`clients` threads on connections of their own run 60 queries each (three of them with
    3,000-row replies, several reads on either side) and check every answer; the first
    failure is raised here, as is a client that hangs."""
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with open_connection() as conn:
                for i in range(60):
                    value = n * 1000 + i
                    assert scalar(conn, "SELECT %s::int", [value]) == value
                    if i % 20 == 0:
                        rows = conn.execute("SELECT g, repeat('x', g % 97) FROM "
                                            "generate_series(1, 3000) g").fetchall()
                        assert rows == [(g, "x" * (g % 97)) for g in range(1, 3001)]
        except BaseException as exc:  # reported below, with the thread's own assertion
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[0]
    assert not any(thread.is_alive() for thread in threads), "a client hung"


@pytest.mark.parametrize("listener", ["tcp", "unix"])
def test_busy_clients_share_servers_directly(pgmulti, listener):
    """Several clients take turns on two servers, every transaction answered by its own."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 2, **VERBOSE})

    def open_connection() -> psycopg.Connection:
        if listener == "tcp":
            return connect(proxy)
        return psycopg.connect(host=str(proxy.workdir), port=proxy.port, dbname="testdb",
                               user="postgres", autocommit=True, prepare_threshold=None,
                               connect_timeout=CONNECT_TIMEOUT_S)

    take_turns_on_servers(open_connection)
    counters = direct_io_reaching(proxy, reads=300, sends=300)
    # The process's loop waits in the codec's epoll set (DirectIO.drive_loop) and gives
    # libuv a turn only when libuv has work: far fewer turns than the codec's waits.
    assert counters["waits"] > 100
    assert counters["loop_turns"] < counters["waits"]


def read_a_big_result_slowly(raw: Raw, rows: int = 200_000) -> None:
    """Ask for 22 MB (more than the kernel buffers between pgmulti and us hold), let every
    buffer fill up before reading, then check that every row came, in order."""
    raw.send(query_message(f"SELECT g, repeat('y', 90) FROM generate_series(1, {rows}) g"))
    time.sleep(1.0)
    messages = raw.read_until(b"Z", timeout=60)
    data_rows = [body for msg_type, body in messages if msg_type == b"D"]
    assert len(data_rows) == rows
    for expected, body in enumerate(data_rows, start=1):
        first_len = int.from_bytes(body[2:6], "big")
        assert int(body[6:6 + first_len]) == expected
    assert messages[-2][0] == b"C" and messages[-2][1] == f"SELECT {rows}\0".encode()


def test_a_client_too_slow_for_its_result_gets_all_of_it_in_order(pgmulti):
    """The client's socket fills: the rest of a send goes to the transport, reading from the
    server pauses, and direct sends wait until the transport has written what it holds."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1, **VERBOSE})
    with Raw(proxy, timeout=30) as raw:
        raw.login()
        for i in range(WARM_UP_QUERIES):
            assert raw.simple_query(f"SELECT {i}")[-1][0] == b"Z"
        read_a_big_result_slowly(raw)
        # The connection goes on, still in order.
        assert raw.simple_query("SELECT 'after'")[1][1].endswith(b"after")
    direct_io_reaching(proxy, handed_back=1)


def test_a_client_vanishing_mid_query_frees_its_server(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1, **VERBOSE})
    with Raw(proxy) as raw:
        raw.login()
        for i in range(WARM_UP_QUERIES):
            raw.simple_query(f"SELECT {i}")
        raw.send(query_message("SELECT pg_sleep(0.3)"))
    # The only server is given to the next client once the abandoned query is over.
    with connect(proxy) as conn:
        for i in range(WARM_UP_QUERIES):
            assert scalar(conn, "SELECT %s::int", [i]) == i
    direct_io_reaching(proxy, reads=10)


def test_a_plain_client_socket_is_the_codecs_from_accept_on(pgmulti):
    """A plain client's socket is read and written by the codec from accept on (a
    SocketTransport, counted as a client): it is never duplicated, busy or idle; only the
    server's socket, which uvloop opened, is (sockets)."""
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1, **VERBOSE})

    def watched(sockets: int, clients: int):
        def now() -> bool:
            counters = direct_io_counters(proxy) or {}
            return counters.get("sockets") == sockets and counters.get("clients") == clients
        return now

    with connect(proxy) as conn:
        for i in range(WARM_UP_QUERIES):
            assert scalar(conn, "SELECT %s::int", [i]) == i
        wait_for(watched(1, 1), 5, "the server direct, the client the codec's")
    wait_for(watched(1, 0), 5, "the client's socket closed")


def copy_into_a_slow_server(conn: psycopg.Connection, rows: int = 400) -> None:
    """COPY FROM faster than the server takes it (a trigger sleeps for every row): its socket
    fills, so pgmulti's writes to it queue while the client is still read. Every row is
    different and is checked on the server: bytes overwritten while they wait to be sent, or
    sent twice, fail the check."""
    lines = [(f"{row}\t" + f"{row:07d}" * 2000 + "\n").encode() for row in range(rows)]
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE slow_copy (n int, t text) ON COMMIT DROP")
        # OR REPLACE: the function stays in the pooled server connection's temporary schema.
        conn.execute("CREATE OR REPLACE FUNCTION pg_temp.slowly() RETURNS trigger "
                     "LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER slowly BEFORE INSERT ON slow_copy "
                     "FOR EACH ROW EXECUTE FUNCTION pg_temp.slowly()")
        with conn.cursor().copy("COPY slow_copy FROM STDIN") as copy:
            for line in lines:
                copy.write(line)
        counts = conn.execute("SELECT count(*), count(*) FILTER (WHERE t <> repeat("
                              "lpad(n::text, 7, '0'), 2000)) FROM slow_copy").fetchone()
        assert counts == (rows, 0), "rows copied, rows changed on the way"


def test_copy_into_a_server_that_reads_slowly_arrives_intact(pgmulti):
    proxy = pgmulti({"pool_mode": "transaction", "default_pool_size": 1, **VERBOSE})
    with connect(proxy) as conn:
        copy_into_a_slow_server(conn)
        assert scalar(conn, "SELECT 1") == 1
