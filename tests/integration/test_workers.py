"""Worker processes (`workers = N`): one address, several event loops, one pgmulti to operate.

Which worker the kernel hands a new connection to is decided by a hash of its addresses, so
tests that need clients in every worker open connections until each worker has some (client
ids encode the worker: id % workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgmulti.cluster import clean_env
from pgmulti.supervisor import share, worker_count
from support import wait_for

CONNECT_TIMEOUT = 10
WORKERS = 2
MAX_CONNECTIONS_TO_SPREAD = 40  # 2 workers: all on one worker has odds 2**-39


def connect(proxy, db: str = "testdb", **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(db=db), connect_timeout=CONNECT_TIMEOUT, autocommit=True,
                           **kwargs)


def console(proxy) -> psycopg.Connection:
    return connect(proxy, db="pgbouncer")


def show(proxy, what: str) -> list[dict]:
    with console(proxy) as admin:
        cursor = admin.execute(f"SHOW {what}")
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def worker_pids(proxy) -> list[int]:
    text = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text()
    return sorted(int(pid) for pid in text.split())


def client_ids(proxy) -> dict[int, int]:
    """Our own connection's pgmulti client id -> worker, from SHOW CLIENTS (ports match)."""
    return {row["port"]: row["id"] % WORKERS for row in show(proxy, "CLIENTS")
            if row["database"] == "testdb"}


def connections_in_every_worker(proxy) -> list[psycopg.Connection]:
    """Open connections until every worker holds at least one; returns them all."""
    conns: list[psycopg.Connection] = []
    try:
        for _ in range(MAX_CONNECTIONS_TO_SPREAD):
            conns.append(connect(proxy))
            if len(conns) >= WORKERS and len(set(client_ids(proxy).values())) == WORKERS:
                return conns
        raise AssertionError("the kernel never spread connections over the workers")
    except BaseException:
        for conn in conns:
            conn.close()
        raise


@pytest.fixture
def workers(pgmulti, base_config):
    def start(**settings):
        settings.setdefault("default_pool_size", 4)
        return pgmulti(base_config(workers=WORKERS, **settings))
    return start


# --- the parts that need no process ---


def test_limits_are_divided_so_the_totals_hold():
    assert [share(20, i, 2) for i in range(2)] == [10, 10]
    assert [share(5, i, 2) for i in range(2)] == [3, 2]
    assert sum(share(7, i, 3) for i in range(3)) == 7
    # Unlimited stays unlimited; a limit below the worker count still serves every worker.
    assert share(0, 1, 4) == 0
    assert [share(1, i, 2) for i in range(2)] == [1, 1]
    assert [share(1, i, 2, at_least_one=False) for i in range(2)] == [1, 0]
    assert share(9, 0, 1) == 9


def test_default_is_one_worker_per_core():
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


# --- one pgmulti, several processes ---


def test_workers_start_and_serve(workers):
    proxy = workers()
    assert len(worker_pids(proxy)) == WORKERS
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_show_merges_every_worker(workers):
    proxy = workers()
    conns = connections_in_every_worker(proxy)
    try:
        clients = [row for row in show(proxy, "CLIENTS") if row["database"] == "testdb"]
        assert len(clients) == len(conns)
        assert len({row["id"] for row in clients}) == len(conns)  # ids unique across workers
        pools = [row for row in show(proxy, "POOLS") if row["database"] == "testdb"]
        assert len(pools) == 1  # one row per pool, summed over the workers
        assert pools[0]["cl_active"] == len(conns)
        lists = {row["list"]: row["items"] for row in show(proxy, "LISTS")}
        assert lists["used_clients"] == len(conns) + 1  # and the console itself
        assert lists["databases"] == 2
        for conn in conns:
            conn.execute("SELECT 1")
        stats = {row["database"]: row for row in show(proxy, "STATS")}
        assert stats["testdb"]["total_xact_count"] >= len(conns)
    finally:
        for conn in conns:
            conn.close()


def test_console_commands_reach_every_worker(workers):
    proxy = workers()
    conns = connections_in_every_worker(proxy)
    try:
        with console(proxy) as admin:
            admin.execute("PAUSE testdb")
            # Every worker is paused: a new transaction in any of them waits.
            states = [row["paused"] for row in show(proxy, "DATABASES") if row["name"] == "testdb"]
            assert states == [1]
            admin.execute("RESUME testdb")
        for conn in conns:
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        for conn in conns:
            conn.close()


def sleeping_backends(pg) -> int:
    return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                       "AND query = 'SELECT pg_sleep(20)'").strip())


def test_cancel_reaches_the_worker_that_owns_the_client(workers, pg):
    """A CancelRequest is a new connection: the kernel may give it to any worker."""
    proxy = workers()  # transaction pooling: each query gets a server, however many clients
    conns = connections_in_every_worker(proxy)
    try:
        for conn in conns[:10]:
            errors: list[BaseException] = []

            def sleep(conn=conn) -> None:
                try:
                    conn.execute("SELECT pg_sleep(20)")
                except psycopg.errors.QueryCanceled as exc:
                    errors.append(exc)

            thread = threading.Thread(target=sleep)
            started = time.monotonic()
            thread.start()
            wait_for(lambda: sleeping_backends(pg) == 1, 10, "the query to run")
            conn.cancel_safe(timeout=5)
            thread.join(10)
            assert not thread.is_alive() and errors, "the query was not cancelled"
            assert time.monotonic() - started < 10
    finally:
        for conn in conns:
            conn.close()


def test_a_dead_worker_is_replaced(workers):
    proxy = workers()
    first, second = worker_pids(proxy)
    os.kill(first, signal.SIGKILL)
    pids = wait_for(lambda: (lambda p: p if len(p) == WORKERS and first not in p else None)(
        worker_pids(proxy)), 15, "a new worker")
    assert second in pids
    # New connections work whichever worker they reach.
    for _ in range(8):
        with connect(proxy) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "died" in proxy.log_text()


def test_sighup_reloads_every_worker(workers, base_config):
    proxy = workers()
    proxy.write_config(base_config(workers=WORKERS, default_pool_size=4, max_client_conn=77))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: proxy.log_text().count("configuration reloaded") >= WORKERS, 10,
             "every worker reloading")


def test_sigterm_waits_for_clients_in_every_worker(workers):
    proxy = workers()
    conns = connections_in_every_worker(proxy)
    try:
        proxy.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proxy.popen.poll() is None  # clients remain: everything keeps running
        for conn in conns:
            assert conn.execute("SELECT 3").fetchone() == (3,)
    finally:
        for conn in conns:
            conn.close()
    assert proxy.wait(15) == 0


def test_console_shutdown_stops_all_workers(workers):
    proxy = workers()
    pids = worker_pids(proxy)
    with console(proxy) as admin:
        try:
            admin.execute("SHUTDOWN")
        except psycopg.OperationalError:
            pass  # the process goes away without an answer, as PgBouncer's does
    assert proxy.wait(15) == 0
    for pid in pids:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists()
                 or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 10, f"worker {pid} to exit")


def test_pgbench_through_two_workers(workers, pg):
    pg.psql("DROP DATABASE IF EXISTS workerbench")
    pg.psql("CREATE DATABASE workerbench")
    try:
        init = subprocess.run(
            [pg.bindir / "pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port),
             "-U", "postgres", "workerbench"],
            env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60, check=False)
        assert init.returncode == 0, init.stderr
        proxy = workers(databases={"workerbench": "host=127.0.0.1 port={pg_port} dbname=workerbench"})
        result = subprocess.run(
            [pg.bindir / "pgbench", "-n", "-t", "50", "-c", "8", "-j", "2", "-h", proxy.host,
             "-p", str(proxy.port), "-U", "postgres", "workerbench"],
            env=clean_env(PGCONNECT_TIMEOUT="10"), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "number of transactions actually processed: 400/400" in result.stdout
        stats = {row["database"]: row for row in show(proxy, "STATS")}
        assert stats["workerbench"]["total_xact_count"] >= 400
    finally:
        pg.psql("DROP DATABASE IF EXISTS workerbench WITH (FORCE)")


def test_show_databases_gives_the_configured_limits_not_a_workers_share(workers):
    proxy = workers(default_pool_size=5, max_db_connections=7)
    rows = [row for row in show(proxy, "DATABASES") if row["name"] == "testdb"]
    assert len(rows) == 1
    assert (rows[0]["pool_size"], rows[0]["max_connections"]) == (5, 7)
