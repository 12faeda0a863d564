"""Protocol 3.2 (PostgreSQL 18): negotiation and long cancel keys, on both legs.

Clients: psycopg with its bundled libpq 18 (`max_protocol_version`) and raw sockets. The
session PostgreSQL is 15, which answers pgmulti's 3.2 request with a downgrade to 3.0; the
3.2 server leg is tested with one pgmulti in front of another (the back one speaks 3.2 to its
clients), with `pgmulti analyze` between them recording what crossed the wire.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgmulti.cluster import (ClusterError, clean_env, find_free_port, give_to_server_user,
                             server_user_popen_kwargs, stop_process, wait_until_listening)
from support import Raw, error_fields, query_message, startup_packet

CONNECT_TIMEOUT_S = 5
SOCKET_TIMEOUT_S = 5.0
CANCEL_DELAY_S = 0.5
SLEEP_SQL = "SELECT pg_sleep(10)"
CANCELED_WITHIN_S = 5.0
CANCEL_REQUEST_CODE = 80877102
QUERY_CANCELED = "57014"
PROTOCOL_VIOLATION = "08P01"
SRC_DIR = Path(__file__).resolve().parents[2] / "src"


def version_code(major: int, minor: int) -> int:
    return (major << 16) | minor


# --- a raw protocol client (support.Raw) ---


def cancel_packet(pid: int, key: bytes) -> bytes:
    return struct.pack("!III", 12 + len(key), CANCEL_REQUEST_CODE, pid) + key


def key_data(messages: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """(pid, key) of the BackendKeyData among the login messages."""
    [body] = [body for msg_type, body in messages if msg_type == b"K"]
    return struct.unpack("!I", body[:4])[0], body[4:]


def send_cancel(proxy, packet: bytes) -> bytes:
    """A CancelRequest on its own connection; what the proxy answered before closing."""
    with Raw(proxy) as raw:
        raw.send(packet)
        return raw.read_until_closed()


# --- psycopg ---


def pconnect(proxy, max_protocol_version: str, db: str = "testdb", **params) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(db=db), max_protocol_version=max_protocol_version,
                           connect_timeout=CONNECT_TIMEOUT_S, autocommit=True,
                           prepare_threshold=None, **params)


def assert_cancels(conn: psycopg.Connection, cancel) -> None:
    """A long pg_sleep is canceled by `cancel()` run from another thread; the session goes on."""
    timer = threading.Timer(CANCEL_DELAY_S, cancel)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(SLEEP_SQL)
    finally:
        timer.cancel()
        timer.join(SOCKET_TIMEOUT_S)
    assert time.monotonic() - started < CANCELED_WITHIN_S
    assert conn.execute("SELECT 1").fetchone() == (1,)


# === clients asking for 3.2 ===


@pytest.mark.parametrize("max_version, expected", [("3.0", 30000), ("3.2", 30002)])
def test_psycopg_gets_the_protocol_it_asks_for(pgmulti, max_version, expected):
    proxy = pgmulti()
    with pconnect(proxy, max_version) as conn:
        assert conn.pgconn.full_protocol_version == expected
        for i in range(3):  # transaction pooling: a server per transaction
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE p32 (x int) ON COMMIT DROP")
            conn.execute("INSERT INTO p32 SELECT generate_series(1, 100)")
            assert conn.execute("SELECT sum(x) FROM p32").fetchone() == (5050,)


@pytest.mark.parametrize("how", ["cancel_safe", "cancel"])
@pytest.mark.parametrize("max_version", ["3.0", "3.2"])
def test_psycopg_cancel(pgmulti, max_version, how):
    """cancel_safe: libpq's new cancel API; cancel: the legacy one. Both send the key libpq
    received in BackendKeyData: 4 bytes in 3.0, 32 from pgmulti in 3.2."""
    proxy = pgmulti()
    with pconnect(proxy, max_version) as conn:
        assert_cancels(conn, getattr(conn, how))


def test_psycopg_cancel_in_session_pooling_and_on_the_console(pgmulti):
    proxy = pgmulti({"pool_mode": "session"})
    with pconnect(proxy, "3.2") as conn:
        assert_cancels(conn, conn.cancel_safe)
    # The admin console has a key too (nothing to cancel there, but login must hand it out).
    with pconnect(proxy, "3.2", db="pgbouncer") as admin:
        assert admin.pgconn.full_protocol_version == 30002
        assert admin.execute("SHOW VERSION").fetchone()


# === raw sockets: negotiation and key lengths ===


@pytest.mark.parametrize("version, options, negotiated, key_length", [
    pytest.param((3, 0), {}, None, 4, id="3.0"),
    pytest.param((3, 2), {}, None, 32, id="3.2"),
    pytest.param((3, 3), {}, (3, 2), 32, id="3.3-downgraded"),
    pytest.param((3, 9999), {}, (3, 2), 32, id="3.9999-grease"),
    pytest.param((3, 2), {"_pq_.test_option": "1"}, (3, 2), 32, id="3.2-unknown-option"),
    pytest.param((3, 0), {"_pq_.test_option": "1"}, (3, 0), 4, id="3.0-unknown-option"),
])
def test_negotiation_and_key_length(pgmulti, version, options, negotiated, key_length):
    proxy = pgmulti()
    with Raw(proxy) as raw:
        messages = raw.login(version=version, **options)
        negotiations = [body for msg_type, body in messages if msg_type == b"v"]
        if negotiated is None:
            assert negotiations == []
        else:
            expected = struct.pack("!II", version_code(*negotiated), len(options))
            expected += b"".join(name.encode() + b"\0" for name in options)
            assert negotiations == [expected]
            assert messages[0][0] == b"v"  # before authentication, as PostgreSQL sends it
        pid, key = key_data(messages)
        assert len(key) == key_length
        assert pid != 0
        raw.send(query_message("SELECT 1"))
        assert (b"D", struct.pack("!HI", 1, 1) + b"1") in raw.read_until(b"Z")


def test_keys_differ_between_clients(pgmulti):
    proxy = pgmulti()
    keys = set()
    for _ in range(3):
        with Raw(proxy) as raw:
            keys.add(key_data(raw.login(version=(3, 2))))
    assert len(keys) == 3


def test_long_key_cancel_request_finds_the_client(pgmulti):
    proxy = pgmulti()
    with Raw(proxy) as raw:
        pid, key = key_data(raw.login(version=(3, 2)))
        assert len(key) == 32
        raw.send(query_message(SLEEP_SQL))
        time.sleep(CANCEL_DELAY_S)
        # Wrong keys are ignored: another key, the right one cut to 3.0's 4 bytes, one byte more.
        wrong = [bytes(b ^ 0xFF for b in key), key[:4], key + b"\0"]
        for bad_key in wrong:
            assert send_cancel(proxy, cancel_packet(pid, bad_key)) == b""
        with pytest.raises(TimeoutError):
            raw.read_message(CANCEL_DELAY_S)  # still sleeping: nothing was canceled
        started = time.monotonic()
        assert send_cancel(proxy, cancel_packet(pid, key)) == b""
        messages = raw.read_until(b"Z", SOCKET_TIMEOUT_S)
        assert time.monotonic() - started < CANCELED_WITHIN_S
    errors = [error_fields(body) for msg_type, body in messages if msg_type == b"E"]
    assert [fields["C"] for fields in errors] == [QUERY_CANCELED]


@pytest.mark.parametrize("key_length", [0, 257])
def test_cancel_request_with_a_bad_key_length_is_refused(pgmulti, key_length):
    proxy = pgmulti()
    answer = send_cancel(proxy, cancel_packet(1234, b"k" * key_length))
    assert answer[:1] == b"E", answer
    fields = error_fields(answer[5:])
    assert (fields["S"], fields["C"]) == ("FATAL", PROTOCOL_VIOLATION), fields
    with pconnect(proxy, "3.2") as conn:  # the proxy is unharmed
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_protocol_4_is_refused(pgmulti):
    proxy = pgmulti()
    with Raw(proxy) as raw:
        raw.send(startup_packet({"user": "postgres", "database": "testdb"}, (4, 0)))
        msg_type, body = raw.read_message()
    fields = error_fields(body)
    assert (msg_type, fields["C"]) == (b"E", PROTOCOL_VIOLATION), fields
    assert "3.0 to 3.2" in fields["M"]


# === the server leg: pgmulti asks PostgreSQL for 3.2 ===


class Analyzer:
    """`python -m pgmulti.analyze` relaying to `target`, writing JSON lines."""

    def __init__(self, workdir: Path, target_port: int):
        self.port = find_free_port()
        self.output = workdir / "analyze.jsonl"
        self.log = workdir / "analyze.stderr"
        pythonpath = os.pathsep.join(filter(None, [str(SRC_DIR), os.environ.get("PYTHONPATH")]))
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pgmulti.analyze", "--listen", f"127.0.0.1:{self.port}",
                 "--target", f"127.0.0.1:{target_port}", "--output", str(self.output), "--json"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=clean_env(PYTHONPATH=pythonpath), start_new_session=True)
        try:
            wait_until_listening(self.popen, self.port, 15.0)
        except ClusterError as exc:
            self.stop()
            raise pytest.fail.Exception(f"analyzer did not start: {exc}", pytrace=False) from None

    def stop(self) -> None:
        stop_process(self.popen, 10.0)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.output.read_text().splitlines()]


@pytest.fixture
def analyzer(tmp_path, failure_log):
    started: list[Analyzer] = []

    def start(target_port: int) -> Analyzer:
        workdir = tmp_path / f"analyze{len(started)}"
        workdir.mkdir()
        proc = Analyzer(workdir, target_port)
        started.append(proc)
        failure_log("analyzer stderr", lambda: proc.log.read_text(errors="replace"))
        return proc

    yield start
    for proc in started:
        proc.stop()


def test_postgresql_15_downgrade_is_accepted(pgmulti, analyzer, pg):
    """PostgreSQL 15 answers the 3.2 request with NegotiateProtocolVersion 3.0 and a 4-byte
    key; pgmulti logs in, and a cancel reaches the server with that key."""
    recorder = analyzer(pg.port)
    proxy = pgmulti({"databases": {"testdb": f"host=127.0.0.1 port={recorder.port} dbname=testdb"},
                     "server_tls_sslmode": "disable"})
    with pconnect(proxy, "3.2") as conn:
        assert_cancels(conn, conn.cancel_safe)
    recorder.stop()
    records = recorder.records()
    startup = [r for r in records if r["type"] == "StartupMessage"]
    assert startup and all(r["fields"]["protocol"] == "3.2" for r in startup), startup
    negotiations = [r for r in records if r["type"] == "NegotiateProtocolVersion"]
    assert [r["fields"] for r in negotiations] == [
        {"newest_minor": version_code(3, 0), "unsupported": []}] * len(startup)
    keys = [r["fields"]["key"] for r in records if r["type"] == "BackendKeyData"]
    assert keys and set(keys) == {"<redacted> (4 bytes)"}, keys
    cancels = [r for r in records if r["type"] == "CancelRequest"]
    assert [r["length"] for r in cancels] == [16]


def test_long_server_key_is_kept_and_sent_back(pgmulti, analyzer):
    """A pgmulti in front of another pgmulti: the back one grants 3.2 and a 32-byte key; the
    front one keeps all of it and cancels with it (the back one finds its client only then)."""
    back = pgmulti()
    recorder = analyzer(back.port)
    front = pgmulti({"databases": {"chained": f"host=127.0.0.1 port={recorder.port} dbname=testdb"},
                     "server_tls_sslmode": "disable"})
    for max_version in ("3.0", "3.2"):
        with pconnect(front, max_version, db="chained") as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("testdb",)
            assert_cancels(conn, conn.cancel)
    recorder.stop()
    records = recorder.records()
    startup = [r for r in records if r["type"] == "StartupMessage"]
    assert startup and all(r["fields"]["protocol"] == "3.2" for r in startup), startup
    assert [r for r in records if r["type"] == "NegotiateProtocolVersion"] == []
    keys = [r["fields"]["key"] for r in records if r["type"] == "BackendKeyData"]
    assert keys and set(keys) == {"<redacted> (32 bytes)"}, keys
    cancels = [r for r in records if r["type"] == "CancelRequest"]
    assert [r["length"] for r in cancels] == [12 + 32] * 2


# --- a server that cannot negotiate ---


@pytest.fixture
def pgbouncer_in_front_of_pg(pg, tmp_path):
    """PgBouncer 1.18 (which answers a 3.2 StartupMessage with "bad packet header" instead of
    NegotiateProtocolVersion) as the server pgmulti pools, as when poolers are layered."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        pytest.skip("PgBouncer is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-layer-"))
    give_to_server_user(workdir)
    port = find_free_port()
    (workdir / "userlist.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"[databases]\ntestdb = host=127.0.0.1 port={pg.port} dbname=testdb\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir}/userlist.txt\npool_mode = transaction\n")
    for path in workdir.iterdir():
        give_to_server_user(path)
    with open(workdir / "pgbouncer.log", "wb") as log:
        process = subprocess.Popen([binary, str(workdir / "pgbouncer.ini")], cwd=workdir,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=clean_env(), start_new_session=True,
                                   **server_user_popen_kwargs())
    try:
        wait_until_listening(process, port, 15)
        yield port
    finally:
        stop_process(process, 5)
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_server_refusing_3_2_is_spoken_to_in_3_0(pgmulti, base_config, pgbouncer_in_front_of_pg):
    proxy = pgmulti(base_config(databases={
        "testdb": f"host=127.0.0.1 port={pgbouncer_in_front_of_pg} dbname=testdb"}))
    # The first client already gets through: the refused login is retried at once with 3.0,
    # without server_login_retry's back-off.
    for _ in range(3):
        with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "using protocol 3.0 for this pool" in proxy.log_text()
