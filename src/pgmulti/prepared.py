"""Protocol-level prepared statements in transaction pooling (PgBouncer's max_prepared_statements).

A client names statements as it likes; the pooler gives every distinct statement (query text
plus parameter types) one server-side name, prepares it on whichever server the client lands
on, and rewrites names in Parse, Bind, Describe and Close. Responses stay in order because the
pooler never answers for the server: a Parse the client sends is always forwarded (as
Close + Parse when the server already has the statement, the CloseComplete swallowed), and a
Parse the pooler adds in front of a Bind has its ParseComplete swallowed.
"""

from __future__ import annotations

import collections
import itertools

from . import protocol
from ._codec import set_statement_entries

_statement_ids = itertools.count(1)

# What to do with the next ParseComplete / CloseComplete from a server, in send order.
FORWARD = 0
SWALLOW = 1
PARSE = "P"
CLOSE = "C"
# The entries for an unnamed Parse and for a Close of the client's: the codec adds and
# removes these itself when it forwards such messages unchanged (see _codec.Relay).
FORWARD_PARSE = (FORWARD, PARSE, None)
FORWARD_CLOSE = (FORWARD, CLOSE, None)
set_statement_entries(FORWARD_PARSE, FORWARD_CLOSE)


class Statement:
    """One distinct statement and its server-side name."""

    __slots__ = ("server_name", "definition", "uses")

    def __init__(self, definition: bytes):
        self.server_name = b"PGMULTI_%d" % next(_statement_ids)
        self.definition = definition  # Parse body after the name: query, types
        self.uses = 0

    def parse_message(self) -> bytes:
        return protocol.message(protocol.PARSE, self.server_name + b"\0" + self.definition)

    def close_message(self) -> bytes:
        return protocol.message(protocol.CLOSE, b"S" + self.server_name + b"\0")


class Registry:
    """All statements the pooler knows, by definition (shared by every client)."""

    def __init__(self):
        self.by_definition: dict[bytes, Statement] = {}

    def statement(self, definition: bytes) -> Statement:
        stmt = self.by_definition.get(definition)
        if stmt is None:
            stmt = self.by_definition[definition] = Statement(definition)
        return stmt


class ServerStatements:
    """Statements prepared on one server connection (LRU) and the responses to filter."""

    def __init__(self, limit: int):
        self.limit = limit
        self.prepared: collections.OrderedDict[bytes, Statement] = collections.OrderedDict()
        # In send order: (FORWARD or SWALLOW, PARSE or CLOSE, statement or None) for each
        # Parse/Close sent, and for a Sync the int n: the n-th ReadyForQuery answers it.
        self.expected: collections.deque = collections.deque()

    def expect(self, action: int, kind: str, stmt: Statement | None = None) -> None:
        self.expected.append((action, kind, stmt))

    def expect_sync(self, ready_number: int) -> None:
        """The ready_number-th ReadyForQuery of the connection answers a Sync just sent."""
        self.expected.append(ready_number)

    def has(self, stmt: Statement) -> bool:
        if stmt.server_name in self.prepared:
            self.prepared.move_to_end(stmt.server_name)
            return True
        return False

    def add(self, stmt: Statement, out: list[bytes]) -> None:
        """Record stmt as prepared; Close the least recently used beyond the limit."""
        self.prepared[stmt.server_name] = stmt
        while len(self.prepared) > self.limit:
            _, old = self.prepared.popitem(last=False)
            out.append(old.close_message())
            self.expect(SWALLOW, CLOSE, old)

    def forget_all(self) -> None:
        """After DISCARD ALL / a reset the server has none of them."""
        self.prepared.clear()
        self.expected.clear()

    def discarded(self) -> None:
        """A client's DEALLOCATE ALL / DISCARD ALL ran: nothing is prepared any more. Responses
        still expected for messages already sent keep their place."""
        self.prepared.clear()

    def next_action(self, ready_count: int) -> int:
        """What to do with a ParseComplete/CloseComplete that just arrived."""
        self._drop_finished_syncs(ready_count)
        while self.expected:
            entry = self.expected.popleft()
            if type(entry) is not int:
                return entry[0]
        return FORWARD

    def error(self, ready_count: int) -> None:
        """The server skips to the next Sync: so do the expectations of this cycle, and the
        Parses and Closes it skipped did not happen."""
        self._drop_finished_syncs(ready_count)
        still_there: set[bytes] = set()   # their Close was skipped too
        while self.expected:
            entry = self.expected.popleft()
            if type(entry) is int:
                self.expected.appendleft(entry)
                return
            _, kind, stmt = entry
            if stmt is None:
                continue
            if kind == CLOSE:
                self.prepared[stmt.server_name] = stmt
                still_there.add(stmt.server_name)
            elif stmt.server_name not in still_there:
                self.prepared.pop(stmt.server_name, None)

    def _drop_finished_syncs(self, ready_count: int) -> None:
        expected = self.expected
        while expected and type(expected[0]) is int and expected[0] <= ready_count:
            expected.popleft()


def split_name(body: bytes, start: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated name in body at start; return it and the position after the NUL."""
    end = body.index(b"\0", start)
    return body[start:end], end + 1


class ClientStatements:
    """One client's statement names, and the rewriting of its extended-protocol messages."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.by_name: dict[bytes, Statement] = {}

    def parse(self, body: bytes, server: ServerStatements, out: list[bytes]) -> None:
        name, pos = split_name(body)
        if not name:
            out.append(protocol.message(protocol.PARSE, body))
            server.expected.append(FORWARD_PARSE)
            return
        stmt = self.registry.statement(body[pos:])
        self.by_name[name] = stmt
        if server.has(stmt):
            # Already there: re-prepare in place so the client's ParseComplete comes in order.
            out.append(stmt.close_message())
            server.expect(SWALLOW, CLOSE, stmt)
        else:
            server.add(stmt, out)
        out.append(stmt.parse_message())
        server.expect(FORWARD, PARSE, stmt)

    def _ensure(self, name: bytes, server: ServerStatements, out: list[bytes]) -> tuple[bytes, bool]:
        """The server name for a client statement name, prepared on this server if needed;
        also whether a Parse had to be added."""
        stmt = self.by_name.get(name)
        if stmt is None:
            return name, False  # unknown: let the server report it does not exist
        stmt.uses += 1
        if server.has(stmt):
            return stmt.server_name, False
        server.add(stmt, out)
        out.append(stmt.parse_message())
        server.expect(SWALLOW, PARSE, stmt)
        return stmt.server_name, True

    def bind(self, body: bytes, server: ServerStatements, out: list[bytes]) -> bool:
        """Rewrite a Bind; True if the statement had to be prepared on this server first."""
        portal, pos = split_name(body)
        name, rest = split_name(body, pos)
        added = False
        if name:
            name, added = self._ensure(name, server, out)
        out.append(protocol.message(protocol.BIND, portal + b"\0" + name + b"\0" + body[rest:]))
        return added

    def describe(self, body: bytes, server: ServerStatements, out: list[bytes]) -> bool:
        added = False
        if body[:1] == b"S":
            name, _ = split_name(body, 1)
            if name:
                server_name, added = self._ensure(name, server, out)
                body = b"S" + server_name + b"\0"
        out.append(protocol.message(protocol.DESCRIBE, body))
        return added

    def forget_all(self) -> None:
        """The client deallocated all its statements (DEALLOCATE ALL / DISCARD ALL)."""
        self.by_name.clear()

    def close(self, body: bytes, server: ServerStatements, out: list[bytes]) -> None:
        if body[:1] == b"S":
            name, _ = split_name(body, 1)
            # The server-side statement stays for other clients; closing the client's own
            # (never prepared) name on the server still answers CloseComplete in order.
            self.by_name.pop(name, None)
        out.append(protocol.message(protocol.CLOSE, body))
        server.expected.append(FORWARD_CLOSE)
