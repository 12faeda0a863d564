"""Databases made from the "*" entry (PgBouncer's autodb): listed while in use, freed after
autodb_idle_timeout without clients or servers."""

from __future__ import annotations

import time

import psycopg

from support import admin, wait_for

CONNECT_TIMEOUT = 10
AUTODB = {"testdb": None, "*": "host=127.0.0.1 port={pg_port}"}


def query_testdb(proxy) -> str:
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT) as conn:
        return conn.execute("SELECT current_database()").fetchone()[0]


def listed(proxy, what: str) -> list[str]:
    return [row["database"] if "database" in row else row["name"]
            for row in admin(proxy, f"SHOW {what}")]


def test_autodb_is_listed_then_freed_when_unused(pgmulti, base_config):
    proxy = pgmulti(base_config(databases=AUTODB, autodb_idle_timeout=1, server_idle_timeout=1))
    assert query_testdb(proxy) == "testdb"
    rows = {row["name"]: row for row in admin(proxy, "SHOW DATABASES")}
    assert rows["testdb"]["port"] == str(proxy.pg.port) and rows["testdb"]["database"] == "testdb"
    assert "testdb" in listed(proxy, "POOLS")
    # Its server closes after server_idle_timeout, then the pool goes a second later.
    wait_for(lambda: "testdb" not in listed(proxy, "POOLS"), 10, "the autodb pool freed")
    assert "testdb" not in [row["name"] for row in admin(proxy, "SHOW DATABASES")]
    assert "freed: unused for autodb_idle_timeout" in proxy.log_text()
    assert query_testdb(proxy) == "testdb"  # made again at the next login
    assert "testdb" in listed(proxy, "POOLS")


def test_autodb_with_a_client_stays(pgmulti, base_config):
    proxy = pgmulti(base_config(databases=AUTODB, autodb_idle_timeout=1, server_idle_timeout=1))
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                         autocommit=True) as conn:
        time.sleep(3)
        assert "testdb" in listed(proxy, "POOLS")
        assert conn.execute("SELECT 1").fetchone() == (1,)
