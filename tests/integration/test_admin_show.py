"""SHOW MEM, FDS, SOCKETS, ACTIVE_SOCKETS, DNS_HOSTS, DNS_ZONES, PEERS and PEER_POOLS."""

from __future__ import annotations


import psycopg
import pytest

from pgmulti import admin_columns as ref
from support import client_port

CONNECT_TIMEOUT = 10


def console(proxy, user: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user=user, db="pgbouncer"), autocommit=True,
                           connect_timeout=CONNECT_TIMEOUT)


def connect(proxy, db: str = "testdb") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(db=db), connect_timeout=CONNECT_TIMEOUT)


def show(conn: psycopg.Connection, what: str):
    """(column names, type OIDs, rows as dicts)."""
    cursor = conn.execute(f"SHOW {what}")
    names = [column.name for column in cursor.description]
    oids = [column.type_code for column in cursor.description]
    return names, oids, [dict(zip(names, row)) for row in cursor.fetchall()]


def expected(what: str):
    columns = ref.COLUMNS[what]
    return [name for name, _ in columns], [ref.TYPE_OIDS[kind] for _, kind in columns]


@pytest.fixture
def proxy(pgmulti):
    return pgmulti()


@pytest.mark.parametrize("what", ["mem", "fds", "sockets", "active_sockets", "dns_hosts",
                                  "dns_zones", "peers", "peer_pools"])
def test_columns_are_pgbouncer_1_25s(proxy, what):
    with console(proxy) as admin:
        names, oids, _ = show(admin, what)
    assert (names, oids) == expected(what)


def test_show_mem_counts_what_exists(proxy):
    with console(proxy) as admin:
        _, _, before = show(admin, "mem")
        clients = [connect(proxy) for _ in range(3)]
        try:
            for client in clients:
                client.execute("SELECT 1")  # three servers in use
            _, _, during = show(admin, "mem")
        finally:
            for client in clients:
                client.close()
    before = {row["name"]: row for row in before}
    during = {row["name"]: row for row in during}
    assert list(during) == [name for name in ref.MEM_ROWS if name in during] + \
        [name for name in during if name not in ref.MEM_ROWS]
    assert during["client_cache"]["used"] == before["client_cache"]["used"] + 3
    assert during["server_cache"]["used"] == before["server_cache"]["used"] + 3
    assert during["pool_cache"]["used"] >= 1
    assert during["db_cache"]["used"] == 2  # testdb and postgres
    assert during["iobuf_cache"]["used"] == during["client_cache"]["used"] + \
        during["server_cache"]["used"]
    for row in during.values():
        assert row["free"] == 0
        assert row["size"] * row["used"] <= row["memtotal"] < (row["size"] + 1) * \
            max(row["used"], 1)
        assert (row["used"] == 0) == (row["memtotal"] == 0), row
    assert during["client_cache"]["size"] > 100  # a real object with its attributes


def test_show_mem_counts_prepared_statements(pgmulti):
    proxy = pgmulti({"max_prepared_statements": 10})
    with console(proxy) as admin, connect(proxy) as client:
        client.execute("SELECT %s::int", [1], prepare=True)
        client.execute("SELECT %s::text", ["a"], prepare=True)
        _, _, rows = show(admin, "mem")
    mem = {row["name"]: row for row in rows}
    assert mem["prepared_statement_cache"]["used"] == 2
    assert mem["client_prepared_statement_cache"]["used"] == 2
    assert mem["server_prepared_statement_cache"]["used"] == 2


def test_show_fds_lists_sockets_without_secrets(proxy):
    with console(proxy) as admin, connect(proxy) as client:
        client.execute("SELECT 1")
        _, _, rows = show(admin, "fds")
        port = client_port(client)
    tasks = [row["task"] for row in rows]
    assert tasks == sorted(tasks, key=["pooler", "client", "server"].index)
    poolers = [row for row in rows if row["task"] == "pooler"]
    assert {(row["addr"], row["port"]) for row in poolers} == \
        {("127.0.0.1", proxy.port), ("unix", proxy.port)}
    (mine,) = [row for row in rows if row["task"] == "client" and row["port"] == port]
    (server,) = [row for row in rows if row["task"] == "server"]
    assert (mine["user"], mine["database"], mine["link"]) == ("postgres", "testdb", server["fd"])
    assert server["link"] == mine["fd"] and server["cancel"] != 0 and mine["cancel"] != 0
    assert mine["client_encoding"] == "UTF8"
    assert all(row["password"] is None and row["scram_client_key"] is None
               and row["scram_server_key"] is None for row in rows)
    assert len({row["fd"] for row in rows}) == len(rows)


def test_show_fds_needs_an_admin(proxy):
    with console(proxy, "stats") as stats:
        with pytest.raises(psycopg.Error) as info:
            stats.execute("SHOW FDS")
        assert (info.value.sqlstate, info.value.diag.message_primary) == \
            ("08P01", "admin access needed")
        assert show(stats, "sockets")[2]  # the other SHOW commands stay open to stats users


def test_show_sockets_states(proxy):
    with console(proxy) as admin, connect(proxy) as busy, connect(proxy) as idle:
        busy.execute("SELECT 1")
        idle.execute("SELECT 1")
        idle.commit()
        _, _, rows = show(admin, "sockets")
        _, _, active = show(admin, "active_sockets")
        ports = [client_port(conn) for conn in (busy, idle, admin)]
    by_port = {row["port"]: row for row in rows if row["type"] == "C"}
    assert [by_port[port]["state"] for port in ports] == ["cl_active"] * 3
    assert [by_port[port]["database"] for port in ports] == ["testdb", "testdb", "pgbouncer"]
    servers = sorted(row["state"] for row in rows if row["type"] == "S")
    assert servers == ["sv_active", "sv_idle"]
    assert {row["state"] for row in rows} <= set(ref.SOCKET_STATES)
    # ACTIVE_SOCKETS: only sockets with bytes waiting, a subset of SOCKETS.
    assert {row["ptr"] for row in active} <= {row["ptr"] for row in rows}
    assert all(row["pkt_avail"] or row["send_avail"] for row in active)


def test_dns_and_peers(pgmulti, base_config):
    proxy = pgmulti(base_config() + "\n[peers]\n1 = host=127.0.0.1 port=7001\n"
                    "2 = host=/tmp pool_size=3\n")
    with console(proxy) as admin:
        assert show(admin, "dns_hosts")[2] == [] and show(admin, "dns_zones")[2] == []
        assert show(admin, "peer_pools")[2] == []
        assert [tuple(row.values()) for row in show(admin, "peers")[2]] == \
            [(1, "127.0.0.1", 7001, 5), (2, "/tmp", 6432, 3)]
        lists = {row["list"]: row["items"] for row in show(admin, "lists")[2]}
        assert (lists["peers"], lists["peer_pools"]) == (2, 0)
