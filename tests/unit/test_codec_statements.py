"""Unit tests for the codec's share of prepared-statement mapping (STATEMENT_REQUEST and
STATEMENT_REPLY actions).

Client side: Parse/Bind/Describe/Close/Sync that name no statement are forwarded in C with
the reply they will get noted in the server's queue of expected replies, as
pgmulti.prepared.ClientStatements would note it; the others go whole to Python. Server side:
a ParseComplete/CloseComplete is forwarded in C when the queue says the client wants it,
otherwise Python decides. Every stream is also split at every byte boundary.
"""

import collections
import struct

import pytest

from pgmulti import prepared
from pgmulti._codec import (
    INSPECT,
    PASS,
    REJECT,
    STATEMENT_REPLY,
    STATEMENT_REQUEST,
    PoolCore,
    Relay,
    WorkerFlags,
    action_table,
    link_pair,
    message,
    ready_for_query,
)

from codec_feed import feed, single_splits

CLIENT_ACTIONS = action_table(REJECT, **{t: PASS for t in "dcfEHFQ"}, X=INSPECT,
                              **{t: STATEMENT_REQUEST for t in "PBDCS"})
SERVER_ACTIONS = action_table(PASS, S=INSPECT, E=INSPECT,
                              **{"1": STATEMENT_REPLY, "3": STATEMENT_REPLY})


class Peer:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(bytes(data))

    def writelines(self, pieces):
        self.written.extend(bytes(piece) for piece in pieces)

    def get_write_buffer_size(self):
        return 0

    def forwarded(self):
        return b"".join(self.written)


class Recording(Relay):
    def __init__(self):
        self.inspected = []

    def on_message(self, msg_type, view):
        self.inspected.append(bytes(view))


def linked_pair():
    client, server = Recording(), Recording()
    client_peer, server_peer = Peer(), Peer()
    client.attach_transport(client_peer)
    server.attach_transport(server_peer)
    client.batch_output = True
    client.server, server.client = server, client  # as pgmulti.session.link does
    link_pair(client, server, SERVER_ACTIONS, False)
    client.set_actions(CLIENT_ACTIONS)
    expected = collections.deque()
    server.expect_replies_in(expected)
    core = client.pool_core = PoolCore(collections.deque(), WorkerFlags())
    return client, server, client_peer, server_peer, expected, core


def parse(name: bytes, sql: bytes) -> bytes:
    return message(ord("P"), name + b"\0" + sql + b"\0" + struct.pack("!H", 0))


def bind(portal: bytes, statement: bytes) -> bytes:
    return message(ord("B"), portal + b"\0" + statement + b"\0" + struct.pack("!HHH", 0, 0, 0))


EXECUTE = message(ord("E"), b"\0" + struct.pack("!I", 0))
SYNC = message(ord("S"), b"")
UNNAMED_CYCLE = (parse(b"", b"SELECT 1") + bind(b"", b"") + message(ord("D"), b"P\0") + EXECUTE
                 + bind(b"cursor", b"") + message(ord("C"), b"P\0")
                 + message(ord("C"), b"S\0") + SYNC)


@pytest.mark.parametrize("cuts", single_splits(UNNAMED_CYCLE))
def test_messages_naming_no_statement_are_forwarded_and_noted(cuts):
    client, server, _, server_peer, expected, core = linked_pair()
    feed(client, UNNAMED_CYCLE, cuts)
    assert server_peer.forwarded() == UNNAMED_CYCLE
    assert client.inspected == []
    assert list(expected) == [prepared.FORWARD_PARSE, prepared.FORWARD_CLOSE,
                              prepared.FORWARD_CLOSE, 1]
    assert core.bind_count == 2
    assert server.pending == 1


NAMED = [parse(b"s1", b"SELECT 1"), bind(b"", b"s1"), message(ord("D"), b"Ss1\0"),
         message(ord("C"), b"Ss1\0")]


@pytest.mark.parametrize("named", NAMED, ids=["parse", "bind", "describe", "close"])
def test_messages_naming_a_statement_go_to_python_between_forwarded_ones(named):
    client, _, _, server_peer, expected, _ = linked_pair()
    before, after = parse(b"", b"SELECT 2"), bind(b"", b"")
    stream = before + named + after
    for cuts in single_splits(stream):
        client.inspected.clear()
        server_peer.written.clear()
        expected.clear()
        feed(client, stream, cuts)
        assert client.inspected == [named]
        assert server_peer.forwarded() == before + after  # Python forwards its rewrite itself
        assert list(expected) == [prepared.FORWARD_PARSE]


def test_unlinked_client_leaves_statement_messages_to_python():
    client, server, _, server_peer, expected, _ = linked_pair()
    client.pool_core = None  # not in a transaction-pooling core: Python keeps the books
    feed(client, parse(b"", b"SELECT 1"))
    assert client.inspected == [parse(b"", b"SELECT 1")]
    assert server_peer.forwarded() == b"" and not expected


PARSE_COMPLETE = message(ord("1"), b"")
CLOSE_COMPLETE = message(ord("3"), b"")
BIND_COMPLETE = message(ord("2"), b"")


@pytest.mark.parametrize("cuts", single_splits(PARSE_COMPLETE + BIND_COMPLETE + CLOSE_COMPLETE
                                        + ready_for_query("I")))
def test_replies_the_client_expects_are_forwarded(cuts):
    _, server, client_peer, _, expected, _ = linked_pair()
    expected.extend([0, prepared.FORWARD_PARSE, prepared.FORWARD_CLOSE, 1])  # ints: Syncs
    stream = PARSE_COMPLETE + BIND_COMPLETE + CLOSE_COMPLETE + ready_for_query("I")
    feed(server, stream, cuts)
    assert client_peer.forwarded() == stream
    assert server.inspected == []
    assert list(expected) == [1]


@pytest.mark.parametrize("entry", [(prepared.SWALLOW, prepared.PARSE, object()),
                                   (prepared.FORWARD, prepared.PARSE, object())],
                         ids=["swallow", "named"])
def test_replies_python_accounts_for_go_to_python(entry):
    _, server, client_peer, _, expected, _ = linked_pair()
    expected.extend([entry, prepared.FORWARD_PARSE])
    feed(server, PARSE_COMPLETE + PARSE_COMPLETE)
    # The first is Python's to decide (it stays queued for next_action); so is everything
    # after it in the same read, in order.
    assert server.inspected == [PARSE_COMPLETE, PARSE_COMPLETE]
    assert client_peer.forwarded() == b""
    assert list(expected) == [entry, prepared.FORWARD_PARSE]


def test_reply_with_nothing_expected_is_forwarded():
    _, server, client_peer, _, expected, _ = linked_pair()
    feed(server, PARSE_COMPLETE)
    assert client_peer.forwarded() == PARSE_COMPLETE and server.inspected == []
