"""DirectIO on real sockets and a real uvloop loop: two relays linked to each other, each on
one end of a socketpair, switch to direct I/O and forward what their far ends send.

Another pauses a relay while the batch that paused it still holds its readiness. One closes
a relay's transport behind the codec's back (as a transport that meets a write error does,
before connection_lost) and opens a new socket that takes the closed descriptor number:
bytes for the closed connection must not reach the new one.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from pgmulti._codec import INSPECT, DirectIO, Relay, action_table, link_pair
from support import recv_exactly

FORWARD_ALL = action_table()
RECEIVE_TIMEOUT_S = 2.0


class Side(Relay, asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.attach_transport(transport)

    def connection_lost(self, exc):
        pass  # deliberately no stop_direct_io(): the test plays a missed notification


def message(body: bytes) -> bytes:
    return b"d" + (len(body) + 4).to_bytes(4, "big") + body


class PausingSide(Side):
    """Takes 'p' messages itself: each pauses the reading of `other`."""
    other: Relay | None = None

    def on_message(self, msg_type, view):
        self.other.pause_reading()


async def linked_direct_pair(loop, io, protocol_a=Side):
    """Relays on the near ends of two socketpairs, linked and direct; the far ends."""
    near_a, far_a = socket.socketpair()
    near_b, far_b = socket.socketpair()
    far_a.settimeout(RECEIVE_TIMEOUT_S)
    far_b.settimeout(RECEIVE_TIMEOUT_S)
    _, a = await loop.connect_accepted_socket(protocol_a, near_a)
    _, b = await loop.connect_accepted_socket(Side, near_b)
    link_pair(a, b, FORWARD_ALL, False)
    a.enable_direct_io(io, 1)
    b.enable_direct_io(io, 1)
    # One read through each transport switches that side to direct I/O.
    far_a.sendall(message(b"a1"))
    assert await loop.run_in_executor(None, recv_exactly, far_b, 7) == message(b"a1")
    far_b.sendall(message(b"b1"))
    assert await loop.run_in_executor(None, recv_exactly, far_a, 7) == message(b"b1")
    return a, b, far_a, far_b


def run(coro_factory):
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(coro_factory(loop))
    finally:
        loop.close()


def test_linked_direct_relays_forward_both_ways():
    async def main(loop):
        io = DirectIO(loop)
        a, b, far_a, far_b = await linked_direct_pair(loop, io)
        assert io.counters()["sockets"] == 2
        for n in range(50):
            far_a.sendall(message(b"q%d" % n))
            assert await loop.run_in_executor(None, recv_exactly, far_b, len(message(b"q%d" % n))) \
                == message(b"q%d" % n)
            far_b.sendall(message(b"r%d" % n) * 3)
            assert await loop.run_in_executor(None, recv_exactly, far_a, 3 * len(message(b"r%d" % n))) \
                == message(b"r%d" % n) * 3
        counters = io.counters()
        assert counters["reads"] >= 100 and counters["sends"] >= 100
        a.stop_direct_io()
        b.stop_direct_io()
        assert io.counters()["sockets"] == 0
        io.close()
        far_a.close()
        far_b.close()
    run(main)


def test_a_relay_paused_during_a_batch_reads_nothing_until_resumed():
    async def main(loop):
        io = DirectIO(loop)
        a, b, far_a, far_b = await linked_direct_pair(loop, io, PausingSide)
        a.set_actions(action_table(p=INSPECT))
        a.other = b
        # Both sockets are ready before the loop polls again: one batch, a's event first
        # (epoll lists them in the order they became ready), so b's is still to come when
        # a pauses b.
        far_a.sendall(b"p\0\0\0\4")
        far_b.sendall(message(b"held"))
        await asyncio.sleep(0.1)
        assert b.buffered == 0 and io.counters()["sockets"] == 1
        far_a.setblocking(False)
        with pytest.raises(BlockingIOError):
            far_a.recv(100)  # b forwarded nothing
        far_a.settimeout(RECEIVE_TIMEOUT_S)
        b.resume_reading()
        assert await loop.run_in_executor(None, recv_exactly, far_a, 9) == message(b"held")
        a.stop_direct_io()
        b.stop_direct_io()
        io.close()
        far_a.close()
        far_b.close()
    run(main)


def test_a_reused_descriptor_number_never_gets_a_closed_peers_bytes():
    async def main(loop):
        io = DirectIO(loop)
        a, b, far_a, far_b = await linked_direct_pair(loop, io)
        closed_number = b.transport.get_extra_info("socket").fileno()
        b.transport.close()
        await asyncio.sleep(0.05)  # uvloop closes its descriptor
        newcomer, newcomer_far = socket.socketpair()
        if closed_number not in (newcomer.fileno(), newcomer_far.fileno()):
            pytest.skip("the closed descriptor number was not reused")
        far_a.sendall(message(b"for b only"))
        # b's bytes go to b's socket (still open through the codec's dup), nowhere else.
        assert await loop.run_in_executor(None, recv_exactly, far_b, 15) == message(b"for b only")
        for sock in (newcomer, newcomer_far):
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(100)
        a.stop_direct_io()
        b.stop_direct_io()
        io.close()
        for sock in (far_a, far_b, newcomer, newcomer_far):
            sock.close()
    run(main)
