"""SocketTransport and Acceptor on real sockets and a real uvloop loop: accepted connections
become transports of the codec's own, with asyncio's transport contract (ordering, flow
control, close after the last byte, abort, end of input, failures reported once)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
import uvloop

from pgmulti._codec import INSPECT, Acceptor, DirectIO, Relay, action_table

TIMEOUT_S = 5.0


class Recorder(asyncio.BufferedProtocol):
    """A plain BufferedProtocol (the codec reads it through get_buffer/buffer_updated)."""

    def __init__(self):
        self.transport = None
        self.received = bytearray()
        self.events: list[str] = []
        self.lost = asyncio.get_running_loop().create_future()
        self.on_data = None
        self._buffer = bytearray(4096)

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def get_buffer(self, sizehint):
        return self._buffer

    def buffer_updated(self, nbytes):
        self.received += self._buffer[:nbytes]
        if self.on_data is not None:
            self.on_data(self)

    def eof_received(self):
        self.events.append("eof")

    def pause_writing(self):
        self.events.append("pause_writing")

    def resume_writing(self):
        self.events.append("resume_writing")

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost.set_result(exc)


class Server:
    """A listening socket served by an Acceptor; `accepted` gets each new protocol."""

    def __init__(self, loop, family=socket.AF_INET, protocol=Recorder, path=None):
        self.loop = loop
        self.io = DirectIO(loop)
        self.errors: list[OSError] = []
        self.accepted: asyncio.Queue = asyncio.Queue()
        if family == socket.AF_UNIX:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(path)
        else:
            self.sock = socket.socket(family)
            self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)

        def make():
            protocol_object = protocol()
            self.accepted.put_nowait(protocol_object)
            return protocol_object

        self.acceptor = Acceptor(self.sock, make, self.io, self.errors.append)
        self.acceptor.start()

    async def connect(self):
        """A blocking client socket (used from executor threads) and its server protocol."""
        client = socket.socket(self.sock.family)
        client.settimeout(TIMEOUT_S)
        await self.loop.run_in_executor(None, client.connect, self.sock.getsockname())
        protocol_object = await asyncio.wait_for(self.accepted.get(), TIMEOUT_S)
        return client, protocol_object

    def close(self):
        self.acceptor.close()
        self.io.close()


def run(test):
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(test(loop), 30))
    finally:
        loop.close()


def with_connection(test, **server_options):
    """Run `test(loop, client, protocol)` on one connection accepted by a fresh Server."""
    async def body(loop):
        server = Server(loop, **server_options)
        client, protocol_object = await server.connect()
        try:
            await test(loop, client, protocol_object)
        finally:
            client.close()
            server.close()
    run(body)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def pattern(size: int) -> bytes:
    """Bytes whose every 8-byte word is its own index: a byte lost, doubled or reordered
    shows."""
    return b"".join(struct.pack("!Q", i) for i in range(size // 8))


async def until(condition, what: str):
    for _ in range(int(TIMEOUT_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_connection_reads_writes_and_ends_like_an_asyncio_transport():
    async def test(loop, client, protocol_object):
        transport = protocol_object.transport
        assert transport.get_extra_info("peername") == client.getsockname()
        assert transport.get_extra_info("sockname") == client.getpeername()
        sock = transport.get_extra_info("socket")
        assert sock.fileno() >= 0 and sock.getpeername() == client.getsockname()

        client.sendall(b"hello")
        await until(lambda: protocol_object.received == b"hello", "the bytes sent")
        transport.write(b"one ")
        transport.writelines([b"two ", memoryview(b"three")])
        assert await loop.run_in_executor(None, client.recv, 100) == b"one two three"

        client.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(protocol_object.lost, TIMEOUT_S) is None
        assert protocol_object.events == ["made", "eof", "lost"]
        assert transport.is_closing() and sock.fileno() == -1
        # The address outlives the socket (logs of a closed connection name it).
        assert transport.get_extra_info("peername") == client.getsockname()
        assert await loop.run_in_executor(None, client.recv, 100) == b""
        transport.write(b"ignored")  # after the connection is gone, as asyncio does
    with_connection(test)


def test_a_full_socket_queues_pauses_the_writer_and_close_sends_everything_first():
    async def test(loop, client, protocol_object):
        transport = protocol_object.transport
        data = pattern(8 << 20)
        transport.write(data[:1 << 20])
        transport.write(memoryview(data)[1 << 20:])
        assert transport.get_write_buffer_size() > 0
        assert protocol_object.events == ["made", "pause_writing"]
        transport.close()
        assert transport.is_closing() and not transport.is_reading()
        received = await loop.run_in_executor(None, recv_all, client)
        assert received == data
        assert await asyncio.wait_for(protocol_object.lost, TIMEOUT_S) is None
        assert protocol_object.events == ["made", "pause_writing", "resume_writing", "lost"]
    with_connection(test)


def test_write_buffer_limits_follow_asyncio():
    async def test(loop, client, protocol_object):
        transport = protocol_object.transport
        assert transport.get_write_buffer_limits() == (16384, 65536)
        transport.set_write_buffer_limits(high=1000)
        assert transport.get_write_buffer_limits() == (250, 1000)
        transport.set_write_buffer_limits(low=10)
        assert transport.get_write_buffer_limits() == (10, 40)
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=1, low=2)
        transport.set_write_buffer_limits(0)  # what direct I/O asks for: pause on any backlog
        transport.write(pattern(8 << 20))
        assert protocol_object.events[-1] == "pause_writing"
        transport.close()
        await loop.run_in_executor(None, recv_all, client)
        await asyncio.wait_for(protocol_object.lost, TIMEOUT_S)
    with_connection(test)


def test_abort_drops_what_waits_and_closes_at_once():
    async def test(loop, client, protocol_object):
        transport = protocol_object.transport
        data = pattern(8 << 20)
        transport.write(data)
        transport.abort()
        assert await asyncio.wait_for(protocol_object.lost, TIMEOUT_S) is None
        try:
            received = await loop.run_in_executor(None, recv_all, client)
        except ConnectionResetError:
            received = b""
        assert len(received) < len(data)
    with_connection(test)


def test_paused_reading_reads_nothing_until_resumed():
    async def test(loop, client, protocol_object):
        transport = protocol_object.transport
        transport.pause_reading()
        assert not transport.is_reading()
        client.sendall(b"waits")
        await asyncio.sleep(0.2)
        assert protocol_object.received == b""
        transport.resume_reading()
        await until(lambda: protocol_object.received == b"waits", "the bytes after resume")
        transport.close()
        await asyncio.wait_for(protocol_object.lost, TIMEOUT_S)
    with_connection(test)


def test_a_peer_reset_reaches_the_protocol_as_the_error():
    async def test(loop, client, protocol_object):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        exc = await asyncio.wait_for(protocol_object.lost, TIMEOUT_S)
        assert isinstance(exc, ConnectionResetError)
        assert protocol_object.events == ["made", "lost"]
    with_connection(test)


def test_a_failing_protocol_closes_its_connection_only():
    async def test(loop):
        reported = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        server = Server(loop)
        bad_client, bad = await server.connect()
        good_client, good = await server.connect()

        def fail(protocol_object):
            raise RuntimeError("protocol bug")
        bad.on_data = fail
        bad_client.sendall(b"x")
        assert isinstance(await asyncio.wait_for(bad.lost, TIMEOUT_S), RuntimeError)
        assert [str(context["exception"]) for context in reported] == ["protocol bug"]
        good_client.sendall(b"fine")
        await until(lambda: good.received == b"fine", "the other connection's bytes")
        good.transport.close()
        await asyncio.wait_for(good.lost, TIMEOUT_S)
        bad_client.close()
        good_client.close()
        server.close()
    run(test)


def epoll_watched_descriptors() -> set[int]:
    """Descriptor numbers any epoll set of this process watches (from /proc fdinfo)."""
    watched = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{name}") as info:
                watched.update(int(line.split()[1]) for line in info if line.startswith("tfd:"))
        except OSError:
            continue  # closed meanwhile
    return watched


def test_a_closed_transport_leaves_the_epoll_set_even_while_a_dup_of_its_socket_lives():
    # Closing a descriptor ends its epoll registration only with the last descriptor of the
    # socket; a dup (direct I/O makes one of the socket object) would keep it, and events
    # would then name a transport that is gone.
    async def test(loop, client, protocol):
        fd = protocol.transport.get_extra_info("socket").fileno()
        duplicate = os.dup(fd)
        try:
            assert fd in epoll_watched_descriptors()
            protocol.transport.close()
            assert await asyncio.wait_for(protocol.lost, TIMEOUT_S) is None
            assert fd not in epoll_watched_descriptors()
        finally:
            os.close(duplicate)
    with_connection(test)


def test_ipv6_and_unix_clients_have_their_addresses(tmp_path):
    async def test(loop):
        unix = Server(loop, socket.AF_UNIX, path=str(tmp_path / "s"))
        client, protocol_object = await unix.connect()
        assert protocol_object.transport.get_extra_info("peername") == ""
        assert protocol_object.transport.get_extra_info("socket").family == socket.AF_UNIX
        client.close()
        await asyncio.wait_for(protocol_object.lost, TIMEOUT_S)
        unix.close()
        if not socket.has_ipv6:
            return
        try:
            v6 = Server(loop, socket.AF_INET6)
        except OSError:
            return  # no IPv6 loopback here
        client, protocol_object = await v6.connect()
        assert protocol_object.transport.get_extra_info("peername") == client.getsockname()
        client.close()
        await asyncio.wait_for(protocol_object.lost, TIMEOUT_S)
        v6.close()
    run(test)


def test_accept_failures_are_reported_and_accepting_can_stop():
    async def test(loop):
        io = DirectIO(loop)
        not_listening = socket.socket()
        not_listening.setblocking(False)
        errors: list[OSError] = []
        acceptor = Acceptor(not_listening, Recorder, io, lambda exc: (errors.append(exc),
                                                                     acceptor.stop()))
        acceptor.start()  # an unconnected socket reports a hang-up: accept fails (EINVAL)
        await until(lambda: errors, "the accept failure")
        assert errors[0].errno == 22 and not acceptor.accepting
        acceptor.close()
        assert not_listening.fileno() == -1
        io.close()
    run(test)


class Framed(Relay, asyncio.BufferedProtocol):
    """A Relay: the transport reads into its buffer with C calls; every message is INSPECTed."""

    def __init__(self):
        self.set_actions(action_table(INSPECT))
        self.messages: list[tuple[int, bytes]] = []
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.attach_transport(transport)

    def on_message(self, msg_type, view):
        self.messages.append((msg_type, bytes(view)))

    def connection_lost(self, exc):
        self.lost.set_result(exc)


def test_a_relay_protocol_frames_what_the_transport_reads_in_any_pieces():
    async def test(loop, client, relay):
        messages = [b"Q" + struct.pack("!I", 4 + n) + os.urandom(n) for n in (0, 1, 100, 70000)]
        stream = b"".join(messages)
        for piece in range(0, len(stream), 997):  # boundaries everywhere, some mid-header
            client.sendall(stream[piece:piece + 997])
            await asyncio.sleep(0)
        await until(lambda: len(relay.messages) == len(messages), "every message")
        assert [body for _, body in relay.messages] == messages
        client.close()
        assert await asyncio.wait_for(relay.lost, TIMEOUT_S) is None
    with_connection(test, protocol=Framed)
