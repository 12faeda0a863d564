"""The admin console across worker processes: one answer for the whole pgmulti.

An admin connection lands on one worker. SHOW answers merge that worker's rows with every
other worker's (pools and stats add up, client and server lists concatenate); commands
(PAUSE, RELOAD, SET, KILL_CLIENT, ...) run in every worker, and the console answers once all
have. SHUTDOWN goes through the parent process, which tells every worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from . import protocol
from .admin import ADMIN_ONLY_SHOWS

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgmulti.admin")

# SHOW answers that describe the process itself or the configuration: the local one is right.
LOCAL_ONLY = frozenset({"config", "version", "state", "help", "dns_hosts", "dns_zones", "peers",
                        "peer_pools", "fds"})
# Row lists that concatenate (one row per connection or socket).
CONCATENATED = frozenset({"clients", "servers", "sockets", "active_sockets"})
# Keyed merges: the key columns identify a row; numbers add up unless listed in TAKE_MAX.
KEYS = {
    "pools": ("database", "user"),
    "stats": ("database",), "stats_totals": ("database",), "stats_averages": ("database",),
    "totals": ("name",),
    "databases": ("name",),
    "users": ("name",),
    "lists": ("list",),
    "mem": ("name",),
    "prepared_statements": ("name",),
}
TAKE_MAX = frozenset({"maxwait", "maxwait_us", "paused", "disabled", "size", "pool_size",
                      "min_pool_size", "reserve_pool_size", "reserve_pool", "server_lifetime",
                      "max_connections", "max_client_connections", "max_user_connections",
                      "max_user_client_connections", "port", "parameter_types"})
# Per-period averages of times are weighted by the matching per-period count.
WEIGHTS = {"avg_xact_time": "avg_xact_count", "avg_query_time": "avg_query_count",
           "avg_wait_time": "avg_server_assignment_count"}
# SHOW LISTS rows counting configuration, not connections: every worker has all of them.
LISTS_NOT_SUMMED = frozenset({"databases", "users", "peers", "pools", "peer_pools", "dns_names",
                              "dns_zones", "dns_queries", "dns_pending"})


def merge_rows(what: str, columns, row_sets: list[list[list]]) -> list[list]:
    """One worker's rows per entry of row_sets (the asking worker's first)."""
    if what in LOCAL_ONLY or len(row_sets) == 1:
        return row_sets[0]
    if what not in KEYS:
        if what not in CONCATENATED:
            log.debug("SHOW %s merged by concatenation", what)
        return [row for rows in row_sets for row in rows]
    names = [column[0] for column in columns]
    key_at = [names.index(name) for name in KEYS[what]]
    merged: dict[tuple, list] = {}
    weights: dict[tuple, dict[int, float]] = {}
    for rows in row_sets:
        for row in rows:
            key = tuple(row[i] for i in key_at)
            into = merged.get(key)
            if into is None:
                merged[key] = list(row)
                weights[key] = _weighted_parts(names, row)
                continue
            if what == "lists" and key[0] in LISTS_NOT_SUMMED:
                continue
            for i, (name, value) in enumerate(zip(names, row)):
                into[i] = _combine(name, into[i], value)
            for i, part in _weighted_parts(names, row).items():
                weights[key][i] = weights[key].get(i, 0.0) + part
    for key, row in merged.items():
        for i, total in weights[key].items():
            count = row[names.index(WEIGHTS[names[i]])]
            row[i] = int(total / count) if count else 0
    return list(merged.values())


def _weighted_parts(names, row) -> dict[int, float]:
    parts = {}
    for i, name in enumerate(names):
        if name in WEIGHTS:
            parts[i] = float(row[i] or 0) * float(row[names.index(WEIGHTS[name])] or 0)
    return parts


def _combine(name: str, old, new):
    if not isinstance(old, (int, float)) or isinstance(old, bool) or not isinstance(new, (int, float)):
        return old if old not in (None, "") else new
    if name in TAKE_MAX:
        return max(old, new)
    return old + new


class HeadlessConsole:
    """Stands in for an admin client when a peer's console command runs here: it keeps what
    the console answers and tells when the answer (ReadyForQuery) is complete."""

    def __init__(self, user: str, answered: asyncio.Future):
        self.user = user
        self.admin = True
        self.closed = False
        self.held = False
        self.output = bytearray()
        self.answered = answered
        self.transport = self

    def __repr__(self) -> str:
        return f"admin console of {self.user} (all workers)"

    def write(self, data: bytes) -> None:
        self.output += data
        if self.output.endswith(protocol.ready_for_query("I")) and not self.answered.done():
            self.answered.set_result(bytes(self.output))

    def hold(self) -> None:
        self.held = True

    def resume(self) -> None:
        self.held = False


def is_error(answer: bytes) -> bool:
    return answer[:1] == b"E"


class ConsoleAcrossWorkers:
    """The admin console entry point when pgmulti runs several workers."""

    def __init__(self, app: App):
        self.app = app

    def peer_handlers(self) -> dict:
        return {"show": self._serve_show, "console": self._serve_console}

    async def _serve_show(self, request: dict) -> dict:
        columns, rows = self.app.admin.show[request["what"]]()
        return {"rows": rows}

    async def _serve_console(self, request: dict) -> bytes:
        answered = asyncio.get_running_loop().create_future()
        console = HeadlessConsole(request["user"], answered)
        self.app.admin.handle_query(console, request["text"].encode())
        return await answered

    def handle_query(self, client, body: bytes) -> None:
        """Answer a console query for the whole pgmulti, not just this worker."""
        text = body.rstrip(b"\0").decode("utf-8", "replace").strip()
        words = text.rstrip(";").split()
        verb = words[0].lower() if words else ""
        what = words[1].lower() if len(words) == 2 else ""
        admin = self.app.admin
        is_admin = client.user in self.app.admin_users
        if (verb in ("show", "select") and what in admin.show and what not in LOCAL_ONLY
                and (is_admin or what not in ADMIN_ONLY_SHOWS)):
            client.hold()
            self.app.spawn(self._show(client, what))
        elif verb in ("show", "select", "shutdown", "") or not is_admin:
            # SHOW of local facts, errors, SHUTDOWN (through the parent), refusals: as is.
            admin.handle_query(client, body)
        else:
            client.hold()
            self.app.spawn(self._command(client, text))

    async def _show(self, client, what: str) -> None:
        try:
            columns, rows = self.app.admin.show[what]()
            others = await self.app.peers.ask_others("show", what=what)
            rows = merge_rows(what, columns, [rows] + [answer["rows"] for answer in others])
            if not client.closed:
                self.app.admin._send_rows(client, columns, rows)
        except Exception:
            log.exception("SHOW %s across workers failed", what)
            if not client.closed:
                client.transport.write(protocol.error_response(
                    "ERROR", "XX000", f"SHOW {what} failed") + protocol.ready_for_query("I"))
        finally:
            if not client.closed:
                client.resume()

    async def _command(self, client, text: str) -> None:
        """Run the command here and in every other worker; answer once all have."""
        answered = asyncio.get_running_loop().create_future()
        here = HeadlessConsole(client.user, answered)
        self.app.admin.handle_query(here, text.encode())
        # No time limit: PAUSE and WAIT_CLOSE answer when transactions end, as in PgBouncer.
        others = await self.app.peers.ask_others("console", timeout=None, text=text,
                                                 user=client.user)
        local = await answered
        answer = local
        if is_error(local):
            # KILL_CLIENT finds its client in one worker only: any success is the answer.
            answer = next((a for a in others if not is_error(a)), local)
        if not client.closed:
            client.transport.write(answer)
            client.resume()
