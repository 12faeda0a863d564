"""What the pooler runs on server connections itself: connect_query and server_check_query."""

from __future__ import annotations

import time

import psycopg


def connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user="postgres", db="testdb"), connect_timeout=5,
                           autocommit=True, **kwargs)


def backend_pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_connect_query_runs_on_each_new_server(pgmulti, base_config):
    proxy = pgmulti(base_config(
        databases={"testdb": "host=127.0.0.1 port={pg_port} dbname=testdb "
                             "connect_query='SET work_mem TO 1234'"},
        pool_mode="session"))
    with connect(proxy) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("1234kB",)


def test_failing_server_check_replaces_the_server(pgmulti):
    # server_check_delay = 0: every reuse is checked; a failing check closes the server.
    proxy = pgmulti({"server_check_delay": 0, "server_check_query": "SELECT no_such_function()"})
    with connect(proxy) as conn:
        first = backend_pid(conn)
        time.sleep(0.05)
        second = backend_pid(conn)
    assert first != second
    assert "server check query failed" in proxy.log_text()


def test_passing_server_check_keeps_the_server(pgmulti):
    proxy = pgmulti({"server_check_delay": 0, "server_check_query": "SELECT 1"})
    with connect(proxy) as conn:
        first = backend_pid(conn)
        time.sleep(0.05)
        assert backend_pid(conn) == first

