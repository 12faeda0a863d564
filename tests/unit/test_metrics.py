"""Unit tests for the metrics: pool statistics from real relays, snapshot merging, the text
format and the HTTP endpoint (no PostgreSQL needed)."""

from __future__ import annotations

import asyncio
import collections
import copy

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgmulti import metrics
from pgmulti._codec import (INSPECT, PASS, TIMING_BUCKETS_US, PoolCore, Relay, WorkerFlags,
                            action_table, command_complete, link_pair, query, ready_for_query)
from pgmulti.stats import BUCKET_COUNT, PoolStats

SERVER_ACTIONS = action_table(PASS, S=INSPECT)
CLIENT_ACTIONS = action_table(PASS, X=INSPECT)


# -- pool statistics from codec counters ---------------------------------------------------

class Sink:
    def write(self, data):
        pass

    def get_write_buffer_size(self):
        return 0


class FakePool:
    """The three things PoolStats reads from a pool."""

    def __init__(self):
        self.servers: list[Relay] = []
        self.core = PoolCore(collections.deque(), WorkerFlags())  # assignments, waits
        self.clients: set[Relay] = self.core.clients

    def all_servers(self):
        return iter(self.servers)


def feed(relay: Relay, data: bytes) -> None:
    buffer = relay.get_buffer(len(data))
    memoryview(buffer)[:len(data)] = data
    relay.buffer_updated(len(data))


def linked_pair() -> tuple[Relay, Relay]:
    client, server = Relay(), Relay()
    client.attach_transport(Sink())
    server.attach_transport(Sink())
    client.set_actions(CLIENT_ACTIONS)
    link_pair(client, server, SERVER_ACTIONS, False)
    return client, server


def run_transaction(client: Relay, server: Relay, statements=("SELECT 1",)) -> None:
    for i, sql in enumerate(statements):
        feed(client, query(sql))
        last = i == len(statements) - 1
        feed(server, command_complete("SELECT 1") + ready_for_query("I" if last else "T"))


def test_totals_and_histograms_survive_closed_servers():
    stats, pool = PoolStats(), FakePool()
    first_client, first = linked_pair()
    second_client, second = linked_pair()
    pool.servers = [first, second]
    pool.clients.update((first_client, second_client))
    run_transaction(first_client, first)
    run_transaction(first_client, first, ("BEGIN", "SELECT 1", "COMMIT"))
    run_transaction(second_client, second)
    pool.core.assignments = 3
    before = stats.totals(pool)
    assert (before.xact_count, before.query_count) == (3, 5)
    assert before.query_time <= before.xact_time
    assert before.sent == first.tx_bytes + second.tx_bytes > 0
    histograms_before = stats.histograms(pool)

    # The first server and client close: their counts move into the closed totals.
    stats.server_closed(first)
    pool.core.forget_client(first_client)
    pool.servers.remove(first)
    assert stats.totals(pool) == before
    assert stats.histograms(pool) == histograms_before
    assert sum(histograms_before.xact) == 3 and sum(histograms_before.query) == 5
    assert stats.client_relayed(pool) == first_client.tx_bytes + second_client.tx_bytes


def test_wait_histogram_counts_only_real_waits_and_derives_zero_waits():
    stats, pool = PoolStats(), FakePool()
    pool.core.assignments = 10
    pool.core.record_wait(0.2)   # two clients queued; eight were served at once
    pool.core.record_wait(3.0)
    wait = stats.histograms(pool).wait
    assert len(wait) == BUCKET_COUNT and sum(wait) == 10
    assert wait[0] == 8
    assert wait[TIMING_BUCKETS_US.index(250_000)] == 1
    assert wait[TIMING_BUCKETS_US.index(5_000_000)] == 1
    assert stats.totals(pool).wait_time == 3_200_000


def test_a_wait_beyond_the_last_bound_is_in_the_inf_bucket():
    stats, pool = PoolStats(), FakePool()
    pool.core.assignments = 1
    pool.core.record_wait(60.0)
    assert stats.histograms(pool).wait[-1] == 1


# -- merging snapshots ---------------------------------------------------------------------

def pool_snapshot(database="db", user="u", **values) -> dict:
    pool = {"database": database, "user": user, "cl_active": 1, "cl_waiting": 0, "sv_active": 1,
            "sv_idle": 2, "sv_used": 0, "sv_tested": 0, "sv_login": 0, "maxwait_seconds": 0.0,
            "xact_buckets": [0] * BUCKET_COUNT, "query_buckets": [0] * BUCKET_COUNT,
            "wait_buckets": [0] * BUCKET_COUNT, "xact_time_us": 0, "query_time_us": 0,
            "wait_time_us": 0}
    pool.update(values)
    return pool


def snapshot(pools=(), databases=None, errors=None, relayed=(0, 0)) -> dict:
    return {"version": "1.2.3", "processes": 1, "pools": list(pools),
            "databases": databases or {}, "errors": errors or {},
            "relayed_bytes": {"client_to_server": relayed[0], "server_to_client": relayed[1]}}


def buckets(**at) -> list[int]:
    counts = [0] * BUCKET_COUNT
    for index, count in at.items():
        counts[int(index[1:])] = count
    return counts


def test_merge_sums_counters_gauges_and_histograms_and_takes_max_wait():
    a = snapshot([pool_snapshot(cl_waiting=2, maxwait_seconds=1.5, xact_buckets=buckets(b0=3),
                                xact_time_us=100)],
                 {"db": {"xact_count": 3, "sent": 10}}, {"53300": 1}, (5, 6))
    b = snapshot([pool_snapshot(cl_waiting=1, maxwait_seconds=4.0,
                                xact_buckets=buckets(b0=1, b17=2), xact_time_us=50)],
                 {"db": {"xact_count": 4, "sent": 1}}, {"53300": 2, "3D000": 1}, (1, 1))
    merged = metrics.merge_snapshots([a, b])
    (pool,) = merged["pools"]
    assert pool["cl_waiting"] == 3 and pool["sv_idle"] == 4
    assert pool["maxwait_seconds"] == 4.0
    assert pool["xact_buckets"] == buckets(b0=4, b17=2)
    assert pool["xact_time_us"] == 150
    assert merged["databases"] == {"db": {"xact_count": 7, "sent": 11}}
    assert merged["errors"] == {"53300": 3, "3D000": 1}
    assert merged["relayed_bytes"] == {"client_to_server": 6, "server_to_client": 7}
    assert merged["processes"] == 2
    assert merged["version"] == "1.2.3"


def test_merge_keeps_pools_and_databases_only_one_process_has():
    a = snapshot([pool_snapshot("db1", "u")], {"db1": {"xact_count": 1}})
    b = snapshot([pool_snapshot("db2", "u"), pool_snapshot("db1", "v")],
                 {"db2": {"xact_count": 2}})
    merged = metrics.merge_snapshots([a, b])
    assert sorted((p["database"], p["user"]) for p in merged["pools"]) == [
        ("db1", "u"), ("db1", "v"), ("db2", "u")]
    assert merged["databases"] == {"db1": {"xact_count": 1}, "db2": {"xact_count": 2}}


def test_merge_leaves_its_inputs_alone():
    a = snapshot([pool_snapshot(cl_active=1)], {"db": {"xact_count": 1}}, {"08P01": 1})
    b = snapshot([pool_snapshot(cl_active=2)], {"db": {"xact_count": 2}}, {"08P01": 1})
    originals = copy.deepcopy([a, b])
    metrics.merge_snapshots([a, b])
    metrics.merge_snapshots([a, b])
    assert [a, b] == originals


def test_merge_of_one_is_a_copy_and_of_none_an_error():
    a = snapshot([pool_snapshot()])
    assert metrics.merge_snapshots([a]) == a
    with pytest.raises(ValueError):
        metrics.merge_snapshots([])


# -- the text format -----------------------------------------------------------------------

def parse(text: bytes) -> dict:
    """{sample name: {labels as a sorted tuple: value}}."""
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_render_exposes_every_family_with_cumulative_buckets():
    a = snapshot([pool_snapshot(cl_waiting=2, maxwait_seconds=1.5,
                                xact_buckets=buckets(b0=1, b3=2, b17=1), xact_time_us=2_500_000,
                                wait_buckets=buckets(b0=5))],
                 {"db": {field: 7 for field, *_ in metrics.DATABASE_COUNTERS}},
                 {"53300": 2}, (11, 22))
    samples = parse(metrics.render(a))
    pool = (("database", "db"), ("user", "u"))
    assert samples["pgmulti_up"][()] == 1
    assert samples["pgmulti_info"][(("version", "1.2.3"),)] == 1
    assert samples["pgmulti_pools_client_waiting_connections"][pool] == 2
    assert samples["pgmulti_pools_client_maxwait_seconds"][pool] == 1.5
    xact = samples["pgmulti_transaction_duration_seconds_bucket"]
    assert xact[tuple(sorted(pool + (("le", "5e-05"),)))] == 1
    assert xact[tuple(sorted(pool + (("le", "0.0005"),)))] == 3
    assert xact[tuple(sorted(pool + (("le", "10.0"),)))] == 3
    assert xact[tuple(sorted(pool + (("le", "+Inf"),)))] == 4
    assert samples["pgmulti_transaction_duration_seconds_count"][pool] == 4
    assert samples["pgmulti_transaction_duration_seconds_sum"][pool] == 2.5
    assert samples["pgmulti_client_wait_duration_seconds_count"][pool] == 5
    db = (("database", "db"),)
    assert samples["pgmulti_stats_sql_transactions_pooled_total"][db] == 7
    assert samples["pgmulti_stats_server_in_transaction_seconds_total"][db] == 7e-6
    assert samples["pgmulti_errors_total"][(("sqlstate", "53300"),)] == 2
    assert samples["pgmulti_relayed_bytes_total"][(("direction", "client_to_server"),)] == 11
    assert samples["pgmulti_relayed_bytes_total"][(("direction", "server_to_client"),)] == 22


def test_render_of_an_idle_pooler():
    samples = parse(metrics.render(snapshot()))
    assert samples["pgmulti_up"][()] == 1
    assert "pgmulti_errors_total" not in samples


# -- the HTTP endpoint ---------------------------------------------------------------------

async def http(port: int, request: bytes) -> tuple[bytes, bytes, bytes]:
    """Send a raw request; (status line, head, body) of the answer, read to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], head, body


def test_endpoint_answers_get_metrics_and_404_otherwise():
    async def scenario():
        scrapes = []

        async def get_snapshot():
            scrapes.append(1)
            return snapshot([pool_snapshot()])

        server = metrics.MetricsServer(get_snapshot)
        await server.start("127.0.0.1", 0)
        try:
            status, head, body = await http(server.port, b"GET /metrics HTTP/1.1\r\n"
                                                         b"Host: x\r\n\r\n")
            assert status == b"HTTP/1.1 200 OK"
            assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
            assert b"Connection: close" in head
            assert f"Content-Length: {len(body)}".encode() in head
            assert parse(body)["pgmulti_up"][()] == 1
            status, _, _ = await http(server.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            assert status.endswith(b"200 OK")
            for request in (b"GET / HTTP/1.1\r\n\r\n", b"POST /metrics HTTP/1.1\r\n\r\n",
                            b"GET /metricsx HTTP/1.1\r\n\r\n"):
                status, _, _ = await http(server.port, request)
                assert status == b"HTTP/1.1 404 Not Found", request
            assert len(scrapes) == 2
            status, _, _ = await http(server.port, b"garbage\r\n\r\n")
            assert status == b"HTTP/1.1 400 Bad Request"
            huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (2 * metrics.MAX_REQUEST_BYTES)
            status, _, _ = await http(server.port, huge + b"\r\n\r\n")
            assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
            assert len(scrapes) == 2
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_endpoint_reports_a_failing_snapshot_as_500(caplog):
    async def scenario():
        async def get_snapshot():
            raise OSError("worker 1 gave no answer")

        server = metrics.MetricsServer(get_snapshot)
        await server.start("127.0.0.1", 0)
        try:
            status, _, _ = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert status == b"HTTP/1.1 500 Internal Server Error"
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert "could not collect the metrics" in caplog.text
