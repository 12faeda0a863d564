#!/usr/bin/env python3
"""The floor of a login on uvloop: what one short connection (pgbench -C) costs a Python
server before any pooling, authentication or server work.

It accepts, answers an SSLRequest with 'N', greets a startup packet with a fixed
AuthenticationOk/ParameterStatus/BackendKeyData/ReadyForQuery, answers every query with the
same one-row result and closes on Terminate: no PostgreSQL behind it. txn_cpu.py runs it as
target `login` (with a `SELECT 1` script for every target, as it cannot answer pgbench's own
queries):

    python bench/micro/txn_cpu.py -C --targets pgbouncer,pgmulti,login
    python bench/micro/bare_login.py LISTEN_PORT    # on its own
"""

from __future__ import annotations

import asyncio
import struct
import sys

import uvloop

SSL_REQUEST_CODE = 80877103


def message(msg_type: bytes, body: bytes = b"") -> bytes:
    return msg_type + struct.pack("!I", len(body) + 4) + body


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", name.encode() + b"\0" + value.encode() + b"\0")


GREETING = (message(b"R", struct.pack("!I", 0))
            + parameter_status("server_version", "15.0")
            + parameter_status("server_encoding", "UTF8")
            + parameter_status("client_encoding", "UTF8")
            + parameter_status("standard_conforming_strings", "on")
            + parameter_status("DateStyle", "ISO, MDY")
            + parameter_status("integer_datetimes", "on")
            + message(b"K", struct.pack("!II", 1, 2))
            + message(b"Z", b"I"))
# One int4 column, one row: "0".
ANSWER = (message(b"T", struct.pack("!H", 1) + b"?column?\0" + struct.pack("!IHIhih", 0, 0, 23, 4, -1, 0))
          + message(b"D", struct.pack("!HI", 1, 1) + b"0")
          + message(b"C", b"SELECT 1\0")
          + message(b"Z", b"I"))


class Login(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.pending = b""
        self.logged_in = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        data = self.pending + data
        while True:
            if not self.logged_in:  # untyped packets: length, then code
                if len(data) < 8 or len(data) < struct.unpack("!I", data[:4])[0]:
                    break
                length, code = struct.unpack("!II", data[:8])
                data = data[length:]
                if code == SSL_REQUEST_CODE:
                    self.transport.write(b"N")
                else:
                    self.logged_in = True
                    self.transport.write(GREETING)
            else:
                if len(data) < 5 or len(data) < 1 + struct.unpack("!I", data[1:5])[0]:
                    break
                msg_type, length = data[:1], struct.unpack("!I", data[1:5])[0]
                data = data[1 + length:]
                if msg_type == b"X":
                    self.transport.close()
                    return
                if msg_type == b"Q":
                    self.transport.write(ANSWER)
        self.pending = data


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Login, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
