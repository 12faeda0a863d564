"""The running proxy: configuration, pools, clients, cancel keys, reload and shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from . import (aggregate, auth, dns, errors, hba, loader, metrics, peers, prepared, session,
               supervisor, systemd)
from ._codec import WORKER_SHIFT, DirectIO, KnownLogins, WorkerFlags
from .admin import AdminConsole
from .client import ADMIN_DATABASES, DIRECT_IO_AFTER_READS
from .config import split_list
from .errors import PgError
from .janitor import Janitor
from .listener import Listener
from .pool import Credentials, Pool, PoolSettings
from .tls import TlsConfigError, TlsContexts

log = logging.getLogger("pgmulti")

SUPPORTED_AUTH_TYPES = ("any", "trust", "plain", "md5", "scram-sha-256", "hba")


def _names(value) -> set[str]:
    """A comma-separated user list from the config (PgBouncer's admin_users/stats_users)."""
    if not value:
        return set()
    if isinstance(value, (list, tuple, set, frozenset)):
        return {str(v).strip() for v in value if str(v).strip()}
    return {part.strip() for part in str(value).split(",") if part.strip()}


def check_auth_type(config) -> None:
    method = config.pgbouncer.auth_type
    if method not in SUPPORTED_AUTH_TYPES:
        # Every login would fail: refuse to start rather than run a pooler nobody can use.
        raise OSError(f"auth_type = {method} is not supported by pgmulti yet "
                      f"(supported: {', '.join(SUPPORTED_AUTH_TYPES)})")


def preflight(config) -> None:
    """What would stop every worker from serving, checked once before they start."""
    check_auth_type(config)
    TlsContexts(config.pgbouncer)  # raises TlsConfigError (a ValueError) for bad files
    load_hba_rules(config)


def load_hba_rules(config) -> None:
    """Read auth_hba_file now (start, reload): its problems show at once, and it is read
    before -u drops privileges; logins then use the cached rules (hba.rules_for)."""
    if config.pgbouncer.auth_type == "hba":
        hba.rules_for(config)


class App:
    """Everything one pgmulti process serves."""

    def __init__(self, config, config_path: str, userlist: dict[str, str] | None = None):
        """userlist: the auth_file as a parent process read it before -u dropped privileges."""
        self.config = config
        self.config_path = config_path
        self.worker_index = 0            # this process's number among the workers
        self.worker_count = 1
        self.peers = None                # pgmulti.peers.Peers when there are several workers
        self.userlist: dict[str, str] = {}
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: set = set()
        self.login_clients: set = set()
        self.cancel_keys: dict[tuple[int, bytes], object] = {}
        self.flags = WorkerFlags()       # paused and shutting_down, read by every hand-off
        self.disabled_databases: set[str] = set()
        self.shutdown_waits_for_clients = False
        self.errors_by_sqlstate: dict[str, int] = {}
        self.listener = Listener(self)
        self.janitor = Janitor(self)
        self.metrics: metrics.MetricsServer | None = None
        self.admin = AdminConsole(self)
        self.console = self.admin          # admin queries enter here (see become_worker)
        self._tasks: set[asyncio.Task] = set()
        self.prepared_registry = prepared.Registry()
        loop = asyncio.get_running_loop()
        # Server host names, cached as PgBouncer caches them (dns_max_ttl, round robin).
        self.dns = dns.HostCache(dns.loop_resolver(loop), self._host_moved)
        self.direct_io = DirectIO(loop)    # the codec's own reads of busy plain sockets
        # The end of every login; startup packets that logged in at once, by their bytes.
        self.known_logins = KnownLogins(self, self.direct_io, DIRECT_IO_AFTER_READS)
        self.stopped = loop.create_future()
        self.apply_config(config)
        if userlist is None:
            self.load_userlist()
        else:
            self.userlist = userlist

    # PAUSE of every database and SHUTDOWN: kept in the flags the pools' hand-off reads.
    @property
    def paused(self) -> bool:
        return self.flags.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.flags.paused = value

    @property
    def shutting_down(self) -> bool:
        return self.flags.shutting_down

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self.flags.shutting_down = value

    # -- configuration -------------------------------------------------------------------

    def apply_config(self, config, tls: TlsContexts | None = None) -> None:
        """Take up a configuration (start, RELOAD, SET); refresh_pools() passes it to pools."""
        self.tls = tls or TlsContexts(config.pgbouncer)
        self.config = config
        cfg = config.pgbouncer
        self.admin_users = _names(cfg.admin_users)
        self.stats_users = _names(cfg.stats_users)
        load_hba_rules(config)
        self.ignored_startup_parameters = {name.lower() for name in _names(cfg.ignore_startup_parameters)}
        session.track(split_list(cfg.track_extra_parameters))
        self.dns.configure(cfg.dns_max_ttl, cfg.dns_nxdomain_ttl)
        self._refresh_client_settings()
        self.listener.retune()

    def _refresh_client_settings(self) -> None:
        """Settings every new client reads, worked out once per config and worker."""
        cfg = self.config.pgbouncer
        self.known_logins.configure(self, client_limit=self.limit_share(cfg.max_client_conn),
                                    max_packet=cfg.max_packet_size,
                                    buffer_size=max(4096, cfg.pkt_buf * 4))

    @property
    def client_limit(self) -> int:
        """max_client_conn, this worker's share (kept where the codec's logins read it)."""
        return self.known_logins.client_limit

    def load_userlist(self) -> None:
        self.known_logins.forget_all()  # they were looked up in the old list
        path = self.config.pgbouncer.auth_file
        if not path:
            self.userlist = {}
            return
        try:
            self.userlist = auth.load_userlist(path)
        except (OSError, auth.AuthFileError) as exc:
            log.error("could not load auth_file: %s", exc)
            if not self.userlist:
                self.userlist = {}

    def reload(self) -> None:
        """SIGHUP / RELOAD: re-read the config and auth file; pools pick up new limits."""
        systemd.reloading()
        try:
            config = loader.load_config(self.config_path)
            tls = TlsContexts(config.pgbouncer)  # new certificates apply to new connections
        except (loader.ConfigError, TlsConfigError, OSError) as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            systemd.ready()
            raise PgError("F0000", f"RELOAD failed: {exc}") from None
        old = self.config.pgbouncer
        self.apply_config(config, tls)
        self.load_userlist()
        if (old.metrics_addr, old.metrics_port) != (config.pgbouncer.metrics_addr,
                                                    config.pgbouncer.metrics_port):
            self.spawn(self._restart_metrics())
        self.refresh_pools()
        log.info("configuration reloaded from %s", self.config_path)
        systemd.ready()

    def _host_moved(self, host: str) -> None:
        """A server host name resolves to other addresses now: the pools connecting to it
        close their servers as they come back (busy ones show close_needed)."""
        for pool in self.pools.values():
            if host in pool.hosts:
                log.info("%s: host %s has new addresses, closing its servers as released",
                         pool.name, host)
                pool.close_idle("host has new addresses")
                pool.reconnect_generation += 1

    def refresh_pools(self) -> None:
        """Every pool takes up the current configuration (RELOAD, SIGHUP, SET)."""
        for pool in list(self.pools.values()):
            db = self.config.database_for(pool.name)
            if db is None:
                pool.disabled = True
                continue
            if db != pool.db:
                # New destination or options: servers close as they come back (busy ones
                # show close_needed; WAIT_CLOSE waits for them).
                pool.set_database(db)
                pool.close_idle("database configuration changed")
                pool.reconnect_generation += 1
            prepared_limit = pool.prepared_limit
            pool.settings = self.pool_settings(db, pool.user)
            pool.configure(self.config.pgbouncer)
            if pool.prepared_limit != prepared_limit:
                # A server keeps the statement mapping it was opened with (or none): it must
                # not serve under the other one (max_prepared_statements, pool_mode).
                pool.close_idle("prepared statement mapping changed")
                pool.reconnect_generation += 1
            if pool.waiting:
                pool.launch_needed()  # a bigger pool serves waiting clients now

    def pool_settings(self, db, user: str, whole: bool = False) -> PoolSettings:
        """Effective limits with PgBouncer's precedence (user, then database, then global):
        this worker's share of them, or with `whole` the configured totals (SHOW DATABASES)."""
        config = self.config
        user_cfg = config.users.get(user)
        part = (lambda limit, at_least_one=True: limit) if whole else self.limit_share
        return PoolSettings(
            pool_mode=config.effective_pool_mode(db, user_cfg),
            pool_size=part(config.effective_pool_size(db, user_cfg)),
            min_pool_size=part(config.effective_min_pool_size(db, user_cfg), at_least_one=False),
            reserve_pool_size=part(config.effective_reserve_pool_size(db, user_cfg),
                                   at_least_one=False),
            max_db_connections=part(config.effective_max_db_connections(db, user_cfg)),
            max_user_connections=part(config.effective_max_user_connections(db, user_cfg)),
            server_lifetime=config.effective_server_lifetime(db, user_cfg),
            max_db_client_connections=part(config.effective_max_db_client_connections(db, user_cfg)),
            max_user_client_connections=part(
                config.effective_max_user_client_connections(db, user_cfg)),
            client_idle_timeout=config.effective_client_idle_timeout(db, user_cfg),
            idle_transaction_timeout=config.effective_idle_transaction_timeout(db, user_cfg),
            query_timeout=config.effective_query_timeout(db, user_cfg),
            transaction_timeout=config.effective_transaction_timeout(db, user_cfg),
        )

    def limit_share(self, limit: int, at_least_one: bool = True) -> int:
        """This worker's part of a connection limit (all of it with a single process)."""
        return supervisor.share(limit, self.worker_index, self.worker_count, at_least_one)

    def admin_parameters(self) -> dict[str, str]:
        return {"server_version": "1.25.0 (pgmulti)", "server_encoding": "UTF8",
                "client_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "UTC",
                "standard_conforming_strings": "on", "integer_datetimes": "on",
                "application_name": "", "IntervalStyle": "postgres", "is_superuser": "off"}

    # -- pools ---------------------------------------------------------------------------

    def get_pool(self, name: str, db, user: str, secret: str | None,
                 scram_keys: tuple[bytes, bytes] | None) -> Pool:
        server_user = db.user or user
        key = (name, server_user)
        pool = self.pools.get(key)
        if pool is not None:
            pool.unused_since = 0.0  # a login is using it (see Janitor._free_unused_autodbs)
        else:
            if db.user:
                credentials = Credentials(password=db.password or self.userlist.get(db.user))
            else:
                credentials = Credentials(password=db.password or secret)
            pool = Pool(self, name, db, server_user, server_user, credentials,
                        self.pool_settings(db, server_user))
            self.pools[key] = pool
        if scram_keys is not None and not db.user and not db.password:
            # Log in to the server with the keys the client proved (SCRAM pass-through).
            pool.credentials.scram_keys = scram_keys
        return pool

    def client_limit_error(self, pool: Pool) -> PgError | None:
        """max_db_client_connections / max_user_client_connections for one more client."""
        limits = pool.settings
        if limits.max_db_client_connections > 0:
            count = sum(len(p.clients) for p in self.pools.values() if p.name == pool.name)
            if count >= limits.max_db_client_connections:
                return errors.fatal(errors.TOO_MANY_CONNECTIONS,
                                    "no more connections allowed (max_db_client_connections)")
        if limits.max_user_client_connections > 0:
            count = sum(len(p.clients) for p in self.pools.values() if p.user == pool.user)
            if count >= limits.max_user_client_connections:
                return errors.fatal(errors.TOO_MANY_CONNECTIONS,
                                    "no more connections allowed (max_user_client_connections)")
        return None

    def below_db_limit(self, pool: Pool) -> bool:
        return self._below_server_limit(pool, pool.settings.max_db_connections,
                                        lambda p: p.name == pool.name)

    def below_user_limit(self, pool: Pool) -> bool:
        return self._below_server_limit(pool, pool.settings.max_user_connections,
                                        lambda p: p.server_user == pool.server_user)

    def _below_server_limit(self, pool: Pool, limit: int, shares_limit) -> bool:
        """Room for one more server among the pools that share a limit (0: unlimited)."""
        if limit <= 0:
            return True
        if sum(p.server_count for p in self.pools.values() if shares_limit(p)) < limit:
            return True
        return self._evict_idle(lambda p: shares_limit(p) and p is not pool)

    def _evict_idle(self, match) -> bool:
        """Close an idle server of another pool sharing the limit, so this pool can grow later."""
        for other in self.pools.values():
            if match(other) and other.idle:
                other.idle[0].close("evicted for another pool (connection limit)")
                return False
        return False

    async def auth_query_secret(self, name: str, db, user: str) -> str | None:
        """Fetch a user's secret from the server with auth_user + auth_query."""
        cfg = self.config.pgbouncer
        auth_user = db.auth_user or cfg.auth_user
        if not auth_user:
            return None
        query = getattr(db, "auth_query", None) or cfg.auth_query
        name, db = self._auth_database(name, db)
        pool = self.get_pool(name, db, auth_user, self.userlist.get(auth_user), None)
        server = await pool.borrow()
        try:
            rows = await server.run_query(query, [user])
        finally:
            pool.give_back(server)
        if not rows or rows[0][1] is None:
            return None
        return rows[0][1].decode()

    def _auth_database(self, name: str, db) -> tuple[str, object]:
        """Where auth_query runs: the database's auth_dbname, else the global one, else the
        client's own database (PgBouncer's order)."""
        auth_dbname = db.auth_dbname or self.config.pgbouncer.auth_dbname
        if not auth_dbname:
            return name, db
        auth_db = self.config.database_for(auth_dbname)
        if auth_db is None or (auth_dbname in ADMIN_DATABASES
                               and auth_dbname not in self.config.databases):
            log.error("authentication database \"%s\" is not configured", auth_dbname)
            raise errors.fatal(errors.INVALID_CATALOG_NAME, "bouncer config error")
        if auth_dbname in self.disabled_databases:
            raise errors.fatal(errors.CANNOT_CONNECT_NOW,
                               f"authentication database \"{auth_dbname}\" is disabled")
        return auth_dbname, auth_db

    # -- clients -------------------------------------------------------------------------

    def admission_error(self, client) -> PgError | None:
        if self.flags.shutting_down and not self.shutdown_waits_for_clients:
            return errors.shutting_down()
        if len(self.clients) > self.client_limit:
            return errors.too_many_clients()
        return None

    def forward_cancel(self, pid: int, key: int) -> None:
        owner = pid >> WORKER_SHIFT
        if owner != self.worker_index and self.peers is not None:
            if owner < self.worker_count:
                self.peers.tell(self, owner, "cancel", pid=pid, key=key)
            return
        client = self.cancel_keys.get((pid, key))
        if client is None:
            log.info("cancel request for an unknown key ignored")
            return
        server = client.server
        if server is None:
            # Queued for a server: the query has not started, so it is dropped here.
            client.cancel_while_waiting()
            return
        self.spawn(server.send_cancel())

    def count_error(self, sqlstate: str) -> None:
        self.errors_by_sqlstate[sqlstate] = self.errors_by_sqlstate.get(sqlstate, 0) + 1

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- process lifecycle ---------------------------------------------------------------

    def become_worker(self, index: int, count: int, control_dir: str) -> None:
        """One of `count` processes sharing the listen sockets (see pgmulti.supervisor)."""
        self.worker_index = index
        self.worker_count = count
        self._refresh_client_settings()  # max_client_conn is shared among the workers
        self.peers = peers.Peers(control_dir, index, count)
        self.console = aggregate.ConsoleAcrossWorkers(self)
        self.peers.handlers.update(self.console.peer_handlers())
        self.peers.handlers["cancel"] = self._peer_cancel

    async def _peer_cancel(self, request: dict) -> None:
        self.forward_cancel(request["pid"], request["key"])

    async def start(self, sockets=None, control_socket=None) -> None:
        """Listen (on `sockets` a parent bound for this worker, if given) and start the janitor."""
        check_auth_type(self.config)
        for warning in self.config.warnings:
            log.warning("%s", warning)
        if self.config.unsupported:
            log.warning("settings not supported by pgmulti (ignored): %s",
                        ", ".join(self.config.unsupported))
        self.listener.start(sockets)
        if self.peers is not None:
            await self.peers.start(control_socket)
        self.janitor.start()
        self.metrics = await metrics.start(self)

    async def _restart_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.metrics = await metrics.start(self)

    def database_paused(self, name: str) -> bool:
        return self.paused or any(p.paused for p in self.pools.values() if p.name == name)

    def pause(self, db_name: str | None = None) -> None:
        """PAUSE: no new server work; idle servers close now, busy ones when released."""
        if db_name is None:
            self.paused = True
        for pool in self.pools.values():
            if db_name is None or pool.name == db_name:
                pool.paused = True
                pool.close_idle("database paused")

    def resume(self, db_name: str | None = None) -> None:
        if db_name is None:
            self.paused = False
        for pool in self.pools.values():
            if db_name is None or pool.name == db_name:
                pool.paused = False
                while pool.waiting and pool.idle:
                    pool.server_ready(pool.idle.pop())
                pool.launch_needed()

    def shutdown(self, wait_for: str | None) -> None:
        """Stop listening, then exit when nothing is left to wait for.

        wait_for: None exits now (SIGQUIT, SHUTDOWN), "servers" once no server is in use by a
        client (SIGINT, SHUTDOWN WAIT_FOR_SERVERS), "clients" once every client has left
        (SIGTERM, SHUTDOWN WAIT_FOR_CLIENTS), as PgBouncer 1.23+ does.
        """
        systemd.stopping()
        if not self.shutting_down:
            log.info("shutting down%s", f" (waiting for {wait_for})" if wait_for else "")
        self.shutting_down = True
        self.shutdown_waits_for_clients = wait_for == "clients"
        self.listener.close()
        if wait_for != "clients":
            # Waiting for clients (SIGTERM, rolling restarts) lets the ones already accepted
            # finish logging in; the other modes turn them away.
            for client in list(self.login_clients):
                client.report(errors.shutting_down())
        if wait_for is None:
            self.finish()
            return
        if wait_for == "servers":
            for pool in self.pools.values():
                for client in list(pool.waiting):
                    client.report(errors.shutting_down())
        self.janitor.check_shutdown()

    def request_shutdown(self, wait_for: str | None) -> None:
        """A console SHUTDOWN: with several workers the parent tells every one of them."""
        if self.peers is None:
            self.shutdown(wait_for)
            return
        signo = {None: signal.SIGQUIT, "servers": signal.SIGINT, "clients": signal.SIGTERM}[wait_for]
        os.kill(os.getppid(), signo)

    def finish(self) -> None:
        for client in list(self.clients):
            client.report(errors.shutting_down())
        for pool in self.pools.values():
            pool.close_all("pgmulti is shutting down")
        self.listener.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.peers is not None:
            self.peers.close()
        self.direct_io.close()
        if not self.stopped.done():
            self.stopped.set_result(None)
