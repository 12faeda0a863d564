"""DirectIO.drive_loop on a real uvloop loop: the loop waits in the codec's epoll set, which
holds libuv's own. Whatever libuv has to do must still happen at once: timers, callbacks,
wake-ups from other threads, its own descriptors, and descriptor changes made while the codec
runs a batch (libuv applies those only when it polls). release_loop(), also from inside a
batch, goes back to waiting in uvloop's set, and the loop then closes cleanly."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvloop
from test_socket_transport import TIMEOUT_S, Recorder, Server, until


def run_driven(test):
    """Run `test(loop, server)` with the server's DirectIO driving the loop. A thread stops
    the loop if it hangs: a wait that missed a libuv wake-up would otherwise never return."""
    loop = uvloop.new_event_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    watchdog = threading.Timer(2 * TIMEOUT_S, loop.call_soon_threadsafe, (loop.stop,))
    watchdog.start()

    async def body():
        server = Server(loop)
        assert server.io.drive_loop()
        try:
            await test(loop, server)
        finally:
            server.io.release_loop()
            server.close()
    try:
        loop.run_until_complete(body())
    finally:
        watchdog.cancel()
        loop.close()    # fails if a handle of ours were still open
    assert errors == []


def test_the_loop_waits_in_the_codec_set_and_serves_connections():
    async def test(loop, server):
        client, protocol_object = await server.connect()
        with client:
            for i in range(50):
                message = b"ping %d" % i
                client.send(message)
                await until(lambda m=message: protocol_object.received.endswith(m), "the read")
            waits = server.io.waits
            assert waits > 0
            assert server.io.counters()["waits"] == waits
            assert not server.io.drive_loop()   # once
    run_driven(test)


def test_timers_fire_while_the_codec_waits():
    async def test(loop, server):
        started = time.monotonic()
        await asyncio.sleep(0.2)
        waited = time.monotonic() - started
        assert 0.19 <= waited < TIMEOUT_S
        assert server.io.waits > 0      # the sleep was spent in the codec's set
    run_driven(test)


def test_another_thread_wakes_the_loop():
    async def test(loop, server):
        woken = loop.create_future()
        threading.Timer(0.05, loop.call_soon_threadsafe, (woken.set_result, "woken")).start()
        assert await woken == "woken"
    run_driven(test)


def test_libuv_descriptors_are_served():
    """A connection made by uvloop itself (its own transport, in libuv's set)."""
    async def test(loop, server):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with listener:
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            peer, _ = await loop.run_in_executor(None, listener.accept)
            with peer:
                peer.sendall(b"hello\n")
                assert await reader.readline() == b"hello\n"
                writer.write(b"back\n")
                await writer.drain()
                assert await loop.run_in_executor(None, peer.recv, 5) == b"back\n"
            writer.close()
    run_driven(test)


def test_a_reader_added_during_a_batch_is_watched_at_once():
    """A protocol callback run by the codec adds a uvloop reader and does nothing else: no
    callback queued, no timer. libuv applies the change only when it polls, so the codec
    must give it a turn instead of waiting on."""
    async def test(loop, server):
        ready_a, ready_b = socket.socketpair()
        seen = loop.create_future()

        def on_readable():
            loop.remove_reader(ready_a.fileno())
            seen.set_result(ready_a.recv(10))

        def add_reader(protocol_object):
            protocol_object.on_data = None
            loop.add_reader(ready_a.fileno(), on_readable)

        with ready_a, ready_b:
            ready_b.send(b"readable")
            client, protocol_object = await server.connect()
            with client:
                protocol_object.on_data = add_reader
                # Sent while the loop waits, so the batch runs inside the codec's wait.
                threading.Timer(0.05, client.send, (b"x",)).start()
                assert await asyncio.wait_for(seen, TIMEOUT_S / 2) == b"readable"
    run_driven(test)


def test_callbacks_a_batch_queues_run_before_the_next_batch():
    """As when libuv did the waiting: a callback queued while the codec read one
    connection runs before the codec reads another that became readable meanwhile."""
    async def test(loop, server):
        order: list[str] = []
        first, first_protocol = await server.connect()
        second, second_protocol = await server.connect()

        def queue_and_wake_the_second(protocol_object):
            protocol_object.on_data = None
            loop.call_soon(order.append, "callback")
            second.send(b"y")   # readable before this batch ends

        with first, second:
            first_protocol.on_data = queue_and_wake_the_second
            second_protocol.on_data = lambda _: order.append("second read")
            # Sent while the loop waits, so the first read runs inside the codec's wait.
            threading.Timer(0.05, first.send, (b"x",)).start()
            await until(lambda: len(order) == 2, "the callback and the second read")
            assert order == ["callback", "second read"]
    run_driven(test)


def test_release_inside_a_batch_goes_back_to_uvloops_wait():
    async def test(loop, server):
        client, protocol_object = await server.connect()

        def release(protocol_object):
            protocol_object.on_data = None
            server.io.release_loop()

        with client:
            protocol_object.on_data = release
            client.send(b"first")
            await until(lambda: protocol_object.received == b"first", "the first read")
            waits = server.io.waits
            for i in range(20):     # still read, now through uvloop's reader
                client.send(b"%d," % i)
            expected = b"first" + b"".join(b"%d," % i for i in range(20))
            await until(lambda: protocol_object.received == expected, "the later reads")
            await asyncio.sleep(0.05)
            assert server.io.waits == waits
    run_driven(test)


class Interrupting(Recorder):
    def buffer_updated(self, nbytes):
        raise KeyboardInterrupt


def test_keyboard_interrupt_in_a_batch_stops_the_loop():
    loop = uvloop.new_event_loop()

    async def body():
        server = Server(loop, protocol=Interrupting)
        assert server.io.drive_loop()
        try:
            client, _ = await server.connect()
            with client:
                client.send(b"x")
                await asyncio.sleep(TIMEOUT_S)
        finally:
            server.io.release_loop()
            server.close()
    task = loop.create_task(body())
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(task)
        assert not task.done()
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
    finally:
        loop.close()


def test_a_loop_closed_without_release_closes_our_handles():
    """Only uvloop's complaint about a handle it does not know; no hang, no failure."""
    loop = uvloop.new_event_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    async def body():
        server = Server(loop)
        assert server.io.drive_loop()
        await asyncio.sleep(0.01)
        return server
    server = loop.run_until_complete(body())
    loop.close()
    server.close()
    assert [error["message"] for error in errors] == [
        "handle.data is NULL in __close_all_handles_cb"] * 2
    assert server.io.counters()["waits"] > 0
