"""More clients than servers in transaction pooling: the codec queues clients and hands each
released server straight to the first one waiting (PoolCore), and the pool's books stay right.

Every client checks the answers to its own queries, so a server handed to the wrong client or
a queued query lost or sent twice fails the test. SHOW POOLS must settle back, SHOW STATS must
show the clients' wait, and the codec's hand-off counters (logged with verbose once per
stats_period) must show that the C path did the work.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from support import admin, latest_counters, wait_for

CLIENTS = 12
POOL_SIZE = 3
TRANSACTIONS = 30
JOIN_TIMEOUT_S = 25


def row_for(rows: list[dict[str, str]], database: str, **match: str) -> dict[str, str]:
    for row in rows:
        if row["database"] == database and all(row[k] == v for k, v in match.items()):
            return row
    raise AssertionError(f"no row for {database} {match} in {rows}")


def run_client(proxy, index: int, prepared: bool, errors: list[BaseException]) -> None:
    """TRANSACTIONS transactions whose answers name this client: simple protocol for even
    clients, extended (named prepared statements when `prepared`) for odd ones."""
    try:
        simple = index % 2 == 0
        cursor_factory = psycopg.ClientCursor if simple else psycopg.Cursor
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=5, autocommit=True,
                             prepare_threshold=0 if prepared else None,
                             cursor_factory=cursor_factory) as conn:
            for n in range(TRANSACTIONS):
                if n % 3 == 0:
                    # A transaction block: the server must stay with us until COMMIT.
                    with conn.transaction():
                        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                        row = conn.execute("SELECT %s::int, %s::int, pg_backend_pid()",
                                           [index, n]).fetchone()
                        assert row == (index, n, pid)
                else:
                    row = conn.execute("SELECT %s::int, %s::int, pg_sleep(0.001)::text",
                                       [index, n]).fetchone()
                    assert row == (index, n, "")
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared_statements"])
def test_more_clients_than_servers_hand_off_in_the_codec(pgmulti, prepared):
    proxy = pgmulti({"default_pool_size": POOL_SIZE, "max_client_conn": 50,
                     "max_prepared_statements": 100 if prepared else 0,
                     "stats_period": 1, "verbose": 1})
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=5, autocommit=True) as warm:
        assert warm.execute("SELECT 1").fetchone() == (1,)

    errors: list[BaseException] = []
    threads = [threading.Thread(target=run_client, args=(proxy, i, prepared, errors), daemon=True)
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
        assert not thread.is_alive(), "a client did not finish in time"
    if errors:
        raise errors[0]

    def settled():
        pool = row_for(admin(proxy, "SHOW POOLS"), "testdb", user="postgres")
        return (pool["cl_active"] == "0" and pool["cl_waiting"] == "0"
                and pool["sv_active"] == "0" and int(pool["sv_idle"]) == POOL_SIZE
                and pool["sv_used"] == "0" and pool["sv_login"] == "0")

    wait_for(settled, 5, "SHOW POOLS back to idle servers only")
    stats = row_for(admin(proxy, "SHOW STATS"), "testdb")
    assert int(stats["total_xact_count"]) >= CLIENTS * TRANSACTIONS
    assert int(stats["total_server_assignment_count"]) >= CLIENTS * TRANSACTIONS
    assert int(stats["total_wait_time"]) > 0
    clients = [row for row in admin(proxy, "SHOW CLIENTS") if row["database"] == "testdb"]
    assert clients == []

    # The counters are logged within a stats period of their last change. A client's first
    # transaction goes through Python (its parameters are compared there once); with the
    # pool saturated nearly all the others start with a hand-off in C.
    c_started = CLIENTS * (TRANSACTIONS - 1) // 2

    def counted():
        counters = latest_counters(proxy)
        return counters if counters and counters[0] + counters[2] >= c_started else None

    links, releases, handoffs, queued = wait_for(counted, 5, "codec counters logged")
    assert handoffs > 0, "no released server went straight to a waiting client in C"
    assert queued > 0, "no client was queued in C"
