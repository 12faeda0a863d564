"""Helpers the integration tests share (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import re
import socket
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
    r"direct I/O: sockets (\d+), reads (\d+), sends (\d+), handed_back (\d+)")


def direct_io_counters(proxy) -> dict[str, int] | None:
    """The codec's direct I/O counters last logged (verbose, once per stats_period)."""
    found = DIRECT_IO_COUNTERS.findall(proxy.log_text())
    if not found:
        return None
    return dict(zip(("sockets", "reads", "sends", "handed_back"), map(int, found[-1])))


def direct_io_reaching(proxy, **minimum: int) -> dict[str, int]:
    """Wait until the logged direct I/O counters reach `minimum`; return them."""
    def reached():
        counters = direct_io_counters(proxy)
        if counters and all(counters[name] >= value for name, value in minimum.items()):
            return counters
        return None
    return wait_for(reached, 5, f"direct I/O counters reaching {minimum}")
