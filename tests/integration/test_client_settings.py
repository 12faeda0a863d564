"""PgBouncer settings that change what a client sees: application_name_add_host,
disable_pqexec, query_wait_notify and scram_iterations."""

from __future__ import annotations

import os
import socket
import struct
import threading

import psycopg
import pytest

from support import Raw, client_port, message, startup_packet

CONNECT_TIMEOUT = 10


def application_name(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT current_setting('application_name')").fetchone()[0]


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_application_name_add_host(pgmulti, pool_mode):
    proxy = pgmulti({"application_name_add_host": 1, "pool_mode": pool_mode})
    for _ in range(2):  # the second login must not reuse the first one's name
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                             application_name="billing", autocommit=True) as conn:
            expected = f"billing - 127.0.0.1:{client_port(conn)}"
            assert conn.info.parameter_status("application_name") == expected
            assert application_name(conn) == expected
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                         autocommit=True) as conn:
        assert application_name(conn) == f"app - 127.0.0.1:{client_port(conn)}"
    # Over the Unix socket: the client's process id and this host's name.
    with psycopg.connect(host=str(proxy.workdir), port=proxy.port, dbname="testdb",
                         user="postgres", application_name="cron",
                         connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
        expected = f"cron - unix({os.getpid()}@{socket.gethostname()}):{proxy.port}"
        assert application_name(conn) == expected


def test_application_name_is_left_alone_by_default(pgmulti):
    proxy = pgmulti()
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                         application_name="billing", autocommit=True) as conn:
        assert application_name(conn) == "billing"


@pytest.mark.parametrize("prepared", [0, 200])
def test_disable_pqexec_refuses_simple_query_only(pgmulti, prepared):
    proxy = pgmulti({"disable_pqexec": 1, "max_prepared_statements": prepared})
    # The extended protocol works, prepared statements too.
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                         autocommit=True) as conn:
        assert conn.execute("SELECT %s::int", [7]).fetchone() == (7,)
        assert conn.execute("SELECT %s::int", [8], prepare=True).fetchone() == (8,)
    # A simple Query closes the connection with PgBouncer's error.
    result = proxy.psql("SELECT 1", db="testdb")
    assert result.returncode != 0
    assert "PQexec disallowed" in result.stderr
    # The admin console speaks only the simple protocol and is not affected.
    assert proxy.psql("SHOW VERSION", db="pgbouncer").returncode == 0


def test_query_wait_notify(pgmulti):
    proxy = pgmulti({"default_pool_size": 1, "query_wait_notify": 1})
    notices: list[str] = []
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT) as holder:
        holder.execute("SELECT 1")  # a transaction stays open: the only server is taken
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                             autocommit=True) as queued:
            queued.add_notice_handler(lambda diag: notices.append(diag.message_primary))
            release = threading.Timer(2.5, holder.commit)
            release.start()
            try:
                # Waits for the holder's commit: more than query_wait_notify, told once.
                assert queued.execute("SELECT 2").fetchone() == (2,)
            finally:
                release.join()
            assert notices == [
                "No server connection available in postgres backend, client being queued"]
            assert queued.execute("SELECT 3").fetchone() == (3,)  # no wait: no notice
            assert len(notices) == 1


def sasl_iterations(proxy, user: str) -> int:
    """Start a SCRAM login by hand; the iteration count in the server-first message."""
    with Raw(proxy) as raw:
        raw.send(startup_packet({"user": user, "database": "testdb"}))
        msg_type, body = raw.read_message()
        assert (msg_type, struct.unpack("!I", body[:4])[0]) == (b"R", 10), body  # SASL
        client_first = b"n,,n=,r=0123456789abcdef"
        raw.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(client_first))
                         + client_first))
        msg_type, body = raw.read_message()
        assert (msg_type, struct.unpack("!I", body[:4])[0]) == (b"R", 11), body  # continue
        attributes = dict(part.split(b"=", 1) for part in body[4:].split(b","))
        return int(attributes[b"i"])


def test_scram_iterations_for_plain_passwords(pgmulti):
    users = '"postgres" "pg-secret"\n'
    proxy = pgmulti({"auth_type": "scram-sha-256", "scram_iterations": 8192}, users)
    assert sasl_iterations(proxy, "postgres") == 8192
    with psycopg.connect(proxy.dsn(db="testdb", password="pg-secret"),
                         connect_timeout=CONNECT_TIMEOUT) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
