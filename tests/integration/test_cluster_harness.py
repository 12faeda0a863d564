"""The `pg` fixture: a running cluster with the test roles, reachable as the proxy tests need."""

from __future__ import annotations

import asyncio
import importlib.util

import asyncpg
import psycopg
import pytest

from pgmulti.cluster import PORT_RANGE, TEST_ROLES, ClusterError, find_free_port, is_listening

PASSWORD_ROLES = [
    ("md5user", "md5"),
    ("scramuser", "scram-sha-256"),
    ("passuser", "password"),
]


def password_of(role: str) -> str:
    password = TEST_ROLES[role][0]
    assert password is not None
    return password


def test_psql_helper_runs_sql_over_the_unix_socket(pg):
    assert pg.psql("SELECT 1 + 1") == "2"
    assert pg.psql("SELECT current_user; SELECT inet_server_addr() IS NULL") == "postgres\nt"


def test_psql_helper_raises_on_sql_errors(pg):
    with pytest.raises(ClusterError, match="no_such_column"):
        pg.psql("SELECT no_such_column")


def test_server_settings(pg):
    assert pg.psql("SHOW listen_addresses") == "127.0.0.1"
    assert pg.psql("SHOW max_prepared_transactions") == "100"
    assert pg.psql("SHOW max_connections") == "200"
    assert pg.psql("SHOW fsync") == "off"
    assert pg.psql("SHOW unix_socket_directories") == str(pg.socket_dir)
    assert PORT_RANGE[0] <= pg.port <= PORT_RANGE[1]
    assert is_listening(pg.port)


def test_psycopg_connects_over_tcp(pg):
    with psycopg.connect(pg.dsn(), connect_timeout=10) as conn:
        row = conn.execute("SELECT current_user, host(inet_server_addr())").fetchone()
    assert row == ("postgres", "127.0.0.1")


def test_trusted_role_writes_in_testdb(pg):
    with psycopg.connect(pg.dsn(user="plainuser", db="testdb"), connect_timeout=10) as conn:
        conn.execute("CREATE TEMP TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_passwords_are_stored_as_md5_and_scram(pg):
    assert pg.password_secret("md5user").startswith("md5")
    assert pg.password_secret("scramuser").startswith("SCRAM-SHA-256$")


@pytest.mark.parametrize("role, method", PASSWORD_ROLES)
def test_password_role_logs_in_with_its_method(pg, role, method):
    log_start = len(pg.log_text())
    dsn = pg.dsn(user=role, db="testdb", password=password_of(role))
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    # log_connections: `connection authenticated: identity="md5user" method=md5 (...)`
    assert f'identity="{role}" method={method} ' in pg.log_text()[log_start:]


@pytest.mark.parametrize("role", [role for role, _ in PASSWORD_ROLES])
def test_password_role_rejects_a_wrong_password(pg, role):
    dsn = pg.dsn(user=role, db="testdb", password="wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn, connect_timeout=10)


def test_asyncpg_logs_in_with_scram(pg):
    async def current_user() -> str:
        dsn = pg.dsn(user="scramuser", db="testdb", password=password_of("scramuser"))
        conn = await asyncpg.connect(dsn, timeout=10, ssl=False)
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    assert asyncio.run(current_user()) == "scramuser"


def test_find_free_port_gives_an_unused_port_in_range():
    port = find_free_port()
    assert PORT_RANGE[0] <= port <= PORT_RANGE[1]
    assert not is_listening(port)


def test_base_config_overrides_and_removes_keys(base_config):
    text = base_config(pool_mode="session", logfile=None, databases={"extra": "dbname=x"})
    assert "pool_mode = session\n" in text
    assert "logfile" not in text
    assert "extra = dbname=x\n" in text
    assert "listen_port = {listen_port}\n" in text


def test_userlist_sets_and_removes_users(userlist):
    text = userlist(scramuser="SCRAM-SHA-256$secret", stats=None)
    assert '"scramuser" "SCRAM-SHA-256$secret"\n' in text
    assert '"md5user" "md5pass"\n' in text
    assert '"stats"' not in text


@pytest.mark.skipif(
    importlib.util.find_spec("pgmulti.__main__") is None, reason="pgmulti has no __main__ yet"
)
def test_pgmulti_fixture_proxies_to_pg(pgmulti):
    proxy = pgmulti()
    result = proxy.psql("SELECT current_database()", db="testdb")
    assert (result.returncode, result.stdout.strip()) == (0, "testdb"), result.stderr
