"""Short-lived connections (pgbench -C's pattern): a login whose steps need no waiting
completes at once, and the connection's first transaction is linked by the codec.

Every connection checks what it was told at login (ParameterStatus, built once per pool and
set of startup parameters) and the answer to its own query, so a greeting cached for the
wrong parameters or a server handed to the wrong client fails the test.
"""

from __future__ import annotations

import re

import psycopg
import pytest

from support import admin, client_port, latest_counters, wait_for

CONNECTIONS = 40


def test_each_connection_gets_its_own_greeting_and_first_link_in_c(pgmulti):
    proxy = pgmulti({"default_pool_size": 2, "stats_period": 1, "verbose": 1})
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=5, autocommit=True) as first:
        # The first login connects a server to learn its parameters (the slow path).
        assert first.execute("SELECT 1").fetchone() == (1,)

    for n in range(CONNECTIONS):
        app_name = f"churn{n % 3}"
        datestyle = "German, DMY" if n % 2 else "ISO, MDY"
        sent = datestyle.replace(" ", "")  # echoed as sent; the server shows it normalized
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=5, autocommit=True,
                             application_name=app_name, options=f"-c DateStyle={sent}") as conn:
            assert conn.info.parameter_status("application_name") == app_name
            assert conn.info.parameter_status("DateStyle") == sent
            assert conn.info.parameter_status("server_version")  # the server's, passed on
            row = conn.execute("SELECT %s::int, current_setting('application_name'), "
                               "current_setting('DateStyle')", [n]).fetchone()
            assert row == (n, app_name, datestyle)

    # Connections with the parameters the servers already show: each first transaction is
    # linked by the codec (a server whose parameters must change goes through Python).
    before = latest_counters(proxy) or (0, 0, 0, 0)
    for n in range(CONNECTIONS):
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=5, autocommit=True,
                             application_name="churn2") as conn:
            assert conn.execute("SELECT %s::int", [n]).fetchone() == (n,)

    def counted():
        counters = latest_counters(proxy)
        return counters if counters and counters[0] - before[0] >= CONNECTIONS - 2 else None

    wait_for(counted, 5, "codec links logged")


def test_packets_of_one_length_each_get_their_own_login(pgmulti):
    """The codec compares a startup packet with the last one it logged in before looking
    it up: packets that differ only in their bytes must not be taken for each other."""
    proxy = pgmulti({"stats_period": 1, "verbose": 1})
    for n in range(12):
        app_name = f"same{'AB'[n % 2]}"  # same length, alternating
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=5, autocommit=True,
                             application_name=app_name) as conn:
            assert conn.info.parameter_status("application_name") == app_name
            assert conn.execute("SELECT current_setting('application_name')").fetchone() == (
                app_name,)
    wait_for(lambda: known_startup_logins(proxy) >= 8, 5, "remembered logins used")


def known_startup_logins(proxy) -> int:
    """Logins that took a remembered startup packet's path (verbose, once per stats_period)."""
    found = re.findall(r"logins from known startup packets: (\d+)", proxy.log_text())
    return int(found[-1]) if found else 0


def test_a_remembered_startup_packet_meets_every_login_check_again(pgmulti, userlist):
    """The same startup packet skips parsing and lookups after its first login at once, but
    DISABLE, max_client_conn and an auth_file without the user still refuse it."""
    proxy = pgmulti({"max_client_conn": 3, "stats_period": 1, "verbose": 1})
    dsn = proxy.dsn(user="plainuser", db="testdb")

    def login() -> str:
        with psycopg.connect(dsn, connect_timeout=5, autocommit=True,
                             application_name="known") as conn:
            assert conn.info.parameter_status("application_name") == "known"
            return conn.execute("SELECT current_user").fetchone()[0]

    for _ in range(4):
        assert login() == "plainuser"
    # The first login learns the servers' parameters, the second is remembered, the rest
    # come from memory.
    wait_for(lambda: known_startup_logins(proxy) >= 2, 5, "logins from a known packet")

    admin(proxy, "DISABLE testdb")
    with pytest.raises(psycopg.OperationalError, match="does not allow connections"):
        login()
    admin(proxy, "ENABLE testdb")
    assert login() == "plainuser"

    # max_client_conn 3 held: a fourth client is refused.
    held = [psycopg.connect(dsn, connect_timeout=5, application_name="known") for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            login()
    finally:
        for conn in held:
            conn.close()
    assert login() == "plainuser"

    proxy.write_users(userlist(plainuser=None))
    admin(proxy, "RELOAD")
    with pytest.raises(psycopg.OperationalError, match="plainuser"):
        login()


@pytest.mark.parametrize("limit", ["max_db_client_connections", "max_user_client_connections"])
def test_a_remembered_startup_packet_still_counts_against_client_limits(pgmulti, limit):
    proxy = pgmulti({limit: 2, "stats_period": 1, "verbose": 1})
    dsn = proxy.dsn(db="testdb")

    def login() -> psycopg.Connection:
        return psycopg.connect(dsn, connect_timeout=5, autocommit=True, application_name="known")

    for _ in range(4):
        with login() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_for(lambda: known_startup_logins(proxy) >= 2, 5, "logins from a known packet")

    held = [login() for _ in range(2)]
    try:
        with pytest.raises(psycopg.OperationalError, match=limit):
            login()
    finally:
        for conn in held:
            conn.close()
    with login() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_client_address_is_logged_after_the_connection_closed(pgmulti):
    """The address becomes Python objects only when asked; the disconnection line asks after
    the socket has closed, and must still name the client's own address and port."""
    proxy = pgmulti({"log_connections": 1, "log_disconnections": 1})
    ports = []
    for _ in range(2):  # the second login comes from a remembered startup packet
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")
            ports.append(client_port(conn))
    for port in ports:
        wait_for(lambda: re.search(rf"testdb/postgres@127\.0\.0\.1:{port} closing because: "
                                   "client close request", proxy.log_text()),
                 5, f"the disconnection of port {port} logged")
        assert f"testdb/postgres@127.0.0.1:{port} login attempt" in proxy.log_text()
