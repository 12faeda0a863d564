#!/usr/bin/env python3
"""The floor of a Python proxy on uvloop: a 1:1 TCP relay that does nothing but forward.

Each client connection gets its own connection to PostgreSQL (no pooling, no parsing, no
bookkeeping); bytes read from one side are written to the other, one write per read, with
uvloop's BufferedProtocol like pgmulti's relay. Its CPU per transaction is what uvloop and
CPython cost for two reads and two writes; txn_cpu.py runs it as target `relay`:

    python bench/micro/txn_cpu.py --targets pgbouncer,pgmulti,relay
    python bench/micro/bare_relay.py LISTEN_PORT PG_HOST PG_PORT    # on its own
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

READ_SIZE = 65536


class Side(asyncio.BufferedProtocol):
    """One socket: what it reads goes to `peer` (a transport), buffered until there is one."""

    def __init__(self):
        self.view = memoryview(bytearray(READ_SIZE))
        self.transport = None
        self.peer = None
        self.early: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        data = bytes(self.view[:nbytes])
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc):
        if self.peer is not None:
            self.peer.close()

    def attach(self, peer) -> None:
        self.peer = peer
        for data in self.early:
            peer.write(data)
        self.early.clear()


class ClientSide(Side):
    def __init__(self, upstream: tuple[str, int]):
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport):
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            server_transport, server = await loop.create_connection(Side, *self.upstream)
        except OSError:
            self.transport.close()
            return
        server.attach(self.transport)
        self.attach(server_transport)


async def serve(listen_port: int, upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: ClientSide(upstream), "127.0.0.1", listen_port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, host, pg_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    uvloop.run(serve(port, (host, pg_port)))
