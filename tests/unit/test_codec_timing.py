"""Unit tests for the transaction and query timing the codec keeps in the server-side Relay.

A transaction starts when a request goes to a server that was idle ('I') with nothing
outstanding and ends at the ReadyForQuery 'I'; a query starts when a request goes out while
nothing was outstanding and ends at the ReadyForQuery that answers the last one. Elapsed times
are only bounded from below (the machine may be slow), and each lands in the bucket
bisect_left(TIMING_BUCKETS_US, elapsed) ("le" upper bounds, +Inf last).
"""

import bisect
import time

import pytest

from pgmulti._codec import (
    INSPECT,
    PASS,
    TIMING_BUCKETS_US,
    Relay,
    action_table,
    command_complete,
    link_pair,
    message,
    query,
    ready_for_query,
    unlink_pair,
)

from codec_feed import feed

SERVER_ACTIONS = action_table(PASS, S=INSPECT)
CLIENT_ACTIONS = action_table(PASS, X=INSPECT)
PAUSE_S = 0.003
PAUSE_US = int(PAUSE_S * 1e6)
BUCKETS = len(TIMING_BUCKETS_US) + 1


class Sink:
    """A transport that accepts every write."""

    def write(self, data):
        pass

    def get_write_buffer_size(self):
        return 0


class Transport(Sink):
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(bytes(data))


def pair():
    """A client relay and a server relay linked to each other."""
    client, server = Relay(), Relay()
    client.attach_transport(Transport())
    server.attach_transport(Transport())
    client.set_actions(CLIENT_ACTIONS)
    link_pair(client, server, SERVER_ACTIONS, False)
    return client, server


def reply(status="I", tag="SELECT 1"):
    return command_complete(tag) + ready_for_query(status)


def bucket_of(elapsed_us):
    return bisect.bisect_left(TIMING_BUCKETS_US, elapsed_us)


def single(bucket):
    counts = [0] * BUCKETS
    counts[bucket] = 1
    return tuple(counts)


def test_buckets_constant():
    assert list(TIMING_BUCKETS_US) == sorted(TIMING_BUCKETS_US)
    assert TIMING_BUCKETS_US[0] == 50 and TIMING_BUCKETS_US[-1] == 10_000_000


def test_fresh_relay_has_no_timing():
    server = Relay()
    assert server.xact_time_us == 0 and server.query_time_us == 0
    assert server.xact_count == 0 and server.query_count == 0
    assert server.timing_histograms() == ((0,) * BUCKETS, (0,) * BUCKETS)


def test_autocommit_query_is_one_transaction_and_one_query():
    client, server = pair()
    feed(client, query("SELECT 1"))
    time.sleep(PAUSE_S)
    feed(server, reply("I"))

    assert server.xact_count == 1 and server.query_count == 1
    assert server.xact_time_us >= PAUSE_US
    assert server.query_time_us >= PAUSE_US
    xacts, queries = server.timing_histograms()
    assert xacts == single(bucket_of(server.xact_time_us))
    assert queries == single(bucket_of(server.query_time_us))


def test_transaction_block_spans_its_queries():
    client, server = pair()
    for sql, status in (("BEGIN", "T"), ("SELECT 1", "T"), ("COMMIT", "I")):
        feed(client, query(sql))
        time.sleep(PAUSE_S)
        feed(server, reply(status))
        if status == "T":
            assert server.xact_count == 0

    assert server.xact_count == 1
    assert server.query_count == 3
    assert server.xact_time_us >= 3 * PAUSE_US
    assert server.xact_time_us >= server.query_time_us
    xacts, queries = server.timing_histograms()
    assert sum(xacts) == 1 and sum(queries) == 3


def test_failed_transaction_ends_at_rollback():
    client, server = pair()
    for sql, status in (("BEGIN", "T"), ("SELECT x", "E"), ("ROLLBACK", "I")):
        feed(client, query(sql))
        feed(server, reply(status))
    assert server.xact_count == 1 and server.query_count == 3
    # A request sent while the server is in a failed block does not start a transaction.
    feed(client, query("SELECT 1"))
    feed(server, reply("I"))
    assert server.xact_count == 2


def test_pipelined_requests_are_one_query_until_all_answered():
    client, server = pair()
    feed(client, query("SELECT 1") + query("SELECT 2"))
    assert server.pending == 2
    feed(server, reply("I"))
    # The first answer ends the transaction; the query runs until the last answer.
    assert server.xact_count == 1 and server.query_count == 0
    time.sleep(PAUSE_S)
    feed(server, reply("I"))
    assert server.query_count == 1
    assert server.query_time_us >= PAUSE_US


def test_extended_protocol_counts_the_sync():
    client, server = pair()
    parse = message(ord("P"), b"\0SELECT 1\0\0\0")
    bind = message(ord("B"), b"\0\0\0\0\0\0\0\0")
    execute = message(ord("E"), b"\0\0\0\0\0")
    sync = message(ord("S"), b"")
    feed(client, parse + bind + execute + sync)
    assert server.pending == 1
    feed(server, message(ord("1"), b"") + message(ord("2"), b"") + reply("I"))
    assert server.xact_count == 1 and server.query_count == 1


CLIENT_STREAM = query("BEGIN") + query("SELECT 1") + query("COMMIT")
SERVER_STREAM = reply("T", "BEGIN") + reply("T") + reply("I", "COMMIT")


@pytest.mark.parametrize("stream", ["client", "server"])
def test_timing_at_every_two_chunk_split(stream):
    data = CLIENT_STREAM if stream == "client" else SERVER_STREAM
    for cut in range(1, len(data)):
        client, server = pair()
        feed(client, CLIENT_STREAM, [cut] if stream == "client" else ())
        assert server.pending == 3
        feed(server, SERVER_STREAM, [cut] if stream == "server" else ())
        assert (server.xact_count, server.query_count, server.pending) == (1, 1, 0), cut
        xacts, queries = server.timing_histograms()
        assert sum(xacts) == 1 and sum(queries) == 1


def test_timing_one_byte_at_a_time():
    client, server = pair()
    for _ in range(3):
        feed(client, CLIENT_STREAM, range(1, len(CLIENT_STREAM)))
        time.sleep(PAUSE_S / 3)
        feed(server, SERVER_STREAM, range(1, len(SERVER_STREAM)))
    assert server.xact_count == 3 and server.query_count == 3
    assert server.xact_time_us >= PAUSE_US
    xacts, queries = server.timing_histograms()
    assert sum(xacts) == 3 and sum(queries) == 3


def test_requests_counted_from_python_start_timing():
    # Prepared-statement mode forwards Sync from Python: `server.pending += 1`.
    server = Relay()
    server.attach_transport(Transport())
    server.link_output(Sink())
    server.pending += 1
    time.sleep(PAUSE_S)
    feed(server, reply("I"))
    assert server.xact_count == 1 and server.query_count == 1
    assert server.query_time_us >= PAUSE_US


def test_ready_read_by_python_stops_timing():
    # Statement pooling inspects ReadyForQuery and accounts it with ready_seen().
    server = Relay()
    server.pending += 1
    server.ready_seen(ord("I"))
    assert server.pending == 0 and server.ready_count == 1 and server.idle_ready_count == 1
    assert server.xact_count == 1 and server.query_count == 1


def test_unlink_forgets_running_clocks():
    client, server = pair()
    feed(client, query("SELECT pg_sleep(10)"))
    unlink_pair(client, server, SERVER_ACTIONS)
    server.link_output(Sink())
    feed(server, reply("I"))
    assert server.xact_count == 0 and server.query_count == 0
    assert server.timing_histograms() == ((0,) * BUCKETS, (0,) * BUCKETS)


def test_totals_are_readonly():
    server = Relay()
    with pytest.raises(AttributeError):
        server.xact_time_us = 5
