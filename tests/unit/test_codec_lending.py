"""The codec lends views of its read buffer to transports instead of copying large runs.

A transport that cannot write at once keeps the view until it drains, so no later read,
compaction or rewind may touch those bytes before then (the COPY corruption fixed in
897afd7 broke exactly this). Here a relay is driven by random mixes of reads of any size,
backlogged and draining transports, holds, relinks and buffer releases, with and without
batched output, and checked against the stream it was given: every view a transport still
holds is unchanged, and everything written, in order, is the stream.
"""

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec_feed import feed
from pgmulti._codec import PASS, Relay, action_table, message

PASS_ALL = action_table(PASS)
# Around the copy threshold (2048) and the buffer sizes used, and past one socket read.
PAYLOAD_SIZES = [0, 7, 300, 2043, 2044, 2100, 3000, 5000, 9000, 16379, 40000, 70000]


class Transport:
    """What the codec sees of a uvloop transport: while backlogged it keeps what it is
    given (as uvloop keeps a memoryview it could not send) until drained."""

    def __init__(self, written: list):
        self.written = written  # every transport's writes, in order
        self.backlogged = False
        self.kept: list[tuple[object, bytes]] = []

    def write(self, data) -> None:
        snapshot = bytes(data)
        self.written.append(snapshot)
        if self.backlogged:
            self.kept.append((data, snapshot))

    def writelines(self, pieces) -> None:
        for piece in pieces:
            self.write(piece)

    def get_write_buffer_size(self) -> int:
        return sum(len(snapshot) for _, snapshot in self.kept)

    def check_kept(self) -> None:
        for index, (view, snapshot) in enumerate(self.kept):
            assert bytes(view) == snapshot, f"kept write #{index} changed before it was sent"

    def drain(self) -> None:
        self.check_kept()
        self.kept.clear()
        self.backlogged = False


def stream_of(sizes: list[int]) -> tuple[bytes, list[int]]:
    """CopyData messages, each with its own byte pattern (a shifted or overwritten byte shows),
    and the offset where each ends."""
    messages = [message(ord("d"), bytes((index * 7 + k) % 251 for k in range(size)))
                for index, size in enumerate(sizes)]
    ends = list(itertools.accumulate(len(m) for m in messages))
    return b"".join(messages), ends


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(min_value=1, max_value=80_000)),
        # Clients send whole messages: reads often end where a message does.
        st.tuples(st.just("read messages"), st.integers(min_value=1, max_value=3)),
        st.tuples(st.sampled_from(["backlog", "drain", "hold", "resume", "relink", "release"])),
    ),
    max_size=60,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.sampled_from(PAYLOAD_SIZES), min_size=1, max_size=25),
       operations=OPERATIONS,
       batch_output=st.booleans(),
       backlogged=st.booleans(),
       buffer_size=st.sampled_from([4096, 16384]))
def test_views_a_transport_keeps_are_never_written_over(sizes, operations, batch_output,
                                                        backlogged, buffer_size):
    stream, ends = stream_of(sizes)
    written: list[bytes] = []
    transports = [Transport(written)]
    transports[0].backlogged = backlogged
    relay = Relay()
    relay.set_actions(PASS_ALL)
    relay.batch_output = batch_output
    relay.buffer_size = buffer_size
    relay.link_output(transports[0])
    position = 0

    def read(count: int) -> None:
        """Bytes arriving: read as uvloop does, as much as each buffer it is given takes."""
        nonlocal position
        end = min(len(stream), position + count)
        feed(relay, stream[position:end])
        position = end

    for operation in operations:
        kind = operation[0]
        current = transports[-1]
        if kind == "read":
            read(operation[1])
        elif kind == "read messages":
            whole = [end for end in ends if end > position]
            if whole:
                read(whole[min(operation[1], len(whole)) - 1] - position)
        elif kind == "backlog":
            current.backlogged = True
        elif kind == "drain":
            current.drain()
        elif kind == "hold":
            relay.hold()
        elif kind == "resume":
            relay.resume()
        elif kind == "relink":
            # The old transport may keep its views for as long as it likes.
            relay.unlink_output()
            transports.append(Transport(written))
            relay.link_output(transports[-1])
        elif kind == "release":
            relay.release_buffer()
        for transport in transports:
            transport.check_kept()

    relay.resume()
    read(len(stream))
    for transport in transports:
        transport.check_kept()
    assert b"".join(written) == stream
    assert relay.buffered == 0
