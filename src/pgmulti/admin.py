"""Admin console: the `pgbouncer` (or `pgmulti`) virtual database, one handler per command."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from . import admin_columns as ref
from . import protocol
from .__version__ import __version__
from .errors import PgError

if TYPE_CHECKING:
    from .app import App
    from .client import ClientConnection

log = logging.getLogger("pgmulti.admin")

SHUTDOWN_MODES = {"wait_for_servers": "servers", "wait_for_clients": "clients"}


def admin_error(key: str, *args) -> PgError:
    text, sqlstate, _ = ref.ADMIN_ERRORS[key]
    return PgError(sqlstate, text % args if args else text)


def timestamp_text(epoch: float) -> str:
    """PgBouncer's 'YYYY-MM-DD HH:MM:SS TZ' in local time; zero means now."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch or time.time()))


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
    """Parses console commands and answers them in PgBouncer's formats."""

    def __init__(self, app: App):
        self.app = app
        self.show = {
            "pools": self.show_pools, "stats": self.show_stats,
            "stats_totals": self.show_stats_totals, "stats_averages": self.show_stats_averages,
            "totals": self.show_totals, "clients": self.show_clients, "servers": self.show_servers,
            "databases": self.show_databases, "users": self.show_users, "config": self.show_config,
            "lists": self.show_lists, "version": self.show_version, "state": self.show_state,
            "prepared_statements": self.show_prepared_statements,
        }
        # word -> (handler, fewest arguments, most arguments), as PgBouncer's parser allows.
        self.commands = {
            "pause": (self.cmd_pause, 0, 1), "resume": (self.cmd_resume, 0, 1),
            "reload": (self.cmd_reload, 0, 0), "shutdown": (self.cmd_shutdown, 0, 1),
            "kill": (self.cmd_kill, 0, 1), "disable": (self.cmd_disable, 0, 1),
            "enable": (self.cmd_enable, 0, 1), "reconnect": (self.cmd_reconnect, 0, 1),
        }

    # -- entry ---------------------------------------------------------------------------

    def handle_query(self, client: ClientConnection, body: bytes) -> None:
        text = body.rstrip(b"\0").decode("utf-8", "replace").strip()
        words = text.rstrip(";").split()
        try:
            if not words:
                self._raise_invalid(text)
            verb = words[0].lower()
            if verb in ("show", "select") and len(words) == 2 and words[1].lower() == "help":
                self._send_help(client)
                return
            if verb in ("show", "select") and len(words) == 2:
                handler = self.show.get(words[1].lower())
                if handler is None:
                    if words[1].lower() not in ref.FAKE_PARAMETERS:
                        self._raise_invalid(text)
                    self._fake_parameter(client, words[1])
                    return
                columns, rows = handler()
                self._send_rows(client, columns, rows)
                return
            entry = self.commands.get(verb)
            if entry is None:
                self._raise_invalid(text)
            command, fewest, most = entry
            args = words[1:]
            if not fewest <= len(args) <= most:
                self._raise_invalid(text)
            if verb == "shutdown" and args and args[0].lower() not in SHUTDOWN_MODES:
                self._raise_invalid(text)
            if client.user not in self.app.admin_users:
                raise admin_error("admin_access_needed")
            log.info("%r admin command: %s", client, text)
            command(client, args)
        except PgError as exc:
            client.transport.write(protocol.error_response("ERROR", exc.sqlstate, exc.message)
                                   + protocol.ready_for_query("I"))

    def _send_help(self, client: ClientConnection) -> None:
        """SHOW HELP is one NOTICE with the command list, as in PgBouncer."""
        notice = protocol.error_response(ref.HELP_NOTICE_SEVERITY, ref.HELP_NOTICE_SQLSTATE,
                                         ref.HELP_NOTICE_MESSAGE, ref.HELP_DETAIL, notice=True)
        client.transport.write(notice + protocol.command_complete("SHOW")
                               + protocol.ready_for_query("I"))

    def _raise_invalid(self, text: str):
        raise admin_error("invalid_command", text)

    def _fake_parameter(self, client: ClientConnection, name: str) -> None:
        self._send_rows(client, ((name.lower(), "text"),), [[ref.FAKE_PARAMETERS[name.lower()]]])

    def _send_rows(self, client: ClientConnection, columns, rows, tag: str = "SHOW") -> None:
        out = [protocol.row_description([(name, ref.TYPE_OIDS[kind]) for name, kind in columns])]
        out += [protocol.data_row(row) for row in rows]
        out.append(protocol.command_complete(tag))
        out.append(protocol.ready_for_query("I"))
        client.transport.write(b"".join(out))

    @staticmethod
    def _done(client: ClientConnection, tag: str) -> None:
        client.transport.write(protocol.command_complete(tag) + protocol.ready_for_query("I"))

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
            wait = now - client.request_time if client.state == "waiting" else 0.0
            server = client.server
            rows.append(["C", client.user, client.database, "none", state,
                         *self._addr(client.addr, client.listener_kind),
                         *self._addr(client.local_addr, client.listener_kind),
                         timestamp_text(client.connect_time), timestamp_text(client.request_time),
                         int(wait), int((wait % 1) * 1_000_000), 0, f"0x{id(client):x}",
                         f"0x{id(server):x}" if server is not None else "", 0, client.tls,
                         client.params.get("application_name", ""), 0, client.id])
        return ref.COLUMNS["clients"], rows

    def _addr(self, addr, kind: str):
        if kind == "unix" or not isinstance(addr, tuple) or addr[0] == "unix":
            return ["unix", self.app.config.pgbouncer.listen_port]
        return [addr[0], addr[1]]

    def show_servers(self):
        rows = []
        for pool in self.app.pools.values():
            for server in pool.all_servers():
                state = "new" if server.state == "login" else server.state
                if pool.unix_path:
                    addr, port = "unix", pool.port
                else:
                    addr, port = pool.host, pool.port
                client = server.client
                rows.append(["S", pool.server_user, pool.name, "none", state, addr, port,
                             server.local_addr[0] or "unix", server.local_addr[1] or pool.port,
                             timestamp_text(server.connect_time),
                             timestamp_text(server.connect_time), 0, 0, 0,
                             f"0x{id(server):x}", f"0x{id(client):x}" if client is not None else "",
                             server.backend_pid, server.tls, server.params.get("application_name", ""), 0,
                             server.id])
        return ref.COLUMNS["servers"], rows

    def show_databases(self):
        rows = []
        cfg = self.app.config.pgbouncer
        for name, db in self.app.config.databases.items():
            pools = [p for p in self.app.pools.values() if p.name == name]
            settings = self.app.pool_settings(db, db.user or "")
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
                  "peers": 0, "pools": len(app.pools), "peer_pools": 0, "free_clients": 0,
                  "used_clients": len(logged_in), "login_clients": len(app.login_clients),
                  "free_servers": free_servers, "used_servers": used_servers}
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

    # -- commands ------------------------------------------------------------------------

    def _database_arg(self, args, key: str) -> str | None:
        if not args:
            return None
        name = args[0].strip('"')
        if name in ("pgbouncer", "pgmulti"):
            raise admin_error(key, name)
        if name not in self.app.config.databases:
            raise admin_error("no_such_database", name)
        return name

    def cmd_pause(self, client: ClientConnection, args) -> None:
        name = self._database_arg(args, "cannot_pause_admin_db")
        if name is None and self.app.paused:
            raise admin_error("already_paused")
        self.app.pause(name)
        client.hold()
        self.app.spawn(self._answer_when_idle(client, name, "PAUSE"))

    async def _answer_when_idle(self, client: ClientConnection, name: str | None, tag: str) -> None:
        """PAUSE answers once every server of the database(s) is back in the pool."""
        while not client.closed:
            busy = any(p.active or p.used for p in self.app.pools.values()
                       if name is None or p.name == name)
            if not busy:
                break
            await asyncio.sleep(0.05)
        if not client.closed:
            self._done(client, tag)
            client.resume()

    def cmd_resume(self, client: ClientConnection, args) -> None:
        name = self._database_arg(args, "cannot_pause_admin_db")
        if name is None and not self.app.paused:
            raise admin_error("not_paused")
        if name is not None and not self.app.database_paused(name):
            raise admin_error("database_not_paused", name)
        self.app.resume(name)
        self._done(client, "RESUME")

    def cmd_reload(self, client: ClientConnection, args) -> None:
        try:
            self.app.reload()
        except PgError:
            raise admin_error("reload_failed") from None
        self._done(client, "RELOAD")

    def cmd_shutdown(self, client: ClientConnection, args) -> None:
        if not args:
            self.app.request_shutdown(None)  # plain SHUTDOWN sends no reply: the process exits
            return
        self._done(client, "SHUTDOWN")
        self.app.request_shutdown(SHUTDOWN_MODES[args[0].lower()])

    def cmd_kill(self, client: ClientConnection, args) -> None:
        name = self._database_arg(args, "cannot_kill_admin_db")
        for pool in list(self.app.pools.values()):
            if name is None or pool.name == name:
                pool.paused = True
                for other in list(pool.clients):
                    other.report(PgError("08P01", "database removed", fatal=True))
                pool.close_all("database killed")
        self._done(client, "KILL")

    def cmd_disable(self, client: ClientConnection, args) -> None:
        name = self._database_arg(args, "cannot_disable_admin_db")
        if name is None:
            raise admin_error("database_required")
        for pool in self.app.pools.values():
            if pool.name == name:
                pool.disabled = True
        self.app.disabled_databases.add(name)
        self._done(client, "DISABLE")

    def cmd_enable(self, client: ClientConnection, args) -> None:
        name = self._database_arg(args, "cannot_disable_admin_db")
        if name is None:
            raise admin_error("database_required")
        for pool in self.app.pools.values():
            if pool.name == name:
                pool.disabled = False
        self.app.disabled_databases.discard(name)
        self._done(client, "ENABLE")

    def cmd_reconnect(self, client: ClientConnection, args) -> None:
        name = self._database_arg(args, "cannot_reconnect_admin_db")
        for pool in self.app.pools.values():
            if name is None or pool.name == name:
                pool.close_idle("reconnect requested")
                pool.reconnect_generation += 1
        self._done(client, "RECONNECT")

