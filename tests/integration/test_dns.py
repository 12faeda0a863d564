"""A [databases] host given by name: looked up through pgmulti's DNS cache, as in PgBouncer
(SHOW DNS_HOSTS, SHOW LISTS dns_names, the server's address in SHOW SERVERS, cancels sent to
the address the server connection went to)."""

from __future__ import annotations

import socket
import threading
import time

import psycopg
import pytest
from psycopg import errors as pgerrors

from .support import admin


def by_name(proxy_factory, base_config, **settings):
    return proxy_factory(base_config(
        databases={"testdb": "host=localhost port={pg_port} dbname=testdb"}, **settings))


def connect(proxy) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user="postgres", db="testdb"), connect_timeout=5,
                           autocommit=True)


def localhost_v4() -> bool:
    return ("127.0.0.1", 0) in {info[4][:2] for info in socket.getaddrinfo(
        "localhost", 0, type=socket.SOCK_STREAM)}


def test_a_host_name_is_cached_and_shown(pgmulti, base_config):
    assert localhost_v4(), "the test cluster listens on 127.0.0.1, which localhost must reach"
    proxy = by_name(pgmulti, base_config, dns_max_ttl=30)
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    hosts = admin(proxy, "SHOW DNS_HOSTS")
    assert [row["hostname"] for row in hosts] == ["localhost"]
    assert 0 < int(hosts[0]["ttl"]) <= 30
    assert "127.0.0.1:0" in hosts[0]["addrs"].split(",")
    lists = {row["list"]: int(row["items"]) for row in admin(proxy, "SHOW LISTS")}
    assert lists["dns_names"] == 1 and lists["dns_queries"] == 0
    servers = admin(proxy, "SHOW SERVERS")
    assert servers and {row["addr"] for row in servers} <= {"127.0.0.1", "::1"}


def test_an_ip_address_is_not_looked_up(pgmulti):
    proxy = pgmulti()  # the default config names the server by 127.0.0.1
    with connect(proxy) as conn:
        conn.execute("SELECT 1")
    assert admin(proxy, "SHOW DNS_HOSTS") == []
    assert [row["addr"] for row in admin(proxy, "SHOW SERVERS")] == ["127.0.0.1"]


def test_an_unknown_host_name_fails_the_login_and_is_remembered(pgmulti, base_config):
    proxy = pgmulti(base_config(
        databases={"testdb": "host=no-such-host.invalid port={pg_port} dbname=testdb"},
        dns_nxdomain_ttl=40))
    with pytest.raises(psycopg.OperationalError, match="no-such-host.invalid"):
        connect(proxy).close()
    hosts = admin(proxy, "SHOW DNS_HOSTS")
    assert [(row["hostname"], row["addrs"]) for row in hosts] == [("no-such-host.invalid", "")]
    assert 15 < int(hosts[0]["ttl"]) <= 40  # dns_nxdomain_ttl, not dns_max_ttl


def test_a_cancel_reaches_the_server_found_by_name(pgmulti, base_config):
    proxy = by_name(pgmulti, base_config, pool_mode="transaction")
    with connect(proxy) as conn:
        outcome: dict = {}

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(10)")
            except psycopg.Error as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=sleep)
        started = time.monotonic()
        thread.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                row["state"] == "active" for row in admin(proxy, "SHOW SERVERS")):
            time.sleep(0.05)
        time.sleep(0.2)
        conn.cancel()
        thread.join(8)
        assert isinstance(outcome.get("error"), pgerrors.QueryCanceled), outcome
        assert time.monotonic() - started < 8
        assert conn.execute("SELECT 2").fetchone() == (2,)
