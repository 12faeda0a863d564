"""Prometheus metrics: a snapshot of counters, merged across workers, served over HTTP.

Three steps, so that with several worker processes each one takes its own snapshot and one
process serves the sum: local_snapshot() reads this process's counters into plain data (it
travels between workers as msgpack), merge_snapshots() adds snapshots up, render() writes the
Prometheus text format. Everything is read from counters at scrape time: the per-transaction
path does no work for the metrics.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.utils import floatToGoString

from .__version__ import __version__
from ._codec import TIMING_BUCKETS_US

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgmulti.metrics")

US = 1_000_000
POOL_KEYS = ("database", "user")
TAKE_MAX = frozenset({"maxwait_seconds"})   # merged as the largest value, not the sum
PEER_OP = "metrics"                         # the control-channel request for a worker's snapshot

# (snapshot field, metric name, help) per pool, labelled database and user.
POOL_GAUGES = (
    ("cl_active", "pgmulti_pools_client_active_connections",
     "Client connections linked to a server or idle, not waiting"),
    ("cl_waiting", "pgmulti_pools_client_waiting_connections",
     "Client connections waiting for a server"),
    ("sv_active", "pgmulti_pools_server_active_connections",
     "Server connections linked to a client"),
    ("sv_idle", "pgmulti_pools_server_idle_connections",
     "Server connections idle and ready for a client"),
    ("sv_used", "pgmulti_pools_server_used_connections",
     "Server connections running server_reset_query or waiting for server_check_query"),
    ("sv_tested", "pgmulti_pools_server_testing_connections",
     "Server connections running server_check_query"),
    ("sv_login", "pgmulti_pools_server_login_connections",
     "Server connections logging in"),
    ("maxwait_seconds", "pgmulti_pools_client_maxwait_seconds",
     "Time the oldest waiting client has waited"),
)

# (snapshot field, metric name without _total, help, scale) per database; times are kept in
# microseconds and exposed in seconds.
DATABASE_COUNTERS = (
    ("server_assignment_count", "pgmulti_stats_server_assignments",
     "Times a server was assigned to a client", 1),
    ("xact_count", "pgmulti_stats_sql_transactions_pooled",
     "SQL transactions pooled", 1),
    ("query_count", "pgmulti_stats_queries_pooled", "SQL queries pooled", 1),
    ("received", "pgmulti_stats_received_bytes", "Bytes received from clients", 1),
    ("sent", "pgmulti_stats_sent_bytes", "Bytes sent to clients by servers", 1),
    ("xact_time_us", "pgmulti_stats_server_in_transaction_seconds",
     "Time servers spent in transactions, idle in transaction included", US),
    ("query_time_us", "pgmulti_stats_queries_duration_seconds",
     "Time servers spent executing queries", US),
    ("wait_time_us", "pgmulti_stats_client_wait_seconds",
     "Time clients spent waiting for a server", US),
)

# (buckets field, sum field, metric name, help) per pool.
HISTOGRAMS = (
    ("xact_buckets", "xact_time_us", "pgmulti_transaction_duration_seconds",
     "Transaction time on the server, first request to ReadyForQuery idle"),
    ("query_buckets", "query_time_us", "pgmulti_query_duration_seconds",
     "Query time on the server, request to the ReadyForQuery answering it"),
    ("wait_buckets", "wait_time_us", "pgmulti_client_wait_duration_seconds",
     "Time a client waited for a server, per assignment"),
)

BUCKET_BOUNDS = [floatToGoString(bound / US) for bound in TIMING_BUCKETS_US] + ["+Inf"]


# -- snapshots -----------------------------------------------------------------------------

def local_snapshot(app: App) -> dict:
    """This process's counters as plain data (ints, floats, str, lists, dicts)."""
    now = time.monotonic()
    pools = []
    databases: dict[str, dict] = {}
    relayed_in = relayed_out = 0
    for pool in app.pools.values():
        totals = pool.stats.totals(pool)
        histograms = pool.stats.histograms(pool)
        pools.append({
            "database": pool.name, "user": pool.user,
            "cl_active": pool.cl_active, "cl_waiting": len(pool.waiting),
            "sv_active": len(pool.active), "sv_idle": len(pool.idle), "sv_used": len(pool.used),
            "sv_tested": len(pool.tested), "sv_login": len(pool.login),
            "maxwait_seconds": now - pool.waiting[0].wait_start if pool.waiting else 0.0,
            "xact_buckets": histograms.xact, "query_buckets": histograms.query,
            "wait_buckets": histograms.wait,
            "xact_time_us": totals.xact_time, "query_time_us": totals.query_time,
            "wait_time_us": totals.wait_time,
        })
        db = databases.setdefault(pool.name, {})
        for field, count in _database_counters(totals).items():
            db[field] = db.get(field, 0) + count
        relayed_in += pool.stats.client_relayed(pool)
        relayed_out += totals.sent
    return {
        "version": __version__,
        "processes": 1,
        "pools": pools,
        "databases": databases,
        "errors": dict(app.errors_by_sqlstate),
        "relayed_bytes": {"client_to_server": relayed_in, "server_to_client": relayed_out},
    }


def _database_counters(totals) -> dict[str, int]:
    """A pool's SHOW STATS totals under the snapshot's names (DATABASE_COUNTERS)."""
    return {"server_assignment_count": totals.server_assignment_count,
            "xact_count": totals.xact_count, "query_count": totals.query_count,
            "received": totals.received, "sent": totals.sent,
            "xact_time_us": totals.xact_time, "query_time_us": totals.query_time,
            "wait_time_us": totals.wait_time}


def merge_snapshots(snapshots: list[dict]) -> dict:
    """One snapshot for several processes: counters, histograms and gauges add up, maxwait
    is the largest. Pools are matched by (database, user); the inputs are left unchanged."""
    if not snapshots:
        raise ValueError("no snapshot to merge")
    merged = copy.deepcopy(snapshots[0])
    pools = {_pool_key(pool): pool for pool in merged.get("pools", [])}
    for snapshot in snapshots[1:]:
        for pool in snapshot.get("pools", []):
            into = pools.get(_pool_key(pool))
            if into is None:
                pools[_pool_key(pool)] = copy.deepcopy(pool)
            else:
                _merge_into(into, pool)
        _merge_into(merged, {key: value for key, value in snapshot.items() if key != "pools"})
    merged["pools"] = list(pools.values())
    return merged


def _pool_key(pool: dict) -> tuple:
    return tuple(pool[key] for key in POOL_KEYS)


def _merge_into(into: dict, part: dict) -> None:
    for key, value in part.items():
        old = into.get(key)
        if old is None:
            into[key] = copy.deepcopy(value)
        elif isinstance(value, dict):
            _merge_into(old, value)
        elif isinstance(value, list):
            if len(value) > len(old):
                old.extend([0] * (len(value) - len(old)))
            for i, count in enumerate(value):
                old[i] += count
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # text (version, names): the first snapshot's stands
        elif key in TAKE_MAX:
            into[key] = max(old, value)
        else:
            into[key] = old + value


# -- the text format -----------------------------------------------------------------------

class _SnapshotCollector:
    """Hands one snapshot to prometheus-client as metric families."""

    def __init__(self, snapshot: dict):
        self.snapshot = snapshot

    def collect(self):
        snapshot = self.snapshot
        up = GaugeMetricFamily("pgmulti_up", "1 while pgmulti answers")
        up.add_metric([], 1)
        yield up
        yield InfoMetricFamily("pgmulti", "pgmulti version",
                               value={"version": str(snapshot.get("version", ""))})
        processes = GaugeMetricFamily("pgmulti_processes",
                                      "Worker processes whose counters are included")
        processes.add_metric([], snapshot.get("processes", 0))
        yield processes

        pools = sorted(snapshot.get("pools", []), key=_pool_key)
        for field, name, text in POOL_GAUGES:
            family = GaugeMetricFamily(name, text, labels=POOL_KEYS)
            for pool in pools:
                family.add_metric([pool["database"], pool["user"]], pool.get(field, 0))
            yield family
        for buckets_field, sum_field, name, text in HISTOGRAMS:
            family = HistogramMetricFamily(name, text, labels=POOL_KEYS)
            for pool in pools:
                family.add_metric([pool["database"], pool["user"]],
                                  _cumulative(pool.get(buckets_field, [])),
                                  sum_value=pool.get(sum_field, 0) / US)
            yield family

        databases = sorted(snapshot.get("databases", {}).items())
        for field, name, text, scale in DATABASE_COUNTERS:
            family = CounterMetricFamily(name, text, labels=("database",))
            for database, counters in databases:
                value = counters.get(field, 0)
                family.add_metric([database], value / scale if scale != 1 else value)
            yield family

        errors = CounterMetricFamily("pgmulti_errors",
                                     "Errors pgmulti reported to clients, by SQLSTATE",
                                     labels=("sqlstate",))
        for sqlstate, count in sorted(snapshot.get("errors", {}).items()):
            errors.add_metric([sqlstate], count)
        yield errors
        relayed = CounterMetricFamily("pgmulti_relayed_bytes",
                                      "Bytes the codec passed between clients and servers",
                                      labels=("direction",))
        for direction, count in sorted(snapshot.get("relayed_bytes", {}).items()):
            relayed.add_metric([direction], count)
        yield relayed


def _cumulative(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts to Prometheus' cumulative "le" buckets (+Inf last)."""
    counts = list(counts) + [0] * (len(BUCKET_BOUNDS) - len(counts))
    buckets, running = [], 0
    for bound, count in zip(BUCKET_BOUNDS, counts):
        running += count
        buckets.append((bound, running))
    return buckets


def render(snapshot: dict) -> bytes:
    """The snapshot in the Prometheus text exposition format (version 0.0.4)."""
    registry = CollectorRegistry()
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


# -- the HTTP endpoint ---------------------------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192     # request line and headers; a scrape needs a few hundred
READ_TIMEOUT_S = 10.0
SNAPSHOT_TIMEOUT_S = 15.0    # longer than a peer's ask timeout, so that one fires first


class MetricsServer:
    """A tiny HTTP/1.1 server: GET /metrics answers the snapshot, anything else 404; one
    request per connection."""

    def __init__(self, get_snapshot: Callable[[], Awaitable[dict]]):
        self.get_snapshot = get_snapshot
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port,
                                                  limit=MAX_REQUEST_BYTES)

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the kernel's choice for port 0)."""
        return self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await self._answer(reader)
            content_type = CONTENT_TYPE if status == "200 OK" else "text/plain; charset=utf-8"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass  # the scraper went away or never finished its request
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return "431 Request Header Fields Too Large", b"request too large\n"
        except asyncio.IncompleteReadError:
            return "400 Bad Request", b"incomplete request\n"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request line\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET" or target != b"/metrics":
            return "404 Not Found", b"not found: try GET /metrics\n"
        try:
            snapshot = await asyncio.wait_for(self.get_snapshot(), SNAPSHOT_TIMEOUT_S)
        except Exception:
            log.exception("could not collect the metrics")
            return "500 Internal Server Error", b"could not collect the metrics\n"
        return "200 OK", render(snapshot)


# -- wiring into the running pooler --------------------------------------------------------

async def start(app: App) -> MetricsServer | None:
    """Serve metrics on metrics_addr:metrics_port if the port is set (worker 0 serves the sum
    of every worker's snapshot); returns the server to close at shutdown, or None."""
    cfg = app.config.pgbouncer
    if app.peers is not None:
        async def answer_peer(request: dict) -> dict:
            return local_snapshot(app)
        app.peers.handlers[PEER_OP] = answer_peer
    if cfg.metrics_port <= 0 or app.worker_index != 0:
        return None

    async def get_snapshot() -> dict:
        snapshots = [local_snapshot(app)]
        if app.peers is not None:
            snapshots += await app.peers.ask_others(PEER_OP)
        return merge_snapshots(snapshots)

    server = MetricsServer(get_snapshot)
    try:
        await server.start(cfg.metrics_addr, cfg.metrics_port)
    except OSError as exc:
        # Pooling matters more than its metrics: keep serving clients.
        log.error("could not serve metrics on %s:%d: %s", cfg.metrics_addr, cfg.metrics_port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", cfg.metrics_addr, server.port)
    return server
