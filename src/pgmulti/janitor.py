"""One periodic tick that sweeps every pool and client for timeouts, lifetimes and stats."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from . import errors

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgmulti.janitor")

TICK_SECONDS = 1 / 3   # PgBouncer's janitor also runs three times a second
# Clients that read nothing for this long give their read buffer back (it is reallocated on
# their next read) and their socket back to uvloop (direct I/O's second descriptor): idle
# connections then cost a few hundred bytes of Python objects and one descriptor.
TRIM_PERIOD_S = 5.0

_IN_TRANSACTION = (ord("T"), ord("E"))


class Janitor:
    def __init__(self, app: App):
        self.app = app
        self._handle: asyncio.TimerHandle | None = None
        self._last_stats = time.monotonic()
        self._last_trim = self._last_stats

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self) -> None:
        try:
            self.sweep(time.monotonic())
        except Exception:
            log.exception("janitor tick failed")
        self.start()

    def sweep(self, now: float) -> None:
        app = self.app
        cfg = app.config.pgbouncer
        self._expire_logins(now, cfg.client_login_timeout)
        for pool in list(app.pools.values()):
            pool.tick(now)
        self._expire_clients(now)
        self._free_unused_autodbs(now, cfg.autodb_idle_timeout)
        if now - self._last_trim >= TRIM_PERIOD_S:
            self._trim_idle_buffers()
            self._last_trim = now
        if cfg.stats_period > 0 and now - self._last_stats >= cfg.stats_period:
            self._roll_stats(now - self._last_stats)
            self._last_stats = now
        if app.shutting_down:
            self.check_shutdown()

    def _expire_logins(self, now: float, timeout: float) -> None:
        if timeout <= 0:
            return
        for client in list(self.app.login_clients):
            if now - client.created > timeout:
                client.report(errors.login_timeout())

    def _expire_clients(self, now: float) -> None:
        """Per-pool client timeouts; activity is seen as bytes moving, clocks start when the
        janitor first sees a request outstanding or a transaction open (1/3 s resolution)."""
        for pool in self.app.pools.values():
            limits = pool.settings
            if not limits.has_client_timeouts:
                continue
            for client in list(pool.clients):
                self._check_client(client, limits, now)

    def _check_client(self, client, limits, now: float) -> None:
        server = client.server
        busy = server is not None and server.pending > 0
        in_transaction = server is not None and server.ready_status in _IN_TRANSACTION
        client.busy_since = (client.busy_since or now) if busy else 0.0
        client.xact_since = (client.xact_since or now) if busy or in_transaction else 0.0
        if limits.query_timeout and busy and now - client.busy_since > limits.query_timeout:
            server.close("query_timeout")
            client.report(errors.fatal(errors.QUERY_CANCELED, "query_timeout"))
            return
        if (limits.transaction_timeout and client.xact_since
                and now - client.xact_since > limits.transaction_timeout):
            server.close("transaction_timeout")
            client.report(errors.fatal(errors.TRANSACTION_TIMEOUT, "transaction_timeout"))
            return
        activity = client.rx_bytes + (server.rx_bytes if server is not None else 0)
        if activity != client.seen_activity:
            client.seen_activity = activity
            client.last_active = now
            return
        if client.state == "waiting" or busy:
            return
        idle_for = now - client.last_active
        if (limits.idle_transaction_timeout and in_transaction
                and idle_for > limits.idle_transaction_timeout):
            client.report(errors.fatal(errors.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                                       "idle transaction timeout"))
        elif (limits.client_idle_timeout and not in_transaction
              and idle_for > limits.client_idle_timeout):
            client.report(errors.fatal(errors.IDLE_SESSION_TIMEOUT, "client_idle_timeout"))

    def _free_unused_autodbs(self, now: float, timeout: float) -> None:
        """autodb_idle_timeout: a pool of a database made from the "*" entry is dropped, with
        its statistics, once it has had no client and no server for `timeout` seconds."""
        if timeout <= 0:
            return
        app = self.app
        configured = app.config.databases
        freed = False
        for key, pool in list(app.pools.items()):
            if pool.name in configured or pool.paused:
                continue
            if pool.clients or pool.waiting or pool.server_count:
                pool.unused_since = 0.0
            elif not pool.unused_since:
                pool.unused_since = now
            elif now - pool.unused_since > timeout:
                del app.pools[key]
                freed = True
                log.info("%r freed: unused for autodb_idle_timeout", pool)
        if freed:
            app.known_logins.forget_all()  # their logins point at the pools

    def _trim_idle_buffers(self) -> None:
        for client in self.app.clients:
            if client.server is None and client.rx_bytes == client.rx_bytes_at_trim:
                client.trim_idle()
            client.rx_bytes_at_trim = client.rx_bytes

    def _roll_stats(self, seconds: float) -> None:
        app = self.app
        by_db: dict[str, list] = {}
        for pool in app.pools.values():
            pool.stats.roll_period(pool, seconds)
            by_db.setdefault(pool.name, []).append(pool.stats.averages)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("direct I/O: %s", ", ".join(
                f"{name} {count}" for name, count in app.direct_io.counters().items()))
            log.debug("logins from known startup packets: %d", app.known_logins.used)
        if not app.config.pgbouncer.log_stats:
            return
        for name, averages in sorted(by_db.items()):
            xacts = sum(a.xact_count for a in averages)
            queries = sum(a.query_count for a in averages)
            recv = sum(a.received for a in averages)
            sent = sum(a.sent for a in averages)
            xact_us = max((a.xact_time for a in averages), default=0)
            query_us = max((a.query_time for a in averages), default=0)
            wait_us = max((a.wait_time for a in averages), default=0)
            log.info("stats: %d xacts/s, %d queries/s, in %d B/s, out %d B/s, xact %d us, "
                     "query %d us, wait %d us (%s)", xacts, queries, recv, sent, xact_us,
                     query_us, wait_us, name)

    def check_shutdown(self) -> None:
        """During a safe shutdown, exit once no server is linked to a client."""
        app = self.app
        if not app.shutting_down or app.stopped.done():
            return
        if app.shutdown_waits_for_clients:
            busy = bool(app.clients)
        else:
            busy = any(pool.active or pool.used for pool in app.pools.values())
        if not busy:
            app.finish()
