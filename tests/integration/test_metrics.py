"""The Prometheus endpoint (metrics_port) against a real pgmulti and PostgreSQL: counters,
histograms and gauges move with real traffic and agree with SHOW STATS."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgmulti.cluster import clean_env, find_free_port
from support import wait_for

CONNECT_TIMEOUT = 10
SCRAPE_TIMEOUT_S = 10
PGBENCH_CLIENTS = 3
PGBENCH_TRANSACTIONS = 30    # per client
PGBENCH_SLEEP_S = 0.002      # inside each transaction, so that times are well above zero
PGBENCH_SCRIPT = f"""BEGIN;
SELECT pg_sleep({PGBENCH_SLEEP_S});
SELECT 1;
COMMIT;
"""
POOL = (("database", "testdb"), ("user", "postgres"))
DB = (("database", "testdb"),)


def get(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """(status, content type, body) of one HTTP GET."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                    timeout=SCRAPE_TIMEOUT_S) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(port: int) -> dict:
    """{sample name: {sorted label pairs: value}}, retried while the endpoint starts."""
    def attempt():
        try:
            return get(port)
        except (ConnectionError, urllib.error.URLError):
            return None
    status, content_type, body = wait_for(attempt, 10, what="the metrics endpoint")
    assert status == 200, body
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, labels=(), **more) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels + tuple(more.items()))), 0.0)


def buckets(samples: dict, name: str) -> list[tuple[float, float]]:
    """A histogram's (le, cumulative count) pairs for the testdb pool, in order."""
    pairs = [(float(dict(labels)["le"]), count)
             for labels, count in samples[f"{name}_bucket"].items()
             if (("database", "testdb") in labels and ("user", "postgres") in labels)]
    return sorted(pairs)


def connect(proxy, db: str = "testdb") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(db=db), connect_timeout=CONNECT_TIMEOUT, autocommit=True)


def show_stats(proxy) -> dict:
    with connect(proxy, "pgbouncer") as admin:
        cursor = admin.execute("SHOW STATS")
        names = [column.name for column in cursor.description]
        return {row[0]: dict(zip(names, row)) for row in cursor.fetchall()}


def run_pgbench(proxy, pg, tmp_path) -> None:
    script = tmp_path / "metrics.sql"
    script.write_text(PGBENCH_SCRIPT)
    result = subprocess.run(
        [pg.bindir / "pgbench", "-n", "-M", "simple", "-f", script,
         "-c", str(PGBENCH_CLIENTS), "-j", "1", "-t", str(PGBENCH_TRANSACTIONS),
         "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", "testdb"],
        env=clean_env(PGCONNECT_TIMEOUT="10"), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=25, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    total = PGBENCH_CLIENTS * PGBENCH_TRANSACTIONS
    assert f"actually processed: {total}/{total}" in result.stdout, result.stdout


@pytest.fixture
def metrics_proxy(pgmulti):
    """pgmulti with the endpoint on a free port and one server per pool, so clients queue."""
    port = find_free_port()
    proxy = pgmulti({"metrics_port": port, "default_pool_size": 1})
    proxy.metrics_port = port
    return proxy


def test_counters_and_histograms_move_with_pgbench(metrics_proxy, pg, tmp_path):
    proxy, port = metrics_proxy, metrics_proxy.metrics_port
    before = scrape(port)
    assert value(before, "pgmulti_up") == 1
    assert value(before, "pgmulti_processes") == 1
    assert len(before["pgmulti_info"]) == 1

    run_pgbench(proxy, pg, tmp_path)
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, "no_such_database")
    after = scrape(port)

    xacts = PGBENCH_CLIENTS * PGBENCH_TRANSACTIONS
    moved = {name: value(after, name, DB) - value(before, name, DB) for name in (
        "pgmulti_stats_sql_transactions_pooled_total", "pgmulti_stats_queries_pooled_total",
        "pgmulti_stats_server_assignments_total", "pgmulti_stats_received_bytes_total",
        "pgmulti_stats_sent_bytes_total", "pgmulti_stats_server_in_transaction_seconds_total")}
    assert moved["pgmulti_stats_sql_transactions_pooled_total"] >= xacts
    assert moved["pgmulti_stats_queries_pooled_total"] >= 4 * xacts
    assert moved["pgmulti_stats_server_assignments_total"] >= xacts
    assert moved["pgmulti_stats_received_bytes_total"] > 0
    assert moved["pgmulti_stats_sent_bytes_total"] > 0
    assert moved["pgmulti_stats_server_in_transaction_seconds_total"] >= xacts * PGBENCH_SLEEP_S

    # The histograms count exactly what the counters count (testdb has a single pool).
    for histogram, counter in (
            ("pgmulti_transaction_duration_seconds", "pgmulti_stats_sql_transactions_pooled_total"),
            ("pgmulti_query_duration_seconds", "pgmulti_stats_queries_pooled_total"),
            ("pgmulti_client_wait_duration_seconds", "pgmulti_stats_server_assignments_total")):
        pairs = buckets(after, histogram)
        counts = [count for _, count in pairs]
        assert counts == sorted(counts), histogram           # cumulative
        assert pairs[-1][0] == float("inf")
        assert counts[-1] == value(after, f"{histogram}_count", POOL) == value(after, counter, DB)
    xact_sum = value(after, "pgmulti_transaction_duration_seconds_sum", POOL)
    query_sum = value(after, "pgmulti_query_duration_seconds_sum", POOL)
    assert 0 < query_sum <= xact_sum
    assert xact_sum == pytest.approx(
        value(after, "pgmulti_stats_server_in_transaction_seconds_total", DB))
    # No transaction of pgbench's is faster than its pg_sleep.
    xact_buckets = buckets(after, "pgmulti_transaction_duration_seconds")
    below_sleep = max(count for le, count in xact_buckets if le < PGBENCH_SLEEP_S)
    assert value(after, "pgmulti_transaction_duration_seconds_count", POOL) - below_sleep >= xacts
    # Three pgbench clients on one server: some of them queued.
    wait_buckets = buckets(after, "pgmulti_client_wait_duration_seconds")
    assert wait_buckets[-1][1] > wait_buckets[0][1]
    assert value(after, "pgmulti_stats_client_wait_seconds_total", DB) > 0

    assert value(after, "pgmulti_errors_total", sqlstate="3D000") >= 1
    for direction in ("client_to_server", "server_to_client"):
        assert (value(after, "pgmulti_relayed_bytes_total", direction=direction)
                > value(before, "pgmulti_relayed_bytes_total", direction=direction))


def test_show_stats_times_are_measured_and_match_the_metrics(metrics_proxy, pg, tmp_path):
    proxy, port = metrics_proxy, metrics_proxy.metrics_port
    run_pgbench(proxy, pg, tmp_path)
    stats = show_stats(proxy)["testdb"]
    samples = scrape(port)  # nothing ran in between: the same counters
    xacts = PGBENCH_CLIENTS * PGBENCH_TRANSACTIONS
    assert stats["total_xact_count"] >= xacts
    assert 0 < stats["total_query_time"] <= stats["total_xact_time"]
    assert stats["total_xact_time"] >= xacts * PGBENCH_SLEEP_S * 1_000_000
    # Each transaction spent at least its sleep in one query; the other three take less.
    assert stats["total_query_time"] >= xacts * PGBENCH_SLEEP_S * 1_000_000
    assert stats["total_xact_count"] == value(
        samples, "pgmulti_stats_sql_transactions_pooled_total", DB)
    assert stats["total_query_count"] == value(samples, "pgmulti_stats_queries_pooled_total", DB)
    # SHOW STATS columns are numeric (Decimal in psycopg); the exposition is float seconds.
    assert int(stats["total_xact_time"]) == pytest.approx(
        value(samples, "pgmulti_stats_server_in_transaction_seconds_total", DB) * 1e6, abs=1)
    assert int(stats["total_query_time"]) == pytest.approx(
        value(samples, "pgmulti_stats_queries_duration_seconds_total", DB) * 1e6, abs=1)


def test_pool_gauges_show_a_waiting_client(metrics_proxy):
    proxy, port = metrics_proxy, metrics_proxy.metrics_port
    holder = connect(proxy)
    waiter = connect(proxy)
    done = threading.Event()
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # the pool's only server stays with this transaction

        def wait_for_server():
            waiter.execute("SELECT 1")
            done.set()

        thread = threading.Thread(target=wait_for_server, daemon=True)
        thread.start()
        samples = wait_for(
            lambda: (lambda s: s if value(s, "pgmulti_pools_client_waiting_connections", POOL)
                     else None)(scrape(port)), 10, what="a waiting client in the metrics")
        assert value(samples, "pgmulti_pools_server_active_connections", POOL) == 1
        assert value(samples, "pgmulti_pools_client_active_connections", POOL) == 1
        assert value(samples, "pgmulti_pools_server_idle_connections", POOL) == 0
        assert value(samples, "pgmulti_pools_client_maxwait_seconds", POOL) > 0
        holder.execute("COMMIT")
        assert done.wait(10)
        thread.join(10)
        samples = scrape(port)
        assert value(samples, "pgmulti_pools_client_waiting_connections", POOL) == 0
        assert value(samples, "pgmulti_pools_client_maxwait_seconds", POOL) == 0
        assert value(samples, "pgmulti_pools_client_active_connections", POOL) == 2
    finally:
        holder.close()
        waiter.close()


def test_only_get_metrics_is_served(metrics_proxy):
    port = metrics_proxy.metrics_port
    scrape(port)
    status, _, _ = get(port, "/")
    assert status == 404
    with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_TIMEOUT_S) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: pgmulti\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # the server closes after one answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"pgmulti_up 1.0" in answer


def test_a_busy_metrics_port_does_not_stop_pooling(pgmulti):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proxy = pgmulti({"metrics_port": port})
        with connect(proxy) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        wait_for(lambda: "could not serve metrics" in proxy.log_text(), 5,
                 what="the metrics error in the log")


def test_workers_serve_one_merged_answer(pgmulti, base_config):
    workers = 2
    port = find_free_port()
    proxy = pgmulti(base_config(workers=workers, metrics_port=port, default_pool_size=4))
    conns: list[psycopg.Connection] = []
    try:
        # The kernel picks the worker per connection: open some until both have clients.
        for _ in range(40):
            conns.append(connect(proxy))
            with connect(proxy, "pgbouncer") as admin:
                ids = [row[-1] for row in admin.execute("SHOW CLIENTS").fetchall()
                       if row[2] == "testdb"]
            if len({client_id % workers for client_id in ids}) == workers:
                break
        else:
            raise AssertionError("the kernel never spread connections over the workers")
        for conn in conns:
            conn.execute("SELECT 1")
        samples = scrape(port)
        assert value(samples, "pgmulti_processes") == workers
        assert value(samples, "pgmulti_pools_client_active_connections", POOL) == len(conns)
        assert value(samples, "pgmulti_stats_sql_transactions_pooled_total", DB) >= len(conns)
        assert len([labels for labels in samples["pgmulti_pools_client_active_connections"]
                    if labels == POOL]) == 1
    finally:
        for conn in conns:
            conn.close()


def test_reload_moves_the_metrics_port(pgmulti, base_config):
    first, second = find_free_port(), find_free_port()
    proxy = pgmulti(base_config(metrics_port=first))
    assert value(scrape(first), "pgmulti_up") == 1
    proxy.write_config(base_config(metrics_port=second))
    proxy.signal(signal.SIGHUP)
    assert value(scrape(second), "pgmulti_up") == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first), timeout=2).close()
