"""Counters behind SHOW STATS: totals per pool, averages per stats_period."""

from __future__ import annotations

import time
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

    def add(self, other: Totals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def minus(self, other: Totals) -> Totals:
        return Totals(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                         for f in fields(self)})


class PoolStats:
    """Totals of one pool, updated when a server reports ReadyForQuery to a linked client."""

    def __init__(self):
        self.totals = Totals()
        self.previous = Totals()        # totals at the start of the last stats period
        self.averages = Totals()        # per-second (counts, bytes) or per-event (times)

    def assigned(self, wait_us: int) -> None:
        self.totals.server_assignment_count += 1
        self.totals.wait_time += wait_us

    def account(self, client, server, now: float) -> None:
        """Fold what the linked pair did since the last call into the totals."""
        snap = client.stats_snapshot
        queries = server.ready_count - snap[0]
        xacts = server.idle_ready_count - snap[1]
        totals = self.totals
        totals.query_count += queries
        totals.xact_count += xacts
        totals.received += client.rx_bytes - snap[2]
        totals.sent += server.rx_bytes - snap[3]
        elapsed_us = int((now - client.stats_since) * US)
        if queries:
            totals.query_time += elapsed_us
        if xacts:
            totals.xact_time += elapsed_us
        client.stats_snapshot = (server.ready_count, server.idle_ready_count,
                                 client.rx_bytes, server.rx_bytes)
        client.stats_since = now

    def transaction_done(self, client, server) -> None:
        self.account(client, server, time.monotonic())

    def roll_period(self, seconds: float) -> None:
        """Compute averages over the period that just ended (PgBouncer's stats_period)."""
        delta = self.totals.minus(self.previous)
        self.previous = Totals(**{f.name: getattr(self.totals, f.name)
                                  for f in fields(Totals)})
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
