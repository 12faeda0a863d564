"""Pool per (database, user): server connections by state, the FIFO of waiting clients, limits."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import errors, protocol, session
from ._codec import PoolCore
from .client import PREPARED_RELAY_ACTIONS as CLIENT_PREPARED_ACTIONS
from .client import RELAY_ACTIONS as CLIENT_RELAY_ACTIONS
from .client import without_simple_query
from .errors import PgError
from .server import (INSPECT_ALL, PREPARED_RELAY_ACTIONS, PREPARED_STATEMENT_RELAY_ACTIONS,
                     RELAY_ACTIONS, STATEMENT_RELAY_ACTIONS, ServerConnection)
from .stats import PoolStats

if TYPE_CHECKING:
    from .app import App
    from .client import ClientConnection

log = logging.getLogger("pgmulti.pool")

_server_ids = itertools.count(1)

# Login messages kept per pool for this many distinct startup parameter sets (see greeting).
GREETINGS_MAX = 64

# query_wait_notify's message, word for word PgBouncer's.
QUEUED_NOTICE = protocol.error_response(
    "NOTICE", errors.SUCCESSFUL_COMPLETION,
    "No server connection available in postgres backend, client being queued", notice=True)


@dataclass
class Credentials:
    """How the pooler logs in to PostgreSQL for this pool."""
    password: str | None = None                        # plain, md5 or SCRAM secret
    scram_keys: tuple[bytes, bytes] | None = None      # ClientKey, ServerKey from a client login


@dataclass(frozen=True)
class PoolSettings:
    """Effective limits for one pool (user overrides database overrides global)."""
    pool_mode: str
    pool_size: int
    min_pool_size: int
    reserve_pool_size: int
    max_db_connections: int
    max_user_connections: int
    server_lifetime: float
    max_db_client_connections: int = 0
    max_user_client_connections: int = 0
    client_idle_timeout: float = 0.0
    idle_transaction_timeout: float = 0.0
    query_timeout: float = 0.0
    transaction_timeout: float = 0.0

    @property
    def has_client_timeouts(self) -> bool:
        return bool(self.client_idle_timeout or self.idle_transaction_timeout
                    or self.query_timeout or self.transaction_timeout)


class Pool:
    """Servers of one (database, user) pair and the clients waiting for them.

    A server's state is the collection it sits in (login, idle, active, used, tested), changed
    only by _move(), so SHOW POOLS counts are lengths, never scans.
    """

    def __init__(self, app: App, name: str, db, client_user: str, server_user: str,
                 credentials: Credentials, settings: PoolSettings):
        self.app = app
        self.name = name
        self.db = db
        self.user = client_user
        self.server_user = server_user
        self.credentials = credentials
        self.settings = settings
        self._next_host = 0
        self.set_database(db)
        self.waiting: collections.deque[ClientConnection] = collections.deque()
        self.stats = PoolStats()
        # The per-transaction hand-off runs in the codec; the server collections are its own.
        self.core = PoolCore(self.waiting, app.flags)
        self.idle: list[ServerConnection] = self.core.idle   # newest last (see idle_end)
        self.active: set[ServerConnection] = self.core.active
        self.used: set[ServerConnection] = self.core.used
        self.tested: set[ServerConnection] = self.core.tested
        self.login: set[ServerConnection] = self.core.login
        self.clients: set[ClientConnection] = self.core.clients  # the codec's forget_client
        self.welcome_params: dict[str, str] | None = None
        self._welcome: asyncio.Task | None = None
        self._greetings: dict[tuple, tuple] = {}  # see greeting()
        self.last_failure = 0.0
        self.last_error: PgError | None = None
        # Asked of new servers; 3.0 once one refused 3.2 outright (see ServerProtocolRefused).
        self.server_protocol = protocol.PROTOCOL_LATEST
        self.disabled = False
        self.unused_since = 0.0  # no client and no server since (autodb_idle_timeout)
        self._counters_logged_at = time.monotonic()
        self._counters_logged: dict[str, int] = {}
        self.configure(app.config.pgbouncer)

    def __repr__(self) -> str:
        return f"pool {self.name}/{self.user}"

    def set_database(self, db) -> None:
        """The [databases] entry servers are opened with (again on reload)."""
        self.db = db
        self.hosts = _split_hosts(db.host)
        self.port = db.port or 5432
        self.dbname = db.dbname or self.name

    # PAUSE, DISABLE and RECONNECT live in the core, which checks them on every hand-off.
    @property
    def disabled(self) -> bool:
        return self.core.disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self.core.disabled = value

    @property
    def paused(self) -> bool:
        return self.core.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.core.paused = value

    @property
    def reconnect_generation(self) -> int:
        """RECONNECT: servers of older generations are closed as they come back."""
        return self.core.generation

    @reconnect_generation.setter
    def reconnect_generation(self, value: int) -> None:
        self.core.generation = value

    def configure(self, cfg) -> None:
        """Copy the [pgbouncer] settings the hot path reads (also on reload)."""
        self.reset_always = bool(cfg.server_reset_query_always)
        self.check_delay = cfg.server_check_delay
        query = cfg.server_check_query
        self.check_query = "" if query == "<empty>" else query
        self.check_enabled = bool(query)
        mode = self.settings.pool_mode
        # Prepared statements need mapping only where a client can change servers.
        self.prepared_limit = cfg.max_prepared_statements if mode != session.SESSION else 0
        statement = mode == session.STATEMENT
        self.release_at_ready = mode != session.SESSION
        if self.prepared_limit:
            self.relay_actions = (PREPARED_STATEMENT_RELAY_ACTIONS if statement
                                  else PREPARED_RELAY_ACTIONS)
        else:
            self.relay_actions = STATEMENT_RELAY_ACTIONS if statement else RELAY_ACTIONS
        self._greetings.clear()  # the tracked parameters may have changed
        self.client_relay_actions = CLIENT_RELAY_ACTIONS
        self.client_prepared_actions = CLIENT_PREPARED_ACTIONS
        if cfg.disable_pqexec:
            self.client_relay_actions = without_simple_query(CLIENT_RELAY_ACTIONS)
            self.client_prepared_actions = without_simple_query(CLIENT_PREPARED_ACTIONS)
        core = self.core
        if self.prepared_limit:
            core.set_actions(self.relay_actions, INSPECT_ALL, self.client_prepared_actions,
                             self.client_relay_actions)
        else:
            core.set_actions(self.relay_actions, INSPECT_ALL)
        # Clients join the core at their next link through Python, in the current mode.
        for client in self.clients:
            client.pool_core = None
        # The core handles transaction pooling; the rest always goes through Python.
        core.enabled = (mode == session.TRANSACTION
                        and not (self.reset_always and cfg.server_reset_query))
        core.check_enabled = self.check_enabled
        core.check_delay = float(self.check_delay)
        core.lifetime = float(self.settings.server_lifetime)
        core.pool_size = self.settings.pool_size
        # server_round_robin: the longest idle server first (FIFO), for servers behind a
        # round-robin address; by default the newest (LIFO), keeping few servers warm.
        core.round_robin = bool(cfg.server_round_robin)
        self.idle_end = 0 if core.round_robin else -1

    # -- addressing ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.hosts[self._next_host % len(self.hosts)]

    @property
    def unix_path(self) -> str | None:
        host = self.host
        if host.startswith("/"):
            return f"{host}/.s.PGSQL.{self.port}"
        return None

    @property
    def address_text(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"

    def startup_params(self) -> dict[str, str]:
        params = {"user": self.server_user, "database": self.dbname}
        for key, name in (("client_encoding", "client_encoding"), ("datestyle", "DateStyle"),
                          ("timezone", "TimeZone"), ("application_name", "application_name")):
            value = getattr(self.db, key, None)
            if value:
                params[name] = value
        return params

    # -- counts --------------------------------------------------------------------------

    @property
    def server_count(self) -> int:
        return (len(self.idle) + len(self.active) + len(self.used) + len(self.tested)
                + len(self.login))

    @property
    def cl_active(self) -> int:
        return len(self.clients) - len(self.waiting)

    def all_servers(self):
        yield from self.login
        yield from self.idle
        yield from self.active
        yield from self.used
        yield from self.tested

    def _move(self, server: ServerConnection, state: str) -> None:
        """The one place a server changes state."""
        self._remove(server)
        server.state = state
        if state == "idle":
            self.idle.append(server)
        elif state != "closed":
            getattr(self, state).add(server)

    def _remove(self, server: ServerConnection) -> None:
        state = server.state
        if state == "idle":
            try:
                self.idle.remove(server)
            except ValueError:
                pass
        elif state in ("active", "used", "tested", "login"):
            getattr(self, state).discard(server)

    # -- clients asking for servers ------------------------------------------------------

    def request(self, client: ClientConnection) -> bool:
        """Give the client a server now (True), or queue it and return False."""
        idle = self.idle
        if idle and not self.waiting and not self.paused and not self.app.paused:
            # The hot path of transaction pooling: keep it short.
            server = idle.pop(self.idle_end)  # the newest, or the oldest (configure)
            now = time.monotonic()
            if now - server.last_used <= self.check_delay or not self.check_enabled:
                server.state = "active"
                self.active.add(server)
                self._link(client, server, now)
                return True
            server.state = "popped"
            self.waiting.appendleft(client)
            client.start_waiting()
            self._check(server)
            return False
        if self.app.shutting_down and not self.app.shutdown_waits_for_clients:
            raise errors.shutting_down()
        if self.disabled:
            raise errors.fatal(errors.CANNOT_CONNECT_NOW, "database is disabled")
        if (self.server_count == 0 and self.last_error is not None
                and time.monotonic() - self.last_failure < self.app.config.pgbouncer.server_login_retry):
            raise errors.server_login_failing()
        self.waiting.append(client)
        client.start_waiting()
        if self.server_count < self.settings.pool_size:
            self.launch_needed()  # a full pool waits; the janitor opens reserve connections
        return False

    def _link(self, client: ClientConnection, server: ServerConnection, now: float = 0.0) -> None:
        """Link a server already in `active`; sync parameters first if they differ."""
        session.link(client, server, self.relay_actions)
        if session.parameter_sync_sql(client, server) is None:
            # In step: equal signatures let the core link this pair without asking again.
            client.param_sig = session.signature(client.params)
            server.param_sig = session.signature(server.params)
            if client.maps_statements == bool(self.prepared_limit):
                client.pool_core = self.core
            client.attached(server, now or time.monotonic())
            return
        self._sync_parameters(client, server)

    def _sync_parameters(self, client: ClientConnection, server: ServerConnection) -> None:
        """SET the client's tracked parameters on the server before its bytes flow."""
        client.hold()
        done = server.run_query(session.parameter_sync_sql(client, server))
        done.add_done_callback(lambda fut: self._synced(client, server, fut))

    def _synced(self, client: ClientConnection, server: ServerConnection, fut) -> None:
        if client.server is not server:
            return
        exc = fut.exception()
        if exc is not None:
            client.report(exc if isinstance(exc, PgError) else errors.server_closed(str(exc)))
            return
        client.attached(server, time.monotonic())

    def _check(self, server: ServerConnection) -> None:
        self._move(server, "tested")
        done = server.run_query(self.check_query)
        done.add_done_callback(lambda fut: self._after_internal(server, fut, "server check query"))

    # -- servers coming back -------------------------------------------------------------

    def release(self, client: ClientConnection, server: ServerConnection, reset: bool) -> None:
        """The client is done with the server: reset it if asked, then reuse or close it."""
        now = time.monotonic()
        client.last_active = server.last_used = now
        session.unlink(client, server, INSPECT_ALL)
        if server.closed:
            return
        if (server.pending or server.ready_status != session.READY_IDLE or server.buffered
                or server.running_internal_query):
            server.close("client disconnect while server was not ready")
            return
        reset_query = self.app.config.pgbouncer.server_reset_query
        if reset and reset_query:
            if server.statements is not None:
                server.statements.forget_all()  # DISCARD ALL drops prepared statements
            self._move(server, "used")
            done = server.run_query(reset_query)
            done.add_done_callback(lambda fut: self._after_internal(server, fut, "reset query"))
            return
        self.server_ready(server, now)

    def _after_internal(self, server: ServerConnection, fut, what: str) -> None:
        exc = fut.exception()
        if server.closed:
            return
        if exc is not None:
            server.close(f"{what} failed: {exc}")
            return
        server.last_used = time.monotonic()
        self.server_ready(server)

    def server_ready(self, server: ServerConnection, now: float = 0.0) -> None:
        """An idle, clean server: give it to the first waiting client or park it."""
        now = now or time.monotonic()
        if self._expired(server, now):
            server.close("server lifetime over")
            return
        if server.generation != self.reconnect_generation:
            server.close("reconnect requested")
            return
        if self.paused or self.app.paused:
            server.close("database paused")  # PAUSE disconnects servers as they come back
            return
        while self.waiting:
            client = self.waiting.popleft()
            if client.closed:
                continue  # failed while queued; its connection_lost has not run yet
            self._move(server, "active")
            self._link(client, server, now)
            return
        if server.state == "active":  # the common case, without _move's generality
            self.active.discard(server)
            server.state = "idle"
            self.idle.append(server)
            return
        self._move(server, "idle")

    def _expired(self, server: ServerConnection, now: float) -> bool:
        lifetime = self.settings.server_lifetime
        return lifetime > 0 and now - server.created > lifetime

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        if server.state != "closed":
            self.stats.server_closed(server)
        self._remove(server)
        server.state = "closed"
        client = server.client
        if client is not None:
            client.server_failed(server, errors.server_closed(reason))
        if self.waiting:
            self.launch_needed()

    # -- new servers ---------------------------------------------------------------------

    def launch_needed(self) -> None:
        """Open server connections for waiting clients, within the limits."""
        wanted = len(self.waiting) - len(self.login) - len(self.tested)
        while wanted > 0 and self._may_launch():
            self.launch()
            wanted -= 1

    def _may_launch(self) -> bool:
        if self.app.shutting_down or self.disabled or self.paused or self.app.paused:
            return False
        if time.monotonic() - self.last_failure < self.app.config.pgbouncer.server_login_retry:
            return False
        count = self.server_count
        limit = self.settings.pool_size
        if count >= limit:
            reserve = self.settings.reserve_pool_size
            timeout = self.app.config.pgbouncer.reserve_pool_timeout
            if not (reserve and count < limit + reserve and self.waiting
                    and time.monotonic() - self.waiting[0].wait_start >= timeout):
                return False
        if not self.app.below_db_limit(self) or not self.app.below_user_limit(self):
            return False
        return True

    def launch(self) -> ServerConnection:
        server = ServerConnection(self, next(_server_ids))
        self._move(server, "login")
        asyncio.get_running_loop().create_task(self._launched(server))
        return server

    async def _launched(self, server: ServerConnection) -> None:
        try:
            await self._log_in(server)
        except PgError:
            return
        if not server.closed:
            self.server_ready(server)

    async def _log_in(self, server: ServerConnection) -> None:
        """Connect a server in `login` state and run connect_query; record success or failure."""
        self._next_host += 1
        try:
            await server.open()
            if self.db.connect_query:
                await server.run_query(self.db.connect_query)
        except PgError as exc:
            self._login_failed(server, exc)
            raise
        self.last_error = None
        self.last_failure = 0.0
        server.last_used = time.monotonic()
        log.info("%r new connection to server (from %s:%s)", server, *server.local_addr)
        if self.welcome_params is None:
            # Set once: the logins the codec remembers (KnownLogins) greet with it.
            self.welcome_params = dict(server.params)

    def _login_failed(self, server: ServerConnection, exc: PgError) -> None:
        if isinstance(exc, errors.ServerProtocolRefused):
            # Not a failure to back off from: the next login asks for protocol 3.0.
            log.info("%r %s; using protocol 3.0 for this pool", server, exc.message)
            server.close(exc.message)
            self._remove(server)
            server.state = "closed"
            self.launch_needed()
            return
        log.warning("%r login failed: %s", server, exc.message)
        server.close(exc.message)
        self._remove(server)
        server.state = "closed"
        self.last_failure = time.monotonic()
        self.last_error = exc
        if self.server_count == 0:
            # Nobody will free a server soon: tell the waiting clients now, not at timeout.
            while self.waiting:
                self.waiting.popleft().report(exc)

    async def borrow(self) -> ServerConnection:
        """A server for the pooler's own query (auth_query); return it with give_back()."""
        if self.idle:
            server = self.idle.pop(self.idle_end)
            server.state = "popped"
        else:
            server = ServerConnection(self, next(_server_ids))
            self._move(server, "login")
            await self._log_in(server)
        self._move(server, "active")
        return server

    def give_back(self, server: ServerConnection) -> None:
        if server.closed:
            return
        if not server.is_ready:
            server.close("pooler query left the server busy")
            return
        self.server_ready(server)

    def greeting(self, startup_params: dict[str, str]) -> tuple[dict, bytes, tuple]:
        """session.greeting with this pool's server parameters, and the signature of the
        tracked ones, kept per set of startup parameters: an application's connections
        mostly send the same ones."""
        key = tuple(startup_params.items())
        cached = self._greetings.get(key)
        if cached is None or cached[0] is not self.welcome_params:
            if len(self._greetings) >= GREETINGS_MAX:
                self._greetings.clear()
            tracked, greeting = session.greeting(self.welcome_params, startup_params)
            cached = (self.welcome_params, tracked, greeting, session.signature(tracked))
            self._greetings[key] = cached
        return cached[1], cached[2], cached[3]

    async def welcome(self) -> dict[str, str]:
        """Server parameters to show a client at login; the first login connects once.

        Concurrent first logins share one fetch, and the fetch respects the pool's limits
        (pool size, max_db_connections, max_user_connections) like any other launch.
        """
        if self.welcome_params is not None:
            return self.welcome_params
        if self._welcome is None or self._welcome.done():
            self._welcome = asyncio.get_running_loop().create_task(self._fetch_welcome())
        return await asyncio.shield(self._welcome)

    async def _fetch_welcome(self) -> dict[str, str]:
        cfg = self.app.config.pgbouncer
        deadline = time.monotonic() + (cfg.query_wait_timeout or 3600)
        while self.welcome_params is None:
            if (self.last_error is not None
                    and time.monotonic() - self.last_failure < cfg.server_login_retry):
                raise errors.server_login_failing()
            if not self.login and self._may_launch():
                server = ServerConnection(self, next(_server_ids))
                self._move(server, "login")
                try:
                    await self._log_in(server)
                except errors.ServerProtocolRefused:
                    continue  # at once, with protocol 3.0
                if not server.closed:
                    self.server_ready(server)
                break
            if time.monotonic() > deadline:
                raise errors.query_wait_timeout()
            await asyncio.sleep(0.05)  # a limit holds: wait for room, as a query would
        return self.welcome_params

    # -- janitor -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        cfg = self.app.config.pgbouncer
        self._expire_waiting(now, cfg.query_wait_timeout)
        self._notify_waiting(now, cfg.query_wait_notify)
        if cfg.server_fast_close and self.settings.pool_mode == session.SESSION:
            self._close_outdated_sessions()
        if self.waiting:
            self.launch_needed()
        idle_timeout = cfg.server_idle_timeout
        for server in list(self.idle):
            if self._expired(server, now):
                server.close("server lifetime over")
            elif (idle_timeout > 0 and now - server.last_used > idle_timeout
                  and self.server_count > self.settings.min_pool_size):
                server.close("server idle timeout")
        self._fill_min_pool()
        self._log_codec_counters(now, cfg.stats_period)

    def _log_codec_counters(self, now: float, period: float) -> None:
        """With verbose logging, once per stats_period when they moved: how many hand-offs
        the codec made without Python (the metrics do not carry them)."""
        if period <= 0 or now - self._counters_logged_at < period:
            return
        self._counters_logged_at = now
        if not log.isEnabledFor(logging.DEBUG):
            return
        counters = self.core.counters()
        if counters != self._counters_logged:
            self._counters_logged = counters
            log.debug("%r codec hand-offs: %s", self,
                      ", ".join(f"{name} {count}" for name, count in counters.items()))

    def _expire_waiting(self, now: float, timeout: float) -> None:
        if timeout <= 0:
            return
        while self.waiting and now - self.waiting[0].wait_start > timeout:
            self.waiting.popleft().report(errors.query_wait_timeout())

    def _notify_waiting(self, now: float, after: float) -> None:
        """query_wait_notify: a NOTICE, once per wait, to clients queued longer than `after`."""
        if after <= 0:
            return
        for client in self.waiting:
            if now - client.wait_start <= after:
                break  # queued later than this one: not yet either
            if client.wait_notified != client.wait_start and not client.closed:
                client.wait_notified = client.wait_start
                client.transport.write(QUEUED_NOTICE)

    def _close_outdated_sessions(self) -> None:
        """server_fast_close: a session whose server is due to close (RECONNECT, a RELOAD
        that changed the database) ends between transactions instead of at its end."""
        for server in list(self.active):
            client = server.client
            if (client is None or server.generation == self.reconnect_generation
                    or server.pending or server.ready_status != session.READY_IDLE):
                continue
            server.close("database configuration changed")
            client.report(errors.fatal(errors.ADMIN_SHUTDOWN, "database configuration changed"))

    def _fill_min_pool(self) -> None:
        minimum = min(self.settings.min_pool_size, self.settings.pool_size)
        while self.server_count < minimum and self._may_launch() and self.clients:
            self.launch()

    def close_idle(self, reason: str) -> None:
        for server in list(self.idle):
            server.close(reason)

    def close_all(self, reason: str) -> None:
        for server in list(self.all_servers()):
            server.close(reason)


def _split_hosts(host: str | None) -> list[str]:
    if not host:
        return ["/tmp"]
    return [part.strip() for part in host.split(",") if part.strip()] or ["/tmp"]
