"""Admin console: the `pgbouncer` (or `pgmulti`) virtual database, one handler per command."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import time
from typing import TYPE_CHECKING

import msgspec

from . import admin_columns as ref
from . import errors, loader, logs, protocol
from .__version__ import __version__
from .errors import PgError
from .tls import TlsConfigError, TlsContexts

if TYPE_CHECKING:
    from .app import App
    from .client import ClientConnection

log = logging.getLogger("pgmulti.admin")

SHUTDOWN_MODES = {"wait_for_servers": "servers", "wait_for_clients": "clients"}

# PgBouncer's console grammar (src/admin.c): "CMD [arg];" and "SET key = value;". A word is
# a name of letters, digits and underscores, or double-quoted ("" stands for a quote).
_WS = r"[ \t\n\r]"
_WORD = r'("(?:[^"]|"")*"|[0-9a-z_]+)'
_STRING = r"('(?:[^']|'')*')"
COMMAND_SYNTAX = re.compile(rf"^{_WS}*{_WORD}(?:{_WS}+{_WORD})?{_WS}*(?:;{_WS}*)?$", re.I)
SET_SYNTAX = re.compile(
    rf"^{_WS}*set{_WS}+{_WORD}{_WS}*(?:=|to){_WS}*(?:{_WORD}|{_STRING}){_WS}*(?:;{_WS}*)?$",
    re.I)
# PgBouncer's buffer sizes: longer command words, arguments or values are "bad arguments".
MAX_WORD, MAX_ARGUMENT, MAX_VALUE = 16, 64, 256

# SHOW answers only admin_users may see (PgBouncer: they expose every cancel key).
ADMIN_ONLY_SHOWS = frozenset({"fds"})

CHANGEABLE = {key: changeable for key, _default, changeable in ref.CONFIG_KEYS}
# Settings whose values must not reach the log.
SECRET_SETTINGS = frozenset({"auth_ldap_options"})
# Settings that need the logging set up again, and TLS ones (PgBouncer: "_tls_", "_tls13_").
LOGGING_SETTINGS = frozenset({"logfile", "syslog", "syslog_ident", "syslog_facility", "verbose"})
TLS_NOT_APPLIED = "TLS settings could not be applied, still using old configuration"


def admin_error(key: str, *args, detail: str | None = None, hint: str | None = None) -> PgError:
    text, sqlstate, _ = ref.ADMIN_ERRORS[key]
    return PgError(sqlstate, text % args if args else text, detail=detail, hint=hint)


def unquote(token: str | None, quote: str) -> str:
    """A console word or string as meant: quotes removed, doubled quotes made single."""
    if not token:
        return ""
    if token[0] == quote:
        return token[1:-1].replace(quote * 2, quote)
    return token


def set_failed(detail: str) -> PgError:
    """PgBouncer's answer to a SET it cannot apply; the detail says why (PgBouncer logs it)."""
    return admin_error("set_failed", detail=detail)


def timestamp_text(epoch: float) -> str:
    """PgBouncer's 'YYYY-MM-DD HH:MM:SS TZ' in local time; zero means now."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch or time.time()))


def close_needed(pool, server) -> bool:
    """RECONNECT marks a pool's servers: each closes when it is next released."""
    return server.generation != pool.reconnect_generation


def config_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, (list, tuple, frozenset, set)):
        return ",".join(str(v) for v in value)
    return str(value)


class AdminConsole:
    """Parses console commands and answers them in PgBouncer's formats.

    SHOW handlers are pure functions of this process's state returning (columns, rows), and
    commands change state before the answer is written, so that with several workers one of
    them can merge every worker's rows and answers (pgmulti.aggregate).
    """

    def __init__(self, app: App):
        self.app = app
        self.show = {
            "pools": self.show_pools, "stats": self.show_stats,
            "stats_totals": self.show_stats_totals, "stats_averages": self.show_stats_averages,
            "totals": self.show_totals, "clients": self.show_clients, "servers": self.show_servers,
            "databases": self.show_databases, "users": self.show_users, "config": self.show_config,
            "lists": self.show_lists, "version": self.show_version, "state": self.show_state,
            "mem": self.show_mem, "fds": self.show_fds, "sockets": self.show_sockets,
            "active_sockets": self.show_active_sockets, "dns_hosts": self.show_dns_hosts,
            "dns_zones": self.show_dns_zones, "peers": self.show_peers,
            "peer_pools": self.show_peer_pools,
            "prepared_statements": self.show_prepared_statements,
        }
        # word -> (handler, whether it takes an argument), as PgBouncer's parser allows.
        self.commands = {
            "pause": (self.cmd_pause, True), "resume": (self.cmd_resume, True),
            "reload": (self.cmd_reload, False), "shutdown": (self.cmd_shutdown, True),
            "kill": (self.cmd_kill, True), "kill_client": (self.cmd_kill_client, True),
            "disable": (self.cmd_disable, True), "enable": (self.cmd_enable, True),
            "reconnect": (self.cmd_reconnect, True), "wait_close": (self.cmd_wait_close, True),
            "suspend": (self.cmd_suspend, False),
        }

    # -- entry ---------------------------------------------------------------------------

    def handle_query(self, client: ClientConnection, body: bytes) -> None:
        text = body.rstrip(b"\0").decode("utf-8", "replace").strip()
        try:
            self._dispatch(client, text)
        except PgError as exc:
            # The verb only: a SET value may be a secret.
            log.info("%r admin command %s refused: %s", client, text.split(" ", 1)[0][:20],
                     exc.message)
            client.transport.write(protocol.error_response("ERROR", exc.sqlstate, exc.message,
                                                           exc.detail, exc.hint)
                                   + protocol.ready_for_query("I"))

    def _dispatch(self, client: ClientConnection, text: str) -> None:
        command = COMMAND_SYNTAX.match(text)
        if command is not None:
            word, arg = command.group(1), command.group(2) or ""
            if len(word) >= MAX_WORD or len(arg) >= MAX_ARGUMENT:
                raise admin_error("bad_arguments")
            self._command(client, unquote(word, '"').lower(), unquote(arg, '"'), text)
            return
        setting = SET_SYNTAX.match(text)
        if setting is not None:
            key, word, string = setting.groups()
            value = string if string is not None else word
            if len(key) >= MAX_ARGUMENT or len(value) >= MAX_VALUE:
                raise admin_error("bad_arguments")
            key = unquote(key, '"')
            if not key:
                raise admin_error("bad_arguments")
            self.cmd_set(client, key, unquote(value, "'" if string is not None else '"'))
            return
        self._raise_invalid(text)

    def _command(self, client: ClientConnection, verb: str, arg: str, text: str) -> None:
        if verb in ("show", "select"):
            self._show(client, arg.lower(), text)
            return
        entry = self.commands.get(verb)
        if entry is None:
            self._raise_invalid(text)
        command, takes_argument = entry
        if arg and not takes_argument:
            self._raise_invalid(text)
        if verb == "shutdown" and arg and arg.lower() not in SHUTDOWN_MODES:
            self._raise_invalid(text)
        self._require_admin(client)
        log.info("%r admin command: %s", client, text)
        command(client, arg)

    def _show(self, client: ClientConnection, what: str, text: str) -> None:
        log.debug("%r admin query: %s", client, text)  # commands are logged at LOG level
        if what == "help":
            self._send_help(client)
            return
        handler = self.show.get(what)
        if handler is None:
            if what not in ref.FAKE_PARAMETERS:
                self._raise_invalid(text)
            self._fake_parameter(client, what)
            return
        if what in ADMIN_ONLY_SHOWS:
            self._require_admin(client)
        columns, rows = handler()
        self._send_rows(client, columns, rows)

    def _require_admin(self, client: ClientConnection) -> None:
        if client.user not in self.app.admin_users:
            raise admin_error("admin_access_needed")

    def _send_help(self, client: ClientConnection) -> None:
        """SHOW HELP is one NOTICE with the command list, as in PgBouncer."""
        notice = protocol.error_response(ref.HELP_NOTICE_SEVERITY, ref.HELP_NOTICE_SQLSTATE,
                                         ref.HELP_NOTICE_MESSAGE, ref.HELP_DETAIL, notice=True)
        client.transport.write(notice + protocol.command_complete("SHOW")
                               + protocol.ready_for_query("I"))

    def _raise_invalid(self, text: str):
        raise admin_error("invalid_command", text)

    def _fake_parameter(self, client: ClientConnection, name: str) -> None:
        self._send_rows(client, ((name, "text"),), [[ref.FAKE_PARAMETERS[name]]])

    def _send_rows(self, client: ClientConnection, columns, rows, tag: str = "SHOW") -> None:
        out = [protocol.row_description([(name, ref.TYPE_OIDS[kind]) for name, kind in columns])]
        out += [protocol.data_row(row) for row in rows]
        out.append(protocol.command_complete(tag))
        out.append(protocol.ready_for_query("I"))
        client.transport.write(b"".join(out))

    @staticmethod
    def _done(client: ClientConnection, tag: str, notices=()) -> None:
        out = [protocol.error_response("NOTICE", errors.SUCCESSFUL_COMPLETION, text, notice=True)
               for text in notices]
        client.transport.write(b"".join(out) + protocol.command_complete(tag)
                               + protocol.ready_for_query("I"))

    # -- SHOW ----------------------------------------------------------------------------


    def show_version(self):
        return ref.COLUMNS["version"], [[f"PgBouncer {ref.PGBOUNCER_VERSION} (pgmulti {__version__})"]]

    def show_pools(self):
        admin_clients = sum(1 for c in self.app.clients if c.admin)
        rows = [["pgbouncer", "pgbouncer", admin_clients, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                 "statement", "disable"]]
        now = time.monotonic()
        for pool in self.app.pools.values():
            wait = now - pool.waiting[0].wait_start if pool.waiting else 0.0
            rows.append([pool.name, pool.user, pool.cl_active, len(pool.waiting), 0, 0,
                         len(pool.active), 0, 0, len(pool.idle), len(pool.used), len(pool.tested),
                         len(pool.login), int(wait), int((wait % 1) * 1_000_000),
                         pool.settings.pool_mode, "disable"])
        return ref.COLUMNS["pools"], rows

    def _stats_by_db(self):
        merged: dict[str, tuple] = {}
        for pool in self.app.pools.values():
            totals, avgs = merged.setdefault(pool.name, ([], []))
            totals.append(pool.stats.totals(pool))
            avgs.append(pool.stats.averages)
        return merged

    _STAT_FIELDS = ("server_assignment_count", "xact_count", "query_count", "received", "sent",
                    "xact_time", "query_time", "wait_time", "client_parse_count",
                    "server_parse_count", "bind_count")

    @staticmethod
    def _sum(items, name):
        return sum(getattr(item, name) for item in items)

    def show_stats(self):
        rows = []
        for name, (totals, avgs) in sorted(self._stats_by_db().items()):
            rows.append([name] + [self._sum(totals, f) for f in self._STAT_FIELDS]
                        + [self._sum(avgs, f) for f in self._STAT_FIELDS])
        return ref.COLUMNS["stats"], rows

    def show_stats_totals(self):
        rows = [[name] + [self._sum(totals, f) for f in self._STAT_FIELDS]
                for name, (totals, _) in sorted(self._stats_by_db().items())]
        return ref.COLUMNS["stats_totals"], rows

    def show_stats_averages(self):
        rows = [[name] + [self._sum(avgs, f) for f in self._STAT_FIELDS]
                for name, (_, avgs) in sorted(self._stats_by_db().items())]
        return ref.COLUMNS["stats_averages"], rows

    def show_totals(self):
        totals = [p.stats.totals(p) for p in self.app.pools.values()]
        avgs = [p.stats.averages for p in self.app.pools.values()]
        values = ([self._sum(totals, f) for f in self._STAT_FIELDS]
                  + [self._sum(avgs, f) for f in self._STAT_FIELDS])
        return ref.COLUMNS["totals"], [[name, value] for name, value in zip(ref.TOTALS_ROWS, values)]

    def show_clients(self):
        rows = []
        now = time.time()
        for client in self.app.clients:
            if client.state in ("login", "cancel"):
                continue
            if client.state == "waiting":
                state = "waiting"
            else:
                state = "active" if client.server is not None else "idle"
            rows.append(self._client_row(client, state, now))
        return ref.COLUMNS["clients"], rows

    def _client_row(self, client: ClientConnection, state: str, now: float) -> list:
        wait = now - client.request_time if client.state == "waiting" else 0.0
        server = client.server
        statements = client.statements
        return ["C", client.user or "(nouser)", client.database or "(nodb)", "none", state,
                *self._addr(client.addr, client.listener_kind),
                *self._addr(client.local_addr, client.listener_kind),
                timestamp_text(client.connect_time), timestamp_text(client.request_time),
                int(wait), int((wait % 1) * 1_000_000), 0, f"0x{id(client):x}",
                f"0x{id(server):x}" if server is not None else "", 0, client.tls,
                client.params.get("application_name", ""),
                len(statements.by_name) if statements is not None else 0, client.id]

    def _addr(self, addr, kind: str):
        if kind == "unix" or not isinstance(addr, tuple) or addr[0] == "unix":
            return ["unix", self.app.config.pgbouncer.listen_port]
        return [addr[0], addr[1]]

    def show_servers(self):
        rows = []
        for pool in self.app.pools.values():
            for server in pool.all_servers():
                state = "new" if server.state == "login" else server.state
                rows.append(self._server_row(pool, server, state))
        return ref.COLUMNS["servers"], rows

    @staticmethod
    def _server_row(pool, server, state: str) -> list:
        if server.remote_address is not None:  # the address the host name led to
            addr, port = server.remote_address[1][:2]
        elif pool.unix_path:
            addr, port = "unix", pool.port
        else:
            addr, port = pool.host, pool.port
        client = server.client
        statements = server.statements
        return ["S", pool.server_user, pool.name, "none", state, addr, port,
                server.local_addr[0] or "unix", server.local_addr[1] or pool.port,
                timestamp_text(server.connect_time), timestamp_text(server.connect_time), 0, 0,
                int(close_needed(pool, server)), f"0x{id(server):x}",
                f"0x{id(client):x}" if client is not None else "",
                server.backend_pid, server.tls, server.params.get("application_name", ""),
                len(statements.prepared) if statements is not None else 0, server.id]

    def show_sockets(self):
        """Clients and servers with PgBouncer's low-level states and buffer columns."""
        return ref.COLUMNS["sockets"], [row for row, _busy in self._socket_rows()]

    def show_active_sockets(self):
        """SHOW SOCKETS, only the sockets with bytes waiting in a buffer."""
        return ref.COLUMNS["active_sockets"], [row for row, busy in self._socket_rows() if busy]

    def _socket_rows(self):
        """(row, buffers non-empty) in PgBouncer's order: per pool its clients and servers,
        then the console clients (PgBouncer's admin pool), then clients still logging in."""
        now = time.time()
        for pool in self.app.pools.values():
            for client in pool.clients:
                if client.state != "waiting":
                    yield self._client_socket_row(client, "cl_active", now)
            for client in pool.waiting:
                yield self._client_socket_row(client, "cl_waiting", now)
            for state, servers in (("sv_active", pool.active), ("sv_idle", pool.idle),
                                   ("sv_used", pool.used), ("sv_tested", pool.tested),
                                   ("sv_login", pool.login)):
                for server in servers:
                    yield self._with_buffers(self._server_row(pool, server, state), server)
        for client in self.app.clients:
            if client.admin and client.state not in ("login", "cancel"):
                yield self._client_socket_row(client, "cl_active", now)
        for client in self.app.login_clients:
            yield self._client_socket_row(client, "cl_login", now)

    def _client_socket_row(self, client: ClientConnection, state: str, now: float):
        return self._with_buffers(self._client_row(client, state, now), client)

    @staticmethod
    def _with_buffers(row: list, connection) -> tuple[list, bool]:
        """The debug columns: bytes read but not yet processed (pkt_avail) and bytes waiting
        to be sent (send_avail). The codec does not expose its buffer positions: 0."""
        received = connection.buffered
        transport = connection.transport
        unsent = transport.get_write_buffer_size() if transport is not None else 0
        return row + [0, 0, 0, 0, 0, received, unsent], bool(received or unsent)

    def show_databases(self):
        rows = []
        cfg = self.app.config.pgbouncer
        for name, db in self._databases_in_use():
            pools = [p for p in self.app.pools.values() if p.name == name]
            settings = self.app.pool_settings(db, db.user or "", whole=True)
            current = sum(p.server_count for p in pools)
            clients = sum(len(p.clients) for p in pools)
            rows.append([name, db.host, db.port or 5432, db.dbname or name, db.user,
                         settings.pool_size, settings.min_pool_size, settings.reserve_pool_size,
                         int(settings.server_lifetime), db.pool_mode,
                         "disable", settings.max_db_connections, current,
                         getattr(db, "max_db_client_connections", None) or 0, clients,
                         int(any(p.paused for p in pools) or self.app.paused),
                         int(any(p.disabled for p in pools))])
        for admin_db in ("pgbouncer",):
            rows.append([admin_db, None, cfg.listen_port, admin_db, "pgbouncer", 2, 0, 0, 0,
                         "statement", "disable", 0, 0, 0, 0, 0, 0])
        return ref.COLUMNS["databases"], rows

    def _databases_in_use(self):
        """(name, entry): the configured databases, then those made from the "*" entry that
        have a pool (autodb_idle_timeout drops them)."""
        config = self.app.config
        yield from config.databases.items()
        for name in dict.fromkeys(p.name for p in self.app.pools.values()):
            if name not in config.databases:
                db = config.database_for(name)
                if db is not None:
                    yield name, db

    def show_users(self):
        rows = []
        for name, user in self.app.config.users.items():
            current = sum(p.server_count for p in self.app.pools.values() if p.server_user == name)
            clients = sum(len(p.clients) for p in self.app.pools.values() if p.user == name)
            rows.append([name, getattr(user, "pool_size", None), getattr(user, "reserve_pool_size", None),
                         getattr(user, "pool_mode", None) or "",
                         getattr(user, "max_user_connections", None) or 0, current,
                         getattr(user, "max_user_client_connections", None) or 0, clients])
        return ref.COLUMNS["users"], rows

    def show_config(self):
        cfg = self.app.config.pgbouncer
        rows = []
        for key, default, changeable in ref.CONFIG_KEYS:
            if not hasattr(cfg, key):
                continue
            rows.append([key, config_value(getattr(cfg, key)), default or "",
                         "yes" if changeable else "no"])
        return ref.COLUMNS["config"], rows

    def show_lists(self):
        app = self.app
        logged_in = [c for c in app.clients if c.state not in ("login", "cancel")]
        free_servers = sum(len(p.idle) for p in app.pools.values())
        used_servers = sum(p.server_count for p in app.pools.values()) - free_servers
        counts = {"databases": len(app.config.databases), "users": len(app.config.users),
                  "peers": len(app.config.peers), "pools": len(app.pools), "peer_pools": 0,
                  "free_clients": 0,
                  "used_clients": len(logged_in), "login_clients": len(app.login_clients),
                  "free_servers": free_servers, "used_servers": used_servers,
                  "dns_names": app.dns.names, "dns_queries": app.dns.queries}
        return ref.COLUMNS["lists"], [[name, counts.get(name, 0)] for name in ref.LISTS_ROWS]

    PREPARED_COLUMNS = (("name", "text"), ("query", "text"), ("parameter_types", "int4"),
                        ("uses", "int8"), ("servers", "int4"))

    def show_prepared_statements(self):
        """Beyond PgBouncer (as pg_doorman has it): the statements the pooler mapped, how often
        clients used them, and on how many server connections each is prepared now."""
        on_servers: dict[bytes, int] = {}
        for pool in self.app.pools.values():
            for server in pool.all_servers():
                if server.statements is not None:
                    for name in server.statements.prepared:
                        on_servers[name] = on_servers.get(name, 0) + 1
        rows = []
        for stmt in self.app.prepared_registry.by_definition.values():
            query_end = stmt.definition.index(b"\0")
            query = stmt.definition[:query_end].decode("utf-8", "replace")
            types = int.from_bytes(stmt.definition[query_end + 1:query_end + 3], "big")
            rows.append([stmt.server_name.decode(), query[:200], types, stmt.uses,
                         on_servers.get(stmt.server_name, 0)])
        return self.PREPARED_COLUMNS, rows

    def show_state(self):
        paused = self.app.paused
        return ref.COLUMNS["state"], [["active", "no" if paused else "yes"],
                                      ["paused", "yes" if paused else "no"],
                                      ["suspended", "no"]]

    def show_mem(self):
        """Memory of pgmulti's own objects, by kind, estimated now with sys.getsizeof.

        PgBouncer lists its slab caches; the rows here keep the names of the caches pgmulti
        has a counterpart for, then pgmulti's own kinds. size is the mean estimate per
        object in bytes, used the object count, free always 0 (Python keeps no free lists
        we could count), memtotal the sum. An object counts with its attribute dict, not
        with what it shares with others. iobuf_cache is an upper bound: every connection
        counts one read buffer of its configured size, though idle clients give theirs back
        (the codec does not tell whether a buffer is held).
        """
        app = self.app
        servers = [server for pool in app.pools.values() for server in pool.all_servers()]
        clients = list(app.clients)
        server_statements = [s.statements.prepared for s in servers if s.statements is not None]
        client_statements = [c.statements.by_name for c in clients if c.statements is not None]
        kinds = (
            ("user_cache", [_object_size(u) for u in app.config.users.values()]
             + [sys.getsizeof(name) + sys.getsizeof(secret)
                for name, secret in app.userlist.items()]),
            ("db_cache", [_object_size(db) for db in app.config.databases.values()]),
            ("pool_cache", [_pool_size(pool) for pool in app.pools.values()]),
            ("server_cache", [_object_size(s) + sys.getsizeof(s.params) for s in servers]),
            ("client_cache", [_object_size(c) + sys.getsizeof(c.params)
                              + sys.getsizeof(c.startup_params) for c in clients]),
            ("iobuf_cache", [connection.buffer_size for connection in clients + servers]),
            ("server_prepared_statement_cache", _spread(server_statements)),
            ("client_prepared_statement_cache", _spread(client_statements)),
            ("prepared_statement_cache", [_statement_size(stmt) for stmt in
                                          app.prepared_registry.by_definition.values()]),
        )
        rows = []
        for name, sizes in kinds:
            total = sum(sizes)
            rows.append([name, total // len(sizes) if sizes else 0, len(sizes), 0, total])
        return ref.COLUMNS["mem"], rows

    def show_fds(self):
        """PgBouncer's file descriptor list, without handing the descriptors over: pgmulti
        has no online restart (-R) to receive them. Passwords and SCRAM keys stay NULL."""
        app = self.app
        port = app.config.pgbouncer.listen_port
        rows = []
        for acceptor in app.listener.acceptors:
            sock = acceptor.socket
            if sock.family == socket.AF_UNIX:
                addr = ["unix", port]
            else:
                addr = list(sock.getsockname()[:2])
            rows.append([sock.fileno(), "pooler", None, None, *addr, 0, 0] + [None] * 7)
        for client in app.login_clients:
            rows.append(self._client_fd_row(client))
        for pool in app.pools.values():
            for client in pool.clients:
                if client.state != "waiting":
                    rows.append(self._client_fd_row(client))
            rows += [self._client_fd_row(client) for client in pool.waiting]
            for servers in (pool.active, pool.idle, pool.used, pool.tested, pool.login):
                rows += [self._server_fd_row(pool, server) for server in servers]
        return ref.COLUMNS["fds"], [row for row in rows if row[0] >= 0]

    def _client_fd_row(self, client: ClientConnection) -> list:
        params = client.params
        return [_fileno(client), "client", client.user or None, client.database or None,
                *self._addr(client.addr, client.listener_kind),
                _cancel_number(client.cancel_pid, client.cancel_key),
                _fileno(client.server) if client.server is not None else 0,
                params.get("client_encoding"), params.get("standard_conforming_strings"),
                params.get("DateStyle"), params.get("TimeZone"), None, None, None]

    @staticmethod
    def _server_fd_row(pool, server) -> list:
        params = server.params
        addr = ["unix", pool.port] if pool.unix_path else [pool.host, pool.port]
        return [_fileno(server), "server", pool.server_user, pool.name, *addr,
                _cancel_number(server.backend_pid, server.backend_key),
                _fileno(server.client) if server.client is not None else 0,
                params.get("client_encoding"), params.get("standard_conforming_strings"),
                params.get("DateStyle"), params.get("TimeZone"), None, None, None]

    def show_dns_hosts(self):
        return ref.COLUMNS["dns_hosts"], self.app.dns.rows()

    def show_dns_zones(self):
        return ref.COLUMNS["dns_zones"], []

    def show_peers(self):
        """The [peers] entries as configured (pgmulti does not forward cancels to them)."""
        default_size = self.app.config.pgbouncer.default_pool_size
        rows = [[peer.peer_id, peer.host, peer.port,
                 peer.pool_size if peer.pool_size is not None else default_size]
                for peer in self.app.config.peers.values()]
        return ref.COLUMNS["peers"], rows

    def show_peer_pools(self):
        """No peer pools: cancel requests are not forwarded to peers."""
        return ref.COLUMNS["peer_pools"], []

    # -- commands ------------------------------------------------------------------------

    def _database_arg(self, arg: str, key: str) -> str | None:
        if not arg:
            return None
        if arg in ("pgbouncer", "pgmulti"):
            raise admin_error(key, arg)
        if arg not in self.app.config.databases:
            raise admin_error("no_such_database", arg)
        return arg

    def cmd_pause(self, client: ClientConnection, arg: str) -> None:
        name = self._database_arg(arg, "cannot_pause_admin_db")
        if name is None and self.app.paused:
            raise admin_error("already_paused")
        self.app.pause(name)
        self._answer_when(client, lambda: not self._servers_in_use(name), "PAUSE")

    def _servers_in_use(self, name: str | None) -> bool:
        return any(p.active or p.used for p in self.app.pools.values()
                   if name is None or p.name == name)

    def _answer_when(self, client: ClientConnection, condition, tag: str) -> None:
        """Answer now if condition() holds, else hold the console until it does."""
        if condition():
            self._done(client, tag)
            return
        client.hold()
        self.app.spawn(self._answer_later(client, condition, tag))

    async def _answer_later(self, client: ClientConnection, condition, tag: str) -> None:
        while not client.closed and not condition():
            await asyncio.sleep(0.05)
        if not client.closed:
            self._done(client, tag)
            client.resume()

    def cmd_resume(self, client: ClientConnection, arg: str) -> None:
        name = self._database_arg(arg, "cannot_pause_admin_db")
        if name is None and not self.app.paused:
            raise admin_error("not_paused")
        if name is not None and not self.app.database_paused(name):
            raise admin_error("database_not_paused", name)
        self.app.resume(name)
        self._done(client, "RESUME")

    def cmd_reload(self, client: ClientConnection, arg: str) -> None:
        try:
            self.app.reload()
        except PgError:
            raise admin_error("reload_failed") from None
        self._done(client, "RELOAD")

    def cmd_shutdown(self, client: ClientConnection, arg: str) -> None:
        if not arg:
            self.app.request_shutdown(None)  # plain SHUTDOWN sends no reply: the process exits
            return
        self._done(client, "SHUTDOWN")
        self.app.request_shutdown(SHUTDOWN_MODES[arg.lower()])

    def cmd_kill(self, client: ClientConnection, arg: str) -> None:
        name = self._database_arg(arg, "cannot_kill_admin_db")
        for pool in list(self.app.pools.values()):
            if name is None or pool.name == name:
                pool.paused = True
                for other in list(pool.clients):
                    other.report(PgError("08P01", "database removed", fatal=True))
                pool.close_all("database killed")
        self._done(client, "KILL")

    def cmd_kill_client(self, client: ClientConnection, arg: str) -> None:
        """KILL_CLIENT id: close one client (the `id` of SHOW CLIENTS) and release its server."""
        target = self._client_with_id(arg)
        target.report(errors.fatal(errors.PROTOCOL_VIOLATION, "admin forced disconnect"))
        if target is not client:
            self._done(client, "KILL_CLIENT")

    def _client_with_id(self, arg: str) -> ClientConnection:
        # PgBouncer reads the id with sscanf("%llu"): leading digits count, a sign is allowed.
        digits = re.match(r"[+-]?[0-9]+", arg)
        if digits is None:
            raise admin_error("invalid_client_id")
        wanted = int(digits.group())
        for other in self.app.clients:
            if other.id == wanted and other.state not in ("login", "cancel") and not other.closed:
                return other
        raise admin_error("client_not_found")

    def cmd_disable(self, client: ClientConnection, arg: str) -> None:
        name = self._database_arg(arg, "cannot_disable_admin_db")
        if name is None:
            raise admin_error("database_required")
        for pool in self.app.pools.values():
            if pool.name == name:
                pool.disabled = True
        self.app.disabled_databases.add(name)
        self._done(client, "DISABLE")

    def cmd_enable(self, client: ClientConnection, arg: str) -> None:
        name = self._database_arg(arg, "cannot_disable_admin_db")
        if name is None:
            raise admin_error("database_required")
        for pool in self.app.pools.values():
            if pool.name == name:
                pool.disabled = False
        self.app.disabled_databases.discard(name)
        self._done(client, "ENABLE")

    def cmd_reconnect(self, client: ClientConnection, arg: str) -> None:
        name = self._database_arg(arg, "cannot_reconnect_admin_db")
        for pool in self.app.pools.values():
            if name is None or pool.name == name:
                pool.close_idle("reconnect requested")
                pool.reconnect_generation += 1
        self._done(client, "RECONNECT")

    def cmd_wait_close(self, client: ClientConnection, arg: str) -> None:
        """WAIT_CLOSE [db]: answer once no server of db (or of any database) is still marked
        to close (close_needed, set by RECONNECT)."""
        name = self._database_arg(arg, "cannot_wait_admin_db")
        self._answer_when(client, lambda: self.servers_to_close(name) == 0, "WAIT_CLOSE")

    def servers_to_close(self, name: str | None) -> int:
        return sum(1 for pool in self.app.pools.values() if name is None or pool.name == name
                   for server in pool.all_servers()
                   if close_needed(pool, server) and not server.closed)

    def cmd_suspend(self, client: ClientConnection, arg: str) -> None:
        """PgBouncer suspends for an online restart (-R), which hands sockets to a new
        process. pgmulti restarts without downtime differently, so SUSPEND says how."""
        raise PgError(errors.FEATURE_NOT_SUPPORTED,
                      "SUSPEND is not supported: pgmulti has no online restart (-R)",
                      hint="Restart without downtime through so_reuseport: start the new "
                           "pgmulti on the same port with so_reuseport = 1, then run SHUTDOWN "
                           "WAIT_FOR_CLIENTS on the old one.")

    # -- SET -----------------------------------------------------------------------------

    def cmd_set(self, client: ClientConnection, key: str, value: str) -> None:
        """SET key = value: the session parameters the console pretends to have answer
        "SET ignored"; [pgbouncer] settings change at once, as a RELOAD would apply them."""
        if key.lower() in ref.FAKE_PARAMETERS:
            self._done(client, "SET", ["SET ignored"])
            return
        self._require_admin(client)
        shown = "***" if key in SECRET_SETTINGS else value
        log.info("%r admin command: SET %s = %s", client, key, shown)
        notices = self.change_setting(key, value)
        self._done(client, f"SET {key}={value}", notices)

    def change_setting(self, key: str, text: str) -> list[str]:
        """Apply one [pgbouncer] setting now; returns notices for the console.

        PgBouncer answers "SET failed" to unknown keys and bad values, and ignores settings
        it cannot change at run time; pgmulti refuses those too, with the same message,
        rather than answer as if it had changed them. The detail says why.
        """
        changeable = CHANGEABLE.get(key)
        if changeable is None:
            raise set_failed(f"unknown parameter: {key}")
        if not changeable:
            raise set_failed(f"{key} cannot be changed while running (SHOW CONFIG: changeable "
                             f"= no); change it in the configuration file and restart")
        if "\n" in text or "\r" in text:
            raise set_failed("the value must be one line")
        try:
            # The config loader's own conversion and checks, on a one-line [pgbouncer].
            parsed = loader.parse_config_text(f"[pgbouncer]\n{key} = {text}\n", "SET")
        except loader.ConfigError as exc:
            raise set_failed(str(exc).removeprefix("SET:2: ")) from None
        app = self.app
        settings = msgspec.structs.replace(app.config.pgbouncer,
                                           **{key: getattr(parsed.pgbouncer, key)})
        config = msgspec.structs.replace(app.config, pgbouncer=settings)
        if key == "auth_type":
            from .app import check_auth_type  # the app module imports this one
            try:
                check_auth_type(config)
            except OSError as exc:
                raise set_failed(str(exc)) from None
        notices = []
        tls = app.tls
        if "_tls_" in key or "_tls13_" in key:
            try:
                tls = TlsContexts(settings)  # new connections use it; open ones keep theirs
            except TlsConfigError as exc:
                log.warning("%s: %s", TLS_NOT_APPLIED, exc)
                notices.append(TLS_NOT_APPLIED)
        if key in LOGGING_SETTINGS:
            apply_logging(settings, key)
        self._apply(config, tls)
        if key == "auth_file":
            app.load_userlist()
        return notices

    def _apply(self, config, tls) -> None:
        """Swap in the new configuration and let every pool pick up its limits (as
        App.reload does for an unchanged [databases] section)."""
        self.app.apply_config(config, tls)
        self.app.refresh_pools()


def apply_logging(settings, key: str) -> None:
    """Logging settings take effect at once. The log level follows verbose; destinations
    are rebuilt with stderr kept as the command line chose it (-q, -d)."""
    root = logging.getLogger()
    level = logging.DEBUG if settings.verbose else logging.INFO
    if key == "verbose":
        root.setLevel(level)
        return
    stderr = any(getattr(handler, "stream", None) is sys.stderr for handler in root.handlers)
    try:
        warnings = logs.configure(logfile=settings.logfile or None, stderr=stderr,
                                  level=root.level, log_format=settings.log_format,
                                  syslog=settings.syslog, syslog_ident=settings.syslog_ident,
                                  syslog_facility=settings.syslog_facility)
    except OSError as exc:
        raise set_failed(f"cannot open the log file: {exc}") from None
    for warning in warnings:
        log.warning("%s", warning)


# -- SHOW MEM and SHOW FDS helpers ---------------------------------------------------------


def _object_size(obj) -> int:
    """sys.getsizeof of an object and of its attribute dict, if it has one."""
    size = sys.getsizeof(obj)
    attributes = getattr(obj, "__dict__", None)
    return size + sys.getsizeof(attributes) if attributes is not None else size


def _pool_size(pool) -> int:
    collections = (pool.idle, pool.active, pool.used, pool.tested, pool.login, pool.waiting,
                   pool.clients)
    return _object_size(pool) + sum(sys.getsizeof(c) for c in collections)


def _statement_size(stmt) -> int:
    return sys.getsizeof(stmt) + sys.getsizeof(stmt.definition) + sys.getsizeof(stmt.server_name)


def _spread(tables: list[dict]) -> list[int]:
    """One size per entry of name tables: each table's memory shared among its entries."""
    sizes = []
    for table in tables:
        if table:
            sizes += [sys.getsizeof(table) // len(table)] * len(table)
    return sizes


def _fileno(connection) -> int:
    """The socket's descriptor; -1 once the transport is gone."""
    transport = connection.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock.fileno() if sock is not None else -1


def _cancel_number(pid: int, key) -> int:
    """A cancel key as PgBouncer shows it: the pid and the key's first 4 bytes, as one
    64-bit number."""
    key_bytes = protocol.cancel_key_bytes(key)[:4] if key else b""
    return (pid << 32) | int.from_bytes(key_bytes, "big")
