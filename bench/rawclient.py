#!/usr/bin/env python3
"""A minimal PostgreSQL client on raw sockets for the memory benchmarks.

No driver: nothing on the client side buffers a result, so a 100 MB DataRow or ten million
rows stream through and are counted, not kept. Trust authentication only. Every mode prints
one JSON line with what it did; `idle` then holds its connections until stdin closes.

    rawclient.py PORT idle COUNT
    rawclient.py PORT copy-in BYTES       # COPY bench_copy FROM STDIN, 8 KiB lines
    rawclient.py PORT copy-out BYTES      # COPY (SELECT repeat(...)) TO STDOUT
    rawclient.py PORT big-row BYTES       # SELECT repeat('x', BYTES): one DataRow
    rawclient.py PORT rows COUNT          # SELECT g FROM generate_series(1, COUNT) g
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import struct
import sys
import time

HOST = "127.0.0.1"
PROTOCOL_VERSION_3 = 196608
AUTHENTICATION = ord("R")
ERROR_RESPONSE = ord("E")
READY_FOR_QUERY = ord("Z")
COPY_IN_RESPONSE = ord("G")
DATA_ROW = ord("D")
COPY_DATA = ord("d")
AUTH_OK = 0
RECV_SIZE = 1 << 20
LINE_BYTES = 8192              # one COPY line, newline included
COPY_CHUNK_LINES = 8           # CopyData messages of 64 KiB, as psql sends about
CONNECT_TIMEOUT_S = 30.0
IDLE_CONCURRENCY = 64          # logins in flight at once: below the proxies' listen backlog


class ServerError(Exception):
    """An ErrorResponse, or a reply this client does not handle."""


def startup_message(user: str, database: str) -> bytes:
    body = struct.pack("!I", PROTOCOL_VERSION_3) + f"user\0{user}\0database\0{database}\0\0".encode()
    return struct.pack("!I", len(body) + 4) + body


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error_text(body: bytes) -> str:
    """The SQLSTATE and message fields of an ErrorResponse body."""
    fields = {part[:1]: part[1:].decode(errors="replace") for part in body.split(b"\0") if part}
    return f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}"


def check_auth(kind: int, body: bytes) -> None:
    if kind == ERROR_RESPONSE:
        raise ServerError(error_text(body))
    if kind == AUTHENTICATION and struct.unpack_from("!I", body)[0] != AUTH_OK:
        raise ServerError("the server asks for a password: this client does trust only")


class Drain:
    """Reads a socket to the next ReadyForQuery, counting messages instead of keeping them.

    Only ErrorResponse, ReadyForQuery and the awaited message are read whole; every other body
    is skipped by a remaining-bytes counter, however long it is.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending = b""  # the start of a message whose header or small body is incomplete
        self.skip = 0       # bytes left of a body being skipped
        self.last_body = b""  # body of the message `until` returned last
        self.bytes = 0
        self.counts: dict[int, int] = {}

    def until(self, wanted: int) -> int:
        """Read until a message of type `wanted` (or ReadyForQuery) ends; return its type."""
        while True:
            found = self._scan(wanted)
            if found is not None:
                return found
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                raise ServerError("the server closed the connection")
            self.bytes += len(chunk)
            self.pending += chunk

    def _scan(self, wanted: int) -> int | None:
        data, pos = self.pending, 0
        try:
            while True:
                if self.skip:
                    step = min(self.skip, len(data) - pos)
                    pos += step
                    self.skip -= step
                    if self.skip:
                        return None
                if len(data) - pos < 5:
                    return None
                kind = data[pos]
                end = pos + 1 + struct.unpack_from("!I", data, pos + 1)[0]
                self.counts[kind] = self.counts.get(kind, 0) + 1
                if kind in (ERROR_RESPONSE, READY_FOR_QUERY, wanted):
                    if end > len(data):
                        self.counts[kind] -= 1  # counted again once complete
                        return None
                    self.last_body = data[pos + 5 : end]
                    if kind == ERROR_RESPONSE:
                        raise ServerError(error_text(self.last_body))
                    pos = end
                    return kind
                if end > len(data):
                    self.skip = end - len(data)
                    pos = len(data)
                    return None
                pos = end
        finally:
            self.pending = data[pos:]


def connect(port: int, user: str, database: str) -> tuple[socket.socket, Drain]:
    sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT_S)
    sock.settimeout(None)
    sock.sendall(startup_message(user, database))
    drain = Drain(sock)
    while True:
        # Authentication carries a body we must read: ask for it as the awaited type.
        kind = drain.until(AUTHENTICATION)
        if kind == READY_FOR_QUERY:
            return sock, drain
        check_auth(kind, drain.last_body)


def query(port: int, user: str, database: str, sql: str) -> dict:
    """Send one simple Query and count the answer, down to ReadyForQuery."""
    sock, drain = connect(port, user, database)
    with sock:
        received_before = drain.bytes
        sock.sendall(message(b"Q", sql.encode() + b"\0"))
        drain.counts.clear()
        drain.until(READY_FOR_QUERY)
        sock.sendall(message(b"X"))
    return {"received_bytes": drain.bytes - received_before,
            "data_rows": drain.counts.get(DATA_ROW, 0), "copy_data": drain.counts.get(COPY_DATA, 0)}


def copy_in(port: int, user: str, database: str, table: str, total_bytes: int) -> dict:
    """COPY `table` FROM STDIN with `total_bytes` of 8 KiB text lines, in 64 KiB CopyData."""
    line = b"x" * (LINE_BYTES - 1) + b"\n"
    chunk = message(b"d", line * COPY_CHUNK_LINES)
    chunks = max(1, total_bytes // (LINE_BYTES * COPY_CHUNK_LINES))
    sock, drain = connect(port, user, database)
    with sock:
        sock.sendall(message(b"Q", f"COPY {table} FROM STDIN".encode() + b"\0"))
        if drain.until(COPY_IN_RESPONSE) != COPY_IN_RESPONSE:
            raise ServerError("no CopyInResponse")
        for _ in range(chunks):
            sock.sendall(chunk)
        sock.sendall(message(b"c"))  # CopyDone
        drain.until(READY_FOR_QUERY)
        sock.sendall(message(b"X"))
    return {"sent_bytes": chunks * (len(chunk) - 5), "lines": chunks * COPY_CHUNK_LINES}


# --- idle connections ---


async def open_idle(port: int, user: str, database: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), CONNECT_TIMEOUT_S)
    try:
        writer.write(startup_message(user, database))
        while True:
            header = await asyncio.wait_for(reader.readexactly(5), CONNECT_TIMEOUT_S)
            kind, length = header[0], struct.unpack_from("!I", header, 1)[0]
            body = await reader.readexactly(length - 4)
            check_auth(kind, body)
            if kind == READY_FOR_QUERY:
                return writer
    except BaseException:
        writer.close()
        raise


async def hold_idle(port: int, user: str, database: str, count: int) -> None:
    """Log `count` clients in, report, and keep them open until stdin closes."""
    started = time.monotonic()
    gate = asyncio.Semaphore(IDLE_CONCURRENCY)

    async def one() -> asyncio.StreamWriter:
        async with gate:
            return await open_idle(port, user, database)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    writers = [result for result in results if isinstance(result, asyncio.StreamWriter)]
    errors = [repr(result) for result in results if not isinstance(result, asyncio.StreamWriter)]
    report({"opened": len(writers), "failed": len(errors), "first_error": errors[0] if errors else None,
            "seconds": round(time.monotonic() - started, 3)})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.close()


def raise_file_limit() -> None:
    """Each idle client is one descriptor: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def report(result: dict) -> None:
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("mode", choices=("idle", "copy-in", "copy-out", "big-row", "rows"))
    parser.add_argument("amount", type=int, help="connections, bytes or rows, by mode")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--database", default="bench")
    parser.add_argument("--table", default="bench_copy", help="copy-in target (one text column)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.mode == "idle":
            raise_file_limit()
            asyncio.run(hold_idle(args.port, args.user, args.database, args.amount))
            return 0
        if args.mode == "copy-in":
            result = copy_in(args.port, args.user, args.database, args.table, args.amount)
        else:
            lines = max(1, args.amount // LINE_BYTES)
            sql = {
                "copy-out": f"COPY (SELECT repeat('x', {LINE_BYTES - 1}) FROM generate_series(1, {lines})) TO STDOUT",
                "big-row": f"SELECT repeat('x', {args.amount})",
                "rows": f"SELECT g FROM generate_series(1, {args.amount}) g",
            }[args.mode]
            result = query(args.port, args.user, args.database, sql)
    except (OSError, ServerError) as exc:
        report({"error": str(exc)})
        return 1
    report({**result, "seconds": round(time.monotonic() - started, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
