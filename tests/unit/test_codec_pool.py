"""Unit tests for PoolCore, the transaction-pooling hand-off the codec makes without Python.

Clients and servers are plain Relays on recording transports, driven as uvloop drives them
(get_buffer, fill, buffer_updated). A hand-off the core declines must leave everything as it
was and reach Python instead: on_unlinked for a client's first message, on_ready for a
server's ReadyForQuery 'I'.
"""

import collections
import sys

import pytest
from pgmulti._codec import (
    INSPECT,
    PASS,
    REJECT,
    PoolCore,
    Relay,
    WorkerFlags,
    action_table,
    command_complete,
    message,
    query,
    ready_for_query,
)

SIZEHINT = 65536
SERVER_LINKED = action_table(PASS, S=INSPECT)
SERVER_IDLE = action_table(INSPECT)
CLIENT_ACTIONS = action_table(REJECT, **{t: PASS for t in "BCdcfDEHFPQS"}, X=INSPECT)
CLIENT_PREPARED = action_table(REJECT, **{t: PASS for t in "dcfEHFQ"}, X=INSPECT, P=INSPECT,
                               B=INSPECT, D=INSPECT, C=INSPECT, S=INSPECT)
SIGNATURE = ("UTF8", "ISO, MDY")
REPLY = command_complete("SELECT 1") + ready_for_query("I")


class Transport:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(bytes(data))

    def get_write_buffer_size(self):
        return 0

    def output(self):
        return b"".join(self.written)


class Connection(Relay):
    """A client or server relay that records the calls the core left to Python."""

    def __init__(self, name):
        self.name = name
        self.calls = []
        self.attach_transport(Transport())

    def on_unlinked(self, msg_type):
        self.calls.append(("unlinked", chr(msg_type)))
        self.hold()  # as Python does when it queues the client

    def on_ready(self, status):
        self.calls.append(("ready", chr(status)))

    def on_message(self, msg_type, view):
        self.calls.append(("message", chr(msg_type)))


def feed(relay, data):
    buffer = relay.get_buffer(SIZEHINT)
    memoryview(buffer)[:len(data)] = data
    relay.buffer_updated(len(data))


class Pool:
    """One server, two clients, a pool of size one: the second client has to queue."""

    def __init__(self, prepared=False):
        self.waiting = collections.deque()
        self.app = WorkerFlags()  # App.paused and App.shutting_down
        core = self.core = PoolCore(self.waiting, self.app)
        if prepared:
            core.set_actions(SERVER_LINKED, SERVER_IDLE, CLIENT_PREPARED, CLIENT_ACTIONS)
        else:
            core.set_actions(SERVER_LINKED, SERVER_IDLE)
        core.enabled = True
        core.pool_size = 1
        self.server = self.idle_server("server")
        self.first, self.second = (self.client(name) for name in ("first", "second"))

    def member(self, name, actions, state):
        """A connection of this pool's core, with the pool's parameter signature."""
        connection = Connection(name)
        connection.set_actions(actions)
        connection.pool_core = self.core
        connection.state = state
        connection.param_sig = SIGNATURE
        return connection

    def idle_server(self, name):
        server = self.member(name, SERVER_IDLE, "idle")
        self.core.idle.append(server)
        return server

    def client(self, name):
        return self.member(name, CLIENT_ACTIONS, "active")

    def both_asked(self):
        """The first client holds the server, the second has queued its query for it."""
        feed(self.first, query("SELECT 1"))
        feed(self.second, query("SELECT 2"))
        assert self.server.client is self.first
        assert list(self.waiting) == [self.second]


def test_first_client_linked_second_queued_in_c():
    pool = Pool()
    pool.both_asked()
    second = pool.second
    assert pool.first.calls == [] and second.calls == []
    assert second.held and second.state == "waiting" and second.wait_start > 0
    assert second.request_time > 0
    assert pool.server.transport.output() == query("SELECT 1")
    assert pool.core.counters() == {"links": 1, "releases": 0, "handoffs": 0, "queued": 1}


def test_released_server_goes_to_the_waiting_client_with_its_queued_query():
    pool = Pool()
    pool.both_asked()
    server, first, second = pool.server, pool.first, pool.second
    feed(server, REPLY)

    assert server.calls == []  # no Python on the way
    assert first.transport.output() == REPLY
    assert first.server is None and first.writer is None and first.last_active > 0
    assert server.client is second and second.server is server
    assert second.state == "active" and not second.held and second.link_time > 0
    assert server.state == "active" and pool.core.active == {server} and not pool.core.idle
    assert not pool.waiting
    # The queued query went to the server in the same call, and is counted as a request.
    assert server.transport.output() == query("SELECT 1") + query("SELECT 2")
    assert server.pending == 1
    assert pool.core.assignments == 2
    # One wait, of microseconds: the first bucket (up to 50 us).
    assert pool.core.wait_histogram()[0] == 1 and sum(pool.core.wait_histogram()) == 1
    assert pool.core.counters() == {"links": 1, "releases": 0, "handoffs": 1, "queued": 1}

    feed(server, REPLY)
    assert second.transport.output() == REPLY
    assert server.client is None and server.state == "idle" and pool.core.idle == [server]
    assert pool.core.fast_releases == 1
    # Only the answered client's bytes went to it: nothing for the first one twice.
    assert first.transport.output() == REPLY


def test_every_queued_message_flows_after_the_hand_off():
    pool = Pool()
    feed(pool.first, query("SELECT 1"))
    feed(pool.second, query("SELECT 2") + query("SELECT 3"))
    feed(pool.server, REPLY)
    assert pool.server.transport.output() == query("SELECT 1") + query("SELECT 2") + query("SELECT 3")
    assert pool.server.pending == 2
    feed(pool.server, REPLY)
    assert pool.server.client is pool.second  # one answer of two: still linked
    feed(pool.server, REPLY)
    assert pool.core.idle == [pool.server]


def test_client_tables_switch_with_prepared_statements():
    pool = Pool(prepared=True)
    pool.both_asked()
    feed(pool.server, REPLY)
    parse = message(ord("P"), b"s1\0SELECT 1\0\0\0")
    feed(pool.second, parse)  # linked: the pooler rewrites Parse
    assert pool.second.calls == [("message", "P")]
    feed(pool.first, query("SELECT 4"))  # back on the idle table: a pass-through request
    assert pool.first.held and pool.waiting[-1] is pool.first


def decline_param_sig(pool):
    pool.second.param_sig = ("UTF8", "German")


def decline_unknown_sig(pool):
    pool.second.param_sig = None


def decline_reading_paused(pool):
    pool.second._reading_paused = True


def decline_closed(pool):
    pool.second.closed = True


def decline_not_in_core(pool):
    pool.second.pool_core = None


def decline_paused(pool):
    pool.core.paused = True


def decline_app_paused(pool):
    pool.app.paused = True


def decline_reconnect(pool):
    pool.core.generation = 1


def decline_lifetime(pool):
    pool.core.lifetime = 1e-9


@pytest.mark.parametrize("unusual", [
    decline_param_sig, decline_unknown_sig, decline_reading_paused, decline_closed,
    decline_not_in_core, decline_paused, decline_app_paused, decline_reconnect,
    decline_lifetime])
def test_unusual_release_is_left_to_python_untouched(unusual):
    pool = Pool()
    pool.both_asked()
    unusual(pool)
    feed(pool.server, REPLY)
    assert pool.server.calls == [("ready", "I")]
    assert pool.server.client is pool.first and pool.first.server is pool.server
    assert pool.first.writer is not None
    assert list(pool.waiting) == [pool.second] and pool.second.held
    assert pool.second.state == "waiting" and pool.second.server is None
    assert pool.server.transport.output() == query("SELECT 1")
    assert pool.core.assignments == 1 and sum(pool.core.wait_histogram()) == 0
    assert pool.core.fast_handoffs == 0 and pool.core.fast_releases == 0


def queue_pool_can_grow(pool):
    pool.core.pool_size = 2


def queue_disabled(pool):
    pool.core.disabled = True


def queue_shutting_down(pool):
    pool.app.shutting_down = True


def queue_paused(pool):
    pool.core.paused = True


def queue_no_pool(pool):
    pool.core.pool_size = 0


@pytest.mark.parametrize("unusual", [
    queue_pool_can_grow, queue_disabled, queue_shutting_down, queue_paused, queue_no_pool])
def test_unusual_queueing_is_left_to_python(unusual):
    pool = Pool()
    feed(pool.first, query("SELECT 1"))
    unusual(pool)
    feed(pool.second, query("SELECT 2"))
    assert pool.second.calls == [("unlinked", "Q")]
    assert not pool.waiting and pool.second.state == "active"
    assert pool.core.fast_queued == 0


def test_server_logging_in_counts_toward_a_full_pool():
    pool = Pool()
    pool.core.pool_size = 2
    pool.core.login.add(Connection("new server"))
    feed(pool.first, query("SELECT 1"))
    feed(pool.second, query("SELECT 2"))
    assert list(pool.waiting) == [pool.second] and pool.second.calls == []


@pytest.mark.parametrize("round_robin", [False, True])
def test_a_link_takes_the_newest_idle_server_or_the_oldest_with_round_robin(round_robin):
    pool = Pool()
    servers = [pool.server] + [pool.idle_server(name) for name in ("second", "third")]
    pool.core.round_robin = round_robin
    pool.core.pool_size = 3
    taken = servers[0] if round_robin else servers[2]
    references = sys.getrefcount(taken)
    feed(pool.first, query("SELECT 1"))
    assert pool.first.server is taken and taken.transport.output() == query("SELECT 1")
    assert pool.core.idle == [s for s in servers if s is not taken]
    feed(taken, REPLY)  # released: back to idle, the newest
    assert pool.first.server is None
    assert pool.core.idle == [s for s in servers if s is not taken] + [taken]
    # The take handed the idle list's reference over, neither leaked nor freed twice.
    assert sys.getrefcount(taken) == references
