"""Counters behind SHOW STATS: totals per pool, averages per stats_period.

The relays count bytes and ReadyForQuery messages in the codec; a pool's totals are its live
connections' counters plus what its closed connections had counted, summed when asked (SHOW
STATS, the janitor's stats period), so nothing is accounted per transaction in Python except
the assignment count and the linked time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

US = 1_000_000


@dataclass
class Totals:
    server_assignment_count: int = 0
    xact_count: int = 0
    query_count: int = 0
    received: int = 0
    sent: int = 0
    xact_time: int = 0      # microseconds
    query_time: int = 0     # microseconds
    wait_time: int = 0      # microseconds
    client_parse_count: int = 0
    server_parse_count: int = 0
    bind_count: int = 0

    def minus(self, other: Totals) -> Totals:
        return Totals(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                         for f in fields(self)})


class PoolStats:
    """Pool-level counters that outlive connections."""

    def __init__(self):
        self.assignments = 0
        self.linked_seconds = 0.0     # client-server linked time (transactions in flight)
        self.wait_seconds = 0.0       # clients' time queued for a server
        self.closed_queries = 0
        self.closed_xacts = 0
        self.closed_received = 0
        self.closed_sent = 0
        self.client_parse_count = 0   # Parse messages from clients (named statements)
        self.server_parse_count = 0   # Parse messages sent to servers, on-demand ones included
        self.bind_count = 0
        self.previous = Totals()      # totals at the start of the last stats period
        self.averages = Totals()

    def server_closed(self, server) -> None:
        self.closed_queries += server.ready_count
        self.closed_xacts += server.idle_ready_count
        self.closed_sent += server.tx_bytes

    def client_closed(self, client) -> None:
        self.closed_received += client.rx_bytes

    def totals(self, pool) -> Totals:
        queries = self.closed_queries
        xacts = self.closed_xacts
        sent = self.closed_sent
        for server in pool.all_servers():
            queries += server.ready_count
            xacts += server.idle_ready_count
            sent += server.tx_bytes
        received = self.closed_received + sum(client.rx_bytes for client in pool.clients)
        linked_us = int(self.linked_seconds * US)
        return Totals(server_assignment_count=self.assignments, xact_count=xacts,
                      query_count=queries, received=received, sent=sent, xact_time=linked_us,
                      query_time=linked_us, wait_time=int(self.wait_seconds * US),
                      client_parse_count=self.client_parse_count,
                      server_parse_count=self.server_parse_count, bind_count=self.bind_count)

    def roll_period(self, pool, seconds: float) -> None:
        """Averages over the period that just ended (PgBouncer's stats_period)."""
        now = self.totals(pool)
        delta = now.minus(self.previous)
        self.previous = now
        per_second = max(seconds, 1e-9)
        avg = Totals()
        for name in ("server_assignment_count", "xact_count", "query_count", "received", "sent",
                     "client_parse_count", "server_parse_count", "bind_count"):
            setattr(avg, name, int(getattr(delta, name) / per_second))
        avg.xact_time = delta.xact_time // delta.xact_count if delta.xact_count else 0
        avg.query_time = delta.query_time // delta.query_count if delta.query_count else 0
        avg.wait_time = (delta.wait_time // delta.server_assignment_count
                         if delta.server_assignment_count else 0)
        self.averages = avg
