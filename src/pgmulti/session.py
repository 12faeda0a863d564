"""Pool-mode state machine between a client and a server: link, unlink, keep parameters in step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import protocol
from ._codec import link_pair, unlink_pair

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection

SESSION = "session"
TRANSACTION = "transaction"
STATEMENT = "statement"

# Parameters a client may change that every server it lands on must show the same way
# (PgBouncer's varcache); keys are the names PostgreSQL reports in ParameterStatus. These
# are always tracked; track_extra_parameters adds more (track()).
ALWAYS_TRACKED = ("client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings",
                  "application_name")
# Reported parameters PostgreSQL does not spell in lower case (besides DateStyle, TimeZone).
_MIXED_CASE_NAMES = {"intervalstyle": "IntervalStyle"}
# Startup packet keys that are not parameters.
_NOT_PARAMETERS = {"user", "database", "options", "replication"}

TRACKED_PARAMETERS: tuple[str, ...] = ALWAYS_TRACKED + ("IntervalStyle",)
TRACKED_BY_LOWER = {name.lower(): name for name in TRACKED_PARAMETERS}


def track(extra: Iterable[str]) -> None:
    """Track these parameters too (track_extra_parameters, read at every config load)."""
    global TRACKED_PARAMETERS, TRACKED_BY_LOWER
    by_lower = {name.lower(): name for name in ALWAYS_TRACKED}
    for name in extra:
        lower = name.lower()
        if lower not in by_lower and lower not in _NOT_PARAMETERS:
            by_lower[lower] = _MIXED_CASE_NAMES.get(lower, lower)
    TRACKED_PARAMETERS = tuple(by_lower.values())
    TRACKED_BY_LOWER = by_lower


READY_IDLE = ord("I")


def link(client: ClientConnection, server: ServerConnection, server_actions: bytes) -> None:
    """Connect the two relays so bytes flow directly between the sockets."""
    client.server = server
    server.client = client
    # Session mode never releases at ReadyForQuery: spare the Python call per transaction.
    link_pair(client, server, server_actions, client.pool.release_at_ready)
    if client.maps_statements:
        client.set_actions(client.pool.client_prepared_actions)


def unlink(client: ClientConnection, server: ServerConnection, server_actions: bytes) -> None:
    client.server = None
    server.client = None
    unlink_pair(client, server, server_actions)
    if client.maps_statements:
        client.set_actions(client.pool.client_relay_actions)


# Interned signatures: equal tracked values give the same object, compared by identity in C.
_signatures: dict[tuple, tuple] = {}
SIGNATURES_MAX = 4096


def signature(params: dict[str, str]) -> tuple:
    """The tracked parameter values of a client or server, one object per distinct value set."""
    key = tuple(params.get(name) for name in TRACKED_PARAMETERS)
    if len(_signatures) >= SIGNATURES_MAX:
        _signatures.clear()  # old objects stay valid; equal new ones just compare once more
    return _signatures.setdefault(key, key)


def greeting(server_params: dict[str, str], startup_params: dict[str, str]) -> tuple[dict, bytes]:
    """What a client is told at login, and its tracked parameters: AuthenticationOk, then a
    ParameterStatus per parameter, the server's values overridden by the client's startup ones."""
    params = dict(server_params)
    params.update(startup_params)
    params.pop("user", None)
    params.pop("database", None)
    tracked = {name: params[name] for name in TRACKED_PARAMETERS if name in params}
    messages = [protocol.authentication(protocol.AUTH_OK)]
    messages += [protocol.parameter_status(name, value) for name, value in params.items()]
    return tracked, b"".join(messages)


def parameter_sync_sql(client: ClientConnection, server: ServerConnection) -> str | None:
    """SET statements that make the server show the client's tracked parameters, or None."""
    if client.params.items() <= server.params.items():
        return None  # the common case, checked in C
    statements = []
    for name in TRACKED_PARAMETERS:
        wanted = client.params.get(name)
        if wanted is not None and server.params.get(name) != wanted:
            statements.append(f"SET {name} = {quote_literal(wanted)};")
    return " ".join(statements) or None


def quote_literal(value: str) -> str:
    """A standard-conforming SQL string literal (E'' form when backslashes are present)."""
    escaped = value.replace("'", "''")
    if "\\" in value:
        return "E'" + escaped.replace("\\", "\\\\") + "'"
    return "'" + escaped + "'"


