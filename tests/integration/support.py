"""Helpers the integration tests share (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from pgmulti.cluster import clean_env, find_free_port

SRC_DIR = Path(__file__).resolve().parents[2] / "src"


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from a blocking socket; EOFError if it closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def wait_for(predicate, timeout: float, what: str = "condition", interval: float = 0.05):
    """Poll predicate() until it returns a truthy value (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    """`python -m pgmulti ARGS` to completion, stdout and stderr captured apart."""
    env = clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(SRC_DIR),
                                                             os.environ.get("PYTHONPATH")])))
    env.pop("NOTIFY_SOCKET", None)  # a test's systemd socket is for the processes it means
    return subprocess.run([sys.executable, "-m", "pgmulti", *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)


def write_config(tmp_path: Path, text: str, users: str = '"postgres" ""\n',
                 name: str = "pgmulti.ini") -> Path:
    """Write a config for run_cli (placeholders filled in) and its userlist.txt."""
    for placeholder, value in (("{pg_port}", "5432"), ("{pg_host}", "127.0.0.1"),
                               ("{listen_port}", str(find_free_port())),
                               ("{auth_file}", str(tmp_path / "userlist.txt")),
                               ("{tmp}", str(tmp_path))):
        text = text.replace(placeholder, value)
    (tmp_path / "userlist.txt").write_text(users)
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of text containing needle."""
    for number, line in enumerate(text.split("\n"), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the text")


def admin(proxy, command: str) -> list[dict[str, str]]:
    """Run an admin console command with psql; rows as {column: value}."""
    result = subprocess.run(
        [proxy.pg.bindir / "psql", "-X", "-A", "-F", "|", "-P", "footer=off", "-w",
         "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", "-d", "pgbouncer",
         "-c", command],
        env=clean_env(PGCONNECT_TIMEOUT="5"), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split("|")
    return [dict(zip(header, line.split("|"))) for line in lines[1:]]


def client_port(conn: psycopg.Connection) -> int:
    """The client-side port of a psycopg connection, as SHOW CLIENTS shows it."""
    sock = socket.socket(fileno=conn.info.pgconn.socket)
    try:
        return sock.getsockname()[1]
    finally:
        sock.detach()


CODEC_COUNTERS = re.compile(
    r"codec hand-offs: links (\d+), releases (\d+), handoffs (\d+), queued (\d+)")


def latest_counters(proxy) -> tuple[int, int, int, int] | None:
    """The codec's hand-off counters a pool last logged (verbose, once per stats_period)."""
    found = CODEC_COUNTERS.findall(proxy.log_text())
    return tuple(map(int, found[-1])) if found else None


DIRECT_IO_COUNTERS = re.compile(
    r"direct I/O: sockets (\d+), reads (\d+), sends (\d+), handed_back (\d+), clients (\d+), "
    r"waits (\d+), loop_turns (\d+)")


def direct_io_counters(proxy) -> dict[str, int] | None:
    """The codec's direct I/O counters last logged (verbose, once per stats_period)."""
    found = DIRECT_IO_COUNTERS.findall(proxy.log_text())
    if not found:
        return None
    names = ("sockets", "reads", "sends", "handed_back", "clients", "waits", "loop_turns")
    return dict(zip(names, map(int, found[-1])))


def direct_io_reaching(proxy, **minimum: int) -> dict[str, int]:
    """Wait until the logged direct I/O counters reach `minimum`; return them."""
    def reached():
        counters = direct_io_counters(proxy)
        if counters and all(counters[name] >= value for name, value in minimum.items()):
            return counters
        return None
    return wait_for(reached, 5, f"direct I/O counters reaching {minimum}")


# --- a raw protocol client ---


def startup_packet(params: dict[str, str], version: tuple[int, int] = (3, 0)) -> bytes:
    body = struct.pack("!I", (version[0] << 16) | version[1])
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(msg_type: bytes, body: bytes = b"") -> bytes:
    return msg_type + struct.pack("!I", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def error_fields(body: bytes) -> dict[str, str]:
    fields, pos = {}, 0
    while pos < len(body) and body[pos] != 0:
        end = body.index(b"\0", pos + 1)
        fields[chr(body[pos])] = body[pos + 1:end].decode()
        pos = end + 1
    return fields


def parse_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    messages, pos = [], 0
    while pos + 5 <= len(data):
        length = struct.unpack("!I", data[pos + 1:pos + 5])[0]
        messages.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return messages


class Raw:
    """A TCP socket speaking the protocol by hand; every read is bounded by a timeout."""

    def __init__(self, proc, timeout: float = 5.0):
        self.sock = socket.create_connection((proc.host, proc.port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, size: int, deadline: float) -> None:
        while len(self.buf) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete message in time; have {self.buf!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; have {self.buf!r}")
            self.buf += chunk

    def read_byte(self, timeout: float = 5.0) -> bytes:
        self._fill(1, time.monotonic() + timeout)
        byte, self.buf = self.buf[:1], self.buf[1:]
        return byte

    def read_message(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + timeout
        self._fill(5, deadline)
        length = struct.unpack("!I", self.buf[1:5])[0]
        self._fill(1 + length, deadline)
        msg_type, body = self.buf[:1], self.buf[5:1 + length]
        self.buf = self.buf[1 + length:]
        return msg_type, body

    def read_until(self, wanted: bytes, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first of type `wanted` (or an ErrorResponse)."""
        messages = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.read_message(max(0.01, deadline - time.monotonic()))
            messages.append(msg)
            if msg[0] in (wanted, b"E"):
                return messages

    def read_until_closed(self, timeout: float = 5.0) -> bytes:
        """All bytes until the peer closes; TimeoutError if it stays open."""
        deadline = time.monotonic() + timeout
        data, self.buf = self.buf, b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"connection still open; received {data!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def login(self, user: str = "postgres", db: str = "testdb",
              version: tuple[int, int] = (3, 0), **extra: str) -> list:
        self.send(startup_packet({"user": user, "database": db, **extra}, version))
        messages = self.read_until(b"Z")
        assert messages[-1][0] == b"Z", f"login failed: {error_fields(messages[-1][1])}"
        return messages

    def simple_query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(query_message(sql))
        return self.read_until(b"Z")
