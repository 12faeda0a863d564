"""Unit tests for the Cython hot path, pgmulti._codec: framing, relaying, message builders.

The relay is driven exactly as uvloop drives a BufferedProtocol (get_buffer, fill the returned
memoryview, buffer_updated) and checked against a small pure-Python reference framer. Every
callback and every write goes into one ordered event log:

    ("read", n)                 the socket delivered n bytes (logged before buffer_updated)
    ("write", data)             the relay wrote to its peer (content at write time)
    ("message", type, data)     on_message, type 0 for an untyped startup packet
    ("unlinked", type)          on_unlinked
    ("ready", status)           on_ready
    ("error", code, type)       on_protocol_error
"""

import bisect
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgmulti._codec as codec
from pgmulti.protocol import cancel_request
from pgmulti._codec import (
    DISCONNECT,
    ERR_LENGTH,
    ERR_TOO_LONG,
    ERR_TYPE,
    INSPECT,
    PASS,
    REJECT,
    STARTUP_MAX,
    Relay,
    action_table,
    command_complete,
    data_row,
    error_response,
    message,
    parameter_status,
    query,
    ready_for_query,
    row_description,
    startup_message,
)

SIZEHINT = 65536  # what uvloop passes to get_buffer (libuv's suggested size)
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
Z = ord("Z")


def be32(value):
    return struct.pack("!I", value)


def be16(value):
    return struct.pack("!H", value)


# -- reference framer ------------------------------------------------------------------------


def frame(stream, startup=False):
    """Split a complete byte stream into [(type, whole message bytes)].

    Typed messages: type byte + int32 length (counting itself). With startup=True the stream is
    untyped startup packets (int32 length counting itself), reported with type 0.
    """
    stream = bytes(stream)
    messages = []
    pos = 0
    while pos < len(stream):
        if startup:
            (length,) = struct.unpack_from("!I", stream, pos)
            msg_type, end = 0, pos + length
        else:
            msg_type = stream[pos]
            (length,) = struct.unpack_from("!I", stream, pos + 1)
            end = pos + 1 + length
        if length < 4 or end > len(stream):
            raise ValueError(f"malformed or truncated message at offset {pos}")
        messages.append((msg_type, stream[pos:end]))
        pos = end
    return messages


def body(msg):
    """Body of a typed message (after type byte and length), checking the length field."""
    assert struct.unpack_from("!I", msg, 1)[0] == len(msg) - 1
    return msg[5:]


def split_cstrings(data):
    """b"a\\0b\\0\\0" -> [b"a", b"b"]; the data must end with the empty terminator."""
    assert data.endswith(b"\0\0") or data == b"\0"
    return data[:-2].split(b"\0") if data != b"\0" else []


def error_fields(msg):
    """Fields of an ErrorResponse / NoticeResponse as {code letter: value}."""
    raw = body(msg)
    assert raw.endswith(b"\0")
    fields = {}
    for item in raw[:-1].split(b"\0")[:-1]:
        fields[chr(item[0])] = item[1:].decode()
    return fields


class Reference:
    """What a correct relay does with a complete stream, per the reference framer.

    Assumes a linked writer and no hold(): PASS messages are forwarded as soon as their 5-byte
    header is in (streamed if incomplete); ReadyForQuery is forwarded only when whole; an
    INSPECT message is delivered when whole and blocks everything behind it until then.
    """

    def __init__(self, stream, actions, startup=False):
        self.actions = actions
        self.messages = frame(stream, startup)
        self.ends = []
        self.forwarded_before = []  # pass-through bytes in the messages before each one
        position = forwarded = 0
        for msg_type, msg in self.messages:
            self.forwarded_before.append(forwarded)
            position += len(msg)
            self.ends.append(position)
            if self.is_pass(msg_type):
                forwarded += len(msg)
        self.forwarded_before.append(forwarded)
        self.forwarded = b"".join(msg for t, msg in self.messages if self.is_pass(t))
        self.segments = self._segments()

    def is_pass(self, msg_type):
        return self.actions[msg_type] == PASS

    def _segments(self):
        """Ordered ("pass", run of forwarded bytes) and ("message", type, bytes) segments."""
        segments = []
        for t, msg in self.messages:
            if not self.is_pass(t):
                segments.append(("message", t, msg))
            elif segments and segments[-1][0] == "pass":
                segments[-1] = ("pass", segments[-1][1] + msg)
            else:
                segments.append(("pass", msg))
        return segments

    def forwarded_len_by(self, offset):
        """Bytes a prompt relay has written once `offset` bytes of the stream have arrived."""
        complete = bisect.bisect_right(self.ends, offset)
        total = self.forwarded_before[complete]
        if complete < len(self.messages):
            msg_type = self.messages[complete][0]
            available = offset - (self.ends[complete - 1] if complete else 0)
            if self.is_pass(msg_type) and msg_type != Z and available >= 5:
                total += available
        return total

    def completed_between(self, low, high):
        """Messages whose last byte is in stream offsets (low, high]."""
        first = bisect.bisect_right(self.ends, low)
        last = bisect.bisect_right(self.ends, high)
        return self.messages[first:last]


# -- test doubles and driver -----------------------------------------------------------------


class Peer:
    """Fake uvloop transport: logs each write; reports a fixed write-buffer size (backlog).

    With backlog > 0 the peer still holds every view it was given, so the relay must never
    write into those bytes again: the views themselves are kept and compared at the end.
    """

    def __init__(self, log, backlog=0):
        self.log = log
        self.backlog = backlog
        self.views = []
        self.snapshots = []

    def write(self, data):
        snapshot = bytes(data)
        self.views.append(data)
        self.snapshots.append(snapshot)
        self.log.append(("write", snapshot))

    def get_write_buffer_size(self):
        return self.backlog

    def forwarded(self):
        return b"".join(self.snapshots)

    def assert_lent_views_intact(self):
        for index, (view, snapshot) in enumerate(zip(self.views, self.snapshots)):
            assert bytes(view) == snapshot, f"write #{index} was overwritten after it was lent"


class RecordingRelay(Relay):
    """Relay logging its callbacks; optional hooks run after logging."""

    def __init__(self, log, *, when_unlinked=None, when_message=None):
        self.log = log
        self.when_unlinked = when_unlinked
        self.when_message = when_message

    def on_message(self, msg_type, view):
        self.log.append(("message", msg_type, bytes(view)))
        if self.when_message is not None:
            self.when_message(self, msg_type)

    def on_unlinked(self, msg_type):
        self.log.append(("unlinked", msg_type))
        if self.when_unlinked is not None:
            self.when_unlinked(self, msg_type)

    def on_ready(self, status):
        self.log.append(("ready", status))

    def on_protocol_error(self, code, msg_type):
        self.log.append(("error", code, msg_type))


class Socket:
    """Delivers bytes to a relay the way uvloop's buffered read path does."""

    def __init__(self, relay, log):
        self.relay = relay
        self.log = log
        self.largest_buffer = 0

    def receive(self, data):
        """Bytes arriving on the socket: read them in as many reads as the buffers allow."""
        data = memoryview(data)
        pos = 0
        while pos < len(data):
            buffer = self.relay.get_buffer(SIZEHINT)
            assert len(buffer) > 0, "uvloop treats an empty buffer as a fatal error"
            self.largest_buffer = max(self.largest_buffer, len(buffer))
            n = min(len(buffer), len(data) - pos)
            with memoryview(buffer) as target:  # uvloop holds the buffer during the callback
                target[:n] = data[pos : pos + n]
                self.log.append(("read", n))
                self.relay.buffer_updated(n)
            pos += n

    def receive_all(self, chunks):
        for chunk in chunks:
            self.receive(chunk)


def linked_relay(actions, peer_backlog=0, **hooks):
    """A relay linked to a recording peer, with its socket and the shared event log."""
    log = []
    relay = RecordingRelay(log, **hooks)
    relay.set_actions(actions)
    peer = Peer(log, peer_backlog)
    relay.link_output(peer)
    return relay, peer, Socket(relay, log), log


def events(log, kind):
    return [event for event in log if event[0] == kind]


def reads(log):
    """[(bytes read, [events during that read])] in order."""
    result = []
    for event in log:
        if event[0] == "read":
            result.append((event[1], []))
        elif result:
            result[-1][1].append(event)
    return result


def segments(log):
    """The log as ordered ("pass", bytes) and ("message", ...) segments, like Reference."""
    result = []
    run = []
    for event in log:
        if event[0] == "write":
            run.append(event[1])
        elif event[0] == "message":
            if run:
                result.append(("pass", b"".join(run)))
                run = []
            result.append(event)
    if run:
        result.append(("pass", b"".join(run)))
    return result


# -- fragmentation ---------------------------------------------------------------------------


class Chunks(list):
    """The pieces a stream arrives in; failure reports show where it was cut."""

    def __repr__(self):
        cuts = []
        offset = 0
        for chunk in self[:-1]:
            offset += len(chunk)
            cuts.append(offset)
        shown = cuts if len(cuts) <= 8 else [*cuts[:8], "..."]
        return f"<{len(self)} chunks, cut at {shown}>"


def chunks_at(data, cuts):
    """Split data at the given offsets (any order, duplicates allowed)."""
    data = memoryview(data)
    bounds = [0, *sorted(cuts), len(data)]
    return Chunks(data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a)


def whole(data):
    yield chunks_at(data, [])


def every_two_chunk_split(data):
    for cut in range(1, len(data)):
        yield chunks_at(data, [cut])


def one_byte_at_a_time(data):
    yield chunks_at(data, range(1, len(data)))


FRAGMENTATIONS = pytest.mark.parametrize(
    "fragment",
    [whole, every_two_chunk_split, one_byte_at_a_time],
    ids=["whole", "every-two-chunk-split", "one-byte-at-a-time"],
)
PEER_BACKLOGS = pytest.mark.parametrize(
    "peer_backlog", [0, 1], ids=["peer-drained", "peer-backlogged"]
)
# Clients batch their output (what one read forwards goes out in one write, after the read).
BATCHING = pytest.mark.parametrize("batch_output", [False, True], ids=["unbatched", "batched"])


def random_cuts(length, max_cuts=40):
    return st.lists(st.integers(min_value=1, max_value=length - 1), max_size=max_cuts)


RANDOM_SPLITS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- streams ---------------------------------------------------------------------------------

SERVER_ACTIONS = action_table(PASS, S=INSPECT)
CLIENT_ACTIONS = action_table(PASS, X=INSPECT)
BIG_VALUE = bytes(range(256)) * 400  # 102,400 bytes


def copy_out_response(columns):
    return message(ord("H"), b"\0" + be16(columns) + be16(0) * columns)


# A realistic server -> client stream of several query cycles.
SERVER_STREAM = b"".join(
    [
        parameter_status("application_name", "bench"),
        row_description([("id", 23), ("name", 25)]),
        data_row([1, "one"]),
        data_row([2, None]),
        command_complete("SELECT 2"),
        ready_for_query("I"),
        command_complete("BEGIN"),
        ready_for_query("T"),
        error_response("NOTICE", "00000", "relation exists, skipping", notice=True),
        error_response("ERROR", "42P01", 'relation "missing" does not exist', hint="h"),
        ready_for_query("E"),
        command_complete("ROLLBACK"),
        parameter_status("TimeZone", "UTC"),
        ready_for_query("I"),
        row_description([("payload", 17)]),
        data_row([BIG_VALUE]),
        command_complete("SELECT 1"),
        ready_for_query("I"),
        copy_out_response(2),
        message(ord("d"), b"1\tone\n"),
        message(ord("d"), b"2\ttwo\n"),
        message(ord("c"), b""),
        command_complete("COPY 2"),
        ready_for_query("I"),
    ]
)
SERVER_REFERENCE = Reference(SERVER_STREAM, SERVER_ACTIONS)


def function_call(oid, *args):
    parts = [be32(oid), be16(0), be16(len(args))]
    for arg in args:
        parts += [be32(len(arg)), arg]
    return message(ord("F"), b"".join(parts) + be16(0))


# A realistic client -> server stream: simple and extended query, function call, COPY IN.
CLIENT_STREAM = b"".join(
    [
        query("SELECT 1"),
        message(ord("P"), b"\0SELECT $1::int\0" + be16(0)),
        message(ord("B"), b"\0\0" + be16(0) + be16(1) + be32(1) + b"7" + be16(0)),
        message(ord("D"), b"P\0"),
        message(ord("E"), b"\0" + be32(0)),
        message(ord("S"), b""),
        function_call(1598, b"\x00\x00\x00\x01"),
        message(ord("H"), b""),
        query("COPY t FROM STDIN"),
        message(ord("d"), b"x" * 20_000),
        message(ord("c"), b""),
        message(ord("E"), b"\0" + be32(0)),
        message(ord("S"), b""),
        query("SELECT '" + "q" * 3000 + "'"),
        message(ord("X"), b""),
    ]
)
CLIENT_REFERENCE = Reference(CLIENT_STREAM, CLIENT_ACTIONS)


# A response whose first message arrives while a relay is unlinked or held.
HELD_STREAM = data_row([b"r" * 3000]) + command_complete("SELECT 1") + ready_for_query("I")


def ssl_request():
    return be32(8) + be32(SSL_REQUEST_CODE)


def gssenc_request():
    return be32(8) + be32(GSSENC_REQUEST_CODE)


STARTUP = startup_message({"user": "alice", "database": "app", "application_name": "psql"})


# -- the compiled module ---------------------------------------------------------------------


def test_compiled_extension_is_loaded():
    assert codec.__file__.endswith(".so")


# -- server stream at any fragmentation ------------------------------------------------------


def relay_server_stream(chunks, peer_backlog, pending):
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS, peer_backlog)
    relay.pending = pending
    socket.receive_all(chunks)
    return relay, peer, log


def assert_relayed_like_reference(reference, log):
    """Bytes, order and timing of writes and callbacks match the reference, read by read.

    In each read: the bytes forwarded so far are all a prompt relay can forward; the callbacks
    are on_message for each INSPECT message completed by that read, in order, then one on_ready
    with the status of the last ReadyForQuery completed by that read, after everything else.
    """
    assert segments(log) == reference.segments
    offset = 0
    written = 0
    for size, during in reads(log):
        low, offset = offset, offset + size
        written += sum(len(event[1]) for event in during if event[0] == "write")
        assert written == reference.forwarded_len_by(offset), f"read ending at {offset}"
        completed = reference.completed_between(low, offset)
        expected = [("message", t, msg) for t, msg in completed if not reference.is_pass(t)]
        ready = [msg for t, msg in completed if t == Z]
        if ready:
            expected.append(("ready", ready[-1][5]))
            assert during[-1] == expected[-1], "on_ready comes after the read is processed"
        assert [event for event in during if event[0] != "write"] == expected


def check_server_stream(chunks, peer_backlog):
    reference = SERVER_REFERENCE
    ready = [msg for t, msg in reference.messages if t == Z]
    relay, peer, log = relay_server_stream(chunks, peer_backlog, pending=len(ready) + 1)

    assert_relayed_like_reference(reference, log)
    assert peer.forwarded() == reference.forwarded
    assert relay.pending == 1
    assert relay.ready_status == ord("I")
    assert relay.ready_count == len(ready)
    assert relay.idle_ready_count == sum(msg[5] == ord("I") for msg in ready)
    assert relay.rx_bytes == len(SERVER_STREAM)
    assert relay.tx_bytes == len(reference.forwarded)
    assert relay.buffered == 0
    if peer_backlog:
        peer.assert_lent_views_intact()


@pytest.mark.timeout(120)  # ~10^5 splits of a stream with a 100 kB row: seconds, not minutes
@PEER_BACKLOGS
@FRAGMENTATIONS
def test_server_stream_relayed_at_any_fragmentation(fragment, peer_backlog):
    for chunks in fragment(SERVER_STREAM):
        check_server_stream(chunks, peer_backlog)


@PEER_BACKLOGS
@RANDOM_SPLITS
@given(cuts=random_cuts(len(SERVER_STREAM)))
def test_server_stream_relayed_at_random_splits(peer_backlog, cuts):
    check_server_stream(chunks_at(SERVER_STREAM, cuts), peer_backlog)


def test_hold_in_on_message_pauses_until_resume():
    stream = command_complete("SET") + parameter_status("TimeZone", "UTC") + HELD_STREAM
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS, when_message=lambda r, t: r.hold())
    socket.receive(stream)
    assert segments(log) == [
        ("pass", command_complete("SET")),
        ("message", ord("S"), parameter_status("TimeZone", "UTC")),
    ]
    assert relay.buffered == len(HELD_STREAM)
    assert events(log, "ready") == []

    relay.resume()
    assert peer.forwarded() == command_complete("SET") + HELD_STREAM
    assert events(log, "ready") == [("ready", ord("I"))]


def test_pending_never_goes_below_zero():
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS)
    relay.pending = 1
    socket.receive(ready_for_query("I") + ready_for_query("I"))
    assert relay.pending == 0
    assert relay.ready_count == 2
    assert events(log, "ready") == [("ready", ord("I"))]


def test_ready_status_reports_transaction_state_per_read():
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS)
    for status in "TEI":
        socket.receive(command_complete("X") + ready_for_query(status))
        assert relay.ready_status == ord(status)
    assert events(log, "ready") == [("ready", ord(s)) for s in "TEI"]
    assert relay.idle_ready_count == 1


# -- client direction: request accounting ----------------------------------------------------


def check_client_stream(chunks, peer_backlog, batch_output=False):
    reference = CLIENT_REFERENCE
    server = RecordingRelay([])
    server.pending = 2
    relay, peer, socket, log = linked_relay(CLIENT_ACTIONS, peer_backlog)
    relay.batch_output = batch_output
    relay.request_sink = server
    socket.receive_all(chunks)

    requests = sum(t in b"QSF" for t, _ in reference.messages)
    assert requests == 6
    assert server.pending == 2 + requests
    assert relay.pending == 0
    assert peer.forwarded() == reference.forwarded
    assert events(log, "message") == [("message", ord("X"), message(ord("X"), b""))]
    if peer_backlog:
        peer.assert_lent_views_intact()


@BATCHING
@PEER_BACKLOGS
@FRAGMENTATIONS
def test_client_requests_counted_once_at_any_fragmentation(fragment, peer_backlog, batch_output):
    for chunks in fragment(CLIENT_STREAM):
        check_client_stream(chunks, peer_backlog, batch_output)


@BATCHING
@RANDOM_SPLITS
@given(cuts=random_cuts(len(CLIENT_STREAM)))
def test_client_requests_counted_once_at_random_splits(cuts, batch_output):
    check_client_stream(chunks_at(CLIENT_STREAM, cuts), peer_backlog=0, batch_output=batch_output)


def test_server_ready_answers_client_requests():
    server, _, server_socket, _ = linked_relay(SERVER_ACTIONS)
    client, _, client_socket, _ = linked_relay(CLIENT_ACTIONS)
    client.request_sink = server
    client_socket.receive(query("SELECT 1") + query("SELECT 2"))
    assert server.pending == 2
    server_socket.receive(command_complete("SELECT 1") + ready_for_query("I"))
    assert server.pending == 1
    server_socket.receive(command_complete("SELECT 1") + ready_for_query("I"))
    assert server.pending == 0


def test_unlink_output_detaches_request_sink():
    server = RecordingRelay([])
    client, _, socket, _ = linked_relay(CLIENT_ACTIONS)
    client.request_sink = server
    client.unlink_output()
    assert client.request_sink is None
    client.link_output(Peer([]))
    socket.receive(query("SELECT 1"))
    assert server.pending == 0


@BATCHING
@PEER_BACKLOGS
def test_reads_after_a_lent_run_never_land_on_it(peer_backlog, batch_output):
    """COPY FROM into a server that reads slowly: every read is one run of CopyData larger
    than a copy is made for, lent to the server's transport as a view. The next read must
    not be written over it, also when a client batches its output (the run is lent only
    after the read is scanned)."""
    relay, peer, socket, log = linked_relay(CLIENT_ACTIONS, peer_backlog)
    relay.batch_output = batch_output
    rows = [message(ord("d"), bytes([row]) * 5000) for row in range(1, 6)]
    for row in rows:
        socket.receive(row)
    assert peer.forwarded() == b"".join(rows)
    assert len(peer.views) == len(rows)
    if peer_backlog:
        peer.assert_lent_views_intact()


# -- streaming a large message ---------------------------------------------------------------

BUFFER_BOUND = 64 * 1024


@BATCHING
@PEER_BACKLOGS
@pytest.mark.parametrize("segment", [None, 1400], ids=["all-at-once", "1400-byte-segments"])
def test_large_message_streams_through_bounded_buffer(peer_backlog, segment, batch_output):
    payload = bytes(range(251)) * (5 * 1024 * 1024 // 251)
    stream = message(ord("d"), payload) + command_complete("COPY 1") + ready_for_query("I")
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS, peer_backlog)
    relay.buffer_size = 16384
    relay.batch_output = batch_output
    cuts = range(segment, len(stream), segment) if segment else []
    socket.receive_all(chunks_at(stream, cuts))

    assert peer.forwarded() == stream
    assert socket.largest_buffer <= BUFFER_BOUND
    assert max(len(chunk) for chunk in peer.snapshots) <= BUFFER_BOUND
    assert len(peer.snapshots) >= len(stream) // BUFFER_BOUND
    assert events(log, "ready") == [("ready", ord("I"))]
    assert relay.tx_bytes == relay.rx_bytes == len(stream)
    if peer_backlog:
        peer.assert_lent_views_intact()


def test_inspect_message_larger_than_buffer_is_delivered_whole():
    big = parameter_status("big", "v" * 50_000)
    stream = big + command_complete("SELECT 1")
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS)
    relay.buffer_size = 4096
    socket.receive_all(chunks_at(stream, range(1000, len(stream), 1000)))
    assert events(log, "message") == [("message", ord("S"), big)]
    assert peer.forwarded() == command_complete("SELECT 1")


class ClosingTransport(Peer):
    """The relay's own transport: counts close() calls."""

    def __init__(self, log):
        super().__init__(log)
        self.closes = 0

    def close(self):
        self.closes += 1
        self.log.append(("close",))


def test_terminate_closes_the_connection_after_what_came_before_at_any_split():
    """DISCONNECT (a client's Terminate): the query before it is forwarded, the connection is
    closed once, nothing after it is processed and Python never sees the message."""
    stream = query("SELECT 1") + message(ord("X"), b"") + query("SELECT 2")
    for cut in range(len(stream)):
        relay, peer, socket, log = linked_relay(action_table(REJECT, Q=PASS, X=DISCONNECT))
        own = ClosingTransport(log)
        relay.attach_transport(own)
        socket.receive_all([stream[:cut], stream[cut:]] if cut else [stream])
        assert peer.forwarded() == query("SELECT 1"), cut
        assert own.closes == 1 and relay.closed and relay.held, cut
        assert events(log, "message") == [] and events(log, "error") == [], cut
        assert [e for e in log if e[0] in ("write", "close")][-1] == ("close",), cut


def test_a_terminate_longer_than_max_inspect_is_an_error_not_a_close():
    relay, peer, socket, log = linked_relay(action_table(REJECT, Q=PASS, X=DISCONNECT))
    own = ClosingTransport(log)
    relay.attach_transport(own)
    relay.max_inspect = 64
    socket.receive(message(ord("X"), b"x" * 100))
    assert events(log, "error") == [("error", ERR_TOO_LONG, ord("X"))]
    assert own.closes == 0


def test_release_buffer_then_reuse():
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS)
    socket.receive(command_complete("SELECT 1"))
    relay.release_buffer()
    assert relay.buffered == 0
    socket.receive(ready_for_query("I"))
    assert peer.forwarded() == command_complete("SELECT 1") + ready_for_query("I")


# -- startup phase ---------------------------------------------------------------------------


def startup_relay(**hooks):
    """A relay in startup phase, linked so that any (wrong) forwarding would be seen."""
    relay, peer, socket, log = linked_relay(action_table(PASS), **hooks)
    relay.startup_phase = True
    return relay, peer, socket, log


STARTUP_PACKETS = ssl_request() + gssenc_request() + STARTUP + cancel_request(4242, 0x7FFF0001)


def check_startup_packets(chunks):
    relay, peer, socket, log = startup_relay()
    socket.receive_all(chunks)
    assert segments(log) == [("message", 0, p) for _, p in frame(STARTUP_PACKETS, True)]
    assert peer.snapshots == []
    assert relay.buffered == 0


@FRAGMENTATIONS
def test_startup_packets_delivered_whole(fragment):
    for chunks in fragment(STARTUP_PACKETS):
        check_startup_packets(chunks)


@RANDOM_SPLITS
@given(cuts=random_cuts(len(STARTUP_PACKETS)))
def test_startup_packets_delivered_whole_at_random_splits(cuts):
    check_startup_packets(chunks_at(STARTUP_PACKETS, cuts))


@pytest.mark.parametrize("request_packet", [ssl_request(), gssenc_request()], ids=["ssl", "gssenc"])
def test_a_client_with_no_tls_to_offer_is_told_no_by_the_codec(request_packet):
    """refuse_encryption: 'N' goes to the client's own transport, Python never sees the
    request (split anywhere); the startup packet after it goes to Python as before."""
    for cut in range(len(request_packet)):
        relay, peer, socket, log = startup_relay()
        answers = Peer([])
        relay.attach_transport(answers)
        relay.refuse_encryption = True
        socket.receive_all([request_packet[:cut], request_packet[cut:]])
        assert answers.snapshots == [b"N"]
        socket.receive(STARTUP)
        assert events(log, "message") == [("message", 0, STARTUP)]
        assert peer.snapshots == [] and relay.buffered == 0


def test_bytes_after_an_encryption_request_leave_it_to_python():
    """Sent before the answer, they could be taken for encrypted data later
    (CVE-2021-23222): the codec answers nothing and Python sees the request (and refuses)."""
    relay, peer, socket, log = startup_relay(when_message=lambda r, t: r.hold())
    answers = Peer([])
    relay.attach_transport(answers)
    relay.refuse_encryption = True
    socket.receive(ssl_request() + STARTUP)
    assert answers.snapshots == []
    assert events(log, "message") == [("message", 0, ssl_request())]


TLS_CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))


def check_leftover_stays_buffered(chunks, packet, leftover):
    relay, peer, socket, log = startup_relay(when_message=lambda r, t: r.hold())
    socket.receive_all(chunks)
    assert events(log, "message") == [("message", 0, packet)]
    assert events(log, "error") == []
    assert relay.buffered == len(leftover)
    assert relay.take_buffered() == leftover
    assert relay.buffered == 0
    assert peer.snapshots == []


@FRAGMENTATIONS
@pytest.mark.parametrize(
    "packet, leftover",
    [
        (ssl_request(), TLS_CLIENT_HELLO_START),
        (STARTUP, query("SELECT 1") + message(ord("X"), b"")),
    ],
    ids=["tls-hello-after-ssl-request", "query-after-startup-message"],
)
def test_bytes_after_startup_packet_stay_buffered_when_held(fragment, packet, leftover):
    for chunks in fragment(packet + leftover):
        check_leftover_stays_buffered(chunks, packet, leftover)


def test_startup_then_typed_messages_in_the_same_read():
    def end_startup(relay, msg_type):
        relay.startup_phase = False

    relay, peer, socket, log = startup_relay(when_message=end_startup)
    relay.request_sink = server = RecordingRelay([])
    socket.receive(STARTUP + query("SELECT 1"))
    assert segments(log) == [("message", 0, STARTUP), ("pass", query("SELECT 1"))]
    assert server.pending == 1


# -- unlinked --------------------------------------------------------------------------------


def unlinked_relay(peer_backlog=0, **hooks):
    """A relay whose output is unlinked; its former peer is returned for linking later."""
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS, peer_backlog, **hooks)
    relay.unlink_output()
    return relay, peer, socket, log


def check_held_then_resumed(chunks, peer_backlog):
    relay, peer, socket, log = unlinked_relay(peer_backlog, when_unlinked=lambda r, t: r.hold())
    socket.receive_all(chunks)
    assert events(log, "unlinked") == [("unlinked", ord("D"))]
    assert peer.snapshots == []
    assert relay.buffered == len(HELD_STREAM)

    relay.link_output(peer)
    relay.resume()
    assert peer.snapshots == [HELD_STREAM]
    assert events(log, "ready") == [("ready", ord("I"))]
    assert relay.buffered == 0
    if peer_backlog:
        peer.assert_lent_views_intact()


@PEER_BACKLOGS
@FRAGMENTATIONS
def test_held_unlinked_message_forwarded_whole_after_link_and_resume(fragment, peer_backlog):
    for chunks in fragment(HELD_STREAM):
        check_held_then_resumed(chunks, peer_backlog)


def test_held_unlinked_message_resumed_mid_message_streams_the_rest():
    relay, peer, socket, log = unlinked_relay(when_unlinked=lambda r, t: r.hold())
    socket.receive(HELD_STREAM[:100])
    relay.link_output(peer)
    relay.resume()
    socket.receive(HELD_STREAM[100:])
    assert peer.forwarded() == HELD_STREAM
    assert events(log, "unlinked") == [("unlinked", ord("D"))]


def test_unlinked_callback_may_link_and_continue():
    relay, peer, socket, log = unlinked_relay()
    relay.when_unlinked = lambda r, t: r.link_output(peer)
    socket.receive(HELD_STREAM)
    assert events(log, "unlinked") == [("unlinked", ord("D"))]
    assert peer.snapshots == [HELD_STREAM]


def link_on_second_unlinked(peer):
    """on_unlinked hook: drop the first message (return without linking), link on the next."""

    def hook(relay, msg_type):
        if len(events(relay.log, "unlinked")) > 1:
            relay.link_output(peer)

    return hook


AFTER_DROPPED = command_complete("SELECT 1") + ready_for_query("I")


def check_dropped(chunks, peer_backlog, buffer_size):
    """The first message (larger than the buffer) is dropped, the rest forwarded."""
    relay, peer, socket, log = unlinked_relay(peer_backlog)
    relay.buffer_size = buffer_size
    relay.when_unlinked = link_on_second_unlinked(peer)
    socket.receive_all(chunks)
    assert events(log, "unlinked") == [("unlinked", ord("D")), ("unlinked", ord("C"))]
    assert peer.forwarded() == AFTER_DROPPED
    assert events(log, "ready") == [("ready", ord("I"))]
    assert relay.tx_bytes == len(AFTER_DROPPED)
    assert relay.buffered == 0


@PEER_BACKLOGS
@FRAGMENTATIONS
def test_streamed_unlinked_message_dropped_when_callback_does_not_link(fragment, peer_backlog):
    for chunks in fragment(data_row([b"x" * 6000]) + AFTER_DROPPED):
        check_dropped(chunks, peer_backlog, buffer_size=4096)


@PEER_BACKLOGS
@RANDOM_SPLITS
@given(cuts=random_cuts(len(data_row([BIG_VALUE]) + AFTER_DROPPED)))
def test_large_unlinked_message_dropped_at_random_splits(peer_backlog, cuts):
    check_dropped(chunks_at(data_row([BIG_VALUE]) + AFTER_DROPPED, cuts), peer_backlog, 16384)


def test_take_buffered_inside_on_unlinked_leaves_relay_consistent():
    """Handing the unread bytes elsewhere from on_unlinked must not corrupt the framing."""
    relay, peer, socket, log = unlinked_relay()
    relay.when_unlinked = lambda r, t: r.log.append(("taken", r.take_buffered()))
    socket.receive(query("SELECT 1"))
    assert events(log, "taken") == [("taken", query("SELECT 1"))]
    assert relay.buffered == 0

    relay.link_output(peer)
    socket.receive(query("SELECT 2"))
    assert peer.forwarded() == query("SELECT 2")


def relink_with_link_output(server, client, peer):
    server.unlink_output()
    server.link_output(peer)


def relink_with_link_pair(server, client, peer):
    codec.unlink_pair(client, server, SERVER_ACTIONS)
    client.attach_transport(peer)
    codec.link_pair(client, server, SERVER_ACTIONS, True)


@pytest.mark.parametrize(
    "relink", [relink_with_link_output, relink_with_link_pair], ids=["link_output", "link_pair"]
)
def test_views_lent_to_a_previous_peer_survive_relinking(relink):
    """A server relay moves from a slow client (views still queued) to a fast one."""
    log = []
    server = RecordingRelay(log)
    server.attach_transport(Peer([]))
    slow_peer = Peer(log, backlog=1)
    client = RecordingRelay([])
    client.attach_transport(slow_peer)
    codec.link_pair(client, server, SERVER_ACTIONS, True)
    socket = Socket(server, log)
    socket.receive(data_row([b"A" * 5000]) + command_complete("SELECT 1") + ready_for_query("I"))

    relink(server, RecordingRelay([]), Peer(log, backlog=0))
    for _ in range(10):
        socket.receive(data_row([b"B" * 5000]))
    slow_peer.assert_lent_views_intact()


# -- pairing and flow control ----------------------------------------------------------------


def test_link_pair_forwards_both_ways_and_counts_requests():
    client_log, server_log = [], []
    client, server = RecordingRelay(client_log), RecordingRelay(server_log)
    client_peer, server_peer = Peer(client_log), Peer(server_log)
    client.attach_transport(client_peer)
    server.attach_transport(server_peer)
    codec.link_pair(client, server, SERVER_ACTIONS, True)

    Socket(client, client_log).receive(query("SELECT 1"))
    assert server_peer.forwarded() == query("SELECT 1")
    assert server.pending == 1
    Socket(server, server_log).receive(
        parameter_status("a", "b") + command_complete("SELECT 1") + ready_for_query("I")
    )
    assert client_peer.forwarded() == command_complete("SELECT 1") + ready_for_query("I")
    assert events(server_log, "message") == [("message", ord("S"), parameter_status("a", "b"))]
    assert events(server_log, "ready") == [("ready", ord("I"))]
    assert server.pending == 0


def test_unlink_pair_unlinks_both_and_installs_idle_actions():
    log = []
    client, server = RecordingRelay([]), RecordingRelay(log)
    client.attach_transport(Peer([]))
    server.attach_transport(Peer([]))
    codec.link_pair(client, server, SERVER_ACTIONS, True)
    codec.unlink_pair(client, server, action_table(REJECT, S=INSPECT))
    assert client.writer is None and server.writer is None
    assert client.request_sink is None

    Socket(server, log).receive(parameter_status("a", "b") + command_complete("X"))
    assert [event for event in log if event[0] != "read"] == [
        ("message", ord("S"), parameter_status("a", "b")),
        ("error", ERR_TYPE, ord("C")),
    ]


def test_link_pair_without_ready_notification():
    log = []
    client, server = RecordingRelay([]), RecordingRelay(log)
    client.attach_transport(Peer([]))
    server.attach_transport(Peer([]))
    codec.link_pair(client, server, SERVER_ACTIONS, False)
    Socket(server, log).receive(command_complete("SELECT 1") + ready_for_query("T"))
    assert events(log, "ready") == []
    assert server.ready_status == ord("T")
    assert server.ready_count == 1


def test_backlog_reported_while_held_past_buffer_size():
    relay, peer, socket, log = unlinked_relay(when_unlinked=lambda r, t: r.hold())
    relay.buffer_size = 4096
    relay.on_backlog = lambda: log.append(("backlog",))
    socket.receive(data_row([b"x" * 4000]))
    assert events(log, "backlog") == []
    socket.receive(data_row([b"y" * 200]))
    assert events(log, "backlog") != []
    assert peer.snapshots == []


# -- malformed input -------------------------------------------------------------------------

TYPED_PREFIX = command_complete("SELECT 1") + data_row([1, None])
TYPED_TRAILER = command_complete("SELECT 2") + ready_for_query("I")


def limit(name, value):
    def configure(relay):
        setattr(relay, name, value)

    return configure


def reject_copy_in(relay):
    relay.set_actions(action_table(PASS, S=INSPECT, G=REJECT))


TYPED_MALFORMED = [
    ("length-below-4", None, b"D" + be32(3), ERR_LENGTH, "D"),
    ("length-zero", None, b"C" + be32(0), ERR_LENGTH, "C"),
    ("negative-length", None, b"D" + be32(0x80000000), ERR_LENGTH, "D"),
    ("length-ffffffff", None, b"D" + be32(0xFFFFFFFF), ERR_LENGTH, "D"),
    ("over-max-packet", limit("max_packet", 8192), b"D" + be32(8193), ERR_TOO_LONG, "D"),
    (
        "inspect-over-max-inspect",
        limit("max_inspect", 64),
        parameter_status("x", "y" * 60),
        ERR_TOO_LONG,
        "S",
    ),
    ("rejected-type", reject_copy_in, message(ord("G"), b"\0" + be16(0)), ERR_TYPE, "G"),
    ("ready-for-query-length-6", None, b"Z" + be32(6) + b"II", ERR_LENGTH, "Z"),
]


def check_malformed_typed(chunks, configure, code, msg_type):
    """Everything before the bad message is forwarded once; one error; then nothing."""
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS)
    if configure:
        configure(relay)
    socket.receive_all(chunks)
    socket.receive(TYPED_TRAILER)
    assert frame(peer.forwarded()) == frame(TYPED_PREFIX)
    assert events(log, "error") == [("error", code, ord(msg_type))]
    after_error = log[log.index(events(log, "error")[0]) + 1 :]
    assert [event for event in after_error if event[0] != "read"] == []


@FRAGMENTATIONS
@pytest.mark.parametrize(
    "configure, bad, code, msg_type",
    [case[1:] for case in TYPED_MALFORMED],
    ids=[case[0] for case in TYPED_MALFORMED],
)
def test_malformed_typed_message_reported_once(fragment, configure, bad, code, msg_type):
    for chunks in fragment(TYPED_PREFIX + bad + TYPED_TRAILER):
        check_malformed_typed(chunks, configure, code, msg_type)


def test_limits_are_inclusive():
    relay, peer, socket, log = linked_relay(SERVER_ACTIONS)
    at_inspect_limit = parameter_status("x", "y" * 60)
    relay.max_inspect = len(at_inspect_limit)
    at_packet_limit = data_row([b"z" * 100])
    relay.max_packet = len(at_packet_limit) - 1
    socket.receive(at_inspect_limit + at_packet_limit)
    assert events(log, "error") == []
    assert events(log, "message") == [("message", ord("S"), at_inspect_limit)]
    assert peer.forwarded() == at_packet_limit


STARTUP_MALFORMED = [
    ("length-4", be32(4) + be32(196608), ERR_LENGTH),
    ("length-7", be32(7) + b"\0\3\0", ERR_LENGTH),
    ("length-over-startup-max", be32(STARTUP_MAX + 1) + be32(196608), ERR_TOO_LONG),
]


def check_malformed_startup(chunks, code):
    relay, peer, socket, log = startup_relay()
    socket.receive_all(chunks)
    socket.receive(STARTUP)
    assert [event for event in log if event[0] != "read"] == [
        ("message", 0, ssl_request()),
        ("error", code, 0),
    ]
    assert peer.snapshots == []


@FRAGMENTATIONS
@pytest.mark.parametrize(
    "bad, code", [case[1:] for case in STARTUP_MALFORMED], ids=[c[0] for c in STARTUP_MALFORMED]
)
def test_malformed_startup_packet_reported_once(fragment, bad, code):
    for chunks in fragment(ssl_request() + bad + STARTUP):
        check_malformed_startup(chunks, code)


def test_startup_packet_at_startup_max_accepted():
    packet = be32(STARTUP_MAX) + be32(196608) + b"\0" * (STARTUP_MAX - 8)
    relay, peer, socket, log = startup_relay()
    socket.receive(packet)
    assert events(log, "message") == [("message", 0, packet)]


def test_startup_negative_length_rejected():
    relay, peer, socket, log = startup_relay()
    socket.receive(be32(0x80000000) + be32(196608) + STARTUP)
    errors = events(log, "error")
    assert len(errors) == 1 and errors[0][2] == 0
    assert errors[0][1] in (ERR_LENGTH, ERR_TOO_LONG)
    assert events(log, "message") == []


# -- builders --------------------------------------------------------------------------------


def test_error_response_fields():
    msg = error_response("ERROR", "42P01", "no such table", detail="the detail", hint="the hint")
    assert frame(msg) == [(ord("E"), msg)]
    assert error_fields(msg) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42P01",
        "M": "no such table",
        "D": "the detail",
        "H": "the hint",
    }
    assert list(error_fields(msg)) == ["S", "V", "C", "M", "D", "H"]


def test_notice_response_without_optional_fields():
    msg = error_response("WARNING", "01000", "careful", notice=True)
    assert msg[0] == ord("N")
    assert error_fields(msg) == {"S": "WARNING", "V": "WARNING", "C": "01000", "M": "careful"}


def test_data_row_values_and_null():
    msg = data_row([42, None, b"\x00raw", "é", ""])
    raw = body(msg)
    assert msg[0] == ord("D")
    assert struct.unpack_from("!H", raw)[0] == 5
    pos, values = 2, []
    for _ in range(5):
        (length,) = struct.unpack_from("!i", raw, pos)
        pos += 4
        if length == -1:
            values.append(None)
        else:
            values.append(raw[pos : pos + length])
            pos += length
    assert pos == len(raw)
    assert values == [b"42", None, b"\x00raw", "é".encode(), b""]


def test_row_description_columns():
    msg = row_description([("id", 23), ("name", 25), ("big", 0xFFFFFFFF)])
    raw = body(msg)
    assert msg[0] == ord("T")
    assert struct.unpack_from("!H", raw)[0] == 3
    pos, columns = 2, []
    for _ in range(3):
        nul = raw.index(b"\0", pos)
        name = raw[pos:nul].decode()
        table, attnum, oid, typlen, typmod, fmt = struct.unpack_from("!IhIhih", raw, nul + 1)
        assert (table, attnum, typlen, typmod, fmt) == (0, 0, -1, -1, 0)
        columns.append((name, oid))
        pos = nul + 1 + 18
    assert pos == len(raw)
    assert columns == [("id", 23), ("name", 25), ("big", 0xFFFFFFFF)]


def test_startup_message_parameters():
    params = {"user": "alice", "database": "app", "options": "-c x=1"}
    msg = startup_message(params)
    assert frame(msg, startup=True) == [(0, msg)]
    assert struct.unpack_from("!I", msg, 4)[0] == 196608
    pairs = split_cstrings(msg[8:])
    expected = {name.encode(): value.encode() for name, value in params.items()}
    assert dict(zip(pairs[::2], pairs[1::2])) == expected
    assert struct.unpack_from("!I", startup_message({}, 196610), 4)[0] == 196610


def test_simple_builders():
    assert message(ord("C"), b"X\0") == b"C" + be32(6) + b"X\0"
    assert ready_for_query("T") == b"Z" + be32(5) + b"T"
    assert ready_for_query(ord("E")) == b"Z" + be32(5) + b"E"
    assert command_complete("SELECT 1") == b"C" + be32(13) + b"SELECT 1\0"
    assert parameter_status("a", "b") == b"S" + be32(8) + b"a\0b\0"
    assert query("SELECT 1") == b"Q" + be32(13) + b"SELECT 1\0"
    assert codec.terminate() == b"X" + be32(4)
    assert codec.empty_query_response() == b"I" + be32(4)
    assert codec.authentication(0) == b"R" + be32(8) + be32(0)
    assert codec.authentication(5, b"salt") == b"R" + be32(12) + be32(5) + b"salt"
    assert body(codec.auth_sasl(["SCRAM-SHA-256"])) == be32(10) + b"SCRAM-SHA-256\0\0"
    assert codec.password_message(b"md5abc\0") == b"p" + be32(11) + b"md5abc\0"
    assert body(codec.sasl_initial_response("SCRAM-SHA-256", b"n,,")) == (
        b"SCRAM-SHA-256\0" + be32(3) + b"n,,"
    )


def test_built_messages_frame_as_one_stream():
    built = [
        error_response("FATAL", "28P01", "password authentication failed"),
        row_description([("a", 23)]),
        data_row([None]),
        command_complete("SELECT 1"),
        ready_for_query("I"),
    ]
    assert frame(b"".join(built)) == [(m[0], m) for m in built]


def test_action_table():
    table = action_table(REJECT, Q=PASS, X=INSPECT)
    assert len(table) == 256
    assert table[ord("Q")] == PASS
    assert table[ord("X")] == INSPECT
    assert table.count(REJECT) == 254
    assert action_table() == bytes([PASS]) * 256


def test_set_actions_requires_256_entries():
    with pytest.raises(ValueError):
        Relay().set_actions(b"\0" * 255)
