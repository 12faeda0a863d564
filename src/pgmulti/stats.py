"""Counters behind SHOW STATS and the metrics endpoint: totals per pool, averages per stats_period.

The relays count bytes, transactions, queries and their times (with histograms) in the codec,
and the pool's core counts assignments, Binds and clients' waits for a server; a pool's totals
are its live connections' counters plus what its closed connections had counted, summed when
asked (SHOW STATS, the janitor's stats period, a metrics scrape), so nothing is accounted per
transaction in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ._codec import TIMING_BUCKETS_US

BUCKET_COUNT = len(TIMING_BUCKETS_US) + 1   # the last one is +Inf


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


@dataclass
class Histograms:
    """Per-bucket counts (not cumulative) over TIMING_BUCKETS_US, +Inf last."""
    xact: list[int]
    query: list[int]
    wait: list[int]


def add_counts(into: list[int], counts) -> None:
    for i, count in enumerate(counts):
        into[i] += count


class PoolStats:
    """Pool-level counters that outlive connections."""

    def __init__(self):
        self.closed_queries = 0
        self.closed_xacts = 0
        self.closed_xact_us = 0
        self.closed_query_us = 0
        self.closed_xact_buckets = [0] * BUCKET_COUNT
        self.closed_query_buckets = [0] * BUCKET_COUNT
        self.closed_sent = 0
        self.client_parse_count = 0   # Parse messages from clients (named statements)
        self.server_parse_count = 0   # Parse messages sent to servers, on-demand ones included
        self.previous = Totals()      # totals at the start of the last stats period
        self.averages = Totals()

    def server_closed(self, server) -> None:
        self.closed_queries += server.query_count
        self.closed_xacts += server.xact_count
        self.closed_query_us += server.query_time_us
        self.closed_xact_us += server.xact_time_us
        xacts, queries = server.timing_histograms()
        add_counts(self.closed_xact_buckets, xacts)
        add_counts(self.closed_query_buckets, queries)
        self.closed_sent += server.tx_bytes

    def totals(self, pool) -> Totals:
        queries = self.closed_queries
        xacts = self.closed_xacts
        query_us = self.closed_query_us
        xact_us = self.closed_xact_us
        sent = self.closed_sent
        for server in pool.all_servers():
            queries += server.query_count
            xacts += server.xact_count
            query_us += server.query_time_us
            xact_us += server.xact_time_us
            sent += server.tx_bytes
        # Closed clients' bytes: PoolCore.forget_client.
        received = pool.core.closed_received + sum(client.rx_bytes for client in pool.clients)
        return Totals(server_assignment_count=pool.core.assignments, xact_count=xacts,
                      query_count=queries, received=received, sent=sent, xact_time=xact_us,
                      query_time=query_us, wait_time=pool.core.wait_us,
                      client_parse_count=self.client_parse_count,
                      server_parse_count=self.server_parse_count,
                      bind_count=pool.core.bind_count)

    def histograms(self, pool) -> Histograms:
        """Transaction, query and client wait time histograms of the pool."""
        xact = list(self.closed_xact_buckets)
        query = list(self.closed_query_buckets)
        for server in pool.all_servers():
            xacts, queries = server.timing_histograms()
            add_counts(xact, xacts)
            add_counts(query, queries)
        wait = list(pool.core.wait_histogram())
        # Clients served at once are not recorded one by one: they are the zero-wait bucket.
        wait[0] += max(pool.core.assignments - sum(wait), 0)
        return Histograms(xact=xact, query=query, wait=wait)

    def client_relayed(self, pool) -> int:
        """Bytes the codec passed from this pool's clients to servers."""
        return pool.core.closed_client_relayed + sum(client.tx_bytes for client in pool.clients)

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
