"""PgBouncer's tcp_* settings on pgmulti's own sockets, seen from the kernel.

/proc/net/tcp shows which timer each socket runs: a socket with keepalive on and nothing in
flight runs the keepalive timer, due within tcp_keepidle seconds.
"""

from __future__ import annotations

import socket
import time

import psycopg

from support import admin, client_port, wait_for

KEEPALIVE_TIMER = 2
USER_HZ = 100  # /proc/net/tcp shows timers in clock ticks


def socket_timers() -> dict[tuple[int, int], tuple[int, float]]:
    """(local port, remote port) -> (timer kind, seconds until it fires) for IPv4 sockets."""
    timers = {}
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, timer = fields[1], fields[2], fields[5]
            kind, when = timer.split(":")
            key = (int(local.split(":")[1], 16), int(remote.split(":")[1], 16))
            timers[key] = (int(kind, 16), int(when, 16) / USER_HZ)
    return timers


def keepalive_due(local_port: int, remote_port: int) -> float | None:
    """Seconds until the socket's keepalive probe, None while it runs another timer or none."""
    kind, seconds = socket_timers().get((local_port, remote_port), (0, 0.0))
    return seconds if kind == KEEPALIVE_TIMER else None


def proxy_side_keepalive(proxy, conn: psycopg.Connection) -> float | None:
    return keepalive_due(proxy.port, client_port(conn))


def server_side_keepalives(proxy) -> list[float | None]:
    """Keepalive of pgmulti's sockets towards PostgreSQL (SHOW SERVERS gives their ports)."""
    return [keepalive_due(int(row["local_port"]), proxy.pg.port)
            for row in admin(proxy, "SHOW SERVERS")]


def test_keepalive_settings_reach_client_and_server_sockets(pgmulti):
    proxy = pgmulti({"tcp_keepidle": 17, "tcp_keepintvl": 5, "tcp_keepcnt": 3,
                     "pool_mode": "session"})
    with psycopg.connect(proxy.dsn(), connect_timeout=5, autocommit=True) as conn:
        conn.execute("SELECT 1")
        due = wait_for(lambda: proxy_side_keepalive(proxy, conn), 5, "client keepalive timer")
        assert 10 < due <= 17
        servers = wait_for(lambda: [d for d in server_side_keepalives(proxy) if d] or None, 5,
                           "server keepalive timer")
        assert all(10 < d <= 17 for d in servers)

    # RELOAD: connections accepted afterwards get the new value.
    proxy.write_config({"tcp_keepidle": 29, "pool_mode": "session"})
    admin(proxy, "RELOAD")
    with psycopg.connect(proxy.dsn(), connect_timeout=5, autocommit=True) as conn:
        conn.execute("SELECT 1")
        due = wait_for(lambda: proxy_side_keepalive(proxy, conn), 5, "client keepalive timer")
        assert 17 < due <= 29


def test_tcp_keepalive_off_leaves_sockets_without_keepalive(pgmulti):
    proxy = pgmulti({"tcp_keepalive": 0, "pool_mode": "session"})
    with psycopg.connect(proxy.dsn(), connect_timeout=5, autocommit=True) as conn:
        conn.execute("SELECT 1")
        time.sleep(0.3)  # past any retransmit timer of the query's packets
        assert proxy_side_keepalive(proxy, conn) is None
        assert server_side_keepalives(proxy) == [None]


def silent_client_is_dropped(proxy, wait_s: float) -> bool:
    """Connect and send nothing: does pgmulti (client_login_timeout) close it within wait_s?"""
    with socket.create_connection((proxy.host, proxy.port), timeout=wait_s) as sock:
        try:
            return sock.recv(1024) is not None  # an ErrorResponse or EOF: pgmulti saw it
        except TimeoutError:
            return False


def test_tcp_defer_accept_hands_over_only_clients_that_send(pgmulti):
    # With TCP_DEFER_ACCEPT (PgBouncer's default on Linux) the kernel keeps a client that
    # sends nothing: pgmulti never sees it, so client_login_timeout cannot close it.
    deferred = pgmulti({"client_login_timeout": 1})
    assert not silent_client_is_dropped(deferred, 2.5)
    immediate = pgmulti({"client_login_timeout": 1, "tcp_defer_accept": 0})
    assert silent_client_is_dropped(immediate, 5)
    # Clients that speak first (all PostgreSQL clients) log in as before.
    with psycopg.connect(deferred.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
